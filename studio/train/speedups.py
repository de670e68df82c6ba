"""Training-only speed switches (TrainSettings): applied when training starts, undone when it ends.

The studio trains an adapter on the model it also chats with, so nothing here may outlive the run:
each switch patches module instances (and, for Liger's RoPE, one function of the model's transformers
module), records how to undo that, and `training_speedups` undoes it all on the way out, whether the
run ends or fails. None of them changes the loss beyond rounding (tests/test_speed_settings.py,
bench/train_speed.py).

- `liger_kernels`: the liger-kernel package's Triton kernels (RMSNorm, RoPE, SwiGLU, and a fused
  linear cross-entropy that never builds the logits; not with CUDA graphs, whose passes compute the
  studio's chunked loss instead, `studio.train.fused_loss`), by instance. Optional: absent, or without
  a CUDA GPU, the run goes on without it and says so.
- `dequantize_base`: each 4-bit base layer gets a bf16 copy of its weight, dequantized once (the same
  values bitsandbytes dequantizes on every pass), and runs as a plain linear layer.
- `compile_layers`: `torch.compile` of each decoder layer, with dynamic shapes. With `liger_kernels`
  too, Liger keeps only its fused linear cross-entropy (outside the layers): inductor fuses the
  norms, RoPE and SwiGLU itself, and fails on Liger's RMSNorm kernel.
- Always (not a switch): while training, each LoRA layer computes its base output plus the trained
  adapter's update only (`only_trained_adapter`, `studio.model.routing.only_adapter`): peft's
  arithmetic in its order, without its per-call walk over the attached adapters and the copy of the
  base output its 4-bit layers make.
- `checkpoint_fraction`: with gradient checkpointing on, only that share of the decoder layers
  recomputes its activations (spread evenly), a callback set after the Trainer switches it on.
"""

from __future__ import annotations

import types
from contextlib import ExitStack, contextmanager

from transformers import TrainerCallback

# liger_available is imported from here by studio.train.memory
from studio.model.kernels import apply_liger, forget_instance_attributes, liger_available  # noqa: F401

COMPILE_BACKEND = "inductor"  # tests on the CPU use "aot_eager" (same graphs, no C++ build)


def decoder_layers(model) -> list:
    """The repeated decoder blocks of a transformers model (under a PeftModel too)."""
    from studio.model.card import base_of

    inner = getattr(base_of(model), "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []


def _dense_forward(self, x, *args, **kwargs):
    """A 4-bit layer's forward from its dequantized copy: what bitsandbytes computes, minus the dequantize."""
    import torch

    weight = self.studio_dense_weight
    bias = None if self.bias is None else self.bias.to(weight.dtype)
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias).to(x.dtype)


