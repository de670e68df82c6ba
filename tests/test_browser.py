"""A real Chromium drives the studio: load the tiny model, ask a question, see the streamed answer."""

from __future__ import annotations

import shutil

import pytest

from studio.model.manager import ModelManager
from studio.services import Services
from fake_teacher import FakeTeacher
from uihelpers import launched

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")


@pytest.fixture()
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                      "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def wait_or_explain(page, locator, services) -> None:
    """Wait for `locator`; if it never shows, fail with what the server and the page said instead."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        locator.wait_for()
    except PlaywrightTimeout:
        raise AssertionError(f"not shown: {locator}; the model manager: {services.manager.status()}; "
                             f"the page: {page.inner_text('body')[:3000]!r}") from None


def test_chat_in_a_real_browser(page, workspace, tiny_model_dir, tmp_path):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        page.goto(url)
        page.get_by_role("tab", name="Baseline Chat").click()
        # a question before any model is loaded: refused in a message box; the question stays, usable
        message = page.get_by_role("textbox", name="Message", exact=True)
        message.fill("还没加载模型")
        page.get_by_role("button", name="Send").click()
        page.get_by_text("No model loaded").first.wait_for()
        page.wait_for_timeout(500)  # the failed event's status reaches its outputs after the message box
        message.click(timeout=5_000)  # fails while an "Error" panel covers the box and takes its clicks
        assert message.input_value() == "还没加载模型" and not page.locator(".clear-status").filter(visible=True).count()
        model_box = page.get_by_label("Base model (hub id or local folder)")
        model_box.fill(str(tiny_model_dir))
        model_box.press("Enter")
        page.get_by_role("button", name="Load", exact=True).click()
        wait_or_explain(page, page.get_by_text(f"Loaded {tiny_model_dir} (4-bit NF4) on cpu."), services)
        assert services.manager.is_loaded
        page.get_by_label("Message").fill("我该怎么成为守灯人？")
        page.get_by_role("button", name="Send").click()
        page.locator(".message.bot, [data-testid='bot']").first.wait_for()
        page.wait_for_function("() => !document.querySelector('.generating')", timeout=60_000)
        preview = page.locator("#prompt-preview textarea").input_value()
        assert "<|im_start|>user\n我该怎么成为守灯人？<|im_end|>" in preview
        # a second turn: the page sends the first back as history, in the shape its chatbot keeps
        page.get_by_role("textbox", name="Message", exact=True).fill("灯贝是什么？")
        page.get_by_role("button", name="Send").click()
        page.wait_for_function("() => document.querySelector('#prompt-preview textarea').value.includes('灯贝是什么')",
                               timeout=60_000)
        page.wait_for_function("() => !document.querySelector('.generating')", timeout=60_000)
        preview = page.locator("#prompt-preview textarea").input_value()
        assert preview.index("我该怎么成为守灯人？") < preview.index("<|im_start|>assistant") < preview.index("灯贝是什么？")
        page.get_by_text("Ready: ").wait_for()
        page.reload()  # a reloaded page shows the loaded model, not "No model loaded"
        wait_or_explain(page, page.get_by_text(f"Loaded {tiny_model_dir} (4-bit NF4) on cpu."), services)


def test_training_progress_survives_a_reload(page, services, workspace):
    from test_training import SYSTEM, write_dataset

    from studio.train.job import RunRequest
    from studio.train.service import new_run_dir, start_training
    from studio.train.settings import LoraSettings, TrainSettings

    dataset = write_dataset(workspace.data_dir / "facts.jsonl")
    with launched(services) as url:
        request = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(learning_rate=5e-3, epochs=3.0,
                             batch_size=4, grad_accum=1, save_every=0), new_run_dir(workspace.runs_dir, "facts"))
        page.goto(url)  # a page with its runs history open, made before the run: the run shows when it ends
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Runs history").filter(visible=True).first.click()
        page.get_by_text("Selected run").filter(visible=True).first.wait_for()
        job = start_training(services.jobs, services.manager, request)  # started by no page
        services.jobs.wait(job, 300)
        run_name = job.result["run_dir"].rsplit("/", 1)[-1]
        page.wait_for_function("name => [...document.querySelectorAll('tbody td')].some("  # no click on Refresh
                               "td => td.offsetParent !== null && td.textContent.trim() === name)", arg=run_name)
        for _ in range(2):  # the first visit, then a reload: both replay the job's whole log
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            page.get_by_text(f"{job.name} · done · step 9/9").wait_for()
            page.wait_for_function(
                "() => document.querySelector('#train-log textarea').value.includes('ready to chat')")
            assert "15 rows: 12 for training" in page.locator("#train-log textarea").input_value()
            # the form shows the run's settings, not the defaults (learning rate 1e-3, batch 1, 4 epochs)
            for label, value in (("Learning rate", "0.005"), ("Batch size", "4"), ("Epochs", "3")):
                number = page.get_by_role("spinbutton", name=label, exact=True)
                page.wait_for_function("([el, v]) => el.value === v", arg=[number.element_handle(), value])
            page.get_by_text(f"The settings of the last run, {run_name}; picking a preset replaces them.").wait_for()
            # a row's boxes line up although one label wraps to two lines
            boxes = [page.get_by_role("spinbutton", name=label, exact=True).bounding_box()["y"] for label in
                     ("Max length (tokens)", "Checkpoint every N steps (0 = never)", "Held-out phrasings per group")]
            assert max(boxes) - min(boxes) < 2, boxes
            page.reload()
        # the template guard follows the language switch (it kept the language it was drawn in)
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("the training prompt is exactly the inference prompt").wait_for()
        page.get_by_text("中文", exact=True).click()
        page.get_by_text("训练提示与推理提示完全一致").wait_for()
        page.reload()  # a Chinese page: the load's relabelling does not write the preset's own line over the note
        page.get_by_role("tab", name="训练").click()
        page.get_by_text(f"上次运行 {run_name} 的设置；选择预设会替换它们。").wait_for()
        page.get_by_text("English", exact=True).click()
        page.get_by_text("the training prompt is exactly the inference prompt").wait_for()
        # a dataset written and a run trained after the page was made are listed without a click on Refresh
        later = write_dataset(workspace.data_dir / "later.jsonl")
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.get_by_label("Dataset (JSONL in data/)").click()
        page.get_by_role("option", name=later.name).wait_for()
        page.keyboard.press("Escape")
        page.get_by_role("tab", name="Compare").click()
        page.get_by_label("Run / adapter").click()
        page.get_by_role("option", name=job.result["run_dir"].rsplit("/", 1)[-1]).wait_for()


@pytest.fixture()
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu",
                                                                       "--disable-background-networking"])
        yield chromium
        chromium.close()


def _page(browser, locale: str):
    page = browser.new_context(locale=locale, viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(60_000)
    return page


def _error_title_style(page) -> dict:
    """The first error message box's title as drawn: its ::before text and its own font size. Read in one pass of
    the page's script once the box is in the page: Gradio may draw a box again, and a box taken out of the page
    has no computed style (Chromium answers '' for every property)."""
    return page.wait_for_function("""() => {
        const title = document.querySelector('.toast-title.error');
        if (!title || !title.isConnected) return null;
        const drawn = getComputedStyle(title, '::before').content;
        return drawn ? {drawn, fontSize: getComputedStyle(title).fontSize} : null;
    }""").json_value()


def test_the_language_switch_relabels_the_page_and_the_server_answers_in_it(browser, workspace):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        page = _page(browser, "en-US")
        page.goto(url)
        page.get_by_role("tab", name="Baseline Chat").wait_for()
        page.get_by_text("中文", exact=True).click()
        page.get_by_role("tab", name="基线对话").wait_for()
        # each relabelled component may be drawn a moment after the tabs: wait for it (fails after the timeout)
        page.get_by_label("基座模型（Hub ID 或本地文件夹）").wait_for()
        page.get_by_role("button", name="加载", exact=True).wait_for()
        page.get_by_role("tab", name="训练").click()
        page.get_by_role("button", name="开始训练").click()  # refused by the server: no dataset
        page.get_by_text("请先选择数据集（在“数据集构建”中生成或导入一个）。").wait_for()
        # the message box is titled in Chinese: Gradio's English "Error" is hidden and "错误" drawn instead
        assert _error_title_style(page) == {"drawn": '"错误"', "fontSize": "0px"}
        page.get_by_text("尚未加载模型。").first.wait_for()  # the header's status line
        page.reload()  # the choice is remembered
        page.get_by_role("tab", name="基线对话").wait_for()
        page.get_by_text("English", exact=True).click()
        page.get_by_role("tab", name="Baseline Chat").wait_for()
        page.get_by_role("tab", name="Train").click()
        page.get_by_role("button", name="Start training").click()
        page.get_by_text("Pick a dataset first").wait_for()
        assert _error_title_style(page)["fontSize"] != "0px"


def test_a_chinese_browser_sees_chinese_first_and_lang_forces_english(browser, workspace):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        page = _page(browser, "zh-CN")
        page.goto(url)
        page.get_by_role("tab", name="基线对话").wait_for()
        page.get_by_role("tab", name="数据集构建").wait_for()  # visible in Chinese, however late the page draws it
        adapter = page.get_by_label("回答所用模型（选择适配器会带上它训练时的系统提示词）")  # no model loaded yet
        page.wait_for_function("el => el.value === '基座模型（不加适配器）'", arg=adapter.element_handle())
        page.goto(url + "?lang=en")
        page.get_by_role("tab", name="Baseline Chat").wait_for()
    forced = Services(manager=ModelManager(), paths=workspace, lang="zh")
    with launched(forced) as url:
        page = _page(browser, "en-US")
        page.goto(url)
        page.get_by_role("tab", name="基线对话").wait_for()


def test_a_run_of_the_history_opens_in_compare(browser, workspace):
    from test_history import REPORT, make_run

    make_run(workspace.runs_dir, "facts_20261130_101500", "completed", report=REPORT)
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        page = _page(browser, "en-US")
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Runs history").filter(visible=True).click()
        page.get_by_text("facts_20261130_101500").filter(visible=True).click()
        # the row's select event fills the history's run box; Open reads that box, so it waits for the value (not
        # any box's: Compare's run picker may hold the same name from the page's load)
        selected = page.get_by_label("Selected run").filter(visible=True)
        page.wait_for_function("el => el.value === 'facts_20261130_101500'", arg=selected.element_handle())
        page.get_by_role("button", name="Open in Compare").filter(visible=True).click()
        page.get_by_role("tab", name="Compare", selected=True).wait_for()
        page.wait_for_function("() => [...document.querySelectorAll('input')].some("
                               "i => i.value.endsWith('facts_20261130_101500'))")


def test_the_provider_box_follows_the_base_url(page, workspace, tmp_path):
    """A base URL typed by hand shows as the custom choice (the box never names a service the URL is not); a
    preset picked fills both boxes; a preset's URL typed by hand names that preset again. Before that: an
    empty document is said once, and the sample's sections and cost no longer show beside it."""
    services = Services(manager=ModelManager(), paths=workspace)
    (tmp_path / "empty.md").write_bytes(b"")
    with launched(services) as url:
        page.goto(url)
        page.get_by_role("tab", name="Dataset Builder").click()
        page.get_by_text("19 sections, ").wait_for()
        page.get_by_text("Cost before retries").wait_for()
        upload = page.locator(".block", has=page.get_by_text("Document (.md or .txt)", exact=True))
        upload.locator("input[type=file]").set_input_files(str(tmp_path / "empty.md"))
        page.get_by_text("The document could not be split (the message box says why).").wait_for()
        page.wait_for_timeout(1500)  # the cost and prompt events of the same upload have answered by now
        assert page.locator(".toast-title.error").count() == 1  # the split's, not one per event of the upload
        assert "empty.md" in page.locator(".toast-body").first.inner_text()
        assert not page.get_by_text("19 sections, ").count() and not page.get_by_text("Cost before retries").count()
        provider, base_url = page.get_by_label("Provider preset"), page.get_by_label("Base URL (OpenAI-compatible)")
        base_url.fill("http://10.0.0.5:9000/v1")
        page.wait_for_function("el => el.value === 'Other (the base URL below)'", arg=provider.element_handle())
        provider.click()
        page.get_by_role("option", name="DeepSeek").click()
        page.wait_for_function("el => el.value === 'https://api.deepseek.com/v1'", arg=base_url.element_handle())
        page.wait_for_function("el => el.value === 'deepseek-chat'",  # the preset's model, drawn by the same reply
                               arg=page.get_by_label("Teacher model id").element_handle())
        page.get_by_label("Teacher model id").fill("qwen2.5:72b")
        teacher = FakeTeacher().start()  # a test's result goes with the teacher it tested
        try:
            base_url.fill(teacher.base_url)
            page.get_by_role("button", name="Test connection").click()
            page.get_by_text(f"Connected to qwen2.5:72b @ {teacher.base_url}").wait_for()
        finally:
            teacher.stop()
        base_url.fill("http://127.0.0.1:11434/v1/")
        page.get_by_text("Connected to qwen2.5:72b").wait_for(state="detached")
        page.wait_for_function("el => el.value === 'Ollama (local)'", arg=provider.element_handle())
        page.wait_for_timeout(1000)  # a preset's fill would land by now
        assert base_url.input_value() == "http://127.0.0.1:11434/v1/"  # the text is kept as typed,
        assert page.get_by_label("Teacher model id").input_value() == "qwen2.5:72b"  # and the model typed beside it
