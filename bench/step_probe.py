"""The Fast preset's training step on the 0.5B and 7B shapes, with the LoRA forward of each kind, in one
run, and a kernel profile of steady steps of each size (`--profile`).

Variants (`--variants LORA:OPTIMIZER[:LOSS]`, the optimizer empty for the Trainer's `adamw_torch`):
- `peft-lora`: each LoRA layer computes the trained adapter with peft's arithmetic
  (`studio.model.routing._routed_forward`);
- `one-node-nocasts`: the update in one autograd node (`studio.model.lora_update`), each weight cast
  on its own;
- `one-node`: the same, the weights cast and their gradients gathered in one go inside the CUDA graphs
  (`FlatCasts`), as the studio trains;
- `one-node-mul`: the same, with the LoRA backward's scaling as a multiply after each product (before
  `_scaled_mm` put it in the products' epilogue);
- `one-node-apart`: the same, but over the dequantized base the base product stays its own autograd
  node (before `dense_lora_linear`), so autograd adds the two input gradients;
- `one-node-keptmask`: the same with PyTorch's dropout, its mask kept for the backward, in graphed runs
  too (before `studio.model.lora_dropout`; not with checkpointing in the graphs);
- `one-node-inline`: `one-node` with the LoRA weights' gradient products on the backward's own stream
  (before `FlatCasts` put them on a side stream);
- LOSS `model`: the model's own loss (float32 logits of the whole pass) instead of the chunked loss of
  graphed runs (`studio.train.fused_loss`, the default); `chunked`: the chunked loss in eager runs too
  (in place of Liger's fused loss, which reads a count back to the host every pass).

`--check-loss` compares the chunked loss's Triton kernel with the same arithmetic in PyTorch
operations on bf16 logits over the 152k vocabulary; `--check-dropout` checks the redrawn dropout's
kernel, in a CUDA graph too, and that Fast's kept mask, recorded by the studio's graph recorder, is drawn
anew on each replay. `--presets` takes the studio's presets and the probe's variants of the
24 GB one (`gpu24-eager`: without CUDA graphs, as before; `gpu24-quarter`: a quarter of the layers
checkpointed).

    python bench/step_probe.py [--sizes 0.5B 7B] [--steps 24] [--profile] [--check-loss] [--check-dropout]
    python bench/step_probe.py --sizes tiny --steps 3        # a quick CPU run of the same code
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

from common import build_sized_model, synthetic_examples, write_results  # noqa: F401  (sets sys.path)

from transformers import TrainerCallback  # noqa: E402

import studio.model.lora_update as lora_update  # noqa: E402
import studio.model.routing as routing  # noqa: E402
import studio.train.speedups as speedups  # noqa: E402
import studio.train.graphs as graphs  # noqa: E402
import studio.train.trainer as trainer_module  # noqa: E402
import train_speed  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.settings import preset as studio_preset  # noqa: E402

PROBE_PRESETS = {"gpu24-eager": {"cuda_graphs": False}, "gpu24-quarter": {"checkpoint_fraction": 0.25}}


def preset(name: str):
    """A studio preset, or a probe's variant of the 24 GB preset (`PROBE_PRESETS`)."""
    from dataclasses import replace

    if name in PROBE_PRESETS:
        return replace(studio_preset("gpu24"), **PROBE_PRESETS[name])
    return studio_preset(name)

STUDIO = {"arguments": trainer_module.TrainingArguments, "trained_forward": routing._trained_forward,
          "flat_casts": graphs._flat_casts, "build_trainer": train_speed.build_trainer,
          "chunked_loss": speedups.chunked_loss, "dense_lora_linear": lora_update.dense_lora_linear,
          "scaled_mm": lora_update._scaled_mm, "redrawn_dropout": speedups.redrawn_dropout,
          "bucket": graphs.BUCKET_TOKENS}


def scaled_by_multiply(left, right, scale: float, out=None):
    """`_scaled_mm` as a product, then a multiply."""
    import torch

    return (torch.mm(left, right) if out is None else torch.mm(left, right, out=out)).mul_(scale)


def base_and_update_apart(x, weight, bias, a, b, scaling, dropout, casts=None, redrawn=None):
    """`dense_lora_linear` as two autograd nodes (the base product, then the update)."""
    import torch

    return lora_update.lora_update(x, torch.nn.functional.linear(x, weight, bias), a, b, scaling, dropout, casts,
                                   redrawn)


