#!/usr/bin/env python3
"""QLoRA Studio: the composition root and command line.

    python studio.py                      # the studio UI (add --load to load the model at start)
    python studio.py chat --message TEXT  # one reply from the base model, then exit

Arguments are parsed here, the services are built once here, and handed to the UI or the command.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training shapes change every step; expandable segments keep the CUDA allocator from fragmenting.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from studio.access import AccessPolicy  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.model.fast_decode import DECODE_MODES  # noqa: E402
from studio.model.loading import QUANT_CHOICES  # noqa: E402
from studio.model.manager import DEFAULT_DECODE_MODE  # noqa: E402
from studio.train.settings import PRESETS  # noqa: E402
from studio.services import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT, PROJECT_ROOT, StudioPaths  # noqa: E402

ASSETS = PROJECT_ROOT / "assets"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id or local model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="4bit",
                        help="4bit = NF4 + double quant + bf16 compute, as the tutorial (default); 8bit; none")
    parser.add_argument("--decode", choices=DECODE_MODES, default=DEFAULT_DECODE_MODE,
                        help="decoding: graphs (default; a static KV cache and the one-token step replayed from a "
                             "CUDA graph, recorded in ~3 s on the first reply), static (plain generate with a static "
                             "cache), cudagraphs or inductor (generate with torch.compile), eager (plain generate)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="studio.py",
        description="QLoRA Studio: baseline chat, dataset building, QLoRA training and before/after "
                    "comparison of Qwen2.5 models. Without a command it launches the UI.",
    )
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the UI on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the UI (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a temporary public link (needs internet). Without --auth the shared "
                             "studio runs in demo mode: chat only")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="require this login for the UI; with it a shared studio allows every action")
    parser.add_argument("--load", action="store_true", help="load --model at start instead of on request")
    parser.add_argument("--workdir", default=None,
                        help="folder for data/ and runs/ (default: the project folder)")
    parser.add_argument("--lang", choices=("zh", "en"), default="",
                        help="language of the UI: zh (中文) or en; default: each browser's language")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    chat = commands.add_parser("chat", help="print one reply of the model to --message and exit")
    add_model_options(chat)
    chat.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (default: the sample domain's)")
    chat.add_argument("--message", required=True, help="the user message")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    chat.add_argument("--repetition-penalty", type=float, default=1.05, help="default 1.05")
    build = commands.add_parser("build-dataset", help="turn a document into an instruction dataset through a teacher")
    build.add_argument("--doc", required=True, help="Markdown or text document")
    build.add_argument("--name", default="", help="dataset name (default: the document's file name)")
    build.add_argument("--out-dir", default=None, help="where the JSONL files go (default: data/)")
    build.add_argument("--base-url", default=None, help="OpenAI-compatible base URL of the teacher")
    build.add_argument("--model", dest="teacher", default=None, help="teacher model id")
    build.add_argument("--api-key-env", default=None,
                       help="environment variable holding the API key (default: STUDIO_TEACHER_API_KEY, then OPENAI_API_KEY)")
    build.add_argument("--variants", type=int, default=14, help="rephrasings per base question (default 14)")
    build.add_argument("--per-section", default="auto", help="questions per section: a number or auto (default)")
    build.add_argument("--concurrency", type=int, default=8, help="teacher calls in flight (default 8)")
    build.add_argument("--timeout", type=float, default=120.0, help="seconds per teacher call (default 120)")
    build.add_argument("--attempts", type=int, default=3, help="attempts per teacher call (default 3)")
    build.add_argument("--min-chars", type=int, default=100, help="shortest section kept (default 100)")
    build.add_argument("--local-teacher", action="store_true", help="use a local model as the teacher (no API key)")
    build.add_argument("--teacher-model", default=None, help="with --local-teacher: hub id or folder of that model")
    build.add_argument("--quant", choices=QUANT_CHOICES, default="4bit", help="with --local-teacher (default 4bit)")
    train = commands.add_parser("train", help="train a QLoRA adapter on a dataset and write a run folder")
    add_model_options(train)
    train.add_argument("--dataset", required=True, help="JSONL dataset (studio, Alpaca or chat-messages rows)")
    train.add_argument("--output", default=None, help="run folder (default: runs/<dataset>_<timestamp>)")
    train.add_argument("--preset", default="tutorial", choices=sorted(PRESETS), help="training preset (default tutorial)")
    train.add_argument("--epochs", type=float, default=None, help="passes over the data (preset: 4)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    train.add_argument("--lr", type=float, default=None, help="learning rate (preset: 1e-3)")
    train.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (preset: 1)")
    train.add_argument("--grad-accum", type=int, default=None, help="forward passes per optimizer step (preset: 8)")
    train.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (preset: 50; 0 = never)")
    train.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16; alpha is 2 x r)")
    train.add_argument("--targets", default="all",
                       help="all (the seven projections), peft-default (q_proj,v_proj for qwen2) or a comma list")
    train.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt stored with the adapter")
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    compare = commands.add_parser("compare", help="score base, retrieval and an adapter on questions; write a report")
    add_model_options(compare)
    compare.add_argument("--adapter", required=True, help="run folder of the adapter (from train)")
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--questions", default=None, help="JSONL of instruction/output rows to ask")
    source.add_argument("--heldout", action="store_true", help="ask the run's held-out questions (the default)")
    compare.add_argument("--doc", default=None, help="source document for the retrieval column (default: the run's)")
    compare.add_argument("--no-retrieval", action="store_true", help="leave the retrieval column out")
    compare.add_argument("--out", default=None, help="write the report to FILE.json or FILE.csv")
    compare.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    compare.add_argument("--sampling", action="store_true", help="the tutorial's sampling instead of greedy decoding")
    compare.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of an LLM judge")
    compare.add_argument("--judge-model", default=None, help="judge model id")
    compare.add_argument("--judge-api-key-env", default=None, help="environment variable with the judge's key")
    return parser


def build_services(args: argparse.Namespace):
    from pathlib import Path

    from studio.model.manager import ModelManager
    from studio.services import Services

    paths = StudioPaths(Path(args.workdir) / "data", Path(args.workdir) / "runs") if args.workdir else StudioPaths()
    policy = AccessPolicy.demo() if getattr(args, "share", False) and not getattr(args, "auth", None) else AccessPolicy.full()
    return Services(manager=ModelManager(decode_mode=args.decode), policy=policy, paths=paths.ensure(),
                    default_model=args.model, default_quant=args.quant, lang=getattr(args, "lang", "") or "")


def run_ui(args: argparse.Namespace, services) -> int:
    from studio.model.loading import ModelSpec
    from studio.ui.app import build_app

    if args.load:
        services.manager.load(ModelSpec(args.model, args.quant), progress=lambda f, m: print(f"[load] {m}", flush=True))
    app = build_app(services)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if auth is not None and len(auth) != 2:
        raise StudioError("--auth takes USER:PASSWORD")
    app.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, auth=auth,
        show_error=True, footer_links=["api"], css_paths=[ASSETS / "studio.css"],
    )
    return 0


def run_chat(args: argparse.Namespace, services) -> int:
    from studio.model.generation import GenerationSettings, build_messages
    from studio.model.loading import ModelSpec

    services.manager.load(ModelSpec(args.model, args.quant))
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    shown = ""
    for reply in services.manager.stream_chat(build_messages(args.system, [], args.message), settings):
        sys.stdout.write(reply[len(shown):])
        sys.stdout.flush()
        shown = reply
    sys.stdout.write("\n")
    return 0


def print_event(event: dict) -> None:
    if event["type"] in ("log", "progress") and event.get("message"):
        print(f"[{event['type']}] {event['message']}", flush=True)


def run_build_dataset(args: argparse.Namespace, services) -> int:
    from pathlib import Path

    from studio.data.builder import BuildSettings
    from studio.data.documents import SplitSettings
    from studio.data.service import start_build
    from studio.data.teacher import RetryPolicy, TeacherConfig
    from studio.jobs import JobStatus, follow
    from studio.model.loading import ModelSpec
    from studio.secrets import key_from_env

    paths = services.paths
    if args.out_dir:
        paths = StudioPaths(Path(args.out_dir), paths.runs_dir).ensure()
    settings = BuildSettings(per_section=args.per_section, variants=args.variants, concurrency=args.concurrency,
                             retry=RetryPolicy(args.attempts), split=SplitSettings(min_chars=args.min_chars))
    if args.local_teacher:
        services.manager.load(ModelSpec(args.teacher_model or args.model, args.quant))
        teacher = None
    else:
        if not args.base_url or not args.teacher:
            raise StudioError("build-dataset needs --base-url and --model (or --local-teacher).")
        teacher = TeacherConfig(args.base_url, args.teacher, key_from_env(args.api_key_env), args.timeout)
    job = start_build(services.jobs, services.manager, paths, args.doc, settings, teacher, args.name)
    follow(job, print_event)
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    return 0 if job.result.get("rows") else 1


def train_request(args: argparse.Namespace, loaded, runs_dir):
    from dataclasses import replace
    from pathlib import Path

    from studio.train.job import RunRequest
    from studio.train.service import load_request, new_run_dir
    from studio.train.settings import ALL_PROJECTIONS, LoraSettings, peft_default_targets, preset

    if args.resume:
        return load_request(Path(args.resume))
    overrides = {"epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.lr,
                 "batch_size": args.batch_size, "grad_accum": args.grad_accum, "save_every": args.save_every}
    settings = replace(preset(args.preset), **{k: v for k, v in overrides.items() if v is not None})
    if args.targets == "all":
        targets = ALL_PROJECTIONS
    elif args.targets == "peft-default":
        targets = peft_default_targets(loaded.model.config.model_type)
    else:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, targets=targets)
    run_dir = Path(args.output) if args.output else new_run_dir(runs_dir, Path(args.dataset).stem)
    return RunRequest(Path(args.dataset), args.system, lora, settings, run_dir)


def print_estimate(loaded, request) -> None:
    from studio.train.memory import estimate_for_dataset, free_gpu_gib

    try:
        estimate = estimate_for_dataset(loaded, request.dataset, request.system_prompt, request.train, request.lora)
    except StudioError:
        return  # the job reports the dataset problem
    print("[log] " + estimate.describe(free_gpu_gib()), flush=True)


def run_train(args: argparse.Namespace, services) -> int:
    from studio.jobs import JobStatus, follow
    from studio.model.loading import ModelSpec
    from studio.train.service import start_training

    services.manager.load(ModelSpec(args.model, args.quant))
    loaded = services.manager.require_loaded()
    request = train_request(args, loaded, services.paths.runs_dir)
    print_estimate(loaded, request)
    job = start_training(services.jobs, services.manager, request)
    print(f"[log] run folder: {request.run_dir}", flush=True)
    follow(job, print_event)
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    print(f"[done] {job.result.get('status')}: adapter in {job.result.get('run_dir')}", flush=True)
    return 0


def run_compare(args: argparse.Namespace, services) -> int:
    from pathlib import Path

    from studio.data.datasets import read_dataset
    from studio.data.teacher import TeacherConfig
    from studio.evaluate.report import format_table, write_report
    from studio.evaluate.service import source_document, start_report
    from studio.jobs import JobStatus, follow
    from studio.model.generation import GenerationSettings
    from studio.model.loading import ModelSpec
    from studio.secrets import key_from_env

    services.manager.load(ModelSpec(args.model, args.quant))
    folder = Path(args.adapter)
    questions = read_dataset(args.questions) if args.questions else None
    document = None if args.no_retrieval else (args.doc or source_document(folder))
    settings = (GenerationSettings.tutorial_sampling if args.sampling else GenerationSettings.greedy)(args.max_new_tokens)
    judge = None
    if args.judge_base_url:
        if not args.judge_model:
            raise StudioError("--judge-base-url needs --judge-model.")
        judge = TeacherConfig(args.judge_base_url, args.judge_model, key_from_env(args.judge_api_key_env))
    job = start_report(services.jobs, services.manager, folder, questions, document, settings, judge)
    follow(job, print_event)
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    print(format_table(job.result))
    if args.out:
        print(f"[log] report written to {write_report(job.result, Path(args.out))}")
    return 0


COMMANDS = {None: run_ui, "compare": run_compare, "chat": run_chat, "build-dataset": run_build_dataset, "train": run_train}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        services = build_services(args)
        return COMMANDS[args.command](args, services)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
