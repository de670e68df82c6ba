"""Training speed and memory: the tutorial's recipe against each studio preset and speed switch, and a
table over the Qwen2.5 sizes, in one run.

On the GPU: random-weight models of the real Qwen2.5 shapes in 4-bit NF4 (the studio's own loader,
quantized at load), LoRA r 16 on the seven projections, rows of 120-400 tokens, 8 sequences per
optimizer step everywhere. For each setup: real (non-padding) tokens/s, optimizer steps/s, peak
memory, the estimate, and the ratio to the tutorial's recipe on the same shape.

1. The 7B shape: the tutorial recipe (20 steps), then each Fast candidate (packed, no checkpointing,
   with Liger kernels / dequantized base / compiled layers, the compiled one last) and each 24 GB candidate (checkpointing,
   padded or packed, all or half of the layers), each 20 steps, its first 20 losses against the
   tutorial's. The best Fast candidate (fastest with losses within 1%) and the best 24 GB one (fastest
   under 20 GiB with losses within 1%) are named in `recommended`; the rest of the run uses them.
2. Time to adapter: the tutorial-sized job (183 rows x 4 epochs = 92 steps) with the best Fast, on
   the 7B and the 0.5B shapes.
3. The sizes table: for 0.5B, 1.5B, 3B and 14B, the model load time (4-bit at load), the tutorial
   recipe (a few steps), the best Fast and the best 24 GB.

Robust by design: each setup runs in try/except and records its error; the result file is rewritten
after every setup (and copied to $OUT); a time budget (--budget-s) skips what would not fit and
records the skip, and a running setup stops at the deadline with the steps it has.

    python bench/train_speed.py            # GPU, about 9 minutes with the model builds
    python bench/train_speed.py --tiny     # a quick CPU run of the same code, plus the studio's trainer
                                           # against a plain transformers Trainer (tutorial arguments)
"""

from __future__ import annotations

import argparse
import shutil
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

from common import ROOT, build_sized_model, synthetic_examples, write_results  # noqa: F401  (sets sys.path)

from transformers import TrainerCallback  # noqa: E402

from studio.model.generation import GenerationSettings, build_messages  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.collate import make_collator  # noqa: E402
from studio.train.job import add_trainable_adapter  # noqa: E402
from studio.train.memory import estimate_peak, model_features  # noqa: E402
from studio.train.settings import LoraSettings, TrainSettings, preset  # noqa: E402
from studio.train.trainer import build_trainer  # noqa: E402

LOSS_TOLERANCE = 0.01  # first 20 losses within 1% of the tutorial's
GPU24_LIMIT_GIB = 20.0

# Fast candidates: the same 8 sequences per step packed into one pass, no checkpointing, plus switches.
_NO_SWITCHES = dict(liger_kernels=False, dequantize_base=False, compile_layers=False, cuda_graphs=False)
FAST_CANDIDATES = {
    "fast": _NO_SWITCHES,
    "fast + liger": {**_NO_SWITCHES, "liger_kernels": True},
    "fast + dequantized base": {**_NO_SWITCHES, "dequantize_base": True},
    "fast + liger + dequantized base": {**_NO_SWITCHES, "liger_kernels": True, "dequantize_base": True},
    "fast + liger + dequantized base + cuda graphs": {**_NO_SWITCHES, "liger_kernels": True, "dequantize_base": True,
                                                      "cuda_graphs": True},
    "fast + dequantized base + compiled layers": {**_NO_SWITCHES, "dequantize_base": True, "compile_layers": True},
    "fast + liger + dequantized base + compiled layers": {**_NO_SWITCHES, "liger_kernels": True,
                                                          "dequantize_base": True, "compile_layers": True},
}
# 24 GB candidates: checkpointing, padded (the preset today) or packed, all or part of the layers.
GPU24_CANDIDATES = {
    "gpu24": {},
    "gpu24 packed + liger": dict(packing=True, liger_kernels=True),
    "gpu24 packed + liger, half the layers checkpointed": dict(packing=True, liger_kernels=True,
                                                               checkpoint_fraction=0.5),
    "gpu24 packed, half the layers checkpointed": dict(packing=True, checkpoint_fraction=0.5),
}
# Rough seconds each kind of work needs on the H200 (for the budget; a setup that overruns is cut).
NEEDS = {"build": {"0.5B": 8, "1.5B": 15, "3B": 25, "7B": 45, "14B": 90, "tiny": 1},
         "tutorial_step": {"0.5B": 4.5, "1.5B": 5, "3B": 6, "7B": 5.5, "14B": 9, "tiny": 0.2}}


