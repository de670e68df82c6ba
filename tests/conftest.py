"""Test bed: hub switched off, a tiny Qwen2 model built offline, a fresh workspace per test."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_SCRATCH = Path(tempfile.mkdtemp(prefix="studio-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HOME": str(_SCRATCH / "hf"),
    "GRADIO_TEMP_DIR": str(_SCRATCH / "gradio"),
    "MPLBACKEND": "Agg",
})

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402

from tiny_qwen import build_tiny_qwen  # noqa: E402

SAMPLE_DOC = ROOT / "data" / "wudeng_lighthouse.md"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 chat model whose tokenizer was trained on the sample document."""
    folder = tmp_path_factory.mktemp("tiny-qwen")
    return build_tiny_qwen(folder, extra_text=SAMPLE_DOC.read_text(encoding="utf-8"))


@pytest.fixture()
def workspace(tmp_path) -> "object":
    from studio.config import StudioPaths

    return StudioPaths(tmp_path / "data", tmp_path / "runs").ensure()


@pytest.fixture()
def manager(tiny_model_dir):
    """A model manager with the tiny model loaded in 4-bit on the CPU."""
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager

    mgr = ModelManager()
    mgr.load(ModelSpec(str(tiny_model_dir), "4bit"))
    yield mgr
    if mgr.is_loaded:
        mgr.unload()


@pytest.fixture()
def services(manager, workspace):
    from studio.services import Services

    return Services(manager=manager, paths=workspace, default_model="tiny")
