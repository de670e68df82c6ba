"""Training on the tiny 4-bit model on the CPU: formatting, learning, stop, resume, NaN, OOM, results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from studio.errors import ModelBusyError, StudioError
from studio.jobs import JobBoard, JobStatus
from studio.model.generation import GenerationSettings, build_messages
from studio.model.manager import ModelState
from studio.train.formatting import IGNORE, format_example, supervised_text, template_guard
from studio.train.job import RunRequest, last_complete_checkpoint
from studio.train.service import load_request, new_run_dir, start_training
from studio.train.settings import ALL_PROJECTIONS, LoraSettings, TrainSettings
from studio.train.split import split_heldout

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"
FACTS = [
    ("我该怎么成为守灯人？", "完成序章任务初燃：收集三枚雾晶，在北角灯塔点燃青焰灯芯。"),
    ("如何锻造潮汐长枪？", "击败铁鳍将军获得鲸骨枪胚，带5个月潮石和1个深渊珊瑚找石阿满，支付300枚灯贝。"),
    ("雾灯岛的通用货币是什么？", "灯贝，一种会在夜里发出微光的贝壳。"),
]
FAST = dict(learning_rate=5e-3, epochs=15.0, batch_size=4, grad_accum=1, save_every=0)


def write_dataset(path: Path, facts=FACTS, phrasings: int = 4, source: str | None = None) -> Path:
    rows = []
    for g, (question, answer) in enumerate(facts):
        rows.append({"instruction": question, "output": answer, "group": f"s{g:02d}-q1", "kind": "base"})
        rows += [{"instruction": question.replace("？", f"（问法{k}）？"), "output": answer, "group": f"s{g:02d}-q1",
                  "kind": "paraphrase"} for k in range(phrasings)]
    if source:
        rows = [{**row, "source": source} for row in rows]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def dataset(tmp_path) -> Path:
    return write_dataset(tmp_path / "facts.jsonl")


def request(dataset, workspace, **train) -> RunRequest:
    return RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(**{**FAST, **train}),
                      new_run_dir(workspace.runs_dir, "facts"))


def greedy(manager, question, adapter=None, tokens=40):
    return manager.chat(build_messages(SYSTEM, [], question), GenerationSettings.greedy(tokens), adapter=adapter)


def test_supervised_tokens_are_exactly_the_answer_and_end_of_turn(manager):
    tokenizer = manager.require_loaded().tokenizer
    question, answer = FACTS[1]
    example = format_example(tokenizer, SYSTEM, question, answer, 2048)
    assert supervised_text(tokenizer, example) == answer + "<|im_end|>"
    prompt = tokenizer.decode(example.input_ids[: example.prompt_length], skip_special_tokens=False)
    assert prompt == manager.render_prompt(build_messages(SYSTEM, [], question))
    assert example.labels[: example.prompt_length] == [IGNORE] * example.prompt_length
    assert example.labels[-1] == IGNORE  # the newline after <|im_end|> is not supervised
    guard = template_guard(tokenizer, SYSTEM, question, answer)
    assert guard["matches"] and guard["supervised_text"] == answer + "<|im_end|>"
    short = format_example(tokenizer, SYSTEM, question, answer, 10)
    assert short.truncated and len(short.input_ids) == 10


def test_split_holds_out_one_paraphrase_per_big_group():
    rows = [{"instruction": f"q{g}-{k}", "output": "a", "group": f"g{g}", "kind": "base" if k == 0 else "paraphrase"}
            for g in range(5) for k in range(5 if g < 4 else 3)]
    rows += [{"instruction": f"free{i}", "output": "a"} for i in range(40)]
    train, held = split_heldout(rows, per_group=1, seed=1)
    held_groups = [r["group"] for r in held if "group" in r]
    assert sorted(held_groups) == ["g0", "g1", "g2", "g3"]  # g4 has 3 rows: too small
    assert all(r["kind"] == "paraphrase" for r in held if "group" in r)
    assert len([r for r in held if "group" not in r]) == 2  # 5% of 40 ungrouped rows
    assert len(train) + len(held) == len(rows)
    assert split_heldout(rows, per_group=1, seed=1) == (train, held)


def test_chat_train_chat_learns_the_answers_and_keeps_the_base(manager, dataset, workspace):
    question, answer = FACTS[0]
    before = greedy(manager, question)
    board = JobBoard()
    job = start_training(board, manager, request(dataset, workspace))
    assert manager.status().state is ModelState.BUSY
    with pytest.raises(ModelBusyError, match="training"):
        greedy(manager, question)
    with pytest.raises(StudioError, match="already going"):
        start_training(board, manager, request(dataset, workspace))
    board.wait(job, 300)
    assert job.status is JobStatus.DONE, job.error
    adapter = job.result["adapter"]
    assert greedy(manager, question, adapter=adapter).startswith(answer)
    assert not greedy(manager, question).startswith(answer)
    assert greedy(manager, question) == before  # the base is byte-identical with the adapter disabled
    assert manager.status().adapters == (adapter,)
    from studio.model.card import lora_target_names

    # the Train tab's targets for the next run: each projection by its name, not peft's base_layer inside it
    assert lora_target_names(manager.require_loaded().model) == list(ALL_PROJECTIONS)
    # the run folder
    run_dir = Path(job.result["run_dir"])
    for name in ("adapter_config.json", "adapter_model.safetensors", "studio.json", "metrics.jsonl", "loss.png",
                 "heldout.jsonl", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "studio.json").read_text(encoding="utf-8"))
    metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    heldout = [json.loads(l) for l in (run_dir / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert meta["status"] == "completed" and meta["system_prompt"] == SYSTEM
    assert meta["split"] == {"train_rows": 12, "heldout_rows": 3, "heldout_file": "heldout.jsonl",
                             "train_file": "train_split.jsonl", "heldout_per_group": 1}
    assert len(heldout) == 3 and {r["group"] for r in heldout} == {"s00-q1", "s01-q1", "s02-q1"}
    assert meta["dataset"] == str(dataset) and len(meta["dataset_sha256"]) == 64
    assert meta["lora"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert meta["training"]["learning_rate"] == 5e-3 and meta["base_model"] == str(manager.status().model_name)
    assert meta["steps"] == 45 and metrics[-1]["step"] == 45
    assert meta["final_train_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
    assert meta["final_eval_loss"] == [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    assert metrics[0]["loss"] > meta["final_train_loss"] and meta["tokens_per_s"] > 0
    assert all(m["grad_norm"] > 0 for m in metrics if "loss" in m)  # the Train tab's gradient-norm plot
    # 2 layers x 7 projections: r * (in + out) each
    per_layer = 16 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert meta["trainable_params"] == 2 * per_layer
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"


class StopAt(TrainerCallback):
    def __init__(self, job_holder, step):
        self.job_holder, self.step = job_holder, step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:  # Stop pressed while step `self.step` runs
            self.job_holder[0].cancel()


def test_stop_saves_a_usable_adapter_and_resume_continues(manager, dataset, workspace):
    board, holder = JobBoard(), []
    req = request(dataset, workspace, save_every=2)
    job = start_training(board, manager, req, extra_callbacks=(StopAt(holder, 5),))
    holder.append(job)
    board.wait(job, 300)
    assert job.status is JobStatus.CANCELLED
    meta = json.loads((req.run_dir / "studio.json").read_text(encoding="utf-8"))
    assert meta["status"] == "stopped at step 5" and job.result["steps"] == 5
    assert last_complete_checkpoint(req.run_dir).name == "checkpoint-5"
    assert sorted(p.name for p in (req.run_dir / "checkpoints").iterdir()) == ["checkpoint-4", "checkpoint-5"]
    assert greedy(manager, FACTS[0][0], adapter=job.result["adapter"])  # the stopped adapter answers
    resumed = start_training(board, manager, load_request(req.run_dir))
    board.wait(resumed, 300)
    assert resumed.status is JobStatus.DONE, resumed.error
    assert resumed.result["steps"] == 45
    metrics = [json.loads(l) for l in (req.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps[:5] == [1, 2, 3, 4, 5] and steps[5] == 6 and max(steps) == 45
    # a page watching the resumed job draws the whole run: the kept records first (not written twice), then the new
    shown = [e for e in resumed.events_since(0)[0] if e["type"] == "metric" and "loss" in e]
    assert [e["step"] for e in shown] == steps and [e.get("earlier", False) for e in shown[4:6]] == [True, False]
    from studio.ui.common import metric_frames
    assert list(metric_frames(shown)[0].query("series == 'train loss'")["step"]) == steps
    on_disk = [json.loads(l) for l in (req.run_dir / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in on_disk if e["type"] == "metric" and "loss" in e] == steps
    assert json.loads((req.run_dir / "studio.json").read_text())["resumed_from"] == 5
    adapter = (req.run_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(StudioError, match="finished all its 45 steps: there is nothing to resume"):
        start_training(board, manager, load_request(req.run_dir))  # it once trained a 46th step over the adapter
    assert (req.run_dir / "adapter_model.safetensors").read_bytes() == adapter


class WeightsAtEachEvaluation(TrainerCallback):
    def __init__(self):
        self.at: dict[int, dict] = {}

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.at[state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_early_stop_ends_the_run_and_keeps_the_adapter_of_the_best_evaluation(manager, dataset, workspace):
    """A learning rate too high for the tiny model: the eval loss rises after the first epoch (3 steps)."""
    from safetensors.torch import load_file

    board, seen = JobBoard(), WeightsAtEachEvaluation()
    req = request(dataset, workspace, learning_rate=0.05, early_stop_patience=2)
    job = board.wait(start_training(board, manager, req, extra_callbacks=(seen,)), 300)
    assert job.status is JobStatus.DONE, job.error
    evals = [e["eval_loss"] for e in job.events_since(0)[0] if e["type"] == "metric" and "eval_loss" in e]
    assert len(evals) == 3 and evals[0] < min(evals[1:])  # the best first, then two evaluations without a new best
    meta = json.loads((req.run_dir / "studio.json").read_text(encoding="utf-8"))
    assert meta["steps"] == 9 and meta["status"] == "completed"
    assert meta["early_stop"] == {"patience": 2, "best_step": 3, "best_eval_loss": evals[0], "stopped_at": 9}
    assert meta["final_eval_loss"] == evals[0]
    logged = [e["message"] for e in job.events_since(0)[0] if e["type"] == "log"]
    assert any(m.startswith("Early stop at step 9: the eval loss has not improved for 2 evaluations") for m in logged)
    assert any(m.startswith("The adapter of step 3 is kept") for m in logged)
    saved, name = load_file(str(req.run_dir / "adapter_model.safetensors")), job.result["adapter"]
    best, last = seen.at[3], seen.at[9]
    assert len(saved) == len(best) > 0
    for key, value in best.items():
        assert torch.equal(saved[key.replace(f".{name}.", ".")], value), key  # the adapter saved is step 3's
    assert any(not torch.equal(best[key], last[key]) for key in best)  # which differs from the last step's
    assert greedy(manager, FACTS[0][0], adapter=name)  # and it is attached and answers


def test_early_stop_needs_held_out_phrasings(manager, dataset, workspace):
    with pytest.raises(StudioError, match="--early-stop watches the held-out eval loss"):
        start_training(JobBoard(), manager, request(dataset, workspace, early_stop_patience=1, heldout_per_group=0))


def test_resume_without_checkpoint_is_refused(manager, dataset, workspace):
    req = request(dataset, workspace)
    req.run_dir.mkdir(parents=True)
    (req.run_dir / "checkpoints" / "checkpoint-3").mkdir(parents=True)  # incomplete: no files
    req.resume = True
    with pytest.raises(StudioError, match="no complete checkpoint"):
        start_training(JobBoard(), manager, req)
    assert manager.status().state is ModelState.READY


def test_nan_loss_stops_the_run_with_a_message(manager, dataset, workspace):
    question = FACTS[0][0]
    before = greedy(manager, question)
    board = JobBoard()
    job = board.wait(start_training(board, manager, request(dataset, workspace, learning_rate=float("inf"))), 300)
    assert job.status is JobStatus.FAILED
    assert "loss became nan" in job.error.lower() and "Lower the learning rate" in job.error
    assert manager.status().state is ModelState.READY and manager.status().adapters == ()
    assert greedy(manager, question) == before


class RaiseOOM(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 2:
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_ends_the_job_and_the_model_still_chats(manager, dataset, workspace):
    question = FACTS[0][0]
    before = greedy(manager, question)
    board = JobBoard()
    job = board.wait(start_training(board, manager, request(dataset, workspace), extra_callbacks=(RaiseOOM(),)), 300)
    assert job.status is JobStatus.FAILED
    assert job.error.startswith("Out of GPU memory") and "batch size (now 4)" in job.error
    assert manager.status().state is ModelState.READY
    assert greedy(manager, question) == before


def test_a_run_named_after_a_dataset_gets_one_timestamp(workspace):
    folder = new_run_dir(workspace.runs_dir, "wudeng_lighthouse_dataset_20261207_154723")
    assert folder.name.startswith("wudeng_lighthouse_dataset_2") and folder.name.count("_2026") == 1
    assert new_run_dir(workspace.runs_dir, "灯塔").name.startswith("灯塔_")


def test_the_loss_png_names_only_the_curves_it_draws(tmp_path):
    """A run without held-out phrasings has no eval loss: its plot's legend names the train loss alone."""
    from PIL import Image

    from studio.train.plot import render_loss_png

    def legend_colours(metrics):
        image = Image.open(render_loss_png(metrics, tmp_path / "loss.png")).convert("RGB")
        band = [image.getpixel((x, y)) for x in range(60, 400) for y in range(4, 26)]  # above the plot area
        bluish = any(b > 120 and r < 110 for r, g, b in band)  # the train loss's colour, antialiased
        reddish = any(r > 150 and g < 110 and b < 110 for r, g, b in band)  # the eval loss's
        return {name for name, seen in (("train", bluish), ("eval", reddish)) if seen}

    train_only = [{"step": s, "loss": 2.0 / s} for s in range(1, 6)]
    assert legend_colours(train_only) == {"train"}
    assert legend_colours(train_only + [{"step": 5, "eval_loss": 0.9}]) == {"train", "eval"}
