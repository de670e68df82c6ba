"""CUDA graphs of whole training passes for packed training (`TrainSettings.cuda_graphs`).

A Fast step is launched from Python kernel by kernel: several thousand a pass (peft's LoRA arithmetic,
Liger's kernels, the autograd engine), each a few microseconds of GPU work on a small model, so the
GPU waits for the host (bench/profile_small_train.py). With this switch a pass (embedding, decoder
layers, loss, and the backward down to the adapter's gradients) is captured once per pass size into
one CUDA graph and replayed: one launch a pass. Only the optimizer step stays outside.

- Shapes: a graph replays fixed shapes, so the collator pads each packed pass (`pad_packed`) to a
  multiple of `BUCKET_TOKENS` positions and to a fixed number of segments: the rows, then padding
  segments. Padding attends only to its own segment and its labels are -100, so the loss and the
  gradients are those of the unpadded pass. The run's first pass runs eagerly (lazy initialisation
  stays out of the graphs); all sizes share one memory pool, as only one runs at a time, and a run
  keeps at most `MAX_SIZES` of them.
- Which sizes (`PassSizes`): a capture costs about as much as several replays (0.13-0.28 s on the
  H200, where a 0.5B pass replays in 0.03 s), so a run captures as few sizes as pay for themselves.
  The first graph is captured at a size that holds 99% of the passes the run's rows can make
  (`usual_largest_pass`), so later passes rarely need a larger one. A pass of a size without a graph
  replays the smallest larger one, its last padding segment lengthened (`extend_padding`), unless its
  own graph would pay: the replay time it saves, times the passes it would serve in the rest of the
  run, above what a capture costs, both measured in the run. A short run, or a model whose replays
  barely shrink with the size, keeps few graphs (the 0.5B: one in 20 steps, three in the tutorial-sized
  job); a large model in a long run captures its frequent sizes (the 7B: five in that job).
- Gradients: the capture's backward leaves the adapter's gradients in buffers of the graph, which each
  replay rewrites and which become the parameters' `.grad` after it (no copy). The optimizer uses them
  before the next pass, and the Trainer's `zero_grad` drops them (it sets them to None); a pass that
  finds gradients already there (a second pass of an accumulation) runs eagerly.
- Loss: with graphs on, the loss is the chunked one of `studio.train.fused_loss` (no whole logits, no
  read back to the host); Liger's fused linear cross-entropy reads its count of labels back to the
  host, which a graph cannot hold.
- Checkpointing: a checkpointed layer's recomputation is captured with the rest of the backward. Its
  LoRA dropout draws the same mask again from the pass's seed (`studio.model.lora_dropout`), so the
  checkpoint replays no generator state (which it would read back to the host).
- When: on a CUDA GPU, for packed passes attending through varlen_attn, without compiled layers, one
  pass per optimizer step; otherwise the run trains eagerly and its log says why, as it does for a
  model whose attention would need what the varlen kernel does not do (`model_problem`). A capture that
  fails or runs out of memory leaves the rest of the run eager, and the log says why.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

BUCKET_TOKENS = 256  # pass sizes are padded to a multiple of this (at most this many wasted positions)
MAX_SIZES = 8  # captured pass sizes a run keeps (each holds its own inputs, loss and gradient buffers)


def graph_problem(settings, device: str, varlen_on: bool, model=None, device_checks: bool = True) -> str | None:
    """Why `settings` cannot train with CUDA graphs on `device` (None when they can); with `model`, its
    layers are checked too (`model_problem`; while training, `checkpointing_problem` as well).
    `device_checks=False` leaves out what only a GPU run needs (a CUDA device, varlen attention): the CPU
    tests' recorder."""
    if not getattr(settings, "cuda_graphs", False):
        return None
    if device_checks and not str(device).startswith("cuda"):
        return "they need a CUDA GPU"
    if not settings.packing:
        return "they need packed passes (packing on)"
    if settings.compile_layers:
        return "not with compiled layers"
    if settings.grad_accum != 1:
        return "they need one forward pass per optimizer step (gradient accumulation 1)"
    if device_checks and not varlen_on:
        return "they need packed rows attending through varlen_attn"
    return model_problem(model) if model is not None else None


