"""Training speed and memory: the tutorial's recipe against each studio preset, in one run.

On the GPU: a random-weight model of the real Qwen2.5-7B shape in 4-bit NF4 (the studio's own
loader), LoRA r 16 on the seven projections, rows of 120-400 tokens. For each setup it reports real
(non-padding) tokens/s, optimizer steps/s, peak memory, and the ratio to the tutorial's recipe; it
checks that the Fast preset's first 20 losses match the tutorial's, times the tutorial-sized job
(183 rows, 4 epochs) with the Fast preset, and checks that the base model's greedy answer is the
same after training (adapter disabled) as before.

    python bench/train_speed.py            # GPU
    python bench/train_speed.py --tiny     # a quick CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from common import ROOT, build_model, synthetic_examples, write_results  # noqa: F401  (sets sys.path)

from transformers import TrainerCallback  # noqa: E402

from studio.model.generation import GenerationSettings, build_messages  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.job import add_trainable_adapter, make_collator  # noqa: E402
from studio.train.memory import estimate_peak  # noqa: E402
from studio.train.settings import LoraSettings, TrainSettings, preset  # noqa: E402
from studio.train.trainer import build_trainer  # noqa: E402


class StepClock(TrainerCallback):
    """Per-step wall time, loss and tokens (read from the collator)."""

    def __init__(self, collator):
        self.collator, self.times, self.tokens, self.losses = collator, [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(self.collator.tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


class ForwardSize:
    """Wraps a collator to record the largest number of token positions in one forward pass."""

    def __init__(self, inner):
        self.inner, self.largest = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __setattr__(self, name, value):
        if name in ("inner", "largest"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __call__(self, features):
        batch = self.inner(features)
        self.largest = max(self.largest, batch["input_ids"].numel())
        return batch


def run_setup(loaded, name: str, settings: TrainSettings, rows: list[dict], steps: int, warmup_steps: int = 2,
              studio_kernels: bool = True) -> dict:
    """Train `steps` optimizer steps through the studio's trainer; `studio_kernels=False` keeps PyTorch's
    default attention kernels, as the tutorial's own code gets them."""
    import gc

    import torch

    gc.collect()
    settings = replace(settings, max_steps=steps, save_every=0, logging_steps=1)
    model = add_trainable_adapter(loaded.model, "bench", LoraSettings(), settings.seed)
    loaded.model = model
    collator = ForwardSize(make_collator(settings, loaded.tokenizer.pad_token_id))
    clock = StepClock(collator)
    trainer = build_trainer(model, settings, loaded.device, ROOT / "bench" / "out" / name, "bench", rows, [],
                            collator, (clock,))
    trainer.avoid_cudnn_attention = studio_kernels
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    first = min(warmup_steps, len(clock.times) - 2)
    seconds = clock.times[-1] - clock.times[first]
    tokens = clock.tokens[-1] - clock.tokens[first]
    result = {
        "setup": name, "steps": len(clock.times), "batch_size": settings.batch_size, "grad_accum": settings.grad_accum,
        "packing": settings.packing, "gradient_checkpointing": settings.gradient_checkpointing,
        "attention": "studio (no cuDNN)" if studio_kernels else "PyTorch defaults",
        "tokens_per_s": round(tokens / seconds, 1), "steps_per_s": round((len(clock.times) - 1 - first) / seconds, 3),
        "train_wall_s": round(wall, 2), "largest_forward_tokens": collator.largest, "losses": clock.losses,
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    model.get_base_model().config.use_cache = True
    if getattr(model.get_base_model(), "is_gradient_checkpointing", False):
        model.get_base_model().gradient_checkpointing_disable()
    model.eval()
    del trainer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--model-dir", default="/tmp/qwen25-7b-random")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    import torch

    folder = build_model(Path(args.model_dir + ("-tiny" if args.tiny else "")), args.tiny)
    manager = ModelManager(decode_mode="eager")
    started = time.perf_counter()
    manager.load(ModelSpec(str(folder), "4bit"))
    load_s = time.perf_counter() - started
    question = build_messages("你是《雾灯岛》领域助手。", [], "我该怎么成为守灯人？")
    base_before = manager.chat(question, GenerationSettings.greedy(16))
    static_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    vocab = manager.require_loaded().model.config.vocab_size if args.tiny else 150000
    rows = synthetic_examples(8 * args.steps + 16, vocab)
    results, notes = [], {}
    with manager.using("benchmark") as loaded:
        setups = [("tutorial", preset("tutorial"), args.steps), ("fast", preset("fast"), args.steps),
                  ("gpu24", preset("gpu24"), args.steps),
                  ("calibration: tutorial settings, studio attention kernels", preset("tutorial"), 6),
                  ("calibration: 4 packed, no checkpointing", replace(preset("fast"), batch_size=4), 6),
                  ("calibration: 16 packed, checkpointing", replace(preset("fast"), batch_size=16,
                                                                      gradient_checkpointing=True), 6),
                  ("calibration: batch 8 padded, no checkpointing", replace(preset("gpu24"), gradient_checkpointing=False), 6),
                  ("calibration: 8 packed, checkpointing", replace(preset("fast"), gradient_checkpointing=True), 6)]
        for name, settings, steps in setups:
            # the tutorial's recipe runs as its own code would: PyTorch's default attention kernels
            result = run_setup(loaded, name, settings, rows, steps, studio_kernels=name != "tutorial")
            result["estimate_gib"] = round(estimate_peak(loaded.model, settings, [len(r["input_ids"]) for r in rows])
                                           .total_gib, 2)
            results.append(result)
            print({k: v for k, v in result.items() if k != "losses"}, flush=True)
        tutorial, fast = results[0], results[1]
        pairs = list(zip(tutorial["losses"], fast["losses"]))
        notes["loss_match_max_abs"] = round(max(abs(a - b) for a, b in pairs), 4)
        notes["loss_match_max_rel"] = round(max(abs(a - b) / max(abs(a), 1e-9) for a, b in pairs), 4)
        job_rows = synthetic_examples(183, vocab, seed=1)
        timed = run_setup(loaded, "time to adapter: 183 rows x 4 epochs, fast", replace(preset("fast"), epochs=4.0),
                          job_rows, steps=-1)
        notes["time_to_adapter_s"] = timed["train_wall_s"]
        notes["time_to_adapter_steps"] = timed["steps"]
    base_after = manager.chat(question, GenerationSettings.greedy(16))
    notes["base_unchanged_after_training"] = base_before == base_after
    for result in results:
        result["ratio_to_tutorial"] = round(result["tokens_per_s"] / tutorial["tokens_per_s"], 2)
    payload = {"model": "tiny" if args.tiny else "Qwen2.5-7B shape, random weights, 4-bit NF4 + double quant, bf16",
               "lora": "r 16, alpha 32, seven projections", "rows": "120-400 tokens, 45% prompt",
               "load_s": round(load_s, 1), "static_gib": round(static_bytes / 2**30, 2),
               "results": results, **notes}
    path = write_results("train_speed-tiny" if args.tiny else "train_speed", payload)
    print({k: v for k, v in notes.items()}, "->", path, flush=True)


if __name__ == "__main__":
    main()
