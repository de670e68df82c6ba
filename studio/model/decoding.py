"""One way to generate: a `Decoder` streams the replies of a batch of conversations, one adapter per row.

The model manager holds one decoder, chosen once when the model loads (`make_decoder`, from the
`--decode` mode). A chat is a batch of one row; side by side is a batch of a base row and an adapter
row, generated together. Every generation, whatever the decoder:
- routes each row to its adapter (`studio.model.routing`: a base row runs with every adapter off, an
  adapter row with only that adapter, whatever else is attached or active);
- runs without cuDNN's fused attention on a GPU: over the graph decoder's static cache it gave
  different replies to the same question on an H200, and it builds a plan for every new length;
- runs on the manager's one GPU thread and streams each row's text as it grows; a set `stop` event
  (or a consumer that goes away) ends it at the next token.

Two implementations: `GenerateDecoder` (transformers' `generate`, optionally with a static cache) and
`GraphDecoder` (`studio.model.graph_decode`: a static cache and the one-token step replayed from a
recorded CUDA graph).
"""

from __future__ import annotations

import abc
import contextlib
import queue
import threading
from typing import Iterator, Sequence

from studio.errors import StudioError
from studio.model.attention import without_cudnn_attention
from studio.model.generation import GenerationSettings, render_prompt
from studio.model.routing import route_rows, rows_together

# What each --decode mode does, on a GPU and on the CPU (the CLI's --help and the README say the same).
DECODE_MODES = {
    "graphs": "default. GPU: a static KV cache and the one-token step recorded once as a CUDA graph (about 3 s "
              "on the first reply of a batch and cache size; the very first also compiles the studio's kernels) and "
              "replayed for every token, with the studio's CUDA kernels for the 4-bit products (q/k/v and gate/up in one "
              "launch each), the attention, the cache writes and an adapter's LoRA updates; prompts of up to 512 "
              "tokens padded to a multiple of 64 and their run replayed too (about 280 tokens/s for a 4-bit 7B on an "
              "H100: 6x to 12x the tutorial's generate(), whose speed follows the host's CPU). CPU: the same loop "
              "with the step run eagerly, tokens equal to generate()'s",
    "eager": "plain transformers generate(), the tutorial's path. GPU and CPU: the reference; slowest on a GPU",
    "static": "generate() with a static KV cache, no compilation. GPU: 1x to 2x the tutorial's speed, "
              "following the host. CPU: the same as eager",
}


def make_decoder(mode: str, device: str) -> "Decoder":
    """The decoder for a decode mode on a device (called once, when the model loads)."""
    from studio.model.graph_decode import GraphDecoder

    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}")
    on_gpu = str(device).startswith("cuda")
    if mode == "graphs":
        return GraphDecoder(use_graphs=on_gpu)
    return GenerateDecoder(static_cache=mode == "static" and on_gpu)


