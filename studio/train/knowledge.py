"""What a run needs to be judged on knowledge: its exam kept out of training, its document rows.

Before a run starts, `prepare_request` refuses a dataset that is an exam, finds the exam built with the
dataset (`<name>_exam_<timestamp>.jsonl` beside `<name>_dataset_<timestamp>.jsonl`) unless one was
given, and checks the document for document rows. While the rows are prepared, exam rows (and any row
asking an exam question) are dropped, and the document's sections are added to the training rows.
studio.json then records the exam and the document with their sha256, and the run folder keeps a copy
of the exam (`exam.jsonl`) for the Compare tab and the report.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from studio.data.records import read_dataset
from studio.data.documents import read_document
from studio.data.exam import exam_beside, without_exam_rows
from studio.data.normalize import dedup_key
from studio.errors import DataError
from studio.train.document_rows import document_rows

EXAM_FILE = "exam.jsonl"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prepare_request(request) -> None:
    """Refuse an exam given as the dataset; resolve the exam file; check the document. Changes `request`."""
    if request.resume:
        return
    without_exam_rows(read_dataset(request.dataset), Path(request.dataset).name)  # raises for an exam file
    if request.exam is None:
        request.exam = exam_beside(request.dataset)
    elif not Path(request.exam).is_file():
        raise DataError(f"Exam file not found: {request.exam}")
    if request.exam is not None:
        request.exam = Path(request.exam)
        if Path(request.exam).resolve() == Path(request.dataset).resolve():
            raise DataError(f"{Path(request.exam).name} cannot be both the dataset and the exam.")
        read_dataset(request.exam)  # a damaged exam is refused now, naming the file and line
    if request.document is not None:
        request.document = Path(request.document)
        read_document(request.document)


def training_rows(request, rows: list[dict], log) -> list[dict]:
    """The dataset's rows minus exam rows and minus rows that ask an exam question."""
    rows, dropped = without_exam_rows(rows, Path(request.dataset).name)
    if dropped:
        log(f"{dropped} exam rows were dropped from the training data: the exam is never trained on.")
    if request.exam is not None and Path(request.exam).is_file():
        asked = {dedup_key(row["instruction"]) for row in read_dataset(request.exam)}
        kept = [row for row in rows if dedup_key(row["instruction"]) not in asked]
        if len(kept) < len(rows):
            log(f"{len(rows) - len(kept)} training rows ask an exam question and were dropped.")
        rows = kept
    return rows


def with_document_rows(request, train_rows: list[dict], log) -> list[dict]:
    """The training rows plus one row per section of `request.document` (when asked)."""
    if request.document is None:
        return train_rows
    extra = document_rows(request.document)
    log(f"{len(extra)} document rows added from {Path(request.document).name} (one per section), "
        f"mixed with {len(train_rows)} question/answer rows.")
    return train_rows + extra


def knowledge_metadata(request, run_dir: Path, source: str | None) -> dict:
    """studio.json fields: the exam (copied into the run folder) and the document, each with its sha256."""
    meta: dict = {"exam": None, "exam_sha256": None, "exam_file": None, "exam_questions": 0,
                  "document": None, "document_sha256": None, "document_rows": 0}
    if request.exam is not None and Path(request.exam).is_file():
        copy = Path(run_dir) / EXAM_FILE
        if Path(request.exam).resolve() != copy.resolve():
            shutil.copyfile(request.exam, copy)
        meta.update(exam=str(request.exam), exam_sha256=_sha256(request.exam), exam_file=EXAM_FILE,
                    exam_questions=len(read_dataset(copy)))
    if request.document is not None:
        meta.update(document=str(request.document), document_sha256=_sha256(request.document),
                    document_rows=len(document_rows(request.document)))
        if not source:
            meta["source_document"] = str(Path(request.document).resolve())
    return meta
