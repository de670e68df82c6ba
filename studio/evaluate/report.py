"""The scored before/after report: every question through every column, scored against its reference.

Columns: the base model (adapter really off), the base model with retrieved sections of the source
document in its prompt, and the fine-tuned adapter. Metrics: character F1 and character ROUGE-L
(meaningful for Chinese), and an optional LLM judge. The report also scores a sample of the training
phrasings: when those score far above the held-out ones, the adapter may be reciting, not knowing.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.datasets import write_text_atomic
from studio.evaluate.judge import judge
from studio.evaluate.retrieval import SectionRetriever, retrieval_messages
from studio.evaluate.scoring import char_f1, rouge_l
from studio.jobs import Job
from studio.model.generation import GenerationSettings, build_messages
from studio.model.manager import Lease, reply_text, side_by_side

BASE, RETRIEVAL, TUNED = "base", "base + retrieval", "fine-tuned"
IMPROVEMENT_MARGIN = 0.02
RECITATION_GAP = 0.2


@dataclass
class ReportRequest:
    adapter: str
    questions: list[dict]
    system_prompt: str
    settings: GenerationSettings = field(default_factory=lambda: GenerationSettings.greedy(256))
    retriever: SectionRetriever | None = None
    retrieval_k: int = 2
    judge_teacher: object | None = None
    training_sample: list[dict] = field(default_factory=list)


def answers_for(lease: Lease, request: ReportRequest, question: str) -> dict[str, str]:
    """Every column's answer to one question (base and fine-tuned in one batched generation)."""
    loaded = lease.loaded
    messages = build_messages(request.system_prompt, [], question)
    base = tuned = ""
    for base, tuned in side_by_side(loaded, messages, request.adapter, request.settings, threading.Event()):
        pass
    answers = {BASE: base, TUNED: tuned}
    if request.retriever is not None:
        hits = request.retriever.search(question, request.retrieval_k)
        answers[RETRIEVAL] = reply_text(loaded, retrieval_messages(request.system_prompt, question, hits), request.settings)
    return answers


def score(answer: str, reference: str) -> dict:
    return {"char_f1": round(char_f1(answer, reference), 4), "rouge_l": round(rouge_l(answer, reference), 4)}


def run_report(job: Job, lease: Lease, request: ReportRequest) -> dict:
    rows = []
    total = len(request.questions) + len(request.training_sample)
    for index, item in enumerate(request.questions, 1):
        job.check_cancelled()
        question, reference = item["instruction"], item["output"]
        answers = answers_for(lease, request, question)
        row = {"question": question, "reference": reference, "columns": {}}
        for column, answer in answers.items():
            entry = {"answer": answer, **score(answer, reference)}
            if request.judge_teacher is not None:
                verdict = judge(request.judge_teacher, question, reference, answer)
                entry.update(judge_score=verdict.score, judge_reason=verdict.reason)
            row["columns"][column] = entry
        rows.append(row)
        job.emit("progress", f"{index}/{total} questions", done=index, total=total)
    recitation = _recitation(job, lease, request, rows, total)
    summary = summarize(rows)
    return {"adapter": request.adapter, "rows": rows, "summary": summary, "recitation": recitation,
            "warning": recitation.get("warning", "")}


def _recitation(job: Job, lease: Lease, request: ReportRequest, rows: list[dict], total: int) -> dict:
    """Training phrasings vs held-out ones, for the fine-tuned column only."""
    if not request.training_sample or not rows:
        return {}
    scores = []
    for index, item in enumerate(request.training_sample, len(request.questions) + 1):
        job.check_cancelled()
        messages = build_messages(request.system_prompt, [], item["instruction"])
        answer = reply_text(lease.loaded, messages, request.settings, adapter=request.adapter)
        scores.append(char_f1(answer, item["output"]))
        job.emit("progress", f"{index}/{total} questions (training phrasings)", done=index, total=total)
    train_f1 = sum(scores) / len(scores)
    heldout_f1 = sum(r["columns"][TUNED]["char_f1"] for r in rows) / len(rows)
    result = {"training_char_f1": round(train_f1, 4), "heldout_char_f1": round(heldout_f1, 4)}
    if train_f1 - heldout_f1 > RECITATION_GAP:
        result["warning"] = (f"Training phrasings score {train_f1:.2f} character F1 but held-out phrasings only "
                             f"{heldout_f1:.2f}: the adapter may be reciting the training questions rather than "
                             "knowing the facts. Add more varied phrasings or train fewer epochs.")
    return result


def summarize(rows: list[dict]) -> dict:
    columns = list(rows[0]["columns"]) if rows else []
    summary = {}
    for column in columns:
        entries = [r["columns"][column] for r in rows]
        item = {metric: round(sum(e[metric] for e in entries) / len(entries), 4) for metric in ("char_f1", "rouge_l")}
        judged = [e["judge_score"] for e in entries if e.get("judge_score") is not None]
        item["judge_mean"] = round(sum(judged) / len(judged), 3) if judged else None
        if column != BASE:
            deltas = [r["columns"][column]["char_f1"] - r["columns"][BASE]["char_f1"] for r in rows]
            item["improved"] = sum(d > IMPROVEMENT_MARGIN for d in deltas)
            item["worse"] = sum(d < -IMPROVEMENT_MARGIN for d in deltas)
        summary[column] = item
    return summary


def table_rows(report: dict) -> list[dict]:
    """One flat row per question and column (for the UI table and the CSV)."""
    flat = []
    for index, row in enumerate(report["rows"], 1):
        for column, entry in row["columns"].items():
            flat.append({"#": index, "question": row["question"], "reference": row["reference"], "column": column,
                         "answer": entry["answer"], "char_f1": entry["char_f1"], "rouge_l": entry["rouge_l"],
                         "judge": entry.get("judge_score"), "judge_reason": entry.get("judge_reason", "")})
    return flat


def write_report(report: dict, path: Path) -> Path:
    """JSON (the whole report) or CSV (one row per question and column), by the file's suffix."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        buffer = io.StringIO()
        flat = table_rows(report)
        writer = csv.DictWriter(buffer, fieldnames=list(flat[0]) if flat else ["question"])
        writer.writeheader()
        writer.writerows(flat)
        return write_text_atomic(path, buffer.getvalue())
    return write_text_atomic(path, json.dumps(report, ensure_ascii=False, indent=2))


def format_table(report: dict) -> str:
    """A plain-text summary for the CLI."""
    lines = [f"{'column':<18}{'char F1':>9}{'ROUGE-L':>9}{'judge':>7}{'better':>8}{'worse':>7}"]
    for column, item in report["summary"].items():
        judge_mean = "-" if item.get("judge_mean") is None else f"{item['judge_mean']:.2f}"
        lines.append(f"{column:<18}{item['char_f1']:>9.3f}{item['rouge_l']:>9.3f}{judge_mean:>7}"
                     f"{item.get('improved', '-'):>8}{item.get('worse', '-'):>7}")
    if report.get("warning"):
        lines.append("warning: " + report["warning"])
    return "\n".join(lines)
