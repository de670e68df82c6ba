"""LoRA and training settings, with the tutorial's values as defaults and presets by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoraSettings:
    """Where and how big the adapter is (the tutorial's 4.1.2)."""

    r: int = field(default=16, metadata={"help": "Rank of the low-rank update."})
    alpha: int = field(default=32, metadata={"help": "Scaling: the update is multiplied by alpha / r."})
    dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapter's input during training."})
    bias: str = field(default="none", metadata={"help": "Train no biases ('none'), as the tutorial."})
    targets: tuple[str, ...] = field(default=ALL_PROJECTIONS, metadata={"help": "Linear layers that get an adapter."})

    def to_peft(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias=self.bias,
                          task_type="CAUSAL_LM", target_modules=list(self.targets))


def peft_default_targets(model_type: str) -> tuple[str, ...]:
    """peft's built-in choice for a model type (for qwen2: q_proj and v_proj, as the tutorial's notebook)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAPPING

    return tuple(MAPPING.get(model_type, ("q_proj", "v_proj")))


@dataclass
class TrainSettings:
    """How the adapter is trained (the tutorial's 4.1.4)."""

    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    epochs: float = field(default=4.0, metadata={"help": "Passes over the training rows."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1 = use epochs)."})
    batch_size: int = field(default=1, metadata={"help": "Sequences per forward pass."})
    grad_accum: int = field(default=8, metadata={"help": "Forward passes per optimizer step."})
    scheduler: str = field(default="linear", metadata={"help": "Learning-rate schedule."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps spent warming up."})
    max_length: int = field(default=2048, metadata={"help": "Longer training sequences are cut to this many tokens."})
    precision: str = field(default="auto", metadata={"help": "auto = bf16 where supported, else fp16 on GPU, fp32 on CPU."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "Recompute activations to save memory."})
    packing: bool = field(default=False, metadata={"help": "Flatten each batch into one padding-free sequence (position ids restart per row, so rows never attend to each other)."})
    seed: int = field(default=42, metadata={"help": "Random seed for the split, initialisation and shuffling."})
    save_every: int = field(default=50, metadata={"help": "Checkpoint every N optimizer steps (0 = never); the last two are kept."})
    heldout_per_group: int = field(default=1, metadata={"help": "Phrasings of each fact kept out of training (groups of 4+)."})
    logging_steps: int = field(default=1, metadata={"help": "Log every N optimizer steps."})
    # Speed switches (GPU only; each leaves the loss the same, tests/test_speed_settings.py and
    # bench/train_speed.py check that). They act only while training: chat gets the model unchanged.
    checkpoint_fraction: float = field(default=1.0, metadata={"help": "With gradient checkpointing on: the share of decoder layers that recompute their activations (1.0 = every layer; less is faster and uses more memory)."})
    liger_kernels: bool = field(default=False, metadata={"help": "Fused Triton kernels from the liger-kernel package while training: RMSNorm, RoPE, SwiGLU and a linear cross-entropy that never builds the full logits. Needs a CUDA GPU and liger-kernel; skipped with a note otherwise."})
    dequantize_base: bool = field(default=False, metadata={"help": "While training, keep a bf16 copy of the 4-bit base weights (dequantized once, the same values) instead of dequantizing them on every forward and backward pass: faster, more memory (about 2 bytes per base parameter)."})
    cuda_graphs: bool = field(default=False, metadata={"help": "Replay each packed training pass (embedding, decoder layers, loss and the backward to the adapter's gradients) from one CUDA graph per pass size (passes padded to a multiple of 256 positions; the first graph at a size that holds 99% of the passes the rows can make, a smaller size captured only where its faster replays save more than the capture costs, both measured; at most 8 sizes a run; the run's first pass and each capture run eagerly): the host launches one graph instead of thousands of kernels, and the loss is computed chunk by chunk (Liger's fused loss reads a count back to the host, which a graph cannot hold). With gradient checkpointing, the checkpointed layers' recomputation is replayed in the same graph (their LoRA dropout draws the same mask again from a seed per pass instead of keeping it). Needs a CUDA GPU, packing, no compiled layers and gradient accumulation 1; otherwise the run trains without it and its log says why."})
    compile_layers: bool = field(default=False, metadata={"help": "torch.compile each decoder layer while training (dynamic shapes): about 1.7x the steps/s of the eager layers on an H200 (0.5B and 7B shapes), but the first run waits for the compile: a minute or two the first time on a machine, about 10 s once its compile cache is warm. A later run with the same LoRA shape and switches reuses the compiled code (the tutorial-sized job: 13.9 s instead of 25.1 s on the 0.5B, 19.9 s instead of 32.5 s on the 7B). With Liger kernels on, Liger keeps only its fused loss. Where compiling fails, the run goes on eagerly and its log says why."})
    early_stop_patience: int = field(default=0, metadata={"help": "Stop when the held-out eval loss (measured once an epoch) has not improved for this many evaluations in a row (0 = off); the adapter of the best evaluation is kept."})


PRESETS: dict[str, tuple[str, TrainSettings]] = {
    "tutorial": ("Tutorial recipe: lr 1e-3, 4 epochs, batch 1 x grad-accum 8, linear, 3% warmup, checkpointing",
                 TrainSettings()),
    "fast": ("Fast (large GPU): the same 8 sequences per step packed into one padding-free forward pass, no "
             "checkpointing, Liger kernels, a bf16 copy of the base and each pass's forward, loss and backward replayed "
             "from CUDA graphs while training",
             TrainSettings(batch_size=8, grad_accum=1, packing=True, gradient_checkpointing=False, liger_kernels=True,
                           dequantize_base=True, cuda_graphs=True)),
    "gpu24": ("24 GB card: the same 8 sequences per step packed into one forward pass, Liger kernels, three layers "
              "in eight checkpointed, each pass and its recomputation replayed from CUDA graphs (about 10,000 tokens/s "
              "at 15 GiB on the 7B on an H200: 13-20x the tutorial, whose rate follows the host's processor)",
              TrainSettings(batch_size=8, grad_accum=1, packing=True, gradient_checkpointing=True, liger_kernels=True,
                            checkpoint_fraction=0.375, cuda_graphs=True)),
}


def preset(name: str) -> TrainSettings:
    if name not in PRESETS:
        from studio.errors import StudioError

        raise StudioError(f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return replace(PRESETS[name][1])


def settings_dict(lora: LoraSettings, train: TrainSettings) -> dict:
    return {"lora": {**asdict(lora), "targets": list(lora.targets)}, "training": asdict(train)}
