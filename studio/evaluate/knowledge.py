"""What the report says was learned: key-fact hits, confusions, the best column, per-section tallies.

Works on the report's rows (question, reference, columns -> answer and scores) plus each question's
`keys` and `section` when it has them (exam rows do; held-out phrasings and most imported files do not).
"""

from __future__ import annotations

from collections import defaultdict

from studio.evaluate.keys import clean_keys, confused_with, key_hit

NO_KEYS_NOTE = ("These questions carry no key facts (\"keys\"), so the report has no key-fact hit rate: "
                "character F1 and ROUGE-L only. Build an exam in the Dataset tab, or add a \"keys\" list "
                "(the short strings a right answer must contain) to each row of an imported file.")
PARTLY_KEYED_NOTE = "{missing} of {total} questions carry no key facts (\"keys\"); the key-fact rates count the others only."


def question_fields(item: dict) -> dict:
    """The fields of a question row the knowledge scoring needs."""
    return {"section": str(item.get("section") or ""), "keys": clean_keys(item.get("keys") or []),
            "kind": item.get("kind", "")}


def annotate(rows: list[dict]) -> dict:
    """Add key_hit / key_right / confused_with to every column entry and `best` to every row.

    Returns the knowledge part of the report: per-column summary additions, per-section tallies and a note.
    """
    keys_by_section: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        keys_by_section[row.get("section", "")].update(row.get("keys") or [])
    for row in rows:
        keys = row.get("keys") or []
        for entry in row["columns"].values():
            hit = key_hit(entry["answer"], keys)
            entry["key_hit"] = None if hit is None else round(hit, 4)
            entry["key_right"] = None if hit is None else hit == 1.0
            entry["confused_with"] = confused_with(entry["answer"], keys, row.get("section", ""), keys_by_section)
        row["best"] = best_column(row)
    keyed = [r for r in rows if r.get("keys")]
    note = ""
    if not keyed:
        note = NO_KEYS_NOTE
    elif len(keyed) < len(rows):
        note = PARTLY_KEYED_NOTE.format(missing=len(rows) - len(keyed), total=len(rows))
    return {"summary": column_summary(keyed), "sections": section_tally(keyed), "note": note,
            "keyed_questions": len(keyed)}


def _rank(entry: dict) -> tuple:
    judge = entry.get("judge_score")
    return (entry.get("key_hit") if entry.get("key_hit") is not None else -1,
            judge if judge is not None else -1, entry.get("char_f1", 0.0))


def best_column(row: dict) -> str:
    """The column with the most key facts, then the best judge score, then character F1; "tie" if all equal."""
    ranks = {column: _rank(entry) for column, entry in row["columns"].items()}
    if not ranks:
        return ""
    top = max(ranks.values())
    winners = [column for column, rank in ranks.items() if rank == top]
    return "tie" if len(winners) == len(ranks) and len(ranks) > 1 else " = ".join(winners)


def column_summary(keyed: list[dict]) -> dict:
    """Per column: mean key-fact hit rate, share of answers with every key, confused answers."""
    if not keyed:
        return {}
    result = {}
    for column in keyed[0]["columns"]:
        entries = [r["columns"][column] for r in keyed if column in r["columns"]]
        result[column] = {"key_hit": round(sum(e["key_hit"] for e in entries) / len(entries), 4),
                          "key_right": round(sum(bool(e["key_right"]) for e in entries) / len(entries), 4),
                          "confused": sum(bool(e["confused_with"]) for e in entries)}
    return result


def section_tally(keyed: list[dict]) -> list[dict]:
    """Per section: how many questions, and how many each column got right (every key present)."""
    tally: dict[str, dict] = {}
    for row in keyed:
        entry = tally.setdefault(row.get("section") or "?", {"section": row.get("section") or "?", "questions": 0})
        entry["questions"] += 1
        for column, answer in row["columns"].items():
            entry[column] = entry.get(column, 0) + int(bool(answer["key_right"]))
    return list(tally.values())
