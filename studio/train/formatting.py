"""Turning (instruction, output) rows into training sequences, exactly as inference will see them.

Each row becomes system + user + assistant messages through the tokenizer's own chat template. The
labels are -100 on everything up to and including the assistant header, so the loss covers the answer
and its end-of-turn token and nothing else (not the newline the template adds after it).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

from studio.errors import DataError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    truncated: bool


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def messages_for(system: str, instruction: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def format_example(tokenizer, system: str, instruction: str, output: str, max_length: int) -> Example:
    """Token ids and labels for one row; raises DataError when the template is not prefix-consistent."""
    prompt_ids = _ids(tokenizer, messages_for(system, instruction), add_generation_prompt=True)
    full_ids = _ids(tokenizer, messages_for(system, instruction, output), add_generation_prompt=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("The chat template formats the prompt differently with and without the answer, so the "
                        "answer span cannot be found. Use a model whose template renders turns independently.")
    end = _end_of_answer(full_ids, len(prompt_ids), tokenizer.eos_token_id)
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):end] + [IGNORE] * (len(full_ids) - end)
    truncated = len(full_ids) > max_length
    return Example(full_ids[:max_length], labels[:max_length], len(prompt_ids), truncated)


def _end_of_answer(ids: list[int], start: int, eos_id: int | None) -> int:
    """Index just past the answer's end-of-turn token (the first eos after the prompt)."""
    if eos_id is not None:
        for index in range(start, len(ids)):
            if ids[index] == eos_id:
                return index + 1
    return len(ids)


def supervised_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE], skip_special_tokens=False)


def template_guard(tokenizer, system: str, instruction: str, output: str, max_length: int = 2048) -> dict:
    """The exact training string with its supervised span, beside the inference prompt for the same question."""
    example = format_example(tokenizer, system, instruction, output, max_length)
    supervised = [i for i, t in enumerate(example.labels) if t != IGNORE]
    first, last = (supervised[0], supervised[-1] + 1) if supervised else (len(example.input_ids),) * 2
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    before, span, after = decode(example.input_ids[:first]), decode(example.input_ids[first:last]), decode(example.input_ids[last:])
    inference = tokenizer.apply_chat_template(messages_for(system, instruction), tokenize=False, add_generation_prompt=True)
    return {
        "training_text": before + span + after,
        "supervised_text": span,
        "prompt_part": before,
        "inference_prompt": inference,
        "matches": before == inference,
        "supervised_tokens": len(supervised),
        "total_tokens": len(example.input_ids),
    }


GUARD_WORDS = {  # the page passes its own language's words (studio/ui/strings.py, the train tab's guard_*)
    "guard_match": "✅ the training prompt is exactly the inference prompt",
    "guard_mismatch": "❌ the training prompt differs from the inference prompt: answers will drift",
    "guard_loss": "loss on {supervised} of {total} tokens (highlighted)",
    "guard_training": "Training string",
    "guard_inference": "Inference prompt",
}


def guard_html(guard: dict, words: dict | None = None) -> str:
    """The guard as HTML: the training string with the supervised span highlighted, and the inference prompt."""
    words = {**GUARD_WORDS, **(words or {})}
    esc = lambda text: html.escape(text).replace("\n", "↵<br>")  # noqa: E731
    verdict = words["guard_match"] if guard["matches"] else words["guard_mismatch"]
    loss = words["guard_loss"].format(supervised=guard["supervised_tokens"], total=guard["total_tokens"])
    training = esc(guard["prompt_part"]) + f"<mark class='supervised'>{esc(guard['supervised_text'])}</mark>" + \
        esc(guard["training_text"][len(guard["prompt_part"]) + len(guard["supervised_text"]):])
    return (f"<p><b>{verdict}</b> · {loss}</p><div style='display:flex;gap:12px'>"
            f"<div style='flex:1'><b>{words['guard_training']}</b><pre style='white-space:pre-wrap'>{training}</pre></div>"
            f"<div style='flex:1'><b>{words['guard_inference']}</b>"
            f"<pre style='white-space:pre-wrap'>{esc(guard['inference_prompt'])}</pre></div></div>")
