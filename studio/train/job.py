"""The training job: QLoRA on the studio's one loaded 4-bit model, as the tutorial's section 4.1.

The job holds the model's lease for its whole run. It adds a LoRA adapter named after the run to the
shared model, trains it with the transformers Trainer (loss on the answer only), streams metrics to
the job's event log, and saves the adapter with its metadata. Whatever happens, the model is left
usable for chat: gradient checkpointing is switched off, the model is back in eval mode, and a failed
adapter is removed. The base weights are never touched (no up-casting of its layers), so the base
model's answers with the adapter disabled are the same before and after training.
"""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.records import read_dataset, write_jsonl_atomic, write_text_atomic
from studio.errors import DataError, StudioError
from studio.jobs import Job
from studio.logs import read_jsonl_log, rewrite_jsonl_log
from studio.model.manager import Lease, free_memory
from studio.train import adapters
from studio.train import knowledge
from studio.train.collate import make_collator
from studio.train.formatting import IGNORE, format_example
from studio.train.plot import render_loss_png
from studio.train.settings import LoraSettings, TrainSettings, settings_dict
from studio.train.split import split_heldout

CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors", "trainer_state.json", "optimizer.pt",
                    "scheduler.pt")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


PROGRESS_FILE = "studio_progress.json"  # in each checkpoint: the run's training time up to that step


def checkpoint_step(folder: Path) -> int:
    tail = folder.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, cut short or damaged), or None."""
    import zipfile

    for name in CHECKPOINT_FILES:
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    for name in ("trainer_state.json", "adapter_config.json"):
        try:
            state = json.loads((folder / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return f"{name} is damaged ({exc.__class__.__name__})"
        if name == "trainer_state.json" and state.get("global_step") != checkpoint_step(folder):
            return f"{name} says step {state.get('global_step')}, not {checkpoint_step(folder)}"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        path = folder / name
        if path.exists() and not zipfile.is_zipfile(path):
            return f"{name} is cut short or damaged"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
            weights.keys()
    except Exception as exc:
        return f"adapter_model.safetensors is damaged ({exc.__class__.__name__})"
    return None


def last_complete_checkpoint(run_dir: Path, on_skip=None) -> Path | None:
    """The newest checkpoint that can be resumed from; `on_skip(folder, why)` hears of each newer damaged one."""
    folder = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p) >= 0),
                        key=checkpoint_step, reverse=True)
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return candidate
        if on_skip is not None:
            on_skip(candidate, problem)
    return None


def set_aside(checkpoint: Path, why: str) -> Path:
    """Move a damaged checkpoint out of the trainer's way (kept, not deleted) as damaged-checkpoint-N."""
    target = checkpoint.with_name(f"damaged-{checkpoint.name}")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    checkpoint.rename(target)
    return target


def _event_step(event: dict) -> int:
    """The optimizer step an event reports (metrics and progress), 0 for the others."""
    if event.get("type") == "metric":
        return int(event.get("step", 0))
    if event.get("type") == "progress":
        return int(event.get("done", 0))
    return 0


