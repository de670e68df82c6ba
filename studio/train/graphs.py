"""CUDA graphs of the decoder layers for packed training passes (`TrainSettings.cuda_graphs`).

A 7B step of the Fast preset is bound by the host on an H200: about 6,300 kernels a step, each
launched from Python (peft's LoRA arithmetic, Liger's kernels, the autograd engine), and the GPU waits
between them (bench/profile_small_train.py: 1.75 s of kernels in 5.5 s of wall clock). With this
switch the forward and backward of the whole stack of decoder layers are captured once per pass size
with PyTorch's `torch.cuda.make_graphed_callables` and replayed: one launch per pass and direction.

- Shapes: a graph replays fixed shapes, so the collator pads each packed pass (`pad_packed`) to a
  multiple of `BUCKET_TOKENS` positions and to a fixed number of segments: the rows, then padding
  segments. Padding attends only to its own segment and its labels are -100, so the loss and the
  gradients are those of the unpadded pass. A new size is captured when the first layer first sees it
  (0.2-0.5 s on an H200's 7B; a run's first size also runs one eager warm-up pass); all sizes share
  one memory pool, as only one runs at a time, and a run keeps at most `MAX_SIZES` of them.
- Loss: with graphs on, the model computes its own loss (lm_head and cross-entropy) rather than Liger's
  fused linear cross-entropy, whose hundreds of small chunks a pass cost more host time than the
  logits' memory is worth on the large GPUs this preset is for
  (bench/results/graphs_probe-flce-h200-2026-11-30.json).
- When: on a CUDA GPU, for packed passes attending through varlen_attn, without gradient checkpointing
  or compiled layers, one pass per optimizer step. `make_graphed_callables` hands autograd its static
  gradient buffers, which the next replay overwrites: fine when the optimizer uses them before the next
  pass and the Trainer's `zero_grad` drops them (it sets them to None). A pass that finds gradients
  already there (a second pass of an accumulation) runs eagerly. Otherwise the run trains eagerly and
  its log says why; so does a model whose attention would need the mask inside the graph
  (`model_problem`). A capture that fails or runs out of memory switches every layer back to eager
  for the rest of the run, and the log says why.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

BUCKET_TOKENS = 256  # pass sizes are padded to a multiple of this (at most this many wasted positions)
MAX_SIZES = 8  # captured pass sizes a run keeps (each holds its own input, output and gradient buffers)
WARMUP_PASSES = 1  # eager passes before the first capture (lazy initialisation stays out of the graph)


def graph_problem(settings, device: str, varlen_on: bool, model=None) -> str | None:
    """Why `settings` cannot train with CUDA graphs on `device` (None when they can); with `model`, its
    layers are checked too (`model_problem`)."""
    if not getattr(settings, "cuda_graphs", False):
        return None
    if not str(device).startswith("cuda"):
        return "they need a CUDA GPU"
    if not settings.packing:
        return "they need packed passes (packing on)"
    if settings.gradient_checkpointing:
        return "not with gradient checkpointing (its recomputation is not captured)"
    if settings.compile_layers:
        return "not with compiled layers"
    if settings.grad_accum != 1:
        return "they need one forward pass per optimizer step (gradient accumulation 1)"
    if not varlen_on:
        return "they need packed rows attending through varlen_attn"
    return model_problem(model) if model is not None else None


def pad_packed(batch: dict, multiple: int, segments: int, pad_id: int = 0, ignore: int = -100) -> dict:
    """Pad one packed batch (transformers' `DataCollatorWithFlattening`, one row of token positions and
    the rows' boundaries) to a multiple of `multiple` positions and exactly `segments` segments: at
    least one padding segment after the rows, each padding segment one position long but the last,
    which takes the rest. Padding tokens are `pad_id`, their labels `ignore`, their positions restart
    at 0 in each segment, and `max_length_q/k` become the padded length (what a graph was captured
    with). A batch with more rows than `segments - 1` is returned as it is."""
    import torch

    starts = batch["cu_seq_lens_q"]
    tokens, rows = batch["input_ids"].shape[1], starts.numel() - 1
    pad_segments = segments - rows
    if batch["input_ids"].shape[0] != 1 or pad_segments < 1:
        return batch
    size = -(-(tokens + pad_segments) // multiple) * multiple
    lengths = [1] * (pad_segments - 1) + [size - tokens - (pad_segments - 1)]
    padding = size - tokens
    positions = torch.cat([torch.arange(n) for n in lengths]).to(batch["position_ids"].dtype).unsqueeze(0)
    bounds = (torch.tensor(lengths).cumsum(0) + tokens).to(starts.dtype)  # int32, as flash attention needs
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"].new_full((1, padding), pad_id)], 1)
    padded["labels"] = torch.cat([batch["labels"], batch["labels"].new_full((1, padding), ignore)], 1)
    padded["position_ids"] = torch.cat([batch["position_ids"], positions], 1)
    padded["cu_seq_lens_q"] = padded["cu_seq_lens_k"] = torch.cat([starts, bounds])
    padded["max_length_q"] = padded["max_length_k"] = size
    return padded


class GraphedLayers:
    """The decoder layers of one training run, replayed from CUDA graphs for padded packed passes.

    `install()` patches each layer's forward. On a pass of a captured size, layer 0 replays one graph
    that runs every layer (forward, and backward when autograd reaches it), and the other layers hand
    its output on untouched; a new size is captured first, when layer 0 sees it. Any other pass (eval,
    no gradients, another shape, a failed capture) runs the layers' own forwards. One graph for the
    whole stack keeps a size's own memory small: its input, output and their gradients, and the
    adapter's gradients; the activations live in the memory pool all sizes share. `remove()` restores
    the forwards and drops the graphs and their pool. `capture` replaces
    `torch.cuda.make_graphed_callables` (the CPU tests pass one without a GPU)."""

    def __init__(self, layers: list, trained: list, notes: list | None = None, capture=None,
                 warmup_passes: int = WARMUP_PASSES):
        self.layers, self.trained, self.notes = layers, trained, notes
        self.capture = capture
        self.warmup_passes = warmup_passes
        self.graphs: dict[tuple, object] = {}  # (positions, segments, input needs grad) -> the graphed stack
        self.failed = False
        self.full = False  # MAX_SIZES sizes captured: new sizes run eagerly
        self.pool = None
        self.originals: list = []  # (layer, its own instance forward or None), for `remove`
        self.eager: list = []  # each layer's forward before `install`
        self.current: tuple | None = None  # the size of the pass under way, when layer 0 replayed it
        self.replayed_passes = 0
        self.captured: list[dict] = []  # each size captured: positions, segments, seconds

    # ----- switching on and off -------------------------------------------------------------------
    def install(self) -> None:
        for index, layer in enumerate(self.layers):
            self.originals.append((layer, layer.__dict__.get("forward")))
            self.eager.append(layer.forward)
            layer.forward = self._forward_for(index)

    def remove(self) -> None:
        for layer, saved in reversed(self.originals):
            if saved is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = saved
        self.originals.clear()
        self.eager.clear()
        self.graphs.clear()
        self.pool = None

    # ----- one layer's call -----------------------------------------------------------------------
    def _forward_for(self, index: int):
        def forward(hidden_states, *args, **kwargs):
            if index > 0:
                if self.current is not None:
                    return hidden_states  # layer 0's graph ran this layer already
                return self.eager[index](hidden_states, *args, **kwargs)
            self.current = None if args else self._key(hidden_states, kwargs)
            if self.current is not None and self.current not in self.graphs:
                if len(self.graphs) < MAX_SIZES:
                    self._capture(self.current, hidden_states, kwargs)
                elif not self.full:
                    self.full = True
                    if self.notes is not None:
                        self.notes.append(f"CUDA graphs: {MAX_SIZES} pass sizes captured, the most a run keeps; "
                                          "passes of other sizes run eagerly.")
            if self.current not in self.graphs:
                self.current = None
                return self.eager[0](hidden_states, *args, **kwargs)
            self.replayed_passes += 1
            cos, sin = kwargs["position_embeddings"]
            return self.graphs[self.current](hidden_states, cos, sin, kwargs["cu_seq_lens_q"])

        return forward

    def _key(self, hidden, kwargs) -> tuple | None:
        """The size of the pass that layer 0 starts, when it can replay a graph; None for an eager pass."""
        import torch

        if self.failed or not torch.is_grad_enabled() or not self.layers[0].training:
            return None
        starts, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
        if (starts is None or kwargs.get("position_embeddings") is None or hidden.dim() != 3 or hidden.shape[0] != 1
                or longest != hidden.shape[1] or hidden.shape[1] % BUCKET_TOKENS):
            return None
        if any(p.grad is not None for p in self.trained):
            return None  # gradients of an earlier pass not yet used: the graph's buffers would overwrite them
        return hidden.shape[1], starts.numel(), hidden.requires_grad

    # ----- capture --------------------------------------------------------------------------------
    def _capture(self, key: tuple, hidden, kwargs) -> None:
        """Capture the stack's forward and backward for the size `key`; on failure, eager from now on."""
        import torch

        started = time.perf_counter()
        cos, sin = (t.detach().clone() for t in kwargs["position_embeddings"])
        sample = (hidden.detach().clone().requires_grad_(hidden.requires_grad), cos, sin,
                  kwargs["cu_seq_lens_q"].clone())
        stack = _layer_stack(self.layers, list(self.eager), hidden.shape[1])
        try:
            if self.pool is None and self.capture is None:
                self.pool = torch.cuda.graph_pool_handle()
            with _autocast_without_cache():
                graphed = self._make_graphed(stack, sample)
        except torch.OutOfMemoryError:
            self._give_up(f"CUDA graphs ran out of GPU memory capturing a pass of {key[0]} positions; the run "
                          "goes on without them.")
            return
        except Exception as exc:  # noqa: BLE001  (any capture failure: the run goes on eagerly)
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            self._give_up(f"CUDA graphs failed here ({type(exc).__name__}: {reason}); the run goes on without them.")
            return
        self.graphs[key] = graphed
        self.captured.append({"positions": key[0], "segments": key[1] - 1,
                              "seconds": round(time.perf_counter() - started, 2)})

    def _give_up(self, note: str) -> None:
        """Eager from now on: the graphs and their pool dropped, `note` in the job's log."""
        self.failed = True
        self.graphs.clear()
        self.pool = None
        if self.capture is None:
            import torch

            torch.cuda.empty_cache()
        if self.notes is not None:
            self.notes.append(note)

    def _make_graphed(self, stack, sample: tuple):
        """The graphed stack. Only the first size gets eager warm-up passes (the lazy initialisation of
        cuBLAS, Triton and flash attention happens once, not per size); the warm-up runs on a stream of
        its own, whose cached blocks no later work reuses, so the cache is emptied after each capture."""
        import torch

        if self.capture is not None:
            return self.capture(stack, sample)
        warmup = self.warmup_passes if not self.graphs else 0
        try:
            return torch.cuda.make_graphed_callables(stack, sample, num_warmup_iters=warmup,
                                                     allow_unused_input=True, pool=self.pool)
        finally:
            torch.cuda.empty_cache()


def _layer_stack(layers: list, forwards: list, positions: int):
    """A module that runs `layers` (through `forwards`, their own forwards) on a packed pass of
    `positions` positions, with tensor arguments only (as `make_graphed_callables` needs) and the
    layers' parameters as its own."""
    import torch

    class LayerStack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, hidden_states, cos, sin, starts):
            for forward in forwards:
                hidden_states = forward(hidden_states, attention_mask=None, position_embeddings=(cos, sin),
                                        use_cache=False, cu_seq_lens_q=starts, cu_seq_lens_k=starts,
                                        max_length_q=positions, max_length_k=positions)
            return hidden_states

    return LayerStack()