def dequantize_base(model, undo: list) -> str:
    """Give each 4-bit base layer a dequantized weight for the run; `undo` drops the copies."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return "Dequantized base skipped: bitsandbytes is not installed."
    import torch

    from studio.model.card import base_of

    patched, total = [], 0
    for module in base_of(model).modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        dtype = module.compute_dtype or torch.bfloat16
        with torch.no_grad():
            dense = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).to(dtype)
        module.studio_dense_weight = dense
        module.forward = types.MethodType(_dense_forward, module)
        patched.append(module)
        total += dense.numel() * dense.element_size()

    def restore():
        for module in patched:
            forget_instance_attributes(module, ("forward", "studio_dense_weight"))

    undo.append(restore)
    if not patched:
        return "Dequantized base skipped: the model has no 4-bit layers."
    return f"Dequantized base on: {len(patched)} 4-bit layers, {total / 2**30:.1f} GiB of bf16 copies."


def compile_layers(model, undo: list, notes: list | None = None, signature: tuple = ()) -> str:
    """Compile each decoder layer (as `nn.Module.compile` does). If compiling fails on this machine (no
    working Triton or C compiler, an unsupported op), every layer goes back to eager for the rest of the
    run and `notes` (the job's log) says why: the run goes on, only slower.

    The compiled code outlives the run: the layers' LoRA forward names no adapter
    (`only_trained_adapter`), so the next run on the same model with the same `signature` (LoRA shape,
    switches) reuses it and starts at full speed. A run with another signature drops it first
    (`torch._dynamo.reset`), so recompilations never pile up until dynamo silently gives up."""
    import torch

    layers = decoder_layers(model)
    if not layers:
        return "torch.compile skipped: no decoder layers found."
    if COMPILE_BACKEND == "inductor" and not torch.cuda.is_available():
        return "torch.compile skipped: it is measured and used on CUDA GPUs only."

    def back_to_eager(exc: Exception) -> None:
        base.studio_compiled_for = None  # nothing of this compile is kept
        for layer in layers:
            layer._compiled_call_impl = None
        while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
            exc = inner  # dynamo wraps the compiler's own error
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        if notes is not None:
            notes.append(f"torch.compile failed here ({type(exc).__name__}: {reason}); the run goes on without it.")

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    reused = getattr(base, "studio_compiled_for", None) == signature
    if not reused:
        torch._dynamo.reset()
        base.studio_compiled_for = signature
    for layer in layers:
        compiled = torch.compile(layer._call_impl, dynamic=True, backend=COMPILE_BACKEND)
        layer._compiled_call_impl = _eager_if_compiling_fails(layer, compiled, back_to_eager)
    # Compile the backward with the forward (not at the first backward), so its failure is caught above too.
    functorch_config = torch._functorch.config
    eager_backward = getattr(functorch_config, "force_non_lazy_backward_lowering", None)
    if eager_backward is not None:
        functorch_config.force_non_lazy_backward_lowering = True

    def restore():
        for layer in layers:
            layer._compiled_call_impl = None  # what nn.Module.compile sets; the layer runs eagerly again
        if eager_backward is not None:
            functorch_config.force_non_lazy_backward_lowering = eager_backward

    undo.append(restore)
    backend = getattr(COMPILE_BACKEND, "__name__", COMPILE_BACKEND)
    if reused:
        return (f"torch.compile on {len(layers)} decoder layers ({backend}): the code compiled for an earlier run "
                "with these settings is reused.")
    return (f"torch.compile on {len(layers)} decoder layers ({backend}): the first steps wait for the compile "
            "(a minute or two the first time on a machine, about 10 s once its compile cache is warm).")


def _eager_if_compiling_fails(layer, compiled, on_failure):
    """The layer's compiled call; on an error other than running out of memory, `on_failure` switches
    every layer back to eager and this call runs eagerly (a compile error happens before any work)."""
    import torch

    def call(*args, **kwargs):
        if layer._compiled_call_impl is None:  # another layer's compile failed first
            return layer._call_impl(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  (any compiler failure: the run goes on eagerly)
            on_failure(exc)
            return layer._call_impl(*args, **kwargs)

    return call


@contextmanager
def only_trained_adapter(model, name: str, on: bool = True):
    """`studio.model.routing.only_adapter` for the block, where the model holds `name` as plain LoRA;
    peft's own forward otherwise (a LoRA variant, whole saved modules) or when not `on`."""
    from studio.model.routing import only_adapter

    with ExitStack() as stack:
        if on and name in getattr(model, "peft_config", {}):
            try:
                stack.enter_context(only_adapter(model, name))
            except ValueError:  # a set-up the routing cannot honour: peft's forward does the work
                pass
        yield


@contextmanager
def training_speedups(model, settings, fused_loss: bool = True):
    """Apply the switches of `settings` for the duration of the block; yields what was applied or skipped.
    `fused_loss=False` leaves the loss to the model (CUDA-graphed passes: Liger's fused loss reads a
    count back to the host, which a graph cannot hold; `chunked_loss` replaces it there)."""
    undo: list = []
    notes: list[str] = []
    try:
        if getattr(settings, "liger_kernels", False):
            # Compiled layers fuse RMSNorm, RoPE and SwiGLU themselves; Liger keeps the loss.
            notes.append(apply_liger(model, undo, fused_linear_cross_entropy=fused_loss,
                                     layer_kernels=not getattr(settings, "compile_layers", False)))
        if getattr(settings, "dequantize_base", False):
            notes.append(dequantize_base(model, undo))
        if getattr(settings, "compile_layers", False):
            notes.append(compile_layers(model, undo, notes, compile_signature(model, settings)))
        yield notes
    finally:
        for restore in reversed(undo):
            restore()


def redraws_dropout(settings, graphs: bool) -> bool:
    """Whether a run's LoRA dropout draws its mask again (`redrawn_dropout`) rather than keeping PyTorch's:
    only where CUDA graphs recompute checkpointed layers, which must draw the forward's mask again
    without the generator's state. Elsewhere the kept mask is faster (`studio.model.lora_dropout`)."""
    return graphs and bool(getattr(settings, "gradient_checkpointing", False))


@contextmanager
def redrawn_dropout(model, name: str, on: bool):
    """With `on` (a CUDA-graphed run that checkpoints layers), each LoRA layer training `name` draws its
    dropout mask from a seed per pass (`studio.model.lora_dropout`): the backward draws it again instead
    of keeping it, and a checkpointed layer's recomputation draws the same mask without the generator's
    state, which a graph cannot read back. Yields the run's `DropoutSeeds` (call `refresh()` at the start
    of each pass), or None."""
    from studio.model.routing import lora_layers

    layers = [layer for layer in lora_layers(model) if name in layer.lora_A] if on else []
    if not layers:
        yield None
        return
    from studio.model.lora_dropout import DropoutSeeds

    seeds = DropoutSeeds(layers[0].lora_A[name].weight.device)
    for number, layer in enumerate(layers):
        layer.__dict__["studio_dropout"] = seeds.layer(number)
    try:
        yield seeds
    finally:
        for layer in layers:
            layer.__dict__.pop("studio_dropout", None)


def dropout_kept_by_peft(model) -> int:
    """How many LoRA layers train an adapter with dropout through peft's own forward (PyTorch's dropout,
    whose mask a checkpointed recomputation draws anew unless the generator's state is replayed)."""
    from studio.model.routing import lora_layers

    count = 0
    for layer in lora_layers(model):
        in_one_node = getattr(layer.__dict__.get("forward"), "studio_trains_in_one_node", False)
        trained = [name for name, module in layer.lora_A.items() if module.weight.requires_grad]
        if not in_one_node and any(float(getattr(layer.lora_dropout[name], "p", 0.0)) > 0 for name in trained):
            count += 1
    return count


@contextmanager
def chunked_loss(model, notes: list, on: bool):
    """With `on` (the run's passes go into CUDA graphs), the model's training loss is computed chunk by
    chunk, without float32 logits or a host read (`studio.train.fused_loss`); otherwise nothing changes."""
    if not on:
        yield False
        return
    from studio.train.fused_loss import fused_training_loss

    with fused_training_loss(model, notes) as applied:
        yield applied


def compile_signature(model, settings) -> tuple:
    """What compiled layers depend on besides the shapes of a batch: the trained adapter's LoRA shape and
    the run's other switches (a run with another signature compiles afresh)."""
    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    lora = (config.r, config.lora_alpha, config.lora_dropout, tuple(sorted(config.target_modules or ())),
            getattr(config, "bias", None)) if config is not None else None
    switches = tuple(getattr(settings, name, None) for name in (
        "liger_kernels", "dequantize_base", "gradient_checkpointing", "checkpoint_fraction", "packing", "precision"))
    return lora, switches


def checkpointed_layers(count: int, fraction: float) -> list[bool]:
    """Which of `count` layers recompute activations, spread evenly: layer i if floor((i+1)f) > floor(i f)."""
    import math

    fraction = min(1.0, max(0.0, fraction))
    return [math.floor((i + 1) * fraction + 1e-9) > math.floor(i * fraction + 1e-9) for i in range(count)]


class PartialCheckpointing(TrainerCallback):
    """After the Trainer turns gradient checkpointing on for every layer, keep it on for a share only."""

    def __init__(self, fraction: float):
        self.fraction = fraction

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = decoder_layers(model)
        for layer, keep in zip(layers, checkpointed_layers(len(layers), self.fraction)):
            if hasattr(layer, "gradient_checkpointing"):
                layer.gradient_checkpointing = keep
