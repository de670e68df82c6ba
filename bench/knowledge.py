"""Knowledge bench: which recipe makes an adapter pass an exam it never trained on.

For each dataset given (e.g. one built with `--style facts`, one with `--style tutorial`), and with and
without the document's sections as extra training rows (`--document-rows`), it trains one adapter with
the studio's own training job, then runs the studio's own report on the exam: base, base + retrieval,
fine-tuned, fine-tuned + retrieval, each scored by key-fact hit rate (every key present, and the mean
share of keys), character F1 and ROUGE-L. One table (Markdown) and one JSON result go to
bench/results/knowledge-<gpu>-<date>.{json,md}. This is the measurement that picks the studio's
defaults on a real model; it needs a real instruction model (a random one answers nothing).

    python bench/knowledge.py --model /models/Qwen2.5-0.5B-Instruct --doc data/wudeng_lighthouse.md \\
        --dataset data/wudeng_dataset_A.jsonl --dataset data/wudeng_tutorial_B.jsonl \\
        --exam data/wudeng_exam_A.jsonl --document-rows --preset fast
    python bench/knowledge.py --tiny --doc ... --dataset ... --exam ...   # CPU smoke run: mechanics only

With `--tiny` the model is the test bed's tiny random Qwen2 (built in about a second): the scores it
prints mean nothing; only that every step runs is checked.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from common import ROOT, versions, gpu_slug  # noqa: F401  (sets sys.path)

from studio.data.records import read_dataset  # noqa: E402
from studio.evaluate import service as evaluate  # noqa: E402
from studio.evaluate.report import BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL  # noqa: E402
from studio.jobs import JobBoard, JobStatus  # noqa: E402
from studio.model.generation import GenerationSettings  # noqa: E402
from studio.model.loading import ModelSpec  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.train.job import RunRequest  # noqa: E402
from studio.train.service import start_training  # noqa: E402
from studio.train.settings import LoraSettings, preset  # noqa: E402

COLUMNS = (BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL)
SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="local folder of the base model (an instruction model)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run on the test bed's tiny random model")
    parser.add_argument("--quant", default="4bit", choices=("4bit", "8bit", "none"))
    parser.add_argument("--doc", required=True, help="the source document (retrieval and document rows)")
    parser.add_argument("--dataset", action="append", required=True, help="a dataset to train on (repeat)")
    parser.add_argument("--exam", required=True, help="the exam JSONL (rows with keys), never trained on")
    parser.add_argument("--document-rows", action="store_true", help="also train each dataset with document rows")
    parser.add_argument("--preset", default="fast", help="training preset (default fast)")
    parser.add_argument("--epochs", type=float, default=None, help="override the preset's epochs")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each run after N steps")
    parser.add_argument("--system", default=SYSTEM, help="system prompt for training and answers")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="longest answer (default 256; tiny 24)")
    parser.add_argument("--top-k", type=int, default=2, help="sections retrieved per question")
    parser.add_argument("--workdir", default=None, help="where run folders go (default: a temporary folder)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where the table and JSON go")
    args = parser.parse_args(argv)
    if not args.model and not args.tiny:
        parser.error("give --model DIR (a real instruction model) or --tiny")
    return args


def tiny_model(folder: Path, doc: Path) -> Path:
    from tiny_qwen import build_tiny_qwen

    return build_tiny_qwen(folder, extra_text=doc.read_text(encoding="utf-8"))


def train_one(manager: ModelManager, args, dataset: Path, with_document: bool, runs: Path) -> dict:
    settings = preset(args.preset)
    overrides = {"epochs": args.epochs, "max_steps": args.max_steps}
    settings = replace(settings, save_every=0, **{k: v for k, v in overrides.items() if v is not None})
    name = f"{dataset.stem}{'-doc' if with_document else ''}"
    request = RunRequest(dataset, args.system, LoraSettings(), settings, runs / name,
                         document=Path(args.doc) if with_document else None, exam=Path(args.exam))
    board = JobBoard()
    started = time.time()
    job = board.wait(start_training(board, manager, request), 24 * 3600)
    if job.status is not JobStatus.DONE:
        raise SystemExit(f"training {name} failed: {job.error}")
    return {"name": name, "run_dir": job.result["run_dir"], "steps": job.result["steps"],
            "train_seconds": round(time.time() - started, 1), "final_train_loss": job.result["final_train_loss"]}


def score_one(manager: ModelManager, args, run: dict, exam: list[dict]) -> dict:
    tokens = args.max_new_tokens or (24 if args.tiny else 256)
    board = JobBoard()
    job = board.wait(evaluate.start_report(board, manager, Path(run["run_dir"]), exam, args.doc,
                                           GenerationSettings.greedy(tokens), None, args.top_k, question_set="exam"),
                     24 * 3600)
    if job.status is not JobStatus.DONE:
        raise SystemExit(f"scoring {run['name']} failed: {job.error}")
    report = job.result
    evaluate.detach_run(manager, Path(run["run_dir"]).name)  # one adapter in memory at a time
    keep = ("key_hit", "key_right", "confused", "char_f1", "rouge_l")
    return {"columns": {c: {k: report["summary"][c].get(k) for k in keep} for c in COLUMNS if c in report["summary"]},
            "sections": report["sections"], "recitation": report["recitation"], "keys_note": report["keys_note"],
            "best": {c: sum(1 for r in report["rows"] if r["best"] == c) for c in COLUMNS}}


def table(results: list[dict], tiny: bool) -> str:
    head = "| dataset | document rows | steps | " + " | ".join(f"{c}: all keys / key hit / char F1" for c in COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(COLUMNS))]
    for r in results:
        cells = []
        for c in COLUMNS:
            v = r["columns"].get(c)
            cells.append("-" if v is None or v["key_hit"] is None
                         else f"{v['key_right']:.2f} / {v['key_hit']:.2f} / {v['char_f1']:.2f}")
        lines.append(f"| {r['dataset']} | {'yes' if r['document_rows'] else 'no'} | {r['steps']} | " + " | ".join(cells) + " |")
    if tiny:
        lines.append("\nTiny random model: a smoke run of the mechanics. These numbers mean nothing.")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="knowledge-bench-"))
    model = str(tiny_model(work / "tiny-model", Path(args.doc))) if args.tiny else args.model
    exam = read_dataset(args.exam)
    if not any(row.get("keys") for row in exam):
        print("warning: the exam carries no keys; only character F1 and ROUGE-L will be scored", file=sys.stderr)
    manager = ModelManager()
    manager.load(ModelSpec(model, args.quant))
    results = []
    for dataset in map(Path, args.dataset):
        for with_document in ((False, True) if args.document_rows else (False,)):
            run = train_one(manager, args, dataset, with_document, work / "runs")
            scored = score_one(manager, args, run, exam)
            results.append({"dataset": dataset.name, "document_rows": with_document, **run, **scored})
            print(table(results[-1:], False).splitlines()[-1], flush=True)
    info = versions()
    payload = {"bench": "knowledge", "tiny": args.tiny, "model": model if not args.tiny else "tiny random Qwen2",
               "preset": args.preset, "exam": args.exam, "exam_questions": len(exam), "doc": args.doc,
               "date": time.strftime("%Y-%m-%d"), "versions": info, "results": results}
    stem = f"knowledge-{'tiny-' if args.tiny else ''}{gpu_slug(info)}-{payload['date']}"
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / f"{stem}.md").write_text(table(results, args.tiny) + "\n", encoding="utf-8")
    print(table(results, args.tiny))
    print(f"written: {out / stem}.json and .md")
    manager.unload()
    return payload


if __name__ == "__main__":
    main()
