"""The Chinese and English tables agree, the page's language is picked as promised, and the services'
real messages (errors, progress lines, status) reach a Chinese page in Chinese."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from studio.ui.i18n import (MATCH_STEPS, LabelRegistry, Template, from_accept_language, pick_language, retranslate,
                             translate, translator)
from studio.ui.strings import EN, LANGUAGES, ZH, strings
from uihelpers import handler

ROOT = Path(__file__).resolve().parent.parent
PLACEHOLDER = re.compile(r"\{(\w+)\}")
HAN = re.compile(r"[\u4e00-\u9fff]")


def test_both_tables_have_the_same_keys_and_placeholders():
    assert set(LANGUAGES) == {"en", "zh"}
    assert EN.keys() == ZH.keys()
    for section in EN:
        assert EN[section].keys() == ZH[section].keys(), section
        for key, english in EN[section].items():
            chinese = ZH[section][key]
            assert sorted(PLACEHOLDER.findall(english)) == sorted(PLACEHOLDER.findall(chinese)), f"{section}.{key}"


def test_every_chinese_text_is_chinese_unless_it_is_a_name():
    same_on_purpose = {"QLoRA Studio", "LoRA", "Top-p", "Alpha", "Dropout", "API Key", "Loss", "Language / 语言"}
    for section in ZH:
        for key, chinese in ZH[section].items():
            only_values = not re.search(r"[A-Za-z]", PLACEHOLDER.sub("", chinese))  # "{name}（{quant}，{device}）"
            if chinese not in same_on_purpose and not only_values:
                assert HAN.search(chinese), f"{section}.{key} is not translated: {chinese!r}"


def test_one_english_text_has_one_chinese_text():
    """A text shown in several places translates the same everywhere, so the page can translate by text."""
    seen: dict[str, str] = {}
    for section in EN:
        if section == "terms":
            continue
        for key, english in EN[section].items():
            chinese = ZH[section][key]
            assert seen.setdefault(english, chinese) == chinese, f"{english!r} has two translations"


def test_the_quantization_names_of_the_services_are_the_pages():
    """The status line (a service) and the load choices (the page) name a quantization alike, so one table entry
    translates both."""
    from studio.model.loading import QUANT_CHOICES, QUANT_LABELS

    assert all(QUANT_LABELS[q] == EN["chat"][f"quant_{q}"] for q in QUANT_CHOICES)


def test_strings_keeps_the_old_call_and_adds_a_language():
    assert strings("chat")["load"] == "Load"
    assert strings("chat", "zh")["load"] == "加载"
    assert strings("chat", "xx")["load"] == "Load"


@pytest.mark.parametrize("header, expected", [
    ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
    ("zh-TW", "zh"),
    ("en-US,en;q=0.9,zh-CN;q=0.8", "en"),
    ("fr-FR, zh;q=0.5, en;q=0.4", "zh"),
    ("fr-FR", None),
    ("", None),
])
def test_the_browser_language_decides_by_weight(header, expected):
    assert from_accept_language(header) == expected


def test_address_beats_flag_beats_switch_beats_browser():
    assert pick_language(accept_language="zh-CN") == "zh"
    assert pick_language(cookie="en", accept_language="zh-CN") == "en"
    assert pick_language(forced="zh", cookie="en", accept_language="en-US") == "zh"
    assert pick_language(query="en", forced="zh") == "en"
    assert pick_language(query="klingon", accept_language="de") == "en"


# ----- real messages of the services --------------------------------------------------------------
def _real_errors(tmp_path):
    from studio.access import AccessPolicy
    from studio.data.records import read_dataset
    from studio.errors import StudioError
    from studio.model.manager import ModelManager

    manager = ModelManager()
    errors = []
    lease = manager.acquire("training facts_20260101-120000", need_model=False)
    try:
        manager.acquire("generating a reply", need_model=False)
    except StudioError as exc:
        errors.append(("busy", str(exc)))
    finally:
        lease.release()
    for call, name in ((manager.require_loaded, "not loaded"),
                       (lambda: AccessPolicy.demo().require("train"), "not allowed"),
                       (lambda: read_dataset(tmp_path / "missing.jsonl"), "unknown dataset")):
        try:
            call()
        except StudioError as exc:
            errors.append((name, str(exc)))
    return dict(errors)


def test_real_errors_read_in_chinese_with_their_values_kept(tmp_path):
    errors = _real_errors(tmp_path)
    assert set(errors) == {"busy", "not loaded", "not allowed", "unknown dataset"}
    chinese = {name: translate(message, "zh") for name, message in errors.items()}
    assert chinese["busy"] == "模型正忙（正在训练 facts_20260101-120000）。请等它完成或先停止，再重试。"
    assert chinese["not loaded"] == "尚未加载模型。请先在“基线对话”页加载基座模型。"
    assert chinese["not allowed"] == "不允许：训练（此工作室以演示模式运行（共享时未设置登录），只允许对话和对比）。"
    assert chinese["unknown dataset"] == f"找不到数据集：{tmp_path / 'missing.jsonl'}"
    assert translate(errors["busy"], "en") == errors["busy"]


def test_status_progress_and_unknown_text():
    assert translate("Ready: tiny (4-bit NF4, cpu); adapters: a, b", "zh") == "就绪：tiny（4 位 NF4，cpu）；适配器：a, b"
    assert translate("Busy: comparing base and adapter for 3s. Model: m (unquantized, cuda)", "zh") == \
        "忙碌：正在对比基座与适配器，已 3 秒。模型：m（未量化，cuda）"
    # the share comes before the activity, whose own brackets would otherwise end the activity early
    assert translate("Loading /m (30%): Loading weights (4-bit NF4) on cpu", "zh") == \
        "正在加载 /m（30%）：正在加载权重（4 位 NF4），设备：cpu"
    assert translate("step 3/45 · epoch 0.20 · 2s elapsed · ETA 30s · 1200 tokens/s", "zh") == \
        "第 3/45 步 · 第 0.20 轮 · 已用 2 秒 · 预计还需 30 秒 · 1200 token/秒"
    assert translate("Training facts_1: 45 optimizer steps, resumed at step 10.", "zh") == \
        "训练 facts_1：共 45 个优化步，从第 10 步继续。"
    assert translate("雾灯岛的通用货币是灯贝。", "zh") == "雾灯岛的通用货币是灯贝。"
    assert translate("train", "zh") == "train"  # a word that only translates inside a message


def test_a_template_finds_the_values_a_lazy_match_would_and_refuses_what_does_not_fit():
    template = Template("Loaded {name} ({quant}) on {device}.")
    assert template.match("Loaded Qwen (local) (4bit) on cuda.") == \
        {"name": "Qwen", "quant": "local) (4bit", "device": "cuda"}
    assert template.match("Loaded Qwen (4bit) on cuda") is None
    twice = Template("{a} and {a}: {b}")
    assert twice.match("x and y and x and y: z") == {"a": "x and y", "b": "z"}  # found by trying further
    assert twice.match("x and y: z") is None


class _CountingText(str):
    """A message that counts how often the matcher searches it."""
    finds = 0

    def find(self, *args):
        type(self).finds += 1
        return str.find(self, *args)


def test_a_message_built_to_make_the_matcher_backtrack_costs_a_bounded_number_of_searches():
    """The page sends its shown texts back when its language changes: a text made of a template's literal
    parts, repeated, once took a backtracking regex minutes (the whole server waited)."""
    text = EN["messages"]["build_summary"]
    literals = PLACEHOLDER.split(text)[::2]
    hostile = _CountingText("".join(literals) * 26 + "Z")  # the 4 KB text that held the server 80 s
    assert Template(text).match(hostile) is None
    assert translate(str(hostile), "zh") == str(hostile)
    # where a value may hold the literal after it, the search tries further splits, a bounded number
    repeated = Template("{a}, {a}, {a}: {b}")
    hostile = _CountingText(", " * 3000 + "x: y")
    assert repeated.match(hostile) is None
    assert _CountingText.finds <= MATCH_STEPS
    assert repeated.match("p, p, p: q") == {"a": "p", "b": "q"}
    # each line of a text is matched on its own: a text of thousands of short lines cost seconds a call
    two_lines = translate("Type a question first.\nType a question first.", "zh")
    assert two_lines.count("\n") == 1 and "Type a question" not in two_lines  # a few lines: each translated
    many_lines = "\n".join(["Type a question first."] * 3000)
    assert translate(many_lines, "zh") == many_lines


def test_texts_already_on_a_page_translate_back():
    assert retranslate("已加载 /m（4 位 NF4），设备：cpu。", "en") == "Loaded /m (4-bit NF4) on cpu."
    assert retranslate("Loaded /m (8-bit) on cpu.", "zh") == "已加载 /m（8 位），设备：cpu。"


def _service_messages() -> list[tuple[str, str]]:
    """Every literal message the services raise, log or report as progress, with sample values filled in."""
    found = []
    for path in sorted((ROOT / "studio").rglob("*.py")):
        if "ui" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            name = ast.unparse(node.func)
            if name.endswith(("emit", "progress", "report")):
                message = node.args[1] if len(node.args) > 1 else None
            elif name.endswith(".log") or (name.endswith("Error") and name not in ("ValueError", "TeacherCallError")):
                message = node.args[0]
            else:
                continue
            filled = _filled(message)
            if filled and filled.strip():
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", filled))
    return found


def _filled(node) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(value.value)
            else:  # an optional suffix such as `resumed` is empty in the plain case
                parts.append("" if "resumed" in ast.unparse(value.value) else "x7")
        return "".join(parts)
    return None


def test_every_service_message_has_a_chinese_text():
    messages = _service_messages()
    assert len(messages) > 50
    untranslated = [(where, text) for where, text in messages
                    if text not in ("started",) and not HAN.search(translate(text, "zh"))]
    assert not untranslated, "add these messages to strings.py (EN and ZH):\n" + "\n".join(map(str, untranslated))


def test_every_label_of_the_page_is_in_the_tables(services):
    import gradio as gr

    from studio.ui.app import build_app

    app = build_app(services)
    known = translator().exact
    missing = []
    for block in app.blocks.values():
        for prop in ("label", "info", "placeholder"):
            value = getattr(block, prop, None)
            if isinstance(value, str) and value and value not in known and value != "loss.png":
                missing.append((type(block).__name__, prop, value))
        if isinstance(block, gr.Button) and block.value not in known:
            missing.append(("Button", "value", block.value))
    assert not missing
    registry = LabelRegistry.collect(app)
    updates = registry.updates("zh", ["Ready: tiny (4-bit NF4, cpu)"] + [""] * (len(registry.markdown) - 1))
    assert len(updates) == len(registry.outputs)
    labels = {u.get("label") for u in updates if isinstance(u, dict)}
    assert {"基座模型（Hub ID 或本地文件夹）", "基线对话", "对比"} <= labels
    assert updates[len(registry.static)] == "就绪：tiny（4 位 NF4，cpu）"
    # the training presets' dropdown: Chinese labels, the same keys
    preset_choices = [u["choices"] for u in updates if isinstance(u, dict) and
                      [value for _, value in u.get("choices") or []] == ["tutorial", "fast", "gpu24"]]
    assert len(preset_choices) == 1
    assert [label[:4] for label, _ in preset_choices[0]] == ["教程配方", "快速（大", "24 G"]
    assert all("Liger kernels" not in label and "recipe" not in label for label, _ in preset_choices[0])


def test_a_handler_answers_in_the_page_language(workspace):
    """Through the registry of a launched studio: the browser's language or the switch's cookie decides."""
    from gradio_client import Client

    from studio.model.manager import ModelManager
    from studio.services import Services
    from uihelpers import launched

    def client(url, **headers):
        return Client(url, verbose=False, headers=headers)

    with launched(Services(manager=ModelManager(), paths=workspace)) as url:
        chinese_browser = client(url, **{"Accept-Language": "zh-CN,zh;q=0.9"})
        chinese_switch = client(url, **{"Accept-Language": "en-US", "Cookie": "studio_lang=zh"})
        english = client(url, **{"Accept-Language": "en-US"})
        assert chinese_browser.predict(api_name="/unload")[0] == "模型已卸载，内存已释放。"
        assert chinese_switch.predict(api_name="/unload")[0] == "模型已卸载，内存已释放。"
        assert english.predict(api_name="/unload")[0] == "Model unloaded; its memory is freed."
        with pytest.raises(Exception, match="未指定模型：请输入 Hub ID"):  # a StudioError of the services
            chinese_switch.predict(" ", "4bit", api_name="/load")
        with pytest.raises(Exception, match="No model given"):
            english.predict(" ", "4bit", api_name="/load")
        with pytest.raises(Exception, match="模型 太长（600 个字符；最多 500 个）"):  # a refusal of the registry's argument checks
            chinese_browser.predict("m" * 600, "4bit", api_name="/load")


# ----- texts the handlers build: tables, the model card, plots, refusals ---------------------------
FAKE_REPORT = {
    "rows": [{"question": "货币是什么？", "reference": "灯贝。", "section": "货币", "best": "fine-tuned",
              "columns": {"base": {"answer": "不知道", "char_f1": 0.1, "rouge_l": 0.1},
                          "fine-tuned": {"answer": "灯贝", "char_f1": 0.9, "rouge_l": 0.8, "key_hit": 1.0}}}],
    "summary": {"base": {"char_f1": 0.1, "rouge_l": 0.1, "judge_mean": None},
                "fine-tuned": {"char_f1": 0.9, "rouge_l": 0.8, "judge_mean": None, "improved": 1, "worse": 0}},
    "sections": [{"section": "货币", "questions": 1, "base": 0, "fine-tuned": 1}],
    "files": [],
}


def test_report_and_adapter_tables_show_chinese_headers_and_keep_english_data_keys(workspace):
    from studio.evaluate.report import table_rows
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app

    services = Services(manager=ModelManager(), paths=workspace)
    services.jobs.wait(services.jobs.start("report", "report demo", lambda job: FAKE_REPORT))
    tables = handler(build_app(services), "tables")
    adapters, summary, chart, questions, sections = tables("zh")
    assert list(adapters.columns) == ["名称", "状态", "已挂载", "训练 loss", "评估 loss", "数据集", "基座", "问题说明"]
    assert list(summary.columns)[:4] == ["列", "字符 F1", "ROUGE-L 分数", "评委均分"]
    assert list(summary["列"]) == ["基座", "微调"]
    # the page's order: the scores beside the column's name, the long texts after them
    assert list(questions.columns)[:9] == ["序号", "问题", "列", "关键事实命中率", "字符 F1", "ROUGE-L 分数", "评委分", "回答",
                                          "参考答案"]
    from studio.ui.compare_tab import QUESTION_WIDTHS

    assert len(QUESTION_WIDTHS) == len(questions.columns)  # a width for each column the table shows
    assert list(questions["列"]) == ["基座", "微调"] and list(questions["最佳列"]) == ["微调", "微调"]
    assert list(questions["问题"]) == ["货币是什么？"] * 2  # the data itself is untouched
    assert list(chart["metric"]) == ["字符 F1"] * 2 and list(chart["column"]) == ["基座", "微调"]  # one bar a column
    assert list(chart["score"]) == [0.1, 0.9]
    assert list(sections.columns) == ["章节", "问题数", "基座", "微调"]
    english = tables("en")
    assert list(english[1].columns)[:3] == ["column", "character F1", "ROUGE-L"] and list(english[1]["column"]) == ["base", "fine-tuned"]
    assert list(english[0].columns)[:2] == ["name", "status"]
    assert list(table_rows(FAKE_REPORT)[0])[:4] == ["#", "question", "reference", "column"]  # CSV/JSON keys stay English


def test_plot_series_and_unexpected_errors_in_chinese(workspace):
    from studio.access import AccessPolicy
    from studio.ui.common import metric_frames
    from studio.ui.registry import Registry

    metrics = [{"step": 1, "loss": 2.0, "eval_loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.8}, {"step": 2, "loss": 1.5}]
    loss, rate, grad = metric_frames(metrics, "zh")
    assert list(loss["series"]) == ["训练 loss", "评估 loss", "训练 loss"] and list(rate["series"]) == ["学习率"]
    assert list(grad["series"]) == ["梯度范数"] and list(grad["value"]) == [0.8] and list(loss["step"]) == [1, 1, 2]
    assert list(metric_frames(metrics)[0]["series"]) == ["train loss", "eval loss", "train loss"]
    registry = Registry(AccessPolicy.demo(), catalog=None)
    assert registry._error(TypeError("bad"), "load", "zh").message == "load 失败：TypeError"
    assert registry._error(TypeError("bad"), "load", "en").message == "load failed: TypeError"


def test_every_field_name_of_a_refusal_is_in_the_tables(workspace):
    """Each argument spec's label (and each id kind) reads in Chinese inside the registry's refusals."""
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app

    app = build_app(Services(manager=ModelManager(), paths=workspace))
    names_on_purpose = {"API Key", "Top-p"}
    checked = 0
    for entry in app.studio_registry.entries:
        for spec in entry.args:
            if hasattr(spec, "label"):
                field = translate(f"{spec.label}: text is needed.", "zh").split("：")[0]
                assert HAN.search(field) or field in names_on_purpose, f"{spec.label!r} of {entry.name}"
                checked += 1
            if hasattr(spec, "kind"):
                refusal = translate(f"unknown {spec.kind.rstrip('s')} 'x': pick one from the list.", "zh")
                assert refusal.startswith("未知的") and HAN.search(refusal.split(" ")[0][3:]), refusal
    assert checked > 50


def test_card_sections_refusals_and_guard_speak_the_page_language(tiny_model_dir, workspace):
    """Through a launched studio: a Chinese browser gets Chinese card rows, table headers, field names and
    HTTP refusals; the switch's cookie decides over the browser."""
    import httpx
    from gradio_client import Client

    from studio.model.manager import ModelManager
    from studio.services import Services
    from uihelpers import launched

    manager = ModelManager()
    with launched(Services(manager=manager, paths=workspace)) as url:
        chinese = Client(url, verbose=False, headers={"Accept-Language": "zh-CN,zh;q=0.9"})
        english = Client(url, verbose=False, headers={"Accept-Language": "zh-CN", "Cookie": "studio_lang=en"})
        card = chinese.predict(str(tiny_model_dir), "4bit", api_name="/load")[1]
        assert "| 模型 |" in card and "| 量化 / 设备 | 4 位 NF4 / cpu |" in card and "| 已挂载的适配器 | 无 |" in card
        assert "Model" not in card and "none" not in card
        _, table = chinese.predict(None, "wudeng_lighthouse.md", 100, 3000, ["##", "###"], api_name="/split")
        assert table["headers"] == ["序号", "标题", "字符数", "首行"]
        assert english.predict(None, "wudeng_lighthouse.md", 100, 3000, ["##"], api_name="/split")[1]["headers"] == \
            ["#", "heading", "chars", "first line"]
        with pytest.raises(Exception, match="最短章节长度 必须在 0 到"):
            chinese.predict(None, "wudeng_lighthouse.md", -5, 3000, ["##"], api_name="/split")
        upload = url + "gradio_api/upload"
        files = {"files": ("tool.exe", b"MZ")}
        refused = httpx.post(upload, files=files, headers={"Accept-Language": "zh-CN"})
        assert refused.status_code == 415 and refused.json()["detail"].startswith("只接受 .md")
        refused = httpx.post(upload, files=files, headers={"Accept-Language": "zh-CN", "Cookie": "studio_lang=en"})
        assert refused.status_code == 415 and refused.json()["detail"].startswith("Only .md")
    manager.unload()


