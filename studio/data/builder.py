"""Build an instruction dataset from a document through a teacher LLM: the tutorial's section 3.2.

Stage 1 asks the teacher for (instruction, output) pairs from each section; stage 2 asks it to
rephrase each question many times (style `facts`, the default: several short one-fact pairs per
section, and rephrasings that reword some answers too; style `tutorial`: one long answer per question,
as the tutorial). With `exam` > 0 a third call per section writes an exam the dataset never contains
(see studio.data.exam). Calls run concurrently and stage-2 calls start as soon as their
base pair arrives. Every successful call is appended to a journal keyed by everything that shaped
it, so running the same build again (after a crash or a Cancel) calls the teacher only for what is
missing or failed. Outputs are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

from studio.data.records import safe_name, stamped, write_jsonl_atomic, write_text_atomic
from studio.logs import json_line, jsonl_lines
from studio.secrets import redact
from studio.data import exam as exam_module
from studio.data import styles
from studio.data.documents import Section, SplitSettings, document_title, split_sections
from studio.data.normalize import dedup_key, normalize_question
from studio.data.parsing import Parsed, parse_pairs, parse_strings, parse_variants
from studio.data.teacher import FATAL_REASONS, RetryPolicy, Teacher, TeacherCallError, call_with_retries
from studio.errors import DataError
from studio.jobs import Job
from studio.logs import cut_torn_tail

DEFAULT_PAIR_PROMPT = (
    "你是“{title}”相关资料的资深整理者。"
    "将给定原文片段转写为 {n} 条训练样本，严格输出JSON："
    '{"pairs":[{"instruction":"用户问题","output":"权威完整答案"}]}。'
    "要求："
    "1. instruction 是自然语言问题，每条问不同的事实；"
    "2. output 仅依据原文，不要臆测；"
    "3. 禁止任何额外说明或代码块。"
)
DEFAULT_PARAPHRASE_PROMPT = (
    '严格输出 JSON 对象：{"paraphrases": ["..."]}；'
    "禁止任何额外文本/代码块/前后缀。"
    "每项必须是可直接回答的等价问法：与原问题意思相同、答案相同，不引入原问题没有的信息，措辞和句式尽量多样。"
)


@dataclass
class BuildSettings:
    """Everything that shapes a build (the teacher's location and key excepted)."""

    per_section: str = field(default="auto", metadata={"help": "Questions per section: a number, or 'auto' (about one per chars_per_question, at least 1)."})
    chars_per_question: int = field(default=600, metadata={"help": "For 'auto': one question per this many characters."})
    max_per_section: int = field(default=8, metadata={"help": "Upper bound for 'auto'."})
    variants: int = field(default=14, metadata={"help": "Rephrasings asked for each base question (stage 2); 0 skips it."})
    concurrency: int = field(default=8, metadata={"help": "Teacher calls in flight at once."})
    temperature: float = field(default=0.2, metadata={"help": "Stage-1 temperature (the tutorial's 0.2)."})
    max_tokens: int = field(default=600, metadata={"help": "Stage-1 max_tokens per question asked (the tutorial's 600)."})
    paraphrase_temperature: float = field(default=0.8, metadata={"help": "Stage-2 temperature: higher gives more varied phrasings."})
    paraphrase_max_tokens: int = field(default=1200, metadata={"help": "Stage-2 max_tokens."})
    system_prompt: str = field(default=DEFAULT_PAIR_PROMPT, metadata={"help": "Stage-1 system prompt; {title} and {n} are filled in."})
    paraphrase_prompt: str = field(default=DEFAULT_PARAPHRASE_PROMPT, metadata={"help": "Stage-2 system prompt."})
    json_mode: bool = field(default=True, metadata={"help": "Ask for response_format json_object."})
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    split: SplitSettings = field(default_factory=SplitSettings)
    style: str = field(default=styles.DEFAULT_STYLE, metadata={"help": "facts: several short one-fact pairs per section, answers reworded in some variants; tutorial: one long answer per question. With facts and the prompts left as they are, the facts prompts (Chinese or English, by the document's language) are used."})
    exam: int = field(default=0, metadata={"help": "Exam questions per section, never trained on (0 = no exam)."})

    def pairs_for(self, section: Section) -> int:
        """Stage-1 pairs for a section: facts style asks for about one per 150 characters unless a number is set."""
        if self.style == "facts" and str(self.per_section).strip().lower() in ("", "auto"):
            return styles.facts_per_section(section.chars)
        return self.questions_for(section)

    def questions_for(self, section: Section) -> int:
        text = str(self.per_section).strip().lower()
        if text in ("", "auto"):
            return max(1, min(self.max_per_section, round(section.chars / max(1, self.chars_per_question))))
        try:
            count = int(text)
        except ValueError:
            raise DataError(f"Questions per section must be a number or 'auto', not {self.per_section!r}.") from None
        if count < 1:
            raise DataError("Questions per section must be at least 1.")
        return count


@dataclass
class BuildResult:
    """Where a build wrote its files and what happened, for the summary and the CLI."""

    sections: int = 0
    base_pairs: int = 0
    rows: int = 0
    calls: int = 0
    cached_calls: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: dict = field(default_factory=dict)
    exam_questions: int = 0
    exam_path: str = ""
    exam_dropped: dict = field(default_factory=dict)
    truncated_but_used: int = 0
    base_path: str = ""
    dataset_path: str = ""
    build_dir: str = ""
    cancelled: bool = False

    def summary(self) -> str:
        failures = ", ".join(f"{reason}: {count}" for reason, count in sorted(self.failures.items())) or "none"
        return (f"{self.sections} sections -> {self.base_pairs} base pairs -> {self.rows} rows written. "
                f"Teacher calls: {self.calls} made, {self.cached_calls} reused from the journal, {self.retries} retries. "
                f"Failed calls by reason: {failures}. Tokens: {self.prompt_tokens} prompt + {self.completion_tokens} completion."
                + (f" Exam: {self.exam_questions} questions, never trained on." if self.exam_path else "")
                + (" Cancelled: partial result." if self.cancelled else ""))


def settings_problems(settings: BuildSettings) -> list[str]:
    """What is wrong with a build's numbers, each with the option that sets it (CLI flag / tab field)."""
    problems = []
    checks = (
        (settings.retry.max_attempts >= 1, f"Attempts per teacher call must be at least 1, not {settings.retry.max_attempts} (--attempts, 'Attempts')."),
        (settings.retry.max_attempts <= 20, f"Attempts per teacher call must be at most 20, not {settings.retry.max_attempts} (--attempts)."),
        (0 <= settings.variants <= 100, f"Rephrasings per question must be between 0 and 100, not {settings.variants} (--variants)."),
        (settings.concurrency >= 1, f"Teacher calls in flight must be at least 1, not {settings.concurrency} (--concurrency)."),
        (settings.split.min_chars >= 0, f"The shortest section kept cannot be negative ({settings.split.min_chars}, --min-chars)."),
        (settings.split.max_chars >= 200, f"The longest section must be at least 200 characters, not {settings.split.max_chars}."),
        (settings.max_tokens >= 1 and settings.paraphrase_max_tokens >= 1, "Max tokens per reply must be at least 1."),
        (0 <= settings.temperature <= 2, f"Temperature must be between 0 and 2, not {settings.temperature}."),
    )
    problems += [message for ok, message in checks if not ok]
    try:
        settings.questions_for(Section(0, "", "x"))
    except DataError as exc:
        problems.append(f"{exc} (--per-section)")
    return problems


def validate_settings(settings: BuildSettings) -> None:
    problems = settings_problems(settings)
    if problems:
        raise DataError(" ".join(problems))


@dataclass
class BuildCost:
    """What a build will ask of the teacher, known before the first call."""

    sections: int
    pair_calls: int
    paraphrase_calls: int
    chars_sent: int
    warnings: list[str] = field(default_factory=list)
    exam_calls: int = 0

    @property
    def calls(self) -> int:
        return self.pair_calls + self.paraphrase_calls + self.exam_calls

    def describe(self) -> str:
        exam = f", {self.exam_calls} for the exam" if self.exam_calls else ""
        text = (f"Cost before retries: {self.sections} sections -> {self.calls} teacher calls "
                f"({self.pair_calls} for questions, {self.paraphrase_calls} for rephrasings{exam}), "
                f"about {self.chars_sent:,} characters sent.")
        return " ".join([text, *self.warnings])


LONG_PARAGRAPH_SECTIONS = 20  # a paragraph that alone becomes more sections than this gets a warning


def estimate_cost(document: str, settings: BuildSettings) -> BuildCost:
    """Sections, teacher calls and characters a build of `document` with `settings` would send.

    Calls already in a journal are not subtracted: this is the cost of a fresh build."""
    from studio.data.documents import _paragraphs

    sections = split_sections(document, settings.split)
    questions = [settings.pairs_for(section) for section in sections]
    pair_chars = sum(len(settings.system_prompt) + 40 + section.chars for section in sections)
    paraphrase_calls = sum(questions) if settings.variants > 0 else 0
    per_paraphrase = len(settings.paraphrase_prompt) + 60 + min(400, settings.max_tokens)
    warnings = []
    for paragraph in _paragraphs(document):
        parts = len(paragraph) // max(1, settings.split.max_chars)
        if parts > LONG_PARAGRAPH_SECTIONS:
            warnings.append(f"Warning: one paragraph ({paragraph[:30]!r}...) is {len(paragraph):,} characters long "
                            f"and alone becomes about {parts} sections; check that the document is the one you meant.")
    exam_calls = len(sections) if settings.exam > 0 else 0
    chars = pair_chars * (2 if exam_calls else 1) + paraphrase_calls * per_paraphrase
    return BuildCost(len(sections), len(sections), paraphrase_calls, chars, warnings[:3], exam_calls)


def check_cost(cost: BuildCost, max_calls: int | None) -> None:
    """Refuse a build that would make more teacher calls than `max_calls` (None or 0 = no limit)."""
    if max_calls and cost.calls > max_calls:
        raise DataError(f"This build would make {cost.calls} teacher calls, more than the limit of {max_calls} "
                        f"(--max-calls). {cost.describe()} Raise --max-calls, lower --per-section or --variants, "
                        "or give a shorter document.")


class CallJournal:
    """Append-only record of successful teacher calls, keyed by everything that shaped them."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "journal.jsonl"
        self.failures_path = folder / "failures.jsonl"
        self._lock = threading.Lock()
        self._done: dict[str, list] = {}
        # a line torn by a crash is cut off, so the next record starts on its own line
        self.notes = [note for note in (cut_torn_tail(self.path), cut_torn_tail(self.failures_path)) if note]
        if self.path.exists():
            for line in jsonl_lines(self.path.read_text(encoding="utf-8")):
                try:
                    record = json.loads(line)
                    self._done[record["key"]] = record["items"]
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by a crash: that call is simply made again

    def get(self, key: str) -> list | None:
        return self._done.get(key)

    def record(self, key: str, stage: str, items: list, usage: dict) -> None:
        self._append(self.path, {"key": key, "stage": stage, "items": items, "usage": usage})
        with self._lock:
            self._done[key] = items

    def record_failure(self, stage: str, subject: str, reason: str, message: str) -> None:
        self._append(self.failures_path, {"stage": stage, "subject": subject, "reason": reason, "message": message})

    def _append(self, path: Path, record: dict) -> None:
        with self._lock, open(path, "a", encoding="utf-8") as handle:
            handle.write(json_line(record))
            handle.flush()


def call_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def build_folder(builds_dir: Path, name: str, document: str) -> Path:
    digest = hashlib.sha256(document.encode("utf-8")).hexdigest()[:10]
    return builds_dir / f"{safe_name(name)}-{digest}"


class DatasetBuild:
    """One run of the two-stage pipeline; `run(job)` is the job's target."""

    def __init__(self, document: str, name: str, teacher: Teacher, teacher_id: str, settings: BuildSettings,
                 data_dir: Path, builds_dir: Path, source: str = ""):
        self.document, self.name, self.teacher, self.settings = document, safe_name(name), teacher, settings
        self.teacher_id = teacher_id  # model id + base URL: part of every cache key, never the API key
        self.source = source  # the document's path, kept on every row so evaluation can retrieve from it
        self.data_dir = Path(data_dir)
        self.folder = build_folder(Path(builds_dir), name, document)
        self.title = document_title(document, name)
        self.sections = split_sections(document, settings.split)
        self.language = styles.document_language(document)
        styles.check_style(settings.style)
        self._exam_items: dict[int, list[dict]] = {}
        if not self.sections:
            where = Path(source).name if source else name  # the document's file, not the dataset's name
            raise DataError(f"No section of at least {settings.split.min_chars} characters was found in {where}. "
                            "Lower the minimum length or check the headings.")
        self.journal = CallJournal(self.folder)
        self.result = BuildResult(sections=len(self.sections), build_dir=str(self.folder))
        self._lock = threading.Lock()
        self._failures: Counter = Counter()
        self._first_failure = ""
        self._pairs: dict[int, list[dict]] = {}
        self._paraphrases: dict[str, list[str]] = {}
        self._done = self._total = self._not_made = 0
        self._fatal: TeacherCallError | None = None  # a failure no retry can fix (e.g. a web page as the base URL)

    # ----- prompts and keys ------------------------------------------------------------------
    @property
    def _facts(self) -> bool:
        return self.settings.style == "facts"

    def _stage1_prompt(self) -> str:
        if self._facts and self.settings.system_prompt == DEFAULT_PAIR_PROMPT:
            return styles.FACTS_PAIR_PROMPT[self.language]
        return self.settings.system_prompt

    def _variant_messages(self, pair: dict) -> list[dict]:
        prompt = self.settings.paraphrase_prompt
        system = styles.FACTS_VARIANT_PROMPT[self.language] if prompt == DEFAULT_PARAPHRASE_PROMPT else prompt
        user = styles.FACTS_VARIANT_USER[self.language].format(question=pair["instruction"], answer=pair["output"],
                                                               n=self.settings.variants)
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _pair_messages(self, section: Section, n: int) -> list[dict]:
        system = self._stage1_prompt().replace("{title}", self.title).replace("{n}", str(n))
        return [{"role": "system", "content": system}, {"role": "user", "content": section.text}]

    def _paraphrase_messages(self, pair: dict) -> list[dict]:
        if self._facts:
            return self._variant_messages(pair)
        user = f"原问题：{pair['instruction']}\n参考答案：{pair['output']}\n请给出 {self.settings.variants} 种不同的问法。"
        return [{"role": "system", "content": self.settings.paraphrase_prompt}, {"role": "user", "content": user}]

    def _key(self, stage: str, messages: list[dict], temperature: float, max_tokens: int) -> str:
        stage = stage if self.settings.style == "tutorial" else f"{self.settings.style}:{stage}"  # resumes never mix styles
        return call_key(stage, messages, self.teacher_id, temperature, max_tokens, self.settings.json_mode)

    # ----- one call, with retries --------------------------------------------------------------
    def _call(self, job: Job, stage: str, subject: str, key: str, messages, temperature, max_tokens,
              parse) -> list | None:
        cached = self.journal.get(key)
        if cached is not None:
            with self._lock:
                self.result.cached_calls += 1
            return cached
        if self._fatal is not None:  # the teacher cannot be used: ask nothing more
            return None

        def attempt():
            reply = self.teacher.complete(messages, temperature, max_tokens, self.settings.json_mode)
            with self._lock:
                self.result.prompt_tokens += reply.prompt_tokens
                self.result.completion_tokens += reply.completion_tokens
            parsed: Parsed = parse(reply.text, reply.finish_reason)
            if not parsed.ok:
                raise TeacherCallError(parsed.problem or "no_json", f"{stage} reply unusable: {parsed.problem}", True)
            if parsed.problem == "truncated":
                with self._lock:
                    self.result.truncated_but_used += 1
            return parsed.items, {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}

        def count_attempt():
            with self._lock:
                self.result.calls += 1

        def count_retry(reason, wait_s):
            with self._lock:
                self.result.retries += 1
            job.log(f"{stage} {subject}: {reason}, retrying in {wait_s:.1f}s")

        try:
            items, usage = call_with_retries(attempt, self.settings.retry, job.cancel_event, count_attempt, count_retry)
        except TeacherCallError as exc:
            if exc.reason in FATAL_REASONS:
                self._fatal = self._fatal or exc
            if exc.reason == "cancelled":  # never answered: not counted as done in the progress line
                with self._lock:
                    self._not_made += 1
            else:
                with self._lock:
                    self._failures[exc.reason] += 1
                    self._first_failure = self._first_failure or str(exc)
                self.journal.record_failure(stage, subject, exc.reason, str(exc))
                job.log(f"{stage} {subject} failed: {exc.reason}")
            return None
        self.journal.record(key, stage, items, usage)
        return items

    def _pair_task(self, job: Job, section: Section) -> tuple[Section, list[dict]]:
        n = self.settings.pairs_for(section)
        messages = self._pair_messages(section, n)
        key = self._key("pairs", messages, self.settings.temperature, self.settings.max_tokens * n)
        items = self._call(job, "pairs", f"section {section.index} ({section.heading})", key, messages,
                           self.settings.temperature, self.settings.max_tokens * n, parse_pairs) or []
        return section, items[:n]

    def _paraphrase_task(self, job: Job, group: str, pair: dict) -> tuple[str, list[str]]:
        messages = self._paraphrase_messages(pair)
        key = self._key("paraphrases", messages, self.settings.paraphrase_temperature, self.settings.paraphrase_max_tokens)
        items = self._call(job, "paraphrases", f"group {group}", key, messages, self.settings.paraphrase_temperature,
                           self.settings.paraphrase_max_tokens, parse_variants if self._facts else parse_strings) or []
        return group, items

    def _exam_task(self, job: Job, section: Section, pairs: list[dict]) -> tuple[tuple, list[dict]]:
        messages = exam_module.exam_messages(self.title, section.text, self.settings.exam,
                                             [p["instruction"] for p in pairs], self.language)
        tokens = self.settings.max_tokens * self.settings.exam
        key = self._key("exam", messages, self.settings.temperature, tokens)
        items = self._call(job, "exam", f"section {section.index} ({section.heading})", key, messages,
                           self.settings.temperature, tokens, exam_module.parse_exam) or []
        return ("exam", section), items  # capped at `exam` after the rephrasings are dropped

    # ----- the pipeline ------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        job.add_secret_from(self.teacher)
        write_text_atomic(self.folder / "build.json", json.dumps(self._manifest(), ensure_ascii=False, indent=2))
        job.log(f"{len(self.sections)} sections from {self.name}; teacher {self.teacher.label}; build folder {self.folder}")
        for note in self.journal.notes:
            job.log(note)
        workers = max(1, min(self.settings.concurrency, self.teacher.max_concurrency))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="teacher") as pool:
            pending: set[Future] = {pool.submit(self._pair_task, job, s) for s in self.sections}
            self._total = len(pending)
            self._report(job)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.cancelled():
                        continue
                    if future.exception() is not None:  # a bug or a reply no check foresaw: this task only
                        self._task_failed(job, future.exception())
                        continue
                    pending |= self._on_finished(job, pool, future.result())
                if job.cancelled:
                    for future in pending:
                        future.cancel()
        self.result.cancelled = job.cancelled
        self.result.failures = dict(self._failures)
        self._write_outputs(job)
        job.log(self.result.summary())
        if self._fatal is not None:
            raise DataError(f"The build stopped: the teacher cannot be used: {self._fatal} "
                            "Calls already answered are kept in the journal; fix this and build again.")
        if not self.result.rows and not job.cancelled:
            raise DataError("Nothing was written: no teacher call produced a usable pair. "
                            f"{self.result.summary()} First failure: {self._first_failure}")
        return asdict(self.result)

    def _task_failed(self, job: Job, exc: BaseException) -> None:
        """Count a task that raised (its section's or pair's rows are missing) and go on with the others."""
        message = redact(f"unexpected: {type(exc).__name__}: {exc}", getattr(self.teacher, "secrets", ()))[:300]
        with self._lock:
            self._failures["unexpected"] += 1
            self._first_failure = self._first_failure or message
        self.journal.record_failure("task", "", "unexpected", message)
        job.log(f"a teacher task failed: {message}")

    def _on_finished(self, job: Job, pool: ThreadPoolExecutor, outcome) -> set[Future]:
        new: set[Future] = set()
        key, items = outcome
        if isinstance(key, Section):
            pairs = [{"group": f"s{key.index:02d}-q{j}", "section": key.heading, **p} for j, p in enumerate(items, 1)]
            self._pairs[key.index] = pairs
            if self.settings.variants > 0 and not job.cancelled:
                new = {pool.submit(self._paraphrase_task, job, p["group"], p) for p in pairs}
            if self.settings.exam > 0 and not job.cancelled:
                new.add(pool.submit(self._exam_task, job, key, pairs))
        elif isinstance(key, tuple):
            self._exam_items[key[1].index] = items
        else:
            self._paraphrases[key] = items
        self._done += 1
        self._total += len(new)
        self._report(job)
        return new

    def _report(self, job: Job) -> None:
        done = self._done - self._not_made
        job.emit("progress", f"{done}/{self._total} calls done, {sum(self._failures.values())} failed",
                 done=done, total=self._total, failed=sum(self._failures.values()))

    # ----- outputs -----------------------------------------------------------------------------
    def rows(self) -> tuple[list[dict], list[dict]]:
        """(base rows, dataset rows): normalised, de-duplicated, each with `group` and `kind`."""
        seen: set[str] = set()
        base_rows, rows = [], []
        for index in sorted(self._pairs):
            for pair in self._pairs[index]:
                question = normalize_question(pair["instruction"])
                if not question or dedup_key(question) in seen:
                    continue
                seen.add(dedup_key(question))
                base = {"instruction": question, "output": pair["output"], "group": pair["group"],
                        "kind": "base", "section": pair["section"]}
                if self.source:
                    base["source"] = self.source
                base_rows.append(base)
                rows.append(base)
                rows += self._variant_rows(base, seen)
        return base_rows, rows

    def _variant_rows(self, base: dict, seen: set[str]) -> list[dict]:
        """At most `variants` new rephrasings of one base row: a chatty teacher does not outweigh the others.

        A facts-style variant may carry its own wording of the answer (kept when it keeps the numbers)."""
        rows = []
        for item in self._paraphrases.get(base["group"], []):
            if len(rows) >= self.settings.variants:
                break
            variant = normalize_question(item if isinstance(item, str) else item["instruction"])
            if variant and dedup_key(variant) not in seen:
                seen.add(dedup_key(variant))
                rows.append({**base, "instruction": variant, "kind": "paraphrase", **self._reworded(item, base)})
        return rows

    @staticmethod
    def _reworded(item, base: dict) -> dict:
        """A facts-style variant's own wording of the answer, when it keeps the answer's numbers."""
        answer = item.get("output", "") if isinstance(item, dict) else ""
        if answer and answer != base["output"] and styles.keeps_numbers(answer, base["output"]):
            return {"output": answer, "reworded": True}
        return {}

    def exam(self, rows: list[dict]) -> list[dict]:
        """Exam rows: per section, the teacher's questions minus rephrasings of any training question."""
        questions_by_section: dict[str, list[str]] = {}
        for row in rows:
            questions_by_section.setdefault(row["section"], []).append(row["instruction"])
        exam_rows, dropped = [], Counter()
        for section in self.sections:
            items = self._exam_items.get(section.index, [])
            kept, why = exam_module.exam_rows(items, section.heading, section.text,
                                              questions_by_section.get(section.heading, []), self.source)
            exam_rows += kept[: self.settings.exam]
            dropped.update(why)
        self.result.exam_dropped = {k: v for k, v in dropped.items() if v}
        return exam_rows

    def _write_exam(self, job: Job, rows: list[dict], path: Path) -> None:
        """Write the exam over the empty file reserved for it (removed when there is no exam)."""
        exam_rows = self.exam(rows)
        self.result.exam_questions = len(exam_rows)
        dropped = self.result.exam_dropped
        close, keyless = dropped.get("rephrasing", 0), dropped.get("no_keys", 0)
        if not exam_rows:
            path.unlink(missing_ok=True)
            job.log(f"No exam was written: no usable exam question (dropped: {close} too close to a training question, "
                    f"{keyless} without key facts found in the section).")
            return
        write_jsonl_atomic(path, exam_rows)
        self.result.exam_path = str(path)
        if dropped:
            job.log(f"exam saved: {len(exam_rows)} questions, never trained on -> {path} (dropped: {close} too close "
                    f"to a training question, {keyless} without key facts found in the section)")
        else:
            job.log(f"exam saved: {len(exam_rows)} questions, never trained on -> {path}")

    def _write_outputs(self, job: Job) -> None:
        base_rows, rows = self.rows()
        self.result.base_pairs, self.result.rows = len(base_rows), len(rows)
        if not rows:
            job.log("Nothing was written: no call produced a usable pair.")
            return
        names = ("base", "dataset") + (("exam",) if self.settings.exam > 0 else ())
        name = f"{self.name}_partial" if self.result.cancelled else self.name  # kept, and named for what it is
        paths = stamped(*(self.data_dir / f"{name}_{kind}_{{stamp}}.jsonl" for kind in names))
        base_path, dataset_path = paths[:2]
        write_jsonl_atomic(base_path, base_rows)
        write_jsonl_atomic(dataset_path, rows)
        self.result.base_path, self.result.dataset_path = str(base_path), str(dataset_path)
        if self.settings.exam > 0:
            self._write_exam(job, rows, paths[2])
        write_text_atomic(self.folder / "summary.json", json.dumps(asdict(self.result), ensure_ascii=False, indent=2))
        job.log(f"base saved: {len(base_rows)} -> {base_path}")
        job.log(f"saved: {len(rows)} -> {dataset_path}")

    def _manifest(self) -> dict:
        settings = asdict(self.settings)
        config = getattr(self.teacher, "config", None)  # a remote teacher's place, for the form to show again
        place = {"base_url": config.base_url, "model": config.model, "timeout_s": config.timeout_s} if config else {}
        return {"name": self.name, "title": self.title, "teacher": self.teacher_id, "teacher_place": place,
                "source": self.source, "settings": settings,
                "sections": [{"index": s.index, "heading": s.heading, "chars": s.chars, "sha256": s.content_hash}
                             for s in self.sections]}
