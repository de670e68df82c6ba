"""Chat generation: format with the tokenizer's own chat template, stream only the new tokens.

The prompt is tokenized once; `generate` keeps its KV cache, so each new token costs one forward
step, not a re-tokenization of the whole conversation. A threading.Event stops generation at the next
token, and abandoning the stream (a closed browser tab) sets it too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class GenerationSettings:
    """How replies are sampled. temperature 0 means greedy decoding (the same answer every time)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.7, metadata={"help": "0 = greedy; higher = more varied."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much probability."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Above 1 discourages repeating tokens."})

    @classmethod
    def greedy(cls, max_new_tokens: int = 256) -> "GenerationSettings":
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0)

    @classmethod
    def tutorial_sampling(cls, max_new_tokens: int = 256) -> "GenerationSettings":
        """The tutorial's evaluation settings."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.2)

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": int(self.max_new_tokens), "repetition_penalty": float(self.repetition_penalty)}
        if self.temperature and self.temperature > 0:
            kwargs.update(do_sample=True, temperature=float(self.temperature), top_p=float(self.top_p))
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def build_messages(system_prompt: str, history: list[dict], user_message: str | None = None) -> list[dict]:
    """System prompt + earlier turns (role/content dicts) + the new user message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages += [{"role": turn["role"], "content": _text_of(turn["content"])} for turn in history]
    if user_message is not None:
        messages.append({"role": "user", "content": user_message})
    return messages


def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # Gradio's multimodal message parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The exact string the chat template produces, ready for the assistant to answer."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class _StopOnEvent:
    """A StoppingCriteria that ends generation once `event` is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _start(run, submit) -> "object":
    """Run `run` on the model's own GPU thread when one is given (compiled CUDA graphs keep per-thread
    state, so every generation must happen on the same thread), else on a new thread."""
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


def stream_text(model, tokenizer, prompt: str, settings: GenerationSettings, stop: threading.Event,
                decode_mode: str = "eager", submit=None, decoder=None) -> Iterator[str]:
    """Yield the reply to `prompt` piece by piece; stop early when `stop` is set or the caller leaves.

    With a `decoder` (studio.model.graph_decode) it generates instead of `model.generate`."""
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    from studio.model.fast_decode import decode_kwargs

    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    extra = decode_kwargs(model, decode_mode, inputs["input_ids"].shape[1], settings.max_new_tokens)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if decoder is not None:
                decoder.generate(model, inputs["input_ids"], inputs["attention_mask"], settings, stop, streamer,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id)
                return
            model.generate(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                streamer=streamer,
                stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **settings.generate_kwargs(),
                **extra,
            )
        except BaseException as exc:  # surfaced to the consumer below
            failure.append(exc)
            streamer.end()

    handle = _start(run, submit)
    try:
        for piece in streamer:
            if piece:
                yield piece
    finally:
        stop.set()
        _join(handle)
    if failure:
        raise failure[0]


def generate_text(model, tokenizer, prompt: str, settings: GenerationSettings, decode_mode: str = "eager",
                  submit=None, decoder=None) -> str:
    """The whole reply at once (used by evaluation and the CLI)."""
    return "".join(stream_text(model, tokenizer, prompt, settings, threading.Event(), decode_mode, submit, decoder))


class StopSignals:
    """One stop event per viewer session, so Stop (or a closed tab) ends only that viewer's reply."""

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, session: str) -> threading.Event:
        """A new, unset event for the session's next generation (the previous one is set)."""
        with self._lock:
            previous = self._events.get(session)
            if previous is not None:
                previous.set()
            event = self._events[session] = threading.Event()
            return event

    def stop(self, session: str) -> bool:
        with self._lock:
            event = self._events.pop(session, None)
        if event is None:
            return False
        event.set()
        return True


class _BatchStreamer:
    """Collects each row's new tokens step by step and hands out the decoded texts of all rows."""

    def __init__(self, tokenizer):
        import queue

        self.tokenizer = tokenizer
        self.queue: "queue.Queue" = queue.Queue()
        self.rows: list[list[int]] | None = None
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first passes the prompt
            self._prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if self.rows is None:
            self.rows = [[] for _ in tokens]
        for row, token in zip(self.rows, tokens):
            row.append(token)
        self.queue.put([self.tokenizer.decode(row, skip_special_tokens=True) for row in self.rows])

    def end(self) -> None:
        self.queue.put(None)


def stream_batch(model, tokenizer, prompts: list[str], settings: GenerationSettings, stop: threading.Event,
                 adapter_names: list[str] | None = None, decode_mode: str = "eager", submit=None,
                 decoder=None) -> Iterator[list[str]]:
    """Yield the growing replies of several prompts generated in one batch (left-padded).

    With `adapter_names` (peft's mixed-adapter batch; "__base__" = no adapter) each row runs with its
    own adapter in the same forward pass, so comparing base and fine-tuned costs about one generation.
    """
    from transformers import StoppingCriteriaList

    inputs = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True,
                       padding_side="left").to(model.device)
    from studio.model.fast_decode import decode_kwargs

    streamer = _BatchStreamer(tokenizer)
    failure: list[BaseException] = []
    extra = decode_kwargs(model, decode_mode, inputs["input_ids"].shape[1], settings.max_new_tokens)
    if adapter_names:
        extra["adapter_names"] = adapter_names

    def run() -> None:
        try:
            if decoder is not None:
                decoder.generate(model, inputs["input_ids"], inputs["attention_mask"], settings, stop, streamer,
                                 tokenizer.eos_token_id, tokenizer.pad_token_id, adapter_names)
                return
            model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], streamer=streamer,
                           stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]),
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           **settings.generate_kwargs(), **extra)
        except BaseException as exc:
            failure.append(exc)
        finally:
            streamer.end()

    handle = _start(run, submit)
    try:
        while (texts := streamer.queue.get()) is not None:
            yield texts
    finally:
        stop.set()
        _join(handle)
    if failure:
        raise failure[0]
