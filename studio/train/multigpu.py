"""Training on several GPUs of one machine: data-parallel processes through `accelerate launch`.

The studio's training job starts `accelerate launch --multi_gpu --num_processes N ... -m
studio.train.worker` as a subprocess in its own process group. Each worker process loads the 4-bit
base on its own GPU and trains its share of every optimizer step (studio.train.worker); process 0
writes the run folder as the one-GPU job does and its events to `processes/events.jsonl`, which this
job relays into its own event log by cursor, so the Train tab and the CLI show the same progress, plots
and log. Stop asks the processes to stop after the current step (process 0 saves a checkpoint and the
adapter), and ends the whole process group if they do not; a failed process ends the job with its error.

The job does not hold the in-process model's lease while the processes train: they train their own
copies, so the model in the studio stays free for chat. It takes the lease only at the end, for a
moment, to attach the new adapter (as the one-GPU job leaves it attached); if the model is busy then,
the adapter is saved and can be attached from the Chat tab.

The effective batch is kept: the sequences per optimizer step (batch size x grad accumulation) are
shared out among the processes (`per_process_settings`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from studio.access import AccessPolicy
from studio.errors import StudioError
from studio.jobs import Job, JobBoard, JobCancelled
from studio.train.worker import EVENTS_FILE, PROCESS_DIR, STOP_FILE

PROJECT_ROOT = Path(__file__).resolve().parents[2]
LAUNCH_LOG = "launch.log"  # the launcher's and the processes' own output, in processes/
SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "AUTH", "CREDENTIAL", "CREDENTIALS"}


def visible_gpu_count() -> int:
    """GPUs this process can see (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def sequences_per_step(settings) -> int:
    return settings.batch_size * settings.grad_accum


def per_process_settings(settings, processes: int):
    """`settings` for each of `processes`, with the same sequences per optimizer step in all.

    The grad accumulation is divided first (batch 1 x 8 on one GPU is batch 1 x 4 on each of two), else
    the batch size (8 x 1 is 4 x 1 on each of two); a step that cannot be shared out evenly is refused."""
    if processes <= 1:
        return settings
    if settings.grad_accum % processes == 0:
        return replace(settings, grad_accum=settings.grad_accum // processes)
    if settings.batch_size % processes == 0:
        return replace(settings, batch_size=settings.batch_size // processes)
    total = sequences_per_step(settings)
    raise StudioError(f"{total} sequences per optimizer step (batch size {settings.batch_size} x grad accumulation "
                      f"{settings.grad_accum}) cannot be shared evenly by {processes} GPUs. Make --grad-accum or "
                      f"--batch-size a multiple of {processes}.")


def describe_batch(settings, processes: int) -> str:
    each = per_process_settings(settings, processes)
    return (f"effective batch: {sequences_per_step(settings)} sequences per optimizer step = {processes} GPUs x "
            f"batch {each.batch_size} x grad accumulation {each.grad_accum}")


def check_gpu_count(processes: int, visible: int | None = None) -> None:
    visible = visible_gpu_count() if visible is None else visible
    if processes < 1:
        raise StudioError(f"--gpus must be at least 1, not {processes}.")
    if processes > visible:
        raise StudioError(f"--gpus {processes} asks for {processes} GPUs, but {visible} "
                          f"{'is' if visible == 1 else 'are'} visible here. Use --gpus {max(1, visible)} or fewer.")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(run_dir: Path, model: str, source: str, quant: str, processes: int, resume: bool = False,
                   port: int | None = None, python: str = sys.executable) -> list[str]:
    """`accelerate launch` of the worker module: one process per GPU, on this machine."""
    command = [python, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--machine_rank", "0", "--main_process_port", str(port or free_port()),
               "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "studio.train.worker", "--run-dir", str(run_dir), "--model", model, "--source", source,
               "--quant", quant, "--processes", str(processes)]
    return command + (["--resume"] if resume else [])


def is_secret_name(name: str) -> bool:
    """An environment variable that holds a key or password (OPENAI_API_KEY, HF_TOKEN, STUDIO_AUTH, ...)."""
    return any(part in SECRET_WORDS for part in name.upper().replace("-", "_").split("_"))


def worker_environment(processes: int, base: dict | None = None) -> dict:
    """The processes' environment: no keys or passwords, the first `processes` visible GPUs, offline hub."""
    base = dict(os.environ if base is None else base)
    env = {name: value for name, value in base.items() if not is_secret_name(name)}
    visible = [d.strip() for d in base.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[:processes] if visible else map(str, range(processes)))
    env["HF_HUB_OFFLINE"] = "1"  # the base was resolved to a local folder before the launch
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), base.get("PYTHONPATH", "")) if p)
    return env


class EventRelay:
    """Reads the processes' event file from a byte cursor; only complete lines are taken."""

    def __init__(self, path: Path):
        self.path, self.offset = Path(path), 0

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, "rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read()
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for line in chunk[:end].splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


