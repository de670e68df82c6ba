"""Shared by the GPU benches: a random-weight model of the real Qwen2.5-7B shape, versions, results.

No weights can be downloaded on the benchmark machine; a random model of the same shape runs at the
same speed. Its tokenizer is the test bed's small one; the output head rows of ids that tokenizer does
not know (and of its end-of-turn token) are zeroed, so greedy decoding emits known ids and always
runs to max_new_tokens, which keeps every timed generation the same length.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as studio.py sets it
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, max_position_embeddings=32768)
TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def build_model(folder: Path, tiny: bool) -> Path:
    """Save a random Qwen2 of the 7B shape (or a tiny one) with the test bed's tokenizer into `folder`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_qwen import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, (ROOT / "data" / "wudeng_lighthouse.md").read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    shape = dict(TINY if tiny else QWEN25_7B)
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0
        model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    del model
    return folder


def synthetic_examples(count: int, vocab: int, seed: int = 0, low: int = 120, high: int = 400) -> list[dict]:
    """Training rows of 120-400 tokens (the sample dataset's range), the first ~45% unsupervised."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(low, high)
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        prompt = int(length * 0.45)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def versions() -> dict:
    import importlib.metadata as md

    info = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        info["cuda"] = torch.version.cuda
    except Exception:
        pass
    return info


def gpu_slug(info: dict) -> str:
    return info.get("gpu", "cpu").replace("NVIDIA ", "").replace(" ", "-").lower()


def write_results(name: str, payload: dict) -> Path:
    """bench/results/<name>-<gpu>-<date>.json, and a copy under $OUT when the device tool runs us."""
    info = payload.setdefault("versions", versions())
    payload.setdefault("date", time.strftime("%Y-%m-%d"))
    filename = f"{name}-{gpu_slug(info)}-{payload['date']}.json"
    text = json.dumps(payload, indent=2)
    path = ROOT / "bench" / "results" / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], filename).write_text(text)
    return path


# The real Qwen2.5 shapes (their config.json files), for the sizes table of bench/train_speed.py.
_QWEN25_COMMON = dict(rope_theta=1e6, max_position_embeddings=32768)
QWEN25_SHAPES = {
    "0.5B": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 **_QWEN25_COMMON),
    "1.5B": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 **_QWEN25_COMMON),
    "3B": dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=True,
               **_QWEN25_COMMON),
    "7B": QWEN25_7B,
    "14B": dict(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_hidden_layers=48,
                num_attention_heads=40, num_key_value_heads=8, rms_norm_eps=1e-5, tie_word_embeddings=False,
                **_QWEN25_COMMON),
}


def build_sized_model(folder: Path, size: str) -> Path:
    """Save a random Qwen2 of one of QWEN25_SHAPES (or "tiny") with the test bed's tokenizer into `folder`.

    Untied shapes get the same zeroed output rows as build_model; tied ones keep their embeddings."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_qwen import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, (ROOT / "data" / "wudeng_lighthouse.md").read_text(encoding="utf-8"))
    tiny = size == "tiny"
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    shape = dict(TINY if tiny else QWEN25_SHAPES[size])
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if not shape.get("tie_word_embeddings"):
        with torch.no_grad():
            model.lm_head.weight[len(tokenizer):] = 0
            model.lm_head.weight[tokenizer.eos_token_id] = 0
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder
