"""Starting, stopping and resuming training jobs; the run folder layout."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

from studio.access import AccessPolicy
from studio.data.records import STAMP, read_dataset, safe_name, stamped, write_text_atomic
from studio.errors import DataError, StudioError
from studio.jobs import Job, JobBoard
from studio.model.manager import ModelManager
from studio.train.job import RunRequest, TrainingRun, last_complete_checkpoint
from studio.train import adapters
from studio.train.knowledge import prepare_request
from studio.train.settings import LoraSettings, TrainSettings
from studio.train.split import split_heldout

JOB_KIND = "train"
REQUEST_FILE = "run.json"


def new_run_dir(runs_dir: Path, name: str) -> Path:
    """A run folder's path that nothing has yet (made when the run starts): the name and a timestamp, the
    name's own timestamp dropped (a dataset's stem has one: 'island_dataset_20261207_154723' -> 'island_dataset_<now>')."""
    name = re.sub(rf"_{STAMP}$", "", safe_name(name)) or "run"
    return stamped(Path(runs_dir) / f"{name}_{{stamp}}", make=False)[0]


def _save_request(request: RunRequest, loaded=None) -> None:
    payload = {"dataset": str(request.dataset), "system_prompt": request.system_prompt,
               "lora": {**asdict(request.lora), "targets": list(request.lora.targets)},
               "train": asdict(request.train),
               "document": str(request.document) if request.document else None,
               "exam": str(request.exam) if request.exam else None}
    if loaded is not None:  # which base the run trains, so a resume on another base is refused clearly
        payload["base_model"] = loaded.spec.name_or_path
        payload["base_fingerprint"] = adapters.base_fingerprint(loaded.model)
    write_text_atomic(Path(request.run_dir) / REQUEST_FILE, json.dumps(payload, ensure_ascii=False, indent=2))


def load_request(run_dir: Path) -> RunRequest:
    path = Path(run_dir) / REQUEST_FILE
    if not path.is_file():
        raise StudioError(f"{run_dir} is not a studio run folder ({REQUEST_FILE} is missing).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        lora = LoraSettings(**{**data["lora"], "targets": tuple(data["lora"]["targets"])})
        return RunRequest(Path(data["dataset"]), data["system_prompt"], lora, TrainSettings(**data["train"]),
                          Path(run_dir), resume=True, document=_optional_path(data.get("document")),
                          exam=_optional_path(data.get("exam")))
    except (ValueError, KeyError, TypeError) as exc:
        raise StudioError(f"{path} is damaged ({exc.__class__.__name__}: {str(exc)[:120]}); this run cannot be "
                          "resumed. Start a new run on its dataset.") from None


def _optional_path(value) -> Path | None:
    return Path(value) if value else None


def settings_problems(request: RunRequest) -> list[str]:
    """What is wrong with a run's numbers, each with the CLI option that sets it."""
    t, lora = request.train, request.lora
    checks = (
        (t.max_steps == -1 or t.max_steps >= 1, f"--max-steps must be at least 1, not {t.max_steps} (leave it out to train by epochs)."),
        (t.max_steps != -1 or t.epochs > 0, f"--epochs must be more than 0, not {t.epochs:g}."),
        (t.learning_rate > 0, f"--lr must be more than 0, not {t.learning_rate:g}."),
        (t.batch_size >= 1, f"--batch-size must be at least 1, not {t.batch_size}."),
        (t.grad_accum >= 1, f"--grad-accum must be at least 1, not {t.grad_accum}."),
        (t.save_every >= 0, f"--save-every must be 0 (never) or more, not {t.save_every}."),
        (t.max_length >= 16, f"The max length must be at least 16 tokens, not {t.max_length}."),
        (t.heldout_per_group >= 0, f"Held-out phrasings per group cannot be negative ({t.heldout_per_group})."),
        (t.logging_steps >= 1, f"Log every N steps needs N of at least 1, not {t.logging_steps}."),
        (t.early_stop_patience >= 0, f"--early-stop must be 0 (off) or more evaluations, not {t.early_stop_patience}."),
        (not t.early_stop_patience or t.heldout_per_group >= 1,
         "--early-stop watches the held-out eval loss: keep at least 1 held-out phrasing per group."),
        (lora.r >= 1, f"--lora-r must be at least 1, not {lora.r}."),
        (bool(lora.targets), "--targets names no layer: give all, peft-default or a comma list such as q_proj,v_proj."),
    )
    return [message for ok, message in checks if not ok]


