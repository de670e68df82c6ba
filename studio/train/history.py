"""The runs history: one record per run folder under runs/, and renaming or deleting a run.

Everything comes from the folders themselves, so the table is right after a restart and for runs
made by the CLI: `run.json` (what was asked), `studio.json` (the saved adapter: base, dataset, losses,
status), `events.jsonl` (the job's log, for runs that failed or never finished) and
`reports/report_*.json` (scored reports, the newest summarised). Runs are named by their folder
name, never by a path, and resolved inside runs/ only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from studio.data.records import safe_name, write_text_atomic
from studio.errors import StudioError
from studio.train.adapters import METADATA_FILE, read_metadata

REQUEST_FILE = "run.json"
EVENTS_FILE = "events.jsonl"
STATUSES = ("running", "done", "stopped", "failed", "incomplete")


@dataclass
class RunRecord:
    """One row of the history. `status` is one of STATUSES; losses and report may be missing."""

    name: str
    folder: str
    date: str
    base_model: str = ""
    dataset: str = ""
    heldout: int | None = None  # held-out phrasings of trained facts (the split)
    exam: int | None = None  # exam questions, never trained on (from the dataset build)
    setting_parts: list = field(default_factory=list)  # (SETTING_TEXTS key, values): rank, lr, length, batch
    train_loss: float | None = None
    eval_loss: float | None = None
    status: str = "incomplete"
    report: dict = field(default_factory=dict)  # tuned/base character F1, improved, worse, questions

    @property
    def settings(self) -> str:
        """The settings as one English line ("r 16 · lr 0.001 · 4 ep · batch 1×8")."""
        return describe_settings(self.setting_parts)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def is_run_folder(folder: Path) -> bool:
    return folder.is_dir() and ((folder / REQUEST_FILE).is_file() or (folder / METADATA_FILE).is_file())


def _last_job_status(folder: Path) -> str | None:
    """The status of the job's last status event ('failed', 'done', 'running', ...), if it logged any."""
    path = folder / EVENTS_FILE
    if not path.is_file():
        return None
    status = None
    with open(path, encoding="utf-8") as events:
        for line in events:
            if '"status"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("type") == "status":
                status = event.get("status", status)
    return status


def run_status(folder: Path, metadata: dict, running: bool = False) -> str:
    """running (its job is going), done, stopped (Stop saved the adapter), failed, or incomplete."""
    if running:
        return "running"
    saved = str(metadata.get("status", ""))
    if saved == "completed":
        return "done"
    if saved.startswith("stopped"):
        return "stopped"
    return "failed" if _last_job_status(folder) == "failed" else "incomplete"


SETTING_TEXTS = {"rank": "r {r}", "lr": "lr {lr}", "steps": "{steps} steps", "epochs": "{epochs} ep",
                 "batch": "batch {size}×{accum}"}  # the page shows them in its language (the history table's set_*)


def setting_parts(request: dict, metadata: dict) -> list[tuple[str, dict]]:
    """The settings that decide a run, each as (SETTING_TEXTS key, its values): rank, learning rate, length,
    batch."""
    lora = request.get("lora") or metadata.get("lora") or {}
    train = request.get("train") or metadata.get("training") or {}
    parts = [("rank", {"r": lora["r"]})] if "r" in lora else []
    if isinstance(train.get("learning_rate"), (int, float)):
        parts.append(("lr", {"lr": f"{train['learning_rate']:g}"}))
    steps, epochs = train.get("max_steps"), train.get("epochs")
    if isinstance(steps, int) and steps > 0:
        parts.append(("steps", {"steps": steps}))
    elif isinstance(epochs, (int, float)):
        parts.append(("epochs", {"epochs": f"{epochs:g}"}))
    if "batch_size" in train:
        parts.append(("batch", {"size": train["batch_size"], "accum": train.get("grad_accum", 1)}))
    return parts


def describe_settings(parts: list[tuple[str, dict]], texts: dict[str, str] = SETTING_TEXTS) -> str:
    """The settings as one short line, e.g. "r 16 · lr 0.0002 · 3 ep · batch 4×2", in the words of `texts`."""
    return " · ".join(texts[key].format(**values) for key, values in parts)