def checkpointing_problem(settings, model) -> str | None:
    """While `model` trains (its LoRA forwards in place): a checkpointed layer recomputes its forward inside
    the graph, so its dropout must draw the same mask again without the generator's state read back: the
    studio's LoRA node does (`studio.train.speedups.redrawn_dropout`), peft's own forward does not."""
    from studio.train.speedups import dropout_kept_by_peft

    if settings.gradient_checkpointing and dropout_kept_by_peft(model):
        return "not with gradient checkpointing where the adapter's dropout runs in peft's own forward"
    return None


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
    size = padded_size(tokens, multiple, pad_segments)
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


def padded_size(tokens: int, multiple: int, pad_segments: int = 1) -> int:
    """The positions `pad_packed` gives a pass of `tokens` real positions and `pad_segments` padding
    segments (at least one position each)."""
    return -(-(tokens + pad_segments) // multiple) * multiple


def usual_largest_pass(lengths: list[int], rows: int, share: float = 0.99, draws: int = 2000) -> int:
    """Real positions that `share` of the passes of `rows` rows drawn at random from rows of `lengths` tokens
    stay within (as the Trainer's random sampler draws them); at most the `rows` longest together."""
    import random

    if len(lengths) <= rows:
        return sum(lengths)
    draw = random.Random(0)
    totals = sorted(sum(draw.sample(lengths, rows)) for _ in range(draws))
    return min(totals[min(draws - 1, int(share * draws))], sum(sorted(lengths)[-rows:]))


def extend_padding(batch: dict, size: int) -> dict:
    """A batch `pad_packed` padded, its last padding segment lengthened to `size` positions in all (the
    size of a larger graph): the new positions continue that segment, their labels are the segment's
    (ignored) ones, so the loss and gradients are still those of the unpadded pass. Works on the
    device the tensors are on."""
    import torch

    ids = batch["input_ids"]
    extra = size - ids.shape[1]
    if extra <= 0:
        return batch
    longer = dict(batch)
    for name in ("input_ids", "labels"):
        longer[name] = torch.cat([batch[name], batch[name][:, -1:].expand(1, extra)], 1)
    steps = torch.arange(1, extra + 1, device=ids.device, dtype=batch["position_ids"].dtype).unsqueeze(0)
    longer["position_ids"] = torch.cat([batch["position_ids"], batch["position_ids"][:, -1:] + steps], 1)
    bounds = batch["cu_seq_lens_q"]
    longer["cu_seq_lens_q"] = longer["cu_seq_lens_k"] = torch.cat([bounds[:-1], bounds[-1:] + extra])
    longer["max_length_q"] = longer["max_length_k"] = size
    return longer


class PassSizes:
    """Which captured size each graphed pass replays, so that a run captures only the sizes that pay.

    `first`: the positions the first graph is captured at (`usual_largest_pass`; None when the rows are
    not known: the first pass's own), so nearly every later pass fits in a graph already there. A pass of
    another size replays the smallest captured size that holds it unless capturing its own pays: the
    replay time it saves (measured replays; between two measured sizes, a straight line through them;
    with one, time proportional to positions) times the passes expected to replay it in the rest of the
    run (the share of the passes so far that it would serve), above the median capture time so far."""

    def __init__(self, first: int | None = None):
        self.first = first
        self.seen: dict[int, int] = {}  # positions (as the collator padded them) -> passes
        self.capture_s: list[float] = []
        self.replay_s: dict[int, list[float]] = {}  # captured positions -> measured replay seconds

    def observe(self, positions: int) -> None:
        self.seen[positions] = self.seen.get(positions, 0) + 1

    def captured(self, seconds: float) -> None:
        self.capture_s.append(seconds)

    def replayed(self, positions: int, seconds: float) -> None:
        times = self.replay_s.setdefault(positions, [])
        times.append(seconds)
        del times[:-16]  # the latest ones

    def choose(self, positions: int, captured: list[int], remaining: int) -> int:
        """The size a pass of `positions` replays: one of `captured`, or a size to capture (`remaining`:
        passes after this one)."""
        if positions in captured:
            return positions
        larger = sorted(size for size in captured if size > positions)
        if not larger:
            return max(positions, self.first or 0) if not captured else positions
        if self.capture_pays(positions, larger[0], captured, remaining):
            return positions
        return larger[0]

    def capture_pays(self, positions: int, larger: int, captured: list[int], remaining: int) -> bool:
        """Whether a graph of `positions` saves more than its capture: each pass that would replay it
        instead of `larger` (every size above the next smaller graph, up to `positions`) saves the
        difference in replay time."""
        replay = self.seconds(larger)
        if replay is None or not self.capture_s:
            return True
        saved = replay - min(replay, self.estimate(positions, larger, replay))
        below = max((size for size in captured if size < positions), default=0)
        served = sum(count for size, count in self.seen.items() if below < size <= positions)
        uses = remaining * served / max(1, sum(self.seen.values()))
        return saved * uses > _median(self.capture_s)

    def seconds(self, positions: int) -> float | None:
        times = self.replay_s.get(positions)
        return _median(times) if times else None

    def estimate(self, positions: int, larger: int, replay: float) -> float:
        """Replay seconds of a pass of `positions`: the line through the two nearest measured sizes, or
        `replay` (of `larger`) scaled by positions."""
        measured = sorted(self.replay_s, key=lambda size: abs(size - positions))[:2]
        if len(measured) == 2:
            (a, b), (ta, tb) = measured, (self.seconds(measured[0]), self.seconds(measured[1]))
            return max(0.0, ta + (tb - ta) * (positions - a) / (b - a))
        return replay * positions / larger


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


class CudaReplayClock:
    """The GPU time of each replay, from CUDA events read once they have completed (no waiting)."""

    def __init__(self):
        self.pending: list[tuple[int, object, object]] = []

    def time(self, positions: int, replay) -> None:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        replay()
        end.record()
        self.pending.append((positions, start, end))

    def done(self, wait: bool = False) -> list[tuple[int, float]]:
        """(positions, seconds) of the replays finished since the last call (`wait`: of all of them)."""
        finished, waiting = [], []
        for item in self.pending:
            if wait:
                item[2].synchronize()
            (finished if wait or item[2].query() else waiting).append(item)
        self.pending = waiting
        return [(positions, start.elapsed_time(end) / 1000) for positions, start, end in finished]


class WallReplayClock:
    """The host's time of each replay (a recorder that replays on the CPU, in the tests)."""

    def __init__(self):
        self.finished: list[tuple[int, float]] = []

    def time(self, positions: int, replay) -> None:
        started = time.perf_counter()
        replay()
        self.finished.append((positions, time.perf_counter() - started))

    def done(self, wait: bool = False) -> list[tuple[int, float]]:
        finished, self.finished = self.finished, []
        return finished


class StepGraphs:
    """The forward, loss and backward of a run's packed passes, replayed from one CUDA graph per pass size.

    `step(inputs, num_items, eager_step)` runs one training pass (the Trainer's `training_step` is
    `eager_step`): a pass of a captured size copies its tensors into the graph's static inputs and
    replays the graph, whose backward writes the adapter's gradients into static buffers that become
    the parameters' `.grad` (no copy); a new size is captured first, then replayed. The run's first
    pass, and any pass the graphs cannot take (no gradients, another shape, gradients already there, a
    failed capture), runs `eager_step` as it is. `recorder` replaces `CudaRecorder` (the CPU tests pass
    one that runs the recorded work again at each replay)."""

    def __init__(self, trained: list, notes: list | None = None, recorder=None, casts=None, lora_layers=(),
                 first_size: int | None = None):
        self.trained, self.notes = trained, notes
        self.recorder = recorder
        self.casts, self.lora_layers = casts, list(lora_layers)  # the adapter's weights cast in one go (FlatCasts)
        self.graphs: dict[tuple, _Captured] = {}  # (a pass's signature but its size, its positions) -> graph
        self.sizes = PassSizes(first_size)
        self.clock = None  # times the replays (CUDA events; the host's clock with a test's recorder)
        self.remaining = 0  # passes left in the run after the current one (the trainer sets it)
        self.warmed = False  # one eager pass ran (lazy initialisation stays out of the graphs)
        self.failed = False
        self.full = False  # MAX_SIZES sizes captured: new sizes run eagerly
        self.passes = 0  # training passes seen
        self.replayed_passes = 0
        self.padded_passes = 0  # passes that replayed a larger size's graph
        self.captured: list[dict] = []  # each size captured: positions, segments, seconds, the pass (from 0)

    def step(self, inputs: dict, num_items, eager_step):
        """One training pass of `inputs`; returns its loss, as `eager_step(inputs, num_items)` does."""
        self.passes += 1
        key = self._key(inputs, num_items)
        if key is not None:
            self.sizes.observe(key[1])
        if key is None or not self.warmed:
            self.warmed = self.warmed or key is not None
            return eager_step(inputs, num_items)
        size = self._size_for(key)
        padded = size != key[1]
        if padded:
            inputs, key = extend_padding(inputs, size), (key[0], size)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture_new(key, inputs, num_items, eager_step)
            if captured is None:
                return eager_step(inputs, num_items)
        self.padded_passes += padded
        return self._replay(captured, inputs, num_items)

    def remove(self) -> None:
        """Drop the graphs, their static tensors and their memory pool."""
        self.graphs.clear()
        self._drop_side_workspace()
        self.recorder = None

    def _drop_side_workspace(self) -> None:
        """cuBLAS keeps the workspace it took for the casts' side stream during a capture, from the graphs'
        pool, and frees a graph's workspace only for the capturing stream: drop the cached workspaces (made
        again on demand) so the pool goes back with the graphs."""
        if getattr(self.casts, "side", None) is not None and isinstance(self.recorder, CudaRecorder):
            import torch

            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                clear()

    # ----- which passes replay ----------------------------------------------------------------------
    def _key(self, inputs: dict, num_items) -> tuple | None:
        """(the signature of a pass a graph can replay but its size, its positions): names, shapes and
        dtypes of its tensors, its plain values; None for a pass that runs eagerly."""
        import torch

        ids, starts = inputs.get("input_ids"), inputs.get("cu_seq_lens_q")
        if self.failed or not torch.is_grad_enabled() or ids is None or starts is None or ids.dim() != 2:
            return None
        positions = ids.shape[1]
        if ids.shape[0] != 1 or positions % BUCKET_TOKENS or inputs.get("max_length_q") != positions:
            return None
        if num_items is not None and not torch.is_tensor(num_items):
            return None
        if any(p.grad is not None for p in self.trained):
            return None  # gradients of an earlier pass not yet used: the graph would overwrite them

        def sizeless(name, value):  # what `extend_padding` lengthens loses its size (another tensor keeps it)
            if torch.is_tensor(value):
                shape = value.shape[:-1] if name in ("input_ids", "labels", "position_ids") else value.shape
                return name, tuple(shape), str(value.dtype)
            return (name, None) if name in ("max_length_q", "max_length_k") else (name, value)

        family = tuple(sorted(sizeless(name, value) for name, value in inputs.items())) + (num_items is None,)
        return family, positions

    def _size_for(self, key: tuple) -> int:
        """The positions the pass of `key` replays (`PassSizes`), from the replays measured so far."""
        family, positions = key
        captured = [size for other, size in self.graphs if other == family]
        larger = [size for size in captured if size > positions]
        if larger and len(self.graphs) >= MAX_SIZES:
            return min(larger)
        if larger and self.sizes.seconds(min(larger)) is None and self.clock is not None:
            self._measured(wait=True)
        self._measured()
        return self.sizes.choose(positions, captured, self.remaining)

    def _measured(self, wait: bool = False) -> None:
        for positions, seconds in self.clock.done(wait) if self.clock is not None else ():
            self.sizes.replayed(positions, seconds)

    # ----- capture and replay -----------------------------------------------------------------------
    def _capture_new(self, key: tuple, inputs: dict, num_items, eager_step) -> "_Captured | None":
        """Capture a new pass size; None when the run keeps no more sizes, or when the capture failed
        (eager from now on, the reason in the log)."""
        import torch

        if len(self.graphs) >= MAX_SIZES:
            if not self.full and self.notes is not None:
                self.notes.append(f"CUDA graphs: {MAX_SIZES} pass sizes captured, the most a run keeps; "
                                  "passes of other sizes run eagerly.")
            self.full = True
            return None
        positions = key[1]
        started = time.perf_counter()
        captured = _Captured(inputs, num_items, self.trained[0].device if self.trained else "cpu")
        try:
            if self.recorder is None:
                self.recorder = CudaRecorder()
            with _autocast_without_cache():
                captured.replay = self.recorder.record(
                    lambda: captured.run(eager_step, self.trained, self.casts, self.lora_layers))
        except torch.OutOfMemoryError:
            self._give_up(f"CUDA graphs ran out of GPU memory capturing a pass of {positions} positions; the run "
                          "goes on without them.")
            return None
        except Exception as exc:  # noqa: BLE001  (any capture failure: the run goes on eagerly)
            reason = (str(exc).strip().splitlines() or [""])[0][:200]
            self._give_up(f"CUDA graphs failed here ({type(exc).__name__}: {reason}); the run goes on without them.")
            return None
        finally:
            for parameter in self.trained:
                parameter.grad = None  # the capture leaves the graph's buffers there, not yet computed
        seconds = time.perf_counter() - started
        self.graphs[key] = captured
        self.sizes.captured(seconds)
        self.captured.append({"positions": positions, "segments": inputs["cu_seq_lens_q"].numel() - 1,
                              "seconds": round(seconds, 2), "pass": self.passes - 1})
        return captured

    def _replay(self, captured: "_Captured", inputs: dict, num_items):
        captured.load(inputs, num_items)
        if self.clock is None:
            self.clock = CudaReplayClock() if isinstance(self.recorder, CudaRecorder) else WallReplayClock()
        self.clock.time(inputs["input_ids"].shape[1], captured.replay)
        self._measured()  # the replays already finished (no waiting): the clock keeps no backlog of events
        for parameter, grad in zip(self.trained, captured.grads):
            parameter.grad = grad
        self.replayed_passes += 1
        return captured.loss.detach().clone()  # the graph's own loss tensor is overwritten by the next replay

    def _give_up(self, note: str) -> None:
        """Eager from now on: the graphs and their pool dropped, `note` in the job's log."""
        self.failed = True
        self.graphs.clear()
        self._drop_side_workspace()
        if isinstance(self.recorder, CudaRecorder):
            import torch

            self.recorder = None
            torch.cuda.empty_cache()
        if self.notes is not None:
            self.notes.append(note)


class _Captured:
    """One pass size's graph: its static inputs (what a replay reads), and its loss and gradients (what a
    replay writes)."""

    def __init__(self, inputs: dict, num_items, device):
        import torch

        copies: dict[int, object] = {}  # one static tensor per distinct input tensor (cu_seq_lens_q is _k)
        self.inputs = {}
        for name, value in inputs.items():
            if torch.is_tensor(value):
                if id(value) not in copies:
                    copies[id(value)] = value.to(device, copy=True)
                value = copies[id(value)]
            self.inputs[name] = value
        self.num_items = num_items.to(device, copy=True) if num_items is not None else None
        self.loss = None
        self.grads: list = []
        self.replay = None

    def run(self, eager_step, trained: list, casts=None, lora_layers: list = ()) -> None:
        """The recorded work: one eager training pass over the static inputs; with `casts` (a
        `studio.model.lora_update.FlatCasts`), the LoRA layers cast the adapter's weights and gather
        their gradients through it."""
        if casts is None:
            self.loss = eager_step(self.inputs, self.num_items)
            self.grads = [p.grad for p in trained]
            return
        casts.begin()
        for layer in lora_layers:
            layer.__dict__["studio_casts"] = casts
        try:
            self.loss = eager_step(self.inputs, self.num_items)
        except BaseException:
            casts.reset()  # nothing of a failed capture stays referenced
            raise
        finally:
            for layer in lora_layers:
                layer.__dict__.pop("studio_casts", None)
        flat = casts.finish()  # the weights the layers took from `casts`; autograd set the others' .grad
        self.grads = [flat.get(id(p), p.grad) for p in trained]

    def load(self, inputs: dict, num_items) -> None:
        """Copy a pass's tensors into the static inputs."""
        import torch

        for name, value in inputs.items():
            static = self.inputs[name]
            if torch.is_tensor(value) and static.data_ptr() != value.data_ptr():
                static.copy_(value, non_blocking=True)
        if num_items is not None:
            self.num_items.copy_(num_items, non_blocking=True)


class CudaRecorder:
    """Records work into CUDA graphs that share one memory pool (one size replays at a time), on a
    stream of its own. Unlike `torch.cuda.graph` it does not collect Python's garbage before each capture
    (a tenth of a second, for nothing a training run leaves behind); it does empty PyTorch's cache, so
    the blocks the eager passes cached go back to the GPU before the graphs' pool takes its own."""

    def __init__(self):
        import torch

        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream()

    def record(self, work):
        """Capture `work()`; returns the graph's replay."""
        import torch

        torch.cuda.empty_cache()  # the eager passes' cached blocks back to the GPU, for the graphs' own pool
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            graph.capture_begin(pool=self.pool)
            try:
                work()
            finally:
                graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return graph.replay


@contextmanager
def _autocast_without_cache() -> Iterator[None]:
    """The caller's CUDA autocast (as the Trainer's mixed precision sets it), with its weight-cast cache
    off: a weight cast cached outside the capture would be replayed stale."""
    import torch

    if not torch.cuda.is_available() or not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


def model_problem(model) -> str | None:
    """Why `model`'s passes are not graphed (None when they are). The graphs are measured and tested for
    models whose every layer attends through `varlen_attn` given the rows' boundaries; a layer that
    would fall back to SDPA with the model's packed mask (a sliding window, attention dropout,
    soft-capped logits; dropout also draws random numbers inside the attention kernel) is left to the
    eager path, which is tested for it."""
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
def graphed_steps(model, settings, device: str, collator, varlen_on: bool, notes: list | None = None,
                  recorder=None, compute_dtype=None,
                  lengths: list[int] | None = None) -> Iterator[StepGraphs | None]:
    """For the block, `model`'s packed training passes replay CUDA graphs (`StepGraphs`, which the
    trainer's `training_step` runs them through), and `collator` pads them to the captured sizes (a
    no-op when `settings.cuda_graphs` is off; `notes` says why when it is on but cannot apply). Yields
    the `StepGraphs`, or None. `recorder` replaces `CudaRecorder` (the CPU tests). `compute_dtype`: the
    dtype the layers compute in (the trained LoRA weights are cast to it in one go inside the graphs).
    `lengths`: the training rows' token counts (the first graph's size is drawn from them)."""
    from studio.train.speedups import decoder_layers

    if not getattr(settings, "cuda_graphs", False):
        yield None
        return
    problem = (graph_problem(settings, device, varlen_on, model, device_checks=recorder is None)
               or checkpointing_problem(settings, model))
    if problem is not None:
        if notes is not None:
            notes.append(f"CUDA graphs skipped: {problem}.")
        yield None
        return
    trained = [p for p in model.parameters() if p.requires_grad]
    first = padded_size(usual_largest_pass(lengths, settings.batch_size), BUCKET_TOKENS) if lengths else None
    graphs = StepGraphs(trained, notes, recorder, *_flat_casts(model, trained, compute_dtype), first_size=first)
    collator.graph_padding = (BUCKET_TOKENS, settings.batch_size + 1)
    if notes is not None:
        notes.append(f"CUDA graphs on: forward, loss and backward of the {len(decoder_layers(model))}-layer model "
                     f"replayed per packed pass, passes padded to a multiple of {BUCKET_TOKENS} positions (first "
                     "captured at a size that holds nearly every pass; another size only where its replays save more "
                     "than its capture).")
    try:
        yield graphs
    finally:
        collator.graph_padding = None
        graphs.remove()


def _flat_casts(model, trained: list, compute_dtype) -> tuple:
    """(a FlatCasts of the trained LoRA weights, the LoRA layers) when every trained parameter is a LoRA
    weight of one dtype; (None, ()) otherwise. On a CUDA GPU the weights' gradient products run on a
    stream of their own, beside the backward's critical path (`FlatCasts`)."""
    from studio.model.lora_update import FlatCasts
    from studio.model.routing import lora_layers

    layers = lora_layers(model)
    weights = {id(module.weight) for layer in layers for part in (layer.lora_A, layer.lora_B)
               for module in part.values()}
    if (compute_dtype is None or not trained or any(id(p) not in weights for p in trained)
            or len({p.dtype for p in trained}) != 1):
        return None, ()
    device = trained[0].device
    side = None
    if device.type == "cuda":
        import torch

        side = torch.cuda.Stream(device)
    return FlatCasts(trained, compute_dtype, side), layers