def _previous_seconds(checkpoint: Path, run_dir: Path) -> float:
    """Training time before `checkpoint`'s step, over every earlier session of the run."""
    try:
        return float(json.loads((checkpoint / PROGRESS_FILE).read_text(encoding="utf-8"))["duration_s"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return float(adapters.read_metadata(run_dir).get("duration_s", 0.0))
    except (StudioError, ValueError, TypeError):
        return 0.0


@dataclass
class RunRequest:
    """What to train: the data, the prompt and the settings; `resume` continues a stopped run."""

    dataset: Path
    system_prompt: str
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    run_dir: Path | None = None
    resume: bool = False
    document: Path | None = None  # add this document's sections as training rows (studio.train.document_rows)
    exam: Path | None = None  # the exam kept out of training; found beside the dataset when not given


def tokenize_rows(tokenizer, rows: list[dict], system: str, max_length: int):
    """The rows as a `datasets.Dataset` of input_ids and labels, tokenised once with `map` as the tutorial
    does, and how many rows were cut at max_length. Rows whose answer was cut away entirely are dropped."""
    import datasets

    datasets.disable_progress_bars()  # the job's own log reports progress

    def encode(row: dict) -> dict:
        example = format_example(tokenizer, row["system"] or system, row["instruction"], row["output"], max_length)
        return {"input_ids": example.input_ids, "labels": example.labels, "truncated": example.truncated,
                "supervised": any(label != IGNORE for label in example.labels)}

    if not rows:
        return datasets.Dataset.from_dict({"input_ids": [], "labels": []}), 0
    table = datasets.Dataset.from_dict({"instruction": [row["instruction"] for row in rows],
                                        "output": [row["output"] for row in rows],
                                        "system": [row.get("system") or "" for row in rows]})
    encoded = table.map(encode, remove_columns=table.column_names)
    truncated = sum(encoded["truncated"])
    kept = encoded.filter(lambda example: example["supervised"])
    return kept.remove_columns(["truncated", "supervised"]), truncated


def add_trainable_adapter(model, name: str, lora: LoraSettings, seed: int):
    """Add (or re-create) the adapter `name` on `model` and make it the only trainable one."""
    import torch
    from peft import PeftModel, get_peft_model

    torch.manual_seed(seed)  # the same seed gives the same initial adapter, run after run
    if isinstance(model, PeftModel):
        if name in model.peft_config:
            model.delete_adapter(name)
        model.add_adapter(name, lora.to_peft())
    else:
        model = get_peft_model(model, lora.to_peft(), adapter_name=name)
    model.set_adapter(name)
    return model


class TrainingRun:
    """One training run on the leased model; `run(job)` is the job's target."""

    def __init__(self, lease: Lease, request: RunRequest, extra_callbacks: tuple = ()):
        self.lease, self.request = lease, request
        self.loaded = lease.loaded
        self.run_dir = Path(request.run_dir)
        self.name = self.run_dir.name
        self.extra_callbacks = extra_callbacks
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.previous_seconds = 0.0  # training time of earlier sessions of this run, up to the resumed checkpoint
        self.session_started = time.time()

    # ----- data --------------------------------------------------------------------------------
    def _split(self, job: Job) -> tuple[list[dict], list[dict]]:
        heldout_path = self.run_dir / "heldout.jsonl"
        train_path = self.run_dir / "train_split.jsonl"
        if self.request.resume and heldout_path.exists() and train_path.exists():
            return read_dataset(train_path), read_dataset(heldout_path) if heldout_path.stat().st_size else []
        rows = knowledge.training_rows(self.request, read_dataset(self.request.dataset), job.log)
        settings = self.request.train
        train_rows, heldout = split_heldout(rows, settings.heldout_per_group, seed=settings.seed)
        train_rows = knowledge.with_document_rows(self.request, train_rows, job.log)
        if not train_rows:
            raise DataError(f"{self.request.dataset} leaves no rows to train on after the held-out split.")
        write_jsonl_atomic(train_path, train_rows)
        write_jsonl_atomic(heldout_path, heldout)
        job.log(f"{len(rows)} rows: {len(train_rows)} for training, {len(heldout)} held out "
                f"({settings.heldout_per_group} phrasing per group of 4+).")
        return train_rows, heldout

    # ----- the adapter on the shared model -----------------------------------------------------
    def _attach_trainable_adapter(self) -> object:
        model = add_trainable_adapter(self.loaded.model, self.name, self.request.lora, self.request.train.seed)
        self.loaded.model = model
        return model

    def _remove_adapter(self) -> None:
        adapters.detach(self.loaded, self.name)

    # ----- the run -----------------------------------------------------------------------------
    def run(self, job: Job) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        train_rows, heldout_rows = self._split(job)
        tokenizer = self.loaded.tokenizer
        settings = self.request.train
        train_set, truncated = tokenize_rows(tokenizer, train_rows, self.request.system_prompt, settings.max_length)
        eval_set, _ = tokenize_rows(tokenizer, heldout_rows, self.request.system_prompt, settings.max_length)
        if truncated:
            job.log(f"{truncated} training rows were longer than {settings.max_length} tokens and were cut.")
        checkpoint = self._resume_point(job) if self.request.resume else None
        model = self._attach_trainable_adapter()
        started = self.session_started = time.time()
        failure = None
        try:
            outcome = self._train(job, model, train_set, eval_set, checkpoint)
        except Exception as exc:
            failure = self._explain(exc)
            if not isinstance(exc, StudioError) and not self._is_oom(exc):
                job.emit("trace", "".join(traceback.format_exception(exc)))
            traceback.clear_frames(exc.__traceback__)  # the frames hold the trainer, its optimizer and activations
            del exc
        if failure is not None:  # out of the except block: nothing refers to the trainer any more
            self._remove_adapter()
            self._back_to_inference(self.loaded.model)
            raise failure
        self._back_to_inference(self.loaded.model)
        if outcome["nan_step"] is not None:
            self._remove_adapter()
            raise StudioError(f"Training stopped: the loss became {outcome['nan_value']} at step {outcome['nan_step']}. "
                              f"Lower the learning rate (it was {settings.learning_rate:g}) and train again.")
        source = train_rows[0].get("source")  # the builder keeps its document on every row (for retrieval)
        return self._finish(job, outcome, len(train_rows), len(heldout_rows), time.time() - started, source)

    def _resume_point(self, job: Job) -> Path:
        """The checkpoint to continue from, with the logs cut back to its step and damaged ones set aside."""
        def skip(folder: Path, why: str) -> None:
            moved = set_aside(folder, why)
            job.log(f"{folder.name} cannot be resumed from ({why}); it was moved to {moved.name} and the "
                    "checkpoint before it is used.")

        checkpoint = last_complete_checkpoint(self.run_dir, on_skip=skip)
        if checkpoint is None:
            raise StudioError(f"{self.run_dir} has no complete checkpoint to resume from.")
        step = checkpoint_step(checkpoint)
        dropped, note = rewrite_jsonl_log(self.metrics_path, lambda m: m.get("step", 0) <= step)
        if note:
            job.log(note)
        events_dropped, note = rewrite_jsonl_log(self.run_dir / "events.jsonl", lambda e: _event_step(e) <= step)
        if note:
            job.log(note)
        if dropped or events_dropped:
            job.log(f"Resuming from {checkpoint.name}: {dropped} metric records after step {step} were removed; "
                    "those steps are trained again.")
        earlier, _ = read_jsonl_log(self.metrics_path)
        job.replay([{"type": "metric", "earlier": True, **record} for record in earlier])  # the curves go on
        self.previous_seconds = _previous_seconds(checkpoint, self.run_dir)
        return checkpoint

    def _train(self, job: Job, model, train_set, eval_set, checkpoint) -> dict:
        from studio.train.trainer import ProgressTracker, build_trainer

        collator = make_collator(self.request.train, self.loaded.tokenizer)
        tracker = ProgressTracker(self, job, collator)
        early = self._early_stop(job, eval_set)
        callbacks = (tracker, *((early,) if early else ()), *self.extra_callbacks)
        trainer = build_trainer(model, self.request.train, self.loaded.device, self.run_dir / "checkpoints", self.name,
                                train_set, eval_set, collator, callbacks)
        tracker.trainer = trainer
        trainer.seconds_before, trainer.session_started = self.previous_seconds, self.session_started
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        outcome = tracker.outcome(trainer)
        if early is not None:
            if early.restore_best():
                outcome["eval_loss"] = early.best_loss  # the kept adapter's
            outcome["early_stop"] = early.summary()
        return outcome

    def _early_stop(self, job: Job, eval_set):
        """The early stop the settings ask for, or None (off, or no held-out rows to measure)."""
        from studio.train.early_stop import EarlyStop

        patience = self.request.train.early_stop_patience
        if not patience:
            return None
        if not len(eval_set):
            job.log("Early stop is off for this run: no held-out rows to measure the eval loss on (groups of 4+ "
                    "phrasings give one).")
            return None
        return EarlyStop(job, patience)

    def _back_to_inference(self, model) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(base, "is_gradient_checkpointing", False):
            base.gradient_checkpointing_disable()
        base.config.use_cache = True
        model.eval()
        free_memory()

    @staticmethod
    def _is_oom(exc: Exception) -> bool:
        import torch

        return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()

    def _explain(self, exc: Exception) -> Exception:
        if self._is_oom(exc):
            s = self.request.train
            return StudioError(
                "Out of GPU memory during training. Lower the batch size (now "
                f"{s.batch_size}), the max length (now {s.max_length}) or the LoRA rank (now {self.request.lora.r}), "
                "or turn gradient checkpointing on. The model was kept and still chats.")
        if isinstance(exc, StudioError):
            return exc
        return StudioError(f"Training failed: {exc.__class__.__name__}: {exc}")

    # ----- results -----------------------------------------------------------------------------
    def _finish(self, job: Job, outcome: dict, n_train: int, n_heldout: int, seconds: float,
                source: str | None) -> dict:
        model = self.loaded.model
        adapters.save_adapter(model, self.name, self.run_dir)
        metrics, note = read_jsonl_log(self.metrics_path)
        if note:
            job.log(note)
        render_loss_png(metrics, self.run_dir / "loss.png")
        status = f"stopped at step {outcome['step']}" if job.cancelled else "completed"
        metadata = self._metadata(outcome, n_train, n_heldout, seconds, status)
        metadata["source_document"] = source
        metadata.update(knowledge.knowledge_metadata(self.request, self.run_dir, source))
        write_text_atomic(self.run_dir / adapters.METADATA_FILE, json.dumps(metadata, ensure_ascii=False, indent=2))
        self.loaded.adapters[self.name] = str(self.run_dir)
        job.log(f"Adapter {self.name} saved to {self.run_dir} ({status}); it is attached and ready to chat.")
        return {"run_dir": str(self.run_dir), "adapter": self.name, "status": status,
                "final_train_loss": metadata["final_train_loss"], "final_eval_loss": metadata["final_eval_loss"],
                "steps": outcome["step"], "max_steps": outcome["max_steps"]}

    def _metadata(self, outcome: dict, n_train: int, n_heldout: int, seconds: float, status: str) -> dict:
        from studio.model.card import parameter_counts

        request = self.request
        trainable = sum(p.numel() for n, p in self.loaded.model.named_parameters() if f".{self.name}." in n)
        return {
            "name": self.name,
            "status": status,
            "base_model": self.loaded.spec.name_or_path,
            "base_quant": self.loaded.spec.quant,
            "base_fingerprint": adapters.base_fingerprint(self.loaded.model),
            "dataset": str(request.dataset),
            "dataset_sha256": file_sha256(Path(request.dataset)) if Path(request.dataset).is_file() else None,
            "split": {"train_rows": n_train, "heldout_rows": n_heldout, "heldout_file": "heldout.jsonl",
                      "train_file": "train_split.jsonl", "heldout_per_group": request.train.heldout_per_group},
            "system_prompt": request.system_prompt,
            **settings_dict(request.lora, request.train),
            "trainable_params": trainable,
            "total_params": parameter_counts(self.loaded.model)[0],
            "steps": outcome["step"],
            "max_steps": outcome["max_steps"],
            "final_train_loss": outcome["train_loss"],
            "final_eval_loss": outcome["eval_loss"],
            "duration_s": round(seconds + self.previous_seconds, 2),
            "tokens_per_s": outcome["tokens_per_s"],
            "resumed_from": outcome.get("resumed_from"),
            "early_stop": outcome.get("early_stop"),
            "device": self.loaded.device,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
