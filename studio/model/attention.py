"""Attention without cuDNN's fused kernel, for training and for decoding on a GPU.

PyTorch prefers cuDNN's fused attention on Hopper GPUs. Measured on an H200:
- training: cuDNN builds an execution plan for every new sequence length (about 2 ms of CPU per layer
  call, far more the first time a length is seen); packed rows of new lengths ran at 2,193 tokens/s
  with it and 4,300 without (bench/profile_speed.py);
- decoding: over the static KV cache it gave different greedy replies to the same question; without
  it, the same reply every time (bench/decode_repeatability.py).
PyTorch's flash and memory-efficient kernels are used instead. The switch is process-wide; the model
manager's lease makes the holder its only user while it is off.
"""

from __future__ import annotations

from contextlib import contextmanager


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
