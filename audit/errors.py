"""Errors a user can fix.

A :class:`MemauditError` carries a one-line message that says what is wrong, where (file, key,
row) and how to fix it. The CLI prints it as is and exits non-zero; any other exception is a bug
or an environment failure and is logged with its traceback.
"""


class MemauditError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class ConfigError(MemauditError):
    """The run configuration (YAML, overrides) is invalid."""


class InputError(MemauditError):
    """An input the configuration points at (prompts, checkpoint, run folder) is unusable."""