class Budget:
    """Seconds left before the deadline; `allow` says whether a piece of work fits and records skips."""

    def __init__(self, seconds: float, skipped: list):
        self.deadline = time.perf_counter() + seconds
        self.skipped = skipped

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allow(self, what: str, need_s: float) -> bool:
        if self.left() >= need_s:
            return True
        self.skipped.append({"what": what, "needed_s": round(need_s), "left_s": round(self.left())})
        print("skipped (time budget):", what, flush=True)
        return False


class StepClock(TrainerCallback):
    """Per-step wall time, loss and tokens (read from the collator); stops the run at the deadline."""

    def __init__(self, collator, deadline: float | None = None):
        self.collator, self.deadline = collator, deadline
        self.times, self.tokens, self.losses = [], [], []
        self.cut = False

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.tokens.append(self.collator.tokens_seen)
        if self.deadline is not None and time.perf_counter() > self.deadline:
            control.should_training_stop = self.cut = True

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
              studio_kernels: bool = True, deadline: float | None = None, model_bytes: int | None = None,
              studio_lora_forward: bool | None = None, packed_varlen: bool = True) -> dict:
    """Train `steps` optimizer steps through the studio's trainer; `studio_kernels=False` keeps PyTorch's
    default attention kernels and peft's own LoRA forward, as the tutorial's own code gets them
    (`studio_lora_forward` sets the LoRA forward alone); `packed_varlen=False` keeps SDPA's block mask
    for packed passes (`--varlen-ab`)."""
    import gc

    import torch

    gc.collect()
    settings = replace(settings, max_steps=steps, save_every=0, logging_steps=1)
    model = add_trainable_adapter(loaded.model, "bench", LoraSettings(), settings.seed)
    loaded.model = model
    collator = ForwardSize(make_collator(settings, loaded.tokenizer))
    clock = StepClock(collator, deadline)
    trainer = build_trainer(model, settings, loaded.device, ROOT / "bench" / "out" / name.replace(" ", "_"), "bench",
                            rows, [], collator, (clock,))
    trainer.avoid_cudnn_attention = studio_kernels
    trainer.lean_steps = studio_kernels  # the tutorial row: the Trainer's per-step calls as they are
    trainer.route_trained_adapter = studio_kernels if studio_lora_forward is None else studio_lora_forward
    trainer.packed_varlen = packed_varlen
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        trainer.train()
    finally:
        model.get_base_model().config.use_cache = True
        if getattr(model.get_base_model(), "is_gradient_checkpointing", False):
            model.get_base_model().gradient_checkpointing_disable()
        model.eval()
    wall = time.perf_counter() - started
    first = max(0, min(warmup_steps, len(clock.times) - 2))
    seconds = max(1e-9, clock.times[-1] - clock.times[first]) if len(clock.times) > 1 else wall
    tokens = clock.tokens[-1] - clock.tokens[first] if len(clock.times) > 1 else collator.tokens_seen
    lengths = [len(r["input_ids"]) for r in rows]
    applied = [note for note in trainer.speedup_notes]
    liger_on = any(note.startswith("Liger kernels on") for note in applied)
    captures = trainer.graphed.captured if trainer.graphed is not None else []
    largest = max([collator.largest] + [c["positions"] for c in captures])  # graphs may hold a larger size
    features = model_features(model, replace(settings, liger_kernels=liger_on), largest, model_bytes=model_bytes)
    result = {
        "setup": name, "steps": len(clock.times), "cut_at_deadline": clock.cut,
        "settings": {k: v for k, v in asdict(settings).items()
                     if k in ("batch_size", "grad_accum", "packing", "gradient_checkpointing", "checkpoint_fraction",
                              "liger_kernels", "dequantize_base", "compile_layers", "cuda_graphs")},
        "applied": applied, "attention": "studio (no cuDNN)" if studio_kernels else "PyTorch defaults",
        "lora_forward": "studio (trained adapter only)" if trainer.route_trained_adapter else "peft",
        "tokens_per_s": round(tokens / seconds, 1), "steps_per_s": round((len(clock.times) - 1 - first) / seconds, 3),
        "steady_tokens_per_s": steady_rate(clock, started, first, trainer.graphed),
        "train_wall_s": round(wall, 2), "largest_forward_tokens": largest, "losses": clock.losses,
        "step_s": [round(b - a, 4) for a, b in zip([started, *clock.times], clock.times)],
        "step_tokens": [b - a for a, b in zip([0, *clock.tokens], clock.tokens)],
        "graphs": ({"replayed_passes": trainer.graphed.replayed_passes, "captured": trainer.graphed.captured,
                    "padded_up_passes": trainer.graphed.padded_passes, "first_size": trainer.graphed.sizes.first,
                    "replay_ms": {size: round(1000 * trainer.graphed.sizes.seconds(size), 2)
                                  for size in trainer.graphed.sizes.replay_s},
                    "capture_s": round(sum(c["seconds"] for c in trainer.graphed.captured), 2)}
                   if trainer.graphed is not None else None),
        "estimate_gib": round(estimate_peak(model, replace(settings, liger_kernels=liger_on), lengths).total_gib, 2),
        "memory_features": asdict(features),
    }
    if torch.cuda.is_available():
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    del trainer
    return result


