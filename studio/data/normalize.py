"""Normalising and de-duplicating generated questions."""

from __future__ import annotations

import re
import unicodedata

_LEADING_MARKS = re.compile(r"^\s*(?:[-*•]|\d+[\.\)、:：]|[（(]\d+[)）])\s*")
_CJK = re.compile(r"[\u3400-\u9fff]")


def normalize_question(text: str) -> str:
    """Trim list markers and quotes, and end with a question mark (full-width for Chinese)."""
    text = _LEADING_MARKS.sub("", text.strip()).strip().strip("\"'“”‘’「」").strip()
    if not text:
        return ""
    mark = "？" if _CJK.search(text) else "?"
    text = text.rstrip("。.!！;；,，:： ")
    if not text.endswith(("?", "？")):
        text += mark
    return text


def dedup_key(text: str) -> str:
    """A key equal for questions that differ only in punctuation, spaces, width or case."""
    folded = unicodedata.normalize("NFKC", text).lower()
    return "".join(ch for ch in folded if not unicodedata.category(ch)[0] in "PZS")