def test_what_the_model_wrote_is_never_translated(monkeypatch):
    """A reply that happens to equal a table text stays as the model wrote it; the studio's own texts do not."""
    from studio.access import AccessPolicy
    from studio.ui import registry as registry_module
    from studio.ui.strings import EN, ZH

    monkeypatch.setattr(registry_module, "page_language", lambda: "zh")
    registry = registry_module.Registry(AccessPolicy.full(), catalog=None)
    said = EN["chat"]["empty_message"]

    def reply():
        yield said, said

    studio_text = registry._wrap(reply, ("chat",), (), "reply", False)
    model_text = registry._wrap(reply, ("chat",), (), "reply", False, generated=True)
    assert list(studio_text()) == [(ZH["chat"]["empty_message"],) * 2]
    assert list(model_text()) == [(said, said)]


def test_the_dataset_preview_shows_chinese_headers_and_saves_the_english_fields(workspace, monkeypatch):
    import json

    import studio.ui.dataset_tab as dataset_tab
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app

    rows = [{"instruction": "货币是什么？", "output": "潮印。", "group": "g1", "source": "/docs/island.md"}]
    (workspace.data_dir / "demo.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                                   encoding="utf-8")
    app = build_app(Services(manager=ModelManager(), paths=workspace))
    monkeypatch.setattr(dataset_tab, "page_language", lambda: "zh")
    frame, _, _, source = handler(app, "open_dataset")("demo.jsonl")
    assert source == "demo.jsonl"  # the preview remembers what it shows (an exam beside it goes with a saved copy)
    assert list(frame.columns) == ["问题 instruction", "回答 output", "组 group", "类型 kind", "章节", "来源 source"]
    assert list(frame["问题 instruction"]) == ["货币是什么？"]  # the data itself is untouched
    frame.loc[0, "回答 output"] = "潮印，岛上的货币。"  # an edit on the Chinese page
    handler(app, "save")(frame, "edited")
    saved = sorted(workspace.data_dir.glob("edited_*.jsonl"))[-1]
    row = json.loads(saved.read_text(encoding="utf-8").splitlines()[0])
    assert row["instruction"] == "货币是什么？" and row["output"] == "潮印，岛上的货币。" and row["group"] == "g1"
    assert row["source"] == "/docs/island.md"  # an extra field keeps its English name in the file
    english = dataset_tab.DatasetTab.preview_in(frame, "en")  # the switch: headers change, the edit stays
    assert list(english.columns)[:2] == ["instruction", "output"] and english.loc[0, "output"] == "潮印，岛上的货币。"


def test_the_training_speed_notes_reach_a_chinese_page_in_chinese():
    """The notes the speed switches write into a training job's log, as the code writes them here."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from studio.model.kernels import apply_liger
    from studio.train import speedups

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(config)
    undo: list = []
    notes = [apply_liger(model, undo), speedups.dequantize_base(model, undo), speedups.compile_layers(model, undo),
             "Dequantized base on: 168 4-bit layers, 0.7 GiB of bf16 copies.",
             "torch.compile failed here (RuntimeError: no C compiler found); the run goes on without it."]
    for restore in reversed(undo):
        restore()
    if not torch.cuda.is_available():  # what a CPU machine writes
        assert notes[0] == "Liger kernels skipped: Liger kernels need a CUDA GPU." or "not installed" in notes[0]
        assert notes[2] == "torch.compile skipped: it is measured and used on CUDA GPUs only."
    for note in notes:
        chinese = translate(note, "zh")
        english_left = re.sub(r"RuntimeError|Liger|liger-kernel|torch\.compile|bf16|GiB|4-bit|bitsandbytes|C compiler|"
                              r"no|found|CUDA|GPU", "", chinese)
        assert HAN.search(chinese) and not re.search(r"[A-Za-z]{3,}", english_left), (note, chinese)


def test_the_report_question_set_keeps_its_value_on_a_chinese_page(workspace, monkeypatch):
    """The handler that picks the default question set returned the radio's English label, which the Chinese
    page's translation of outputs turned into a value the radio did not have: the report then failed."""
    import studio.ui.registry as registry
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app
    from studio.ui.strings import strings

    app = build_app(Services(manager=ModelManager(), paths=workspace))
    monkeypatch.setattr(registry, "handler_language", lambda request=None: "zh")
    _, source = handler(app, "pick_exam")(None)
    radio = next(b for b in app.blocks.values() if getattr(b, "label", None) == strings("compare")["report_source"])
    assert [value for _, value in radio.choices] == ["exam", "heldout", "upload"]
    assert source["value"] == "heldout" and radio.value == "heldout"


def test_the_template_guard_and_the_split_read_in_chinese():
    from studio.train.formatting import GUARD_WORDS, guard_html
    from studio.ui.i18n import translate
    from studio.ui.strings import strings

    guard = {"matches": True, "supervised_tokens": 14, "total_tokens": 59, "prompt_part": "<|im_start|>user\n问",
             "supervised_text": "答", "training_text": "<|im_start|>user\n问答", "inference_prompt": "<|im_start|>user\n问"}
    words = strings("train", "zh")
    chinese = guard_html(guard, {key: words[key] for key in GUARD_WORDS})
    assert "训练提示与推理提示完全一致" in chinese and "loss 只算 59 个 token 中的 14 个" in chinese
    assert "训练字符串" in chinese and "推理提示" in chinese and "Training string" not in chinese
    assert "✅ the training prompt is exactly the inference prompt" in guard_html(guard)  # English by default
    split = f"**{strings('train')['split']}:** 675 rows → 630 for training, 45 held out (45 groups)."
    assert translate(split, "zh") == "**划分：** 共 675 行 → 630 行用于训练，45 行留出（45 组）。"


def test_a_failed_teacher_test_says_what_to_check_in_the_page_language():
    """'connection: Connection error.' alone told a user nothing to do."""
    from studio.data.teacher import OpenAITeacher, TeacherCallError, TeacherConfig, check_connection
    from studio.ui.i18n import translate
    from uihelpers import free_port

    teacher = OpenAITeacher(TeacherConfig(f"http://127.0.0.1:{free_port()}/v1", "m", "k", 5))
    with pytest.raises(TeacherCallError) as caught:
        check_connection(teacher)
    message = str(caught.value)
    assert caught.value.reason == "connection" and message.endswith("Check the base URL and that the server is running "
                                                                   "(local servers answer under /v1).")
    assert message.startswith(f"Could not connect to m @ {teacher.config.base_url}. ")
    assert translate(message, "zh") == (f"无法连接到 m @ {teacher.config.base_url}。请检查 base URL 以及服务是否在运行"
                                        "（本地服务的地址以 /v1 结尾）。")  # no English left in it


@pytest.mark.parametrize("exam, cancelled", [(False, False), (True, False), (False, True), (True, True)])
def test_the_build_summary_reads_in_chinese_with_and_without_an_exam_or_a_cancel(exam, cancelled):
    """The summary's optional sentences (an exam, a cancel) each had to be in a template: with an exam it was
    English on a Chinese page."""
    from studio.data.builder import BuildResult

    result = BuildResult(sections=19, base_pairs=45, rows=675, calls=83, failures={"timeout": 2},
                         exam_questions=38, exam_path="/d/exam.jsonl" if exam else "", cancelled=cancelled)
    shown = translate(result.summary(), "zh")
    assert shown.startswith("19 个章节 -> 45 个基础问答 -> 写出 675 行。") and "timeout: 2" in shown
    assert ("测试题：38 道，从不用于训练。" in shown) == exam and shown.endswith("已取消：结果不完整。") == cancelled
    assert not re.search(r"\b(Exam|questions|Cancelled|partial)\b", shown), shown


def test_report_warnings_key_note_and_adapter_status_read_in_chinese(workspace):
    """Two recitation warnings (joined, no template matched them) and the no-keys note; a run's status word."""
    import json

    from studio.evaluate.knowledge import NO_KEYS_NOTE
    from studio.evaluate.report import recitation_warnings
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app

    warnings = recitation_warnings({"training": 0.9, "heldout": 0.3, "exam": 0.05})
    assert len(warnings) == 2
    report = {**FAKE_REPORT, "warning": " ".join(warnings), "warnings": warnings, "keys_note": NO_KEYS_NOTE}
    for name, status in (("done_run", "completed"), ("stopped_run", "stopped at step 5")):
        (workspace.runs_dir / name).mkdir()
        (workspace.runs_dir / name / "studio.json").write_text(json.dumps({"status": status}), encoding="utf-8")
    services = Services(manager=ModelManager(), paths=workspace)
    job = services.jobs.wait(services.jobs.start("report", "report demo", lambda job: report))
    tab = handler(build_app(services), "tables").__wrapped__.__self__
    shown = tab.on_report(job, "zh")[0].split("\n\n")
    assert len(shown) == 3 and all(part.startswith("⚠️ ") for part in shown[:2])
    assert all(HAN.search(part) and not re.search(r"\b(phrasings|score|keys list|Build)\b", part) for part in shown), shown
    adapters = tab.tables("zh")[0]
    assert sorted(adapters["状态"]) == ["停止于第 5 步", "已完成"]
    assert sorted(tab.tables("en")[0]["status"]) == ["completed", "stopped at step 5"]


def test_an_ended_job_panel_follows_the_language_switch():
    """The job panel of an ended job re-renders in the page's new language (its log, progress and plot series),
    where it used to keep the old language: an ended job sends no new events to poll."""
    from types import SimpleNamespace

    import gradio as gr

    from studio.jobs import JobBoard
    from studio.ui.common import job_panel

    board = JobBoard()

    def target(job):
        job.emit("metric", step=1, loss=2.0)
        return {}

    with gr.Blocks():
        panel = job_panel(board, "train", strings("train"), plots=True)
    board.wait(board.start("train", "report run-1", target), 10)  # a report job's name, as the service gives it

    def page(lang):
        return SimpleNamespace(headers={"accept-language": lang}, cookies={}, query_params={})

    first = panel.poll(None, page("en"))
    progress, log, view, _, loss = first[:5]
    assert "report run-1 · done" in progress and log.endswith("] done") and list(loss["series"]) == ["train loss"]
    view = panel.poll(view, page("en"))[2]  # the poll that marks the job finished
    quiet = panel.poll(view, page("en"))
    assert all(out.get("__type__") == "update" and "value" not in out for out in quiet[:2])  # nothing new
    progress, log, view, _, loss = panel.poll(view, page("zh-CN"))[:5]
    assert "完成" in progress and log.endswith("] 完成") and list(loss["series"]) == ["训练 loss"]
    assert "报告 run-1 · 完成" in progress
    assert panel.poll(view, page("zh-CN"))[1].get("__type__") == "update"  # and quiet again


def test_the_preset_box_names_a_preset_and_the_line_under_it_says_what_it_sets(workspace):
    """A preset's whole description was cut off in the dropdown: the box shows its short name, the line under it
    the description, in the page's language."""
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.train.settings import PRESETS
    from studio.ui.app import build_app

    app = build_app(Services(manager=ModelManager(), paths=workspace))
    box = next(block for block in app.blocks.values() if getattr(block, "label", None) == "Preset")
    assert [label for label, _ in box.choices] == ["Tutorial recipe", "Fast (large GPU)", "24 GB card"]
    assert [translate(label, "zh") for label, _ in box.choices] == ["教程配方", "快速（大显存 GPU）", "24 GB 显卡"]
    describe = handler(app, "describe_preset")
    assert describe("fast") == PRESETS["fast"][0] and translate(describe("fast"), "zh").startswith("快速（大显存 GPU）：")


def test_a_job_panel_polls_fast_only_while_its_job_has_news():
    """Each poll is an event the whole page handles: a panel whose job has ended and been shown slows to one poll
    every IDLE_POLL_S, and its message line (a job started from the page) brings the fast polls back."""
    import threading
    from types import SimpleNamespace

    import gradio as gr

    from studio.jobs import JobBoard
    from studio.ui.common import IDLE_POLL_S, job_panel

    board = JobBoard()
    with gr.Blocks():
        panel = job_panel(board, "dataset", strings("dataset"))
    request = SimpleNamespace(headers={}, cookies={}, query_params={})

    def interval(outputs):
        update = outputs[-1]
        return update.get("value") if isinstance(update, dict) and "value" in update else "unchanged"

    first = panel.poll(None, request)  # no job yet: nothing to show, so the slow pace at once
    assert interval(first) == IDLE_POLL_S and interval(panel.poll(first[2], request)) == "unchanged"
    release = threading.Event()
    job = board.start("dataset", "build facts", lambda job: (release.wait(10), {})[1])
    running = panel.poll(first[2], request)
    assert interval(running) == 1.0 and "build facts" in running[0]
    assert interval(panel.poll(running[2], request)) == "unchanged"  # still running: already fast
    release.set()
    board.wait(job, 10)
    view = running[2]
    for _ in range(3):  # the ended job's last events, then the poll that marks it finished
        outputs = panel.poll(view, request)
        view = outputs[2]
    assert view["finished"] == job.id and interval(outputs) == IDLE_POLL_S
    timer, view = panel.wake(view)  # e.g. a stop clicked with nothing running: fast for one poll, then slow again
    assert timer["value"] == 1.0 and interval(panel.poll(view, request)) == IDLE_POLL_S


def test_events_that_show_no_progress_mark_no_component_as_loading(services):
    """The page updates the loading status of every component any event has marked, on each later event, copying
    each one's state: the language switch (about 200 outputs) made every later poll cost the browser about 200
    copies. An event that shows no progress marks nothing."""
    from studio.ui.app import build_app

    dependencies = build_app(services).get_config_file()["dependencies"]
    hidden = [d for d in dependencies if d["show_progress"] == "hidden" and d["outputs"]]
    assert max(len(d["outputs"]) for d in hidden) > 150  # the relabelling is among them
    assert [d["id"] for d in hidden if d["show_progress_on"] != []] == []
    shown = [d for d in dependencies if d["show_progress"] != "hidden"]
    assert shown and all(d["show_progress_on"] is None for d in shown)  # the others mark their outputs as before


def test_the_language_switch_is_usable_once_the_load_has_set_the_language(services):
    """A pick made before the page's load answered was overwritten by it (the switch showed English, the page
    Chinese, the cookie English): the switch is drawn disabled and the load's last step enables it."""
    from studio.ui.app import build_app
    from studio.ui.i18n import LabelRegistry

    app = build_app(services)
    radio = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "language")
    assert radio.interactive is False
    at = LabelRegistry.collect(app).outputs.index(radio)
    opened = handler(app, "relabel_opened")
    for lang in ("en", "zh"):
        assert opened(lang)[at]["interactive"] is True  # English leaves the rest alone, Chinese relabels it
    assert "interactive" not in handler(app, "relabel")("zh")[at]  # a switch leaves it usable


def test_nothing_picked_is_said_so_in_the_page_language(workspace):
    """Resume with no run picked said "unknown run 'None'"; it asks for a pick, in either language."""
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.registry import BadArgument, Id

    resume = handler(Services(manager=ModelManager(), paths=workspace), "resume")
    for nothing in (None, ""):
        with pytest.raises(Exception, match=r"Pick a run from the list first\."):
            resume(nothing)
    with pytest.raises(BadArgument, match="unknown run 'nope'"):
        Id("Run", "runs").check("nope", type("Ctx", (), {"ids": lambda self, kind: []})())
    assert translate("Pick a dataset from the list first.", "zh") == "请先从列表中选择一个数据集。"


def test_a_broken_jsonl_line_is_explained_in_chinese_to_its_reason():
    """The reason came from Python's json module in English inside the Chinese sentence."""
    message = "rows.jsonl, line 3: not valid JSON (Expecting property name enclosed in double quotes, column 2)."
    assert translate(message, "zh") == "rows.jsonl 第 3 行：不是有效的 JSON（第 2 列，此处应有用双引号括起的字段名）。"
