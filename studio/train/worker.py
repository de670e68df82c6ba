"""One data-parallel training process, started by `accelerate launch` (see studio.train.multigpu).

Every process loads the 4-bit base itself with the studio's loader, on its own device (`cuda:LOCAL_RANK`,
or the CPU with the gloo backend where no GPU is visible), adds the run's adapter and trains its share of
each optimizer step; the Trainer averages the adapter's gradients across processes. Process 0 does
everything that writes the run folder, exactly as the one-GPU job does: the split files, metrics.jsonl,
checkpoints, the adapter, studio.json and loss.png. It also writes the run's events (the same types
the one-GPU job emits) to `processes/events.jsonl`, which the studio's job relays by cursor.

Stop: the studio creates `processes/stop`. After each optimizer step process 0 looks for it and
broadcasts what it saw, so every process stops after the same step; process 0 then saves a checkpoint
and the adapter. A process that fails appends a `worker_error` event with its rank and message.

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ... -m studio.train.worker \\
        --run-dir RUN --model NAME --source FOLDER --quant 4bit --processes 2 [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from transformers import Trainer, TrainerCallback

from studio.train.trainer import StudioTrainer

PROCESS_DIR = "processes"  # inside the run folder: the processes' events, stop request and output
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop"


class WorkerEvents:
    """What a TrainingRun needs of a job (emit, log, cancelled), written to the relay file by process 0."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank = Path(path), rank
        self.stop_requested = False  # the same value on every process (StopSync)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _write(self, event: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:  # one short line per write: appends do not interleave
            handle.write(json.dumps(event, ensure_ascii=False) + "\n")

    def emit(self, type_: str, message: str = "", **data) -> dict:
        event = {"t": round(time.time(), 3), "type": type_, "message": message, **data}
        if self.is_main:
            self._write(event)
        return event

    def log(self, message: str) -> None:
        self.emit("log", message)

    def fail(self, message: str, trace: str) -> None:
        """Any process: record why it failed (its rank, its message, its trace)."""
        self._write({"t": round(time.time(), 3), "type": "worker_error", "rank": self.rank, "message": message,
                     "trace": trace[-6000:]})

    @property
    def cancelled(self) -> bool:
        return self.stop_requested

    def check_cancelled(self) -> None:
        from studio.jobs import JobCancelled

        if self.stop_requested:
            raise JobCancelled()


class StopSync(TrainerCallback):
    """After each optimizer step: process 0 looks for the stop file and every process learns its answer."""

    def __init__(self, events: WorkerEvents, stop_file: Path, device):
        self.events, self.stop_file, self.device = events, Path(stop_file), device

    def on_step_end(self, args, state, control, **kwargs):
        import torch
        from accelerate.utils import broadcast

        seen = 1 if (self.events.is_main and self.stop_file.exists()) else 0
        flag = broadcast(torch.tensor([seen], device=self.device), from_process=0)
        if int(flag.item()) and not self.events.stop_requested:
            self.events.stop_requested = True
            control.should_training_stop = True
            control.should_save = True  # a checkpoint at the stop step, so Resume continues from here
            self.events.log(f"Stop requested: stopping after step {state.global_step}.")


class DataParallelTrainer(StudioTrainer):
    """StudioTrainer whose checkpoints are staged by every process and renamed into place by process 0."""

    def _save_checkpoint(self, model, trial) -> None:
        real = Path(self.args.output_dir)
        staging = real / ".incomplete"
        if self.is_world_process_zero():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging)
        try:
            Trainer._save_checkpoint(self, model, trial)  # process 0: adapter, optimizer, state; each: its RNG
        finally:
            self.args.output_dir = str(real)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            self._place_checkpoint(real, staging)
        self.accelerator.wait_for_everyone()


def per_process(settings, processes: int):
    """The settings each process trains with: the same sequences per optimizer step, shared out."""
    from studio.train.multigpu import per_process_settings

    return per_process_settings(settings, processes)


