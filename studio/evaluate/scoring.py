"""Answer-vs-reference metrics that mean something for Chinese: character F1 and character ROUGE-L."""

from __future__ import annotations

import unicodedata
from collections import Counter


def normalize(text: str) -> str:
    """NFKC, lower case, without punctuation, symbols or spaces: what is left are the content characters."""
    folded = unicodedata.normalize("NFKC", text or "").lower()
    return "".join(ch for ch in folded if unicodedata.category(ch)[0] not in "PZSC")


def char_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs(a: str, b: str) -> int:
    previous = [0] * (len(b) + 1)
    for ch in a:
        current = [0]
        for j, other in enumerate(b, 1):
            current.append(previous[j - 1] + 1 if ch == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str, limit: int = 1500) -> float:
    """ROUGE-L F1 on characters (both texts cut at `limit` characters)."""
    pred, ref = normalize(prediction)[:limit], normalize(reference)[:limit]
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)
