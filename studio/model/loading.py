"""Load a base model and its tokenizer by hub id or local folder, in 4-bit, 8-bit or full precision.

The 4-bit setting is the tutorial's: NF4 with double quantization and bf16 compute. Errors come fast
and say what to do: a hub id that is not cached while the hub is unreachable fails in well under a
second instead of retrying for most of a minute.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from studio.errors import ModelLoadError

QUANT_CHOICES = ("4bit", "8bit", "none")
HUB_PROBE_TIMEOUT_S = 3.0

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a hub id or a local folder, and how to quantize it."""

    name_or_path: str
    quant: str = "4bit"

    def __post_init__(self) -> None:
        if self.quant not in QUANT_CHOICES:
            raise ModelLoadError(f"Unknown quantization {self.quant!r}; choose one of {', '.join(QUANT_CHOICES)}.")
        if not self.name_or_path or not self.name_or_path.strip():
            raise ModelLoadError("No model given: enter a hub id such as Qwen/Qwen2.5-7B-Instruct or a local folder.")


def pick_device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1) or Path(name).exists()


def _check_model_folder(folder: Path) -> Path:
    if not folder.is_dir():
        raise ModelLoadError(f"Model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder} is not a model folder: it has no config.json. "
            "Pick the folder that holds config.json, the weights and the tokenizer files."
        )
    return folder


def _hub_host() -> tuple[str, int]:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "the hub is switched off (HF_HUB_OFFLINE=1)"
    host, port = _hub_host()
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.__class__.__name__}: {exc})"
    return None


def resolve_source(name_or_path: str) -> str:
    """Return a local folder for a model, or the hub id when it can be downloaded now."""
    name = name_or_path.strip()
    if _looks_like_path(name):
        return str(_check_model_folder(Path(name).expanduser()))
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    reason = _hub_offline_reason()
    if reason:
        raise ModelLoadError(
            f"Model {name!r} is not in the local cache and {reason}. "
            f"Download it on a connected machine (huggingface-cli download {name}) "
            "or enter the path of a local model folder."
        )
    return name


def check_source(spec: ModelSpec) -> str:
    """Everything that can be checked without loading weights: the folder or hub id, config.json and the
    tokenizer's chat template. Returns the resolved source; raises ModelLoadError naming the problem."""
    import json

    source = resolve_source(spec.name_or_path)
    folder = Path(source)
    if folder.is_dir():
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{folder / 'config.json'} cannot be read ({exc.__class__.__name__}): the folder "
                                 "is damaged or not a model folder.") from None
        if not isinstance(config, dict) or "model_type" not in config:
            raise ModelLoadError(f"{folder / 'config.json'} has no model_type: it is not a transformers model config.")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise ModelLoadError(f"{folder} has no weights (*.safetensors or *.bin). Pick the folder that holds them.")
    load_tokenizer(source)
    return source


def quantization_config(quant: str, compute_dtype):
    """The bitsandbytes config for a quantization choice; None for full precision."""
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def compute_dtype_for(device: str):
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16  # bitsandbytes' CPU kernels compute 4-bit matmuls in bf16


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the tokenizer from {source}: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"The tokenizer in {source} has no chat template, so prompts cannot be formatted the way the "
            "model was trained. Use an Instruct/Chat model (e.g. Qwen/Qwen2.5-7B-Instruct)."
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, device: str | None = None, progress: Progress | None = None):
    """Load (model, tokenizer, device) for `spec`; raise ModelLoadError with a clear message."""
    progress = progress or (lambda fraction, message: None)
    device = device or pick_device()
    progress(0.05, f"Resolving {spec.name_or_path}")
    source = resolve_source(spec.name_or_path)
    progress(0.15, "Loading tokenizer")
    tokenizer = load_tokenizer(source)
    progress(0.3, f"Loading weights ({spec.quant}) on {device}")
    model = _load_weights(source, spec.quant, device)
    model.eval()
    model.requires_grad_(False)  # the base stays frozen; training adds LoRA weights on top
    if device == "cpu":
        disable_cpu_bf16_repacking(model)
    progress(1.0, "Ready")
    return model, tokenizer, device


def _load_weights(source: str, quant: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    compute_dtype = compute_dtype_for(device)
    kwargs = {"device_map": device}
    bnb = quantization_config(quant, compute_dtype)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
    else:
        kwargs["dtype"] = compute_dtype if device.startswith("cuda") else torch.float32
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"Could not load the model weights from {source}: {exc}") from exc


def disable_cpu_bf16_repacking(model) -> int:
    """Keep bitsandbytes from repacking 4-bit weights in place on CPUs with avx512_bf16.

    On such CPUs the first no-grad forward repacks the weights, and a later training step then fails
    with 'a view of a leaf Variable that requires grad is being used in an in-place operation'.
    Chat-then-train on one model is the studio's normal flow, so this is switched off at load.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
