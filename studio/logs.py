"""Append-only JSONL logs (metrics, events, journals): read them back tolerantly, cut them back safely.

A process killed while appending leaves a torn last line. Readers skip it and say so; before a log is
appended to again (a resumed run, a build run again) the torn tail is cut off, so the next record
starts on a line of its own. Rewrites are atomic: a crash leaves the old log or the new one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable


# Characters Python's str.splitlines() (and JavaScript) end a line at, besides "\n" and "\r": written
# escaped, so a line of JSON stays one line for every reader. JSON allows them raw inside strings.
_LINE_BREAKS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085", "\x0b": "\\u000b",
                "\x0c": "\\u000c", "\x1c": "\\u001c", "\x1d": "\\u001d", "\x1e": "\\u001e"}
_LINE_BREAK = re.compile("[" + "".join(_LINE_BREAKS) + "]")


def json_line(record) -> str:
    """One JSONL line (with its "\n"): UTF-8 text as it is, every character that could end a line escaped."""
    return _LINE_BREAK.sub(lambda m: _LINE_BREAKS[m.group(0)], json.dumps(record, ensure_ascii=False)) + "\n"


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text: split at "\n" only ("\r\n" too), never at a line break inside a string."""
    return [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]


def read_jsonl_log(path: str | Path) -> tuple[list[dict], str]:
    """(records, note): every well-formed record, and a note naming lines that were skipped ('' if none)."""
    path = Path(path)
    if not path.is_file():
        return [], ""
    records, skipped = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped.append(number)
    if not skipped:
        return records, ""
    torn = skipped == [len(lines)] and not lines[-1].endswith("}")
    what = "its last line was cut short (the process was stopped while writing it)" if torn else \
        f"line(s) {', '.join(map(str, skipped[:5]))} are not valid JSON"
    return records, f"{path.name}: {what}; skipped {len(skipped)} line(s)."


def rewrite_jsonl_log(path: str | Path, keep: Callable[[dict], bool] = lambda record: True) -> tuple[int, str]:
    """Atomically rewrite a log with only the well-formed records `keep` accepts; (records dropped, note)."""
    from studio.data.records import write_text_atomic

    path = Path(path)
    if not path.is_file():
        return 0, ""
    records, note = read_jsonl_log(path)
    kept = [record for record in records if keep(record)]
    if len(kept) == len(records) and not note:
        return 0, ""
    write_text_atomic(path, "".join(json_line(record) for record in kept))
    return len(records) - len(kept), note


def cut_torn_tail(path: str | Path) -> str:
    """Drop a torn last line before appending again; returns a note when one was dropped."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return ""
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return ""
    return rewrite_jsonl_log(path)[1]
