"""Compare and the scored report on the tiny model: honest columns, retrieval, scores, refusals, UI, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
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
from studio.config import StudioPaths
from studio.services import Services
from studio.train.job import RunRequest
from studio.train.service import new_run_dir, start_training
from studio.train.settings import LoraSettings, TrainSettings
from conftest import SAMPLE_DOC
from test_training import FACTS, FAST, SYSTEM, write_dataset
from uihelpers import handler, launched

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
    logged = [e["message"] for e in job.events_since(0)[0] if e["type"] == "log"]
    tuned, base = (f"{row['columns'][c]['char_f1']:.2f}" for c in (TUNED, BASE))
    assert logged[0] == f"Question 1/3: fine-tuned character F1 {tuned}, base {base} · {row['question']}"
    training = report["recitation"]["training_char_f1"]
    assert any(line.startswith(f"Recitation check, training phrasings: fine-tuned character F1 {training:.2f} over ")
               for line in logged), logged
    json_file, csv_file = (Path(p) for p in report["files"])
    saved = json.loads(json_file.read_text(encoding="utf-8"))
    assert saved["rows"][0]["question"] == row["question"]
    assert csv_file.read_text(encoding="utf-8").splitlines()[0].startswith("#,question,reference,column,answer")
    assert manager.status().state is ModelState.READY


def test_recitation_warning_when_training_phrasings_score_far_higher():
    from studio.evaluate import report as report_module

    class FakeJob:
        cancelled = False

        def check_cancelled(self):
            pass

        def emit(self, *args, **kwargs):
            pass

        def log(self, message):
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
        run = trained["run"].name
        question = FACTS[0][0]
        job = client.submit(question, run, True, SAMPLE_DOC.name, 1, "greedy", 48, api_name="/compare")
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


# ----- the base column is the base, whatever is attached; repeatable; one lease ---------------------
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _attach_random_adapter(manager, name, targets, seed):
    """Attach a LoRA adapter with random (non-zero) weights on `targets` to the manager's model."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    with manager.using("attaching an adapter") as loaded:
        if isinstance(loaded.model, PeftModel):
            loaded.model.add_adapter(name, config)
        else:
            loaded.model = get_peft_model(loaded.model, config, adapter_name=name)
        loaded.model.eval()
        loaded.adapters[name] = "(test)"


@pytest.fixture(params=["graphs", "eager"])
def two_adapters(request, tiny_model_dir, tmp_path):
    """A manager with adapter x on all seven projections and y on q/v only, x left active (as peft
    leaves it after x was used), plus y saved to a folder."""
    from studio.train import adapters

    manager = ModelManager(decode_mode=request.param)
    manager.load(ModelSpec(str(tiny_model_dir)))
    _attach_random_adapter(manager, "x", ALL_SEVEN, seed=1)
    _attach_random_adapter(manager, "y", ["q_proj", "v_proj"], seed=2)
    loaded = manager.require_loaded()
    y_folder = adapters.save_adapter(loaded.model, "y", tmp_path / "y")
    loaded.model.set_adapter("x")
    return {"manager": manager, "mode": request.param, "y_folder": y_folder}


def test_base_column_is_the_base_and_adapter_column_only_that_adapter(two_adapters, tiny_model_dir):
    from studio.model.generation import generate_text
    from studio.train import adapters

    manager, mode = two_adapters["manager"], two_adapters["mode"]
    messages = build_messages(SYSTEM, [], FACTS[1][0])
    settings = GenerationSettings.greedy(24)
    plain = ModelManager(decode_mode=mode)  # no adapter at all
    plain.load(ModelSpec(str(tiny_model_dir)))
    only_y = ModelManager(decode_mode=mode)  # y alone, loaded from its folder
    only_y.load(ModelSpec(str(tiny_model_dir)))
    with only_y.using("attaching an adapter") as loaded:
        adapters.attach(loaded, two_adapters["y_folder"], "y")

    base, tuned = list(manager.stream_side_by_side(messages, "y", settings))[-1]
    assert base.encode() == plain.chat(messages, settings).encode()
    assert tuned.encode() == only_y.chat(messages, settings, adapter="y").encode()
    assert base.encode() == manager.chat(messages, settings).encode()
    assert tuned.encode() == manager.chat(messages, settings, adapter="y").encode()
    # the decoders against transformers' own generate(), peft's forward with y alone
    y_loaded = only_y.require_loaded()
    assert tuned == generate_text(y_loaded.model, y_loaded.tokenizer, only_y.render_prompt(messages), settings)
    x_reply = manager.chat(messages, settings, adapter="x")
    assert len({base, tuned, x_reply}) == 3  # the adapters do change the reply: the checks above can fail


