#!/usr/bin/env python3
"""QLoRA Studio: the composition root and command line.

    python studio.py                      # the studio UI (add --load to load the model at start)
    python studio.py chat --message TEXT  # one reply from the base model, then exit
    python studio.py export|serve ...     # use the adapter elsewhere: files for vLLM/Ollama, an OpenAI-compatible API

Arguments are parsed here, the services are built once here, and handed to the UI or the command.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Training shapes change every step; expandable segments keep the CUDA allocator from fragmenting.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# Compiled layers (the compile_layers switch): the compiler's cache outside /tmp, so it survives a reboot.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "qlora-studio", "torchinductor"))

from studio.access import AccessPolicy, is_loopback, policy_for_launch  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.model.decoding import DECODE_MODES  # noqa: E402
from studio.model.loading import QUANT_CHOICES  # noqa: E402
from studio.model.manager import DEFAULT_DECODE_MODE  # noqa: E402
from studio.train.settings import PRESETS  # noqa: E402
from studio.config import DEFAULT_MODEL, DEFAULT_SYSTEM_PROMPT, PROJECT_ROOT, StudioPaths  # noqa: E402

ASSETS = PROJECT_ROOT / "assets"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id or local model folder (default {DEFAULT_MODEL})")
    parser.add_argument("--quant", choices=QUANT_CHOICES, default="4bit",
                        help="4bit = NF4 + double quant + bf16 compute, as the tutorial (default); 8bit; none")
    parser.add_argument("--decode", choices=list(DECODE_MODES), default=DEFAULT_DECODE_MODE,
                        help="how replies are generated, chosen once when the model loads: "
                             + "; ".join(f"{mode}: {what}" for mode, what in DECODE_MODES.items())
                             + ". Every mode gives each row of a comparison only its own adapter and runs without "
                               "cuDNN attention on a GPU, so greedy replies repeat")


CPU_NOTES = {
    None: "Without a GPU the studio still runs on the CPU (4-bit weights through bitsandbytes' CPU kernels), "
          "many times slower: chat and training are practical only with the smallest models (0.5B-1.5B).",
    "chat": "Without a GPU the model answers on the CPU, slowly: a 7B model takes seconds per token; "
            "try --model Qwen/Qwen2.5-0.5B-Instruct.",
    "build-dataset": "A remote teacher needs no GPU here. With --local-teacher and no GPU the teacher runs on "
                     "the CPU and a build takes hours with a 7B model.",
    "train": "Without a GPU training runs on the CPU: practical only for the smallest models (0.5B) and short "
             "runs (--max-steps); a 7B run would take days.",
    "compare": "Without a GPU every answer is generated on the CPU, slowly: a report over many held-out "
               "questions with a 7B model takes hours.",
    "export": "Needs no GPU: the adapter is copied, and --merge loads the base in bf16 on the CPU "
              "(about 2 bytes of RAM per parameter: ~15 GB for a 7B).",
    "serve": "Without a GPU the answers are generated on the CPU, slowly; requests are served one at a time "
             "(a second one gets HTTP 503 with Retry-After).",
}


def command_parser(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    """A command's parser, whose --help ends with what happens on a CPU-only machine."""
    return commands.add_parser(name, help=help_text, description=help_text, epilog=f"CPU only: {CPU_NOTES[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="studio.py",
        description="QLoRA Studio: baseline chat, dataset building, QLoRA training and before/after "
                    "comparison of Qwen2.5 models. Without a command it launches the UI.",
        epilog="Options before a command apply to it when the command has them too (--model, --quant, --decode, "
               "--host, --port), or when they concern every command (--workdir); UI-only options given before a "
               f"command are refused. CPU only: {CPU_NOTES[None]}",
    )
    add_model_options(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve the UI on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=7860, help="port of the UI (default 7860)")
    parser.add_argument("--share", action="store_true",
                        help="also open a temporary public link (needs internet). Without a login the shared "
                             "studio runs in demo mode: chat and compare on the adapters you attached, nothing else")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="require this login for the UI; with it a shared studio allows every action. "
                             "Prefer --auth-file or STUDIO_AUTH, which keep the password out of shell history")
    parser.add_argument("--auth-file", metavar="FILE", help="logins for the UI, one USER:PASSWORD a line")
    parser.add_argument("--demo", action="store_true",
                        help="demo mode even with a login or on 127.0.0.1: chat and compare only")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest file the page accepts (default 20)")
    parser.add_argument("--teacher-base-url", default=None,
                        help="the teacher/judge URL (or a provider preset's name) that may receive the key from the "
                             "environment; default STUDIO_TEACHER_BASE_URL, else the provider presets' URLs. A URL "
                             "typed in the page gets only the key typed with it")
    parser.add_argument("--teacher-key-env", dest="api_key_env", metavar="VAR", default=None,
                        help="environment variable with that key (default STUDIO_TEACHER_API_KEY, then OPENAI_API_KEY)")
    parser.add_argument("--load", action="store_true", help="load --model at start instead of on request")
    parser.add_argument("--attach", action="append", default=[], metavar="NAME=RUN_DIR",
                        help="with --load: attach this adapter at start (repeatable); how a shared demo, which may "
                             "not attach adapters itself, gets adapters to chat with and compare")
    parser.add_argument("--workdir", default=None,
                        help="folder for data/ and runs/ (default: the project folder)")
    parser.add_argument("--api", action="store_true",
                        help="also serve the OpenAI-compatible API (/v1/models, /v1/chat/completions) beside the UI")
    parser.add_argument("--api-key-env", dest="serve_key_env", metavar="VAR", default=None,
                        help="with --api: require the bearer key held in this environment variable")
    parser.add_argument("--lang", choices=("zh", "en"), default="",
                        help="language of the UI and of the commands' messages: zh (中文) or en; default: each "
                             "browser's language in the UI, the LANG environment variable for commands")
    commands = parser.add_subparsers(dest="command", title="commands", metavar="COMMAND")

    chat = command_parser(commands, "chat", "print one reply of the model to --message and exit")
    add_model_options(chat)
    chat.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt (default: the sample domain's)")
    chat.add_argument("--message", required=True, help="the user message")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    chat.add_argument("--repetition-penalty", type=float, default=1.05, help="default 1.05")
    build = command_parser(commands, "build-dataset", "turn a document into an instruction dataset through a teacher")
    build.add_argument("--doc", required=True, help="Markdown or text document")
    build.add_argument("--name", default="", help="dataset name (default: the document's file name)")
    build.add_argument("--out-dir", default=None, help="where the JSONL files go (default: data/)")
    build.add_argument("--teacher-base-url", "--base-url", dest="teacher_base_url", default=None,
                       help="OpenAI-compatible base URL of the teacher (--base-url is the old name)")
    build.add_argument("--teacher-model", "--model", dest="teacher_model", default=None,
                       help="teacher model id; with --local-teacher the hub id or folder of the local teacher "
                            "(default: the --model given before the command). --model is the old name")
    build.add_argument("--api-key-env", "--teacher-key-env", dest="api_key_env", default=None,
                       help="environment variable holding the API key (default: STUDIO_TEACHER_API_KEY, then OPENAI_API_KEY)")
    build.add_argument("--variants", type=int, default=14, help="rephrasings per base question (default 14)")
    build.add_argument("--per-section", default="auto", help="questions per section: a number or auto (default)")
    build.add_argument("--style", choices=("facts", "tutorial"), default="facts",
                       help="facts (default): several short one-fact pairs per section, some answers reworded; "
                            "tutorial: one long answer per question")
    build.add_argument("--exam", type=int, default=0, metavar="N",
                       help="also write an exam of N questions per section, never trained on (default 0 = none)")
    build.add_argument("--concurrency", type=int, default=8, help="teacher calls in flight (default 8)")
    build.add_argument("--timeout", type=float, default=120.0, help="seconds per teacher call (default 120)")
    build.add_argument("--attempts", type=int, default=3, help="attempts per teacher call (default 3)")
    build.add_argument("--min-chars", type=int, default=100, help="shortest section kept (default 100)")
    build.add_argument("--max-calls", type=int, default=500,
                       help="refuse a build that would make more teacher calls than this (default 500; 0 = no limit)")
    build.add_argument("--local-teacher", action="store_true", help="use a local model as the teacher (no API key)")
    build.add_argument("--quant", choices=QUANT_CHOICES, default="4bit", help="with --local-teacher (default 4bit)")
    train = command_parser(commands, "train", "train a QLoRA adapter on a dataset and write a run folder")
    add_model_options(train)
    train.add_argument("--dataset", default=None,
                       help="JSONL dataset (studio, Alpaca or chat-messages rows); not needed with --resume")
    train.add_argument("--output", default=None, help="run folder (default: runs/<dataset>_<timestamp>)")
    train.add_argument("--preset", default="tutorial", choices=sorted(PRESETS), help="training preset (default tutorial)")
    train.add_argument("--epochs", type=float, default=None, help="passes over the data (preset: 4)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps")
    train.add_argument("--lr", type=float, default=None, help="learning rate (preset: 1e-3)")
    train.add_argument("--batch-size", type=int, default=None, help="sequences per forward pass (preset: 1)")
    train.add_argument("--grad-accum", type=int, default=None, help="forward passes per optimizer step (preset: 8)")
    train.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (preset: 50; 0 = never)")
    train.add_argument("--early-stop", type=int, default=None, metavar="N",
                       help="stop when the held-out eval loss (once an epoch) has not improved for N evaluations in a "
                            "row, and keep the adapter of the best one (default 0: off)")
    train.add_argument("--compile-layers", action="store_true",
                       help="torch.compile the decoder layers (GPU): about 1.7x the steps/s after a compile at the start "
                            "of the run (1-2 min the first time on a machine, about 10 s later); for long runs")
    train.add_argument("--no-cuda-graphs", action="store_true",
                       help="train each pass eagerly, not replayed from CUDA graphs (the fast preset uses them)")
    train.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16; alpha is 2 x r)")
    train.add_argument("--targets", default="all",
                       help="all (the seven projections), peft-default (q_proj,v_proj for qwen2) or a comma list")
    train.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system prompt stored with the adapter")
    train.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue a stopped run from its last checkpoint")
    train.add_argument("--document", default=None, metavar="FILE",
                       help="also train on this document's sections, one row per section, mixed with the Q/A rows")
    train.add_argument("--exam", default=None, metavar="FILE",
                       help="the exam for this run (default: the one built with the dataset, if any); "
                            "exam rows are never trained on")
    compare = command_parser(commands, "compare", "score base, retrieval and an adapter on questions; write a report")
    add_model_options(compare)
    compare.add_argument("--adapter", required=True, help="run folder of the adapter (from train)")
    source = compare.add_mutually_exclusive_group()
    source.add_argument("--questions", default=None, help="JSONL of instruction/output rows to ask")
    source.add_argument("--heldout", action="store_true",
                        help="ask the run's held-out phrasings (default: its exam when it has one, else these)")
    compare.add_argument("--doc", default=None, help="source document for the retrieval column (default: the run's)")
    compare.add_argument("--no-retrieval", action="store_true", help="leave the retrieval column out")
    compare.add_argument("--out", default=None, help="write the report to FILE.json or FILE.csv")
    compare.add_argument("--max-new-tokens", type=int, default=256, help="longest answer (default 256)")
    compare.add_argument("--sampling", action="store_true", help="the tutorial's sampling instead of greedy decoding")
    compare.add_argument("--judge-base-url", default=None, help="OpenAI-compatible endpoint of an LLM judge")
    compare.add_argument("--judge-model", default=None, help="judge model id")
    compare.add_argument("--judge-api-key-env", default=None, help="environment variable with the judge's key")
    add_export_command(commands)
    add_serve_command(commands)
    return parser


