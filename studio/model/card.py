"""The model card: what the loaded model is, as the tutorial's section 3.1.1 inspects it.

Everything is read from the model and tokenizer themselves (module tree, which layers are 4-bit,
which linear layers LoRA can target), never from a table of known models.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class ModelCard:
    name: str
    quant: str
    device: str
    module_tree: str
    linear4bit_layers: int
    linear8bit_layers: int
    lora_targets: list[str]
    total_params: int
    trainable_params: int
    memory_bytes: int
    vocab_size: int
    pad_token: str | None
    pad_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    chat_template: str
    adapters: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)

    def tokenizer_tuple(self) -> tuple:
        """(pad_token, eos_token, pad_token_id, eos_token_id), as the tutorial prints it."""
        return (self.pad_token, self.eos_token, self.pad_token_id, self.eos_token_id)


def base_of(model):
    """The plain transformers model under a PeftModel, or the model itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _is_linear(module) -> bool:
    import torch

    if isinstance(module, torch.nn.Linear):
        return True
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def lora_target_names(model) -> list[str]:
    """Short names of the linear layers LoRA can wrap (the output head excluded), in model order; a layer
    that already holds an adapter is named as itself, not as its `base_layer`."""
    names: list[str] = []
    output = base_of(model).get_output_embeddings()
    for full_name, module in base_of(model).named_modules():
        if module is output or "lora_" in full_name or not _is_linear(module):
            continue
        short = full_name.removesuffix(".base_layer").rsplit(".", 1)[-1]
        if short not in names:
            names.append(short)
    return names


def count_layers(model, kind: str) -> int:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    cls = bnb.nn.Linear4bit if kind == "4bit" else bnb.nn.Linear8bitLt
    return sum(1 for module in base_of(model).modules() if isinstance(module, cls))


def logical_numel(param) -> int:
    """Parameter count as the model defines it (4-bit weights are stored packed, two per byte)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        numel = 1
        for size in quant_state.shape:
            numel *= int(size)
        return numel
    return param.numel()


def parameter_counts(model) -> tuple[int, int]:
    total = trainable = 0
    for param in model.parameters():
        count = logical_numel(param)
        total += count
        if param.requires_grad:
            trainable += count
    return total, trainable


def base_parameter_count(model) -> int:
    """The base model's parameters (4-bit weights at their full shape), without any attached adapter's."""
    return sum(logical_numel(param) for name, param in base_of(model).named_parameters() if "lora_" not in name)


def memory_in_use(model) -> int:
    try:
        return int(base_of(model).get_memory_footprint())
    except Exception:
        return sum(p.numel() * p.element_size() for p in model.parameters())


def build_card(model, tokenizer, name: str, quant: str, device: str, adapters=()) -> ModelCard:
    total, trainable = parameter_counts(model)
    return ModelCard(
        name=name,
        quant=quant,
        device=device,
        module_tree=str(base_of(model)),
        linear4bit_layers=count_layers(model, "4bit"),
        linear8bit_layers=count_layers(model, "8bit"),
        lora_targets=lora_target_names(model),
        total_params=total,
        trainable_params=trainable,
        memory_bytes=memory_in_use(model),
        vocab_size=len(tokenizer),
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        eos_token=tokenizer.eos_token,
        eos_token_id=tokenizer.eos_token_id,
        chat_template=tokenizer.chat_template or "",
        adapters=list(adapters),
    )


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
