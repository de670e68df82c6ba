"""Adapters of the loaded base (list, attach, detach, delete), questions, and the report job."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from studio.access import AccessPolicy
from studio.data.records import read_dataset
from studio.data.teacher import OpenAITeacher, TeacherConfig
from studio.errors import AdapterError, StudioError
from studio.data.records import stamped
from studio.evaluate.report import ReportRequest, run_report, write_report
from studio.evaluate.retrieval import SectionRetriever
from studio.jobs import Job, JobBoard
from studio.model.generation import GenerationSettings
from studio.model.manager import ModelManager
from studio.train import adapters

JOB_KIND = "report"
RECITATION_SAMPLE = 20
EXAM_FILE = "exam.jsonl"  # the run's copy of its exam (see studio.train.knowledge)

# Tutorial-style test questions about the sample document, with answers checked against it.
PRESET_QUESTIONS = [
    ("我该怎么成为守灯人？", "完成序章任务“初燃”：在潮声村找到老守灯人闻笛接受任务，收集三枚雾晶（枯井底部、盐风坡风车顶端、击败雾鬣掉落），"
                        "到北角灯塔塔顶放入灯座点燃青焰灯芯，再回村向闻笛复命，获得称号“守灯人”与道具“铜哨”。"),
    ("如何获得并锻造出潮汐长枪？", "在沉船湾退潮时进入铁鳍号残骸，击败首领铁鳍将军获得鲸骨枪胚；再收集5个月潮石和1个深渊珊瑚，"
                            "回潮声村找铁匠石阿满，支付300枚灯贝锻造。需要已经成为守灯人。"),
    ("雾灯岛的通用货币是什么？", "灯贝，一种会在夜里发出微光的贝壳；另有稀有货币潮印，两者不能互相兑换。"),
    ("点亮七座灯塔之后会发生什么？", "永雾完全散去，游戏进入最终章“归潮”。"),
    ("潮汐试炼有多少层，奖励是什么？", "共30层，每通过5层获得1枚潮印，全部通关额外奖励外观“潮纹战甲”。"),
]


@dataclass
class AdapterEntry:
    name: str
    folder: str
    status: str
    base_model: str
    dataset: str
    train_loss: float | None
    eval_loss: float | None
    attached: bool
    problem: str = ""


def list_adapters(manager: ModelManager, runs_dir: Path) -> list[AdapterEntry]:
    """Finished or stopped runs under runs_dir; `problem` says why one cannot go on the loaded base."""
    loaded = manager.loaded_or_none()
    entries = []
    for folder in sorted(Path(runs_dir).glob("*"), key=lambda p: p.stat().st_mtime, reverse=True):
        if not (folder / adapters.METADATA_FILE).is_file() and not (folder / adapters.CONFIG_FILE).is_file():
            continue
        meta: dict = {}
        problem = ""
        try:
            meta = adapters.read_metadata(folder)
            if loaded is not None:
                adapters.check_adapter_folder(folder, loaded.model)
        except AdapterError as exc:
            problem = str(exc)
        attached = loaded is not None and adapters.is_attached(loaded, folder.name)
        entries.append(AdapterEntry(folder.name, str(folder), meta.get("status", "?"), meta.get("base_model", "?"),
                                    Path(meta.get("dataset", "?")).name, meta.get("final_train_loss"),
                                    meta.get("final_eval_loss"), attached, problem))
    return entries


FULL = AccessPolicy.full()


def attach_run(manager: ModelManager, folder: Path, *, policy: AccessPolicy = FULL) -> str:
    policy.require("manage_adapters")
    with manager.using("attaching an adapter") as loaded:
        return adapters.attach(loaded, Path(folder))


def detach_run(manager: ModelManager, name: str, *, policy: AccessPolicy = FULL) -> None:
    policy.require("manage_adapters")
    with manager.using("detaching an adapter") as loaded:
        adapters.detach(loaded, name)


def delete_run(manager: ModelManager, folder: Path, confirmed: bool, *, policy: AccessPolicy = FULL) -> None:
    policy.require("manage_adapters")
    folder = Path(folder)
    if not confirmed:
        raise StudioError(f"Tick the confirmation to delete {folder.name}: its adapter and checkpoints are removed for good.")
    if not (folder / "run.json").is_file() and not (folder / adapters.METADATA_FILE).is_file():
        raise StudioError(f"{folder} is not a studio run folder; nothing was deleted.")
    if manager.is_loaded:
        detach_run(manager, folder.name, policy=policy)
    shutil.rmtree(folder)


def comparable_run(manager: ModelManager, catalog, run_id: str, policy: AccessPolicy = FULL) -> Path:
    """The run folder of `run_id` from the catalog. Where adapters cannot be managed (demo mode) only
    runs whose adapter the owner attached can be compared."""
    folder = catalog.resolve_run(run_id)
    if not policy.allows("manage_adapters") and not _attached_from(manager, folder):
        raise StudioError(f"unknown run '{folder.name}': only the adapters the owner attached can be compared here.")
    return folder


def demo_visible_ids(manager: ModelManager, catalog, kind: str) -> list[str]:
    """The ids of `kind` a demo visitor may name: the runs whose adapter the owner attached and their source
    documents; nothing else. Any other id is refused as unknown, the same way whether it exists or not."""
    runs = [run_id for run_id in catalog.ids("runs") if _attached_from(manager, catalog.resolve_run(run_id))]
    if kind == "runs":
        return runs
    if kind == "documents":
        documents = (catalog.document_id(source_document(catalog.resolve_run(run_id))) for run_id in runs)
        return [document for document in documents if document]
    return []


def _attached_from(manager: ModelManager, folder: Path) -> str | None:
    """The name under which the adapter of `folder` is attached (any name, e.g. from --attach), or None."""
    wanted = Path(folder).resolve()
    for name in manager.status().adapters:
        attached = manager.adapter_folder(name)
        if attached is not None and Path(attached).resolve() == wanted:
            return name
    return None


def side_by_side_adapter(manager: ModelManager, folder: Path, policy: AccessPolicy = FULL) -> str:
    """The adapter name for a side-by-side run: attached already, or attached now if the policy allows it."""
    policy.require("compare")
    folder = Path(folder)
    return _attached_from(manager, folder) or attach_run(manager, folder, policy=policy)


def run_questions(folder: Path, name: str) -> list[dict]:
    path = Path(folder) / name
    return read_dataset(path) if path.is_file() and path.stat().st_size else []


def run_exam(folder: Path) -> list[dict]:
    """The run's exam (never trained on): the copy in the run folder, else the file studio.json names."""
    rows = run_questions(folder, EXAM_FILE)
    if rows:
        return rows
    recorded = adapters.read_metadata(Path(folder)).get("exam")
    return read_dataset(recorded) if recorded and Path(recorded).is_file() else []


