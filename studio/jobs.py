"""Background jobs with an event log that any number of viewers can poll by cursor.

Dataset builds and training runs are jobs: they run in a worker thread of the studio process, write
every event to memory and to `events.jsonl` in their folder, and keep running (and save their own
results) whether or not a browser is watching. A page that reloads asks for the events since cursor
0 and sees the whole history; a second viewer does the same.
"""

from __future__ import annotations

import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Callable

from studio.errors import StudioError
from studio.logs import cut_torn_tail, json_line
from studio.secrets import redact


class JobStatus(str, Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobCancelled(Exception):
    """Raised inside a job's worker when the user asked it to stop."""


@dataclass
class Job:
    """One background task: its status, its event log and a cancel flag."""

    kind: str
    name: str
    folder: Path | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: JobStatus = JobStatus.RUNNING
    started: float = field(default_factory=time.time)
    ended: float | None = None
    result: dict = field(default_factory=dict)
    error: str = ""
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _events: list[dict] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _latest: dict[str, dict] = field(default_factory=dict)
    _secrets: list[str] = field(default_factory=list)
    thread: threading.Thread | None = None

    def add_secret(self, secret: str) -> None:
        """Mask `secret` in every event this job stores or shows from now on."""
        if secret:
            self._secrets.append(secret)

    def add_secret_from(self, holder) -> None:
        for secret in getattr(holder, "secrets", ()):
            self.add_secret(secret)

    def emit(self, type_: str, message: str = "", **data) -> dict:
        """Append an event (type 'log', 'progress', 'metric', 'done', ...) and persist it."""
        event = {"t": round(time.time(), 3), "type": type_, "message": redact(message, self._secrets), **data}
        with self._lock:
            self._events.append(event)
            self._latest[type_] = event
            if self.folder is not None:
                self.folder.mkdir(parents=True, exist_ok=True)
                with open(self.folder / "events.jsonl", "a", encoding="utf-8") as log:
                    log.write(json_line(event))
        return event

    def log(self, message: str) -> None:
        self.emit("log", message)

    def replay(self, events: list[dict]) -> None:
        """Show viewers events of an earlier session of this job's folder (a resumed run's curves so far):
        in memory only, since its events.jsonl holds them already."""
        with self._lock:
            self._events.extend({"t": round(time.time(), 3), "message": "", **event} for event in events)

    def events_since(self, cursor: int) -> tuple[list[dict], int]:
        with self._lock:
            events = self._events[cursor:]
            return list(events), cursor + len(events)

    def latest(self, type_: str) -> dict | None:
        with self._lock:
            return self._latest.get(type_)

    @property
    def running(self) -> bool:
        return self.status is JobStatus.RUNNING

    @property
    def elapsed(self) -> float:
        return (self.ended or time.time()) - self.started

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            raise JobCancelled()


JobTarget = Callable[[Job], dict]


class JobBoard:
    """The studio's jobs, by kind. One running job per kind; each runs in its own thread."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._latest: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, kind: str, name: str, target: JobTarget, folder: Path | None = None,
              on_exit: Callable[[Job], None] | None = None) -> Job:
        """Run `target(job)` in a worker thread; refuse if a job of this kind is running."""
        with self._lock:
            current = self._jobs.get(self._latest.get(kind, ""))
            if current is not None and current.running:
                raise StudioError(f"A {kind} job is already running ({current.name}). Stop it or wait for it to finish.")
            note = cut_torn_tail(folder / "events.jsonl") if folder is not None else ""
            job = Job(kind=kind, name=name, folder=folder)
            self._jobs[job.id] = job
            self._latest[kind] = job.id
        if note:
            job.log(note)
        job.thread = threading.Thread(target=self._run, args=(job, target, on_exit), name=f"job-{kind}", daemon=True)
        job.thread.start()
        return job

    def _run(self, job: Job, target: JobTarget, on_exit) -> None:
        job.emit("status", "started", status=JobStatus.RUNNING.value)
        try:
            job.result = target(job) or {}
            job.status = JobStatus.CANCELLED if job.cancelled else JobStatus.DONE
        except JobCancelled:
            job.status = JobStatus.CANCELLED
        except StudioError as exc:
            job.status, job.error = JobStatus.FAILED, redact(str(exc), job._secrets)
        except Exception as exc:  # a bug or an environment failure: keep the trace in the job's folder
            job.status = JobStatus.FAILED
            job.error = redact(f"Unexpected error: {exc.__class__.__name__}: {exc}", job._secrets)
            job.emit("trace", traceback.format_exc())
        finally:
            job.ended = time.time()
            if on_exit is not None:
                on_exit(job)
            job.emit("status", job.error or job.status.value, status=job.status.value, result=job.result)

    def latest(self, kind: str) -> Job | None:
        with self._lock:
            return self._jobs.get(self._latest.get(kind, ""))

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def wait(self, job: Job, timeout: float | None = None) -> Job:
        if job.thread is not None:
            job.thread.join(timeout)
        return job


INTERRUPTED = "Ctrl-C: stopping. What was made so far is kept; press Ctrl-C again to leave at once."


def follow(job: Job, on_event: Callable[[dict], None], poll_s: float = 0.2) -> Job:
    """Call `on_event` for each event of `job` as it arrives, until the job has ended (for the CLI).

    The first Ctrl-C stops the job the way the page's Stop button does (a run saves its adapter, a build
    writes the rows made so far) and goes on following it to its end; a second Ctrl-C leaves at once."""
    cursor, interrupted = 0, False
    while True:
        try:
            running = job.running
            events, cursor = job.events_since(cursor)
            for event in events:
                on_event(event)
            if not running and not events:
                return job
            time.sleep(poll_s)
        except KeyboardInterrupt:
            if interrupted or not job.running:
                raise
            interrupted = True
            job.log(INTERRUPTED)
            job.cancel()
