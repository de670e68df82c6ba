"""The transformers Trainer, adapted to a named adapter on a shared model, and a progress tracker.

Checkpoints hold only this run's adapter (flat files, not every adapter on the model), plus the
optimizer, scheduler, RNG and trainer state, so Resume continues the same run exactly.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from studio.data.records import fsync_folder
from studio.model.attention import packed_row_attention, without_cudnn_attention
from studio.train import adapters


@contextmanager
def lean_model_calls(model, active: bool = True) -> Iterator[None]:
    """For the block (a training run), `model.parameters()` answers from a list made once, and
    `model.train(mode)` returns at once when the model is already in that mode through an earlier call
    of its own. The Trainer calls `train()` at every step and `parameters()` in gradient clipping and
    `zero_grad`, and each walks every module of the model: on a 7B with an adapter, about 3,000
    modules, tens of milliseconds a step of host time (bench/results/graphs_probe-flce-h200-2026-11-30.json,
    its profile). No parameter
    is added or removed while training."""
    if not active:
        yield
        return
    listed = list(model.parameters())
    own_train = model.train
    mode_set: list = [None]  # the mode the last full `train()` call set

    def parameters(recurse: bool = True):
        return iter(listed) if recurse else type(model).parameters(model, recurse)

    def train(mode: bool = True):
        if mode_set[0] == mode and model.training == mode:
            return model
        result = own_train(mode)
        mode_set[0] = mode
        return result

    saved = {name: model.__dict__[name] for name in ("parameters", "train") if name in model.__dict__}
    model.parameters, model.train = parameters, train
    try:
        yield
    finally:
        for name in ("parameters", "train"):
            model.__dict__.pop(name, None)
        model.__dict__.update(saved)


class StudioTrainer(Trainer):
    """A Trainer that saves and restores one named adapter, keeps eval time out of tokens/s, trains
    without cuDNN attention (see `without_cudnn_attention`), packed rows each attending to itself alone
    (`packed_row_attention`), with the settings' speed switches (`studio.train.speedups`) and its packed
    passes (forward, loss and backward) replayed from CUDA graphs (`studio.train.graphs`), all undone
    when training ends.

    It overrides three private Trainer methods: `_save` and `_load_from_checkpoint`, because the model
    is shared and may carry several adapters and the Trainer has no public hook for what a checkpoint
    holds (these save and restore only this run's adapter), and `_save_checkpoint`, which stages each
    checkpoint and renames it into place (README, Performance, Training)."""

    adapter_name: str = "default"
    eval_seconds: float = 0.0
    avoid_cudnn_attention: bool = True
    # each LoRA layer computes the trained adapter alone (studio.train.speedups.only_trained_adapter);
    # False: peft's own forward, as the tutorial's code runs it (bench/train_speed.py's tutorial row)
    route_trained_adapter: bool = True
    # packed passes attend to each row alone through varlen_attn on a GPU (studio.model.attention);
    # False: SDPA with the block mask (bench/train_speed.py --varlen-ab)
    packed_varlen: bool = True
    # replaces studio.train.graphs.CudaRecorder for `cuda_graphs` (the CPU tests pass one that re-runs the work)
    graph_recorder = None
    # the model's parameters listed once and `train()` skipped when nothing changes (`lean_model_calls`),
    # and the flops estimate's parameter count taken once; False: the Trainer as the tutorial runs it
    lean_steps: bool = True
    flops_per_token: int | None = None
    graphed = None  # the run's StepGraphs (its captures and replays), when CUDA graphs were on
    dropout_seeds = None  # the LoRA dropout's seed per pass, in graphed runs (studio.model.lora_dropout)
    speed_settings = None  # the run's TrainSettings (its speed switches)
    speedup_notes: list[str] = []

    def train(self, *args, **kwargs):
        from studio.model.attention import sdpa_configs, varlen_kernel
        from studio.train.graphs import checkpointing_problem, graph_problem, graphed_steps
        from studio.train.speedups import (chunked_loss, only_trained_adapter, redrawn_dropout, redraws_dropout,
                                           training_speedups)

        settings = self.speed_settings
        packed = bool(getattr(settings, "packing", False))
        # not with compiled layers: measured eagerly only
        compiled = bool(getattr(settings, "compile_layers", False))
        varlen = packed and self.packed_varlen and not compiled
        # the same checks `graphed_steps` makes, so Liger's fused loss is dropped only where graphs will run
        varlen_possible = varlen and varlen_kernel() is not None and bool(sdpa_configs(self.model))
        self.flops_per_token = None
        with ExitStack() as stack:
            stack.enter_context(without_cudnn_attention(self.avoid_cudnn_attention))
            stack.enter_context(lean_model_calls(self.model, self.lean_steps))
            stack.enter_context(only_trained_adapter(self.model, self.adapter_name, self.route_trained_adapter))
            graphs = bool(getattr(settings, "cuda_graphs", False)) and not (graph_problem(
                settings, str(self.args.device), varlen_possible, self.model,
                device_checks=self.graph_recorder is None) or checkpointing_problem(settings, self.model))
            self.dropout_seeds = stack.enter_context(redrawn_dropout(self.model, self.adapter_name,
                                                                     redraws_dropout(settings, graphs)))
            # a checkpointed layer of a graphed run redraws its dropout mask: no generator state to replay
            self._checkpoint_arguments(use_reentrant=False, preserve_rng_state=not graphs)
            notes = stack.enter_context(training_speedups(self.model, settings, fused_loss=not graphs))
            stack.enter_context(chunked_loss(self.model, notes, graphs))
            varlen_on = stack.enter_context(packed_row_attention(self.model, varlen, notes))
            self.graphed = stack.enter_context(graphed_steps(
                self.model, settings, str(self.args.device), self.data_collator, varlen_on, notes,
                recorder=self.graph_recorder, compute_dtype=self._compute_dtype(),
                lengths=self._row_lengths() if graphs else None))  # the rows read only for graphed runs
            self.speedup_notes = notes
            return super().train(*args, **kwargs)

    def _checkpoint_arguments(self, **arguments) -> None:
        """What the Trainer passes to PyTorch's checkpoint when it switches checkpointing on at the start of
        `train()`: transformers 5.24 reads `activation_checkpointing_kwargs`, earlier 5.x releases
        `gradient_checkpointing_kwargs` (the later name's deprecated alias)."""
        for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
            if hasattr(self.args, name):
                setattr(self.args, name, dict(arguments))

    def _row_lengths(self) -> list[int]:
        """Token counts of the training rows (a `datasets.Dataset` or a list of tokenised rows)."""
        rows = self.train_dataset
        if rows is None:
            return []
        if hasattr(rows, "column_names") and "input_ids" in rows.column_names:
            return [len(ids) for ids in rows["input_ids"]]
        return [len(row["input_ids"]) for row in rows]

    def _compute_dtype(self):
        import torch

        return torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else torch.float32

    def training_step(self, model, inputs, num_items_in_batch=None):
        """The Trainer's step, replayed from a CUDA graph where the run has them (`studio.train.graphs`)."""
        if self.graphed is None:
            return self._pass(model, inputs, num_items_in_batch)
        self.graphed.remaining = max(0, self.state.max_steps - self.state.global_step - 1)  # one pass a step
        return self.graphed.step(inputs, num_items_in_batch, lambda batch, items: self._pass(model, batch, items))

    def _pass(self, model, inputs, num_items_in_batch):
        """One training pass (eager, or recorded into a graph): a new seed for the redrawn dropout first."""
        if self.dropout_seeds is not None:
            self.dropout_seeds.refresh()
        return Trainer.training_step(self, model, inputs, num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's estimate (6 x tokens x parameters), with the parameter count taken once per run:
        the Trainer's own counts the model's parameters again at every step (with `lean_steps`)."""
        if not self.lean_steps or not hasattr(self.model, "num_parameters") or "input_ids" not in inputs:
            return super().floating_point_ops(inputs)
        if self.flops_per_token is None:
            self.flops_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
        return inputs["input_ids"].numel() * self.flops_per_token

    keep_checkpoints: int = 2
    seconds_before: float = 0.0  # training time of earlier sessions of this run
    session_started: float = 0.0

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a staging folder, then rename it into place: a kill mid-save leaves
        no half-written checkpoint-N behind, only the staging folder, which the next save replaces."""
        real = Path(self.args.output_dir)
        staging = real / ".incomplete"
        shutil.rmtree(staging, ignore_errors=True)
        self.args.output_dir = str(staging)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = str(real)
        name = f"checkpoint-{self.state.global_step}"
        progress = {"step": self.state.global_step,
                    "duration_s": round(self.seconds_before + time.time() - (self.session_started or time.time()), 2)}
        (staging / name / "studio_progress.json").write_text(json.dumps(progress), encoding="utf-8")
        fsync_folder(staging / name)
        if (real / name).exists():
            shutil.rmtree(real / name)
        os.replace(staging / name, real / name)
        shutil.rmtree(staging, ignore_errors=True)
        self._remove_old_checkpoints(real)

    def _remove_old_checkpoints(self, folder: Path) -> None:
        steps = sorted((p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))
        for old in steps[:-self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        adapters.save_adapter(self.model, self.adapter_name, Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        try:
            adapters.load_adapter_weights(model or self.model, self.adapter_name, Path(resume_from_checkpoint))
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            from studio.errors import AdapterError

            count = str(exc).count("size mismatch")
            raise AdapterError(f"{Path(resume_from_checkpoint).name} was trained on a base of another shape "
                               f"({count} adapter weights do not fit the loaded model). Load the base the run was "
                               "trained on and resume again.") from None

    def evaluate(self, *args, **kwargs):
        started = time.time()
        self.data_collator.counting = False
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.data_collator.counting = True
            self.eval_seconds += time.time() - started


class ProgressTracker(TrainerCallback):
    """Streams step, loss, eval loss, learning rate and tokens/s to the job; stops on Stop and on NaN."""

    def __init__(self, run, job, collator):
        self.run, self.job, self.collator = run, job, collator
        self.trainer: StudioTrainer | None = None
        self.started = time.time()
        self.start_step = 0
        self.train_loss = self.eval_loss = None
        self.nan_step = self.nan_value = None
        self.tokens_per_s = 0.0

    def _train_seconds(self) -> float:
        return max(1e-6, time.time() - self.started - (self.trainer.eval_seconds if self.trainer else 0.0))

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.start_step = time.time(), state.global_step
        self.collator.tokens_seen = 0
        resumed = f", resumed at step {state.global_step}" if state.global_step else ""
        self.job.log(f"Training {self.run.name}: {state.max_steps} optimizer steps{resumed}.")
        self._say_new_notes()

    def _say_new_notes(self) -> None:
        """The speed switches' notes not yet in the job's log (a switch may add one mid-run, e.g. when
        compiling fails and the layers go back to eager)."""
        notes = self.trainer.speedup_notes if self.trainer else []
        for note in notes[self._notes_said:]:
            self.job.log(note)
        self._notes_said = len(notes)

    _notes_said = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._say_new_notes()
        logs = logs or {}
        if "train_runtime" in logs:
            return
        self.tokens_per_s = self.collator.tokens_seen / self._train_seconds()
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4),
                  "elapsed_s": round(time.time() - self.started, 2), "tokens_per_s": round(self.tokens_per_s, 1)}
        for key in ("loss", "eval_loss", "learning_rate", "grad_norm"):
            if key in logs:
                record[key] = float(logs[key])
        if "loss" in record:
            self.train_loss = record["loss"]
        bad = [record[k] for k in ("loss", "eval_loss") if k in record and not math.isfinite(record[k])]
        if bad and self.nan_step is None:
            self.nan_step, self.nan_value = state.global_step, bad[0]
            control.should_training_stop = True
        if "eval_loss" in record:
            self.eval_loss = record["eval_loss"]
        with open(self.run.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.job.emit("metric", "", **record)

    def on_step_end(self, args, state, control, **kwargs):
        done, total = state.global_step, state.max_steps
        elapsed = time.time() - self.started
        steps_here = max(1, done - self.start_step)
        eta = elapsed / steps_here * (total - done)
        self.job.emit("progress", f"step {done}/{total} · epoch {state.epoch or 0:.2f} · {elapsed:.0f}s elapsed · "
                                  f"ETA {eta:.0f}s · {self.tokens_per_s:.0f} tokens/s",
                      done=done, total=total, epoch=state.epoch, elapsed=elapsed, eta=eta)
        if self.job.cancelled:
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at the stop step, so Resume continues from here
            self.job.log(f"Stop requested: stopping after step {done}.")

    def outcome(self, trainer) -> dict:
        state = trainer.state
        return {"step": state.global_step, "max_steps": state.max_steps, "train_loss": self.train_loss,
                "eval_loss": self.eval_loss, "tokens_per_s": round(self.tokens_per_s, 1),
                "nan_step": self.nan_step, "nan_value": self.nan_value,
                "resumed_from": self.start_step or None}


def precision_flags(precision: str, device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {"bf16": False, "fp16": False, "use_cpu": True}
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def build_trainer(model, s, device: str, output_dir: Path, adapter_name: str, train_set, eval_set, collator,
                  callbacks=()) -> StudioTrainer:
    """A StudioTrainer for `model` with settings `s` (a TrainSettings); used by the job and the benches."""
    collator.counting = True
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=s.batch_size,
        per_device_eval_batch_size=s.batch_size,
        gradient_accumulation_steps=s.grad_accum,
        learning_rate=s.learning_rate,
        num_train_epochs=s.epochs,
        max_steps=s.max_steps,
        lr_scheduler_type=s.scheduler,
        warmup_steps=s.warmup_ratio,
        logging_steps=s.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss must be seen, not averaged away
        optim="adamw_torch",
        seed=s.seed,
        data_seed=s.seed,
        save_strategy="steps" if s.save_every else "no",
        save_steps=s.save_every or 500,
        save_total_limit=2,
        eval_strategy="epoch" if eval_set else "no",
        report_to=[],
        remove_unused_columns=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        gradient_checkpointing=s.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **precision_flags(s.precision, device),
    )
    model.config.use_cache = False
    trainer = StudioTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set or None,
                            data_collator=collator)
    trainer.adapter_name = adapter_name
    trainer.speed_settings = s
    if s.gradient_checkpointing and s.checkpoint_fraction < 1.0:
        from studio.train.speedups import PartialCheckpointing

        trainer.add_callback(PartialCheckpointing(s.checkpoint_fraction))
    trainer.remove_callback(PrinterCallback)  # progress goes to the job's event log, not stdout
    trainer.remove_callback(ProgressCallback)
    for callback in callbacks:
        trainer.add_callback(callback)
    return trainer
