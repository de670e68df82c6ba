"""The held-out split: keep some phrasings of each fact out of training, so evaluation measures
whether the model knows the fact, not whether it recites a string it saw."""

from __future__ import annotations

import random
from collections import defaultdict


def split_heldout(rows: list[dict], per_group: int = 1, min_group: int = 4, fallback_fraction: float = 0.05,
                  seed: int = 42) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows). In each group of at least `min_group` rows, `per_group` paraphrases
    (never the base question) are held out; rows without a group fall back to a random fraction."""
    rng = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    ungrouped: list[int] = []
    for index, row in enumerate(rows):
        (groups[str(row["group"])] if row.get("group") not in (None, "") else ungrouped).append(index)
    held: set[int] = set()
    for members in groups.values():
        if len(members) >= min_group and per_group > 0:
            candidates = [i for i in members if rows[i].get("kind") != "base"] or members
            held.update(rng.sample(candidates, min(per_group, len(candidates), len(members) - 1)))
    if ungrouped and fallback_fraction > 0:
        count = max(1, round(len(ungrouped) * fallback_fraction)) if len(ungrouped) >= 10 else 0
        held.update(rng.sample(ungrouped, count))
    train = [row for i, row in enumerate(rows) if i not in held]
    heldout = [row for i, row in enumerate(rows) if i in held]
    return train, heldout