def default_questions(folder: Path) -> tuple[list[dict], str]:
    """(questions, which set): the exam first when the run has one, else the held-out phrasings."""
    exam = run_exam(folder)
    return (exam, "exam") if exam else (run_questions(folder, "heldout.jsonl"), "heldout")


def comparison_sets(folder: Path, question_set: str) -> dict[str, list[dict]]:
    """Samples of the other question sets, for the recitation check."""
    sets = {"heldout": run_questions(folder, "heldout.jsonl"), "exam": run_exam(folder)}
    return {name: random.Random(0).sample(rows, min(RECITATION_SAMPLE, len(rows)))
            for name, rows in sets.items() if rows and name != question_set}


def source_document(folder: Path) -> str | None:
    path = adapters.read_metadata(Path(folder)).get("source_document")
    return path if path and Path(path).is_file() else None


def start_report(board: JobBoard, manager: ModelManager, folder: Path, questions: list[dict] | None,
                 document: str | None, settings: GenerationSettings, judge: TeacherConfig | None = None,
                 retrieval_k: int = 2, question_set: str = "uploaded", *, policy: AccessPolicy = FULL) -> Job:
    """Score the run's exam (else its held-out rows), or given questions, through every column as a job.

    It attaches the run's adapter and writes the report into the run folder; a judge is a call out."""
    policy.require("write_reports", "manage_adapters")
    if judge is not None:
        policy.require("outbound")
    if not 1 <= int(retrieval_k) <= 10:
        raise StudioError(f"Sections retrieved must be between 1 and 10 (got {retrieval_k}).")
    folder = Path(folder)
    adapters.require_adapter_files(folder)  # an empty, missing or unfinished run says so, not "no held-out rows"
    meta = adapters.read_metadata(folder)
    if questions is None:
        questions, question_set = default_questions(folder)
    if not questions:
        raise StudioError(f"No questions: {folder.name} has no held-out rows; upload a JSONL of instruction/output rows.")
    training = run_questions(folder, "train_split.jsonl")
    sample = random.Random(0).sample(training, min(RECITATION_SAMPLE, len(training))) if training else []
    retriever = SectionRetriever.from_document(document) if document else None
    judge_teacher = OpenAITeacher(judge) if judge is not None else None
    lease = manager.acquire(f"scoring {folder.name}")
    try:
        name = adapters.attach(lease.loaded, folder)
        request = ReportRequest(name, questions, meta.get("system_prompt", ""), settings, retriever, retrieval_k,
                                judge_teacher, sample, question_set, comparison_sets(folder, question_set))
    except Exception:
        lease.release()
        raise
    def target(job: Job) -> dict:
        report = run_report(job, lease, request)
        (folder / "reports").mkdir(parents=True, exist_ok=True)
        paths = stamped(*(folder / "reports" / f"report_{{stamp}}.{suffix}" for suffix in ("json", "csv")))
        report["files"] = [str(write_report(report, path)) for path in paths]
        if "stopped_after" in report:
            job.log(f"Report stopped after {report['stopped_after']} of {report['questions_total']} questions; "
                    "those are saved.")  # the tables' strings: report_stopped_saved
        job.log(f"Report saved: {', '.join(report['files'])}")
        return report

    return board.start(JOB_KIND, f"report {folder.name}", target, on_exit=lambda job: lease.release())
