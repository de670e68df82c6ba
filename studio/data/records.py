"""The studio's one dataset format, and import from the other common ones.

A dataset is JSONL, one row per line: `{"instruction": ..., "output": ...}` as in the tutorial, with
optional extra fields (`group`, `kind`, `section`, `system`). Alpaca rows (`instruction`/`input`/
`output`) and chat rows (`messages`) are converted on import. Errors name the file and the line.
Every file is written atomically: a crash leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

from studio.data.documents import decode_document
from studio.errors import DataError
from studio.logs import json_line, jsonl_lines


def fsync_folder(folder: Path) -> None:
    """Flush every file under `folder` to disk (before the folder is renamed into place)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_jsonl_atomic(path: str | Path, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json_line(row) for row in rows))


def timestamp() -> str:
    return time.strftime("%Y%m%d_%H%M%S")


# a file or folder name's timestamp as `stamped` writes it: 20261207_154723, or 20261207_154723-2 for a second save
# in the same second
STAMP = r"\d{8}_\d{6}(?:-\d+)?"


def stamped(*templates: str | Path, make: bool = True) -> tuple[Path, ...]:
    """Paths named from `templates` with "{stamp}" replaced by timestamp(), or by timestamp()-2, -3, ...
    where a path of that stamp exists: two saves in one second never overwrite each other. With `make`,
    the files are made (empty, exclusively) so that a save running beside this one takes another stamp."""
    base = timestamp()
    for n in range(1, 1000):
        stamp = base if n == 1 else f"{base}-{n}"
        paths = tuple(Path(str(t).replace("{stamp}", stamp)) for t in templates)
        if not make:
            if not any(p.exists() for p in paths):
                return paths
            continue
        made = []
        try:
            for path in paths:
                open(path, "x").close()
                made.append(path)
            return paths
        except FileExistsError:
            for path in made:
                path.unlink(missing_ok=True)
    raise DataError(f"Could not find a free name for {Path(str(templates[0])).name} in {Path(str(templates[0])).parent}.")


def safe_name(name: str) -> str:
    cleaned = re.sub(r"[^\w\-]+", "_", name.strip(), flags=re.UNICODE).strip("_")
    return cleaned or "dataset"


def row_from_record(record, where: str) -> dict:
    """One row in the studio's format from any supported record shape."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        return _row_from_messages(record["messages"], where)
    instruction, output = record.get("instruction"), record.get("output")
    _check_text_field(record, "instruction", where, " (or \"messages\")")
    _check_text_field(record, "output", where)
    extra_input = record.get("input")
    if isinstance(extra_input, str) and extra_input.strip():
        instruction = f"{instruction.strip()}\n\n{extra_input.strip()}"
    row = {"instruction": instruction.strip(), "output": output.strip()}
    row.update({k: v for k, v in record.items() if k not in ("instruction", "output", "input")})
    for key in TEXT_EXTRAS:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise DataError(f"{where}: the field \"{key}\" has the wrong type: {type(row[key]).__name__} "
                            f"({json.dumps(row[key], ensure_ascii=False)[:40]}), it must be text. Put it in quotes.")
    return row


# Optional fields the studio reads as text (a row's own system prompt, its paraphrase group, ...).
TEXT_EXTRAS = ("system", "group", "kind", "section")


def _check_text_field(record: dict, key: str, where: str, alternative: str = "") -> None:
    """A missing, empty or non-text field is named with what it holds and how to fix it."""
    value = record.get(key)
    if key not in record or value is None:
        found = ", ".join(f'"{k}"' for k in list(record)[:6]) or "none"
        raise DataError(f"{where}: missing the field \"{key}\"{alternative} (fields found: {found}). "
                        f"Each row needs \"instruction\" and \"output\" as text.")
    if not isinstance(value, str):
        raise DataError(f"{where}: the field \"{key}\" has the wrong type: {type(value).__name__} "
                        f"({json.dumps(value, ensure_ascii=False)[:40]}), it must be text. Put it in quotes.")
    if not value.strip():
        raise DataError(f"{where}: the field \"{key}\" is empty. Fill it in or delete the row.")


def _row_from_messages(messages, where: str) -> dict:
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise DataError(f"{where}: \"messages\" must be a list of {{role, content}} objects.")
    turns = [(m.get("role"), _message_text(m.get("content"), where)) for m in messages]
    users = [text for role, text in turns if role == "user"]
    assistants = [text for role, text in turns if role == "assistant"]
    if not users or not assistants or not users[-1].strip() or not assistants[-1].strip():
        raise DataError(f"{where}: \"messages\" needs a user turn followed by an assistant turn.")
    row = {"instruction": users[-1].strip(), "output": assistants[-1].strip()}
    system = next((text for role, text in turns if role == "system"), None)
    if system:
        row["system"] = system
    return row


def _message_text(content, where: str) -> str:
    """A message's content: text, or OpenAI's list of parts whose text parts are joined; nothing else."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        kinds = sorted({str(p.get("type")) for p in content if p.get("type") != "text"})
        raise DataError(f"{where}: a message has parts that are not text ({', '.join(kinds)[:60]}); "
                        "only text can be trained on.")
    raise DataError(f"{where}: a message's \"content\" has the wrong type: {type(content).__name__} "
                    f"({json.dumps(content, ensure_ascii=False)[:40]}), it must be text.")


