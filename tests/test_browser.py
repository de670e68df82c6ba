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


def test_training_progress_survives_a_reload(page, services, workspace):
    from test_training import SYSTEM, write_dataset

    from studio.train.job import RunRequest
    from studio.train.service import new_run_dir, start_training
    from studio.train.settings import LoraSettings, TrainSettings

    dataset = write_dataset(workspace.data_dir / "facts.jsonl")
    with launched(services) as url:
        request = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(learning_rate=5e-3, epochs=15.0,
                             batch_size=4, grad_accum=1, save_every=0), new_run_dir(workspace.runs_dir, "facts"))
        job = start_training(services.jobs, services.manager, request)  # started without any page open
        services.jobs.wait(job, 300)
        for _ in range(2):  # the first visit, then a reload: both replay the job's whole log
            page.goto(url)
            page.get_by_role("tab", name="Train").click()
            page.get_by_text(f"{job.name} · done · step 45/45").wait_for()
            page.wait_for_function(
                "() => document.querySelector('#train-log textarea').value.includes('ready to chat')")
            assert "15 rows: 12 for training" in page.locator("#train-log textarea").input_value()
            page.reload()
