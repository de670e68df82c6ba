"""Export a trained adapter for use outside the studio: the adapter alone, or merged into its base.

- Adapter alone: the PEFT folder (adapter_config.json + adapter_model.safetensors + studio.json) and a
  zip of it, for vLLM's `--enable-lora` or peft's `PeftModel.from_pretrained`.
- Merged: the base loaded again in bf16 on the CPU from its original weights (never the studio's 4-bit
  copy, whose weights are rounded to NF4), the adapter merged into it, saved as safetensors with the
  tokenizer and its chat template, plus an Ollama Modelfile. Plain transformers loads it.

Both refuse an adapter made for another base (the fingerprint in studio.json) before writing anything.
The export runs as a job: it never touches the model the studio has loaded, so it needs no lease. It
works from a copy of the adapter's files taken when it starts (the run may be renamed or deleted while
a merge runs), writes into a hidden staging folder and renames it into place only when everything is
written: a failed, stopped or killed export leaves no half-written folder. A merge first checks that
the bf16 base fits in the free memory and its output on the disk, and refuses with both figures if not.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from studio.errors import AdapterError, StudioError
from studio.jobs import Job, JobBoard
from studio.train import adapters

JOB_KIND = "export"
ADAPTER_FILES = (adapters.CONFIG_FILE, adapters.WEIGHTS_FILE, adapters.METADATA_FILE)
MODELFILE = "Modelfile"
INSTRUCTIONS_FILE = "HOW_TO_USE.txt"

# Qwen2.5's ChatML in Ollama's template language (as Ollama's own qwen2.5 template, without tools).
OLLAMA_QWEN25_TEMPLATE = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 -}}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and (ne .Role "assistant") $last }}<|im_start|>assistant
{{ end }}
{{- end }}"""


@dataclass
class ExportRequest:
    """What to export and where."""

    adapter_dir: Path = field(metadata={"help": "Run folder of the adapter (from train)."})
    out_dir: Path = field(metadata={"help": "Folder to write; must be new or empty."})
    merge: bool = field(default=False, metadata={"help": "Merge into a bf16 copy of the base."})
    base: str | None = field(default=None, metadata={"help": "Base hub id / folder; default: the run's recorded base."})
    name: str | None = field(default=None, metadata={"help": "Model name in the printed commands."})
    wording: Callable[[str], str] | None = field(default=None, metadata={
        "help": "Puts each line of the instructions (HOW_TO_USE.txt, the result's text) in the user's language; "
                "None: English. Commands and paths stay as they are."})

    def __post_init__(self) -> None:
        self.adapter_dir, self.out_dir = Path(self.adapter_dir), Path(self.out_dir)


def export_folder(exports_dir: Path, run_name: str, merge: bool) -> Path:
    """A new folder for one export of a run: exports/<run>-adapter|merged-<timestamp> (-2, -3... when taken)."""
    from studio.data.records import stamped

    return stamped(Path(exports_dir) / f"{run_name}-{'merged' if merge else 'adapter'}-{{stamp}}", make=False)[0]


def shown_files(result: dict) -> list[str]:
    """The files worth offering for download: the zip, the Modelfile and the instructions, not the weights."""
    keep = (".zip", MODELFILE, INSTRUCTIONS_FILE)
    return [f for f in result.get("files", []) if f.endswith(keep)] + [str(Path(result["out_dir"]) / INSTRUCTIONS_FILE)]


def start_export(board: JobBoard, request: ExportRequest) -> Job:
    """Check the request at once (clear refusals), then export in a job."""
    metadata = _check_request(request)
    return board.start(JOB_KIND, f"export {request.adapter_dir.name}", lambda job: run_export(job, request, metadata))


def _check_request(request: ExportRequest) -> dict:
    folder = request.adapter_dir
    adapters.require_adapter_files(folder)  # complete, and neither file damaged
    metadata = adapters.read_metadata(folder)
    if not request.base and not metadata.get("base_model"):
        raise StudioError(f"{folder} does not record its base model; give it with --model.")
    out = request.out_dir
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StudioError(f"{out} already exists and is not empty; choose a new folder (nothing was overwritten).")
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise StudioError(f"Export into a folder outside the run ({folder}), not inside it.")
    return metadata


