"""Two GPUs against one: the same run (Fast preset, 20 optimizer steps, 8 sequences per step) trained in
the studio's process on one GPU and as two data-parallel processes (studio.train.multigpu).

Records for each: tokens/s (the two-process figure is process 0's count times the processes, as each
process trains the same number of sequences per step), seconds per step, and the first 20 losses; the
ratio of tokens/s and the largest relative loss difference.

    python bench/multigpu_speed.py          # 2 GPUs, the random-weight 7B shape (about 5 minutes)
    python bench/multigpu_speed.py --tiny   # the same code on the CPU with the tiny model (two gloo processes)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_model, versions, write_results  # noqa: E402

SYSTEM = "You are a helpful assistant."


def write_rows(folder: Path, tokenizer, count: int, seed: int = 0) -> Path:
    """A dataset of `count` rows of 120-400 tokens, like the speed bench's (prompt ~45%, answer the rest)."""
    rng = random.Random(seed)
    vocab = [t for t in tokenizer.get_vocab() if t.isalpha()][:2000] or ["word"]
    path = folder / "speed_rows.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for g in range(count):
            length = rng.randint(120, 400)
            words = [rng.choice(vocab) for _ in range(length)]
            cut = int(length * 0.45)
            handle.write(json.dumps({"instruction": " ".join(words[:cut]), "output": " ".join(words[cut:]),
                                     "group": f"g{g}"}) + "\n")
    return path


def run(board, manager, request, processes: int, spec, tiny: bool) -> dict:
    from studio.train.multigpu import start_multigpu_training
    from studio.train.service import start_training

    started = time.perf_counter()
    if processes == 1:
        job = start_training(board, manager, request)
    else:
        job = start_multigpu_training(board, None, request, processes, spec=spec, check_gpus=not tiny)
    board.wait(job, 3600)
    wall = time.perf_counter() - started
    if job.error:
        return {"error": job.error}
    meta = json.loads((Path(request.run_dir) / "studio.json").read_text(encoding="utf-8"))
    metrics = [json.loads(line) for line in (Path(request.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {"processes": processes, "steps": meta["steps"], "tokens_per_s": meta["tokens_per_s"] * processes,
            "train_seconds": meta["duration_s"], "wall_seconds": round(wall, 1), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from studio.jobs import JobBoard
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager
    from studio.train.job import RunRequest
    from studio.train.settings import LoraSettings, preset

    work = Path(tempfile.mkdtemp(prefix="multigpu-bench-"))
    folder = build_model(work / "model", args.tiny)
    spec = ModelSpec(str(folder), "4bit")
    manager = ModelManager()
    manager.load(spec)
    data = write_rows(work, manager.require_loaded().tokenizer, 183)
    settings = replace(preset("fast"), max_steps=args.steps, save_every=0, heldout_per_group=0,
                       max_length=512)
    if args.tiny:
        settings = replace(settings, liger_kernels=False, dequantize_base=False)
    board, results = JobBoard(), {}
    for processes in (1, 2):
        request = RunRequest(data, SYSTEM, LoraSettings(), settings, work / "runs" / f"gpus{processes}")
        if processes == 2:
            manager.unload()  # the one-GPU run's model is not needed any more: GPU 0 is all the processes'
        results[f"gpus{processes}"] = run(board, manager, request, processes, spec, args.tiny)
    one, two = results["gpus1"], results["gpus2"]
    if "error" not in one and "error" not in two:
        pairs = list(zip(one["losses"], two["losses"]))
        results["speedup"] = round(two["tokens_per_s"] / max(one["tokens_per_s"], 1e-9), 2)
        results["max_relative_loss_difference"] = round(max(abs(a - b) / max(abs(a), 1e-9) for a, b in pairs), 4)
    results["versions"] = versions()
    results["model"] = "tiny" if args.tiny else "Qwen2.5-7B shape, random weights, 4-bit"
    print(json.dumps({k: v for k, v in results.items() if k != "versions"}, indent=2))
    print(write_results("multigpu_speed" + ("-tiny" if args.tiny else ""), results))


if __name__ == "__main__":
    main()