def latest_report(folder: Path) -> dict:
    """The newest scored report's summary: fine-tuned and base character F1, improved, worse, questions."""
    reports = sorted((folder / "reports").glob("report_*.json")) if (folder / "reports").is_dir() else []
    for path in reversed(reports):
        report = _read_json(path)
        summary = report.get("summary") or {}
        tuned, base = summary.get("fine-tuned") or {}, summary.get("base") or {}
        if tuned:
            return {"tuned_f1": tuned.get("char_f1"), "base_f1": base.get("char_f1"),
                    "improved": tuned.get("improved"), "worse": tuned.get("worse"),
                    "questions": len(report.get("rows") or []), "file": path.name}
    return {}


def _date(folder: Path, metadata: dict) -> str:
    if metadata.get("created"):
        return str(metadata["created"])[:16]
    anchor = folder / REQUEST_FILE if (folder / REQUEST_FILE).is_file() else folder
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(anchor.stat().st_mtime))


def read_run(folder: Path, running: bool = False) -> RunRecord:
    folder = Path(folder)
    request = _read_json(folder / REQUEST_FILE)
    try:
        metadata = read_metadata(folder)
    except StudioError:  # a damaged studio.json: the run is still listed, as incomplete
        metadata = {}
    split = metadata.get("split") or {}
    return RunRecord(
        name=folder.name, folder=str(folder), date=_date(folder, metadata),
        base_model=str(metadata.get("base_model", "")),
        dataset=Path(str(metadata.get("dataset") or request.get("dataset") or "")).name,
        heldout=split.get("heldout_rows"), exam=metadata.get("exam_questions") or None,
        setting_parts=setting_parts(request, metadata),
        train_loss=metadata.get("final_train_loss"), eval_loss=metadata.get("final_eval_loss"),
        status=run_status(folder, metadata, running), report=latest_report(folder))


def list_history(runs_dir: Path, running: frozenset[str] | set[str] = frozenset()) -> list[RunRecord]:
    """Every run folder under `runs_dir`, newest first; `running` names the folders whose job is going."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return []
    folders = [p for p in runs_dir.iterdir() if is_run_folder(p)]
    folders.sort(key=lambda p: (p / REQUEST_FILE if (p / REQUEST_FILE).exists() else p).stat().st_mtime, reverse=True)
    return [read_run(folder, folder.name in running) for folder in folders]


def resolve_run(runs_dir: Path, name: str) -> Path:
    """The run folder called `name` inside `runs_dir`; a path, a parent or a stranger's folder is refused."""
    name = (name or "").strip()
    folder = Path(runs_dir) / name
    if not name or name != Path(name).name or name in (".", "..") or not is_run_folder(folder):
        raise StudioError(f"Run not found: {name}")
    return folder


def rename_run(runs_dir: Path, name: str, new_name: str, manager=None,
               running: frozenset[str] | set[str] = frozenset()) -> Path:
    """Rename a run's folder (and the name in its studio.json); refused while it trains.

    An adapter attached from the folder is detached first (it would point at the old folder)."""
    folder = resolve_run(runs_dir, name)
    if not (new_name or "").strip():
        raise StudioError("Type the run's new name first.")
    if folder.name in running:
        raise StudioError(f"{folder.name} is training; stop it or wait for it to finish before renaming it.")
    target = folder.parent / safe_name(new_name)
    if target == folder:
        return folder
    if target.exists():
        raise StudioError(f"A run named {target.name} already exists; pick another name.")
    loaded = manager.loaded_or_none() if manager is not None else None
    if loaded is not None and folder.name in loaded.adapters:
        from studio.evaluate.service import detach_run

        detach_run(manager, folder.name)
    os.replace(folder, target)
    metadata_path = target / METADATA_FILE
    metadata = _read_json(metadata_path)
    if metadata:
        metadata["name"] = target.name
        write_text_atomic(metadata_path, json.dumps(metadata, ensure_ascii=False, indent=2))
    return target


def delete_run(runs_dir: Path, name: str, confirmed: bool, manager,
               running: frozenset[str] | set[str] = frozenset()) -> Path:
    """Delete a run's folder after confirmation (detaching its adapter first); refused while it trains."""
    from studio.evaluate.service import delete_run as delete_folder

    folder = resolve_run(runs_dir, name)
    if folder.name in running:
        raise StudioError(f"{folder.name} is training; stop it or wait for it to finish before deleting it.")
    delete_folder(manager, folder, confirmed)
    return folder
