"""What the speed presets rely on, checked on the CPU: packed and padded batches compute the same
logits and loss as one sequence at a time, and the memory formula matches the GPU measurements."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from studio.train.job import Collator, PackedCollator
from studio.train.memory import estimate_from, forward_tokens
from studio.train.settings import PRESETS, TrainSettings, preset

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "results" / "train_speed-h200-2026-11-28.json"


def rows(vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in (9, 15, 6, 12):
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


@pytest.fixture()
def plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_packed_rows_do_not_attend_to_each_other(plain_model):
    examples = rows(plain_model.config.vocab_size)
    with torch.no_grad():
        alone = [plain_model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        batch = PackedCollator()(examples)
        packed = plain_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert torch.allclose(torch.cat(alone), packed, atol=1e-4)


def test_packed_padded_and_one_at_a_time_give_the_same_loss(plain_model):
    examples = rows(plain_model.config.vocab_size)
    with torch.no_grad():
        packed_batch = PackedCollator()(examples)
        packed = plain_model(**packed_batch, use_cache=False).loss
        padded = plain_model(**Collator(0)(examples)).loss
        total = sum(plain_model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                    * sum(l != -100 for l in e["labels"]) for e in examples)
        count = sum(sum(l != -100 for l in e["labels"]) for e in examples)
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)
    assert packed.item() == pytest.approx((total / count).item(), abs=1e-5)


def test_presets_keep_eight_sequences_per_optimizer_step():
    for name in PRESETS:
        settings = preset(name)
        assert settings.batch_size * settings.grad_accum == 8, name
        assert settings.learning_rate == 1e-3 and settings.epochs == 4.0
    assert preset("fast").packing and not preset("fast").gradient_checkpointing
    assert preset("gpu24").gradient_checkpointing


def test_forward_tokens():
    lengths = [120, 400, 300, 250, 200, 180, 150, 390, 380, 130]
    assert forward_tokens(preset("tutorial"), lengths) == 400
    assert forward_tokens(preset("gpu24"), lengths) == 8 * 400
    assert forward_tokens(preset("fast"), lengths) == 400 + 390 + 380 + 300 + 250 + 200 + 180 + 150
    assert forward_tokens(replace(preset("tutorial"), max_length=256), lengths) == 256


def test_memory_formula_is_within_20_percent_of_the_h200_measurements():
    bench = json.loads(BENCH.read_text())
    lora_params = 28 * 16 * ((3584 + 3584) + 2 * (3584 + 512) + (3584 + 3584) + 2 * (3584 + 18944) + (18944 + 3584))
    for result in bench["results"]:
        settings = TrainSettings(gradient_checkpointing=result["gradient_checkpointing"])
        estimate = estimate_from(int(bench["static_gib"] * 2**30), lora_params, 3584, 28, 152064, settings,
                                 result["largest_forward_tokens"])
        measured = result["peak_reserved_gib"]
        tolerance = 0.2 if result["setup"] in PRESETS else 0.25
        assert abs(estimate.total_gib - measured) / measured < tolerance, (result["setup"], estimate.total_gib, measured)
