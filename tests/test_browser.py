"""A real Chromium drives the studio: load the tiny model, ask a question, see the streamed answer."""

from __future__ import annotations

import shutil

import pytest

from studio.model.manager import ModelManager
from studio.services import Services
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


def test_chat_in_a_real_browser(page, workspace, tiny_model_dir, tmp_path):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        page.goto(url)
        page.get_by_role("tab", name="Baseline Chat").click()
        model_box = page.get_by_label("Base model (hub id or local folder)")
        model_box.fill(str(tiny_model_dir))
        model_box.press("Enter")
        page.get_by_role("button", name="Load", exact=True).click()
        page.get_by_text(f"Loaded {tiny_model_dir} (4bit) on cpu.").wait_for()
        assert services.manager.is_loaded
        page.get_by_label("Message").fill("我该怎么成为守灯人？")
        page.get_by_role("button", name="Send").click()
        page.locator(".message.bot, [data-testid='bot']").first.wait_for()
        page.wait_for_function("() => !document.querySelector('.generating')", timeout=60_000)
        preview = page.locator("#prompt-preview textarea").input_value()
        assert "<|im_start|>user\n我该怎么成为守灯人？<|im_end|>" in preview
        page.screenshot(path="/tmp/chat.png", full_page=True)
        page.get_by_text("Ready: ").wait_for()