class Decoder(abc.ABC):
    """Streams the replies of a batch of conversations; subclasses provide `_generate`."""

    mode = ""
    rows_alone = True  # see studio.model.routing: each row of a batch runs one-row kernels
    # ... except the decode step's 4-bit layers and output head, which take the rows together where that
    # gives each row the bits of a one-row run (checked once per model, `studio.model.routing.rows_together`)
    rows_together = True
    rows_on_streams = False  # recorded side-by-side steps run the rows' 4-bit layers concurrently (graphs only)

    def __init__(self) -> None:
        self.problem = ""  # why the decoder runs slower than its mode promises ("" when it does not)
        self._agreement: dict = {}  # (id of the model, rows) -> rows_together's answer

    def clear(self) -> None:
        """Forget anything that belongs to the model as it is now (the model is about to change)."""
        self._agreement = {}

    def together(self, model, batch: int) -> frozenset:
        """The linear layers (ids) that take a batch of `batch` single-token rows in one call."""
        if not (self.rows_alone and self.rows_together and batch > 1):
            return frozenset()
        key = (id(model), batch)
        if key not in self._agreement:
            self._agreement[key] = rows_together(model, batch)
        return self._agreement[key]

    # ----- the one entry point -----------------------------------------------------------------------
    def stream(self, loaded, conversations: Sequence[list[dict]], settings: GenerationSettings,
               adapters: Sequence[str | None], stop: threading.Event) -> Iterator[list[str]]:
        """Yield the growing replies of all rows; `adapters[i]` is row i's adapter (None = the base)."""
        if len(adapters) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(adapters)} adapters")
        model, tokenizer = loaded.model, loaded.tokenizer
        prompts = [render_prompt(tokenizer, messages) for messages in conversations]
        inputs = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True,
                           padding_side="left", truncation=False)
        check_prompt_length(int(inputs["attention_mask"].sum(-1).max()))
        inputs = inputs.to(model.device)
        sink = RowTexts(tokenizer)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.generate(model, inputs["input_ids"], inputs["attention_mask"], settings, stop, sink,
                              tokenizer.eos_token_id, tokenizer.pad_token_id, list(adapters))
            except BaseException as exc:  # surfaced to the consumer below
                failure.append(exc)
                sink.end()

        handle = _start(run, getattr(loaded, "submit", None))
        finished = False
        try:
            while (texts := sink.queue.get()) is not None:
                yield texts
            finished = True
        finally:
            if not finished:  # the consumer stopped reading: end the generation at the next token
                stop.set()
            _join(handle)
        if failure:
            raise failure[0]

    def generate(self, model, input_ids, attention_mask, settings: GenerationSettings, stop: threading.Event,
                 streamer, eos_token_id: int | None, pad_token_id: int,
                 adapters: Sequence[str | None] | None = None) -> None:
        """Feed `streamer` the prompt, then each step's new tokens (one per row), then end it, as
        `model.generate(..., streamer=streamer)` does; runs on the calling thread."""
        adapters = list(adapters) if adapters else [None] * input_ids.shape[0]
        try:
            with self._layer_kernels(model):
                together = self.together(model, len(adapters))
                lora = self._lora_kernels(model, adapters)
                with self._grouped_layers(model, len(adapters), together), \
                        route_rows(model, adapters, self.rows_alone, self._row_streams(), together, lora,
                                   self._lora_groups(model, adapters, lora)), \
                        without_cudnn_attention(input_ids.device.type == "cuda"):
                    self._generate(model, input_ids, attention_mask, settings, stop, streamer, eos_token_id,
                                   pad_token_id, tuple(adapters))
        finally:
            streamer.end()

    @abc.abstractmethod
    def _generate(self, model, input_ids, attention_mask, settings, stop, streamer, eos_token_id, pad_token_id,
                  adapters: tuple) -> None:
        """Run the generation proper: feed `streamer` the prompt, then each step's new tokens."""

    def _layer_kernels(self, model):
        """A context in which the model's layers run the decoder's own kernels, if it has any (they are
        in place before the rows are routed, so routing wraps them)."""
        return contextlib.nullcontext()

    def _row_streams(self):
        """The `studio.model.routing.RowStreams` the decoder switches on while it records (None: none)."""
        return None

    def _grouped_layers(self, model, batch: int, together: frozenset):
        """A context in which layers that take the same input run in one launch, if the decoder has such
        launches (inside `_layer_kernels`, before the rows are routed)."""
        return contextlib.nullcontext()

    def _lora_kernels(self, model, adapters: Sequence[str | None]):
        """The kernels that compute the adapter rows' LoRA updates of a token step, checked on this
        adapter (`studio.model.lora_cuda`); None: peft's arithmetic."""
        return None

    def _lora_groups(self, model, adapters: Sequence[str | None], lora_kernels) -> list:
        """The adapter's LoRA layers that take their updates together through `lora_kernels` (lists of 2
        or 3 layers that take the same input, `studio.model.lora_cuda.lora_groups`); []: each its own."""
        return []


class GenerateDecoder(Decoder):
    """transformers' `generate` (with a static KV cache when `static_cache`)."""

    def __init__(self, static_cache: bool = False):
        super().__init__()
        self.static_cache = static_cache
        self.mode = "static" if static_cache else "eager"

    def _generate(self, model, input_ids, attention_mask, settings, stop, streamer, eos_token_id, pad_token_id,
                  adapters) -> None:
        from transformers import StoppingCriteriaList

        extra = {}
        if self.static_cache:
            from studio.model.graph_decode import cache_length

            extra = {"cache_implementation": "static", "disable_compile": True,
                     "cache_config": {"max_cache_len": cache_length(input_ids.shape[1], settings.max_new_tokens)}}
        model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer,
                       stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]), pad_token_id=pad_token_id,
                       eos_token_id=eos_token_id, **settings.generate_kwargs(), **extra)


class StopOnEvent:
    """A StoppingCriteria that ends generation once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class RowTexts:
    """A streamer that collects each row's new tokens and queues the decoded texts of all rows.

    While the reply grows, a row's text leaves out a trailing half character (a Chinese character is
    often several tokens); the last texts, queued when generation ends, are the full decode.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.queue: "queue.Queue" = queue.Queue()
        self.rows: list[list[int]] | None = None
        self._prompt_seen = False
        self._ended = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if self.rows is None:
            self.rows = [[] for _ in tokens]
        for row, token in zip(self.rows, tokens):
            row.append(token)
        self.queue.put([text.rstrip("\ufffd") for text in self.texts()])

    def texts(self) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in self.rows or []]

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.rows is not None:
            self.queue.put(self.texts())
        self.queue.put(None)


MAX_PROMPT_TOKENS = 8192  # a longer conversation is refused: one reply must not hold the model for minutes


def check_prompt_length(tokens: int) -> None:
    if tokens > MAX_PROMPT_TOKENS:
        raise StudioError(f"The conversation is {tokens:,} tokens long; replies are made to at most "
                          f"{MAX_PROMPT_TOKENS:,} tokens of conversation. Clear the chat or shorten the message.")


def _start(run, submit):
    """Run `run` on the model's own GPU thread when one is given (recorded CUDA graphs and cuBLAS
    handles are per thread, so every generation happens on the same thread), else on a new thread."""
    if submit is not None:
        return submit(run)
    worker = threading.Thread(target=run, name="studio-generate", daemon=True)
    worker.start()
    return worker


def _join(handle) -> None:
    if isinstance(handle, threading.Thread):
        handle.join()
    else:
        handle.result()
