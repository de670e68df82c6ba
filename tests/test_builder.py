"""The dataset builder against a real OpenAI-protocol server on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fake_teacher import Behaviour, FakeTeacher
from studio.data.builder import BuildSettings
from studio.data.records import read_dataset
from studio.data.service import start_build
from studio.data.teacher import RetryPolicy, TeacherConfig
from studio.jobs import JobBoard, JobStatus
from studio.model.manager import ModelManager, ModelState

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-DO-NOT-LEAK-1234567890abcdef"
SMALL_DOC = "# 小岛\n\n" + "\n\n".join(f"## 第{i}节\n" + f"第{i}节的事实：灯塔{i}号在岛的{i}号码头旁。" * 6 for i in range(4))


@pytest.fixture()
def teacher():
    server = FakeTeacher().start()
    yield server
    server.stop()


@pytest.fixture()
def small_doc(tmp_path) -> Path:
    path = tmp_path / "island.md"
    path.write_text(SMALL_DOC, encoding="utf-8")
    return path


def build(paths, doc, teacher, **overrides):
    settings = BuildSettings(**{"variants": 3, "per_section": "1", "retry": RetryPolicy(3, 0.05), **overrides})
    board = JobBoard()
    job = start_build(board, ModelManager(), paths, doc, settings, TeacherConfig(teacher.base_url, "teacher-x", KEY, 2.0))
    return board.wait(job, 60)


def every_file_text(*folders) -> str:
    return "".join(p.read_text(encoding="utf-8", errors="replace") for f in folders for p in Path(f).rglob("*") if p.is_file())


def test_clean_build_writes_base_and_dataset_files(workspace, small_doc, teacher):
    job = build(workspace, small_doc, teacher, style="tutorial")  # one answer string per group
    assert job.status is JobStatus.DONE, job.error
    result = job.result
    assert result["sections"] == 4 and result["base_pairs"] == 4 and result["rows"] == 16
    base = read_dataset(result["base_path"])
    rows = read_dataset(result["dataset_path"])
    assert Path(result["base_path"]).name.startswith("island_base_")
    assert Path(result["dataset_path"]).name.startswith("island_dataset_")
    assert [r["kind"] for r in rows[:4]] == ["base", "paraphrase", "paraphrase", "paraphrase"]
    assert {r["group"] for r in rows} == {"s00-q1", "s01-q1", "s02-q1", "s03-q1"}
    assert all(r["instruction"].endswith("？") for r in rows)
    for row in rows:  # every paraphrase carries its base pair's answer
        assert row["output"] == next(b["output"] for b in base if b["group"] == row["group"])
    assert len(teacher.hits) == 8 and result["calls"] == 8
    assert teacher.hits[0]["temperature"] == 0.2 and teacher.hits[0]["response_format"] == {"type": "json_object"}
    assert result["prompt_tokens"] > 0 and result["completion_tokens"] > 0
    assert teacher.auth_headers[0] == f"Bearer {KEY}"


def test_bad_replies_are_retried_and_never_written(workspace, small_doc, teacher):
    teacher.then(Behaviour("fenced"), Behaviour("prose"), Behaviour("wrong_schema"), Behaviour("empty"),
                 Behaviour("status", 500), Behaviour("truncated"))
    job = build(workspace, small_doc, teacher, concurrency=1, retry=RetryPolicy(5, 0.01))
    assert job.status is JobStatus.DONE, job.error
    assert job.result["rows"] == 16 and job.result["retries"] >= 3
    for row in read_dataset(job.result["dataset_path"]):
        assert row["instruction"] and row["output"] and "question_list" not in json.dumps(row, ensure_ascii=False)


def test_429_waits_for_retry_after(workspace, small_doc, teacher):
    teacher.then(Behaviour("status", 429, retry_after="1"))
    started = time.time()
    job = build(workspace, small_doc, teacher, concurrency=1, variants=0)
    assert job.status is JobStatus.DONE
    assert time.time() - started >= 1.0
    retry_logs = [e["message"] for e in job.events_since(0)[0] if "retrying" in e["message"]]
    assert retry_logs == [retry_logs[0]] and "http_429, retrying in 1.0s" in retry_logs[0]


def test_failures_are_recorded_with_reasons(workspace, small_doc, teacher):
    # section 0 fails three times with 500, one paraphrase call hangs past the 2 s timeout three times
    teacher.then(*[Behaviour("status", 500)] * 3)
    job = build(workspace, small_doc, teacher, concurrency=1, retry=RetryPolicy(3, 0.01))
    assert job.status is JobStatus.DONE
    assert job.result["failures"] == {"http_500": 1}
    assert job.result["base_pairs"] == 3
    failures = [json.loads(l) for l in (Path(job.result["build_dir"]) / "failures.jsonl").read_text().splitlines()]
    assert failures[0]["reason"] == "http_500" and failures[0]["subject"].startswith("section 0")
    assert "Failed calls by reason: http_500: 1" in job.events_since(0)[0][-2]["message"]


def test_hang_longer_than_timeout_is_a_timeout_failure(workspace, small_doc, teacher):
    teacher.then(*[Behaviour("hang")] * 2)
    job = build(workspace, small_doc, teacher, concurrency=1, variants=0, retry=RetryPolicy(2, 0.01))
    assert job.result["failures"] == {"timeout": 1} and job.result["base_pairs"] == 3


def test_nothing_usable_fails_the_job_with_the_reason(workspace, small_doc, teacher):
    teacher.then(*[Behaviour("status", 401)] * 4)
    job = build(workspace, small_doc, teacher, variants=0)
    assert job.status is JobStatus.FAILED
    assert "Nothing was written" in job.error and "http_401: 4" in job.error
    assert KEY not in job.error


def test_rerun_calls_only_what_is_missing(workspace, small_doc, teacher):
    teacher.then(*[Behaviour("status", 500)] * 3)
    first = build(workspace, small_doc, teacher, concurrency=1, retry=RetryPolicy(3, 0.01))
    assert first.result["failures"] == {"http_500": 1}
    hits_before = len(teacher.hits)
    second = build(workspace, small_doc, teacher, concurrency=1)
    assert second.status is JobStatus.DONE
    assert len(teacher.hits) - hits_before == 2  # the failed section and its paraphrase call
    assert second.result["cached_calls"] == 6 and second.result["rows"] == 16
    changed = build(workspace, small_doc, teacher, variants=4)  # other settings: other keys for stage 2 only
    assert changed.result["cached_calls"] == 4


def test_replies_of_another_shape_fail_their_call_only_and_the_build_goes_on(workspace, small_doc, teacher):
    """A content that is an object, or `choices` that is a string, once ended the whole build with an
    AttributeError and wrote nothing; content given as text parts is text."""
    teacher.then(Behaviour("parts"), Behaviour("content_dict"), Behaviour("choices_str"))
    job = build(workspace, small_doc, teacher, concurrency=1, variants=0, retry=RetryPolicy(1, 0.01))
    assert job.status is JobStatus.DONE, job.error
    assert job.result["failures"] == {"wrong_schema": 2} and job.result["base_pairs"] == 2
    failures = (Path(job.result["build_dir"]) / "failures.jsonl").read_text(encoding="utf-8")
    assert "`content` is dict, not text" in failures and "`choices` is str, not a list" in failures
    assert len(read_dataset(job.result["dataset_path"])) == 2


def test_line_breaks_inside_the_teachers_text_keep_every_file_readable(workspace, small_doc, teacher):
    """json.dumps leaves U+2028 and U+2029 raw, and str.splitlines() breaks lines at them: the dataset and the
    journal were written, then could not be read back (the next build paid for every call again)."""
    teacher.then(*[Behaviour("line_breaks")] * 8)
    first = build(workspace, small_doc, teacher, style="tutorial")
    assert first.status is JobStatus.DONE, first.error
    rows = read_dataset(first.result["dataset_path"])
    assert len(rows) == 16 and any("\u2028" in r["output"] for r in rows)
    for name in ("dataset_path", "base_path"):
        text = Path(first.result[name]).read_text(encoding="utf-8")
        assert len(text.splitlines()) == len(read_dataset(first.result[name]))  # one line a row, for any reader
    hits = len(teacher.hits)
    again = build(workspace, small_doc, teacher, style="tutorial")
    assert len(teacher.hits) == hits and again.result["cached_calls"] == 8  # every call reused from the journal


def test_key_is_in_no_file_and_no_log_line(workspace, small_doc, teacher):
    teacher.then(Behaviour("status", 500), Behaviour("status", 401))
    job = build(workspace, small_doc, teacher)
    assert KEY not in every_file_text(workspace.data_dir, workspace.runs_dir)
    assert all(KEY not in json.dumps(e, ensure_ascii=False) for e in job.events_since(0)[0])


def test_cancel_stops_and_a_rerun_completes(workspace, small_doc):
    slow = FakeTeacher(latency=0.3).start()
    try:
        board = JobBoard()
        settings = BuildSettings(variants=2, per_section="1", concurrency=1)
        job = start_build(board, ModelManager(), workspace, small_doc, settings, TeacherConfig(slow.base_url, "teacher-x", KEY))
        time.sleep(0.5)
        job.cancel()
        board.wait(job, 30)
        assert job.status is JobStatus.CANCELLED
        made = len(slow.hits)
        assert made < 8
        # the progress line counts the calls answered, not those the cancel stopped; the rows kept say partial
        progress = job.latest("progress")
        assert progress["done"] == made < progress["total"], progress
        assert "_partial_dataset_" in Path(job.result["dataset_path"]).name
        again = build(workspace, small_doc, slow, variants=2)
        assert again.result["rows"] == 12
        assert len(slow.hits) - made == 8 - made
    finally:
        slow.stop()


def test_kill_mid_build_then_rerun_makes_only_missing_calls(workspace, small_doc, teacher):
    script = f"""
