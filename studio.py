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

from studio.access import AccessPolicy  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.model.loading import QUANT_CHOICES  # noqa: E402
from studio.services import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT, PROJECT_ROOT, StudioPaths  # noqa: E402

ASSETS = PROJECT_ROOT / "assets"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id or local model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="4bit",
                        help="4bit = NF4 + double quant + bf16 compute, as the tutorial (default); 8bit; none")


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
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    chat = commands.add_parser("chat", help="print one reply of the model to --message and exit")
    add_model_options(chat)
    chat.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (default: the sample domain's)")
    chat.add_argument("--message", required=True, help="the user message")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    chat.add_argument("--repetition-penalty", type=float, default=1.05, help="default 1.05")
    return parser


def build_services(args: argparse.Namespace):
    from pathlib import Path

    from studio.model.manager import ModelManager
    from studio.services import Services

    paths = StudioPaths(Path(args.workdir) / "data", Path(args.workdir) / "runs") if args.workdir else StudioPaths()
    policy = AccessPolicy.demo() if getattr(args, "share", False) and not getattr(args, "auth", None) else AccessPolicy.full()
    return Services(manager=ModelManager(), policy=policy, paths=paths.ensure(),
                    default_model=args.model, default_quant=args.quant)


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


COMMANDS = {None: run_ui, "chat": run_chat}


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
