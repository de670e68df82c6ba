"""Fast decoding: a static KV cache and the one-token step replayed from a CUDA graph.

Batch-1 decoding of a 4-bit 7B model is bound by kernel launches and Python, not by the GPU: one
token runs about 1,500 small kernels, each started from Python. This decoder runs the prompt once
(eagerly) into a static cache, records the one-token step once as a CUDA graph, and then replays
that graph for every new token: the same kernels as eager decoding (so the same numbers), without
the Python in between. Only choosing the next token (greedy, or the usual penalty, temperature and
top-p) runs outside the graph.

The prompt's run into the cache is replayed from a graph too, for prompts of up to PROMPT_GRAPH_LIMIT
tokens: they are always padded on the left to a multiple of PROMPT_BUCKET (so a prompt gets the same
bits whether its run is replayed or not), and a padded length is recorded on its second run.

A recorded step belongs to one batch size, one cache size (rounded up to a bucket, so a new prompt
length reuses it) and one adapter set-up. `clear()` forgets them all; the model manager calls it
whenever the model may change (training, attaching or deleting adapters), since a graph replays the
memory addresses it was recorded with. Without CUDA the same loop runs the step eagerly.

On a GPU, each generation also runs with Liger's fused RMSNorm, RoPE and SwiGLU kernels where the
liger-kernel package is installed (`studio.model.kernels`): a row's numbers do not depend on the
other rows, and the step has about 650 fewer kernels. The 4-bit layers' token rows and the attention
over the cache run the studio's own CUDA kernels (`studio.model.nf4_cuda`,
`studio.model.decode_attention`), once each has passed its check on the loaded model (`_check_kernels`;
the log says which kernels are used and why not). Three more are checked the same way (`LORA_KERNEL`,
`GROUPED_LAUNCHES`, `CACHE_WRITE_KERNEL` below): an adapter row's LoRA updates in two kernels a layer
instead of peft's seven (`studio.model.lora_cuda`), q/k/v and gate/up in one launch each of the 4-bit
kernel (`studio.model.nf4_cuda.groups_ready`), and the step's new keys and values written into the cache
in one launch a layer instead of five (`studio.model.decode_attention.cache_write_problem`).

Repeatability: every reply starts from a zeroed cache (stale entries of an earlier reply are masked
out, but are not left to chance), and the step runs without cuDNN attention (see
`studio.model.attention.without_cudnn_attention`). Each row's adapter is routed by
`studio.model.routing`, around this decoder, so a recorded step replays that routing. A step that
cannot be recorded runs eagerly, about 10x slower: the decoder says so in `problem` (shown in the
model status) and in the log.

Side by side (two rows, see `studio.model.routing`): where bitsandbytes' 4-bit kernel gives each
row of a two-row step the bits of a one-row step (checked once per model), the recorded step runs the
4-bit layers (and the output head, when it passes the same check) with both rows together, reading the
weights once. Otherwise it can record the rows'
4-bit layers on two CUDA streams (`rows_on_streams`), so their latency-bound kernels overlap in the
replay; same kernels, same numbers. If that recording fails, the step is recorded again with the rows
one after another, and `problem` and the log say so.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from studio.model.decoding import Decoder

# Record side-by-side steps with the rows on two CUDA streams (GPU only) where the rows cannot take the 4-bit
# layers together: 1.37x one column against 1.45x one after another on an H200, 1.52x against 1.64x on an H100
# (bench/chat_speed.py --compare-only graphs: "rows on two streams" against "rows one at a time").
ROWS_ON_STREAMS = True
# The 4-bit layers' token rows through the studio's CUDA kernel (studio.model.nf4_cuda) rather than
# bitsandbytes' (measured with bench/chat_speed.py: "graphs" against "graphs-bnb").
NF4_KERNEL = True
# Attention of the one-token step through the studio's CUDA kernel (studio.model.decode_attention) rather
# than PyTorch's SDPA (measured with bench/chat_speed.py: "graphs" against "graphs-sdpa").
ATTENTION_KERNEL = True
# An adapter's LoRA updates of the one-token step through the studio's two CUDA kernels a layer
# (studio.model.lora_cuda) rather than peft's seven: the adapter's step 4.9 ms against 6.6 ms on an H100
# (bench/chat_speed.py's compare, "adapter updates", runs both).
LORA_KERNEL = True
# The 4-bit layers that take the same input (q, k and v; gate and up) in one launch of the studio's kernel:
# 5-8% more tokens/s on an H100 in two runs (bench/chat_speed.py --modes graphs-grouped graphs-ungrouped).
GROUPED_LAUNCHES = True
# A one-token step's keys and values written into the static cache by one launch of the studio's kernel a
# layer (studio.model.decode_attention.cache_write) rather than transformers' five (an arange, two adds, two
# index copies): a base step 3.40 against 3.63 ms on an H100 (bench/chat_speed.py --modes graphs
# graphs-cache-update).
CACHE_WRITE_KERNEL = True
# The LoRA layers that take the same input (q, k and v; gate and up) take an adapter row's updates in one
# launch of each LoRA kernel (studio.model.lora_cuda.add_updates): an adapter's step 4.21 against 4.68 ms on
# an H100 (bench/chat_speed.py's compare, "adapter updates").
LORA_GROUPED = True
CACHE_BUCKET = 1024
MAX_RECORDED_STEPS = 4
# The prompt's run into the cache, replayed from a recorded graph too: a 7B prompt's forward is some 1,700
# calls from Python (most of a reply's first 45 ms on an H100). Prompts of up to PROMPT_GRAPH_LIMIT tokens are
# padded on the left to a multiple of PROMPT_BUCKET (padding left out by the mask), always, so a prompt gets the
# same bits whether its run is replayed or not; a padded length is recorded on its second run (a conversation
# that grows past it never pays for a recording it does not reuse). Longer prompts keep the eager run.
PROMPT_GRAPHS = True
PROMPT_BUCKET = 64
PROMPT_GRAPH_LIMIT = 512
PROMPT_GRAPHS_KEPT = 4  # recorded prompt lengths a step keeps (the least recently used goes)
log = logging.getLogger(__name__)


def cache_length(prompt_tokens: int, max_new_tokens: int, bucket: int = CACHE_BUCKET) -> int:
    """The static cache size for a prompt and reply, rounded up to a multiple of `bucket`."""
    needed = prompt_tokens + max_new_tokens
    return -(-needed // bucket) * bucket


@dataclass
class _Step:
    """The static buffers of one recorded decode step (and the graph, once recorded)."""

    cache: object
    token_ids: object       # (batch, 1) the token fed to the step
    positions: object       # (batch, 1) its rotary position per row (rows may be left-padded)
    cache_position: object  # (1,) the cache slot it is written to
    mask: object            # (batch, 1, 1, cache_len) bool: which cache slots each row may attend to
    graph: object = None
    logits: object = None   # the graph's output buffer
    failure: str = ""       # why recording failed (the step then runs eagerly)
    rows_on_streams: bool = False  # the graph runs the rows' 4-bit layers on two streams
    prompts: OrderedDict = field(default_factory=OrderedDict)  # padded length -> _Prompt


@dataclass
class _Prompt:
    """The static buffers of one padded prompt length's run into a step's cache (and its graph, once
    recorded)."""

    input_ids: object       # (batch, length): the prompt, padded on the left
    positions: object       # (batch, length): rotary positions (padding at 0)
    mask: object            # (batch, 1, length, cache_len) bool: causal over the prompt, padding left out
    cache_position: object  # (length,): the slots written
    runs: int = 0
    graph: object = None
    logits: object = None
    failure: str = ""       # why recording failed (this length then runs eagerly)


class GraphDecoder(Decoder):
    """Generates with a static cache and a recorded decode step; one per loaded model."""

    mode = "graphs"

    def __init__(self, use_graphs: bool, rows_on_streams: bool | None = None):
        from studio.model.routing import RowStreams

        super().__init__()
        self.use_graphs = use_graphs
        self.rows_on_streams = use_graphs and (ROWS_ON_STREAMS if rows_on_streams is None else rows_on_streams)
        self._row_streams_of_steps = RowStreams()
        self._streams_failure = ""  # why recording with rows on streams failed (not tried again)
        self._steps: OrderedDict[tuple, _Step] = OrderedDict()
        self._pool = None
        self._lock = threading.Lock()
        self.nf4_kernel = use_graphs and NF4_KERNEL  # the studio's CUDA kernel for the 4-bit token rows
        self.attention_kernel = use_graphs and ATTENTION_KERNEL  # ... and for attention over the cache
        self.grouped_launches = use_graphs and GROUPED_LAUNCHES  # ... q/k/v and gate/up in one launch each
        self._nf4 = None  # studio.model.nf4_cuda.Nf4Kernels, made on first use
        self._attention = None  # studio.model.decode_attention.DecodeAttentionKernels, made on first use
        # id of the model -> (4-bit kernel used, attention kernel used, groups, cache-write kernel used)
        self._kernels_ready: dict = {}
        self.cache_write_kernel = use_graphs and CACHE_WRITE_KERNEL  # ... and for the step's cache writes
        self.lora_kernel = use_graphs and LORA_KERNEL  # the studio's CUDA kernels for the adapter updates
        self._lora = None  # studio.model.lora_cuda.LoraKernels, made on first use
        self.lora_grouped = use_graphs and LORA_GROUPED  # ... with sibling layers' updates in one launch
        self.prompt_graphs = use_graphs and PROMPT_GRAPHS  # prompts padded, their runs recorded (see PROMPT_GRAPHS)
        self._lora_groups_of: dict = {}  # (id of the model, adapter) -> (groups, why others are not grouped)

    def clear(self) -> None:
        """Forget every recorded step and its cache (the model is about to change)."""
        super().clear()
        with self._lock:
            self._steps.clear()
            self._pool = None
            self._kernels_ready = {}
            self._lora_groups_of = {}

    @property
    def recorded_steps(self) -> int:
        return sum(1 for step in self._steps.values() if step.graph is not None)

    @property
    def last_failure(self) -> str:
        """Why the last recording failed ("" when none did)."""
        return self._failure

    _failure = ""

    def _row_streams(self):
        return self._row_streams_of_steps if self.use_graphs and self.rows_on_streams else None

    def _streams_wanted(self, model, batch: int) -> bool:
        """Whether a step of `batch` rows is to be recorded with its rows' 4-bit layers on streams (not
        when those layers take the rows together)."""
        return bool(self.use_graphs and self.rows_on_streams and self.rows_alone and batch > 1
                    and not self._streams_failure and not self.together(model, batch))

    # ----- generation ----------------------------------------------------------------------------
    def _generate(self, model, input_ids, attention_mask, settings, stop, streamer, eos_token_id, pad_token_id,
                  adapters: tuple) -> None:
        """Stops at `max_new_tokens`, when every row has produced `eos_token_id`, or at the next token
        once `stop` is set; the caller (Decoder.generate) has routed the rows and ends the streamer."""
        import torch

        with self._lock, torch.inference_mode(), self._fused_kernels(model):
            batch, prompt_len = input_ids.shape
            length = self._padded_length(prompt_len) or prompt_len
            step = self._step_for(model, batch, cache_length(length, settings.max_new_tokens), adapters)
            self._decode(model, step, input_ids, attention_mask, settings, stop, streamer, eos_token_id,
                         pad_token_id)

    def _decode(self, model, step: _Step, input_ids, attention_mask, settings, stop, streamer, eos_token_id,
                pad_token_id) -> None:
        """Prefill, then one token per step until a stop condition (see `_generate`).

        Each step is launched before its input token is read back to the host, so the host's share of a
        token (reading it back, the streamer decoding the text) runs while the GPU computes the next
        one. A step launched for a reply that then ends (end of text, Stop) is dropped unread; the next
        reply starts from a zeroed cache.
        """
        import torch

        batch = input_ids.shape[0]
        logits = self._prefill(model, step, input_ids, attention_mask)
        if self.use_graphs and step.graph is None and not step.failure:
            self._record(model, step)  # its warm-up runs write to the cache: fill it again
            logits = self._prefill(model, step, input_ids, attention_mask)
        streamer.put(input_ids.cpu())
        choose = _token_chooser(settings)
        history = input_ids
        finished = [False] * batch
        limit = int(settings.max_new_tokens)
        for produced in range(1, limit + 1):
            next_ids = choose(history, logits)
            read = _read_back(next_ids)
            if settings.repetition_penalty != 1.0:
                history = torch.cat([history, next_ids[:, None]], dim=1)
            if produced < limit and not stop.is_set():
                logits = self._advance(model, step, next_ids)
            tokens = [pad_token_id if done else token for done, token in zip(finished, read())]
            finished = [done or token == eos_token_id for done, token in zip(finished, tokens)]
            streamer.put(torch.tensor(tokens))
            if produced == limit or stop.is_set() or all(finished):
                break

    @contextlib.contextmanager
    def _fused_kernels(self, model):
        """On a GPU, Liger's RMSNorm, RoPE and SwiGLU kernels for the generation (`studio.model.kernels`);
        the first generation logs whether they are on."""
        if not self.use_graphs:
            yield
            return
        from studio.model.kernels import decode_kernels

        with decode_kernels(model) as note:
            if note != self.kernels_note:
                self.kernels_note = note
                log.info("Graph decoder: %s", note)
            yield

    kernels_note = ""  # what studio.model.kernels applied to the last generation

    @contextlib.contextmanager
    def _layer_kernels(self, model):
        """On a GPU, the studio's CUDA kernels for the token rows (`studio.model.nf4_cuda` for the 4-bit
        layers, `studio.model.decode_attention` for attention over the cache), each once checked on this
        model; bitsandbytes' kernel or PyTorch's attention where one is off or not ready. Whatever is put
        in place is taken off again on the way out, also when putting the next one in place fails."""
        with contextlib.ExitStack() as stack:
            if self.use_graphs:
                key = id(model)
                if key not in self._kernels_ready:
                    self._kernels_ready[key] = self._check_kernels(model)
                nf4_ok, attention_ok = self._kernels_ready[key][:2]
                if nf4_ok:
                    from studio.model import nf4_cuda

                    stack.enter_context(nf4_cuda.kernel_layers(model, self._nf4))
                if attention_ok:
                    from studio.model import decode_attention

                    stack.enter_context(decode_attention.decode_attention(model, self._attention))
            yield

    def _grouped_layers(self, model, batch: int, together: frozenset):
        """The groups of 4-bit layers launched together (`studio.model.nf4_cuda.grouped_layers`) whose
        every member takes this batch's rows in one call: any batch of one row; for several rows, the
        groups whose members all take them together (`together`) or every group when rows are not routed
        one by one."""
        ready = self._kernels_ready.get(id(model)) if self.use_graphs else None
        groups = ready[2] if ready and ready[0] else []
        if batch > 1 and self.rows_alone:
            groups = [members for members in groups if all(id(m) in together for m in members)]
        if not groups:
            return contextlib.nullcontext()
        from studio.model import nf4_cuda

        return nf4_cuda.grouped_layers(groups, self._nf4)

    def _check_kernels(self, model) -> tuple[bool, bool, list, bool]:
        """Whether the 4-bit kernel and the attention kernel are used on `model`, the groups of 4-bit
        layers launched together, and whether the cache-write kernel is used; logs which and why."""
        from studio.model import decode_attention, nf4_cuda

        notes, groups = [], []
        nf4_problem = attention_problem = "switched off"
        if self.nf4_kernel:
            self._nf4 = self._nf4 or nf4_cuda.Nf4Kernels()
            nf4_problem = nf4_cuda.kernel_ready(model, self._nf4)
        notes.append("4-bit products: the studio's CUDA kernel" if nf4_problem is None
                     else f"4-bit products: bitsandbytes' kernel (the studio's is not used: {nf4_problem})")
        if nf4_problem is None:
            group_problem = "switched off"
            if self.grouped_launches:
                groups, group_problem = nf4_cuda.groups_ready(model, self._nf4)
            if groups:
                notes.append(f"{len(groups)} groups of 4-bit layers (q/k/v, gate/up) in one launch each"
                             + (f" (not the others: {group_problem})" if group_problem else ""))
            else:
                notes.append(f"each 4-bit layer in its own launch ({group_problem or 'no q/k/v or gate/up layers'})")
        if self.attention_kernel:
            self._attention = self._attention or decode_attention.DecodeAttentionKernels()
            attention_problem = self._attention_problem(model)
        notes.append("attention of a token step: the studio's CUDA kernel" if attention_problem is None
                     else f"attention of a token step: PyTorch's (the studio's kernel is not used: {attention_problem})")
        write_problem = "switched off"
        if self.cache_write_kernel:
            self._attention = self._attention or decode_attention.DecodeAttentionKernels()
            write_problem = self._cache_write_problem(model)
        notes.append("cache writes: the studio's CUDA kernel" if write_problem is None
                     else f"cache writes: transformers' (the studio's kernel is not used: {write_problem})")
        self.cuda_kernels_note = "; ".join(notes) + "."
        log.info("Graph decoder: %s", self.cuda_kernels_note)
        return nf4_problem is None, attention_problem is None, groups, write_problem is None

    def _attention_problem(self, model) -> str | None:
        from studio.model import decode_attention

        if not decode_attention.uses_sdpa(model):
            return "the model does not attend with PyTorch's SDPA"
        shape = _head_shape(model)
        if isinstance(shape, str):
            return shape
        heads, kv_heads, head_dim = shape
        return decode_attention.kernels_ready(self._attention, head_dim, heads, kv_heads)

    def _cache_write_problem(self, model) -> str | None:
        from studio.model import decode_attention

        shape = _head_shape(model)
        if isinstance(shape, str):
            return shape
        _, kv_heads, head_dim = shape
        return decode_attention.cache_write_problem(self._attention, head_dim, kv_heads)

    cuda_kernels_note = ""  # which kernels the token rows use (4-bit products, attention), and why
    lora_kernels_note = ""  # which kernels the last adapter row's LoRA updates used, and why

    def _lora_kernels(self, model, adapters):
        """The studio's LoRA kernels for the adapter row of this generation, once they pass their check
        on each of its layer shapes; None (peft's arithmetic) for base rows only, when switched off, or
        where the check fails, which the log says once."""
        name = next((adapter for adapter in adapters if adapter is not None), None)
        if name is None or not (self.use_graphs or self.lora_kernel):
            return None
        from studio.model import lora_cuda
        from studio.model.routing import lora_layers

        problem = "switched off"
        if self.lora_kernel:
            self._lora = self._lora or lora_cuda.LoraKernels()
            problem = lora_cuda.adapter_problem(lora_layers(model), name, self._lora)
        note = ("adapter updates: the studio's CUDA kernels" if problem is None
                else f"adapter updates: peft's (the studio's kernels are not used: {problem})")
        if note != self.lora_kernels_note:
            self.lora_kernels_note = note
            log.info("Graph decoder: %s.", note)
        return self._lora if problem is None else None

    def _lora_groups(self, model, adapters, lora_kernels) -> list:
        """The adapter row's sibling LoRA layers (q/k/v, gate/up) whose updates take one launch of each
        LoRA kernel, once their grouped launch passed its check (`studio.model.lora_cuda.lora_groups`);
        the log says once whether they do and why not."""
        name = next((adapter for adapter in adapters if adapter is not None), None)
        if lora_kernels is None or name is None or not self.lora_grouped:
            self.lora_groups_note = ("" if lora_kernels is None or name is None
                                     else "each LoRA layer takes its own launches (switched off)")
            return []
        key = (id(model), name)
        first = key not in self._lora_groups_of
        if first:
            from studio.model import lora_cuda

            self._lora_groups_of[key] = lora_cuda.lora_groups(model, name, lora_kernels)
        groups, problem = self._lora_groups_of[key]
        if groups:
            self.lora_groups_note = (f"{len(groups)} groups of LoRA layers (q/k/v, gate/up) take their updates in "
                                     "one launch each" + (f" (not the others: {problem})" if problem else ""))
        else:
            self.lora_groups_note = f"each LoRA layer takes its own launches ({problem or 'no sibling layers'})"
        if first:
            log.info("Graph decoder: adapter %r: %s.", name, self.lora_groups_note)
        return groups

    lora_groups_note = ""  # whether the last adapter's sibling LoRA layers took their updates together, and why not

    # ----- the steps -----------------------------------------------------------------------------
    def _step_for(self, model, batch: int, cache_len: int, adapters: tuple) -> _Step:
        import torch
        from transformers import StaticCache

        # how the rows are routed (see studio.model.routing) matters only for several rows
        routing = ((self.rows_alone, bool(self.together(model, batch)), self._streams_wanted(model, batch))
                   if batch > 1 else ())
        adapter_rows = any(adapter is not None for adapter in adapters)
        key = (id(model), batch, cache_len, adapters, routing, bool(self.lora_kernel) and adapter_rows,
               bool(self.lora_kernel and self.lora_grouped) and adapter_rows)
        if key in self._steps:
            self._steps.move_to_end(key)
            return self._steps[key]
        while len(self._steps) >= MAX_RECORDED_STEPS:
            self._steps.popitem(last=False)
        device = model.device
        step = _Step(cache=StaticCache(config=_config_of(model), max_cache_len=cache_len),
                     token_ids=torch.zeros((batch, 1), dtype=torch.long, device=device),
                     positions=torch.zeros((batch, 1), dtype=torch.long, device=device),
                     cache_position=torch.zeros(1, dtype=torch.long, device=device),
                     mask=torch.zeros((batch, 1, 1, cache_len), dtype=torch.bool, device=device))
        ready = self._kernels_ready.get(id(model)) if self.use_graphs else None
        if ready and ready[3]:
            from studio.model.decode_attention import one_launch_cache_writes

            one_launch_cache_writes(step.cache, self._attention)
        self._steps[key] = step
        return step

    def _padded_length(self, prompt_len: int) -> int:
        """The length a prompt is padded to (0: it runs as it is; see PROMPT_GRAPHS)."""
        if not (self.prompt_graphs and prompt_len <= PROMPT_GRAPH_LIMIT):
            return 0
        return -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET

    def _prefill(self, model, step: _Step, input_ids, attention_mask):
        """Run the prompt into the (reset) cache; return the last position's logits, (batch, vocab)."""
        import torch

        if self._padded_length(input_ids.shape[1]):
            return self._prefill_padded(model, step, input_ids, attention_mask)
        _reset_cache(step.cache)
        prompt_len = input_ids.shape[1]
        attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        step.mask.zero_()
        step.mask[:, 0, 0, :prompt_len] = attention_mask.bool()
        out = _forward(model, input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                       cache=step.cache, cache_position=torch.arange(prompt_len, device=input_ids.device),
                       logits_to_keep=1)
        step.positions.copy_(positions[:, -1:] + 1)
        step.cache_position.fill_(prompt_len)
        return out.logits[:, -1, :].float()

    def _prefill_padded(self, model, step: _Step, input_ids, attention_mask):
        """`_prefill` for a prompt padded on the left to its bucket, run from its recorded graph once it
        has one (recorded on the length's second run)."""
        import torch
        import torch.nn.functional as F

        batch, prompt_len = input_ids.shape
        length = self._padded_length(prompt_len)
        attention_mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        padding = F.pad(attention_mask.long(), (length - prompt_len, 0), value=0)
        positions = (padding.cumsum(-1) - 1).clamp(min=0)
        prompt = self._prompt_for(step, batch, length)
        prompt.input_ids.copy_(F.pad(input_ids, (length - prompt_len, 0), value=0))
        prompt.positions.copy_(positions)
        prompt.mask.copy_(prompt_mask(padding.bool(), step.mask.shape[-1]))
        step.mask.zero_()
        step.mask[:, 0, 0, :length] = padding.bool()
        _reset_cache(step.cache)
        if prompt.graph is not None:
            prompt.graph.replay()
            logits = prompt.logits
        else:
            logits = self._run_prompt(model, step, prompt)
            prompt.runs += 1
            if self.use_graphs and prompt.runs >= 2 and not prompt.failure:
                self._record_prompt(model, step, prompt)
                if prompt.graph is not None:  # the recording's runs wrote to the cache: fill it again
                    _reset_cache(step.cache)
                    prompt.graph.replay()
                    logits = prompt.logits
        step.positions.copy_(positions[:, -1:] + 1)
        step.cache_position.fill_(length)
        return logits[:, -1, :].float()

    def _prompt_for(self, step: _Step, batch: int, length: int) -> _Prompt:
        import torch

        if length in step.prompts:
            step.prompts.move_to_end(length)
            return step.prompts[length]
        while len(step.prompts) >= PROMPT_GRAPHS_KEPT:
            step.prompts.popitem(last=False)
        device = step.mask.device
        prompt = _Prompt(input_ids=torch.zeros((batch, length), dtype=torch.long, device=device),
                         positions=torch.zeros((batch, length), dtype=torch.long, device=device),
                         mask=torch.zeros((batch, 1, length, step.mask.shape[-1]), dtype=torch.bool, device=device),
                         cache_position=torch.arange(length, device=device))
        step.prompts[length] = prompt
        return prompt

    def _run_prompt(self, model, step: _Step, prompt: _Prompt):
        return _forward(model, input_ids=prompt.input_ids, attention_mask=prompt.mask, position_ids=prompt.positions,
                        cache=step.cache, cache_position=prompt.cache_position, logits_to_keep=1).logits

    def _record_prompt(self, model, step: _Step, prompt: _Prompt) -> None:
        """Record a padded prompt's run (after a warm-up run on a side stream); on failure the length keeps
        its eager run, and the log and `problem` say why."""
        import torch

        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            _reset_cache(step.cache)  # the warm-up run leaves the cache as the eager run did
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run_prompt(model, step, prompt)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with _collector_paused(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._run_prompt(model, step, prompt)
            prompt.graph, prompt.logits = graph, logits
        except Exception as exc:  # the length keeps its eager run, and says so
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prompt.failure = f"{exc.__class__.__name__}: {str(exc)[:300]}"
            self._report(f"recording a prompt's run failed, prompts run step by step (a slower first token): "
                         f"{prompt.failure}")

    def _advance(self, model, step: _Step, next_ids):
        """Feed `next_ids` through one decode step; return the logits for the token after it."""
        step.token_ids.copy_(next_ids[:, None])
        if step.graph is not None:
            step.graph.replay()
            logits = step.logits
        else:
            logits = self._run_step(model, step)
        step.positions.add_(1)
        step.cache_position.add_(1)
        return logits[:, -1, :].float()

    def _run_step(self, model, step: _Step):
        step.mask.index_fill_(-1, step.cache_position, True)
        return _forward(model, input_ids=step.token_ids, attention_mask=step.mask, position_ids=step.positions,
                        cache=step.cache, cache_position=step.cache_position).logits

    def _record(self, model, step: _Step) -> None:
        """Record the decode step as a CUDA graph (after two warm-up runs on a side stream).

        Recording happens right after a prefill, on whatever token is in the step's input; the
        warm-ups write to the cache, so the caller runs the prefill again, and the reply that
        records starts from the same state as every later one. A step of several rows is first
        recorded with its rows on streams (when wanted); if that fails, with its rows one after
        another; if that fails too, the step runs eagerly.
        """
        if self._streams_wanted(model, step.token_ids.shape[0]):
            failure = self._try_record(model, step, self._row_streams_of_steps)
            if not failure:
                step.rows_on_streams = True
                return
            self._streams_failure = failure
            self._report("recording side by side with the rows on two streams failed, recorded the rows one "
                         f"after another (side by side slower): {failure}")
        failure = self._try_record(model, step, None)
        if failure:
            step.failure = self._failure = failure
            self._report(f"recording the decode step failed, decoding step by step, about 10x slower: {failure}")

    def _report(self, message: str) -> None:
        """Add a reason the decoder runs slower than its mode promises to `problem` (shown in the model
        status) beside the ones already there, each once, and log it."""
        if message not in self.problem:
            self.problem = "; ".join(part for part in (self.problem, message) if part)
        log.warning("Graph decoder: %s", message)

    def _try_record(self, model, step: _Step, row_streams) -> str:
        """Record the step (its rows on `row_streams` when given); "" or why it failed."""
        import torch

        written = _cache_counters(step.cache)
        try:
            with row_streams.on() if row_streams is not None else contextlib.nullcontext():
                if self._pool is None:
                    self._pool = torch.cuda.graph_pool_handle()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._run_step(model, step)
                        _set_cache_counters(step.cache, written)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls of other threads (a second session's work, a garbage-collected
                # CUDA object) cannot invalidate this recording; the collector is held off while it runs
                with _collector_paused(), torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    logits = self._run_step(model, step)
            step.graph, step.logits = graph, logits
            return ""
        except Exception as exc:  # some set-ups cannot be recorded: the caller falls back, and says so
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return f"{exc.__class__.__name__}: {str(exc)[:300]}"
        finally:
            _set_cache_counters(step.cache, written)


def prompt_mask(padding, cache_len: int):
    """(batch, 1, length, cache_len) bool for a left-padded prompt over a static cache: each real position
    attends to the real positions up to itself; each padding position to itself alone (a row with nothing
    to attend to would give NaNs, and the cache would carry them into later steps)."""
    import torch

    batch, length = padding.shape
    queries = torch.arange(length, device=padding.device)[:, None]
    slots = torch.arange(cache_len, device=padding.device)[None, :]
    keys = torch.zeros((batch, cache_len), dtype=torch.bool, device=padding.device)
    keys[:, :length] = padding
    mask = (slots <= queries)[None] & keys[:, None, :]
    return (mask | (slots == queries)[None])[:, None]


@contextlib.contextmanager
def _collector_paused():
    """Python's garbage collector off for the block (after one collection), on again after it."""
    import gc

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _read_back(ids) -> Callable[[], list]:
    """Start copying `ids` to the host without waiting for the GPU; the returned function waits for
    that copy only (not for work queued after it) and gives the values as a list."""
    import torch

    if ids.device.type != "cuda":
        return ids.tolist
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list:
        copied.synchronize()
        return host.tolist()

    return wait


def _token_chooser(settings) -> Callable:
    """history (batch, t) and logits (batch, vocab) -> next ids (batch,), as generate() would choose."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopPLogitsWarper)

    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(settings.repetition_penalty)))
    sampling = settings.sampling
    if sampling:
        processors.append(TemperatureLogitsWarper(float(settings.temperature)))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(float(settings.top_p)))

    def choose(history, logits):
        scores = processors(history, logits) if processors else logits
        if sampling:
            return _sample(torch, scores)
        return scores.argmax(dim=-1)

    return choose


def _sample(torch, scores):
    """One token a row drawn from softmax(scores). A row whose probabilities are not a distribution (NaN
    logits, say from an adapter that diverged) takes its largest score instead: on a GPU, multinomial's
    device-side assert on such a row would break every later generation of the process."""
    probs = torch.softmax(scores.float(), dim=-1)
    total = probs.sum(dim=-1, keepdim=True)
    usable = torch.isfinite(total) & (total > 0)
    probs = torch.where(usable, torch.nan_to_num(probs, nan=0.0, posinf=0.0, neginf=0.0), 1.0)
    drawn = torch.multinomial(probs, num_samples=1).squeeze(1)
    return torch.where(usable.squeeze(1), drawn, torch.nan_to_num(scores, nan=float("-inf")).argmax(dim=-1))


def _forward(model, cache, **kwargs):
    kwargs[_cache_argument(model)] = cache
    return model(use_cache=True, **kwargs)


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _config_of(model):
    return _base_of(model).config


def _head_shape(model) -> tuple[int, int, int] | str:
    """(query heads, key/value heads, head size) from the model's config, or why they could not be read."""
    try:
        config = _config_of(model)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        return heads, kv_heads, int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError) as exc:
        return f"its head counts could not be read from the model's config ({exc.__class__.__name__}: {exc})"


def _cache_argument(model) -> str:
    """transformers 5.24 calls the cache `cache`; earlier 5.x releases call it `past_key_values`."""
    return _cache_argument_of(type(_base_of(model)))


@functools.lru_cache(maxsize=None)
def _cache_argument_of(model_class) -> str:
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _cache_counters(cache) -> list:
    return [layer.cumulative_length.clone() if hasattr(layer, "cumulative_length") else None
            for layer in getattr(cache, "layers", [])]


def _set_cache_counters(cache, values: list) -> None:
    for layer, value in zip(getattr(cache, "layers", []), values):
        if value is not None:
            layer.cumulative_length.copy_(value)


def _reset_cache(cache) -> None:
    """Start writing at slot 0 again, over a zeroed cache (an earlier reply's entries are gone)."""
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length.zero_()
        for name in ("keys", "values"):
            if getattr(layer, name, None) is not None:
                getattr(layer, name).zero_()
