"""Compare and the scored report on the tiny model: honest columns, retrieval, scores, refusals, UI, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client

from fake_teacher import FakeTeacher
from studio.data.documents import read_document, split_sections
from studio.data.teacher import TeacherConfig
from studio.errors import AdapterError, StudioError
from studio.evaluate import service
from studio.evaluate.report import BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL
from studio.evaluate.retrieval import SectionRetriever
from studio.evaluate.scoring import char_f1, rouge_l
from studio.jobs import JobBoard, JobStatus
from studio.model.generation import GenerationSettings, build_messages
from studio.model.loading import ModelSpec
from studio.model.manager import ModelManager, ModelState
from studio.services import Services, StudioPaths
from studio.train.job import RunRequest
from studio.train.service import new_run_dir, start_training
from studio.train.settings import LoraSettings, TrainSettings
from conftest import SAMPLE_DOC
from test_training import FACTS, FAST, SYSTEM, write_dataset
from uihelpers import launched

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A run trained to recite FACTS (held-out phrasings of each), on its own manager."""
    root = tmp_path_factory.mktemp("compare")
    paths = StudioPaths(root / "data", root / "runs").ensure()
    dataset = write_dataset(paths.data_dir / "facts.jsonl")
    manager = ModelManager()
    manager.load(ModelSpec(str(tiny_model_dir)))
    board = JobBoard()
    request = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(**FAST), new_run_dir(paths.runs_dir, "facts"))
    job = board.wait(start_training(board, manager, request), 300)
    assert job.status is JobStatus.DONE, job.error
    return {"manager": manager, "paths": paths, "run": Path(job.result["run_dir"]), "adapter": job.result["adapter"]}


def test_columns_are_the_honest_greedy_outputs(trained, tiny_model_dir):
    manager, adapter = trained["manager"], trained["adapter"]
    question = FACTS[1][0]
    messages = build_messages(SYSTEM, [], question)
    settings = GenerationSettings.greedy(48)
    fresh = ModelManager()  # a base that never had an adapter attached
    fresh.load(ModelSpec(str(tiny_model_dir)))
    base_expected = fresh.chat(messages, settings)
    tuned_expected = manager.chat(messages, settings, adapter=adapter)
    updates = list(manager.stream_side_by_side(messages, adapter, settings))
    base, tuned = updates[-1]
    assert len(updates) > 2
    assert base == base_expected
    assert tuned == tuned_expected and max(char_f1(tuned, answer) for _, answer in FACTS) > 0.9
    assert base != tuned


def test_report_scores_the_adapter_above_the_base(trained):
    manager, run = trained["manager"], trained["run"]
    board = JobBoard()
    teacher = FakeTeacher().start()
    try:
        judge = TeacherConfig(teacher.base_url, "judge", "k")
        job = board.wait(service.start_report(board, manager, run, None, str(SAMPLE_DOC),
                                              GenerationSettings.greedy(48), judge), 300)
    finally:
        teacher.stop()
    assert job.status is JobStatus.DONE, job.error
    report = job.result
    assert len(report["rows"]) == 3  # the three held-out phrasings
    summary = report["summary"]
    assert set(summary) == {BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL}
    assert summary[TUNED]["char_f1"] > summary[BASE]["char_f1"] + 0.3
    assert summary[TUNED]["improved"] == 3 and summary[TUNED]["worse"] == 0
    assert summary[TUNED]["judge_mean"] == 4.0
    row = report["rows"][0]
    assert row["columns"][TUNED]["char_f1"] == round(char_f1(row["columns"][TUNED]["answer"], row["reference"]), 4)
    assert row["columns"][TUNED]["judge_reason"] == "基本一致"
    assert "training_char_f1" in report["recitation"]
    json_file, csv_file = (Path(p) for p in report["files"])
    saved = json.loads(json_file.read_text(encoding="utf-8"))
    assert saved["rows"][0]["question"] == row["question"]
    assert csv_file.read_text(encoding="utf-8").splitlines()[0].startswith("#,question,reference,column,answer")
    assert manager.status().state is ModelState.READY


def test_recitation_warning_when_training_phrasings_score_far_higher():
    from studio.evaluate import report as report_module

    class FakeJob:
        def check_cancelled(self):
            pass

        def emit(self, *args, **kwargs):
            pass

    rows = [{"columns": {TUNED: {"char_f1": 0.1}}}]
    request = report_module.ReportRequest("a", [{}], "", training_sample=[{"instruction": "q", "output": "答案"}])
    original = report_module.reply_text
    report_module.reply_text = lambda *args, **kwargs: "答案"
    try:
        result = report_module._recitation(FakeJob(), type("L", (), {"loaded": None})(), request, rows, 2)
    finally:
        report_module.reply_text = original
    assert result["training_char_f1"] == 1.0 and "reciting" in result["warning"]


def test_metrics_for_chinese():
    assert char_f1("灯贝。", "灯贝") == 1.0
    assert char_f1("", "灯贝") == 0.0
    assert rouge_l("需要收集三枚雾晶", "收集三枚雾晶") == pytest.approx(2 * 6 / (8 + 6))
    assert rouge_l("晶雾枚三集收", "收集三枚雾晶") < char_f1("晶雾枚三集收", "收集三枚雾晶")


