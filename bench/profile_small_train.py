"""Where a small model's training step goes: the host (Python) against the GPU.

On the GPU, with the random-weight Qwen2.5-0.5B shape in 4-bit NF4 (a 7B-shaped step is mostly GPU
work; a 0.5B one should be 15 times less, and is not):
1. the Fast preset through the studio's trainer: seconds per optimizer step, and the GPU's busy time
   per step from torch.profiler (kernel time against the wall clock);
2. cProfile of the same steps: the functions that take the host's time (own time and cumulative);
3. the tutorial preset through the studio's trainer against a plain transformers Trainer with the
   tutorial's arguments, same rows, seconds per optimizer step.

    python bench/profile_small_train.py [--size 0.5B] [--steps 8]
    python bench/profile_small_train.py --tiny     # a quick CPU run of the same code
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from dataclasses import replace
from pathlib import Path

from common import ROOT, build_sized_model, synthetic_examples, write_results  # noqa: F401  (sets sys.path)

from transformers import TrainerCallback  # noqa: E402

from train_speed import run_setup, tutorial_vs_plain  # noqa: E402

from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.collate import make_collator  # noqa: E402
from studio.train.job import add_trainable_adapter  # noqa: E402
from studio.train.settings import LoraSettings, preset  # noqa: E402
from studio.train.trainer import build_trainer  # noqa: E402


def host_profile(run, rows: int = 30) -> dict:
    """cProfile of `run()`: the top functions by own time and by cumulative time, as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    tables = {}
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(key).print_stats(rows)
        tables[key] = text.getvalue()[-9000:]
    return tables


def gpu_busy(run) -> dict:
    """Wall seconds of `run()` against the summed time of the CUDA kernels it ran."""
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    top_cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]
    top_gpu = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
    return {"wall_s": round(wall, 3), "kernel_s": round(sum(e.self_device_time_total for e in kernels) / 1e6, 3),
            "kernels": sum(e.count for e in kernels),
            "top_cpu_ops": [(e.key[:70], round(e.self_cpu_time_total / 1e6, 3), e.count) for e in top_cpu],
            "top_gpu_kernels": [(e.key[:90], round(e.self_device_time_total / 1e6, 4), e.count) for e in top_gpu]}


class PhaseClock(TrainerCallback):
    """Seconds per optimizer step in each phase, the GPU synchronised at every mark: forward and
    backward (step begin to pre-optimizer), optimizer (to optimizer step done), the rest of the step
    (clipping is before the optimizer; logging and callbacks after), and between steps (the next batch)."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def _mark(self, name):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((name, time.perf_counter()))

    def on_step_begin(self, *args, **kwargs):
        self._mark("begin")

    def on_pre_optimizer_step(self, *args, **kwargs):
        self._mark("pre_optimizer")

    def on_optimizer_step(self, *args, **kwargs):
        self._mark("optimizer_done")

    def on_step_end(self, *args, **kwargs):
        self._mark("end")

    def summary(self, skip: int = 2, median: bool = False) -> dict:
        """Milliseconds per phase after the first `skip` steps: the mean, or with `median` the median
        (steps that capture a CUDA graph for a new pass size are outliers of the forward)."""
        import statistics

        spans: dict[str, list[float]] = {}
        for (a, ta), (b, tb) in zip(self.marks, self.marks[1:]):
            spans.setdefault(f"{a} -> {b}", []).append(tb - ta)
        pick = statistics.median if median else (lambda v: sum(v) / max(1, len(v)))
        return {name: round(pick(v[skip:] or [0.0]) * 1000, 2) for name, v in spans.items()}


def phase_times(loaded, settings, rows: list[dict], steps: int) -> dict:
    """Milliseconds per phase of an optimizer step (see PhaseClock), the studio's trainer, no callbacks else."""
    model = add_trainable_adapter(loaded.model, "bench", LoraSettings(), 42)
    loaded.model = model
    settings = replace(settings, max_steps=steps, save_every=0, logging_steps=1)
    collator = make_collator(settings, loaded.tokenizer)
    clock = PhaseClock()
    trainer = build_trainer(model, settings, loaded.device, ROOT / "bench" / "out" / "phases", "bench", rows, [],
                            collator, (clock,))
    compute_loss = trainer.compute_loss

    def timed_loss(*args, **kwargs):
        clock._mark("forward")
        loss = compute_loss(*args, **kwargs)
        clock._mark("forward_done")
        return loss

    trainer.compute_loss = timed_loss
    trainer.train()
    model.get_base_model().config.use_cache = True
    model.eval()
    return {**clock.summary(), "median": clock.summary(median=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--size", default="0.5B")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tutorial-steps", type=int, default=2)
    parser.add_argument("--phases-only", action="store_true", help="stop after the per-phase step times")
    parser.add_argument("--skip-tutorial", action="store_true", help="stop after the Fast preset's profiles")
    parser.add_argument("--model-root", default="/dev/shm/qwen25-random" if Path("/dev/shm").is_dir() else
                        "/tmp/qwen25-random")
    args = parser.parse_args()
    size = "tiny" if args.tiny else args.size
    folder = build_sized_model(Path(args.model_root) / size, size)
    manager = ModelManager(decode_mode="eager")
    manager.load(ModelSpec(str(folder), "4bit"))
    payload: dict = {"model": f"Qwen2.5-{size} shape, random weights, 4-bit NF4", "steps": args.steps}

    def save():
        return write_results(f"profile_small_train-{size}", payload)

    with manager.using("benchmark") as loaded:
        vocab = loaded.model.config.vocab_size - 2000 if not args.tiny else loaded.model.config.vocab_size
        rows = synthetic_examples(8 * (args.steps + 2), vocab, seed=7)
        fast = preset("fast")
        payload["fast_warm"] = {k: v for k, v in run_setup(loaded, "fast warm", fast, rows, args.steps).items()
                                if k in ("tokens_per_s", "steps_per_s", "train_wall_s", "applied")}
        print("fast", payload["fast_warm"], flush=True)
        payload["fast_phases_ms"] = phase_times(loaded, fast, rows, args.steps)
        print("phases", payload["fast_phases_ms"], flush=True)
        if args.phases_only:
            print("->", save(), flush=True)
            return
        payload["fast_gpu_busy"] = gpu_busy(lambda: run_setup(loaded, "fast busy", fast, rows, args.steps))
        print("busy", payload["fast_gpu_busy"], flush=True)
        save()
        payload["fast_host"] = host_profile(lambda: run_setup(loaded, "fast host", fast, rows, args.steps))
        print(payload["fast_host"]["tottime"], flush=True)
        print(payload["fast_host"]["cumulative"], flush=True)
        save()
        if args.skip_tutorial:
            print("->", save(), flush=True)
            return
        tutorial_rows = synthetic_examples(8 * args.tutorial_steps, vocab, seed=8)
        payload["tutorial_vs_plain"] = tutorial_vs_plain(loaded, tutorial_rows, args.tutorial_steps)
        print("tutorial vs plain", payload["tutorial_vs_plain"], flush=True)
        payload["tutorial_host"] = host_profile(
            lambda: run_setup(loaded, "tutorial host", preset("tutorial"), tutorial_rows, args.tutorial_steps,
                              studio_kernels=False))
        print(payload["tutorial_host"]["tottime"], flush=True)
    print("->", save(), flush=True)


if __name__ == "__main__":
    main()