def steady_rate(clock, started: float, first: int, graphed) -> float | None:
    """Tokens/s over the steps after the first `first + 1` that captured no CUDA graph (a capture is a
    one-time cost per pass size, like a compile); None when no such step is left."""
    captured = {c["pass"] for c in (graphed.captured if graphed is not None else [])}
    starts = [started, *clock.times]
    tokens = [b - a for a, b in zip([0, *clock.tokens], clock.tokens)]
    kept = [i for i in range(first + 1, len(clock.times)) if i not in captured]
    seconds = sum(starts[i + 1] - starts[i] for i in kept)
    return round(sum(tokens[i] for i in kept) / seconds, 1) if kept and seconds > 0 else None


def loss_match(reference: list[float], losses: list[float]) -> float | None:
    """Largest relative difference over the first 20 losses both have (None if none)."""
    pairs = list(zip(reference[:20], losses[:20]))
    return round(max(abs(a - b) / max(abs(a), 1e-9) for a, b in pairs), 5) if pairs else None


class Bench:
    """One run: results appended and written as they come."""

    def __init__(self, args):
        self.args, self.tiny = args, args.tiny
        self.payload = {"model": "tiny" if self.tiny else "random-weight Qwen2.5 shapes, 4-bit NF4 + double quant, bf16",
                        "lora": "r 16, alpha 32, seven projections", "rows": "120-400 tokens, 45% prompt",
                        "sequences_per_step": 8, "results": [], "sizes": {}, "skipped": [], "errors": [],
                        "recommended": {}}
        self.budget = Budget(args.budget_s, self.payload["skipped"])
        self.size_rows: dict = {}  # size -> (its rows, its tutorial result), for compiled_on_size
        if args.no_main and args.recommended_from:  # the sizes run what the earlier result recommended
            fast, gpu24 = earlier_recommendation(Path(args.recommended_from))
            self.payload["recommended"] = {which: {"setup": next(iter(chosen)), "switches": next(iter(chosen.values()))}
                                           for which, chosen in (("fast", fast), ("gpu24", gpu24))}
        self.manager = ModelManager(decode_mode="eager")

    def save(self) -> Path:
        name = self.args.name or ("train_speed-sizes" if self.args.recommended_from else "train_speed")
        if self.tiny:  # a CPU run never passes for a GPU result (studio.train.memory reads train_speed-*)
            name = "-".join(part for part in ("train_speed-tiny", name.removeprefix("train_speed").strip("-")) if part)
        return write_results(name, self.payload)

    # ----- models --------------------------------------------------------------------------------
    def load(self, size: str) -> dict | None:
        import torch

        if self.manager.is_loaded:
            self.manager.unload()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        folder = Path(f"{self.args.model_root}-{size}")
        started = time.perf_counter()
        build_sized_model(folder, size)
        built = time.perf_counter() - started
        started = time.perf_counter()
        self.manager.load(ModelSpec(str(folder), "4bit"))
        load_s = time.perf_counter() - started
        if not self.args.keep_models and not self.tiny:
            shutil.rmtree(folder, ignore_errors=True)  # the disk holds one size at a time
        static = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
        return {"build_s": round(built, 1), "load_s": round(load_s, 1), "static_gib": round(static / 2**30, 2),
                "static_bytes": static}

    def rows(self, count: int, seed: int = 0) -> list[dict]:
        vocab = self.manager.require_loaded().model.config.vocab_size if self.tiny else 150000
        return synthetic_examples(count, vocab, seed=seed)

    def setup(self, size: str, name: str, settings: TrainSettings, rows: list[dict], steps: int, need_s: float,
              static_bytes: int, tutorial: dict | None = None, **kwargs) -> dict | None:
        """Run one setup if the budget allows; record the result or the error and save the file."""
        label = f"{size}: {name}"
        if not self.budget.allow(label, need_s):
            return None
        deadline = time.perf_counter() + max(need_s * 2.5, 30) if not self.tiny else None
        deadline = min(deadline, self.budget.deadline) if deadline else None
        try:
            with self.manager.using("benchmark") as loaded:
                result = run_setup(loaded, name, settings, rows, steps, deadline=deadline,
                                   model_bytes=static_bytes or None, **kwargs)
        except Exception as exc:
            error = {"size": size, "setup": name, "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()[-2000:]}
            self.payload["errors"].append(error)
            print("ERROR", label, error["error"], flush=True)
            self.save()
            return None
        result["size"] = size
        if tutorial:
            result["ratio_to_tutorial"] = round(result["tokens_per_s"] / tutorial["tokens_per_s"], 2)
            result["loss_match_max_rel"] = loss_match(tutorial["losses"], result["losses"])
        self.payload["results"].append(result)
        print({k: v for k, v in result.items() if k not in ("losses", "memory_features")}, flush=True)
        self.save()
        return result

    # ----- the parts -----------------------------------------------------------------------------
    def main_shape(self) -> None:
        size = "tiny" if self.tiny else "7B"
        steps = self.args.steps
        info = self.load(size)
        self.payload["sizes"][size] = info
        question = build_messages("你是《雾灯岛》领域助手。", [], "我该怎么成为守灯人？")
        base_before = self.manager.chat(question, GenerationSettings.greedy(16))
        rows = self.rows(8 * steps + 16)
        step = NEEDS["tutorial_step"][size]
        static = info["static_bytes"]
        tutorial = self.setup(size, "tutorial", preset("tutorial"), rows, steps, step * steps + 10, static,
                              studio_kernels=False)
        if tutorial is None:
            return
        tutorial["ratio_to_tutorial"] = 1.0
        eager = {k: v for k, v in FAST_CANDIDATES.items() if not v.get("compile_layers")}
        gpu24_candidates = GPU24_CANDIDATES
        if self.args.recommended_from:  # no sweep: the setups an earlier run recommended
            eager, gpu24_candidates = earlier_recommendation(Path(self.args.recommended_from))
        fast = self.candidates(size, eager, preset("fast"), rows, steps, static, tutorial)
        gpu24 = self.candidates(size, gpu24_candidates, preset("gpu24"), rows, steps, static, tutorial,
                                limit_gib=GPU24_LIMIT_GIB)
        self.payload["recommended"] = {"fast": fast, "gpu24": gpu24}
        self.save()
        if self.args.varlen_ab:
            self.varlen_ab(size, rows, steps, static, tutorial)
        if self.args.graphs_ab:
            self.graphs_ab(size, rows, steps, static, tutorial)
        base_after = self.manager.chat(question, GenerationSettings.greedy(16))
        self.payload["base_unchanged_after_training"] = base_before == base_after
        self.time_to_adapter(size, static)
        self.rows_for_compile = (size, rows, steps, static, tutorial)

    def varlen_ab(self, size, rows, steps, static, tutorial) -> None:
        """With --varlen-ab: the Fast preset's packed passes through SDPA's block mask and through
        varlen_attn, alternating, twice each (the host's drift touches both alike), then the
        tutorial-sized job with the block mask (the table's job runs with varlen_attn)."""
        for turn in (1, 2):
            for varlen in (False, True):
                label = f"fast (preset), {'varlen_attn' if varlen else 'SDPA block mask'}, turn {turn}"
                self.setup(size, label, preset("fast"), rows, steps, 8 + steps * 0.6, static, tutorial,
                           packed_varlen=varlen)
        job_rows = self.rows(183, seed=1)
        result = self.setup(size, "time to adapter: 183 rows x 4 epochs, fast (preset), SDPA block mask",
                            replace(preset("fast"), epochs=4.0), job_rows, -1, 40, static, packed_varlen=False)
        if result:
            self.payload.setdefault("time_to_adapter_block_mask", {})[size] = {"train_s": result["train_wall_s"],
                                                                              "steps": result["steps"]}
            self.save()

    def graphs_ab(self, size, rows, steps, static, tutorial) -> None:
        """With --graphs-ab: the Fast preset with its decoder layers eager and replayed from CUDA graphs,
        alternating, twice each (the host's drift touches both alike)."""
        for turn in (1, 2):
            for graphs in (False, True):
                label = f"fast (preset), {'CUDA graphs' if graphs else 'eager layers'}, turn {turn}"
                self.setup(size, label, replace(preset("fast"), cuda_graphs=graphs), rows, steps, 8 + steps * 0.6,
                           static, tutorial)

    def compiled_candidates(self) -> None:
        """The compiled-layers candidates last (their compile time is the least predictable), on the main
        shape again; the recommendation is updated if one wins."""
        compiled = {k: v for k, v in FAST_CANDIDATES.items() if v.get("compile_layers")}
        if not compiled or not getattr(self, "rows_for_compile", None) or "main" not in self.args.compile_sizes:
            return
        size, rows, steps, _, tutorial = self.rows_for_compile
        if self.payload["sizes"].get(size) is None or not self.budget.allow(f"{size}: reload for compiled layers", 90):
            return
        info = self.load(size)
        best = self.candidates(size, compiled, preset("fast"), rows, steps, info.pop("static_bytes"), tutorial)
        current = self.payload["recommended"].get("fast", {})
        if best.get("tokens_per_s") and best["tokens_per_s"] > (current.get("tokens_per_s") or 0):
            self.payload["recommended"]["fast"] = best
        self.save()

    def candidates(self, size, candidates: dict, base: TrainSettings, rows, steps, static, tutorial,
                   limit_gib: float | None = None) -> dict:
        """Run each candidate; the fastest with matching losses (and under the limit) is recommended."""
        best = None
        for name, switches in candidates.items():
            need = 90 + steps * 0.5 if switches.get("compile_layers") else 8 + steps * 0.6
            result = self.setup(size, name, replace(base, **switches), rows, steps, need, static, tutorial)
            if result is None:
                continue
            fits = limit_gib is None or result.get("peak_reserved_gib", 0.0) <= limit_gib
            matches = result["loss_match_max_rel"] is not None and result["loss_match_max_rel"] <= LOSS_TOLERANCE
            applied = not any("skipped" in note for note in result["applied"])  # every switch it asked for ran
            result["qualifies"] = bool(fits and matches and applied)
            if result["qualifies"] and (best is None or result["tokens_per_s"] > best["tokens_per_s"]):
                best = result
        chosen = best or {"setup": next(iter(candidates)), "settings": {}}
        return {"setup": chosen["setup"], "switches": candidates.get(chosen["setup"], {}),
                "tokens_per_s": chosen.get("tokens_per_s"), "peak_reserved_gib": chosen.get("peak_reserved_gib")}

    def recommended(self, which: str) -> TrainSettings:
        base = preset(which)
        return replace(base, **self.payload["recommended"].get(which, {}).get("switches", {}))

    def time_to_adapter(self, size: str, static: int) -> None:
        job_rows = self.rows(183, seed=1)
        settings = replace(self.recommended("fast"), epochs=4.0)
        result = self.setup(size, "time to adapter: 183 rows x 4 epochs, best fast", settings, job_rows, -1,
                            40 if size == "7B" else 20, static)
        if result:
            self.payload.setdefault("time_to_adapter", {})[size] = {
                "train_s": result["train_wall_s"], "steps": result["steps"], "setup": self.recommended_name("fast"),
                "load_s": self.payload["sizes"][size]["load_s"]}
            self.save()

    def recommended_name(self, which: str) -> str:
        return self.payload["recommended"].get(which, {}).get("setup", which)

    def size_row(self, size: str) -> None:
        if not self.budget.allow(f"{size}: build and load", NEEDS["build"][size] + 30):
            return
        try:
            info = self.load(size)
        except Exception as exc:
            self.payload["errors"].append({"size": size, "setup": "build and load", "error": f"{type(exc).__name__}: {exc}"})
            self.save()
            return
        self.payload["sizes"][size] = info
        static = info.pop("static_bytes")
        self.save()
        rows = self.rows(8 * self.args.steps + 16, seed=2)
        steps = self.args.tutorial_steps
        tutorial = self.setup(size, "tutorial", preset("tutorial"), rows, steps,
                              NEEDS["tutorial_step"][size] * steps + 5, static, warmup_steps=1, studio_kernels=False)
        if tutorial:
            tutorial["ratio_to_tutorial"] = 1.0
        for which in ("fast", "gpu24"):  # as many steps as the 7B's rows (both replay CUDA graphs)
            self.setup(size, f"{which}: {self.recommended_name(which)}", self.recommended(which), rows,
                       self.args.steps, 15 + self.args.steps, static, tutorial)
        if size == "0.5B" or (size == "7B" and self.args.no_main):
            self.time_to_adapter(size, static)
        self.size_rows[size] = (rows, tutorial)

    def lora_forward_on_sizes(self) -> None:
        """With --lora-forward-sizes SIZE: Fast on that size with peft's LoRA forward and with the studio's
        (the trained adapter alone), twice each, alternating, so the host's drift touches both alike."""
        for size in self.args.lora_forward_sizes:
            if size not in self.size_rows or not self.budget.allow(f"{size}: LoRA forward, peft vs studio", 60):
                continue
            rows, tutorial = self.size_rows[size]
            static = self.load(size).pop("static_bytes")
            for turn in (1, 2):
                for studio_forward in (False, True):
                    label = f"fast (preset), {'studio' if studio_forward else 'peft'} LoRA forward, turn {turn}"
                    self.setup(size, label, preset("fast"), rows, self.args.steps, 20, static, tutorial,
                               studio_lora_forward=studio_forward)

    def compiled_on_sizes(self) -> None:
        for size in self.args.compile_sizes:
            self.compiled_on_size(size)

    def compiled_on_size(self, size: str) -> None:
        """With --compile-sizes SIZE: after the table, that size again with the compiled-layers candidates
        (10 steps; tokens/s leaves out the first two, where compiling happens, and `train_wall_s` keeps
        them), then the tutorial-sized job with the fastest of them, so its compile time counts, and that
        job again, as a later run in the same process (its compiled code reused)."""
        if size not in self.size_rows or not self.budget.allow(f"{size}: reload for compiled layers", 60):
            return
        rows, tutorial = self.size_rows[size]
        static = self.load(size).pop("static_bytes")
        best = None
        for name, switches in FAST_CANDIDATES.items():
            if switches.get("compile_layers"):
                result = self.setup(size, name, replace(preset("fast"), **switches), rows, 10, 150, static, tutorial)
                if result and (best is None or result["tokens_per_s"] > best[1]["tokens_per_s"]):
                    best = (switches, result)
        if best is None:
            return
        job_rows = self.rows(183, seed=1)
        settings = replace(preset("fast"), epochs=4.0, **best[0])
        result = self.setup(size, f"time to adapter: 183 rows x 4 epochs, {best[1]['setup']}", settings, job_rows, -1,
                            120, static)
        if not result:
            return
        entry = {"train_s": result["train_wall_s"], "steps": result["steps"], "setup": best[1]["setup"]}
        self.payload.setdefault("time_to_adapter_compiled", {})[size] = entry
        self.save()
        # a later run in the same process, with another adapter: the compiled code is reused
        again = self.setup(size, f"time to adapter again (a later run, code reused): {best[1]['setup']}", settings,
                           job_rows, -1, 60, static)
        if again:
            entry.update(again_train_s=again["train_wall_s"], again_note=[n for n in again["applied"] if "compile" in n])
            self.save()

    def run(self) -> Path:
        try:
            if not self.args.no_main:
                self.main_shape()
        except Exception as exc:
            self.payload["errors"].append({"setup": "main shape", "error": f"{type(exc).__name__}: {exc}",
                                           "trace": traceback.format_exc()[-2000:]})
        self.payload["sizes"].get("tiny" if self.tiny else "7B", {}).pop("static_bytes", None)
        if self.tiny:
            self.payload["studio_vs_plain_trainer"] = studio_vs_plain(self.manager)
        else:
            for size in self.args.sizes:
                self.size_row(size)
        self.lora_forward_on_sizes()
        self.compiled_candidates()
        self.compiled_on_sizes()
        if self.manager.is_loaded:
            self.manager.unload()
        return self.save()


def earlier_recommendation(path: Path) -> tuple[dict, dict]:
    """The Fast and 24 GB setups an earlier run recommended, as one-candidate sweeps; with the path
    `presets`, the studio's presets as they are."""
    import json

    if str(path) == "presets":
        return {"fast (preset)": {}}, {"gpu24 (preset)": {}}
    recommended = json.loads(path.read_text(encoding="utf-8"))["recommended"]
    return ({recommended["fast"]["setup"]: recommended["fast"]["switches"]},
            {recommended["gpu24"]["setup"]: recommended["gpu24"]["switches"]})


# ----- the studio's trainer against a plain Trainer ------------------------------------------------
def studio_vs_plain(manager, steps: int = 6) -> dict:
    """`tutorial_vs_plain` on rows of 60-200 tokens (the CPU run's comparison)."""
    with manager.using("benchmark") as loaded:
        rows = synthetic_examples(8 * steps, loaded.model.config.vocab_size, seed=5, low=60, high=200)
        out = tutorial_vs_plain(loaded, rows, steps)
    print("studio vs plain trainer", out, flush=True)
    return out


class _SilentJob:
    cancelled = False

    def log(self, *args):
        pass

    def emit(self, *args, **kwargs):
        pass


def tutorial_vs_plain(loaded, rows: list[dict], steps: int) -> dict:
    """Seconds per optimizer step of the tutorial preset through the studio's trainer (with its progress
    callback) and through a plain transformers Trainer with the tutorial's arguments, same rows, each
    twice (the first runs include warm-up); bf16 on a GPU, fp32 on the CPU."""
    from types import SimpleNamespace

    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from studio.train.trainer import ProgressTracker

    on_gpu = torch.cuda.is_available()
    out = {}
    for which in ("plain", "studio", "plain again", "studio again"):
        model = add_trainable_adapter(loaded.model, "bench", LoraSettings(), 42)
        loaded.model = model
        folder = ROOT / "bench" / "out" / which.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if which.startswith("plain"):
            args = TrainingArguments(output_dir=str(folder), per_device_train_batch_size=1,
                                     gradient_accumulation_steps=8, learning_rate=1e-3, num_train_epochs=4,
                                     max_steps=steps, lr_scheduler_type="linear", warmup_steps=0.03,
                                     logging_steps=1, optim="adamw_torch", report_to=[], save_strategy="no",
                                     gradient_checkpointing=True, disable_tqdm=True, remove_unused_columns=False,
                                     bf16=on_gpu, use_cpu=not on_gpu)
            Trainer(model=model, args=args, train_dataset=rows,
                    data_collator=DataCollatorForSeq2Seq(loaded.tokenizer, padding=True)).train()
        else:
            settings = replace(preset("tutorial"), max_steps=steps, save_every=0)
            collator = make_collator(settings, loaded.tokenizer)
            run = SimpleNamespace(name="bench", metrics_path=folder / "metrics.jsonl")
            tracker = ProgressTracker(run, _SilentJob(), collator)
            trainer = build_trainer(model, settings, loaded.device, folder, "bench", rows, [], collator, (tracker,))
            tracker.trainer = trainer
            trainer.train()
        out[which + " s_per_step"] = round((time.perf_counter() - started) / steps, 4)
        model.get_base_model().config.use_cache = True
        model.eval()
    out["studio / plain"] = round((out["studio s_per_step"] + out["studio again s_per_step"])
                                  / (out["plain s_per_step"] + out["plain again s_per_step"]), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    parser.add_argument("--model-root", default="/dev/shm/qwen25-random" if Path("/dev/shm").is_dir() else
                        "/tmp/qwen25-random", help="where the random models are saved (a RAM disk when there is one)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per 7B setup (losses compared)")
    parser.add_argument("--tutorial-steps", type=int, default=3, help="tutorial-recipe steps on the other sizes")
    parser.add_argument("--sizes", nargs="*", default=["0.5B", "14B", "1.5B", "3B"],
                        help="sizes after the 7B shape, in order of priority")
    parser.add_argument("--budget-s", type=float, default=500.0, help="stop starting new work after this long")
    parser.add_argument("--keep-models", action="store_true", help="keep the built models in /tmp")
    parser.add_argument("--recommended-from", metavar="RESULT_JSON", default=None,
                        help="skip the 7B sweep: run the tutorial and the Fast and 24 GB setups this earlier result "
                             "recommended, or with 'presets' the studio's presets as they are (results go to "
                             "train_speed-sizes-*.json)")
    parser.add_argument("--name", default=None, help="the result file's name before -<gpu>-<date>.json")
    parser.add_argument("--no-main", action="store_true",
                        help="skip the 7B shape; the sizes use the setups --recommended-from names")
    parser.add_argument("--lora-forward-sizes", nargs="*", default=[],
                        help="sizes of the table on which Fast runs with peft's LoRA forward and with the studio's")
    parser.add_argument("--compile-sizes", nargs="*", default=["main"],
                        help="where the compiled-layers candidates run: 'main' (the 7B shape, reloaded, last) and/or "
                             "sizes of the table (e.g. 0.5B 7B, each with its own time to adapter)")
    parser.add_argument("--varlen-ab", action="store_true",
                        help="after the 7B presets: Fast with packed passes through SDPA's block mask against "
                             "varlen_attn, alternating, and the tutorial-sized job with the block mask")
    parser.add_argument("--graphs-ab", action="store_true",
                        help="after the 7B presets: the Fast preset with eager decoder layers against CUDA graphs, "
                             "alternating")
    args = parser.parse_args()
    if args.tiny and args.no_main:
        parser.error("--no-main leaves only the GPU sizes table, which --tiny does not run")
    if args.tiny:
        from studio.train import speedups

        speedups.COMPILE_BACKEND = "aot_eager"  # the compile path without a C++ build on the CPU
        args.steps = min(args.steps, 6)
    path = Bench(args).run()
    print("->", path, flush=True)


if __name__ == "__main__":
    main()