@contextmanager
def _autocast_without_cache() -> Iterator[None]:
    """The caller's CUDA autocast (as the Trainer's mixed precision sets it), with its weight-cast cache
    off: `make_graphed_callables` refuses to capture with that cache on."""
    import torch

    if not torch.cuda.is_available() or not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


def model_problem(model) -> str | None:
    """Why `model`'s layers cannot be graphed (None when they can). Inside the graph every layer gets
    the rows' boundaries and no mask, so each must attend through `varlen_attn`: a layer whose
    attention would fall back to SDPA with the model's mask (a sliding window, attention dropout,
    soft-capped logits) would see across rows there."""
    from studio.model.card import base_of
    from studio.train.speedups import decoder_layers

    layers = decoder_layers(model)
    if not layers:
        return "no decoder layers found"
    config = getattr(base_of(model), "config", None)
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    types = getattr(config, "layer_types", None) or ()
    if (getattr(config, "sliding_window", None) is not None or any(t != "full_attention" for t in types)
            or any(getattr(a, "sliding_window", None) is not None for a in attentions)):
        return "not on a model with sliding-window attention layers"
    if (float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0
            or any(float(getattr(a, "attention_dropout", 0.0) or 0.0) > 0 for a in attentions)
            or getattr(config, "attn_logit_softcapping", None) is not None):
        return "not on a model whose attention uses dropout or soft-capped logits"
    return None


