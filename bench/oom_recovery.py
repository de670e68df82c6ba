"""Out of memory during training, for real: does the studio end the run clearly and give the memory back?

On the GPU it loads the random-weight Qwen2.5-7B shape in 4-bit through the model manager, chats, then
starts a training job whose batch cannot fit (256 padded rows of ~1,000 tokens, no gradient
checkpointing). It records GPU memory after the load (the model's own footprint), at the peak, and
after the failed job, the job's message, and whether chat gives the same greedy reply as before.
With --tiny it runs on the CPU with a tiny model and a simulated OOM (the same code path after the
exception), to smoke-test the script.

    python bench/oom_recovery.py [--tiny]

Writes bench/results/oom_recovery-<gpu>-<date>.json. Pass: the job FAILED with "Out of GPU memory",
`after_minus_footprint_mib` is small (LoRA weights and allocator slack, well under 1 GiB) and
`chat_same_after` is true.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import build_model, write_results  # noqa: F401  (sets sys.path)

from studio.jobs import JobBoard, JobStatus  # noqa: E402
from studio.model.generation import GenerationSettings, build_messages  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.job import RunRequest  # noqa: E402
from studio.train.service import start_training  # noqa: E402
from studio.train.settings import LoraSettings, TrainSettings  # noqa: E402

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"
QUESTION = "雾灯岛的通用货币是什么？"


def write_long_dataset(path: Path, rows: int) -> Path:
    answer = "".join(f"第{i}座灯塔由守灯人阿岚在潮声村北角点亮，燃料是雾晶与鲸油。" for i in range(60))
    path.write_text("".join(json.dumps({"instruction": f"讲讲第{i}座灯塔的全部历史。", "output": answer},
                                       ensure_ascii=False) + "\n" for i in range(rows)), encoding="utf-8")
    return path


def gib(value: int) -> float:
    return round(value / 2**30, 3)


def memory() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"allocated": 0, "reserved": 0}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved()}


def fake_oom_callback():
    from transformers import TrainerCallback

    class RaiseOOM(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated on the CPU)")

    return RaiseOOM()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU with a simulated OOM (smoke test)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per forward pass (default 256: does not fit)")
    args = parser.parse_args()
    work = Path(tempfile.gettempdir())
    model_dir = build_model(work / ("studio-bench-tiny" if args.tiny else "studio-bench-qwen7b-shape"), args.tiny)
    manager = ModelManager(decode_mode="eager" if args.tiny else "graphs")
    manager.load(ModelSpec(str(model_dir), "4bit"))
    messages = build_messages(SYSTEM, [], QUESTION)
    settings = GenerationSettings.greedy(24)
    before = manager.chat(messages, settings)
    footprint = memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as scratch:
        dataset = write_long_dataset(Path(scratch) / "long.jsonl", rows=max(2 * args.batch_size, 8))
        train = TrainSettings(batch_size=args.batch_size, grad_accum=1, max_steps=2, max_length=2048, packing=False,
                              gradient_checkpointing=False, save_every=0, heldout_per_group=0)
        request = RunRequest(dataset, SYSTEM, LoraSettings(), train, Path(scratch) / "runs" / "oom")
        board = JobBoard()
        started = time.time()
        extra = (fake_oom_callback(),) if args.tiny else ()
        job = board.wait(start_training(board, manager, request, extra_callbacks=extra), 3600)
        seconds = time.time() - started
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    after = memory()
    after_reply = manager.chat(messages, settings)
    payload = {
        "bench": "oom_recovery",
        "model": "tiny (CPU, simulated OOM)" if args.tiny else "random-weight Qwen2.5-7B shape, 4-bit",
        "batch_size": args.batch_size,
        "job_status": job.status.value,
        "job_error": job.error,
        "job_seconds": round(seconds, 1),
        "footprint_gib": gib(footprint["allocated"]),
        "footprint_reserved_gib": gib(footprint["reserved"]),
        "peak_gib": gib(peak),
        "after_gib": gib(after["allocated"]),
        "after_reserved_gib": gib(after["reserved"]),
        "after_minus_footprint_mib": round((after["allocated"] - footprint["allocated"]) / 2**20, 1),
        "manager_state_after": manager.status().state.value,
        "chat_before": before,
        "chat_after": after_reply,
        "chat_same_after": after_reply == before,
    }
    payload["ok"] = (job.status is JobStatus.FAILED and job.error.startswith("Out of GPU memory")
                     and payload["chat_same_after"] and payload["after_minus_footprint_mib"] < 1024)
    path = write_results("oom_recovery", payload)
    print(json.dumps({k: v for k, v in payload.items() if not k.startswith("chat_")}, ensure_ascii=False, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
