"""Where the time goes: profiles of one decode step and of training steps on new and seen shapes.

On the GPU, with the random-weight Qwen2.5-7B shape in 4-bit NF4:
- chat: the graph decoder against the tutorial's chat(), then a torch.profiler table of one eager
  decode step (which kernels, how long on the GPU against how long on the wall clock);
- training: the Fast preset's step time on rows of lengths it has not seen before and on the same
  rows again, with and without each attention backend, and a profiler table of one new-shape step.

    python bench/profile_speed.py [--part chat|train|both]

Writes bench/results/profile_speed-<gpu>-<date>.json (tables as text).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from common import build_model, synthetic_examples, write_results  # noqa: F401  (sets sys.path)

from chat_speed import QUESTION, studio_reply, timed, tutorial_chat  # noqa: E402
from train_speed import run_setup  # noqa: E402

from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.settings import preset  # noqa: E402


def table(prof, sort_by: str, rows: int = 18) -> str:
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=70)


def profile_chat(manager, payload: dict) -> None:
    import torch

    loaded = manager.require_loaded()
    reference32, _ = tutorial_chat(loaded.model, loaded.tokenizer, QUESTION, max_new_tokens=32)
    loaded.decode_mode = "graphs"
    _, warm = timed(lambda: studio_reply(manager, 256))
    first32 = studio_reply(manager, 32)
    _, seconds = timed(lambda: studio_reply(manager, 256))
    decoder = loaded.decoder
    payload["graphs"] = {"warmup_s": round(warm, 2), "tokens_per_s": round(256 / seconds, 1),
                         "same_first_32_tokens": first32 == reference32, "recorded_steps": decoder.recorded_steps,
                         "failure": decoder.last_failure}
    print("graphs", payload["graphs"], flush=True)
    step = next(iter(decoder._steps.values()))
    if step.graph is not None:
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(50):
            step.graph.replay()
        torch.cuda.synchronize()
        payload["graph_replay_ms"] = round((time.perf_counter() - started) / 50 * 1000, 2)
    if step.graph is not None:  # the kernels of the recorded step, as it is replayed for each token
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step.graph.replay()
            torch.cuda.synchronize()
        payload["graph_replay_by_cuda_time"] = table(prof, "self_cuda_time_total", rows=30)
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        payload["graph_replay_gpu_ms"] = round(sum(e.self_device_time_total for e in kernels) / 3 / 1000, 2)
        payload["graph_replay_kernels"] = sum(e.count for e in kernels) // 3
        print("replay: kernels", payload["graph_replay_kernels"], "gpu ms", payload["graph_replay_gpu_ms"], flush=True)
        print(payload["graph_replay_by_cuda_time"], flush=True)
    with torch.inference_mode(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            decoder._run_step(loaded.model, step)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    payload["eager_step_by_cuda_time"] = table(prof, "self_cuda_time_total")
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    payload["eager_step_gpu_ms"] = round(sum(e.self_device_time_total for e in kernels) / 3 / 1000, 2)
    payload["eager_step_kernels"] = sum(e.count for e in kernels) // 3
    print("replay ms", payload.get("graph_replay_ms"), "eager step gpu ms", payload["eager_step_gpu_ms"],
          "kernels", payload["eager_step_kernels"], flush=True)
    print(payload["eager_step_by_cuda_time"], flush=True)
    from chat_speed import compare_cost

    payload["compare"] = compare_cost(manager, 128)
    print("compare", payload["compare"], flush=True)


def profile_training(manager, payload: dict, steps: int) -> None:
    import torch

    vocab = manager.require_loaded().model.config.vocab_size - 2000
    fast = preset("fast")
    runs = {}
    with manager.using("benchmark") as loaded:
        fresh = synthetic_examples(8 * steps, vocab, seed=11)
        runs["fresh shapes"] = run_setup(loaded, "fresh", fast, fresh, steps)
        runs["same rows again"] = run_setup(loaded, "seen", fast, fresh, steps)
        torch.backends.cuda.enable_cudnn_sdp(False)
        runs["fresh shapes, cuDNN attention off"] = run_setup(loaded, "no cudnn", fast,
                                                               synthetic_examples(8 * steps, vocab, seed=12), steps)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        runs["fresh shapes, cuDNN and efficient attention off"] = run_setup(
            loaded, "math", fast, synthetic_examples(8 * steps, vocab, seed=13), steps)
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        for name, result in runs.items():
            print(name, {k: result.get(k) for k in ("tokens_per_s", "steps_per_s", "peak_reserved_gib")}, flush=True)
        payload["training"] = {name: {k: r.get(k) for k in ("tokens_per_s", "steps_per_s", "peak_reserved_gib",
                                                            "train_wall_s")} for name, r in runs.items()}
        rows = synthetic_examples(8 * 3, vocab, seed=21)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            run_setup(loaded, "profiled", replace(fast), rows, 3, warmup_steps=0)
        payload["train_new_shapes_by_cuda_time"] = table(prof, "self_cuda_time_total")
        payload["train_new_shapes_by_cpu_time"] = table(prof, "self_cpu_time_total")
        print(payload["train_new_shapes_by_cuda_time"], flush=True)
        print(payload["train_new_shapes_by_cpu_time"], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("chat", "train", "both"), default="both")
    parser.add_argument("--model-dir", default="/tmp/qwen25-7b-random")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on a tiny model")
    args = parser.parse_args()
    folder = build_model(Path(args.model_dir + ("-tiny" if args.tiny else "")), args.tiny)
    manager = ModelManager(decode_mode="graphs")
    manager.load(ModelSpec(str(folder), "4bit"))
    payload: dict = {"model": "Qwen2.5-7B shape, random weights, 4-bit NF4"}
    try:
        if args.part in ("chat", "both"):
            profile_chat(manager, payload)
        if args.part in ("train", "both"):
            profile_training(manager, payload, args.steps)
    finally:
        print("->", write_results("profile_speed-tiny" if args.tiny else "profile_speed", payload), flush=True)


if __name__ == "__main__":
    main()
