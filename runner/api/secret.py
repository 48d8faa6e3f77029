"""The API key and the scrubber that keeps it out of every message.

The key travels only in the ``Authorization`` header. It is kept in a :class:`Secret`,
whose repr and str hide it. A server may echo it back: every string taken from an
answer, and every error message the client raises, goes through :func:`scrub`, which
writes ``[REDACTED]`` over the key, any ``Bearer`` token and any ``Authorization`` value.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final

REDACTED: Final = "[REDACTED]"
_BEARER = re.compile(r"\b(bearer\s+)(?!\[REDACTED\])[^\s'\",;}\]]+", re.IGNORECASE)
_AUTHORIZATION = re.compile(r"(\bauthorization['\"]?\s*[:=]\s*['\"]?)[^'\"\r\n,;}]+",
                            re.IGNORECASE)  # fmt: skip


class Secret:
    """A string that never shows itself in a repr, str, log line or traceback."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that must send it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def scrub(text: str, secret: Secret | None = None) -> str:
    """``text`` with the key, any ``Bearer`` token and any ``Authorization`` value redacted.

    Covers the key verbatim anywhere, ``Bearer <token>`` in any case, and the value after
    ``Authorization:`` or ``"Authorization": "`` (header lines, JSON and Python reprs).
    Idempotent: scrubbed text scrubs to itself.
    """
    key = secret.reveal() if secret is not None else ""
    if key:
        text = text.replace(key, REDACTED)
    text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
    return _AUTHORIZATION.sub(lambda m: m.group(1) + REDACTED, text)


def key_file_warning(path: str) -> str | None:
    """A warning when a key file can be read by other users, else None."""
    mode = Path(path).stat().st_mode
    if mode & 0o077:
        perms = f"{mode & 0o777:o}"
        return f"{path}: key file is readable by others (mode {perms})\n  hint: chmod 600 {path}"
    return None


def api_key_from_env(environ: Mapping[str, str] = os.environ) -> str | None:
    """The key from ``APIMART_API_KEY``, stripped; None when unset or blank."""
    key = environ.get("APIMART_API_KEY", "").strip()
    return key or None