import sys, os, time
sys.path[:0] = [{str(ROOT)!r}]
from pathlib import Path
from studio.data.builder import BuildSettings
from studio.data.service import start_build
from studio.data.teacher import TeacherConfig
from studio.jobs import JobBoard
from studio.model.manager import ModelManager
from studio.config import StudioPaths
paths = StudioPaths(Path({str(workspace.data_dir)!r}), Path({str(workspace.runs_dir)!r}))
settings = BuildSettings(variants=3, per_section="1", concurrency=1)
start_build(JobBoard(), ModelManager(), paths, {str(small_doc)!r}, settings, TeacherConfig({teacher.base_url!r}, "teacher-x", "k"))
time.sleep(60)
"""
    teacher.latency = 0.2
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    journal = None
    while time.time() < deadline:
        journal = next(workspace.builds_dir.glob("*/journal.jsonl"), None)
        if journal and len(journal.read_text(encoding="utf-8").splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    recorded = len(journal.read_text(encoding="utf-8").splitlines())
    assert 3 <= recorded < 8
    teacher.latency = 0.0
    hits_before = len(teacher.hits)
    job = build(workspace, small_doc, teacher)
    assert job.status is JobStatus.DONE and job.result["rows"] == 16
    assert len(teacher.hits) - hits_before == 8 - recorded
    assert job.result["cached_calls"] == recorded


def test_local_teacher_holds_the_model_and_gives_it_back(workspace, small_doc, manager):
    board = JobBoard()
    settings = BuildSettings(variants=2, per_section="1", retry=RetryPolicy(1, 0.01), max_tokens=40,
                             paraphrase_max_tokens=40)
    job = start_build(board, manager, workspace, small_doc, settings, teacher=None)
    assert manager.status().state is ModelState.BUSY
    assert "local teacher" in manager.status().activity
    board.wait(job, 120)
    assert manager.status().state is ModelState.READY
    # a random tiny model writes no JSON: the job says so instead of reporting an empty success
    assert job.status is JobStatus.FAILED and "Nothing was written" in job.error
    assert "Teacher calls: 4 made" in job.error


def test_rephrasings_are_capped_at_variants(workspace, small_doc, teacher):
    teacher.then(*[Behaviour("chatty")] * 20)  # every call answers 80 more rephrasings than asked
    job = build(workspace, small_doc, teacher, variants=3)
    assert job.status is JobStatus.DONE, job.error
    rows = read_dataset(job.result["dataset_path"])
    per_group = {g: sum(1 for r in rows if r["group"] == g and r["kind"] == "paraphrase") for g in {r["group"] for r in rows}}
    assert per_group and set(per_group.values()) == {3}


def test_a_teacher_answering_html_stops_the_build_at_once(workspace, small_doc, teacher):
    teacher.then(*[Behaviour("html")] * 20)
    job = build(workspace, small_doc, teacher, concurrency=1)
    assert job.status is JobStatus.FAILED
    assert "not_json: the endpoint answered HTML" in job.error and "/v1" in job.error
    assert len(teacher.hits) == 1  # neither retried nor asked again for the other sections


@pytest.mark.parametrize("overrides, words", [
    ({"retry": RetryPolicy(0)}, "Attempts per teacher call must be at least 1, not 0"),
    ({"variants": -1}, "Rephrasings per question must be between 0 and 100"),
    ({"concurrency": 0}, "Teacher calls in flight must be at least 1"),
    ({"per_section": "many"}, "must be a number or 'auto'"),
])
def test_bad_settings_are_refused_before_any_call(workspace, small_doc, teacher, overrides, words):
    from studio.errors import DataError

    with pytest.raises(DataError, match=words):
        build(workspace, small_doc, teacher, **overrides)
    assert teacher.hits == []


def test_the_cost_is_known_before_the_build_and_matches_it(workspace, small_doc, teacher):
    from studio.data.builder import check_cost, estimate_cost
    from studio.errors import DataError

    settings = BuildSettings(variants=3, per_section="1")
    cost = estimate_cost(SMALL_DOC, settings)
    assert (cost.sections, cost.pair_calls, cost.paraphrase_calls) == (4, 4, 4) and cost.chars_sent > len(SMALL_DOC)
    assert "4 sections -> 8 teacher calls" in cost.describe() and not cost.warnings
    job = build(workspace, small_doc, teacher)
    assert job.result["calls"] == cost.calls == len(teacher.hits)
    with pytest.raises(DataError, match="would make 8 teacher calls, more than the limit of 5"):
        check_cost(cost, 5)
    check_cost(cost, 8)
    paragraph = "".join(f"第{i}号灯塔在第{i}号码头旁边。" for i in range(30_000))
    huge = estimate_cost("## 长\n\n" + paragraph, settings)
    assert huge.calls > 300 and f"{len(paragraph):,} characters long" in huge.describe()


def test_a_task_that_raises_is_counted_and_its_message_keeps_no_key(workspace, small_doc, teacher, monkeypatch):
    """A failure no check foresaw fails its own section only, and what it says is redacted like the rest."""
    import studio.data.builder as builder_module

    real_parse, calls = builder_module.parse_pairs, []

    def parse_failing_once(text, finish):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"client said Authorization: Bearer {KEY}")
        return real_parse(text, finish)

    monkeypatch.setattr(builder_module, "parse_pairs", parse_failing_once)
    job = build(workspace, small_doc, teacher, concurrency=1, variants=0)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["failures"] == {"unexpected": 1} and job.result["base_pairs"] == 3
    failures = (Path(job.result["build_dir"]) / "failures.jsonl").read_text(encoding="utf-8")
    assert "RuntimeError: client said" in failures and KEY not in failures
    assert KEY not in every_file_text(workspace.data_dir)