def make_run_class():
    """TrainingRun for one process (imported late: it pulls in the model manager)."""
    from studio.train.job import TrainingRun, last_complete_checkpoint
    from studio.data.datasets import read_dataset

    class ProcessRun(TrainingRun):
        state = None  # accelerate's PartialState
        processes = 1
        sequences_per_step = 0

        @property
        def is_main(self) -> bool:
            return self.state.is_main_process

        def _split(self, job):
            with self.state.main_process_first():
                if self.is_main:
                    return super()._split(job)
                heldout = self.run_dir / "heldout.jsonl"
                return (read_dataset(self.run_dir / "train_split.jsonl"),
                        read_dataset(heldout) if heldout.stat().st_size else [])

        def _resume_point(self, job):
            with self.state.main_process_first():
                if self.is_main:
                    return super()._resume_point(job)
                return last_complete_checkpoint(self.run_dir)

        def _train(self, job, model, train_set, eval_set, checkpoint) -> dict:
            from studio.train.collate import make_collator
            from studio.train.trainer import ProgressTracker, build_trainer

            collator = make_collator(self.request.train, self.loaded.tokenizer)
            tracker = ProgressTracker(self, job, collator)
            stop = StopSync(job, self.run_dir / PROCESS_DIR / STOP_FILE, self.state.device)
            trainer = build_trainer(model, self.request.train, self.loaded.device, self.run_dir / "checkpoints",
                                    self.name, train_set, eval_set, collator, (tracker, stop),
                                    trainer_class=DataParallelTrainer, ddp_find_unused_parameters=False)
            tracker.trainer = trainer
            trainer.seconds_before, trainer.session_started = self.previous_seconds, self.session_started
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            return tracker.outcome(trainer)

        def _finish(self, job, outcome, n_train, n_heldout, seconds, source) -> dict:
            if not self.is_main:
                return {}
            return super()._finish(job, outcome, n_train, n_heldout, seconds, source)

        def _metadata(self, outcome, n_train, n_heldout, seconds, status) -> dict:
            metadata = super()._metadata(outcome, n_train, n_heldout, seconds, status)
            metadata["processes"] = self.processes
            metadata["sequences_per_step"] = self.sequences_per_step
            return metadata

    return ProcessRun


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="studio.train.worker", description="one data-parallel training process")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--model", required=True, help="the base's name, as the studio shows it")
    parser.add_argument("--source", required=True, help="the local folder of the base (resolved by the studio)")
    parser.add_argument("--quant", default="4bit")
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import torch
    from accelerate import PartialState

    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    state = PartialState(cpu=not torch.cuda.is_available())  # before the Trainer makes one: gloo on the CPU
    events = WorkerEvents(run_dir / PROCESS_DIR / EVENTS_FILE, state.process_index)
    try:
        result = train(args, state, events)
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the studio's job
        from studio.jobs import JobCancelled

        if isinstance(exc, (JobCancelled, KeyboardInterrupt)):
            return 1
        events.fail(f"{exc.__class__.__name__}: {exc}" if not _is_studio_error(exc) else str(exc),
                    traceback.format_exc())
        return 1
    if events.is_main:
        events.emit("result", "", result=result)
    return 0


def _is_studio_error(exc: BaseException) -> bool:
    from studio.errors import StudioError

    return isinstance(exc, StudioError)


def train(args: argparse.Namespace, state, events: WorkerEvents) -> dict:
    import torch

    from studio.model import loading
    from studio.model.manager import LoadedModel
    from studio.train import service

    device = f"cuda:{state.local_process_index}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    spec = loading.ModelSpec(args.model, args.quant)
    events.log(f"{args.processes} processes: each loads {args.model} ({args.quant}) on its own device.")
    model, tokenizer, device = loading.load_model(spec, device, source=args.source)
    loaded = LoadedModel(spec, model, tokenizer, device)
    recorded = service.load_request(Path(args.run_dir))
    original = replace(recorded, resume=args.resume)
    if state.is_main_process:
        if args.resume:
            service.check_same_base(original, loaded)
        else:
            service._save_request(original, loaded)  # run.json with the base's fingerprint, as one GPU records it
    request = replace(original, train=per_process(original.train, args.processes))
    run = make_run_class()(SimpleNamespace(loaded=loaded), request)
    run.state, run.processes = state, args.processes
    run.sequences_per_step = original.train.batch_size * original.train.grad_accum
    if not state.is_main_process:
        run.metrics_path = Path(os.devnull)  # process 0 writes the run's metrics
    return run.run(events)


if __name__ == "__main__":
    sys.exit(main())
