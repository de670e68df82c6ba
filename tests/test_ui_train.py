"""The Train tab through gradio_client, and the train CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gradio_client import Client

from studio.jobs import JobStatus
from test_training import SYSTEM, write_dataset
from uihelpers import handler, launched

ROOT = Path(__file__).resolve().parent.parent


def test_ui_starts_a_run_and_shows_its_progress(services, workspace):
    dataset = write_dataset(workspace.data_dir / "facts.jsonl")
    with launched(services) as url:
        client = Client(url, verbose=False)
        split, guard = client.predict(dataset.name, SYSTEM, 1, api_name="/template_guard")
        assert "15 rows → 12 for training, 3 held out (3 groups)" in split
        assert "✅ the training prompt is exactly the inference prompt" in guard and "<mark" in guard
        # ... then the speed switches: checkpointed share, Liger (skipped with a note on the CPU), bf16 copy, compile
        settings = [5e-3, 15, -1, 4, 1, 0.03, 2048, 0, 1, 42, True, False, 0.5, True, False, False]
        estimate = client.predict(dataset.name, SYSTEM, ["q_proj", "v_proj"], 8, *settings, api_name="/estimate_memory")
        assert estimate.startswith("Estimated peak") and "tokens in the largest forward pass" in estimate
        # the server checks the switches itself: a string is not a tick box, a share is between 0 and 1
        for bad, message in (([*settings[:15], "false"], "Compile the layers: true or false is needed"),
                             ([*settings[:12], 2.0, *settings[13:]], "Checkpointed share must be between 0 and 1|greater than maximum value 1")):
            with pytest.raises(Exception, match=message):
                client.predict(dataset.name, "bad", SYSTEM, ["q_proj"], 8, 16, 0.05, False, None, *bad,
                               api_name="/start_training")
        assert services.jobs.latest("train") is None
        started = client.predict(dataset.name, "ui-run", SYSTEM, ["q_proj", "v_proj"], 8, 16, 0.05, False, None, *settings,
                                 api_name="/start_training")
        assert started.startswith("Training started: ui-run_")
        job = services.jobs.latest("train")
        # a second start is refused by the server while the first runs
        try:
            client.predict(dataset.name, "again", SYSTEM, ["q_proj"], 8, 16, 0.05, False, None, *settings,
                           api_name="/start_training")
            refused = ""
        except Exception as exc:  # noqa: BLE001
            refused = str(exc)
        assert "already going" in refused
        services.jobs.wait(job, 300)
        assert job.status is JobStatus.DONE, job.error
        progress = job.latest("progress")
        assert progress["done"] == progress["total"] == 45
        metrics = [e for e in job.events_since(0)[0] if e["type"] == "metric"]
        assert any("eval_loss" in m for m in metrics) and any("learning_rate" in m for m in metrics)
        meta = json.loads((Path(job.result["run_dir"]) / "studio.json").read_text(encoding="utf-8"))
        assert meta["lora"]["targets"] == ["q_proj", "v_proj"] and meta["lora"]["r"] == 8
        # the page's speed switches reach the run (a preset's switches are not lost on the way)
        assert meta["training"]["checkpoint_fraction"] == 0.5 and meta["training"]["liger_kernels"] is True
        logged = [str(e) for e in job.events_since(0)[0] if e["type"] == "log"]
        assert any("Liger kernels skipped" in line for line in logged), logged


def test_cli_train_writes_the_run_folder(tiny_model_dir, tmp_path):
    dataset = write_dataset(tmp_path / "facts.jsonl", source="/docs/island.md")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "studio.py"), "train", "--model", str(tiny_model_dir), "--dataset", str(dataset),
         "--output", str(out), "--max-steps", "6", "--lr", "5e-3", "--batch-size", "2", "--grad-accum", "2",
         "--targets", "peft-default", "--lora-r", "4", "--system", SYSTEM, "--early-stop", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[done] completed" in result.stdout and "step 6/6" in result.stdout
    meta = json.loads((out / "studio.json").read_text(encoding="utf-8"))
    assert meta["source_document"] == "/docs/island.md"  # what the Compare tab retrieves from
    assert meta["steps"] == 6 and meta["lora"]["targets"] == ["q_proj", "v_proj"] and meta["lora"]["alpha"] == 8
    assert meta["training"]["early_stop_patience"] == 3 and meta["early_stop"]["patience"] == 3
    assert (out / "adapter_model.safetensors").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "studio.py"), "train", "--model", str(tiny_model_dir),
                          "--dataset", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Dataset not found" in bad.stderr


def test_the_trainable_share_is_the_new_adapters_whatever_is_attached(tiny_model_dir):
    """The share beside the LoRA settings is the new adapter's parameters over the base's plus its own, as peft's
    print_trainable_parameters gives it; an attached adapter's parameters changed it (17.0% became 14.6%)."""
    from studio.model.card import build_card
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.train.estimate import lora_param_count
    from test_compare import _attach_random_adapter

    manager = ModelManager()
    manager.load(ModelSpec(str(tiny_model_dir)))
    shown = handler(Services(manager=manager), "count_trainable")
    loaded = manager.require_loaded()
    count = lora_param_count(loaded.model, ["q_proj", "v_proj"], 8)
    base = build_card(loaded.model, loaded.tokenizer, "tiny", "none", "cpu").total_params
    before = shown(["q_proj", "v_proj"], 8)
    assert f"({count / (base + count):.3%} of base and adapter together" in before, before
    _attach_random_adapter(manager, "other", ["q_proj", "k_proj", "v_proj", "o_proj"], seed=1)
    assert shown(["q_proj", "v_proj"], 8) == before


def test_a_rank_out_of_range_is_said_where_the_count_goes(services):
    """Typed rank by rank, a message box each time (and another from Start, with another range) said it twice."""
    count = handler(services, "count_trainable")
    assert count(["q_proj"], 100000) == "LoRA rank must be between 1 and 512 (got 100000)."
    assert count(["q_proj"], 0) == "LoRA rank must be between 1 and 512 (got 0)."
    assert count(["q_proj"], "") == "" and "of base and adapter together" in count(["q_proj"], 8)


def test_a_panel_clears_its_started_line_when_its_job_ends(workspace):
    """"Training started: X" stood above the ended run's progress line; the panel's end handler clears it."""
    import gradio as gr

    from studio.jobs import JobBoard
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.common import job_panel
    from studio.ui.registry import Registry

    board = JobBoard()
    registry = Registry.for_services(Services(manager=ModelManager(), paths=workspace))
    with gr.Blocks() as app:
        shown = gr.Markdown()
        panel = job_panel(board, "demo-kind", {})
        panel.wire(registry, "view", lambda job: f"ended: {job.status.value}", [shown])
    finished = next(f.fn for f in app.fns.values() if f.fn.__name__ == "finished")
    job = board.wait(board.start("demo-kind", "a job", lambda job: {"ok": True}), 30)
    assert finished(job.id) == ("ended: done", "")
    assert finished("") == (gr.skip(), gr.skip())
