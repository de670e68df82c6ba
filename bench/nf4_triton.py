"""A Triton kernel for one or two rows times an NF4 weight: tried for the graph decoder's step, not used.

A decode step of a 4-bit 7B model multiplies one token (two, side by side) by every 4-bit weight.
bitsandbytes' few-row kernel reads those weights at about 1 TB/s on an H200 (`bench/nf4_kernels.py`),
a quarter of the memory's bandwidth; its products take more than half of the step. This kernel reads
the packed weight with wide loads, dequantizes it in registers (the NF4 table, the 8-bit absmax
decoded through its own table and second-level scale, as bitsandbytes stores them) and multiplies in
fp32, the products added up element-wise and summed once at the end; the weight is read once for
all the rows of the call, and a row's result does not depend on how many rows the call has.

Measured with `bench/nf4_kernels.py --sweep` on the H200 (`nf4_kernels-h200-2026-11-29.json`), it
is correct (within bf16 rounding of bitsandbytes) but 1.5x slower than bitsandbytes' kernel with
its best launch settings (gate_proj 53 us against 35 us; 6.1 ms a step's products against 3.8 ms).
Two other layouts were slower still: a reduction per block inside the loop (8.4 ms a step), and
32-bit words with one 64-bit lookup per byte (11.2 ms). The kernel is bound by the instructions
that decode each nibble, not by memory; the studio keeps bitsandbytes' kernel. Kept here so the
measurement can be repeated.
"""

from __future__ import annotations

import functools
BLOCK = 64    # bitsandbytes' 4-bit block (elements per absmax), the only one this kernel reads


@functools.lru_cache(maxsize=None)
def _kernel():
    """The Triton kernel (compiled per shape class on first use)."""
    import triton
    import triton.language as tl

    @triton.jit
    def nf4_rows_kernel(x_ptr, w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, nf4_ptr, bias_ptr, out_ptr,
                        offset, N, K,
                        ROWS: tl.constexpr, NESTED: tl.constexpr, HAS_BIAS: tl.constexpr,
                        BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        # one program: BLOCK_N outputs of ROWS rows; K is walked GROUPS blocks of 64 at a time, the
        # products added up element-wise and summed once at the end
        pid = tl.program_id(0)
        first_row = tl.program_id(1) * ROWS                       # more rows than ROWS: more programs
        x_ptr += first_row * K
        out_ptr += first_row * N
        n = pid * BLOCK_N + tl.arange(0, BLOCK_N)                 # [BN] output features
        n_ok = n < N
        n_in = tl.where(n_ok, n, 0)                               # in-bounds index for the loads
        r = tl.arange(0, ROWS)                                    # [R]
        g = tl.arange(0, GROUPS)                                  # [G] blocks of this stride
        j = tl.arange(0, 32)                                      # [32] bytes of a block
        row_bytes = K // 2
        blocks_per_row = K // 64
        acc = tl.zeros([ROWS, BLOCK_N, GROUPS, 32], dtype=tl.float32)
        for k0 in range(0, K, GROUPS * 64):
            block = k0 // 64 + g                                  # [G] block within the weight's row
            byte = (n_in[:, None, None].to(tl.int64) * row_bytes + block[None, :, None] * 32
                    + j[None, None, :])
            packed = tl.load(w_ptr + byte).to(tl.int32)           # [BN, G, 32]
            index = n_in[:, None].to(tl.int64) * blocks_per_row + block[None, :]  # [BN, G]
            if NESTED:
                code = tl.load(absmax_ptr + index).to(tl.int32)
                scale = tl.load(code2_ptr + code) * tl.load(absmax2_ptr + index // 256) + offset
            else:
                scale = tl.load(absmax_ptr + index)
            high = tl.load(nf4_ptr + (packed >> 4)) * scale[:, :, None]   # element 2i: the high nibble
            low = tl.load(nf4_ptr + (packed & 15)) * scale[:, :, None]    # element 2i + 1: the low one
            xk = k0 + g[:, None] * 64 + 2 * j[None, :]            # [G, 32] the even elements' columns
            x_at = x_ptr + r[:, None, None] * K + xk[None, :, :]  # [R, G, 32]
            x_even = tl.load(x_at).to(tl.float32)
            x_odd = tl.load(x_at + 1).to(tl.float32)
            acc += high[None] * x_even[:, None] + low[None] * x_odd[:, None]
        total = tl.sum(tl.sum(acc, axis=3), axis=2)               # [R, BN]
        result = total.to(out_ptr.dtype.element_ty)
        if HAS_BIAS:  # as bitsandbytes: the product rounded, then the bias added
            result = (result.to(tl.float32) + tl.load(bias_ptr + n_in).to(tl.float32)[None, :])
            result = result.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + r[:, None] * N + n[None, :], result, mask=n_ok[None, :])

    return nf4_rows_kernel


def launch_config(out_features: int, in_features: int) -> tuple[int, int, int]:
    """(BLOCK_N, GROUPS, num_warps) for a weight shape: GROUPS blocks of 64 per step along K (a
    divisor of the row's blocks), BLOCK_N outputs per program (fewer for narrow weights, so every
    multiprocessor gets programs). Chosen with `bench/nf4_kernels.py --sweep` on the H200."""
    blocks = in_features // BLOCK
    groups = next(g for g in (8, 4, 2, 1) if blocks % g == 0)
    block_n = 16 if out_features >= 4096 else 8 if out_features >= 1024 else 4
    return block_n, groups, 4


class _Layer:
    """The tensors the kernel reads for one 4-bit layer, gathered once."""

    def __init__(self, module, dtype):
        import torch

        state = module.weight.quant_state
        self.out_features, self.in_features = (int(d) for d in state.shape)
        self.weight = module.weight.data
        self.nf4 = state.code.to(device=self.weight.device, dtype=torch.float32).contiguous()
        self.nested = bool(state.nested)
        if self.nested:
            self.absmax = state.absmax.contiguous()
            self.code2 = state.state2.code.to(torch.float32).contiguous()
            self.absmax2 = state.state2.absmax.to(torch.float32).contiguous()
            self.offset = float(state.offset)
        else:
            self.absmax = state.absmax.to(torch.float32).contiguous()
            self.code2 = self.absmax2 = self.absmax
            self.offset = 0.0
        self.bias = module.bias
        self.dtype = getattr(module, "compute_dtype", None) or dtype  # the inputs the kernel takes
        self.config = launch_config(self.out_features, self.in_features)


def products(layer: _Layer, x, config: tuple[int, int, int] | None = None, rows_per_program: int | None = None):
    """x (rows, in_features), 1 or 2 rows, bf16 or fp16 on the GPU -> (rows, out_features).

    By default one program takes every row (the weight is read and dequantized once);
    `rows_per_program=1` gives each row programs of its own (the same compiled kernel as one row)."""
    import torch
    import triton

    rows = x.shape[0]
    together = rows if rows_per_program is None else rows_per_program
    block_n, groups, warps = config or layer.config
    out = torch.empty((rows, layer.out_features), dtype=x.dtype, device=x.device)
    bias = layer.bias if layer.bias is not None else out
    grid = (triton.cdiv(layer.out_features, block_n), rows // together)
    _kernel()[grid](x.contiguous(), layer.weight, layer.absmax, layer.code2, layer.absmax2, layer.nf4, bias, out,
                    layer.offset, layer.out_features, layer.in_features,
                    ROWS=together, NESTED=layer.nested, HAS_BIAS=layer.bias is not None,
                    BLOCK_N=block_n, GROUPS=groups, num_warps=warps)
    return out
