"""Key facts: the short strings a right answer must contain, and what an answer's key facts say.

Character F1 punishes a long answer that contains the right fact and rewards a short wrong one. An
exam row instead carries `keys` (names, numbers, places quoted from the document); an answer is right
when it contains all of them. Keys and answers are compared after NFKC (full-width and half-width
alike), case folding, and with punctuation, symbols and spaces removed. An answer that misses its own
keys but contains another section's keys is marked as confused: it recited the wrong part of the
document.
"""

from __future__ import annotations

import unicodedata

MIN_CONFUSION_KEY = 2  # a one-character key ("3") is found everywhere; it never marks a confusion


def normalize_key(text: str) -> str:
    """NFKC, without punctuation, symbols, spaces or control characters (case kept, for display)."""
    folded = unicodedata.normalize("NFKC", str(text or ""))
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] not in "PZSC")


def _folded(text: str) -> str:
    return normalize_key(text).casefold()


def clean_keys(keys, *sources: str) -> list[str]:
    """Normalised, de-duplicated keys; with `sources`, only keys found in one of them (no invented facts)."""
    if isinstance(keys, str):
        keys = [keys]
    if not isinstance(keys, (list, tuple)):
        return []
    folded_sources = [_folded(s) for s in sources if s]
    result: list[str] = []
    for key in keys:
        if not isinstance(key, (str, int, float)):
            continue
        key = normalize_key(str(key))
        if not key or key.casefold() in (k.casefold() for k in result):
            continue
        if folded_sources and not any(key.casefold() in s for s in folded_sources):
            continue
        result.append(key)
    return result


def key_hit(answer: str, keys: list[str]) -> float | None:
    """The share of `keys` the answer contains, or None when there are no keys."""
    if not keys:
        return None
    folded = _folded(answer)
    return sum(_folded(k) in folded for k in keys) / len(keys)


def confused_with(answer: str, own_keys: list[str], own_section: str, keys_by_section: dict[str, set[str]]) -> list[str]:
    """Other sections whose keys the answer contains while it misses one of its own keys."""
    if not own_keys or key_hit(answer, own_keys) == 1.0:
        return []
    folded = _folded(answer)
    own = {_folded(k) for k in own_keys} | {_folded(k) for k in keys_by_section.get(own_section, set())}
    sections = []
    for section, keys in keys_by_section.items():
        if section == own_section:
            continue
        foreign = [k for k in keys if len(_folded(k)) >= MIN_CONFUSION_KEY and _folded(k) not in own
                   and not any(_folded(k) in o or o in _folded(k) for o in own)]
        if any(_folded(k) in folded for k in foreign):
            sections.append(section)
    return sections
