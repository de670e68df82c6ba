"""The services one studio process shares between its tabs and commands, built once in studio.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from studio.access import AccessPolicy
from studio.catalog import Catalog
from studio.jobs import JobBoard
from studio.model.manager import ModelManager

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_DOCUMENT = PROJECT_ROOT / "data" / "wudeng_lighthouse.md"
SAMPLE_DOMAIN = "《雾灯岛》"
DEFAULT_SYSTEM_PROMPT = f"你是{SAMPLE_DOMAIN}领域助手，回答准确、简明。"
MODEL_PRESETS = (
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-3B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "Qwen/Qwen2.5-14B-Instruct",
)
DEFAULT_MODEL = "Qwen/Qwen2.5-7B-Instruct"


@dataclass(frozen=True)
class StudioPaths:
    """Where the studio reads and writes: datasets and dataset builds under data/, runs under runs/."""

    data_dir: Path = PROJECT_ROOT / "data"
    runs_dir: Path = PROJECT_ROOT / "runs"

    @property
    def builds_dir(self) -> Path:
        return self.data_dir / "builds"

    def ensure(self) -> "StudioPaths":
        for folder in (self.data_dir, self.runs_dir, self.builds_dir):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class Services:
    """Everything a tab or a command needs; one instance per process."""

    manager: ModelManager
    policy: AccessPolicy = field(default_factory=AccessPolicy.full)
    jobs: JobBoard = field(default_factory=JobBoard)
    paths: StudioPaths = field(default_factory=StudioPaths)
    default_model: str = DEFAULT_MODEL
    default_quant: str = "4bit"
    default_system_prompt: str = DEFAULT_SYSTEM_PROMPT
    catalog: Catalog | None = None  # built from `paths` when not given
    keys: object = None  # secrets.KeyRouting: where the environment key may go (default: the provider presets)
    max_upload_mb: float = 20.0
    lang: str = ""  # "zh" or "en" forces the UI's language; "" follows each browser

    def __post_init__(self):
        if self.catalog is None:
            self.catalog = Catalog(self.paths, SAMPLE_DOCUMENT)
        if self.keys is None:
            from studio.data.teacher import key_routing

            self.keys = key_routing()
