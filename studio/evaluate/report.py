"""The scored before/after report: every question through every column, scored against its reference.

Columns: the base model (adapter really off), the base model with retrieved sections of the source
document in its prompt, the fine-tuned adapter, and the adapter with the same retrieved sections.
Metrics: character F1 and character ROUGE-L (meaningful for Chinese), the key-fact hit rate when the
questions carry `keys` (exam rows do), and an optional LLM judge. The report also scores samples of
the training phrasings, the held-out phrasings and the exam separately: training far above held-out
means the adapter recites strings; held-out far above the exam means it recites the trained answers
instead of knowing the facts.
"""

from __future__ import annotations

import csv
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.records import write_text_atomic
from studio.evaluate.judge import judge
from studio.evaluate.knowledge import annotate, question_fields
from studio.evaluate.retrieval import SectionRetriever, retrieval_messages
from studio.evaluate.scoring import char_f1, rouge_l
from studio.jobs import Job
from studio.model.generation import GenerationSettings, build_messages
from studio.model.manager import Lease, reply_text, side_by_side

BASE, RETRIEVAL, TUNED = "base", "base + retrieval", "fine-tuned"
TUNED_RETRIEVAL = "fine-tuned + retrieval"
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
    question_set: str = field(default="heldout", metadata={"help": "What `questions` are: exam, heldout or uploaded."})
    comparison_sets: dict = field(default_factory=dict, metadata={"help": "Other question sets (heldout, exam) scored for the recitation check, fine-tuned column only."})


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
        with_context = retrieval_messages(request.system_prompt, question, hits)
        answers[RETRIEVAL] = reply_text(loaded, with_context, request.settings)
        answers[TUNED_RETRIEVAL] = reply_text(loaded, with_context, request.settings, adapter=request.adapter)
    return answers


def score(answer: str, reference: str) -> dict:
    return {"char_f1": round(char_f1(answer, reference), 4), "rouge_l": round(rouge_l(answer, reference), 4)}


def run_report(job: Job, lease: Lease, request: ReportRequest) -> dict:
    rows = []
    total = len(request.questions) + len(request.training_sample) + sum(map(len, request.comparison_sets.values()))
    for index, item in enumerate(request.questions, 1):
        if job.cancelled:  # Stop report: what was answered is kept and saved, marked as stopped
            break
        question, reference = item["instruction"], item["output"]
        answers = answers_for(lease, request, question)
        row = {"question": question, "reference": reference, **question_fields(item), "columns": {}}
        for column, answer in answers.items():
            entry = {"answer": answer, **score(answer, reference)}
            if request.judge_teacher is not None:
                verdict = judge(request.judge_teacher, question, reference, answer)
                entry.update(judge_score=verdict.score, judge_reason=verdict.reason)
            row["columns"][column] = entry
        rows.append(row)
        job.log(_scored_line(index, len(request.questions), row["columns"], question))
        # the message counts the questions asked; the bar (done/total) the recitation check's answers too
        job.emit("progress", f"{index}/{len(request.questions)} questions", done=index, total=total)
    if not rows:
        job.check_cancelled()  # stopped before any answer: nothing to save
    recitation = _recitation(job, lease, request, rows, total)
    knowledge = annotate(rows)
    summary = summarize(rows)
    for column, extra in knowledge["summary"].items():
        summary[column].update(extra)
    stopped = {"stopped_after": len(rows)} if len(rows) < len(request.questions) else {}
    return {"adapter": request.adapter, "question_set": request.question_set, "rows": rows, "summary": summary,
            "sections": knowledge["sections"], "keys_note": knowledge["note"], "recitation": recitation,
            "warning": recitation.get("warning", ""), "warnings": recitation.get("warnings", []),
            "questions_total": len(request.questions), **stopped}


def _scored_line(index: int, total: int, columns: dict, question: str) -> str:
    """The log's line for one scored question: the fine-tuned and base columns' character F1, the question."""
    short = " ".join(question.split())
    short = short if len(short) <= 60 else short[:59] + "…"
    return (f"Question {index}/{total}: fine-tuned character F1 {columns[TUNED]['char_f1']:.2f}, "
            f"base {columns[BASE]['char_f1']:.2f} · {short}")


