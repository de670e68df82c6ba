#!/usr/bin/env python3
"""Screenshots of the four tabs in the Chinese UI, for the README: docs/images/{chat,dataset,train,compare}.png.

Runs offline on a CPU in about two minutes: it builds the tests' tiny Qwen2 model, starts the tests'
local OpenAI-protocol teacher, launches the studio over a scratch folder, and drives the real
Chromium (Playwright) through the tabs as a user would: load the model and ask it a question, split
the sample document and build a dataset, train a few steps, open the run from the history in
Compare and compare one preset question. The tiny model's answers are noise; the pages are real.

    python docs/screenshots.py [--out docs/images] [--chromium /usr/bin/chromium]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
SCRATCH = Path(tempfile.mkdtemp(prefix="studio-shots-"))
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "GRADIO_ANALYTICS_ENABLED": "False", "TOKENIZERS_PARALLELISM": "false",
                   "HF_HOME": str(SCRATCH / "hf"), "GRADIO_TEMP_DIR": str(SCRATCH / "gradio"), "MPLBACKEND": "Agg"}.items():
    os.environ.setdefault(key, value)

VIEWPORT = {"width": 1400, "height": 1000}
QUESTION = "我该怎么成为守灯人？"
LONG = 300_000  # ms: a build or a training run on a shared CPU


def shoot(page, out: Path, name: str) -> None:
    from PIL import Image

    page.wait_for_timeout(800)
    path = out / f"{name}.png"
    page.screenshot(path=str(path))
    Image.open(path).convert("RGB").quantize(colors=256, dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)", flush=True)


def visible(locator):
    return locator.filter(visible=True).first


def chat(page, model_dir: Path, out: Path) -> None:
    page.get_by_role("tab", name="基线对话").click()
    box = page.get_by_label("基座模型（Hub ID 或本地文件夹）")
    box.fill(str(model_dir))
    box.press("Enter")
    page.get_by_role("button", name="加载", exact=True).click()
    page.get_by_text(f"已加载 {model_dir}").wait_for(timeout=LONG)
    page.get_by_label("消息").fill(QUESTION)
    page.get_by_role("button", name="发送").click()
    page.locator(".message.bot, [data-testid='bot']").first.wait_for()
    page.wait_for_function("() => !document.querySelector('.generating')", timeout=LONG)
    shoot(page, out, "chat")


def dataset(page, teacher_url: str, out: Path) -> None:
    page.get_by_role("tab", name="数据集构建").click()
    page.get_by_text("共 19 个章节").wait_for()
    page.get_by_label("Base URL（兼容 OpenAI 接口）").fill(teacher_url)
    page.get_by_label("教师模型 ID").fill("local-teacher")
    page.get_by_label("API Key", exact=True).fill("sk-local-test")
    page.get_by_role("button", name="构建数据集").click()
    page.wait_for_function("() => document.querySelector('#dataset-log textarea').value.includes('已保存：')",
                           timeout=LONG)
    page.wait_for_timeout(2500)
    page.mouse.wheel(0, 420)
    shoot(page, out, "dataset")


def train(page, out: Path) -> None:
    page.get_by_role("tab", name="训练").click()
    page.get_by_role("button", name="刷新").filter(visible=True).first.click()
    page.wait_for_timeout(1500)
    page.get_by_label("数据集（data/ 中的 JSONL）").click()
    page.get_by_role("option").filter(has_text="_dataset_").first.click()
    page.wait_for_timeout(1500)
    page.get_by_label("最大步数（-1 = 按轮数）").fill("30")
    page.get_by_label("学习率").fill("0.005")
    page.get_by_role("button", name="开始训练").click()
    page.wait_for_function("() => document.querySelector('#train-log textarea').value.includes('可以对话')",
                           timeout=LONG)
    page.wait_for_timeout(2500)
    page.get_by_text("历史运行").filter(visible=True).click()
    page.get_by_role("button", name="刷新").filter(visible=True).last.click()
    page.wait_for_timeout(1500)
    page.locator("#train-log").scroll_into_view_if_needed()
    page.mouse.wheel(0, -250)
    shoot(page, out, "train")


def compare(page, run_name: str, out: Path) -> None:
    page.get_by_text(run_name, exact=True).filter(visible=True).last.click()  # the history's row
    selected = page.get_by_label("选中的运行").filter(visible=True).first
    if selected.input_value() != run_name:  # the click landed before the table's refresh
        selected.fill(run_name)
    visible(page.get_by_role("button", name="在对比中打开")).click()
    page.get_by_role("tab", name="对比", selected=True).wait_for()
    page.wait_for_timeout(1500)
    preset = page.get_by_label("关于示例文档的预设问题")
    preset.click()
    page.get_by_role("option", name=QUESTION).click()
    page.get_by_role("button", name="对比", exact=True).click()
    page.wait_for_function("() => !document.querySelector('.generating')", timeout=LONG)
    page.wait_for_timeout(3000)
    page.get_by_label("问题", exact=True).filter(visible=True).first.scroll_into_view_if_needed()
    page.mouse.wheel(0, -120)
    shoot(page, out, "compare")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder of the PNGs (default docs/images)")
    parser.add_argument("--chromium", default="/usr/bin/chromium", help="the Chromium to drive")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import sync_playwright

    from fake_teacher import FakeTeacher
    from studio.model.manager import ModelManager
    from studio.services import SAMPLE_DOCUMENT, Services, StudioPaths
    from tiny_qwen import build_tiny_qwen
    from uihelpers import launched

    model_dir = build_tiny_qwen(SCRATCH / "tiny-qwen", extra_text=SAMPLE_DOCUMENT.read_text(encoding="utf-8"))
    teacher = FakeTeacher().start()
    services = Services(manager=ModelManager(), paths=StudioPaths(SCRATCH / "data", SCRATCH / "runs").ensure(),
                        lang="zh")
    try:
        with launched(services) as url, sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
            page = browser.new_context(locale="zh-CN", viewport=VIEWPORT).new_page()
            page.set_default_timeout(60_000)
            page.goto(url)
            try:
                chat(page, model_dir, out)
                dataset(page, teacher.base_url, out)
                train(page, out)
                compare(page, next(services.paths.runs_dir.iterdir()).name, out)
            except Exception:
                page.screenshot(path=str(SCRATCH / "failed.png"))
                print(f"failed; the page as it was: {SCRATCH / 'failed.png'}", flush=True)
                raise
            finally:
                browser.close()
    finally:
        teacher.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
