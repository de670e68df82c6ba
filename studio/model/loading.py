"""Load a base model and its tokenizer by hub id or local folder, in 4-bit, 8-bit or full precision.

The 4-bit setting is the tutorial's: NF4 with double quantization and bf16 compute. Errors come fast
and say what to do: a hub id that is not cached while the hub is unreachable fails in well under a
second instead of retrying for most of a minute.

Where a model comes from (`resolve_source`):
- a local folder (any path, or a name that exists on disk);
- a Hugging Face hub id, from the cache or downloaded now, from `HF_ENDPOINT` when it is set (a mirror
  such as https://hf-mirror.com), with the download's bytes reported to the progress callback;
- `modelscope:ORG/NAME`, through the optional `modelscope` package (`pip install modelscope`).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from studio.errors import ModelLoadError

QUANT_CHOICES = ("4bit", "8bit", "none")
# How a quantization choice is named on a page and in the status line ("none" alone read as "no model").
QUANT_LABELS = {"4bit": "4-bit NF4", "8bit": "8-bit", "none": "unquantized"}
HUB_PROBE_TIMEOUT_S = 3.0
MODELSCOPE_PREFIX = "modelscope:"
MODELSCOPE_DEFAULT_HOST = "https://www.modelscope.cn"
# What a model load needs from a hub repository: weights in safetensors, configs, tokenizer files.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py"]
PROGRESS_EVERY_S = 0.5
DOWNLOAD_SHARE = (0.05, 0.3)  # the part of a load's progress bar that a download fills

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


def quant_label(quant: str | None) -> str:
    """A quantization choice as the studio names it to people ("4bit" -> "4-bit NF4")."""
    return QUANT_LABELS.get(quant or "", quant or "")


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


def _hub_endpoint() -> str:
    """The hub the studio downloads from: HF_ENDPOINT (a mirror) when set, else huggingface.co."""
    return os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or "https://huggingface.co"


def _host_of(endpoint: str) -> tuple[str, int]:
    parsed = urlparse(endpoint)
    return parsed.hostname or endpoint, parsed.port or (443 if parsed.scheme != "http" else 80)


def _hub_host() -> tuple[str, int]:
    return _host_of(_hub_endpoint())


def _unreachable(endpoint: str) -> str | None:
    host, port = _host_of(endpoint)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{host} cannot be reached ({exc.__class__.__name__}: {exc})"
    return None


def _hub_offline_reason() -> str | None:
    """Why the hub cannot be used right now, or None when it answers."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return "the hub is switched off (HF_HUB_OFFLINE=1)"
    return _unreachable(_hub_endpoint())


def resolve_source(name_or_path: str, progress: Progress | None = None) -> str:
    """Return a local folder for a model: a folder given as such, a cached or newly downloaded hub
    snapshot, or a ModelScope snapshot (`modelscope:ORG/NAME`). Downloads report to `progress`."""
    name = name_or_path.strip()
    if name.lower().startswith(MODELSCOPE_PREFIX):
        return resolve_modelscope(name[len(MODELSCOPE_PREFIX):].strip(), progress)
    if _looks_like_path(name):
        return str(_check_model_folder(Path(name).expanduser()))
    return resolve_hub(name, progress)


def resolve_hub(repo_id: str, progress: Progress | None = None) -> str:
    """The cached snapshot of a hub model, or download it now (from HF_ENDPOINT when set)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except Exception:
        pass
    reason = _hub_offline_reason()
    if reason:
        mirror = " (or set HF_ENDPOINT to a reachable mirror such as https://hf-mirror.com)" \
            if "HF_HUB_OFFLINE" not in reason else ""
        raise ModelLoadError(
            f"Model {repo_id!r} is not in the local cache and {reason}. "
            f"Download it on a connected machine with: hf download {repo_id}{mirror}; "
            "or enter the path of a local model folder."
        )
    return download_hub(repo_id, progress)


def download_hub(repo_id: str, progress: Progress | None = None) -> str:
    """Download a hub model's weights, config and tokenizer into the cache, reporting bytes."""
    from huggingface_hub import snapshot_download

    endpoint = _hub_endpoint()
    report = DownloadReporter(f"Downloading {repo_id} from {urlparse(endpoint).hostname}", progress)
    try:
        folder = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS, endpoint=endpoint,
                                   tqdm_class=report.tqdm_class())
        if not any(Path(folder).glob("*.safetensors")):  # an older repository with .bin weights only
            folder = snapshot_download(repo_id, allow_patterns=DOWNLOAD_PATTERNS + ["*.bin"], endpoint=endpoint,
                                       tqdm_class=report.tqdm_class())
    except Exception as exc:
        raise ModelLoadError(f"Could not download {repo_id!r} from {endpoint}: {exc.__class__.__name__}: "
                             f"{str(exc)[:300]}. Check the id, or download it with: hf download {repo_id}") from None
    report.finish()
    return folder


