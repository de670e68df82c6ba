"""Bad input, as a new user gives it: every case ends with a clear message, the right exit code, no traceback.

Each case runs the command line in process (`studio.main([...])`), a few as real subprocesses. Cases
marked `before_load` must be refused before any model is loaded (and, for training, before a run folder
is made). The README's "Reliability" section lists these cases.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import studio as _studio_package  # noqa: F401  (the package; the CLI module is loaded below)
from fake_teacher import Behaviour, FakeTeacher

ROOT = Path(__file__).resolve().parent.parent
GOOD_ROW = {"instruction": "雾灯岛的通用货币是什么？", "output": "灯贝。"}
DOC = "# 小岛\n\n" + "\n\n".join(f"## 第{i}节\n" + f"第{i}节的事实：灯塔{i}号在岛的{i}号码头旁。" * 6 for i in range(3))


def load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("studio_cli", ROOT / "studio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_cli()


@dataclass
class Ctx:
    tmp: Path
    model: Path
    other_base: Path
    trained_run: Path
    teacher: FakeTeacher

    def file(self, name: str, content: str | bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        return str(path)

    def rows(self, name: str, *lines: str) -> str:
        return self.file(name, "\n".join(lines) + "\n")

    def doc(self) -> str:
        return self.file("doc.md", DOC)

    def build(self, *extra: str, doc: str | None = None) -> list[str]:
        return ["--workdir", str(self.tmp), "build-dataset", "--doc", doc or self.doc(), "--base-url",
                self.teacher.base_url, "--model", "teacher-x", "--attempts", "1", "--variants", "1", *extra]

    def train(self, *extra: str, dataset: str | None = None) -> list[str]:
        dataset = dataset or self.rows("good.jsonl", *[json.dumps(GOOD_ROW, ensure_ascii=False)] * 3)
        return ["--workdir", str(self.tmp), "train", "--model", str(self.model), "--dataset", dataset, *extra]

    def compare(self, adapter: str, *extra: str, model: Path | None = None) -> list[str]:
        return ["--workdir", str(self.tmp), "compare", "--model", str(model or self.model), "--adapter", adapter,
                "--no-retrieval", *extra]

    def chat(self, model: str, *extra: str) -> list[str]:
        return ["chat", "--model", model, "--message", "hi", *extra]

    def model_copy(self, name: str, damage: Callable[[Path], None]) -> str:
        folder = self.tmp / name
        shutil.copytree(self.model, folder)
        damage(folder)
        return str(folder)

    def script(self, *behaviours: Behaviour) -> None:
        self.teacher.script = deque(behaviours)


@dataclass
class Case:
    id: str
    area: str
    argv: Callable[[Ctx], list[str]]
    words: tuple[str, ...]
    code: int = 2
    before_load: bool = True


def no_template(folder: Path) -> None:
    for path in folder.glob("chat_template*"):
        path.unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def killed_run(c: Ctx) -> str:
    run = c.tmp / "runs" / "killed"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "run.json").write_text("{}", encoding="utf-8")
    return str(run)


def run_copy(c: Ctx, damage: Callable[[Path], None]) -> str:
    target = c.tmp / "runs" / "copy"
    shutil.copytree(c.trained_run, target)
    damage(target)
    return str(target)


def stopped(run: Path) -> None:
    """Make a finished run's copy read as one stopped before its end (so that it may resume)."""
    meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
    (run / "studio.json").write_text(json.dumps({**meta, "status": "stopped at step 1"}), encoding="utf-8")


def huge_doc(c: Ctx) -> str:
    return c.file("huge.md", "## 长\n\n" + "".join(f"第{i}号灯塔在第{i}号码头旁边。" for i in range(40_000)))


def many(kind: str, status: int = 200) -> list[Behaviour]:
    return [Behaviour(kind, status)] * 40


