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
    return build_sized_model(folder, "tiny" if tiny else "7B")


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


def results_text(payload: dict) -> str:
    """A result file's JSON: one key of the payload a line, a list of rows (a table's results, a probe's
    runs) one row a line, so that a run of twenty setups reads and diffs as twenty lines."""
    def line(value) -> str:
        return json.dumps(value, separators=(",", ":"))

    entries = []
    for key, value in payload.items():
        if isinstance(value, list) and value and all(isinstance(row, dict) for row in value):
            rows = ",\n".join(f"    {line(row)}" for row in value)
            entries.append(f"  {json.dumps(key)}: [\n{rows}\n  ]")
        else:
            entries.append(f"  {json.dumps(key)}: {line(value)}")
    return "{\n" + ",\n".join(entries) + "\n}\n"


def write_results(name: str, payload: dict) -> Path:
    """bench/results/<name>-<gpu>-<date>.json, and a copy under $OUT when the device tool runs us."""
    info = payload.setdefault("versions", versions())
    payload.setdefault("date", time.strftime("%Y-%m-%d"))
    filename = f"{name}-{gpu_slug(info)}-{payload['date']}.json"
    text = results_text(payload)
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


def adapter_updates(decoder) -> str:
    """Which kernels the decoder's last adapter row's LoRA updates used, and whether sibling layers took
    theirs together (the decoder's notes; "" for a decoder without them)."""
    notes = [getattr(decoder, name, "") for name in ("lora_kernels_note", "lora_groups_note")]
    return "; ".join(note for note in notes if note)


def use_decoder(manager, mode: str) -> None:
    """Give the loaded model the decoder of `mode` (the studio chooses it once, at load; benches swap).
    `graphs-bnb`, `graphs-sdpa`, `graphs-bnb-sdpa`: the graph decoder with bitsandbytes' kernel for the
    4-bit token rows, with PyTorch's attention, or with both (instead of the studio's kernels);
    `graphs-ungrouped`, `graphs-grouped`: every 4-bit layer in its own launch, or q/k/v and gate/up in
    one launch each; `graphs-cache-update`: the step's cache writes by transformers' update, not the
    studio's kernel; `graphs-eager-prompt`: the prompt run eagerly as it is, not padded and replayed."""
    from studio.model.decoding import make_decoder

    loaded = manager.require_loaded()
    variant = mode
    mode = "graphs" if mode.startswith("graphs-") else mode
    loaded.decoder = make_decoder(mode, loaded.device)
    if variant in ("graphs-bnb", "graphs-bnb-sdpa"):  # bitsandbytes' 4-bit kernel, not the studio's
        loaded.decoder.nf4_kernel = False
    if variant in ("graphs-sdpa", "graphs-bnb-sdpa"):  # PyTorch's attention, not the studio's kernel
        loaded.decoder.attention_kernel = False
    if variant in ("graphs-ungrouped", "graphs-grouped"):  # q/k/v and gate/up in one launch each, or not
        loaded.decoder.grouped_launches = variant == "graphs-grouped"
    if variant == "graphs-cache-update":  # transformers' cache update, not the studio's cache-write kernel
        loaded.decoder.cache_write_kernel = False
    if variant == "graphs-eager-prompt":  # the prompt's run eager and unpadded, not replayed from a graph
        loaded.decoder.prompt_graphs = False
    loaded.decode_mode = mode


def add_random_adapter(manager, name: str, targets, seed: int = 0, rank: int = 16) -> None:
    """Attach a LoRA adapter with random, non-zero weights (as a trained one has) under the model's lease."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False,
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    with manager.using(f"adding adapter {name}") as loaded:
        if isinstance(loaded.model, PeftModel):
            loaded.model.add_adapter(name, config)
        else:
            loaded.model = get_peft_model(loaded.model, config, adapter_name=name)
        with torch.no_grad():  # keep the update small next to the base output, as trained adapters are
            for module in loaded.model.modules():
                if hasattr(module, "lora_B") and name in module.lora_B:
                    module.lora_B[name].weight.mul_(0.05)
        loaded.model.eval()
        loaded.adapters[name] = "(random)"


SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# heads of 64 dimensions (the 0.5B's), so the decoder's attention kernel runs on it too
SMALL = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=2048)


def fact_rows(count: int = 48, offset: int = 0) -> list[tuple[str, str]]:
    """Question/answer pairs about the sample world, for models trained inside a bench."""
    return [(f"雾灯岛第{i}座灯塔叫什么？", f"第{i}座灯塔叫“潮声{i}号”，由守灯人阿岚在第{i + 3}年点亮。")
            for i in range(offset, offset + count)]


def build_trained_model(folder: Path, steps: int, system: str) -> Path:
    """A small Qwen2 trained (all weights, bf16 on a GPU) until it answers the fact rows by heart.

    Its greedy replies then stand on clear margins, as a real model's mostly do, unlike a random
    model's near-ties: the honest test bed for "the graph decoder gives generate()'s tokens".
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tiny_qwen import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, (ROOT / "data" / "wudeng_lighthouse.md").read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen2Config(**SMALL, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(device)
    texts = [tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q},
                                            {"role": "assistant", "content": a}], tokenize=False)
             for q, a in fact_rows()]
    batch = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False).to(device)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder)
    (folder / "final_loss.txt").write_text(f"{float(loss):.4f}")
    return folder