def resolve_modelscope(model_id: str, progress: Progress | None = None) -> str:
    """A ModelScope model (`modelscope:ORG/NAME`): the local snapshot, or download it now."""
    if not model_id or "/" not in model_id:
        raise ModelLoadError(f"A ModelScope id looks like modelscope:Qwen/Qwen2.5-7B-Instruct, not {model_id!r}.")
    try:
        from modelscope import snapshot_download
    except ImportError:
        raise ModelLoadError(
            f"Loading modelscope:{model_id} needs the optional ModelScope client: pip install modelscope"
        ) from None
    try:
        return snapshot_download(model_id, local_files_only=True)
    except Exception:
        pass
    endpoint = os.environ.get("MODELSCOPE_DOMAIN", "").strip() or MODELSCOPE_DEFAULT_HOST
    if "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    reason = _unreachable(endpoint)
    if reason:
        raise ModelLoadError(
            f"ModelScope model {model_id!r} is not downloaded and {reason}. "
            f"Download it on a connected machine with: modelscope download --model {model_id}"
        )
    report = DownloadReporter(f"Downloading {model_id} from ModelScope", progress)
    try:
        folder = snapshot_download(model_id, allow_patterns=DOWNLOAD_PATTERNS, **report.modelscope_kwargs())
    except Exception as exc:
        raise ModelLoadError(f"Could not download modelscope:{model_id}: {exc.__class__.__name__}: "
                             f"{str(exc)[:300]}. Try: modelscope download --model {model_id}") from None
    report.finish()
    return folder


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class DownloadReporter:
    """Turns a download's byte counts into the load's progress callback, at most twice a second."""

    def __init__(self, label: str, progress: Progress | None):
        self.label = label
        self.progress = progress or (lambda fraction, message: None)
        self.done = 0
        self.total = 0
        self._last = 0.0
        self._lock = threading.Lock()

    def add(self, n: int, total: int | None = None, force: bool = False) -> None:
        with self._lock:
            self.done += int(n or 0)
            if total:
                self.total = max(self.total, int(total))
            now = time.monotonic()
            if not force and now - self._last < PROGRESS_EVERY_S:
                return
            self._last = now
            done, total = self.done, self.total
        share = done / total if total else 0.0
        low, high = DOWNLOAD_SHARE
        size = f"{human_size(done)} of {human_size(total)}" if total else human_size(done)
        self.progress(low + (high - low) * min(share, 1.0), f"{self.label}: {size}" + (f" ({share:.0%})" if total else ""))

    def finish(self) -> None:
        self.add(0, force=True)

    def tqdm_class(self):
        """A silent tqdm for huggingface_hub whose byte counter reports here."""
        from tqdm.auto import tqdm

        reporter = self

        class ReportingTqdm(tqdm):
            def __init__(self, *args, **kwargs):
                # huggingface_hub reports written bytes on its "Reconstructing" bar (totals summed over files)
                self._counts_bytes = str(kwargs.get("desc", "")).startswith("Reconstructing")
                kwargs.pop("name", None)
                kwargs["disable"] = True
                super().__init__(*args, **kwargs)

            def update(self, n=1):
                if self._counts_bytes:
                    reporter.add(n or 0, self.total)
                return super().update(n)

        return ReportingTqdm

    def modelscope_kwargs(self) -> dict:
        """`progress_callbacks` for modelscope's snapshot_download, where the installed version has them."""
        import inspect

        from modelscope import snapshot_download

        try:
            from modelscope.hub.callback import ProgressCallback
        except ImportError:
            return {}
        if "progress_callbacks" not in inspect.signature(snapshot_download).parameters:
            return {}

        reporter = self

        class Reporting(ProgressCallback):
            def __init__(self, filename: str, file_size: int):
                super().__init__(filename, file_size)
                reporter.add(0, reporter.total + int(file_size or 0))

            def update(self, size: int):
                reporter.add(size)

            def end(self):
                pass

        return {"progress_callbacks": [Reporting]}


def check_source(spec: ModelSpec, progress: Progress | None = None) -> str:
    """Everything that can be checked without loading weights: the folder or hub id (downloaded now if
    needed, reporting to `progress`), config.json and the tokenizer's chat template. Returns the resolved
    source; raises ModelLoadError naming the problem."""
    import json

    source = resolve_source(spec.name_or_path, progress)
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


def load_model(spec: ModelSpec, device: str | None = None, progress: Progress | None = None,
               source: str | None = None):
    """Load (model, tokenizer, device) for `spec` (from `source` when it was resolved already); raise
    ModelLoadError with a clear message."""
    progress = progress or (lambda fraction, message: None)
    device = device or pick_device()
    if source is None:
        progress(0.05, f"Resolving {spec.name_or_path}")
        source = resolve_source(spec.name_or_path, progress)
    progress(0.15, "Loading tokenizer")
    tokenizer = load_tokenizer(source)
    progress(0.3, f"Loading weights ({quant_label(spec.quant)}) on {device}")
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
