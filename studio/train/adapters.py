"""Adapters on disk: a PEFT folder (adapter_config.json + adapter_model.safetensors) plus studio.json.

studio.json records which base, data, system prompt and settings made the adapter, and a fingerprint
of the base's architecture, so an adapter made for another base is refused with a clear message
before peft fails with a shape error.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from studio.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METADATA_FILE = "studio.json"
FINGERPRINT_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")


def base_fingerprint(model) -> dict:
    """Architecture facts an adapter depends on."""
    from studio.model.card import base_of

    config = base_of(model).config
    return {key: getattr(config, key, None) for key in FINGERPRINT_KEYS}


def save_adapter(peft_model, adapter_name: str, folder: Path) -> Path:
    """Write one adapter's config and weights flat into `folder` (no per-adapter subfolder)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    state = {key: tensor.detach().contiguous().cpu() for key, tensor in state.items()}
    tmp = folder / f".{WEIGHTS_FILE}.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / WEIGHTS_FILE)
    config = peft_model.peft_config[adapter_name]
    staging = Path(tempfile.mkdtemp(prefix=".adapter-config-", dir=folder))
    try:  # peft writes the file in place: write it aside, then rename it over the old one
        config.save_pretrained(str(staging))
        with open(staging / CONFIG_FILE, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staging / CONFIG_FILE, folder / CONFIG_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_adapter_weights(peft_model, adapter_name: str, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(peft_model, load_file(str(Path(folder) / WEIGHTS_FILE)), adapter_name=adapter_name)


def read_metadata(folder: Path) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path} is damaged ({exc.msg} at line {exc.lineno}).") from None
    except (UnicodeDecodeError, OSError) as exc:
        raise AdapterError(f"{path} is damaged (not readable as UTF-8 JSON: {type(exc).__name__}).") from None
    if not isinstance(metadata, dict):
        raise AdapterError(f"{path} is damaged (a JSON object is needed, it holds {type(metadata).__name__}).")
    return metadata


def _check_weights_header(path: Path) -> None:
    """A safetensors file starts with an 8-byte length and that many bytes of JSON: a file cut short or
    overwritten fails here, before any model is loaded for it."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if size < 8 or not 2 <= length <= size - 8:
                raise ValueError(f"its header claims {length:,} bytes of a {size:,}-byte file")
            header = json.loads(handle.read(length).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            raise ValueError(f"it is cut short ({size:,} bytes; its tensors need {8 + length + end:,})")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, IndexError) as exc:
        raise AdapterError(f"{path} is damaged (not a safetensors file: {exc}). Train the adapter again or "
                           "restore the file.") from None


def require_adapter_files(folder: Path) -> None:
    """AdapterError saying what the folder is when it holds no usable adapter (needs no model)."""
    folder = Path(folder)
    if not folder.exists():
        raise AdapterError(f"Adapter folder not found: {folder}. Give a run folder under runs/ (from train).")
    if not folder.is_dir():
        raise AdapterError(f"{folder} is a file, not an adapter folder. Give the run folder that holds {CONFIG_FILE}.")
    if not any(folder.iterdir()):
        raise AdapterError(f"{folder} is empty: it holds no adapter. Give a run folder under runs/ (from train).")
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
    if not missing:
        try:
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AdapterError(f"{folder / CONFIG_FILE} is damaged: {exc}") from None
        if not isinstance(config, dict) or "peft_type" not in config:
            raise AdapterError(f"{folder / CONFIG_FILE} is damaged: it has no \"peft_type\", so it is no peft "
                               "adapter's config.")
        _check_weights_header(folder / WEIGHTS_FILE)
        read_metadata(folder)
        return
    if (folder / "run.json").is_file():
        resumable = any((folder / "checkpoints").glob("checkpoint-*"))
        how = (f"continue it with `python studio.py train --resume {folder}` (or Resume in the Train tab)"
               if resumable else "it saved no checkpoint, so train it again")
        raise AdapterError(f"{folder} is a training run that did not finish (it was stopped or killed before it "
                           f"saved its adapter; {missing[0]} is missing): {how}.")
    raise AdapterError(f"{folder} is not a complete adapter: {missing[0]} is missing.")


def check_adapter_folder(folder: Path, model) -> dict:
    """The adapter's metadata, or AdapterError when the folder is damaged or made for another base."""
    folder = Path(folder)
    require_adapter_files(folder)
    metadata = read_metadata(folder)
    expected = metadata.get("base_fingerprint")
    actual = base_fingerprint(model)
    if expected and expected != actual:
        differences = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in FINGERPRINT_KEYS
                                if expected.get(k) != actual.get(k))
        raise AdapterError(f"The adapter in {folder} was made for another base model "
                           f"({metadata.get('base_model', 'unknown')}): {differences}. Load that base first.")
    return metadata


def is_attached(loaded, name: str) -> bool:
    return hasattr(loaded.model, "peft_config") and name in loaded.model.peft_config


def attach(loaded, folder: Path, name: str | None = None) -> str:
    """Attach the adapter in `folder` to the loaded base (the caller holds the lease); returns its name."""
    from peft import PeftModel

    folder = Path(folder)
    check_adapter_folder(folder, loaded.model)
    name = name or folder.name
    if is_attached(loaded, name):
        return name
    try:
        if isinstance(loaded.model, PeftModel):
            loaded.model.load_adapter(str(folder), adapter_name=name)
        else:
            loaded.model = PeftModel.from_pretrained(loaded.model, str(folder), adapter_name=name)
    except Exception as exc:  # shapes that do not fit, unknown modules, damaged weights
        raise AdapterError(f"Could not attach {folder}: {exc.__class__.__name__}: {str(exc)[:300]}") from None
    loaded.model.eval()
    loaded.adapters[name] = str(folder)
    return name


def detach(loaded, name: str) -> None:
    """Remove an adapter from the model; with the last one gone the plain base model is back."""
    if not is_attached(loaded, name):
        loaded.adapters.pop(name, None)
        return
    if len(loaded.model.peft_config) == 1:
        loaded.model = loaded.model.unload()
    else:
        loaded.model.delete_adapter(name)
    loaded.adapters.pop(name, None)
