"""LoRA dropout whose mask is drawn again, not kept: a function of a pass's seed, the layer and the position.

PyTorch's dropout draws its mask from the generator's running state and keeps it (one byte an input
value) for the backward. Two things in CUDA-graphed training want another kind:

- **Checkpointing inside a graph.** A checkpointed layer runs its forward again during the backward.
  PyTorch's checkpoint replays the generator's state for that, reading it back to the host, which a
  CUDA graph cannot hold; without the replay the recomputed forward would draw another mask than the
  forward whose loss the gradients are for. Here the mask depends only on a seed tensor drawn once per
  training pass (on the device, so each replay of a graph draws a new one), the layer's number and the
  position: the recomputed forward gets the same mask with no generator state to replay.
- **Memory.** Nothing of the mask is kept: the backward draws it again. The input the update's
  product needs is kept undropped, which the base layer's product or the layer before often keeps
  already (q, k and v share one input); PyTorch's dropout keeps a dropped copy per projection.

Used where a CUDA-graphed run checkpoints layers (the 24 GB preset). Where it does not (Fast), PyTorch's
dropout keeps its mask, inside the graphs too: the redraws cost more than the kept mask's memory
traffic. On an H100 (`step_probe-dropout-cost-h100-80gb-hbm3-2026-12-06.json`) this kernel took 7.9 ms
of a 38 ms 0.5B step and 24 ms of a 150 ms 7B step; the kept mask ran Fast 14% faster on the 0.5B
(59,531 against 52,247 tokens/s) and 20% on the 7B (13,788 against 11,477), at 5.4 GiB more on the 7B.

On a CUDA GPU one Triton kernel draws and applies the mask (Philox, `tl.rand`, one draw per value);
elsewhere (the CPU tests), or without Triton, the same draw is an integer hash in PyTorch operations.
Each keeps an input value with probability 1 - rate and scales it by 1 / (1 - rate), as PyTorch's
dropout does; the two draw different masks from the same seed.
"""

from __future__ import annotations

import torch

LAYERS_PER_SEED = 4096  # a pass's seed times this plus the layer's number keys each layer's draw
BLOCK = 2048  # values a program of the Triton kernel takes
_HASH_MULTIPLIER = 0x45D9F3B
_LOW_32 = 0xFFFFFFFF


class DropoutSeeds:
    """The seed of the current training pass (one int64 on the model's device) and the per-layer dropouts
    that draw from it. `refresh()` draws the next pass's seed from PyTorch's generator, on the device:
    call it at the start of each pass (inside a CUDA graph's capture, so that each replay draws anew)."""

    def __init__(self, device):
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.refresh()

    def refresh(self) -> None:
        self.seed.random_(0, 2**31 - 1)

    def layer(self, number: int) -> "LayerDropout":
        """The dropout of the LoRA layer numbered `number` (layers 4,096 apart share their masks)."""
        return LayerDropout(self, number % LAYERS_PER_SEED)


class LayerDropout:
    """One LoRA layer's dropout: the same mask for the same pass (seed) on every call. `self(x, rate)` drops
    `x`; `self.pair(x, y, rate)` drops two tensors of one size (or `y` None) with the one mask (the
    backward's input and gradient)."""

    def __init__(self, seeds: DropoutSeeds, number: int):
        self.seeds, self.number = seeds, number

    def __call__(self, x: torch.Tensor, rate: float) -> torch.Tensor:
        return self.pair(x, None, rate)[0]

    def pair(self, x: torch.Tensor, y: torch.Tensor | None, rate: float) -> tuple:
        if rate <= 0:
            return x, y
        if y is not None and y.numel() != x.numel():
            raise ValueError(f"one mask for two tensors of {x.numel()} and {y.numel()} values")
        x = x.contiguous()
        y = None if y is None else y.contiguous()
        # the kernel's positions are int32: the hash in PyTorch takes what would not fit
        on_gpu = _dropout_kernel is not None and x.is_cuda and x.numel() <= 2**31 - 2 * BLOCK
        drop = self._drop_on_gpu if on_gpu else self._drop_in_torch
        return tuple(None if t is None else drop(t, rate) for t in (x, y))

    def _drop_in_torch(self, t: torch.Tensor, rate: float) -> torch.Tensor:
        return _dropout_torch(t, self.seeds.seed, self.number, rate)

    def _drop_on_gpu(self, t: torch.Tensor, rate: float) -> torch.Tensor:
        out = torch.empty_like(t)
        _dropout_kernel[(-(-t.numel() // BLOCK),)](t, out, self.seeds.seed, self.number, t.numel(), rate,
                                                   1.0 / (1.0 - rate), LAYERS_PER_SEED, BLOCK=BLOCK)
        return out


def _dropout_torch(x: torch.Tensor, seed: torch.Tensor, number: int, rate: float) -> torch.Tensor:
    """The draw as an integer hash of (seed, layer, position) in PyTorch operations (no host read). The key
    is mixed on its own first and then mixed with the position twice, so that two keys' masks are not
    the same mask at shifted positions (as a position combined with the raw key would give)."""
    key = seed * LAYERS_PER_SEED + number
    low = _mix32(key & _LOW_32)
    high = _mix32(((key >> 32) & _LOW_32) ^ low ^ 0x9E3779B9)
    h = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = _mix32(_mix32(h ^ low) ^ high)
    uniform = h.to(torch.float64) / 2.0**32
    return torch.where(uniform >= rate, x * (1.0 / (1.0 - rate)), torch.zeros((), dtype=x.dtype, device=x.device))


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (values stay below 2**32, so the products fit in int64)."""
    h = (((h >> 16) ^ h) * _HASH_MULTIPLIER) & _LOW_32
    h = (((h >> 16) ^ h) * _HASH_MULTIPLIER) & _LOW_32
    return (h >> 16) ^ h


try:  # Triton comes with PyTorch's CUDA builds; the CPU tests run without it (the kernel is then None)
    import triton
    import triton.language as tl
except ImportError:
    _dropout_kernel = None
else:
    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, seed_ptr, number, n, rate, scale, layers_per_seed, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        key = tl.load(seed_ptr) * layers_per_seed + number
        keep = tl.rand(key, offsets) >= rate
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0)
        dropped = tl.where(keep, x.to(tl.float32) * scale, 0.0)
        tl.store(out_ptr + offsets, dropped.to(x.dtype), mask=inside)
