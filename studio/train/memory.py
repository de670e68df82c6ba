"""A peak-memory estimate before training, from the loaded model and the chosen settings.

peak = the model as loaded (+ the bf16 copies of its 4-bit layers with `dequantize_base`) + the
adapter's fp32 weights, gradients and Adam states (16 bytes per trainable parameter) + a fixed
overhead + activations, which grow with the token positions of the largest forward pass: per position
and layer, a cost in the hidden and the MLP (intermediate) sizes for the layers that keep their
activations, a much smaller one for the layers that recompute them (gradient checkpointing), less
of both with Liger's fused kernels, plus the logits over the vocabulary (none with a loss that never
keeps them whole: Liger's fused linear cross-entropy, or the chunked loss of CUDA-graphed runs).

The coefficients are fitted by `fit` to the `bench/results/train_speed-*.json` of the newest date
with some rows held out (`python bench/fit_memory.py` writes `memory_fit.json` beside this file);
tests/test_speed_settings.py checks the estimate on every row of that file.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from studio.train.settings import LoraSettings, TrainSettings

GIB = 2**30
FIT_FILE = Path(__file__).with_name("memory_fit.json")
# The unknowns of the formula, each multiplied by a feature of the run (`Features.vector`): bytes per
# token position, layer and hidden (or intermediate) unit for layers that keep their activations
# (without / with Liger), for layers that recompute them, and per position and vocabulary entry; and per
# dropped LoRA input value whose copy and mask a layer keeps (PyTorch's dropout in eager runs with
# Liger; CUDA-graphed runs draw the mask again, `studio.model.lora_dropout`).
COEFFICIENTS = ("overhead_gib", "full_hidden", "full_intermediate", "checkpointed_hidden", "logits_vocab",
                "liger_hidden", "liger_intermediate", "loss_chunk_vocab", "kept_dropout")
HIDDEN_7B = dict(hidden=3584, intermediate=18944, layers=28, vocab=152064)
LORA_7B = 28 * 16 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584))


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


@dataclass
class Features:
    """What the formula needs about one run; `known_gib` is the part that needs no coefficient."""

    model_gib: float
    dequantized_gib: float
    adapter_gib: float
    tokens: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    checkpointed_share: float  # share of layers recomputing activations (0 without checkpointing)
    liger: bool
    # a loss that never keeps the whole logits (Liger's fused one, or the chunked loss of CUDA-graphed
    # runs since `studio.train.fused_loss`); None: as `liger` (rows from before CUDA graphs)
    fused_loss: bool | None = None
    # positions of the chunked loss's largest chunk of logits (`studio.train.fused_loss`; 0 without it)
    loss_chunk_rows: int = 0
    # nothing of the LoRA dropout is kept for the backward: CUDA-graphed runs that checkpoint layers draw
    # the mask again (`studio.model.lora_dropout`), or there is no dropout; None: rows from before the field
    # (measurement_rows)
    dropout_redrawn: bool | None = None

    @property
    def known_gib(self) -> float:
        return self.model_gib + self.dequantized_gib + self.adapter_gib

    def vector(self) -> list[float]:
        """One value per name in COEFFICIENTS (activations in GiB per byte-coefficient)."""
        per = self.tokens * self.layers / GIB
        kept = 1.0 - self.checkpointed_share
        liger = 1.0 if self.liger else 0.0
        plain = 1.0 - liger
        logits = 0.0 if (self.liger if self.fused_loss is None else self.fused_loss) else 1.0
        # the seven projections' inputs: six of the hidden size, one (down) of the intermediate size
        kept_dropout = 0.0 if self.dropout_redrawn else liger * (6 * self.hidden + self.intermediate)
        return [1.0, per * kept * self.hidden * plain, per * kept * self.intermediate * plain,
                per * self.checkpointed_share * self.hidden, self.tokens * self.vocab * logits / GIB,
                per * kept * self.hidden * liger, per * kept * self.intermediate * liger,
                self.loss_chunk_rows * self.vocab / GIB, per * kept * kept_dropout]


def predict(features: Features, coefficients: dict) -> Estimate:
    values = features.vector()
    activations = sum(coefficients[name] * value for name, value in zip(COEFFICIENTS[1:], values[1:]))
    return Estimate(model_gib=features.model_gib + features.dequantized_gib, adapter_gib=features.adapter_gib,
                    activations_gib=activations, overhead_gib=coefficients["overhead_gib"],
                    forward_tokens=features.tokens)


# ----- fitting to bench/train_speed.py results -----------------------------------------------------
def newest_result_files(folder: Path, dates: int = 1) -> list[Path]:
    """The GPU results of bench/train_speed.py of the `dates` newest dates, by name (tiny CPU runs and
    one-off attempts left out): the newest day's runs together (the 7B presets with and without CUDA
    graphs, the tutorial recipe, the sizes table). Older days measured older code, whose training
    passes kept other activations (e.g. before 2026-12-06, float32 copies of each LoRA layer's input).
    A run of code changed again the same day is moved to `superseded/` under `folder`, out of the fit."""
    pattern = re.compile(r"train_speed-(?!tiny)[A-Za-z0-9.-]+?-(\d{4}-\d{2}-\d{2})\.json$")
    dated = [(m.group(1), path) for path in Path(folder).glob("train_speed-*.json") if (m := pattern.match(path.name))]
    if not dated:
        raise FileNotFoundError(f"No train_speed result file in {folder}.")
    kept = sorted({date for date, _ in dated}, reverse=True)[:dates]
    return sorted((path for date, path in dated if date in kept), key=lambda path: path.name)


def measurements_of(paths: list[Path]) -> list[tuple[str, "Features", float]]:
    """`measurement_rows` of several result files, one after another (each setup named with its file)."""
    import json

    rows = []
    for path in paths:
        rows += [(f"{path.name}: {setup}", features, peak)
                 for setup, features, peak in measurement_rows(json.loads(path.read_text(encoding="utf-8")))]
    return rows


def measurement_rows(payload: dict) -> list[tuple[str, Features, float]]:
    """(setup, features, measured peak reserved GiB) for each result row that has a peak.

    Rows written by the current bench carry their own `memory_features`; the 2026-11-28 file
    (Qwen2.5-7B shape only) predates them and gets its features from the 7B constants."""
    from studio.train.fused_loss import chunk_rows_for

    out = []
    for result in payload.get("results", []):
        if "peak_reserved_gib" not in result or result.get("error"):
            continue
        if "memory_features" in result:
            features = Features(**result["memory_features"])
            applied = result.get("applied", [])
            if features.fused_loss is None and features.liger:  # older rows: a CUDA-graphed run kept the model's own loss
                features.fused_loss = not any(note.startswith("CUDA graphs on") for note in applied)
            if any(note.startswith("Chunked loss on") for note in applied) and not features.loss_chunk_rows:
                features.loss_chunk_rows = min(features.tokens, chunk_rows_for(features.vocab))  # before the field
            if features.dropout_redrawn is None:  # before the field: graphed runs redraw since it came
                features.dropout_redrawn = any(note.startswith("CUDA graphs on") for note in applied)
        else:
            share = 1.0 if result["gradient_checkpointing"] else 0.0
            features = Features(model_gib=payload["static_gib"], dequantized_gib=0.0, adapter_gib=LORA_7B * 16 / GIB,
                                tokens=result["largest_forward_tokens"], checkpointed_share=share, liger=False,
                                **HIDDEN_7B)
        out.append((result["setup"], features, result["peak_reserved_gib"]))
    return out


def held_out(index: int) -> bool:
    """Rows kept out of the fit: every third one."""
    return index % 3 == 2


def fit(rows: list[tuple[str, Features, float]], earlier: dict | None = None) -> dict:
    """Non-negative least squares on relative error, with a small pull toward zero for coefficients the
    rows cannot tell apart (e.g. hidden against intermediate size when every row has one model shape).
    A coefficient no row measures (e.g. layers that keep their activations without Liger, when every
    run had Liger) keeps its value in `earlier`, an earlier fit."""
    import numpy as np

    x = np.array([features.vector() for _, features, _ in rows], dtype=float)
    y = np.array([measured - features.known_gib for _, features, measured in rows], dtype=float)
    weights = 1.0 / np.array([measured for _, _, measured in rows], dtype=float)
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0
    a = x / scale * weights[:, None]
    b = y * weights
    active = list(range(a.shape[1]))
    while True:  # no negative bytes: drop a coefficient that comes out negative and solve again
        sub = a[:, active]
        solution = np.linalg.solve(sub.T @ sub + 1e-4 * np.eye(len(active)), sub.T @ b)
        negative = [k for k, value in zip(active, solution) if value < 0]
        if not negative:
            break
        active.remove(min(negative, key=lambda k: solution[active.index(k)]))
    values = np.zeros(a.shape[1])
    values[active] = solution
    coefficients = {name: float(value) for name, value in zip(COEFFICIENTS, values / scale)}
    for name in unmeasured(rows):
        if earlier and name in earlier:
            coefficients[name] = earlier[name]
    if not any(features.liger for _, features, _ in rows):  # nothing measured with Liger: assume no saving
        coefficients["liger_hidden"] = coefficients["full_hidden"]
        coefficients["liger_intermediate"] = coefficients["full_intermediate"]
    return coefficients


def unmeasured(rows: list[tuple[str, Features, float]]) -> list[str]:
    """The coefficients whose feature is zero on every row (nothing in the rows measures them)."""
    return [name for k, name in enumerate(COEFFICIENTS) if not any(f.vector()[k] for _, f, _ in rows)]


@functools.lru_cache(maxsize=1)
def fitted() -> dict:
    """The shipped coefficients (memory_fit.json)."""
    return json.loads(FIT_FILE.read_text(encoding="utf-8"))["coefficients"]


# ----- the estimate for a loaded model -------------------------------------------------------------
def forward_tokens(settings: TrainSettings, lengths: list[int]) -> int:
    """Token positions in the largest forward pass: packed = the longest rows together, padded = batch x longest."""
    capped = sorted((min(n, settings.max_length) for n in lengths), reverse=True) or [settings.max_length]
    if settings.packing:
        return sum(capped[: settings.batch_size])
    return settings.batch_size * capped[0]


def four_bit_parameters(model) -> int:
    """Parameters held in 4-bit layers (what `dequantize_base` copies to bf16)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    from studio.model.card import base_of

    return sum(m.in_features * m.out_features for m in base_of(model).modules() if isinstance(m, bnb.nn.Linear4bit))


def model_features(model, settings: TrainSettings, tokens: int, lora: LoraSettings = LoraSettings(),
                   model_bytes: int | None = None) -> Features:
    from studio.model.card import base_of, memory_in_use
    from studio.train.estimate import lora_param_count
    from studio.train.fused_loss import chunk_rows_for, loss_problem
    from studio.train.speedups import liger_available, redraws_dropout

    config = base_of(model).config
    share = min(1.0, max(0.0, settings.checkpoint_fraction)) if settings.gradient_checkpointing else 0.0
    liger = bool(settings.liger_kernels and liger_available() is None)
    graphs = graphs_expected(settings, model)
    chunked_loss = graphs and loss_problem(model) is None  # studio.train.fused_loss
    dequantized = four_bit_parameters(model) * 2 if settings.dequantize_base else 0
    return Features(model_gib=(memory_in_use(model) if model_bytes is None else model_bytes) / GIB,
                    dequantized_gib=dequantized / GIB,
                    adapter_gib=lora_param_count(model, lora.targets, lora.r) * 16 / GIB, tokens=tokens,
                    hidden=config.hidden_size, intermediate=config.intermediate_size,
                    layers=config.num_hidden_layers, vocab=config.vocab_size, checkpointed_share=share,
                    liger=liger, fused_loss=chunked_loss if graphs else liger,
                    loss_chunk_rows=min(tokens, chunk_rows_for(config.vocab_size)) if chunked_loss else 0,
                    dropout_redrawn=redraws_dropout(settings, graphs) or lora.dropout == 0)  # nothing kept


def graphs_expected(settings: TrainSettings, model=None) -> bool:
    """Whether training `model` with `settings` here replays CUDA graphs (and so computes the chunked loss)."""
    from studio.model.attention import varlen_kernel
    from studio.train.graphs import graph_problem

    if not settings.cuda_graphs:
        return False
    return graph_problem(settings, "cuda" if varlen_kernel() is not None else "cpu", True, model) is None


def estimate_peak(model, settings: TrainSettings, lengths: list[int], lora: LoraSettings = LoraSettings()) -> Estimate:
    """The estimate for the loaded model, the chosen settings and the dataset's token lengths."""
    return predict(model_features(model, settings, forward_tokens(settings, lengths), lora), fitted())


def estimate_for_dataset(loaded, dataset, system: str, settings: TrainSettings, lora: LoraSettings) -> Estimate:
    """The estimate for training `loaded` on a dataset file (what the Train tab and the CLI show)."""
    from studio.data.records import read_dataset

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
