"""The studio's own paths on the GPU, end to end: chat, a training job, chat again, side by side.

Not a timing bench: it drives the model manager and the training job exactly as the tabs do, on the
random-weight Qwen2.5-7B shape in 4-bit, and checks what a user relies on:
- repeatable: the same question gives the same greedy reply 5 times (base and adapter);
- base_unchanged_after_training: the base reply is the same before and after a training job;
- a training job with the Fast preset runs to the end and saves its adapter (time and tokens/s);
- the recorded decode steps are forgotten when the job takes the model and re-recorded after;
- base_column_equals_base_chat / adapter_column_equals_adapter_chat: side by side gives, byte for
  byte, the replies of a base chat and of an adapter chat;
- and, for information, whether the graph decoder's replies equal plain generate()'s (on random
  weights, whose logits are near-ties, a last-bit difference can change a word).

    python bench/studio_paths_gpu.py [--tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import adapter_updates, build_model, use_decoder, write_results  # noqa: F401  (sets sys.path)

from studio.jobs import JobBoard, JobStatus  # noqa: E402
from studio.model.generation import GenerationSettings, build_messages  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.job import RunRequest  # noqa: E402
from studio.train.service import new_run_dir, start_training  # noqa: E402
from studio.train.settings import LoraSettings, preset  # noqa: E402

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


def write_dataset(path: Path, rows: int = 64) -> Path:
    facts = [(f"雾灯岛第{i}座灯塔叫什么？", f"第{i}座灯塔叫“潮声{i}号”，由守灯人阿岚在第{i + 3}年点亮。") for i in range(rows)]
    path.write_text("".join(json.dumps({"instruction": q, "output": a}, ensure_ascii=False) + "\n" for q, a in facts),
                    encoding="utf-8")
    return path


def eager_reply(manager, messages, settings) -> str:
    """The reply through plain generate() (decode mode 'eager'), then the studio's decoder again."""
    mode = manager.require_loaded().decode_mode
    use_decoder(manager, "eager")
    try:
        return manager.chat(messages, settings)
    finally:
        use_decoder(manager, mode)


def prompt_logits(manager, messages):
    """The base model's logits over the prompt (every adapter off), one plain forward pass."""
    import torch

    from studio.model.routing import route_rows

    with manager.using("checking", changes_model=False) as loaded:
        inputs = loaded.tokenizer([manager.render_prompt(messages)], return_tensors="pt").to(loaded.model.device)
        with route_rows(loaded.model, [None]), torch.inference_mode():
            return loaded.model(**inputs, use_cache=False).logits.float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model-dir", default="/tmp/qwen25-7b-random")
    parser.add_argument("--preset", default="fast", help="the training job's preset (fast, gpu24, tutorial)")
    args = parser.parse_args()
    folder = build_model(Path(args.model_dir + ("-tiny" if args.tiny else "")), args.tiny)
    manager = ModelManager()  # the studio's default decode mode
    manager.load(ModelSpec(str(folder), "4bit"))
    loaded = manager.require_loaded()
    question = build_messages(SYSTEM, [], "雾灯岛第3座灯塔叫什么？")
    settings = GenerationSettings.greedy(48)
    base_before = manager.chat(question, settings)
    checks = {"decode_mode": loaded.decode_mode, "recorded_before_training": loaded.decoder.recorded_steps,
              "base_repeatable": all(manager.chat(question, settings) == base_before for _ in range(4))}
    eager_before = eager_reply(manager, question, settings)
    checks["graph_reply_equals_eager"] = base_before == eager_before
    logits_before = prompt_logits(manager, question)

    work = Path(tempfile.mkdtemp(prefix="studio-paths-"))
    board = JobBoard()
    train = preset(args.preset)
    train.epochs, train.save_every = 2.0, 0
    checks["preset"] = args.preset
    request = RunRequest(write_dataset(work / "facts.jsonl"), SYSTEM, LoraSettings(), train,
                         new_run_dir(work / "runs", "facts"))
    started = time.perf_counter()
    job = board.wait(start_training(board, manager, request), 600)
    checks["training_status"] = job.status.value
    checks["training_s"] = round(time.perf_counter() - started, 1)
    checks["training_result"] = {k: job.result.get(k) for k in ("adapter", "steps", "status", "final_train_loss")} \
        if job.status is JobStatus.DONE else job.error
    checks["recorded_after_training_job"] = loaded.decoder.recorded_steps
    events, _ = job.events_since(0)
    checks["training_log"] = [e["message"] for e in events if e.get("type") == "log" and any(
        word in e.get("message", "") for word in ("CUDA graphs", "Chunked loss", "Liger", "torch.compile"))]
    print(checks, flush=True)
    adapter = job.result["adapter"]

    base_after = manager.chat(question, settings)
    checks["base_prompt_logits_max_abs_diff"] = float((prompt_logits(manager, question) - logits_before).abs().max())
    checks["eager_base_unchanged_after_training"] = eager_reply(manager, question, settings) == eager_before
    checks["graph_base_equals_eager_base"] = base_after == eager_before
    tuned = manager.chat(question, settings, adapter=adapter)
    columns = [list(manager.stream_side_by_side(question, adapter, settings))[-1] for _ in range(5)]
    base_column, tuned_column = columns[0]
    adapter_repeatable = all(manager.chat(question, settings, adapter=adapter) == tuned for _ in range(4))
    checks.update({
        "repeatable": checks["base_repeatable"] and adapter_repeatable and all(c == columns[0] for c in columns),
        "base_unchanged_after_training": base_after == base_before,
        "base_column_equals_base_chat": base_column == base_after,
        "adapter_column_equals_adapter_chat": tuned_column == tuned,
        "adapter_reply_differs_from_base": tuned != base_after,
        "recorded_steps_at_end": getattr(loaded.decoder, "recorded_steps", None),
        "decoder_problem": loaded.decoder.problem,
        "decoder_kernels": getattr(loaded.decoder, "cuda_kernels_note", ""),
        "adapter_updates": adapter_updates(loaded.decoder),
        "replies": {"base": base_after[:80], "adapter": tuned[:80], "side_by_side_adapter": tuned_column[:80]},
    })
    print(json.dumps(checks, ensure_ascii=False, indent=1), flush=True)
    write_results("studio_paths-tiny" if args.tiny else "studio_paths", {"checks": checks})


if __name__ == "__main__":
    main()
