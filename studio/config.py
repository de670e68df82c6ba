"""The studio's fixed settings: where it keeps its files, the sample document, the model presets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
