"""Keeping secrets out of what memaudit writes: run.json and log lines.

Two kinds of secret are removed: the password part of URLs (``scheme://user:password@host``), and
the value of any environment variable whose name says it is a secret (``*SECRET*``, ``*TOKEN*``,
``*PASSWORD*``, ``*_KEY``, ``*CREDENTIALS*``…), wherever it appears in a string.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

REDACTED = "<redacted>"
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|_KEY$|^KEY$|_KEY_ID$|SESSION)", re.I)
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@", re.I)
MIN_SECRET_LENGTH = 6


def secret_values() -> list[str]:
    """Values of secret-named environment variables, longest first."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, REDACTED)
    return text


def redact(obj: Any, secrets: list[str] | None = None) -> Any:
    """A copy of a JSON-like object with every string redacted."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, secrets) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """Rewrites each record's message with secrets removed (installed on the CLI's log handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
