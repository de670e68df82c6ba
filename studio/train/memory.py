"""A peak-memory estimate before training, from the loaded model and the chosen settings.

peak = the model as loaded + the adapter's fp32 weights, gradients and Adam states (16 bytes per
trainable parameter) + a fixed overhead (CUDA context workspaces, allocator slack) + activations,
which grow with the token positions of the largest forward pass: per position, a cost proportional to
hidden size x layers (much smaller with gradient checkpointing) plus the logits over the vocabulary.
The coefficients are fitted to bench/train_speed.py measurements on the Qwen2.5-7B shape
(README, Performance) and hold within 20% on the presets there.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.train.settings import LoraSettings, TrainSettings

GIB = 2**30
# Fitted to peak reserved memory on an H200 (bench/results/train_speed-h200-2026-11-28.json): bytes per token
# position of the largest forward pass.
BYTES_PER_POSITION_LAYER_HIDDEN = {True: 5.3, False: 86.0}  # x hidden x layers; key: gradient checkpointing
BYTES_PER_POSITION_VOCAB = 12.0  # x vocabulary: bf16 logits, their fp32 copy and gradient
OVERHEAD_GIB = 0.25


@dataclass
class Estimate:
    model_gib: float
    adapter_gib: float
    activations_gib: float
    overhead_gib: float
    forward_tokens: int

    @property
    def total_gib(self) -> float:
        return self.model_gib + self.adapter_gib + self.activations_gib + self.overhead_gib

    def describe(self, free_gib: float | None = None) -> str:
        text = (f"Estimated peak {self.total_gib:.1f} GiB = model {self.model_gib:.1f} + adapter and optimizer "
                f"{self.adapter_gib:.2f} + activations {self.activations_gib:.1f} ({self.forward_tokens} tokens in the "
                f"largest forward pass) + overhead {self.overhead_gib:.1f}.")
        if free_gib is not None:
            verdict = "fits" if self.total_gib <= free_gib else "WILL NOT FIT"
            text += f" Free GPU memory: {free_gib:.1f} GiB: {verdict}."
            if self.total_gib > free_gib:
                text += " Lower the batch size or max length, or turn gradient checkpointing on (preset gpu24)."
        return text


def forward_tokens(settings: TrainSettings, lengths: list[int]) -> int:
    """Token positions in the largest forward pass: packed = the longest rows together, padded = batch x longest."""
    capped = sorted((min(n, settings.max_length) for n in lengths), reverse=True) or [settings.max_length]
    if settings.packing:
        return sum(capped[: settings.batch_size])
    return settings.batch_size * capped[0]


def estimate_from(model_bytes: int, adapter_params: int, hidden: int, layers: int, vocab: int,
                  settings: TrainSettings, tokens: int) -> Estimate:
    """The formula itself, from plain numbers."""
    per_position = (BYTES_PER_POSITION_LAYER_HIDDEN[bool(settings.gradient_checkpointing)] * hidden * layers
                    + BYTES_PER_POSITION_VOCAB * vocab)
    return Estimate(model_gib=model_bytes / GIB, adapter_gib=adapter_params * 16 / GIB,
                    activations_gib=tokens * per_position / GIB, overhead_gib=OVERHEAD_GIB, forward_tokens=tokens)


def estimate_peak(model, settings: TrainSettings, lengths: list[int], lora: LoraSettings = LoraSettings()) -> Estimate:
    """The estimate for the loaded model, the chosen settings and the dataset's token lengths."""
    from studio.model.card import base_of, memory_in_use
    from studio.train.estimate import lora_param_count

    config = base_of(model).config
    return estimate_from(memory_in_use(model), lora_param_count(model, lora.targets, lora.r), config.hidden_size,
                         config.num_hidden_layers, config.vocab_size, settings, forward_tokens(settings, lengths))


def estimate_for_dataset(loaded, dataset, system: str, settings: TrainSettings, lora: LoraSettings) -> Estimate:
    """The estimate for training `loaded` on a dataset file (what the Train tab and the CLI show)."""
    from studio.data.datasets import read_dataset

    lengths = dataset_lengths(loaded.tokenizer, read_dataset(dataset), system, settings.max_length)
    return estimate_peak(loaded.model, settings, lengths, lora)


def dataset_lengths(tokenizer, rows: list[dict], system: str, max_length: int) -> list[int]:
    """Token lengths of the rows as the trainer will see them."""
    from studio.train.formatting import format_example

    return [len(format_example(tokenizer, row.get("system") or system, row["instruction"], row["output"],
                               max_length).input_ids) for row in rows]


def free_gpu_gib() -> float | None:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return free / GIB
    except Exception:
        return None