def test_retrieval_returns_the_section_a_question_came_from():
    sections = split_sections(read_document(SAMPLE_DOC))
    retriever = SectionRetriever(sections)
    for question, heading in [("我该怎么成为守灯人？", "守灯人"), ("如何获得并锻造出潮汐长枪？", "潮汐长枪"),
                              ("潮汐试炼有多少层？", "潮汐试炼"), ("游戏的最低配置需要多少内存？", "配置需求"),
                              ("金不换收潮印吗？", "金不换")]:
        assert retriever.search(question, 1)[0].section.heading == heading, question


def test_foreign_and_damaged_adapters_are_refused(trained, tmp_path):
    manager, run = trained["manager"], trained["run"]
    foreign = tmp_path / "foreign"
    shutil.copytree(run, foreign)
    meta = json.loads((foreign / "studio.json").read_text(encoding="utf-8"))
    meta["base_fingerprint"]["hidden_size"] = 3584
    meta["base_model"] = "Qwen/Qwen2.5-7B-Instruct"
    (foreign / "studio.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(AdapterError, match="made for another base model \\(Qwen/Qwen2.5-7B-Instruct\\): hidden_size 3584 vs 64"):
        service.attach_run(manager, foreign)
    damaged = tmp_path / "damaged"
    shutil.copytree(run, damaged)
    (damaged / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        service.attach_run(manager, damaged)
    misfit = tmp_path / "misfit"
    shutil.copytree(run, misfit)
    (misfit / "studio.json").unlink()
    config = json.loads((misfit / "adapter_config.json").read_text())
    config["r"] = 4
    (misfit / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="Could not attach"):
        service.attach_run(manager, misfit)
    assert manager.status().state is ModelState.READY
    assert manager.chat(build_messages(SYSTEM, [], FACTS[0][0]), GenerationSettings.greedy(8))
    names = [e.name for e in service.list_adapters(manager, tmp_path)]
    assert {"foreign", "damaged"} <= set(names)
    problems = {e.name: e.problem for e in service.list_adapters(manager, tmp_path)}
    assert "another base model" in problems["foreign"] and "missing" in problems["damaged"]


def test_detach_attach_and_delete_keep_the_base(trained, tmp_path):
    manager, run = trained["manager"], trained["run"]
    messages = build_messages(SYSTEM, [], FACTS[2][0])
    base = manager.chat(messages, GenerationSettings.greedy(24))
    copy = tmp_path / "copy_run"
    shutil.copytree(run, copy)
    assert service.attach_run(manager, copy) == "copy_run"
    assert set(manager.status().adapters) >= {"copy_run", trained["adapter"]}
    assert manager.chat(messages, GenerationSettings.greedy(24), adapter="copy_run").startswith(FACTS[2][1])
    with pytest.raises(StudioError, match="Tick the confirmation"):
        service.delete_run(manager, copy, confirmed=False)
    service.delete_run(manager, copy, confirmed=True)
    assert not copy.exists() and "copy_run" not in manager.status().adapters
    assert manager.chat(messages, GenerationSettings.greedy(24)) == base


def test_ui_runs_a_comparison(trained):
    services = Services(manager=trained["manager"], paths=trained["paths"])
    with launched(services) as url:
        client = Client(url, verbose=False)
        run = str(trained["run"])
        question = FACTS[0][0]
        job = client.submit(question, run, True, str(SAMPLE_DOC), 1, "greedy", 48, api_name="/compare")
        updates = list(job)
        base, rag, tuned, retrieved, both = updates[-1]
        assert tuned.startswith(FACTS[0][1]) and base and rag
        # the fourth column: the adapter with the same retrieved sections in its prompt
        from studio.evaluate.retrieval import retrieval_messages

        hits = SectionRetriever.from_document(SAMPLE_DOC).search(question, 1)
        settings = GenerationSettings.greedy(48)
        system = json.loads((trained["run"] / "studio.json").read_text(encoding="utf-8"))["system_prompt"]
        assert both == trained["manager"].chat(retrieval_messages(system, question, hits), settings,
                                               adapter=trained["adapter"])
        assert both != rag
        assert retrieved.startswith("**守灯人**")
        assert len(updates) > 3


def test_cli_compare_writes_a_report(trained, tiny_model_dir, tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "studio.py"), "compare", "--model", str(tiny_model_dir), "--adapter",
         str(trained["run"]), "--doc", str(SAMPLE_DOC), "--out", str(out), "--max-new-tokens", "48"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "fine-tuned" in result.stdout and "char F1" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    first = report["rows"][0]
    assert set(first) == {"question", "reference", "columns", "section", "keys", "kind", "best"}
    assert set(first["columns"]) == {BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL}
    assert report["question_set"] == "heldout" and "no key facts" in result.stdout  # held-out rows carry no keys
    assert {"answer", "char_f1", "rouge_l"} <= set(first["columns"][TUNED])