def read_dataset(path: str | Path) -> list[dict]:
    """Rows of a JSONL (or JSON array) dataset in any supported shape; DataError names file and line."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a dataset. Give the path of a .jsonl file.")
    if not path.is_file():
        raise DataError(f"Dataset not found: {path}")
    text = decode_document(path.read_bytes(), path.name)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno}).") from None
        return [row_from_record(r, f"{path.name}, item {i}") for i, r in enumerate(records, 1)]
    rows = []
    for number, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path.name}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}).") from None
        rows.append(row_from_record(record, f"{path.name}, line {number}"))
    if not rows:
        raise DataError(f"{path.name} has no rows.")
    return rows


def list_datasets(data_dir: Path) -> list[Path]:
    """Dataset files in `data_dir`, newest first."""
    files = [p for p in Path(data_dir).glob("*.jsonl") if p.is_file()]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def save_rows(rows: list[dict], name: str, data_dir: Path, tag: str = "edited", exam: Path | None = None) -> Path:
    """Validate `rows` and write them as a new dataset file `<name>_<tag>_<timestamp>.jsonl`.

    With `exam` (the exam of the dataset the rows were edited from) the file is `<name>_dataset_<timestamp>.jsonl`
    with a copy of the exam beside it as `<name>_exam_<timestamp>.jsonl`, so a run on the edited rows still has
    its exam kept out of training and offered for the report."""
    clean = []
    for number, row in enumerate(rows, 1):
        if not _cell_text(row.get("instruction")):
            continue  # a row whose instruction was cleared is a deleted row (the preview's hint says so)
        record = {k: v for k, v in row.items() if v is not None and v == v and v != ""}  # drop NaN and blanks
        clean.append(row_from_record(record, f"row {number}"))
    if not clean:
        raise DataError("There are no rows to save.")
    # the name without a timestamp or tag of its own (a preview's name is the file's stem: no 'x_edited_edited_...')
    name = re.sub(rf"(?:_(?:edited|dataset|base|imported))?(?:_{STAMP})?$", "", safe_name(name)) or "dataset"
    if exam is None:
        path, = stamped(Path(data_dir) / f"{name}_{tag}_{{stamp}}.jsonl")
        return _write_reserved(path, clean)
    exam_rows = read_dataset(exam)
    path, exam_copy = stamped(*(Path(data_dir) / f"{name}_{kind}_{{stamp}}.jsonl" for kind in ("dataset", "exam")))
    _write_reserved(exam_copy, exam_rows)
    return _write_reserved(path, clean)


def _cell_text(value) -> str:
    """A table cell as text: '' for an empty cell (None or a table's NaN), never "None" or "nan"."""
    return "" if value is None or value != value else str(value).strip()


def _write_reserved(path: Path, rows: list[dict]) -> Path:
    """Write rows over a file `stamped` made; a failed write leaves no empty file behind."""
    try:
        return write_jsonl_atomic(path, rows)
    except BaseException:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()
        raise


def import_dataset(source: str | Path, data_dir: Path) -> tuple[Path, list[dict]]:
    """Read a dataset in any supported shape and save it in the studio's format under `data_dir`."""
    source = Path(source)
    rows = read_dataset(source)
    return save_rows(rows, source.stem, data_dir, tag="imported"), rows