def inline_casts(*args):
    """The studio's `FlatCasts`, its weights' gradient products on the backward's own stream."""
    casts, layers = STUDIO["flat_casts"](*args)
    if casts is not None:
        casts.side = None
    return casts, layers


def use_variant(variant: str) -> None:
    """Switch the studio's training code to `variant` (LORA:OPTIMIZER[:LOSS]) for the next run."""
    lora, optimizer, *loss = variant.split(":")

    def arguments(**kwargs):
        return STUDIO["arguments"](**{**kwargs, "optim": optimizer})

    trainer_module.TrainingArguments = arguments if optimizer else STUDIO["arguments"]
    routing._trained_forward = (STUDIO["trained_forward"] if lora != "peft-lora"
                                else (lambda layer, name, routed: routed))
    graphs._flat_casts = (inline_casts if lora == "one-node-inline" else STUDIO["flat_casts"]
                          if lora.startswith("one-node") and lora != "one-node-nocasts" else (lambda *args: (None, ())))
    lora_update.dense_lora_linear = base_and_update_apart if lora == "one-node-apart" else STUDIO["dense_lora_linear"]
    lora_update._scaled_mm = scaled_by_multiply if lora == "one-node-mul" else STUDIO["scaled_mm"]
    speedups.redrawn_dropout = ((lambda model, name, on: contextlib.nullcontext(None)) if lora == "one-node-keptmask"
                                else STUDIO["redrawn_dropout"])
    speedups.chunked_loss = {"model": lambda model, notes, on: contextlib.nullcontext(False),
                             "chunked": lambda model, notes, on: STUDIO["chunked_loss"](model, notes, True)
                             }.get(loss[0] if loss else "", STUDIO["chunked_loss"])


class HostGaps:
    """Where the host spends the time between one step's end (the bench's synchronisation) and the next
    pass's graph launch: the Trainer's loop up to `training_step`, then the studio's step up to the
    replay (median milliseconds over a run's steady steps)."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []
        self.real = (train_speed.StepClock.on_step_end, trainer_module.StudioTrainer.training_step,
                     graphs.StepGraphs._replay)

    def install(self) -> None:
        step_end, training_step, replay = self.real
        marks = self.marks

        def on_step_end(clock, *args, **kwargs):
            result = step_end(clock, *args, **kwargs)
            marks.append(("end", time.perf_counter()))
            return result

        def timed_training_step(trainer, *args, **kwargs):
            marks.append(("step", time.perf_counter()))
            return training_step(trainer, *args, **kwargs)

        def timed_replay(graphed, *args, **kwargs):
            marks.append(("replay", time.perf_counter()))
            return replay(graphed, *args, **kwargs)

        train_speed.StepClock.on_step_end = on_step_end
        trainer_module.StudioTrainer.training_step = timed_training_step
        graphs.StepGraphs._replay = timed_replay

    def take(self) -> dict:
        (train_speed.StepClock.on_step_end, trainer_module.StudioTrainer.training_step,
         graphs.StepGraphs._replay) = self.real
        loop, studio = [], []
        for (a, t1), (b, t2), (c, t3) in zip(self.marks, self.marks[1:], self.marks[2:]):
            if (a, b, c) == ("end", "step", "replay"):
                loop.append((t2 - t1) * 1000)
                studio.append((t3 - t2) * 1000)
        self.marks.clear()

        def median(values):
            return round(sorted(values)[len(values) // 2], 3) if values else None

        return {"trainer_loop_ms": median(loop), "studio_step_to_replay_ms": median(studio), "steps": len(loop)}


def check_dropout(rate: float = 0.05) -> dict:
    """The redrawn LoRA dropout's Triton kernel (`studio.model.lora_dropout`) on a 7B MLP input: the same mask
    on a second draw, the share kept, the kept values scaled; and inside a CUDA graph that draws a pass's
    seed first, each replay a new mask, drawn the same twice within the replay."""
    import torch

    from studio.model.lora_dropout import DropoutSeeds, _dropout_kernel

    seeds = DropoutSeeds("cuda")
    dropout = seeds.layer(5)
    x = torch.randn(2048, 18944, device="cuda", dtype=torch.bfloat16)
    first = dropout(x, rate)
    same_twice = torch.equal(first, dropout(x, rate))
    dropped, doubled = dropout.pair(x, 2 * x, rate)
    pair_one_mask = torch.equal(dropped, first) and torch.equal(doubled, 2 * first)
    other_layer = not torch.equal(first, seeds.layer(6)(x, rate))
    kept = first != 0
    scaled = (first[kept].float() - x[kept].float() / (1 - rate)).abs().max().item()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin()
        seeds.refresh()
        one, two = dropout(x, rate), dropout(x, rate)
        graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    replay_one, replay_same = one.clone(), torch.equal(one, two)
    graph.replay()
    return {"triton": _dropout_kernel is not None, "same_mask_twice": same_twice, "pair_one_mask": pair_one_mask,
            "other_layer_other_mask": other_layer,
            "kept_share": round(kept.float().mean().item(), 5), "largest_scaling_error": scaled,
            "replay_same_twice": replay_same and torch.equal(one, two),
            "replays_draw_new_masks": not torch.equal(replay_one, one),
            "kept_mask": _reported(check_kept_mask, x, rate)}


def _reported(check, *args) -> dict:
    """`check(*args)`, or the error it raised (so one failing check keeps the others' results)."""
    try:
        return check(*args)
    except Exception as error:  # noqa: BLE001  (a bench check reports whatever went wrong)
        return {"error": f"{type(error).__name__}: {error}"}


def check_kept_mask(x, rate: float) -> dict:
    """Fast's kept dropout (`torch.native_dropout`, as `studio.model.lora_update` calls it) recorded by the
    studio's own `CudaRecorder`: each replay draws a new mask, keeps about 1 - rate, and scales the kept."""
    import torch

    recorder = graphs.CudaRecorder()
    held: dict = {}

    def work():
        held["out"], held["mask"] = torch.native_dropout(x, rate, True)

    replay = recorder.record(work)
    masks = []
    for _ in range(3):
        replay()
        masks.append(held["mask"].clone())
    torch.cuda.synchronize()
    kept = held["mask"]
    scaled = (held["out"][kept].float() - x[kept].float() / (1 - rate)).abs().max().item()
    return {"replays_draw_new_masks": not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2]),
            "kept_share": round(kept.float().mean().item(), 5), "largest_scaling_error": scaled}