def _recitation(job: Job, lease: Lease, request: ReportRequest, rows: list[dict], total: int) -> dict:
    """Training, held-out and exam phrasings scored apart, for the fine-tuned column only."""
    if not request.training_sample or not rows or job.cancelled:
        return {}
    done = len(request.questions)
    means = {}
    for name, items in {"training": request.training_sample, **request.comparison_sets}.items():
        scores = []
        for checked, item in enumerate(items, 1):
            if job.cancelled:  # stopped: the questions' scores are kept, the check is left out
                return {}
            messages = build_messages(request.system_prompt, [], item["instruction"])
            answer = reply_text(lease.loaded, messages, request.settings, adapter=request.adapter)
            scores.append(char_f1(answer, item["output"]))
            done += 1
            job.emit("progress", f"recitation check: {checked}/{len(items)} {name} phrasings", done=done, total=total)
        if scores:
            means[name] = sum(scores) / len(scores)
            job.log(f"Recitation check, {name} phrasings: fine-tuned character F1 {means[name]:.2f} "
                    f"over {len(scores)}")
    means[request.question_set] = sum(r["columns"][TUNED]["char_f1"] for r in rows) / len(rows)
    result = {f"{name}_char_f1": round(value, 4) for name, value in means.items()}
    warnings = recitation_warnings(means)
    if warnings:
        result["warning"], result["warnings"] = " ".join(warnings), warnings
    return result


def recitation_warnings(means: dict[str, float]) -> list[str]:
    """Why the adapter looks like it recites, from the fine-tuned column's mean character F1 per question set."""
    warnings = []
    train, heldout, exam = means.get("training"), means.get("heldout"), means.get("exam")
    if train is not None and heldout is not None and train - heldout > RECITATION_GAP:
        warnings.append(f"Training phrasings score {train:.2f} character F1 but held-out phrasings only "
                        f"{heldout:.2f}: the adapter may be reciting the training questions rather than "
                        "knowing the facts. Add more varied phrasings or train fewer epochs.")
    seen = heldout if heldout is not None else train
    if seen is not None and exam is not None and seen - exam > RECITATION_GAP:
        which = "Held-out" if heldout is not None else "Training"
        warnings.append(f"{which} phrasings score {seen:.2f} character F1 but the exam (questions never trained on) "
                        f"only {exam:.2f}: the adapter may be reciting the trained answers rather than knowing the "
                        "facts. Check the key-fact hit rate; try fact-level data, the document's sections as "
                        "training rows, or the fine-tuned + retrieval column.")
    return warnings


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
                         "judge": entry.get("judge_score"), "judge_reason": entry.get("judge_reason", ""),
                         **knowledge_cells(row, entry)})
    return flat


def knowledge_cells(row: dict, entry: dict) -> dict:
    """The key-fact columns of one flat row (blank when the question has no keys)."""
    return {"section": row.get("section", ""), "key_hit": entry.get("key_hit"),
            "confused_with": "; ".join(entry.get("confused_with") or []), "best": row.get("best", "")}


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
    lines += knowledge_lines(report)
    if report.get("warning"):
        lines.append("warning: " + report["warning"])
    return "\n".join(lines)


def knowledge_lines(report: dict) -> list[str]:
    """Key facts per column and per section, or the note that says why there are none."""
    if report.get("keys_note") and not report.get("sections"):
        return ["note: " + report["keys_note"]]
    lines = [f"{'column':<24}{'key hit':>9}{'all keys':>10}{'confused':>10}"]
    for column, item in report["summary"].items():
        if item.get("key_hit") is not None:
            lines.append(f"{column:<24}{item['key_hit']:>9.3f}{item['key_right']:>10.3f}{item['confused']:>10}")
    columns = list(report["summary"])
    lines.append("exam questions right per section (every key present): " + " / ".join(columns))
    for entry in report.get("sections", []):
        counts = " / ".join(str(entry.get(c, 0)) for c in columns)
        lines.append(f"  {entry['section'][:40]}: {counts} of {entry['questions']}")
    if report.get("keys_note"):
        lines.append("note: " + report["keys_note"])
    return lines