def test_greedy_replies_repeat_for_batch_1_and_2_with_an_adapter(two_adapters):
    manager = two_adapters["manager"]
    short = build_messages(SYSTEM, [], FACTS[0][0])
    long = build_messages(SYSTEM, [], FACTS[2][0] + "请详细说明每一个步骤、地点和需要的材料。" * 3)
    settings = GenerationSettings.greedy(20)
    chats, pairs = [], []
    for _ in range(3):
        chats.append(manager.chat(short, settings, adapter="y"))
        manager.chat(long, settings, adapter="x")  # leaves other entries in the cache in between
        pairs.append(list(manager.stream_side_by_side(short, "y", settings))[-1])
    assert chats[0] and len(set(chats)) == 1
    assert len(set(pairs)) == 1 and pairs[0][1] == chats[0]


class _BusyProbe:
    """Asks for the model from another thread, as a second browser session would, and keeps the answer."""

    def __init__(self, manager):
        self.manager, self.answers = manager, []

    def __call__(self):
        from studio.errors import ModelBusyError

        def other_session():
            try:
                self.manager.chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(2))
                self.answers.append("ran")
            except ModelBusyError as exc:
                self.answers.append(str(exc))

        thread = threading.Thread(target=other_session)
        thread.start()
        thread.join()

    def around_each_column(self, decoder):
        """Probe when each column's generation starts and when it ends."""
        original = decoder.stream

        def stream(*args, **kwargs):
            self()
            yield from original(*args, **kwargs)
            self()

        decoder.stream = stream


def test_a_comparison_holds_the_model_between_its_columns(two_adapters):
    manager = two_adapters["manager"]
    probe = _BusyProbe(manager)
    loaded = manager.require_loaded()
    probe.around_each_column(loaded.decoder)
    try:
        extra = {"retrieval": (build_messages(SYSTEM, [], "参考：灯贝是货币。\n" + FACTS[0][0]), None)}
        updates = []
        for columns in manager.stream_columns(build_messages(SYSTEM, [], FACTS[0][0]), "y",
                                              GenerationSettings.greedy(8), extra):
            updates.append(columns)
            probe()  # the consumer's side: between any two updates, the first column's last and the next's first
    finally:
        del loaded.decoder.stream
    assert set(updates[-1]) == {"base", "adapter", "retrieval"} and updates[-1]["retrieval"]
    assert len(probe.answers) == 4 + len(updates)
    assert all("busy (comparing base and adapter)" in answer for answer in probe.answers), probe.answers
    assert manager.chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(2)) is not None


def test_a_report_holds_the_model_between_its_columns(trained):
    manager, run = trained["manager"], trained["run"]
    probe = _BusyProbe(manager)
    board = JobBoard()
    loaded = manager.require_loaded()
    probe.around_each_column(loaded.decoder)
    try:
        job = board.wait(service.start_report(board, manager, run, None, str(SAMPLE_DOC),
                                              GenerationSettings.greedy(6)), 300)
    finally:
        del loaded.decoder.stream
    assert job.status is JobStatus.DONE, job.error
    assert len(probe.answers) >= 2 * 2 * len(job.result["rows"])  # two generations per question at least
    assert all(answer.startswith("The model is busy (scoring") for answer in probe.answers), probe.answers


def _report_warning(services, job, lang: str = "en") -> str:
    """The warning line the Compare tab shows for a finished report job."""
    import gradio as gr

    from studio.ui.compare_tab import build_compare_tab
    from studio.ui.registry import Registry

    services.registry = Registry.for_services(services)
    with gr.Blocks() as app:
        tab = build_compare_tab(services, app)
    return tab.on_report(job, lang)[0]


