"""Starting, stopping and resuming training jobs; the run folder layout."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from studio.data.datasets import safe_name, timestamp, write_text_atomic
from studio.errors import StudioError
from studio.jobs import Job, JobBoard
from studio.model.manager import ModelManager
from studio.train.job import RunRequest, TrainingRun, last_complete_checkpoint
from studio.train.knowledge import prepare_request
from studio.train.settings import LoraSettings, TrainSettings

JOB_KIND = "train"
REQUEST_FILE = "run.json"


def new_run_dir(runs_dir: Path, name: str) -> Path:
    return Path(runs_dir) / f"{safe_name(name)}_{timestamp()}"


def _save_request(request: RunRequest) -> None:
    payload = {"dataset": str(request.dataset), "system_prompt": request.system_prompt,
               "lora": {**asdict(request.lora), "targets": list(request.lora.targets)},
               "train": asdict(request.train),
               "document": str(request.document) if request.document else None,
               "exam": str(request.exam) if request.exam else None}
    write_text_atomic(Path(request.run_dir) / REQUEST_FILE, json.dumps(payload, ensure_ascii=False, indent=2))


def load_request(run_dir: Path) -> RunRequest:
    path = Path(run_dir) / REQUEST_FILE
    if not path.is_file():
        raise StudioError(f"{run_dir} is not a studio run folder ({REQUEST_FILE} is missing).")
    data = json.loads(path.read_text(encoding="utf-8"))
    lora = LoraSettings(**{**data["lora"], "targets": tuple(data["lora"]["targets"])})
    return RunRequest(Path(data["dataset"]), data["system_prompt"], lora, TrainSettings(**data["train"]),
                      Path(run_dir), resume=True, document=_optional_path(data.get("document")),
                      exam=_optional_path(data.get("exam")))


def _optional_path(value) -> Path | None:
    return Path(value) if value else None


def start_training(board: JobBoard, manager: ModelManager, request: RunRequest, extra_callbacks: tuple = ()) -> Job:
    """Start a run (or resume one) as a job holding the model; refused at once while anything else holds it."""
    current = board.latest(JOB_KIND)
    if current is not None and current.running:
        raise StudioError(f"A training run is already going ({current.name}). Stop it or wait for it to finish.")
    if request.resume and last_complete_checkpoint(request.run_dir) is None:
        raise StudioError(f"{request.run_dir} has no complete checkpoint to resume from.")
    prepare_request(request)  # an exam is never trained on: refused as a dataset, found and recorded
    lease = manager.acquire(f"training {Path(request.run_dir).name}")
    try:
        Path(request.run_dir).mkdir(parents=True, exist_ok=True)
        if not request.resume:
            _save_request(request)
        run = TrainingRun(lease, request, extra_callbacks)
        return board.start(JOB_KIND, run.name, run.run, folder=Path(request.run_dir), on_exit=lambda job: lease.release())
    except Exception:
        lease.release()
        raise


def stop_training(board: JobBoard) -> bool:
    job = board.latest(JOB_KIND)
    if job is None or not job.running:
        return False
    job.cancel()
    return True


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders, newest first."""
    folders = [p for p in Path(runs_dir).glob("*") if (p / REQUEST_FILE).is_file()]
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)
