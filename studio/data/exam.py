"""The exam: questions about the document that no training row asks, kept apart from training.

The builder asks the teacher, per section, for short questions about one fact each that are not
rephrasings of that section's training questions (it sees them), each with a short reference answer
and its key facts (`keys`: short strings quoted from the section that a right answer must contain).
Questions that repeat or nearly repeat a training phrasing are dropped, and so are keys the section
does not contain. The exam is written to `<name>_exam_<timestamp>.jsonl`, beside the dataset of the
same build, as rows `{"instruction", "output", "keys", "section", "kind": "exam"}`.

Training never sees it: a dataset file made only of exam rows is refused, exam rows inside a dataset
are dropped (and counted), and the run records the exam's sha256 beside the dataset's.
"""

from __future__ import annotations

import re
from pathlib import Path

from studio.data.normalize import dedup_key, normalize_question
from studio.data.parsing import ANSWER_KEYS, QUESTION_KEYS, Parsed, _inner_objects, _parsed, json_values, strip_fences
from studio.data.records import STAMP
from studio.errors import DataError
from studio.evaluate.keys import clean_keys
from studio.evaluate.scoring import char_f1

EXAM_KIND = "exam"
KEY_FIELDS = ("keys", "key_facts", "keywords", "关键词", "要点")
NEAR_DUPLICATE_F1 = 0.85  # an exam question this close (character F1) to a training phrasing is a rephrasing

EXAM_PROMPT = {
    "zh": ("你是“{title}”的出题人。根据给定原文片段出 {n} 道考题，检验读者是否真正掌握了片段中的事实。严格输出JSON："
           '{"exam":[{"question":"简短问题","answer":"简短参考答案","keys":["正确答案必须包含的关键词"]}]}。'
           "要求：1. 每题只考一个事实，问题简短；"
           "2. 不要改写“已有问题”：考它们没有问到的事实，或换一个角度问（例如反过来问、问条件或数字）；"
           "3. answer 仅依据原文，一两句话；"
           "4. keys 是1到3个从原文中原样摘出的短词（名称、数字、地点），正确答案必须包含它们；"
           "5. 禁止任何额外说明或代码块。"),
    "en": ("You write an exam about \"{title}\". From the given excerpt write {n} questions that test whether a reader "
           'really knows its facts. Output strictly JSON: {"exam":[{"question":"a short question","answer":'
           '"a short reference answer","keys":["a string a right answer must contain"]}]}. Rules: 1. one fact per '
           "question, short questions; 2. do not rephrase the existing questions: ask about facts they do not ask, or "
           "from another angle (reversed, a condition, a number); 3. answer only from the excerpt, in one or two "
           "sentences; 4. keys are 1 to 3 short strings quoted exactly from the excerpt (names, numbers, places) "
           "that a right answer must contain; 5. no extra text, no code fences."),
}
EXAM_USER = {
    "zh": "原文片段：\n{section}\n\n已有问题（不要改写它们）：\n{questions}",
    "en": "Excerpt:\n{section}\n\nExisting questions (do not rephrase them):\n{questions}",
}


def exam_messages(title: str, section_text: str, n: int, training_questions: list[str], language: str) -> list[dict]:
    system = EXAM_PROMPT[language].replace("{title}", title).replace("{n}", str(n))
    listed = "\n".join(f"- {q}" for q in training_questions) or "-"
    user = EXAM_USER[language].format(section=section_text, questions=listed)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _exam_item(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    question = next((obj[k] for k in QUESTION_KEYS if isinstance(obj.get(k), str)), "").strip()
    answer = next((obj[k] for k in ANSWER_KEYS if isinstance(obj.get(k), str)), "").strip()
    keys = next((obj[k] for k in KEY_FIELDS if k in obj), [])
    if not question or not answer:
        return None
    keys = [str(k) for k in keys] if isinstance(keys, list) else [str(keys)]
    return {"instruction": question, "output": answer, "keys": keys}


def _items_in(value) -> list[dict]:
    item = _exam_item(value)
    if item:
        return [item]
    if isinstance(value, list):
        return [i for v in value for i in _items_in(v)]
    if isinstance(value, dict):
        return [i for v in value.values() if isinstance(v, (list, dict)) for i in _items_in(v)]
    return []


def parse_exam(text: str | None, finish_reason: str | None = None) -> Parsed:
    """Exam items `{"instruction", "output", "keys"}` from a reply, as robust as parse_pairs."""
    if not text or not text.strip():
        return Parsed(problem="empty")
    body = strip_fences(text)
    values = json_values(body)
    items = [i for value in values for i in _items_in(value)]
    if not items and "{" in body:
        items = [i for value in _inner_objects(body) for i in _items_in(value)]
    return _parsed(items, values, finish_reason)


def exam_rows(items: list[dict], section_heading: str, section_text: str, training_questions: list[str],
              source: str = "") -> tuple[list[dict], dict]:
    """Exam rows for one section, and how many items were dropped and why."""
    dropped = {"rephrasing": 0, "no_keys": 0}
    seen = {dedup_key(q) for q in training_questions}
    rows = []
    for item in items:
        question = normalize_question(item["instruction"])
        if not question:
            continue
        if dedup_key(question) in seen or any(char_f1(question, q) >= NEAR_DUPLICATE_F1 for q in training_questions):
            dropped["rephrasing"] += 1
            continue
        keys = clean_keys(item.get("keys") or [], section_text, item["output"])
        if not keys:
            dropped["no_keys"] += 1
            continue
        seen.add(dedup_key(question))
        row = {"instruction": question, "output": item["output"], "keys": keys, "section": section_heading,
               "kind": EXAM_KIND}
        if source:
            row["source"] = source
        rows.append(row)
    return rows, dropped


def is_exam_row(row: dict) -> bool:
    return row.get("kind") == EXAM_KIND


def without_exam_rows(rows: list[dict], where: str) -> tuple[list[dict], int]:
    """(rows that may be trained on, how many exam rows were dropped); a file of only exam rows is refused."""
    kept = [row for row in rows if not is_exam_row(row)]
    if rows and not kept:
        raise DataError(f"{where} is an exam (every row has kind \"exam\"): it is never trained on. "
                        "Pick the dataset built with it; the exam is found next to it and kept for the report.")
    return kept, len(rows) - len(kept)


_STAMPED = re.compile(rf"^(?P<name>.+)_(?:dataset|base)_(?P<stamp>{STAMP})$")


def is_exam_file(name: str) -> bool:
    """Whether a file's name is an exam's as a build writes it (`<name>_exam_<timestamp>.jsonl`): never a
    training dataset, so the Train tab does not offer it."""
    return bool(re.search(rf"_exam_{STAMP}\.jsonl$", str(name)))


def exam_beside(dataset: str | Path) -> Path | None:
    """The exam written by the same build as `dataset` (`<name>_exam_<same timestamp>.jsonl`), if any."""
    dataset = Path(dataset)
    match = _STAMPED.match(dataset.stem)
    if not match:
        return None
    candidate = dataset.with_name(f"{match['name']}_exam_{match['stamp']}.jsonl")
    return candidate if candidate.is_file() else None


def read_exam(path: str | Path) -> list[dict]:
    """An exam's rows; any rows file works (keys optional), errors name the file and line."""
    from studio.data.records import read_dataset

    return read_dataset(path)
