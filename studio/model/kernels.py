"""Fused Triton kernels from the liger-kernel package, put on a model instance and taken off again.

Training (`studio.train.speedups`, the `liger_kernels` switch) uses them with the fused linear
cross-entropy; the graph decoder (`studio.model.graph_decode`) uses RMSNorm, RoPE and SwiGLU for the
duration of each generation on a GPU: a decode step of a 4-bit 7B model is some 1,400 small kernels,
and these three cut about 650 of them. Each of them computes a row (a token) in one program whatever
the batch, so a row's numbers do not depend on the other rows: side by side still equals chat.
Optional: without the package, or without a CUDA GPU, nothing is patched and the caller is told why.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


def forget_instance_attributes(module, names) -> None:
    """Drop attributes set on this module instance (a patched forward): its class's are used again."""
    for name in names:
        module.__dict__.pop(name, None)


def liger_available() -> str | None:
    """None when Liger kernels can run here, else why not."""
    import importlib.util

    import torch

    if importlib.util.find_spec("liger_kernel") is None:
        return "the liger-kernel package is not installed"
    if not torch.cuda.is_available():
        return "Liger kernels need a CUDA GPU"
    return None


def apply_liger(model, undo: list, fused_linear_cross_entropy: bool = True, layer_kernels: bool = True) -> str:
    """Liger's kernels on this model instance; `undo` gets the callables that take them off again.
    `fused_linear_cross_entropy` (training) also replaces the model's forward with one that never
    builds the logits; `layer_kernels=False` leaves RMSNorm, RoPE and SwiGLU as they are (compiled
    decoder layers fuse those themselves: torch.compile fails on Liger's RMSNorm kernel)."""
    import importlib

    from studio.model.card import base_of

    reason = liger_available()
    if reason:
        return f"Liger kernels skipped: {reason}."
    base = base_of(model)
    model_type = base.config.model_type
    import liger_kernel.transformers as liger

    apply = getattr(liger, f"apply_liger_kernel_to_{model_type}", None)
    if apply is None:
        return f"Liger kernels skipped: liger-kernel has no kernels for {model_type!r} models."
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    saved_globals = dict(vars(modeling))
    modules = [base, *base.modules()]
    had = [(m, {k: m.__dict__[k] for k in ("forward", "_get_name", "extra_repr") if k in m.__dict__})
           for m in modules]

    def restore():
        for name, value in saved_globals.items():
            if vars(modeling).get(name) is not value:
                setattr(modeling, name, value)
        for module, previous in had:
            forget_instance_attributes(module, ("forward", "_get_name", "extra_repr"))
            module.__dict__.update(previous)

    undo.append(restore)
    apply(model=base, rope=layer_kernels, rms_norm=layer_kernels, swiglu=layer_kernels, cross_entropy=False,
          fused_linear_cross_entropy=fused_linear_cross_entropy)
    names = (["RMSNorm", "RoPE", "SwiGLU"] if layer_kernels else []) + \
        (["fused linear cross-entropy"] if fused_linear_cross_entropy else [])
    return "Liger kernels on: " + ", ".join(names) + "."


@contextmanager
def decode_kernels(model) -> Iterator[str]:
    """Liger's RMSNorm, RoPE and SwiGLU kernels on `model` for the block (a generation); yields a note
    of what was applied or why not, and takes them off again on the way out."""
    undo: list = []
    try:
        note = apply_liger(model, undo, fused_linear_cross_entropy=False)
        yield note
    finally:
        for restore in reversed(undo):
            restore()