def check_loss(rows: int = 1024, vocab: int = 151936) -> dict:
    """The chunked loss's Triton kernel against PyTorch's arithmetic: largest differences of the losses
    and of the gradients over the logits (bf16 logits, every eighth row ignored)."""
    import torch

    from studio.train import fused_loss

    torch.manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda") * 4).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (rows,), device="cuda")
    targets[::8] = fused_loss.IGNORE_INDEX
    results = {}
    for name, rows_fn in (("triton", fused_loss._rows_triton), ("torch", fused_loss._rows_torch)):
        grads, losses = logits.clone(), torch.empty(rows, device="cuda")
        rows_fn(grads, targets, losses)
        results[name] = (losses, grads.float())
    (loss_t, grad_t), (loss_p, grad_p) = results["triton"], results["torch"]
    return {"rows": rows, "vocab": vocab, "loss_max_abs_diff": (loss_t - loss_p).abs().max().item(),
            "loss_mean": loss_p[targets != -100].mean().item(),
            "grad_max_abs_diff": (grad_t - grad_p).abs().max().item(),
            "grad_sum_abs_diff": (grad_t.sum(1) - grad_p.sum(1)).abs().max().item(),
            "ignored_rows_zero": bool((grad_t[::8] == 0).all().item() and (loss_t[::8] == 0).all().item())}


