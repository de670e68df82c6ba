"""Pull valid JSON out of a teacher's reply, whatever shape the reply came in.

Teachers wrap JSON in ```json fences, add prose around it, stop mid-array when they hit max_tokens,
or answer with the wrong keys. These functions extract every valid item and say, with a short reason
code, why nothing could be extracted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_DECODER = json.JSONDecoder()
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
QUESTION_KEYS = ("instruction", "question", "q", "问题")
ANSWER_KEYS = ("output", "answer", "a", "答案", "response")


@dataclass
class Parsed:
    """Items extracted from one reply, and a reason code when the reply was unusable or cut short."""

    items: list = field(default_factory=list)
    problem: str | None = None  # empty, no_json, wrong_schema, truncated

    @property
    def ok(self) -> bool:
        return bool(self.items)


def strip_fences(text: str) -> str:
    match = re.search(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", text, re.S)
    return match.group(1) if match else text


def json_values(text: str) -> list:
    """Every complete top-level JSON object or array in `text`, in order."""
    values, i = [], 0
    while i < len(text):
        start = min((p for p in (text.find("{", i), text.find("[", i)) if p != -1), default=-1)
        if start == -1:
            break
        try:
            value, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError:
            i = start + 1
            continue
        values.append(value)
        i = end
    return values


def _pair_from(obj) -> dict | None:
    if not isinstance(obj, dict):
        return None
    question = next((obj[k] for k in QUESTION_KEYS if isinstance(obj.get(k), str)), "")
    answer = next((obj[k] for k in ANSWER_KEYS if isinstance(obj.get(k), str)), "")
    question, answer = question.strip(), answer.strip()
    return {"instruction": question, "output": answer} if question and answer else None


def _pairs_in(value) -> list[dict]:
    pair = _pair_from(value)
    if pair:
        return [pair]
    if isinstance(value, list):
        return [p for item in value for p in _pairs_in(item)]
    if isinstance(value, dict):
        return [p for item in value.values() if isinstance(item, (list, dict)) for p in _pairs_in(item)]
    return []


def parse_pairs(text: str | None, finish_reason: str | None = None) -> Parsed:
    """(instruction, output) pairs from a reply; a truncated array yields its complete objects."""
    if not text or not text.strip():
        return Parsed(problem="empty")
    body = strip_fences(text)
    values = json_values(body)
    pairs = [p for value in values for p in _pairs_in(value)]
    if not pairs and "{" in body:  # truncated mid-array: take each complete inner object
        pairs = [p for value in _inner_objects(body) for p in _pairs_in(value)]
    return _parsed(pairs, values, finish_reason)


def _inner_objects(text: str) -> list:
    objects, i = [], 0
    while True:
        i = text.find("{", i + 1)
        if i == -1:
            return objects
        try:
            value, _ = _DECODER.raw_decode(text, i)
            objects.append(value)
        except json.JSONDecodeError:
            continue


def parse_strings(text: str | None, finish_reason: str | None = None, key: str = "paraphrases") -> Parsed:
    """A list of strings (e.g. paraphrases) from a reply; a truncated list yields its complete strings."""
    if not text or not text.strip():
        return Parsed(problem="empty")
    body = strip_fences(text)
    strings: list[str] = []
    values = json_values(body)
    for value in values:
        candidates = value.get(key) if isinstance(value, dict) else value
        if isinstance(candidates, dict):
            candidates = next((v for v in candidates.values() if isinstance(v, list)), None)
        if isinstance(candidates, list):
            strings += [s.strip() for s in candidates if isinstance(s, str) and s.strip()]
    if not strings and "[" in body:
        tail = body[body.find("[") + 1:]
        strings = [json.loads(f'"{m.group(1)}"').strip() for m in _STRING.finditer(tail)]
        strings = [s for s in strings if s and s != key]
    return _parsed(strings, values, finish_reason)


def _parsed(items: list, values: list, finish_reason: str | None) -> Parsed:
    """The extracted items, with why the reply was cut short or unusable."""
    problem = None
    if finish_reason == "length":
        problem = "truncated"
    elif not items:
        problem = "wrong_schema" if values else "no_json"
    return Parsed(_dedupe(items), problem)


def _dedupe(items: list) -> list:
    seen, out = set(), []
    for item in items:
        key = json.dumps(item, ensure_ascii=False, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def _variant_from(obj) -> dict | None:
    """A rephrasing: a bare string (question only) or an object with a question and maybe an answer."""
    if isinstance(obj, str):
        return {"instruction": obj.strip()} if obj.strip() else None
    if not isinstance(obj, dict):
        return None
    question = next((obj[k] for k in QUESTION_KEYS if isinstance(obj.get(k), str)), "").strip()
    answer = next((obj[k] for k in ANSWER_KEYS if isinstance(obj.get(k), str)), "").strip()
    if not question:
        return None
    return {"instruction": question, "output": answer} if answer else {"instruction": question}


def _variants_in(value, key: str) -> list[dict]:
    if isinstance(value, dict):
        found = _variant_from(value)
        if found:
            return [found]
        inner = value.get(key)
        if inner is None:
            inner = next((v for v in value.values() if isinstance(v, list)), None)
        return _variants_in(inner, key) if isinstance(inner, (list, dict)) else []
    if isinstance(value, list):
        return [v for item in value for v in ([_variant_from(item)] if not isinstance(item, list) else _variants_in(item, key)) if v]
    return []


def parse_variants(text: str | None, finish_reason: str | None = None, key: str = "variants") -> Parsed:
    """Rephrasings that may reword the answer too: `{"variants": [{"question", "answer"?} | "question"]}`.

    Fenced, prose-wrapped, wrong-key and truncated replies yield every complete item, as parse_pairs does.
    """
    if not text or not text.strip():
        return Parsed(problem="empty")
    body = strip_fences(text)
    values = json_values(body)
    items = [v for value in values for v in _variants_in(value, key)]
    if not items and "{" in body:  # truncated mid-array: each complete inner object
        items = [v for value in _inner_objects(body) for v in _variants_in(value, key)]
    if not items and "[" in body:  # truncated list of bare strings
        items = [{"instruction": s} for s in parse_strings(body, None, key).items if s != key]
    return _parsed(items, values, finish_reason)