@contextmanager
def graphed_layers(model, settings, device: str, collator, varlen_on: bool, notes: list | None = None,
                   capture=None) -> Iterator[GraphedLayers | None]:
    """For the block, `model`'s decoder layers replay CUDA graphs on packed passes, and `collator` pads
    them to the captured sizes (a no-op when `settings.cuda_graphs` is off; `notes` says why when it is
    on but cannot apply). Yields the `GraphedLayers`, or None."""
    from studio.train.speedups import decoder_layers

    if not getattr(settings, "cuda_graphs", False):
        yield None
        return
    problem = graph_problem(settings, device, varlen_on) if capture is None else None
    problem = problem or model_problem(model)
    layers = decoder_layers(model)
    if problem is not None:
        if notes is not None:
            notes.append(f"CUDA graphs skipped: {problem}.")
        yield None
        return
    trained = [p for p in model.parameters() if p.requires_grad]
    graphs = GraphedLayers(layers, trained, notes, capture=capture)
    graphs.install()
    collator.graph_padding = (BUCKET_TOKENS, settings.batch_size + 1)
    if notes is not None:
        notes.append(f"CUDA graphs on: {len(layers)} decoder layers replayed per packed pass, passes padded to a "
                     f"multiple of {BUCKET_TOKENS} positions (each new size captured once).")
    try:
        yield graphs
    finally:
        collator.graph_padding = None
        graphs.remove()
