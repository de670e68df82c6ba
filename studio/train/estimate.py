"""Numbers shown before training: how many parameters the chosen LoRA will train."""

from __future__ import annotations


def lora_param_count(model, targets: tuple[str, ...] | list[str], r: int) -> int:
    """Trainable parameters of a LoRA of rank `r` on `targets` (A: r x in, B: out x r per layer)."""
    from studio.model.card import base_of

    total = 0
    wanted = set(targets)
    for name, module in base_of(model).named_modules():
        if "lora_" in name or name.rsplit(".", 1)[-1] not in wanted:
            continue
        in_features, out_features = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if in_features and out_features:
            total += r * (in_features + out_features)
    return total