def test_the_report_can_be_stopped_and_the_model_is_free_afterwards(trained):
    """The Compare tab's Stop report: the job ends stopped after its current answer, the questions answered are
    saved as a report marked as stopped (they were thrown away), the model answers again; with no report running
    it says so."""
    from studio.services import Services

    manager, run = trained["manager"], trained["run"]
    services = Services(manager=manager, paths=trained["paths"])
    stop = handler(services, "stop_report")
    assert stop() == "No report is running."
    run_report = handler(services, "report")
    with pytest.raises(Exception, match="Upload a JSONL file of questions first"):  # not the held-out set in its place
        run_report(run.name, "upload", None, False, SAMPLE_DOC.name, 1, "greedy", 16, "", "", "")
    assert services.jobs.latest(service.JOB_KIND) is None
    reports_before = sorted((run / "reports").glob("*")) if (run / "reports").is_dir() else []
    job = service.start_report(services.jobs, manager, run, None, str(SAMPLE_DOC), GenerationSettings.greedy(64))
    while job.running and not job.latest("progress"):
        time.sleep(0.05)  # one answer in at least
    assert stop() == "The report stops after the current answer; the questions answered are saved."
    services.jobs.wait(job, 300)
    assert job.status is JobStatus.CANCELLED
    after = sorted((run / "reports").glob("*")) if (run / "reports").is_dir() else []
    saved = json.loads(next(p for p in after if p not in reports_before and p.suffix == ".json").read_text("utf-8"))
    assert 1 <= saved["stopped_after"] == len(saved["rows"]) < saved["questions_total"], saved.get("stopped_after")
    assert saved["recitation"] == {} and set(saved["summary"]) >= {"base", "fine-tuned"}
    assert len(after) == len(reports_before) + 2  # its JSON and CSV
    shown = _report_warning(services, job)
    assert shown.startswith(f"⚠️ Stopped after {saved['stopped_after']} of {saved['questions_total']} questions")
    assert _report_warning(services, job, "zh").startswith(f"⚠️ 在 {saved['questions_total']} 道题中的第 "
                                                          f"{saved['stopped_after']} 道后停止")
    assert manager.chat(build_messages(SYSTEM, [], FACTS[0][0]), GenerationSettings.greedy(4))  # the lease was let go


def test_a_retrieved_section_shows_its_heading_once():
    from studio.evaluate.retrieval import SectionRetriever
    from studio.ui.compare_tab import _retrieved

    hit = SectionRetriever.from_document(SAMPLE_DOC).search("守灯人每天做什么？", 1)[0]
    shown = _retrieved(hit)
    body = shown.split("\n\n", 1)[1]
    assert shown.startswith(f"**{hit.section.heading}** · BM25 ") and "(score" not in shown
    assert hit.section.text.lstrip().startswith("#") and not body.lstrip().startswith("#")  # the heading line once
    assert body.strip() and body.strip() in hit.section.text


def test_a_reloaded_page_picks_the_reported_run_else_the_newest(trained):
    """The run picker is empty on a new page: it is filled with the run of the report the tab shows, else with
    the newest run; a picked run stays picked."""
    manager, run = trained["manager"], trained["run"]

    def choices_of(services):
        return handler(services, "run_choices")

    reported = Services(manager=manager, paths=trained["paths"])
    job = reported.jobs.wait(service.start_report(reported.jobs, manager, run, None, None,
                                                  GenerationSettings.greedy(4)), 300)
    assert job.status is JobStatus.DONE, job.error
    newer = run.parent / f"{run.name}_copy"
    shutil.copytree(run, newer)
    os.utime(newer, (time.time() + 60, time.time() + 60))
    try:
        assert choices_of(reported)(None)[0]["value"] == run.name
        assert choices_of(Services(manager=manager, paths=trained["paths"]))(None)[0]["value"] == newer.name
        kept, table = choices_of(reported)(newer.name)
        assert "value" not in kept and (newer.name, newer.name) in kept["choices"]
        assert {run.name, newer.name} <= set(table.iloc[:, 0])  # the adapters table comes along, freshly read
    finally:
        shutil.rmtree(newer)


def test_detaching_what_is_not_attached_says_so(trained):
    from studio.services import Services

    manager, run = trained["manager"], trained["run"]
    detach = handler(Services(manager=manager, paths=trained["paths"]), "detach")
    service.attach_run(manager, run)
    assert detach(run.name)[0] == f"Detached {run.name}; the base model is unchanged."
    assert detach(run.name)[0] == f"{run.name} is not attached; nothing to detach."  # not "Detached" again
    service.attach_run(manager, run)  # as the other tests found it