def run_export(job: Job, request: ExportRequest, metadata: dict) -> dict:
    from studio.model.loading import resolve_source

    base = request.base or metadata["base_model"]
    job.log(f"Base model: {base}")
    source = resolve_source(base, lambda fraction, message: job.emit("progress", message, done=fraction, total=1))
    check_fingerprint(request.adapter_dir, source, metadata)
    job.check_cancelled()
    name = request.name or request.adapter_dir.name
    out_dir = request.out_dir
    staging = staging_folder(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        snapshot = _snapshot(request.adapter_dir, staging / ".adapter")
        if request.merge:
            try:
                files = export_merged(job, source, snapshot, staging, metadata)
            except AdapterError as exc:  # name the user's folder, not the hidden copy merged from
                raise AdapterError(str(exc).replace(str(snapshot), str(request.adapter_dir))) from None
            text = merged_instructions(out_dir, name)
        else:
            files = export_adapter(snapshot, staging, base, run_name=request.adapter_dir.name)
            text = adapter_instructions(out_dir, base, name, metadata)
        if request.wording is not None:
            text = "\n".join(request.wording(line) for line in text.split("\n"))
        shutil.rmtree(staging / ".adapter")
        (staging / INSTRUCTIONS_FILE).write_text(text + "\n", encoding="utf-8")
        job.check_cancelled()
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [str(out_dir / Path(f).relative_to(staging)) for f in files if Path(f).name != ".adapter"]
    job.log(f"Exported to {out_dir}")
    return {"out_dir": str(out_dir), "merged": request.merge, "files": files, "instructions": text}


def staging_folder(out_dir: Path) -> Path:
    """Where an export into `out_dir` is written before it is renamed into place (hidden, beside it)."""
    return out_dir.with_name(f".{out_dir.name}.incomplete")


def _snapshot(adapter_dir: Path, into: Path) -> Path:
    """Copy the adapter's files (config, weights, studio.json) into `into`; the export reads only these."""
    into.mkdir(parents=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, into / name)
    if not (into / adapters.WEIGHTS_FILE).is_file():
        raise AdapterError(f"{adapter_dir} is not a complete adapter: {adapters.WEIGHTS_FILE} is missing.")
    return into


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Flush the staged files to disk, then rename the folder to `out_dir` (an empty one is replaced)."""
    from studio.data.records import fsync_folder

    fsync_folder(staging)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    if out_dir.exists():
        raise StudioError(f"{out_dir} already exists and is not empty; choose a new folder (nothing was overwritten).")
    os.replace(staging, out_dir)


def check_fingerprint(adapter_dir: Path, base_source: str, metadata: dict) -> None:
    """Refuse an adapter whose recorded base architecture differs from `base_source`'s config."""
    from transformers import AutoConfig

    expected = metadata.get("base_fingerprint")
    if not expected:
        return
    config = AutoConfig.from_pretrained(base_source)
    actual = {key: getattr(config, key, None) for key in adapters.FINGERPRINT_KEYS}
    if expected != actual:
        differences = ", ".join(f"{k} {expected.get(k)} vs {actual.get(k)}" for k in adapters.FINGERPRINT_KEYS
                                if expected.get(k) != actual.get(k))
        raise AdapterError(f"The adapter in {adapter_dir} was made for another base model "
                           f"({metadata.get('base_model', 'unknown')}): {differences}. Export it with that base.")


# ----- the adapter alone ---------------------------------------------------------------------------
def export_adapter(adapter_dir: Path, out_dir: Path, base: str, run_name: str | None = None) -> list[str]:
    """Copy the PEFT files (the config pointing at `base`) and zip them; returns the written files.
    `run_name` names the zip and its folder inside (default: the adapter folder's name)."""
    run_name = run_name or adapter_dir.name
    folder = out_dir / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ADAPTER_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, folder / name)
    config = json.loads((folder / adapters.CONFIG_FILE).read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base  # a hub id here lets peft and vLLM find the base anywhere
    (folder / adapters.CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    archive = out_dir / f"{run_name}-adapter.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(folder.iterdir()):
            zipped.write(path, f"{run_name}/{path.name}")
    return [str(p) for p in sorted(folder.iterdir())] + [str(archive)]


def adapter_instructions(out_dir: Path, base: str, name: str, metadata: dict) -> str:
    folder = (out_dir / "adapter").resolve()
    archive = next(iter(sorted(out_dir.glob("*.zip"))), None)
    rank = int((metadata.get("lora") or {}).get("r") or 16)
    system = metadata.get("system_prompt", "")
    lines = [
        f"Adapter exported to {folder}" + (f" (zip to download: {archive.resolve()})" if archive else ""),
        "",
        "Serve it with vLLM (the base plus this adapter under its own model name):",
        f"  vllm serve {shlex.quote(base)} --enable-lora --lora-modules {shlex.quote(f'{name}={folder}')} "
        f"--max-lora-rank {max(rank, 8)}",
        f"  then ask for model {name!r} at http://127.0.0.1:8000/v1/chat/completions",
        "Load it with transformers + peft:",
        f"  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(folder)!r})",
        "Ollama cannot load a Qwen2 LoRA adapter by itself: for Ollama, export again merged (the Compare tab's "
        "merge box, or --merge on the command line).",
    ]
    if system:
        lines.append(f"The adapter was trained with this system prompt; send it as the system message: {system}")
    return "\n".join(lines)


# ----- merged into the base ------------------------------------------------------------------------
def export_merged(job: Job, base_source: str, adapter_dir: Path, out_dir: Path, metadata: dict) -> list[str]:
    """Load the base in bf16 on the CPU, merge the adapter, save safetensors + tokenizer + Modelfile."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from studio.model.loading import load_tokenizer

    check_room_for_merge(base_source, out_dir)
    job.log("Loading the base in bf16 on the CPU (its original weights, not a 4-bit copy)")
    job.emit("progress", "loading the base in bf16", done=1, total=4)
    base = AutoModelForCausalLM.from_pretrained(base_source, dtype=torch.bfloat16, device_map="cpu")
    tokenizer = load_tokenizer(base_source)
    job.check_cancelled()
    job.emit("progress", "merging the adapter", done=2, total=4)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:
        raise AdapterError(f"Could not apply {adapter_dir} to the base: {exc.__class__.__name__}: {str(exc)[:300]}") from None
    merged = model.merge_and_unload()
    merged.to(torch.bfloat16)
    job.check_cancelled()
    job.emit("progress", "writing safetensors", done=3, total=4)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / MODELFILE).write_text(ollama_modelfile(metadata.get("system_prompt", "")), encoding="utf-8")
    job.emit("progress", "done", done=4, total=4)
    return [str(p) for p in sorted(out_dir.iterdir()) if p.name != ".adapter"]


MERGE_HEADROOM = 1.25  # the merge holds the bf16 base plus peft's copies of the layers it is merging


def check_room_for_merge(base_source: str, out_dir: Path) -> None:
    """Refuse a merge whose bf16 base would not fit in the free memory, or its output on the disk."""
    needed = bf16_bytes(base_source)
    if not needed:
        return
    free_memory = available_memory()
    if free_memory is not None and needed * MERGE_HEADROOM > free_memory:
        raise StudioError(f"Merging needs about {needed * MERGE_HEADROOM / 2**30:.1f} GiB of free memory for the "
                          f"base in bf16 on the CPU; {free_memory / 2**30:.1f} GiB is free. Close other programs, or "
                          "export the adapter alone.")
    existing = next((folder for folder in (out_dir, *out_dir.parents) if folder.exists()), None)
    free_disk = shutil.disk_usage(existing).free if existing else None
    if free_disk is not None and needed > free_disk:
        raise StudioError(f"The merged model needs about {needed / 2**30:.1f} GiB on the disk; "
                          f"{free_disk / 2**30:.1f} GiB is free where it would be written ({out_dir}).")


def bf16_bytes(base_source: str) -> int:
    """The size of a local model's weights in bf16 (2 bytes a parameter), from its safetensors headers;
    0 when it cannot be read (not a local folder, other weight files)."""
    from safetensors import safe_open

    folder = Path(base_source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    total = 0
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as weights:
                for key in weights.keys():
                    shape = weights.get_slice(key).get_shape()
                    count = 1
                    for size in shape:
                        count *= size
                    total += 2 * count
        except Exception:  # an unreadable file: no estimate rather than a wrong one
            return 0
    return total


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def ollama_modelfile(system_prompt: str) -> str:
    """An Ollama Modelfile for the merged folder it sits in, with Qwen2.5's chat template."""
    lines = ["FROM .", f'TEMPLATE """{OLLAMA_QWEN25_TEMPLATE}"""']
    if system_prompt:
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += ['PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"']
    return "\n".join(lines) + "\n"


def ollama_tag(name: str) -> str:
    """A model name Ollama accepts (lowercase ASCII letters, digits, '.', '-', '_'), made from a run's name,
    which is often Chinese: '雾灯岛-长跑_20261207_134435' -> 'studio-20261207_134435'."""
    tag = re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9._-]+", "-", name.lower())).strip("-._")
    return tag if re.search(r"[a-z]", tag) else f"studio-{tag}".rstrip("-")


def merged_instructions(out_dir: Path, name: str) -> str:
    folder = out_dir.resolve()
    tag = ollama_tag(name)
    return "\n".join([
        f"Merged bf16 model exported to {folder} (safetensors, tokenizer, chat template, Modelfile)",
        "",
        "Serve it with vLLM:",
        f"  vllm serve {shlex.quote(str(folder))} --served-model-name {shlex.quote(name)}",
        "Import it into Ollama (the Modelfile beside the weights holds Qwen2.5's chat template and the system prompt):",
        f"  cd {shlex.quote(str(folder))} && ollama create {tag} -f {MODELFILE} && ollama run {tag}",
        "Load it with plain transformers:",
        f"  AutoModelForCausalLM.from_pretrained({str(folder)!r}); AutoTokenizer.from_pretrained({str(folder)!r})",
    ])
