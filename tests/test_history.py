"""The runs history from run folders (status, settings, losses, last report), rename and delete, in
plain Python and through the Compare tab's endpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gradio_client import Client

from studio.errors import StudioError
from studio.model.manager import ModelManager
from studio.services import Services
from studio.train import history
from studio.ui.history_panel import history_frame
from uihelpers import launched

REQUEST = {"dataset": "/data/facts_dataset.jsonl", "system_prompt": "你是助手。",
           "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "bias": "none", "targets": ["q_proj", "v_proj"]},
           "train": {"learning_rate": 0.001, "epochs": 4.0, "max_steps": -1, "batch_size": 1, "grad_accum": 8}}


def make_run(runs: Path, name: str, status: str | None = None, events: list[dict] = (), report: dict | None = None,
             request: dict = REQUEST) -> Path:
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps(request), encoding="utf-8")
    if status is not None:
        (folder / "studio.json").write_text(json.dumps({
            "name": name, "status": status, "base_model": "Qwen/Qwen2.5-7B-Instruct", "dataset": request["dataset"],
            "split": {"train_rows": 12, "heldout_rows": 3}, "final_train_loss": 0.123456, "final_eval_loss": 0.5,
            "created": "2026-11-30 10:15:00", "exam_questions": 8 if name == "done_1" else 0}), encoding="utf-8")
    if events:
        (folder / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    if report is not None:
        (folder / "reports").mkdir()
        (folder / "reports" / "report_20261130_101500.json").write_text(json.dumps(report), encoding="utf-8")
    return folder


REPORT = {"rows": [{}, {}, {}], "summary": {"base": {"char_f1": 0.1}, "fine-tuned": {"char_f1": 0.8, "improved": 3,
                                                                                  "worse": 0}}}


@pytest.fixture()
def runs(tmp_path) -> Path:
    runs = tmp_path / "runs"
    make_run(runs, "done_1", "completed", report=REPORT)
    make_run(runs, "stopped_2", "stopped at step 5")
    make_run(runs, "failed_3", events=[{"type": "status", "message": "started", "status": "running"},
                                        {"type": "status", "message": "Training failed: boom", "status": "failed"}])
    make_run(runs, "broken_4", events=[{"type": "status", "message": "started", "status": "running"}])
    make_run(runs, "live_5")
    (runs / "not_a_run").mkdir()
    return runs


def test_history_reads_every_run_folder_with_its_status(runs):
    records = {r.name: r for r in history.list_history(runs, running={"live_5"})}
    assert set(records) == {"done_1", "stopped_2", "failed_3", "broken_4", "live_5"}
    assert {name: r.status for name, r in records.items()} == {
        "done_1": "done", "stopped_2": "stopped", "failed_3": "failed", "broken_4": "incomplete", "live_5": "running"}
    done = records["done_1"]
    assert (done.date, done.base_model, done.dataset, done.heldout) == \
        ("2026-11-30 10:15", "Qwen/Qwen2.5-7B-Instruct", "facts_dataset.jsonl", 3)
    assert done.settings == "r 16 · lr 0.001 · 4 ep · batch 1×8"
    assert (done.train_loss, done.eval_loss) == (0.123456, 0.5)
    assert done.report == {"tuned_f1": 0.8, "base_f1": 0.1, "improved": 3, "worse": 0, "questions": 3,
                           "file": "report_20261130_101500.json"}
    assert records["failed_3"].dataset == "facts_dataset.jsonl" and records["failed_3"].train_loss is None


def test_history_table_speaks_both_languages(runs):
    records = history.list_history(runs)
    english, chinese = history_frame(records, "en"), history_frame(records, "zh")
    assert list(english.columns)[:2] == ["run", "date"] and list(chinese.columns)[:2] == ["运行", "日期"]
    row = chinese[chinese["运行"] == "done_1"].iloc[0]
    assert row["状态"] == "完成" and row["未训练的题"] == "测试题 8 道 · 留出问法 3 条"
    assert row["设置"] == "秩 16 · 学习率 0.001 · 4 轮 · 批次 1×8"
    from studio.ui.history_panel import WIDTHS

    assert len(WIDTHS) == len(chinese.columns) and list(chinese.columns)[2:5] == ["状态", "训练 loss", "评估 loss"]
    assert english[english["run"] == "done_1"].iloc[0]["settings"] == "r 16 · lr 0.001 · 4 ep · batch 1×8"
    assert chinese[chinese["运行"] == "stopped_2"].iloc[0]["未训练的题"] == "留出问法 3 条"  # a run without an exam
    assert english[english["run"] == "done_1"].iloc[0]["questions kept out"] == "exam 8 · 3 held-out phrasings"
    assert row["最近报告"] == "微调后 F1 0.8，基座 0.1；3 题变好，0 题变差"
    assert english[english["run"] == "done_1"].iloc[0]["train loss"] == 0.1235


def test_rename_moves_the_folder_and_updates_studio_json(runs):
    target = history.rename_run(runs, "done_1", "我的 第一次", ModelManager())
    assert target == runs / "我的_第一次" and not (runs / "done_1").exists()
    assert json.loads((target / "studio.json").read_text(encoding="utf-8"))["name"] == "我的_第一次"
    assert (target / "reports" / "report_20261130_101500.json").is_file()


@pytest.mark.parametrize("name, new_name, running, message", [
    ("live_5", "x", {"live_5"}, "live_5 is training; stop it or wait for it to finish before renaming it."),
    ("done_1", "stopped_2", set(), "A run named stopped_2 already exists; pick another name."),
    ("done_1", "  ", set(), "Type the run's new name first."),
    ("../runs/done_1", "x", set(), "Run not found: ../runs/done_1"),
    ("not_a_run", "x", set(), "Run not found: not_a_run"),
])
def test_rename_refusals_change_nothing(runs, name, new_name, running, message):
    before = sorted(p.name for p in runs.iterdir())
    with pytest.raises(StudioError) as refused:
        history.rename_run(runs, name, new_name, ModelManager(), running)
    assert str(refused.value) == message
    assert sorted(p.name for p in runs.iterdir()) == before


def test_delete_needs_confirmation_and_is_refused_while_training(runs):
    manager = ModelManager()
    with pytest.raises(StudioError, match="Tick the confirmation to delete stopped_2"):
        history.delete_run(runs, "stopped_2", False, manager)
    with pytest.raises(StudioError, match="live_5 is training"):
        history.delete_run(runs, "live_5", True, manager, {"live_5"})
    assert (runs / "stopped_2").is_dir() and (runs / "live_5").is_dir()
    history.delete_run(runs, "stopped_2", True, manager)
    assert not (runs / "stopped_2").exists()


def test_history_rename_and_delete_through_the_compare_tab(workspace):
    make_run(workspace.runs_dir, "done_1", "completed", report=REPORT)
    make_run(workspace.runs_dir, "other_2", "completed")
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        client = Client(url, verbose=False)
        table = client.predict("zh", api_name="/runs_history")
        assert table["headers"][0] == "运行" and {row[0] for row in table["data"]} == {"done_1", "other_2"}
        message, table, selected = client.predict("done_1", "renamed run", "en", api_name="/rename_run")
        assert message == "Renamed done_1 to renamed_run." and selected == "renamed_run"
        assert {row[0] for row in table["data"]} == {"renamed_run", "other_2"}
        with pytest.raises(Exception, match="Tick the confirmation"):
            client.predict("other_2", False, "en", api_name="/delete_run")
        message, table, selected, confirm = client.predict("other_2", True, "en", api_name="/delete_run")
        assert message == "Deleted other_2." and [row[0] for row in table["data"]] == ["renamed_run"]
    assert sorted(p.name for p in workspace.runs_dir.iterdir()) == ["renamed_run"]
