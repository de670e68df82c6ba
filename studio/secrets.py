"""Keeping API keys out of everything the studio writes or shows.

Keys live only in memory, in the teacher object that uses them. Any text that may have passed near a
key (an error from an HTTP client, a log line, a traceback) goes through `redact` before it is
stored or displayed.
"""

from __future__ import annotations

import os
import re

KEY_ENV_VARS = ("STUDIO_TEACHER_API_KEY", "OPENAI_API_KEY")
_KEY_PATTERNS = (
    re.compile(r"sk-[A-Za-z0-9_\-]{6,}"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9_\-\.]{6,}"),
)
MASK = "***"


def key_from_env(var: str | None = None) -> str:
    """The API key from `var`, or from STUDIO_TEACHER_API_KEY / OPENAI_API_KEY; '' when none is set."""
    for name in ((var,) if var else KEY_ENV_VARS):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return ""


def redact(text: str, secrets: tuple[str, ...] | list[str] = ()) -> str:
    """`text` with every given secret and anything shaped like an API key masked."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    text = _KEY_PATTERNS[0].sub(MASK, text)
    return _KEY_PATTERNS[1].sub(lambda m: m.group(1) + MASK, text)
