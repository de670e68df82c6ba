"""Chat generation settings and prompts: the tokenizer's own chat template, sampling settings, stop events.

Generating itself is `studio.model.decoding` (one decoder per loaded model). The prompt is tokenized
once and the KV cache kept, so each new token costs one forward step, not a re-tokenization of the
whole conversation. A threading.Event stops generation at the next token, and abandoning the stream
(a closed browser tab) sets it too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


# Below this temperature a reply is decoded greedily, its limit as the temperature goes to 0. Dividing the
# logits by a smaller one (1e-39, say) overflows them to inf, the probabilities become NaN, and on a GPU the
# sampler's device-side assert then breaks every later generation of the process.
MIN_SAMPLING_TEMPERATURE = 0.01


@dataclass
class GenerationSettings:
    """How replies are sampled. temperature 0 means greedy decoding (the same answer every time)."""

    max_new_tokens: int = field(default=256, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(default=0.7, metadata={
        "help": f"0 = greedy (so is anything below {MIN_SAMPLING_TEMPERATURE}); higher = more varied."})
    top_p: float = field(default=0.9, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this much probability."})
    repetition_penalty: float = field(default=1.05, metadata={"help": "Above 1 discourages repeating tokens."})

    @classmethod
    def greedy(cls, max_new_tokens: int = 256) -> "GenerationSettings":
        return cls(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, repetition_penalty=1.0)

    @classmethod
    def tutorial_sampling(cls, max_new_tokens: int = 256) -> "GenerationSettings":
        """The tutorial's evaluation settings."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.7, top_p=0.9, repetition_penalty=1.2)

    @property
    def sampling(self) -> bool:
        """Whether replies are sampled; False means greedy."""
        return bool(self.temperature) and float(self.temperature) >= MIN_SAMPLING_TEMPERATURE

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": int(self.max_new_tokens), "repetition_penalty": float(self.repetition_penalty)}
        if self.sampling:
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


def generate_text(model, tokenizer, prompt: str, settings: GenerationSettings) -> str:
    """The reply through plain `model.generate`, all at once: the reference the decoders are checked
    against (the studio itself generates through `studio.model.decoding`)."""
    import torch

    inputs = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             **settings.generate_kwargs())
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


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