class Profiled(TrainerCallback):
    """torch.profiler over the optimizer steps after step `first` up to step `last`: kernel time and
    launches per step."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.profiler, self.result = first, last, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if state.global_step == self.first:
            torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()
            self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if state.global_step != self.last or self.profiler is None:
            return
        torch.cuda.synchronize()
        wall = time.perf_counter() - self.started
        self.profiler.__exit__(None, None, None)
        steps = self.last - self.first  # begins at the end of step `first`, stops at the end of step `last`
        events = self.profiler.key_averages()
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:40]
        cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
        self.result = {
            "steps": steps, "wall_ms_per_step": round(wall / steps * 1000, 2),
            "kernel_ms_per_step": round(sum(e.self_device_time_total for e in kernels) / 1000 / steps, 2),
            "kernels_per_step": round(sum(e.count for e in kernels) / steps),
            "top_kernels": [(e.key[:80], round(e.self_device_time_total / 1000 / steps, 3), round(e.count / steps, 1))
                            for e in top],
            "top_cpu": [(e.key[:60], round(e.self_cpu_time_total / 1000 / steps, 3), round(e.count / steps, 1))
                        for e in cpu],
            "graph_launches": launch_gaps(self.profiler.events())}


def launch_gaps(events) -> list[dict]:
    """For each graph launch in a profile: its host time, how long after the launch began the GPU ran
    the next kernel, and how long the GPU sat idle before that kernel (microseconds)."""
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA")
    out = []
    for launch in (e for e in events if e.name == "cudaGraphLaunch"):
        start = launch.time_range.start
        after = [k for k in kernels if k[0] >= start]
        before = [k[1] for k in kernels if k[1] <= start]
        if not after:
            continue
        out.append({"launch_host_us": round(launch.time_range.end - start),
                    "first_kernel_after_us": round(after[0][0] - start),
                    "gpu_idle_before_us": round(after[0][0] - max(before)) if before else None})
    return out


def profile(loaded, rows: list[dict]) -> dict | None:
    """The studio's Fast step on `loaded`, steps 14-19 of 22 profiled."""
    callback = Profiled(14, 19)

    def build(*args, **kwargs):
        trainer = STUDIO["build_trainer"](*args, **kwargs)
        trainer.add_callback(callback)
        return trainer

    use_variant("one-node:")
    train_speed.build_trainer = build
    try:
        train_speed.run_setup(loaded, "fast profiled", preset("fast"), rows, 22)
    finally:
        train_speed.build_trainer = STUDIO["build_trainer"]
    return callback.result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", default=["0.5B", "7B"])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--variants", nargs="*", default=["peft-lora:", "one-node-nocasts:", "one-node:"])
    parser.add_argument("--profile", action="store_true", help="profile steady steps of each size too")
    parser.add_argument("--presets", nargs="*", default=["fast"], help="studio presets to run each variant with")
    parser.add_argument("--check-loss", action="store_true", help="check the chunked loss's kernel first")
    parser.add_argument("--check-dropout", action="store_true",
                        help="check the redrawn dropout's kernel and the kept mask's replays first")
    parser.add_argument("--buckets", nargs="*", type=int, default=[graphs.BUCKET_TOKENS],
                        help="graphed passes padded to a multiple of each of these (one run each)")
    args = parser.parse_args()
    root = Path("/dev/shm/qwen25-random")
    payload: dict = {"runs": []}
    if args.check_loss:
        payload["loss_check"] = check_loss()
        print(json.dumps(payload["loss_check"]), flush=True)
    if args.check_dropout:
        payload["dropout_check"] = check_dropout()
        print(json.dumps(payload["dropout_check"]), flush=True)
    for size in args.sizes:
        manager = ModelManager(decode_mode="eager")
        manager.load(ModelSpec(str(build_sized_model(root / size, size)), "4bit"))
        with manager.using("bench") as loaded:
            rows = synthetic_examples(8 * (args.steps + 2), loaded.model.config.vocab_size - 2000, seed=7)
            runs = [(v, p, b) for b in args.buckets for p in args.presets for v in args.variants]
            for variant, preset_name, bucket in runs:
                use_variant(variant)
                graphs.BUCKET_TOKENS = bucket
                gaps = HostGaps()
                gaps.install()
                try:
                    result = train_speed.run_setup(loaded, f"{preset_name} {size} {variant} bucket {bucket}",
                                                   preset(preset_name), rows, args.steps)
                finally:
                    result_gaps = gaps.take()  # the patched methods go back even when the run fails
                    graphs.BUCKET_TOKENS = STUDIO["bucket"]
                result["host_gaps"] = result_gaps
                kept = {k: result[k] for k in ("setup", "tokens_per_s", "steps_per_s", "train_wall_s", "applied",
                                               "graphs", "peak_reserved_gib", "step_s", "step_tokens",
                                               "steady_tokens_per_s", "host_gaps") if k in result}
                kept["median_step_s"] = sorted(result["step_s"])[len(result["step_s"]) // 2]
                kept["losses"] = result["losses"][:6]
                payload["runs"].append(kept)
                print(json.dumps(kept), flush=True)
            if args.profile:
                payload[f"profile_{size}"] = profile(loaded, rows)
                print(json.dumps(payload[f"profile_{size}"], indent=1), flush=True)
        manager.unload()
    use_variant("one-node:")
    print("->", write_results("step_probe", payload))


if __name__ == "__main__":
    main()