CASES = [
    # ----- documents (build-dataset) -----
    Case("doc-missing", "documents", lambda c: c.build(doc=str(c.tmp / "nope.md")), ("Document not found", "nope.md")),
    Case("doc-directory", "documents", lambda c: c.build(doc=str(c.tmp)), ("is a directory, not a document",)),
    Case("doc-empty", "documents", lambda c: c.build(doc=c.file("empty.md", "  \n")), ("empty.md is empty",)),
    Case("doc-binary", "documents", lambda c: c.build(doc=c.file("img.md", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 20)),
         ("img.md looks like a binary file",)),
    Case("doc-cp1252-ambiguous", "documents", lambda c: c.build(doc=c.file("k.md", "Köln".encode("cp1252"))),
         ("k.md is not UTF-8", "gb18030", "save it as UTF-8")),
    Case("doc-cp1252-french", "documents", lambda c: c.build(doc=c.file("fr.md", (
        "Le garçon était très fâché, il a mangé un gâteau à la crème. Où est la forêt?\n" * 3).encode("cp1252"))),
         ("fr.md is not UTF-8", "cp1252", "cp1250")),
    Case("doc-undecodable", "documents", lambda c: c.build(doc=c.file("x.md", bytes([0x80, 0x81, 0xFF, 0xFE, 0x90]) * 50)),
         ("x.md is not valid text", "UTF-8")),
    Case("doc-no-sections", "documents", lambda c: c.build(doc=c.file("short.md", "## 甲\n太短。")),
         ("No section of at least 100 characters", "--min-chars")),
    Case("doc-huge-paragraph", "documents", lambda c: c.build(doc=huge_doc(c)),
         ("would make", "teacher calls", "--max-calls", "characters long")),
    # ----- teacher replies -----
    Case("teacher-html", "teacher", lambda c: (c.script(*many("html")), c.build())[1],
         ("not_json: the endpoint answered HTML", "ends in /v1"), before_load=False),
    Case("teacher-401", "teacher", lambda c: (c.script(*many("status", 401)), c.build())[1],
         ("Nothing was written", "http_401"), before_load=False),
    Case("teacher-wrong-schema", "teacher", lambda c: (c.script(*many("wrong_schema")), c.build())[1],
         ("Nothing was written", "wrong_schema: 3"), before_load=False),
    Case("teacher-empty", "teacher", lambda c: (c.script(*many("empty")), c.build())[1],
         ("Nothing was written", "empty: 3"), before_load=False),
    Case("teacher-unreachable", "teacher", lambda c: c.build()[:-8] + ["--base-url", "http://127.0.0.1:9/v1", "--model",
                                                                        "t", "--attempts", "1", "--variants", "1"],
         ("Nothing was written", "connection"), before_load=False),
    Case("teacher-no-url", "teacher", lambda c: ["--workdir", str(c.tmp), "build-dataset", "--doc", c.doc()],
         ("needs --teacher-base-url and --teacher-model",)),
    # ----- build arguments -----
    Case("build-attempts-0", "arguments", lambda c: c.build("--attempts", "0"), ("Attempts per teacher call must be at least 1, not 0",)),
    Case("build-variants-negative", "arguments", lambda c: c.build("--variants", "-2"), ("Rephrasings per question", "--variants")),
    Case("build-concurrency-0", "arguments", lambda c: c.build("--concurrency", "0"), ("Teacher calls in flight", "--concurrency")),
    Case("build-per-section-word", "arguments", lambda c: c.build("--per-section", "many"), ("a number or 'auto'", "--per-section")),
    Case("build-timeout-0", "arguments", lambda c: c.build("--timeout", "0"), ("--timeout must be more than 0",)),
    Case("build-max-calls-negative", "arguments", lambda c: c.build("--max-calls", "-1"), ("--max-calls must be 0",)),
    Case("build-min-chars-negative", "arguments", lambda c: c.build("--min-chars", "-5"), ("section", "-5")),
    # ----- datasets (train) -----
    Case("data-missing", "datasets", lambda c: c.train(dataset=str(c.tmp / "none.jsonl")), ("Dataset not found", "none.jsonl")),
    Case("data-directory", "datasets", lambda c: c.train(dataset=str(c.tmp)), ("is a directory, not a dataset",)),
    Case("data-empty", "datasets", lambda c: c.train(dataset=c.file("e.jsonl", "")), ("e.jsonl is empty",)),
    Case("data-bad-json", "datasets", lambda c: c.train(dataset=c.rows("b.jsonl", json.dumps(GOOD_ROW), '{"instruction": ')),
         ("b.jsonl, line 2: not valid JSON",)),
    Case("data-output-int", "datasets", lambda c: c.train(dataset=c.rows("i.jsonl", '{"instruction": "q", "output": 42}')),
         ("i.jsonl, line 1", "\"output\" has the wrong type: int", "quotes")),
    Case("data-output-missing", "datasets", lambda c: c.train(dataset=c.rows("m.jsonl", '{"instruction": "q", "answer": "a"}')),
         ("m.jsonl, line 1: missing the field \"output\"", "\"answer\"")),
    Case("data-output-blank", "datasets", lambda c: c.train(dataset=c.rows("w.jsonl", '{"instruction": "q", "output": "  "}')),
         ("w.jsonl, line 1: the field \"output\" is empty",)),
    Case("data-not-object", "datasets", lambda c: c.train(dataset=c.rows("l.jsonl", json.dumps(GOOD_ROW), '"just text"')),
         ("l.jsonl, line 2: expected a JSON object, got str",)),
    Case("data-messages-no-answer", "datasets", lambda c: c.train(dataset=c.rows(
        "c.jsonl", '{"messages": [{"role": "user", "content": "q"}]}')), ("c.jsonl, line 1", "needs a user turn followed by an assistant turn")),
    Case("data-json-array-broken", "datasets", lambda c: c.train(dataset=c.file("a.json", '[{"instruction": "q",')),
         ("a.json: not valid JSON",)),
    Case("data-system-not-text", "datasets", lambda c: c.train(dataset=c.rows(
        "s.jsonl", '{"instruction": "q", "output": "a", "system": 5}')),
         ("s.jsonl, line 1", 'the field "system" has the wrong type: int')),
    Case("data-messages-image-part", "datasets", lambda c: c.train(dataset=c.rows("p.jsonl", json.dumps({"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "a"}]}))), ("p.jsonl, line 1", "parts that are not text (image_url)")),
    # ----- train arguments -----
    Case("train-max-steps-0", "arguments", lambda c: c.train("--max-steps", "0"), ("--max-steps must be at least 1, not 0",)),
    Case("train-epochs-0", "arguments", lambda c: c.train("--epochs", "0"), ("--epochs must be more than 0",)),
    Case("train-lr-0", "arguments", lambda c: c.train("--lr", "0"), ("--lr must be more than 0",)),
    Case("train-batch-0", "arguments", lambda c: c.train("--batch-size", "0"), ("--batch-size must be at least 1",)),
    Case("train-grad-accum-0", "arguments", lambda c: c.train("--grad-accum", "0"), ("--grad-accum must be at least 1",)),
    Case("train-save-every-negative", "arguments", lambda c: c.train("--save-every", "-1"), ("--save-every must be 0",)),
    Case("train-lora-r-0", "arguments", lambda c: c.train("--lora-r", "0"), ("--lora-r must be at least 1",)),
    Case("train-targets-empty", "arguments", lambda c: c.train("--targets", ","), ("--targets names no layer",)),
    Case("train-no-dataset", "arguments", lambda c: ["--workdir", str(c.tmp), "train", "--model", str(c.model)],
         ("train needs --dataset", "--resume")),
    Case("train-quant-unknown", "arguments", lambda c: c.train("--quant", "3bit"), ("invalid choice: '3bit'",)),
    Case("train-output-not-empty", "arguments", lambda c: c.train("--output", run_copy(c, lambda r: None)),
         ("already exists and is not empty", "--resume", "nothing was overwritten")),
    Case("resume-not-a-run", "arguments", lambda c: ["--workdir", str(c.tmp), "train", "--model", str(c.model),
                                                     "--resume", str(c.tmp)], ("is not a studio run folder",)),
    Case("resume-no-checkpoint", "arguments", lambda c: ["--workdir", str(c.tmp), "train", "--model", str(c.model),
                                                         "--resume", run_copy(c, lambda r: shutil.rmtree(r / "checkpoints"))],
         ("has no complete checkpoint to resume from",)),
    Case("resume-finished-run", "arguments", lambda c: ["--workdir", str(c.tmp), "train", "--model", str(c.model),
                                                        "--resume", str(c.trained_run)],
         ("finished all its", "nothing to resume", "Start a new run")),
    Case("resume-other-base", "adapters", lambda c: ["--workdir", str(c.tmp), "train", "--model", str(c.other_base),
                                                     "--resume", run_copy(c, stopped)],
         ("was trained on another base", "intermediate_size 128 vs 96", "--model"), before_load=False),
    # ----- adapters (compare) -----
    Case("adapter-missing", "adapters", lambda c: c.compare(str(c.tmp / "runs" / "nothing")), ("Adapter folder not found",)),
    Case("adapter-empty", "adapters", lambda c: c.compare((c.tmp / "empty-run").mkdir() or str(c.tmp / "empty-run")),
         ("is empty: it holds no adapter",)),
    Case("adapter-a-file", "adapters", lambda c: c.compare(c.file("adapter.txt", "x")), ("is a file, not an adapter folder",)),
    Case("adapter-killed-run", "adapters", lambda c: c.compare(killed_run(c)), ("did not finish", "train --resume")),
    Case("adapter-config-damaged", "adapters", lambda c: c.compare(run_copy(
        c, lambda r: (r / "adapter_config.json").write_text('{"r": 1', encoding="utf-8"))), ("adapter_config.json is damaged",)),
    Case("adapter-studio-json-damaged", "adapters", lambda c: c.compare(run_copy(
        c, lambda r: (r / "studio.json").write_text("{", encoding="utf-8"))), ("studio.json is damaged",)),
    Case("adapter-studio-json-not-object", "adapters", lambda c: c.compare(run_copy(
        c, lambda r: (r / "studio.json").write_text("[]", encoding="utf-8"))),
         ("studio.json is damaged (a JSON object is needed, it holds list)",)),
    Case("adapter-weights-damaged", "adapters", lambda c: c.compare(run_copy(
        c, lambda r: (r / "adapter_model.safetensors").write_bytes(os.urandom(4096)))),
         ("adapter_model.safetensors is damaged (not a safetensors file",)),
    Case("export-weights-cut-short", "adapters", lambda c: ["--workdir", str(c.tmp), "export", "--adapter", run_copy(
        c, lambda r: (r / "adapter_model.safetensors").write_bytes((r / "adapter_model.safetensors").read_bytes()[:-64])),
        "--out", str(c.tmp / "exported")], ("adapter_model.safetensors is damaged", "it is cut short")),
    Case("adapter-other-base", "adapters", lambda c: c.compare(str(c.trained_run), "--questions", c.rows(
        "q.jsonl", json.dumps(GOOD_ROW)), model=c.other_base),
         ("was made for another base model", "intermediate_size"), before_load=False),
    Case("compare-no-heldout", "adapters", lambda c: c.compare(str(c.trained_run)),
         ("has no exam or held-out rows", "--questions")),
    Case("compare-questions-missing", "adapters", lambda c: c.compare(str(c.trained_run), "--questions", str(c.tmp / "q.jsonl")),
         ("Dataset not found", "q.jsonl")),
    # ----- model folders (chat) -----
    Case("model-folder-missing", "model folders", lambda c: c.chat(str(c.tmp / "no-model")), ("Model folder not found",)),
    Case("model-no-config", "model folders", lambda c: c.chat(c.model_copy("nc", lambda f: (f / "config.json").unlink())),
         ("has no config.json",)),
    Case("model-config-damaged", "model folders", lambda c: c.chat(c.model_copy(
        "dc", lambda f: (f / "config.json").write_text("{", encoding="utf-8"))), ("config.json cannot be read",)),
    Case("model-no-weights", "model folders", lambda c: c.chat(c.model_copy(
        "nw", lambda f: [p.unlink() for p in f.glob("*.safetensors")])), ("has no weights",)),
    Case("model-no-template", "model folders", lambda c: c.chat(c.model_copy("nt", no_template)), ("no chat template",)),
    Case("model-hub-offline", "model folders", lambda c: c.chat("Qwen/Qwen2.5-0.5B-Instruct"),
         ("is not in the local cache", "HF_HUB_OFFLINE")),
    Case("chat-max-new-tokens-0", "arguments", lambda c: c.chat(str(c.model), "--max-new-tokens", "0"),
         ("--max-new-tokens of at least 1",)),
]


@pytest.fixture(scope="module")
def shared(tiny_model_dir, tmp_path_factory):
    """A second base of another shape, a finished tiny run, and a fake teacher, shared by the cases."""
    import torch
    from transformers import AutoConfig, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("bad-inputs")
    other = root / "other-base"
    shutil.copytree(tiny_model_dir, other)
    for path in other.glob("*.safetensors"):
        path.unlink()
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.intermediate_size = 96
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(other)
    dataset = root / "facts.jsonl"
    dataset.write_text("".join(json.dumps({"instruction": f"第{i}座灯塔在哪？", "output": f"在{i}号码头。"},
                                          ensure_ascii=False) + "\n" for i in range(8)), encoding="utf-8")
    run = root / "runs" / "trained"
    code = CLI.main(["--workdir", str(root), "train", "--model", str(tiny_model_dir), "--dataset", str(dataset),
                     "--output", str(run), "--max-steps", "2", "--save-every", "1", "--batch-size", "4",
                     "--grad-accum", "1"])
    assert code == 0
    teacher = FakeTeacher().start()
    yield other, run, teacher
    teacher.stop()


@pytest.fixture()
def ctx(shared, tiny_model_dir, tmp_path, monkeypatch):
    from studio.model.manager import ModelManager

    other, run, teacher = shared
    teacher.script.clear()
    loads = []
    original = ModelManager.load
    monkeypatch.setattr(ModelManager, "load", lambda self, spec, progress=None: (loads.append(spec),
                                                                                 original(self, spec, progress))[1])
    context = Ctx(tmp_path, tiny_model_dir, other, run, teacher)
    context.loads = loads
    return context


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = CLI.main(argv)
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_there_are_at_least_forty_cases_across_every_area():
    assert len(CASES) >= 40 and len({case.id for case in CASES}) == len(CASES)
    assert {case.area for case in CASES} == {"documents", "teacher", "arguments", "datasets", "adapters", "model folders"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_gets_a_clear_message(case, ctx, capsys):
    argv = case.argv(ctx)
    runs_before = set((ctx.tmp / "runs").glob("*")) if (ctx.tmp / "runs").exists() else set()
    code, output = run_in_process(argv, capsys)
    assert code == case.code, output
    for words in case.words:
        assert words in output, output
    assert "Traceback" not in output and "Unexpected error" not in output, output
    if case.before_load:
        assert ctx.loads == [] or case.area == "model folders", f"a model was loaded first: {output}"
        runs_after = set((ctx.tmp / "runs").glob("*")) if (ctx.tmp / "runs").exists() else set()
        assert runs_after == runs_before, "a run folder was left behind"


@pytest.mark.parametrize("case_id", ["doc-directory", "train-max-steps-0", "teacher-html"])
def test_the_same_cases_as_real_processes(case_id, ctx):
    case = next(c for c in CASES if c.id == case_id)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "studio.py"), *case.argv(ctx)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == case.code, output
    assert all(words in output for words in case.words) and "Traceback" not in output, output


def reliability_table() -> str:
    """The README's table of these cases (kept in step by test_readme_lists_every_case)."""
    lines = ["| area | case | message holds |", "|---|---|---|"]
    for case in CASES:
        words = " · ".join(w.replace("|", "\\|") for w in case.words)
        lines.append(f"| {case.area} | {case.id} | {words} |")
    return "\n".join(lines)


def test_readme_lists_every_case():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [case.id for case in CASES if f"| {case.id} |" not in readme]
    assert not missing, missing


def test_two_saves_in_one_second_keep_both_files(tmp_path, monkeypatch):
    """A name made of the second it was saved in: the second save of that second replaced the first."""
    from studio.data import records
    from studio.train.service import new_run_dir

    monkeypatch.setattr(records, "timestamp", lambda: "20261207_120000")
    first = records.save_rows([GOOD_ROW], "mine", tmp_path)
    second = records.save_rows([{**GOOD_ROW, "output": "另一个答案。"}], "mine", tmp_path)
    assert (first.name, second.name) == ("mine_edited_20261207_120000.jsonl", "mine_edited_20261207_120000-2.jsonl")
    assert [records.read_dataset(p)[0]["output"] for p in (first, second)] == ["灯贝。", "另一个答案。"]
    run = new_run_dir(tmp_path, "facts")
    run.mkdir()
    assert new_run_dir(tmp_path, "facts").name == "facts_20261207_120000-2"


def test_clearing_a_rows_instruction_in_the_preview_deletes_that_row(tmp_path):
    """The preview's hint says so; the save refused the row as missing its instruction instead."""
    import pytest

    from studio.data import records
    from studio.errors import DataError

    rows = [GOOD_ROW, {**GOOD_ROW, "instruction": "", "output": "留下的答案"}, {**GOOD_ROW, "instruction": None},
            {**GOOD_ROW, "instruction": float("nan")}, {**GOOD_ROW, "instruction": "第二问", "output": "第二答"}]
    saved = records.save_rows(rows, "edited", tmp_path)
    assert [r["instruction"] for r in records.read_dataset(saved)] == [GOOD_ROW["instruction"], "第二问"]
    with pytest.raises(DataError, match="row 2"):  # an answer cleared while its question stays: named, not dropped
        records.save_rows([GOOD_ROW, {**GOOD_ROW, "output": ""}], "edited", tmp_path)
