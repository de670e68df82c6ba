"""Keeping API keys out of everything the studio writes or shows.

Keys live only in memory, in the teacher object that uses them. Any text that may have passed near a
key (an error from an HTTP client, a log line, a traceback) goes through `redact` before it is
stored or displayed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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


def _normal_url(url: str) -> str:
    return (url or "").strip().rstrip("/").lower()


@dataclass(frozen=True)
class KeyRouting:
    """Which URLs may receive the server's environment key.

    The owner names the teacher (and judge) server at start: `--teacher-base-url` (a URL or a provider
    preset's name) or STUDIO_TEACHER_BASE_URL. The environment key goes to that URL and nowhere else;
    when the owner named none, it goes only to the provider presets' fixed URLs. Any other URL, typed in
    the page, gets the key typed with it, or none.
    """

    owner_base_url: str = ""
    env_var: str | None = None
    preset_urls: tuple[str, ...] = ()

    def trusted(self, base_url: str) -> bool:
        wanted = _normal_url(base_url)
        if not wanted:
            return False
        if self.owner_base_url:
            return wanted == _normal_url(self.owner_base_url)
        return wanted in {_normal_url(u) for u in self.preset_urls}

    def key_for(self, base_url: str, typed_key: str = "") -> str:
        """The typed key if any; else the environment key, only for a trusted URL; else ''."""
        typed = (typed_key or "").strip()
        if typed:
            return typed
        return key_from_env(self.env_var) if self.trusted(base_url) else ""