def validate_request(request: RunRequest) -> list[dict]:
    """Check the settings and (for a new run) the dataset before a model is used or a folder is made.

    Returns the dataset's rows ([] on resume); raises StudioError / DataError naming the problem."""
    problems = settings_problems(request)
    if problems:
        raise StudioError(" ".join(problems))
    if request.resume:
        return []
    run_dir = Path(request.run_dir)
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise StudioError(f"{run_dir} already exists and is not empty: a new run there would overwrite it. Choose "
                          f"a new folder, or continue that run with --resume {run_dir} (nothing was overwritten).")
    prepare_request(request)  # an exam is never trained on: refused as a dataset, found and recorded
    rows = read_dataset(request.dataset)
    train_rows, _ = split_heldout(rows, request.train.heldout_per_group, seed=request.train.seed)
    if not train_rows:
        raise DataError(f"{request.dataset} leaves no rows to train on after the held-out split "
                        f"({len(rows)} rows). Add rows or lower the held-out phrasings per group.")
    return rows


def check_same_base(request: RunRequest, loaded) -> None:
    """Refuse to resume a run on a base other than the one it was trained on, with one clear message."""
    recorded = {}
    try:
        recorded = json.loads((Path(request.run_dir) / REQUEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    expected = recorded.get("base_fingerprint") or adapters.read_metadata(Path(request.run_dir)).get("base_fingerprint")
    actual = adapters.base_fingerprint(loaded.model)
    if expected and expected != actual:
        differences = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in adapters.FINGERPRINT_KEYS
                                if expected.get(k) != actual.get(k))
        base = recorded.get("base_model", "its base model")
        raise StudioError(f"{Path(request.run_dir).name} was trained on another base ({base}): {differences}. "
                          f"Load that base (--model {base}) and resume again.")


def check_can_start(board: JobBoard, request: RunRequest) -> None:
    """Refuse a run while another trains, a resume without a checkpoint, and bad settings or data."""
    current = board.latest(JOB_KIND)
    if current is not None and current.running:
        raise StudioError(f"A training run is already going ({current.name}). Stop it or wait for it to finish.")
    if request.resume:
        check_resumable(Path(request.run_dir))
    validate_request(request)


def check_resumable(run_dir: Path) -> None:
    """Refuse to resume a run without a checkpoint, or one that finished (resuming would train past its
    end and rewrite the adapter the owner kept); a stopped or killed run resumes."""
    if last_complete_checkpoint(run_dir) is None:
        raise StudioError(f"{run_dir} has no complete checkpoint to resume from.")
    try:
        metadata = adapters.read_metadata(run_dir)
    except StudioError:
        return  # a damaged studio.json: the run's own checkpoint decides
    if metadata.get("status") == "completed":
        raise StudioError(f"{run_dir.name} finished all its {metadata.get('steps', '?')} steps: there is nothing to "
                          "resume, and its adapter stays as it is. Start a new run to train more.")


def start_training(board: JobBoard, manager: ModelManager, request: RunRequest, extra_callbacks: tuple = (), *,
                   policy: AccessPolicy = AccessPolicy.full()) -> Job:
    """Start a run (or resume one) as a job holding the model; refused at once while anything else holds it."""
    policy.require("train")
    check_can_start(board, request)
    lease = manager.acquire(f"training {Path(request.run_dir).name}")
    try:
        if request.resume:
            check_same_base(request, lease.loaded)
        Path(request.run_dir).mkdir(parents=True, exist_ok=True)
        if not request.resume:
            _save_request(request, lease.loaded)
        run = TrainingRun(lease, request, extra_callbacks)
        return board.start(JOB_KIND, run.name, run.run, folder=Path(request.run_dir), on_exit=lambda job: lease.release())
    except Exception:
        lease.release()
        raise


def stop_training(board: JobBoard, *, policy: AccessPolicy = AccessPolicy.full()) -> bool:
    policy.require("train")
    job = board.latest(JOB_KIND)
    if job is None or not job.running:
        return False
    job.cancel()
    return True


def list_runs(runs_dir: Path) -> list[Path]:
    """Run folders, newest first."""
    folders = [p for p in Path(runs_dir).glob("*") if (p / REQUEST_FILE).is_file()]
    return sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)