class MultiGpuRun:
    """The job's target: launch the processes, relay their events, stop or fail them, attach the adapter."""

    def __init__(self, request, model: str, source: str, quant: str, processes: int, manager=None,
                 stop_grace_s: float = 120.0, poll_s: float = 0.2, env: dict | None = None):
        self.request, self.processes = request, processes
        self.run_dir = Path(request.run_dir)
        self.name = self.run_dir.name
        self.folder = self.run_dir / PROCESS_DIR
        self.command = launch_command(self.run_dir, model, source, quant, processes, resume=request.resume)
        self.env = worker_environment(processes, env)
        self.manager, self.stop_grace_s, self.poll_s = manager, stop_grace_s, poll_s
        self.process: subprocess.Popen | None = None
        self.result: dict | None = None
        self.errors: list[dict] = []
        self.training_started = False

    def start_processes(self) -> subprocess.Popen:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in (EVENTS_FILE, STOP_FILE):
            (self.folder / stale).unlink(missing_ok=True)
        log = open(self.folder / LAUNCH_LOG, "ab")
        try:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=str(PROJECT_ROOT), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True)  # its own process group: Stop reaches all
        finally:
            log.close()
        return self.process

    def run(self, job: Job) -> dict:
        job.log(f"Launching {self.processes} training processes: {describe_batch(self.request.train, self.processes)}.")
        process = self.start_processes()
        relay = EventRelay(self.folder / EVENTS_FILE)
        stop_deadline = None
        try:
            while True:
                self._relay(job, relay.read())
                if process.poll() is not None:
                    self._relay(job, relay.read())
                    break
                if job.cancelled and stop_deadline is None:
                    stop_deadline = self._request_stop(job)
                if stop_deadline is not None and time.time() > stop_deadline:
                    job.log(f"The processes did not stop within {self.stop_grace_s:.0f}s; ending them.")
                    self.kill_group()
                    stop_deadline = float("inf")
                time.sleep(self.poll_s)
        finally:
            self.kill_group()  # nothing of the run outlives the job
        return self._outcome(job, process.returncode)

    def _relay(self, job: Job, events: list[dict]) -> None:
        for event in events:
            kind = event.pop("type", "log")
            event.pop("t", None)
            message = event.pop("message", "")
            if kind == "result":
                self.result = event.get("result") or {}
            elif kind == "worker_error":
                self.errors.append({"rank": event.get("rank"), "message": message})
                job.emit("trace", f"process {event.get('rank')}:\n{event.get('trace', '')}")
            else:
                self.training_started = self.training_started or kind == "progress"
                job.emit(kind, message, **event)

    def _request_stop(self, job: Job) -> float:
        if not self.training_started:  # still loading: nothing to save yet
            job.log("Stop requested before the first step: ending the training processes.")
            self.kill_group()
            return float("inf")
        (self.folder / STOP_FILE).write_text("stop\n", encoding="utf-8")
        return time.time() + self.stop_grace_s

    def kill_group(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process of the launch's group, then SIGKILL to what is left."""
        if self.process is None:
            return
        group = self.process.pid  # the session leader's pid is the group id
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                break
            deadline = time.time() + wait
            while time.time() < deadline and _group_alive(group):
                self.process.poll()  # reap the launcher, so a finished group reads as gone
                time.sleep(0.1)
            if not _group_alive(group):
                break
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    def _outcome(self, job: Job, returncode: int | None) -> dict:
        if self.result and (self.result.get("status") or self.result.get("run_dir")):
            self._attach(job)
            return self.result
        if job.cancelled:
            raise JobCancelled()
        if self.errors:
            first = self.errors[0]
            raise StudioError(f"Training process {first['rank']} of {self.processes} failed: {first['message']}")
        raise StudioError(f"The training processes ended with exit code {returncode} and no result; "
                          f"see {self.folder / LAUNCH_LOG}: {self._log_tail()}")

    def _log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.folder / LAUNCH_LOG).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(line for line in text.strip().splitlines()[-lines:])

    def _attach(self, job: Job) -> None:
        """Attach the saved adapter to the studio's model, as the one-GPU job leaves it attached."""
        from studio.errors import ModelBusyError
        from studio.train import adapters

        if self.manager is None or self.manager.loaded_or_none() is None:
            return
        try:
            with self.manager.using(f"attaching {self.name}") as loaded:
                adapters.attach(loaded, self.run_dir, self.name)
            job.log(f"Adapter {self.name} is attached to the studio's model and ready to chat.")
        except ModelBusyError:
            job.log(f"The model is busy; attach {self.name} from the Chat tab.")
        except StudioError as exc:
            job.log(f"Adapter {self.name} is saved but was not attached: {exc}")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def start_multigpu_training(board: JobBoard, manager, request, processes: int, spec=None, *,
                            policy: AccessPolicy = AccessPolicy.full(), check_gpus: bool = True,
                            **run_options) -> Job:
    """Start (or resume) a run on `processes` GPUs as a job; the in-process model is not held meanwhile."""
    from studio.model import loading
    from studio.train.service import JOB_KIND, _save_request, check_can_start

    policy.require("train")
    if check_gpus:
        check_gpu_count(processes)
    check_can_start(board, request)
    per_process_settings(request.train, processes)  # refuses a step that cannot be shared out
    if spec is None:
        spec = manager.require_loaded().spec
    source = loading.check_source(spec)
    Path(request.run_dir).mkdir(parents=True, exist_ok=True)
    if not request.resume:
        _save_request(request)  # process 0 adds the base's fingerprint once it has loaded it
    run = MultiGpuRun(request, spec.name_or_path, source, spec.quant, processes, manager=manager, **run_options)
    return board.start(JOB_KIND, run.name, run.run, folder=Path(request.run_dir))
