"""Attention for training and for decoding on a GPU: without cuDNN's fused kernel, and packed rows
through flash-attention's variable-length kernel.

PyTorch prefers cuDNN's fused attention on Hopper GPUs. Measured on an H200:
- training: cuDNN builds an execution plan for every new sequence length (about 2 ms of CPU per layer
  call, far more the first time a length is seen); packed rows of new lengths ran at 2,193 tokens/s
  with it and 4,300 without (bench/profile_speed.py);
- decoding: over the static KV cache it gave different greedy replies to the same question; without
  it, the same reply every time (bench/decode_repeatability.py).
PyTorch's flash and memory-efficient kernels are used instead. The switch is process-wide; the model
manager's lease makes the holder its only user while it is off.

Packed training rows (`TrainSettings.packing`) are one padding-free sequence whose rows must not attend
to each other. Through SDPA that is a block-diagonal mask over the whole pass, so the kernel computes
every pair of tokens and masks most of them out (8 rows of about 260 tokens: 8 times the work; 53 ms
of a 7B Fast step of 270 ms on an H200, `bench/profile_small_train.py`). `packed_row_attention` makes
such passes attend through PyTorch's `varlen_attn` (flash attention over each row alone, given the
rows' boundaries that transformers' `DataCollatorWithFlattening` provides), on CUDA where this PyTorch
has it; any other call keeps SDPA.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Iterator

PACKED_IMPLEMENTATION = "studio-varlen"


@contextmanager
def without_cudnn_attention(active: bool = True):
    """Switch cuDNN's fused attention off for the block (a no-op when not `active` or without CUDA)."""
    import torch

    if not active or not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def varlen_kernel():
    """PyTorch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`) where a CUDA GPU
    can run it; None without CUDA or where this PyTorch has none."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def attend_rows(kernel, query, key, value, starts, longest: int, scaling: float | None, parameters=None):
    """Causal attention of each packed row to itself alone. query (1, heads, tokens, dim), key and value
    (1, kv heads, tokens, dim); `starts` the rows' cumulative boundaries (rows + 1, int32). Returns
    (1, tokens, heads, dim), as transformers' attention functions do. `parameters`: the kernel's
    signature's (looked up when not given)."""
    import torch

    parameters = parameters if parameters is not None else inspect.signature(kernel).parameters
    groups = query.shape[1] // key.shape[1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, dim)
    options = {"scale": scaling}
    if groups > 1:
        if "enable_gqa" in parameters:
            options["enable_gqa"] = True
        else:  # head h reads key/value head h // groups, as transformers' repeat_kv
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:
        options["window_size"] = (-1, 0)  # causal
    else:
        options["is_causal"] = True
    starts = starts.to(torch.int32)
    return kernel(q, k, v, starts, starts, longest, longest, **options).unsqueeze(0)


def packed_attention_function(kernel):
    """transformers' attention-function signature: `attend_rows` for a packed pass (one sequence, the
    rows' boundaries given, no dropout), SDPA for anything else."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    parameters = inspect.signature(kernel).parameters

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        starts, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        plain = (starts is None or longest is None or query.shape[0] != 1 or dropout
                 or starts.device != query.device or kwargs.get("sliding_window")
                 or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None
                 or not getattr(module, "is_causal", True))
        if plain:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
        return attend_rows(kernel, query, key, value, starts, int(longest), scaling, parameters), None

    return attention


def register_packed(kernel) -> None:
    """Make `studio-varlen` an attention implementation transformers knows, with SDPA's masks (for the
    calls that fall back to SDPA)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(PACKED_IMPLEMENTATION, packed_attention_function(kernel))
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_IMPLEMENTATION, sdpa_mask)


@contextmanager
def packed_row_attention(model, active: bool, notes: list | None = None, kernel=None) -> Iterator[bool]:
    """For the block, `model`'s SDPA attention becomes `studio-varlen` (a no-op when not `active`, without
    CUDA, or where PyTorch has no `varlen_attn`; `notes` says which on a GPU). Yields whether it did.
    `kernel` replaces `varlen_kernel()` (the CPU tests pass a reference)."""
    import torch

    kernel = kernel or varlen_kernel()
    configs = sdpa_configs(model)
    if not active or kernel is None or not configs:
        if active and torch.cuda.is_available() and notes is not None:
            notes.append("Packed rows attend through SDPA with a block mask (this PyTorch has no varlen_attn)."
                          if kernel is None else "Packed rows: the model does not attend through SDPA; kept as is.")
        yield False
        return
    register_packed(kernel)
    if notes is not None:
        notes.append("Packed rows attend through flash attention's variable-length kernel (varlen_attn): each "
                     "row attends to itself alone, no work on the masked-out pairs.")
    with replacing_sdpa(configs, PACKED_IMPLEMENTATION):
        yield True


@contextmanager
def replacing_sdpa(configs: list, implementation: str) -> Iterator[None]:
    """For the block, each of `configs` (those attending with SDPA) attends with `implementation`; each
    config is switched on its own and gets its own value back."""
    saved = [(config, config.__dict__.get("_attn_implementation_internal", "sdpa")) for config in configs]
    try:
        for config in configs:
            set_implementation(config, implementation)
        yield
    finally:
        for config, value in saved:
            set_implementation(config, value)


def set_implementation(config, value) -> None:
    """Set one config's attention implementation (transformers' setter would also overwrite its sub-configs)."""
    if "_attn_implementation_internal" in config.__dict__:
        config.__dict__["_attn_implementation_internal"] = value  # this config only, not its sub-configs
    else:
        config._attn_implementation = value


def sdpa_configs(model) -> list:
    """The configs of `model` (`attention_configs`) that attend through SDPA: what `packed_row_attention`
    switches to varlen_attn."""
    return [c for c in attention_configs(model) if getattr(c, "_attn_implementation", None) == "sdpa"]


def attention_configs(model) -> list:
    """The model's config and every other config object its modules hold (e.g. a text sub-config)."""
    found: dict = {}
    for module in [model, *model.modules()]:
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found[id(config)] = config
    return list(found.values())
