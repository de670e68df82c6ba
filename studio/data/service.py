"""Starting a dataset build as a job, with a remote teacher or the studio's own model."""

from __future__ import annotations

from pathlib import Path

from studio.access import AccessPolicy
from studio.data.builder import BuildSettings, DatasetBuild, validate_settings
from studio.data.documents import read_document
from studio.data.teacher import LocalTeacher, OpenAITeacher, TeacherConfig
from studio.errors import DataError
from studio.jobs import Job, JobBoard
from studio.model.manager import ModelManager
from studio.config import StudioPaths

JOB_KIND = "dataset"


def start_build(board: JobBoard, manager: ModelManager, paths: StudioPaths, document_path: str | Path,
                settings: BuildSettings, teacher: TeacherConfig | None, name: str = "", *,
                policy: AccessPolicy = AccessPolicy.full()) -> Job:
    """Start building a dataset from `document_path`; `teacher=None` uses the loaded model.

    Refused unless `policy` allows building (and, for a remote teacher, calling out).

    With the local teacher the job holds the model for its whole run (the model shows as busy),
    and gives it back when the job ends, however it ends.
    """
    policy.require("build_dataset", "read_files")
    if teacher is not None:
        policy.require("outbound")
    validate_settings(settings)
    if teacher is not None and not teacher.timeout_s > 0:
        raise DataError(f"The teacher's time-out must be more than 0 seconds, not {teacher.timeout_s} (--timeout).")
    document_path = Path(document_path)
    document = read_document(document_path)
    name = name.strip() or document_path.stem
    if teacher is None:
        lease = manager.acquire("building a dataset (local teacher)", changes_model=False)
        teacher_obj, teacher_id, on_exit = LocalTeacher(lease.loaded), f"local:{lease.loaded.spec.name_or_path}", (lambda job: lease.release())
    else:
        if not teacher.base_url.strip() or not teacher.model.strip():
            raise DataError("The teacher needs a base URL and a model id.")
        teacher_obj, teacher_id, on_exit = OpenAITeacher(teacher), f"{teacher.model}@{teacher.base_url}", None
    try:
        build = DatasetBuild(document, name, teacher_obj, teacher_id, settings, paths.data_dir, paths.builds_dir,
                             source=str(document_path.resolve()))
    except Exception:
        if on_exit:
            on_exit(None)
        raise
    return board.start(JOB_KIND, name, build.run, folder=build.folder, on_exit=on_exit)
