"""The studio's own files by id: documents, datasets, runs and their reports.

The page never sends or receives a server path. It shows lists this catalog builds from the studio's
folders, and sends back an id from them (a file or folder name relative to its folder). `resolve_*`
turns an id into a path inside those folders or refuses with "unknown ...", whatever the id is: an
absolute path, a `..`, a file that exists elsewhere or one that does not exist at all read the same, so
a caller learns nothing about the server's other files. The command line may still take paths: the
user of a shell owns the machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import StudioError

DOCUMENT_SUFFIXES = (".md", ".txt")
DATASET_SUFFIXES = (".jsonl",)
UPLOAD_SUFFIXES = (".md", ".txt", ".jsonl", ".json")
RUN_MARKERS = ("run.json", "studio.json", "adapter_config.json")


class UnknownItem(StudioError):
    """An id that is not in the catalog; the message never says whether such a file exists elsewhere."""


@dataclass(frozen=True)
class Entry:
    """One item of the catalog: its id, what it is, where it lies (never shown to a browser) and facts about it."""

    id: str
    kind: str
    path: Path = field(repr=False)
    size: int = 0
    modified: float = 0.0
    meta: dict = field(default_factory=dict)


def _entry(kind: str, item_id: str, path: Path, meta: dict | None = None) -> Entry:
    stat = path.stat()
    return Entry(item_id, kind, path, stat.st_size, stat.st_mtime, meta or {})


class Catalog:
    """Lists and resolves the studio's files; built once by the composition root from StudioPaths."""

    def __init__(self, paths, sample_document: Path | None = None):
        self.paths = paths
        self.sample_document = Path(sample_document) if sample_document else None

    # ----- lists -------------------------------------------------------------------------------
    def documents(self) -> list[Entry]:
        """Markdown and text files in data/, and the sample document, by file name."""
        found = {p.name: p for p in self._files(self.paths.data_dir, DOCUMENT_SUFFIXES)}
        if self.sample_document is not None and self.sample_document.is_file():
            found.setdefault(self.sample_document.name, self.sample_document)
        return [_entry("document", name, path) for name, path in sorted(found.items())]

    def datasets(self) -> list[Entry]:
        """JSONL files in data/, newest first, by file name."""
        entries = [_entry("dataset", p.name, p) for p in self._files(self.paths.data_dir, DATASET_SUFFIXES)]
        return sorted(entries, key=lambda e: e.modified, reverse=True)

    def runs(self) -> list[Entry]:
        """Run folders in runs/ (a run.json, studio.json or adapter), newest first, by folder name."""
        runs_dir = Path(self.paths.runs_dir)
        folders = [p for p in runs_dir.glob("*") if p.is_dir() and not p.is_symlink()
                   and any((p / marker).is_file() for marker in RUN_MARKERS)] if runs_dir.is_dir() else []
        entries = [_entry("run", p.name, p, _run_meta(p)) for p in folders]
        return sorted(entries, key=lambda e: e.modified, reverse=True)

    def reports(self, run_id: str) -> list[Entry]:
        folder = self.resolve_run(run_id) / "reports"
        return [_entry("report", p.name, p) for p in self._files(folder, (".json", ".csv"))]

    def ids(self, kind: str) -> list[str]:
        return [e.id for e in getattr(self, kind)()]

    # ----- resolving ids -------------------------------------------------------------------------
    def resolve_document(self, item_id) -> Path:
        return self._resolve(self.documents(), item_id, "document")

    def resolve_dataset(self, item_id) -> Path:
        return self._resolve(self.datasets(), item_id, "dataset")

    def resolve_run(self, item_id) -> Path:
        return self._resolve(self.runs(), item_id, "run")

    def resolve_report(self, run_id, item_id) -> Path:
        return self._resolve(self.reports(run_id), item_id, "report")

    def document_id(self, path) -> str | None:
        """The id of the catalog document at `path` (e.g. a run's recorded source), or None if it is not one."""
        if not path:
            return None
        try:
            wanted = Path(path).resolve()
        except (OSError, ValueError):
            return None
        return next((e.id for e in self.documents() if e.path.resolve() == wanted), None)

    def dataset_id(self, path) -> str | None:
        if not path:
            return None
        wanted = Path(path).resolve()
        return next((e.id for e in self.datasets() if e.path.resolve() == wanted), None)

    def roots(self) -> list[Path]:
        """The folders whose absolute paths a public page must not show."""
        folders = [self.paths.data_dir, self.paths.runs_dir]
        if self.sample_document is not None:
            folders.append(self.sample_document.parent)
        return [Path(f).resolve() for f in folders]

    @staticmethod
    def _resolve(entries: list[Entry], item_id, kind: str) -> Path:
        if isinstance(item_id, str):
            for entry in entries:
                if entry.id == item_id:
                    return entry.path
        shown = str(item_id)[:60] if item_id is not None else ""
        raise UnknownItem(f"unknown {kind} '{Path(shown).name or shown}': pick one from the list.")

    @staticmethod
    def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
        folder = Path(folder)
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file() and not p.is_symlink()
                and not p.name.startswith(".")]


def _run_meta(folder: Path) -> dict:
    path = folder / "studio.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