def add_export_command(commands) -> None:
    export = command_parser(commands, "export", "write an adapter (or a merged bf16 model) for vLLM, Ollama or "
                                                "plain transformers, with ready commands")
    export.add_argument("--model", default=None,
                        help="the adapter's base: hub id, local folder or modelscope:ID (default: the base recorded "
                             "in the run's studio.json)")
    export.add_argument("--adapter", required=True, metavar="RUN_DIR", help="run folder of the adapter (from train)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write (must be empty or new)")
    export.add_argument("--merge", action="store_true",
                        help="merge the adapter into a bf16 copy of the base (safetensors + tokenizer + Modelfile)")
    export.add_argument("--name", default=None, help="model name in the printed commands (default: the run's name)")


def add_serve_command(commands) -> None:
    serve = command_parser(commands, "serve", "serve the base model and adapters over an OpenAI-compatible API")
    add_model_options(serve)
    serve.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_DIR",
                       help="attach an adapter under a model name (repeatable); a request's model picks it")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key-env", dest="serve_key_env", metavar="VAR", default=None,
                       help="require `Authorization: Bearer <key>` with the key held in this environment variable")


UI_ONLY_HINT = "it applies to the UI only"
ALWAYS_HONOURED = {"workdir", "lang"}  # concern every command


def parse_command_line(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse like build_parser().parse_args, but options given before a command reach the command.

    argparse lets a command's own defaults overwrite values given before the command; here every
    default is held back during parsing and filled in afterwards, so `studio.py --model DIR chat`
    chats with DIR. An option before a command that the command does not use is refused by name.
    """
    parser = build_parser()
    sub_parsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    top_defaults = _hold_back_defaults(parser)
    sub_defaults = {name: _hold_back_defaults(sub) for name, sub in sub_parsers.items()}
    args = parser.parse_args(argv)
    given = set(vars(args)) - {"command"}
    command = args.command
    if command is not None:
        own = set(sub_defaults[command])
        ignored = sorted(given & set(top_defaults) - own - ALWAYS_HONOURED - _extra_globals(command))
        if ignored:
            options = ", ".join(_option_name(parser, dest) for dest in ignored)
            parser.error(f"{options} given before the {command} command does nothing for it ({UI_ONLY_HINT} or "
                         f"to other commands). Remove it, or see: studio.py {command} --help")
    for dest, value in {**top_defaults, **(sub_defaults.get(command) or {})}.items():
        if dest not in given:
            setattr(args, dest, value)
    args.given_options = given
    return args


def _extra_globals(command: str) -> set[str]:
    """Options before a command that it honours although it has no option of that name."""
    return {"build-dataset": {"model", "quant", "decode"}}.get(command, set())  # the local teacher's model


def _hold_back_defaults(parser: argparse.ArgumentParser) -> dict:
    defaults = {}
    for action in parser._actions:
        if action.dest in (argparse.SUPPRESS, "help", "command") or isinstance(action, argparse._SubParsersAction):
            continue
        defaults[action.dest] = action.default
        action.default = argparse.SUPPRESS
    return defaults


def _option_name(parser: argparse.ArgumentParser, dest: str) -> str:
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            return action.option_strings[0]
    return dest


def build_services(args: argparse.Namespace):
    from pathlib import Path

    from studio.catalog import Catalog
    from studio.config import SAMPLE_DOCUMENT
    from studio.data.teacher import key_routing
    from studio.model.manager import ModelManager
    from studio.services import Services

    paths = StudioPaths(Path(args.workdir) / "data", Path(args.workdir) / "runs") if args.workdir else StudioPaths()
    paths = paths.ensure()
    policy = AccessPolicy.full()
    if args.command is None:  # the UI; the commands below run in the owner's shell
        policy = policy_for_launch(args.share, args.host, bool(read_logins(args)), args.demo)
    keys = key_routing(getattr(args, "teacher_base_url", None), getattr(args, "api_key_env", None))
    return Services(manager=ModelManager(decode_mode=args.decode), policy=policy, paths=paths,
                    default_model=args.model, default_quant=args.quant, catalog=Catalog(paths, SAMPLE_DOCUMENT),
                    keys=keys, max_upload_mb=getattr(args, "max_upload_mb", 20.0), lang=getattr(args, "lang", "") or "")


def read_logins(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Logins from --auth, --auth-file and STUDIO_AUTH (each USER:PASSWORD; a file or the variable may hold several)."""
    from pathlib import Path

    lines = []
    if getattr(args, "auth", None):
        lines.append(("--auth", args.auth))
    if getattr(args, "auth_file", None):
        try:
            text = Path(args.auth_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise StudioError(f"--auth-file {args.auth_file}: cannot read it ({exc.strerror}).") from None
        lines += [(f"--auth-file line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    for item in os.environ.get("STUDIO_AUTH", "").replace("\n", ",").split(","):
        if item.strip():
            lines.append(("STUDIO_AUTH", item.strip()))
    logins = []
    for where, line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise StudioError(f"{where}: a login is USER:PASSWORD with both parts non-empty.")
        logins.append((user.strip(), password))
    return logins


def raise_open_file_limit(most: int = 65536) -> None:
    """Let the server hold as many connections as the system allows (up to `most`): the HTTP server has no
    timeout for a request's headers, and with the common limit of 1,024 open files about a thousand
    unfinished requests made the page unreachable for everyone else."""
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def run_ui(args: argparse.Namespace, services) -> int:
    from studio.model.loading import ModelSpec
    from studio.ui.app import build_app

    raise_open_file_limit()

    if args.attach and not args.load:
        raise StudioError("--attach needs --load: adapters are attached to the model loaded at start.")
    if args.load:
        services.manager.load(ModelSpec(args.model, args.quant), progress=load_progress_printer(args))
    if args.attach:
        from studio.serve import attach_named_adapters

        print(f"[load] attached: {', '.join(attach_named_adapters(services.manager, args.attach))}", flush=True)
    from studio.ui.launch import launch_options, share_warning

    app = build_app(services)
    warning = share_warning(services, args.share, args.host)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    api_key = check_api_flags(args)
    app.queue(default_concurrency_limit=8).launch(
        server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
        **launch_options(services, logins=read_logins(args), host=args.host, share=args.share),
    )
    if args.share and not getattr(app, "share_url", None):
        message = (f"No share link could be made (no internet, or Gradio's tunnel file could not be fetched: "
                   f"see Gradio's lines above to install it by hand). The studio runs on {app.local_url} only.")
        print(in_language(message, message_language(args)), file=sys.stderr, flush=True)
    if args.api:
        from studio.serve import mount_openai_routes

        mount_openai_routes(app.app, services, api_key=api_key)
        print(f"[api] OpenAI-compatible API at {app.local_url.rstrip('/')}/v1", flush=True)
    app.block_thread()
    return 0


def check_api_flags(args: argparse.Namespace) -> str:
    """The API's bearer key ('' = none); --api-key-env without --api is refused, not ignored."""
    from studio.serve import server_key

    if args.serve_key_env and not args.api:
        raise StudioError("--api-key-env protects the API that --api adds; add --api or drop --api-key-env.")
    if args.api and not args.serve_key_env and (args.share or read_logins(args) or not is_loopback(args.host)):
        raise StudioError("--api without --api-key-env would answer anyone who reaches this server: the API does not "
                          "go through the page's login. Add --api-key-env VAR (the bearer key clients must send).")
    return server_key(args.serve_key_env) if args.api else ""


def run_chat(args: argparse.Namespace, services) -> int:
    from studio.model.generation import GenerationSettings, build_messages
    from studio.model.loading import ModelSpec

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.repetition_penalty <= 0:
        raise StudioError("chat needs --max-new-tokens of at least 1, --temperature of 0 or more, --top-p in (0, 1] "
                          f"and --repetition-penalty above 0 (got {args.max_new_tokens}, {args.temperature:g}, "
                          f"{args.top_p:g}, {args.repetition_penalty:g}).")
    services.manager.load(ModelSpec(args.model, args.quant), progress=load_progress_printer(args))
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    shown = ""
    for reply in services.manager.stream_chat(build_messages(args.system, [], args.message), settings):
        sys.stdout.write(reply[len(shown):])
        sys.stdout.flush()
        shown = reply
    sys.stdout.write("\n")
    return 0


def message_language(args: argparse.Namespace) -> str:
    """The language of a command's messages: --lang, else the environment's (zh_CN.UTF-8 and the like: zh)."""
    import os

    if getattr(args, "lang", ""):
        return args.lang
    for name in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(name, "")
        if value:
            return "zh" if value.lower().startswith("zh") else "en"
    return "en"


def in_language(message: str, lang: str) -> str:
    """A studio message in `lang` (the UI's tables; a message they lack stays as it is)."""
    from studio.ui.i18n import translate

    return translate(message, lang) if lang != "en" else message


def load_progress_printer(args: argparse.Namespace):
    """Prints the model load's progress on stderr (downloads report their bytes here); stdout keeps the output."""
    lang = message_language(args)

    def print_load_progress(fraction: float, message: str) -> None:
        print(f"[load] {fraction:4.0%} {in_language(message, lang)}", file=sys.stderr, flush=True)

    return print_load_progress


def event_printer(args: argparse.Namespace):
    """Prints a job's log and progress messages in the command's language."""
    lang = message_language(args)

    def print_event(event: dict) -> None:
        if event["type"] in ("log", "progress") and event.get("message"):
            print(f"[{event['type']}] {in_language(event['message'], lang)}", flush=True)

    return print_event


def run_build_dataset(args: argparse.Namespace, services) -> int:
    from pathlib import Path

    from studio.data.builder import BuildSettings
    from studio.data.documents import SplitSettings
    from studio.data.service import start_build
    from studio.data.teacher import RetryPolicy
    from studio.jobs import JobStatus, follow
    from studio.model.loading import ModelSpec

    paths = services.paths
    if args.out_dir:
        paths = StudioPaths(Path(args.out_dir), paths.runs_dir).ensure()
    settings = BuildSettings(per_section=args.per_section, variants=args.variants, concurrency=args.concurrency,
                             retry=RetryPolicy(args.attempts), split=SplitSettings(min_chars=args.min_chars),
                             style=args.style, exam=max(0, args.exam))
    teacher = None if args.local_teacher else remote_teacher(args)  # the options first, then the document
    print_build_cost(args, settings)
    if args.local_teacher:
        services.manager.load(ModelSpec(args.teacher_model or args.model, args.quant), progress=load_progress_printer(args))
    job = start_build(services.jobs, services.manager, paths, args.doc, settings, teacher, args.name)
    follow(job, event_printer(args))
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    if job.cancelled:
        return 130
    return 0 if job.result.get("rows") else 1


def remote_teacher(args: argparse.Namespace):
    """The teacher behind --teacher-base-url and --teacher-model; refuses options meant for a local teacher."""
    from studio.data.teacher import TeacherConfig
    from studio.secrets import key_from_env

    local_only = sorted({"model", "quant", "decode"} & set(getattr(args, "given_options", ())))
    if local_only:
        raise StudioError(f"--{', --'.join(local_only)} before build-dataset set the local teacher's model; with a "
                          "remote teacher give --teacher-model after the command (or add --local-teacher).")
    if not args.teacher_base_url or not args.teacher_model:
        raise StudioError("build-dataset needs --teacher-base-url and --teacher-model (or --local-teacher).")
    return TeacherConfig(args.teacher_base_url, args.teacher_model, key_from_env(args.api_key_env), args.timeout)


def print_build_cost(args: argparse.Namespace, settings) -> None:
    """Check the document, the numbers and the cost before a model loads or the teacher is called."""
    from studio.data.builder import check_cost, estimate_cost, validate_settings
    from studio.data.documents import read_document

    validate_settings(settings)
    if args.timeout <= 0:
        raise StudioError(f"--timeout must be more than 0 seconds, not {args.timeout:g}.")
    if args.max_calls < 0:
        raise StudioError(f"--max-calls must be 0 (no limit) or more, not {args.max_calls}.")
    cost = estimate_cost(read_document(args.doc), settings)
    if not cost.sections:
        raise StudioError(f"No section of at least {args.min_chars} characters was found in {args.doc}. "
                          "Lower --min-chars or check the headings.")
    print(f"[log] {cost.describe()}", flush=True)
    check_cost(cost, args.max_calls)


def checked_train_request(args: argparse.Namespace, runs_dir):
    """The run to start, with its arguments, dataset or run folder checked before the model loads."""
    from pathlib import Path

    from studio.train.service import check_resumable, validate_request

    request = train_request(args, None, runs_dir)
    if args.resume:
        if args.dataset:
            print("[log] --dataset is ignored with --resume: the run continues on its own training split.", flush=True)
        check_resumable(Path(args.resume))
    validate_request(request)
    return request


def train_request(args: argparse.Namespace, loaded, runs_dir, run_dir=None):
    from dataclasses import replace
    from pathlib import Path

    from studio.train.job import RunRequest
    from studio.train.service import load_request, new_run_dir
    from studio.train.settings import ALL_PROJECTIONS, LoraSettings, peft_default_targets, preset

    if args.resume:
        return load_request(Path(args.resume))
    if not args.dataset:
        raise StudioError("train needs --dataset (a JSONL file), or --resume RUN_DIR to continue a stopped run.")
    overrides = {"epochs": args.epochs, "max_steps": args.max_steps, "learning_rate": args.lr,
                 "batch_size": args.batch_size, "grad_accum": args.grad_accum, "save_every": args.save_every,
                 "early_stop_patience": args.early_stop,
                 "compile_layers": True if args.compile_layers else None,
                 "cuda_graphs": False if args.no_cuda_graphs else None}
    settings = replace(preset(args.preset), **{k: v for k, v in overrides.items() if v is not None})
    if args.targets == "all":
        targets = ALL_PROJECTIONS
    elif args.targets == "peft-default":
        targets = peft_default_targets(loaded.model.config.model_type) if loaded is not None else ("q_proj", "v_proj")
    else:
        targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    lora = LoraSettings(r=args.lora_r, alpha=2 * args.lora_r, targets=targets)
    run_dir = run_dir or (Path(args.output) if args.output else new_run_dir(runs_dir, Path(args.dataset).stem))
    return RunRequest(Path(args.dataset), args.system, lora, settings, run_dir,
                      document=Path(args.document) if args.document else None,
                      exam=Path(args.exam) if args.exam else None)


def print_estimate(loaded, request) -> None:
    from studio.train.memory import estimate_for_dataset, free_gpu_gib

    try:
        estimate = estimate_for_dataset(loaded, request.dataset, request.system_prompt, request.train, request.lora)
    except StudioError:
        return  # the job reports the dataset problem
    print("[log] " + estimate.describe(free_gpu_gib()), flush=True)


def run_train(args: argparse.Namespace, services) -> int:
    from studio.model.loading import ModelSpec
    from studio.train.service import start_training

    request = checked_train_request(args, services.paths.runs_dir)
    services.manager.load(ModelSpec(args.model, args.quant), progress=load_progress_printer(args))
    loaded = services.manager.require_loaded()
    if args.targets == "peft-default" and not args.resume:
        request = train_request(args, loaded, services.paths.runs_dir, run_dir=request.run_dir)
    print_estimate(loaded, request)
    return follow_training(start_training(services.jobs, services.manager, request), request, args)


def follow_training(job, request, args: argparse.Namespace) -> int:
    """Print a training job's progress until it ends; raise its error if it failed."""
    from studio.jobs import JobStatus, follow

    print(f"[log] run folder: {request.run_dir}", flush=True)
    follow(job, event_printer(args))
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    if job.result:
        print(f"[done] {job.result.get('status')}: adapter in {job.result.get('run_dir')}", flush=True)
    return 130 if job.cancelled else 0


def run_compare(args: argparse.Namespace, services) -> int:
    from pathlib import Path

    from studio.data.records import read_dataset
    from studio.data.documents import read_document
    from studio.data.teacher import TeacherConfig
    from studio.evaluate.report import format_table, write_report
    from studio.evaluate.service import default_questions, run_questions, source_document, start_report
    from studio.jobs import JobStatus, follow
    from studio.model.generation import GenerationSettings
    from studio.model.loading import ModelSpec
    from studio.secrets import key_from_env
    from studio.train.adapters import require_adapter_files

    folder = Path(args.adapter)
    require_adapter_files(folder)  # every input is checked before the model loads
    questions = read_dataset(args.questions) if args.questions else None
    if args.heldout:
        questions = run_questions(folder, "heldout.jsonl")
    if questions is None and not default_questions(folder)[0]:
        raise StudioError(f"{folder.name} has no exam or held-out rows to ask: give --questions FILE.jsonl "
                          "(instruction/output rows).")
    document = None if args.no_retrieval else (args.doc or source_document(folder))
    if document:
        read_document(document)
    if args.max_new_tokens < 1:
        raise StudioError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}.")
    services.manager.load(ModelSpec(args.model, args.quant), progress=load_progress_printer(args))
    settings = (GenerationSettings.tutorial_sampling if args.sampling else GenerationSettings.greedy)(args.max_new_tokens)
    judge = None
    if args.judge_base_url:
        if not args.judge_model:
            raise StudioError("--judge-base-url needs --judge-model.")
        judge = TeacherConfig(args.judge_base_url, args.judge_model, key_from_env(args.judge_api_key_env))
    job = start_report(services.jobs, services.manager, folder, questions, document, settings, judge,
                       question_set="heldout" if args.heldout else "uploaded")
    follow(job, event_printer(args))
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    if job.cancelled:
        return 130
    print(format_table(job.result))
    if args.out:
        print(f"[log] report written to {write_report(job.result, Path(args.out))}")
    return 0


def run_export(args: argparse.Namespace, services) -> int:
    from pathlib import Path

    from studio.export import ExportRequest, start_export
    from studio.jobs import JobStatus, follow

    lang = message_language(args)
    request = ExportRequest(Path(args.adapter), Path(args.out), args.merge, args.model, args.name,
                            wording=lambda line: in_language(line, lang))
    job = start_export(services.jobs, request)
    follow(job, event_printer(args))
    if job.status is JobStatus.FAILED:
        raise StudioError(job.error)
    if job.cancelled:
        return 130
    print(job.result["instructions"], flush=True)
    return 0


def run_serve(args: argparse.Namespace, services) -> int:
    from studio.model.loading import ModelSpec
    from studio.serve import attach_named_adapters, create_api_app, run_server, server_key

    raise_open_file_limit()
    key = server_key(args.serve_key_env)
    if not key and not is_loopback(args.host):
        raise StudioError(f"serve --host {args.host} without --api-key-env would answer anyone who reaches this "
                          "machine. Add --api-key-env VAR (the bearer key clients must send), or serve on 127.0.0.1.")
    services.manager.load(ModelSpec(args.model, args.quant), progress=load_progress_printer(args))
    names = attach_named_adapters(services.manager, args.adapter)
    app = create_api_app(services, api_key=key, local_only=is_loopback(args.host))
    print(f"[serve] OpenAI-compatible API on http://{args.host}:{args.port}/v1 ; models: "
          f"{', '.join([args.model, *names])}" + ("; bearer key required" if key else ""), flush=True)
    run_server(app, args.host, args.port)
    return 0


COMMANDS = {None: run_ui, "compare": run_compare, "chat": run_chat, "build-dataset": run_build_dataset, "train": run_train,
            "export": run_export, "serve": run_serve}


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    try:
        services = build_services(args)
        return COMMANDS[args.command](args, services)
    except StudioError as exc:
        lang = message_language(args)
        print(f"{'错误：' if lang == 'zh' else 'error: '}{in_language(str(exc), lang)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
