"""Errors a user can fix.

A :class:`MemauditError` carries a one-line message that says what is wrong, where (file, key,
row) and how to fix it. The CLI prints it as is and exits non-zero; any other exception is a bug
or an environment failure and is logged with its traceback.
"""

import errno
import os


class MemauditError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(MemauditError):
    """The run configuration (YAML, overrides) is invalid."""


class InputError(MemauditError):
    """An input the configuration points at (prompts, checkpoint, run folder) is unusable."""


class StorageError(MemauditError):
    """The output storage refused a write: full, read-only, over quota or not permitted."""


# Only errors a write can cause: a permission error may come from a read too (and an unwritable
# run root is refused before any work, see audit.location.Location.check_writable).
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def storage_error(exc: BaseException | None) -> StorageError | None:
    """A :class:`StorageError` explaining ``exc`` if it is a refused write, else ``None``.

    Such a failure is not worth retrying on another worker: every worker writes to the same
    storage. Writes are atomic, so nothing partial is ever marked complete."""
    if not isinstance(exc, OSError) or exc.errno not in _STORAGE_ERRNOS:
        return None
    where = exc.filename or "the run folder"
    why = exc.strerror or os.strerror(exc.errno or 0)
    return StorageError(
        f"{where}: {why} while writing; free space or make the location writable (or set run.root to "
        "another place), then run again: complete shards are kept and nothing partial counts as complete"
    )
