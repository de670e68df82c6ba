"""Model sources: hub ids (from a mirror set by HF_ENDPOINT, with download progress), local folders,
ModelScope ids through the optional package, and offline failures that name the right command."""

import sys
import time
import types

import pytest


def test_missing_hub_model_offline_fails_at_once_with_the_hf_command():
    from studio.errors import ModelLoadError
    from studio.model.loading import resolve_source

    started = time.time()
    with pytest.raises(ModelLoadError) as caught:
        resolve_source("Qwen/Qwen2.5-0.5B-Instruct")
    assert time.time() - started < 3
    assert "hf download Qwen/Qwen2.5-0.5B-Instruct" in str(caught.value)
    assert "huggingface-cli" not in str(caught.value)  # the installed hub client has no such command


def test_unreachable_mirror_is_named_with_the_command(monkeypatch):
    from studio.errors import ModelLoadError
    from studio.model.loading import resolve_source
    from uihelpers import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ModelLoadError, match=r"127\.0\.0\.1 cannot be reached.*hf download org/missing"):
        resolve_source("org/missing")


def test_hub_id_downloads_from_the_mirror_with_progress(tiny_model_dir, monkeypatch):
    """HF_ENDPOINT points at a local mirror; loading a hub id downloads it there, reporting bytes."""
    import huggingface_hub.constants

    from fake_hub import FakeHub
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager

    hub = FakeHub("mirror-org/tiny-qwen", tiny_model_dir).start()
    try:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once at import
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        messages = []
        manager = ModelManager()
        manager.load(ModelSpec("mirror-org/tiny-qwen", "4bit"), progress=lambda f, m: messages.append((f, m)))
    finally:
        hub.stop()
    assert "model.safetensors" in hub.downloads and "tokenizer.json" in hub.downloads
    downloads = [(f, m) for f, m in messages if m.startswith("Downloading mirror-org/tiny-qwen from 127.0.0.1")]
    assert downloads and downloads[-1][1].endswith("(100%)") and 0.05 <= downloads[-1][0] <= 0.3
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir() if p.is_file()) / 1e6
    assert f"{size:.2f} MB of {size:.2f} MB" in downloads[-1][1]
    assert manager.status().describe().startswith("Ready: mirror-org/tiny-qwen (4-bit NF4, cpu)")
    assert manager.chat([{"role": "user", "content": "hi"}])  # the downloaded model answers


def test_modelscope_without_the_package_says_how_to_install(monkeypatch):
    from studio.errors import ModelLoadError
    from studio.model.loading import resolve_source

    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(ModelLoadError, match="pip install modelscope"):
        resolve_source("modelscope:Qwen/Qwen2.5-7B-Instruct")


def _fake_modelscope(monkeypatch, snapshot):
    module = types.ModuleType("modelscope")
    module.snapshot_download = snapshot
    monkeypatch.setitem(sys.modules, "modelscope", module)
    return module


def test_modelscope_id_loads_through_the_package(tiny_model_dir, monkeypatch):
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager

    calls = []

    def snapshot_download(model_id, local_files_only=False, **kwargs):
        calls.append((model_id, local_files_only))
        return str(tiny_model_dir)

    _fake_modelscope(monkeypatch, snapshot_download)
    manager = ModelManager()
    manager.load(ModelSpec("modelscope:Qwen/Qwen2.5-7B-Instruct", "4bit"))
    assert calls == [("Qwen/Qwen2.5-7B-Instruct", True)]  # found locally: nothing downloaded
    assert manager.status().describe().startswith("Ready: modelscope:Qwen/Qwen2.5-7B-Instruct")


def test_missing_modelscope_model_offline_names_the_modelscope_command(monkeypatch):
    from studio.errors import ModelLoadError
    from studio.model.loading import resolve_source
    from uihelpers import free_port

    def snapshot_download(model_id, local_files_only=False, **kwargs):
        raise ValueError("not in the local cache")  # a download must not be attempted

    _fake_modelscope(monkeypatch, snapshot_download)
    monkeypatch.setenv("MODELSCOPE_DOMAIN", f"http://127.0.0.1:{free_port()}")
    started = time.time()
    with pytest.raises(ModelLoadError, match="modelscope download --model Qwen/Qwen2.5-7B-Instruct"):
        resolve_source("modelscope:Qwen/Qwen2.5-7B-Instruct")
    assert time.time() - started < 5


def test_local_folder_is_used_as_is(tiny_model_dir, tmp_path):
    from studio.errors import ModelLoadError
    from studio.model.loading import resolve_source

    assert resolve_source(str(tiny_model_dir)) == str(tiny_model_dir)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_source(str(tmp_path))
