"""A decode-step kernel for 4-bit NF4 layers: one or two single-token rows, the weights read once.

A 4-bit 7B decode step spends most of its GPU time in bitsandbytes' one-row kernel, which reads the
weights at about a fifth of an H200's memory bandwidth. This Triton kernel does the same product
(NF4 code times its block's scale, double-quantized scales included, summed in fp32) for up to two
rows at once, in one compiled program whatever the number of rows, so a row's numbers do not depend
on the other row: a chat (one row) and side by side (a base row and an adapter row) give each row the
same bits. The numbers differ from bitsandbytes' in the last bits (another order of addition).

`nf4_rows_kernel(model)` puts it on every eligible 4-bit layer for the duration of a block (the graph
decoder's generations on a GPU); a layer falls back to its own forward for anything else (a prompt of
many tokens, more than two rows, another quantization, no CUDA). Triton comes with PyTorch's CUDA
builds; without it nothing changes.
"""

from __future__ import annotations

import functools
import logging
import types
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

MAX_ROWS = 2       # rows one call takes (the kernel is compiled for exactly this many)
BLOCKSIZE = 64     # the NF4 block size the kernel reads (bitsandbytes' default, the tutorial's)

@functools.lru_cache(maxsize=1)
def _build_kernel():
    """The Triton kernel, made on first use (importing triton is slow and needs a CUDA build)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["M"])  # one compiled program for one row and for two: the same bits per row
    def nf4_rows(x_ptr, packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset, lut_ptr, bias_ptr, out_ptr,
                 M, N, K, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        n_ok = n < N
        m_ok = m < M
        half_k = K // 2
        blocks_per_row = K // 64
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for start in range(0, half_k, BLOCK_P):
            p = start + tl.arange(0, BLOCK_P)  # packed bytes: element 2p in the high nibble, 2p + 1 in the low
            p_ok = p < half_k
            w_ok = n_ok[:, None] & p_ok[None, :]
            packed = tl.load(packed_ptr + n[:, None] * half_k + p[None, :], mask=w_ok, other=0).to(tl.int32)
            block = n[:, None] * blocks_per_row + (p[None, :] * 2) // 64
            if NESTED:
                code = tl.load(absmax_ptr + block, mask=w_ok, other=0).to(tl.int32)
                scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + block // 256, mask=w_ok, other=0.0) + offset
            else:
                scale = tl.load(absmax_ptr + block, mask=w_ok, other=0.0)
            w_even = tl.load(lut_ptr + ((packed >> 4) & 15)) * scale
            w_odd = tl.load(lut_ptr + (packed & 15)) * scale
            x_ok = m_ok[:, None] & p_ok[None, :]
            x_even = tl.load(x_ptr + m[:, None] * K + 2 * p[None, :], mask=x_ok, other=0.0).to(tl.float32)
            x_odd = tl.load(x_ptr + m[:, None] * K + 2 * p[None, :] + 1, mask=x_ok, other=0.0).to(tl.float32)
            acc += tl.sum(x_even[:, None, :] * w_even[None, :, :] + x_odd[:, None, :] * w_odd[None, :, :], axis=2)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    return nf4_rows


def eligible(module) -> bool:
    """A bitsandbytes 4-bit layer this kernel computes: NF4, blocks of 64, 8-bit packed, on a GPU."""
    import torch

    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if type(weight).__name__ != "Params4bit" or state is None or not weight.is_cuda:
        return False
    out_features, in_features = (tuple(state.shape) + (0, 0))[:2]
    return (state.quant_type == "nf4" and state.blocksize == BLOCKSIZE and weight.dtype == torch.uint8
            and in_features % BLOCKSIZE == 0 and out_features > 0
            and (not state.nested or state.state2.blocksize == 256))


def nf4_rows_linear(module, x):
    """`module(x)` for a 4-bit NF4 layer and at most MAX_ROWS single-token rows, by the Triton kernel."""
    import torch

    state = module.weight.quant_state
    out_features, in_features = state.shape
    rows = x.reshape(-1, in_features)
    compute = (module.compute_dtype or x.dtype)
    rows = rows.to(compute).contiguous()
    out = torch.empty((rows.shape[0], out_features), dtype=compute, device=x.device)
    nested = bool(state.nested)
    lut, offset = module.studio_nf4
    block_n = 16 if out_features >= 2048 else 4
    bias = module.bias
    _build_kernel()[(-(-out_features // block_n),)](
        rows, module.weight.data, state.absmax,
        state.state2.code if nested else lut, state.state2.absmax if nested else lut,
        offset, lut, bias if bias is not None else lut, out,
        rows.shape[0], out_features, in_features, NESTED=nested, HAS_BIAS=bias is not None,
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_P=128, num_warps=4)
    return out.to(x.dtype).reshape(*x.shape[:-1], out_features)


def _prepare(module) -> None:
    """Keep on the layer what the kernel reads besides the weights: the NF4 table as fp32 on its device and
    the double quantization's offset as a number (read here, not while a CUDA graph records)."""
    import torch

    state = module.weight.quant_state
    lut = state.code.to(device=module.weight.device, dtype=torch.float32).contiguous()
    module.studio_nf4 = (lut, float(state.offset) if state.nested else 0.0)


def _rows_forward(self, x, *args, **kwargs):
    """The layer's forward: the Triton kernel for a few single-token rows, its own forward otherwise
    (and from then on, for this block, if the kernel fails here: the log says why)."""
    if x.is_cuda and x.numel() // x.shape[-1] <= MAX_ROWS and not x.requires_grad \
            and "studio_nf4_failed" not in self.__dict__:
        try:
            return nf4_rows_linear(self, x)
        except Exception as exc:  # a Triton that cannot build or run it: bitsandbytes' forward instead
            self.studio_nf4_failed = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            log.warning("4-bit decode kernel failed, using bitsandbytes' forward: %s", self.studio_nf4_failed)
    return self.studio_own_forward(x, *args, **kwargs)


def triton_available() -> str | None:
    """None when the kernel can run here, else why not."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    return None


@contextmanager
def nf4_rows_kernel(model) -> Iterator[str]:
    """The kernel on every eligible 4-bit layer of `model` for the block; yields a note of what was done."""
    reason = triton_available()
    if reason:
        yield f"4-bit decode kernel skipped: {reason}."
        return
    patched = []  # (module, its own instance forward or None)
    try:
        for module in model.modules():
            if eligible(module):
                patched.append((module, module.__dict__.get("forward")))
                _prepare(module)
                module.studio_own_forward = module.forward
                module.forward = types.MethodType(_rows_forward, module)
        yield (f"4-bit decode kernel on {len(patched)} layers." if patched
               else "4-bit decode kernel skipped: no NF4 layers with blocks of 64.")
    finally:
        for module, own in reversed(patched):
            module.__dict__.pop("studio_own_forward", None)
            module.__dict__.pop("studio_nf4", None)
            module.__dict__.pop("studio_nf4_failed", None)
            if own is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = own
