"""The Dataset Builder tab end to end through gradio_client, and the build-dataset CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from fake_teacher import Behaviour, FakeTeacher
from studio.data.builder import DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT
from studio.data.exam import exam_beside
from studio.data.teacher import key_routing
from studio.model.manager import ModelManager
from studio.services import Services
from uihelpers import handler, launched
from conftest import SAMPLE_DOC

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-ui-key-never-on-disk-0123456789"


@pytest.fixture()
def teacher():
    server = FakeTeacher().start()
    yield server
    server.stop()


def test_build_through_the_ui(workspace, teacher, monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    services = Services(manager=ModelManager(), paths=workspace, keys=key_routing(teacher.base_url))
    with launched(services) as url:
        client = Client(url, verbose=False)
        connected = client.predict(teacher.base_url, "teacher-x", "", 5, api_name="/test_teacher")
        assert connected.startswith(f"Connected to teacher-x @ {teacher.base_url}")
        failed = client.submit("http://127.0.0.1:9/v1", "teacher-x", "", 2, api_name="/test_teacher")
        with pytest.raises(Exception, match="Could not connect to teacher-x @ http://127.0.0.1:9/v1. Check the base URL"):
            failed.result()
        assert failed.outputs()[:1] == [""]  # the earlier "Connected" is cleared, not left above the error
        message, table = client.predict(None, SAMPLE_DOC.name, 100, 3000, ["##", "###"], api_name="/split")
        assert message.startswith("19 sections") and table["data"][2][1] == "守灯人"
        started = client.predict(None, SAMPLE_DOC.name, "wudeng", 100, 3000, ["##", "###"], False, teacher.base_url,
                                 "teacher-x", "", "auto", 2, 8, DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT,
                                 0.2, 600, 3, 10, "tutorial", 1, api_name="/build_dataset")
        assert started == "Build started: wudeng."
        job = services.jobs.wait(services.jobs.latest("dataset"), 60)
        assert job.result["rows"] == 60 and job.result["base_pairs"] == 20
        assert teacher.auth_headers[-1] == f"Bearer {KEY}"  # the key came from the environment, for the owner's URL
        # a reloaded page's form shows this build's settings (never a key); a studio with no build keeps the defaults
        form = handler(services, "form_of_latest_build")()
        assert form == (SAMPLE_DOC.name, "wudeng", 100, 3000, ["##", "###"], False, teacher.base_url, "teacher-x", 10,
                        "auto", 2, 8, DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, 0.2, 600, 3, "tutorial", 1)
        fresh = handler(Services(manager=ModelManager(), paths=workspace), "form_of_latest_build")()
        assert all(value.get("__type__") == "update" and "value" not in value for value in fresh)
        frame, opened, stem = client.predict(Path(job.result["dataset_path"]).name, api_name="/open_dataset")
        assert opened.startswith("60 rows") and frame["headers"][:4] == ["instruction", "output", "group", "kind"]
        # edit: change one answer, delete one row, save as a new file
        data = frame["data"]
        data[0][1] = "改过的答案"
        data[1][0] = data[1][1] = ""
        saved, _, shown = client.predict({"headers": frame["headers"], "data": data}, "edited", api_name="/save_dataset")
        assert len(shown["data"]) == 59 and shown["data"][0][1] == "改过的答案"  # the preview shows the file as saved
        path = workspace.data_dir / saved.split(" to ")[1].split(",")[0]
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        assert len(rows) == 59 and rows[0]["output"] == "改过的答案" and rows[0]["group"] == "s00-q1"
        # the build's exam goes with the edited copy, under the name a run finds it by (it was lost before)
        exam_copy = exam_beside(path)
        assert exam_copy is not None and f"with a copy of its exam beside it ({exam_copy.name})" in saved
        assert exam_copy.read_bytes() == Path(job.result["exam_path"]).read_bytes()
        assert path.name.startswith("edited_dataset_") and exam_copy.name.startswith("edited_exam_")
        # saved again under the name the page suggests (the file's stem): no second tag or timestamp in the name
        again, _, _ = client.predict(shown, path.stem, api_name="/save_dataset")
        assert again.split(" to ")[1].split(",")[0].count("_dataset_") == 1
        config = urllib.request.urlopen(url + "config").read().decode("utf-8")
        assert KEY not in config
    written = "".join(p.read_text(encoding="utf-8", errors="replace") for p in workspace.data_dir.rglob("*") if p.is_file())
    assert KEY not in written


def test_a_costly_build_shows_its_cost_and_starts_on_a_second_click(workspace, teacher, monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    services = Services(manager=ModelManager(), paths=workspace, keys=key_routing(teacher.base_url))
    with launched(services) as url:
        client = Client(url, verbose=False)
        inputs = (None, SAMPLE_DOC.name, "costly", 100, 3000, ["##", "###"], False, teacher.base_url, "teacher-x", "",
                  "12", 2, 8, DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, 0.2, 600, 3, 10)
        first = client.predict(*inputs, api_name="/build_dataset")
        assert first.startswith("**Not started yet.** Cost before retries: 19 sections -> 247 teacher calls")
        assert teacher.hits == [] and services.jobs.latest("dataset") is None
        assert client.predict(*inputs, api_name="/build_dataset") == "Build started: costly."
        assert client.predict(api_name="/cancel_build").startswith("Cancel requested")
        services.jobs.wait(services.jobs.latest("dataset"), 60)
        assert client.predict(api_name="/cancel_build") == "No build is running."  # not "cancel requested" again


def test_import_reports_file_and_line(workspace, tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "q", "output": "a"}\n{"instruction": \n', encoding="utf-8")
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        with pytest.raises(Exception, match="broken.jsonl, line 2: not valid JSON"):
            Client(url, verbose=False).predict(handle_file(str(bad)), api_name="/import_dataset")


def test_cli_build_dataset_writes_files_and_fails_when_nothing_is_written(tmp_path, teacher):
    env = {**os.environ, "MY_TEACHER_KEY": KEY}
    base = [sys.executable, str(ROOT / "studio.py"), "build-dataset", "--doc", str(SAMPLE_DOC),
            "--out-dir", str(tmp_path / "out"), "--base-url", teacher.base_url, "--model", "teacher-x",
            "--api-key-env", "MY_TEACHER_KEY", "--variants", "2", "--per-section", "1"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "19 sections -> 19 base pairs -> 57 rows written" in ok.stdout
    assert len(list((tmp_path / "out").glob("wudeng_lighthouse_dataset_*.jsonl"))) == 1
    assert KEY not in ok.stdout + ok.stderr
    teacher.then(*[Behaviour("status", 403)] * 19)
    failed = subprocess.run(base + ["--name", "other", "--attempts", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert failed.returncode != 0
    assert "Nothing was written" in failed.stderr and "http_403: 19" in failed.stderr


def test_the_prompt_boxes_show_what_the_build_sends(workspace):
    """The facts style sends its own prompts (in the document's language); the boxes showed the tutorial's."""
    from studio.data.styles import FACTS_PAIR_PROMPT, FACTS_VARIANT_PROMPT
    from studio.ui.app import build_app

    english = workspace.data_dir / "manual.md"
    english.write_text("# Manual\n\n## Setup\n\n" + "Plug the lamp in and press the red button twice. " * 5, encoding="utf-8")
    app = build_app(Services(manager=ModelManager(), paths=workspace))
    shown = handler(app, "prompts_sent")
    tutorial = (DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT)
    assert shown(None, SAMPLE_DOC.name, "facts", *tutorial) == (FACTS_PAIR_PROMPT["zh"], FACTS_VARIANT_PROMPT["zh"])
    assert shown(None, "manual.md", "facts", *tutorial) == (FACTS_PAIR_PROMPT["en"], FACTS_VARIANT_PROMPT["en"])
    assert shown(None, "manual.md", "tutorial", FACTS_PAIR_PROMPT["zh"], FACTS_VARIANT_PROMPT["zh"]) == tutorial
    edited, kept = shown(None, SAMPLE_DOC.name, "facts", "my own prompt for {n} pairs", DEFAULT_PARAPHRASE_PROMPT)
    assert edited.get("__type__") == "update" and "value" not in edited  # the user's text stays
    assert kept == FACTS_VARIANT_PROMPT["zh"]


def test_an_uploaded_document_is_kept_for_the_build_its_runs_and_a_reloaded_page(workspace, teacher, tmp_path):
    """Uploads are deleted within the hour: a build from one keeps the document in data/, its rows name that
    file, and a reloaded page's form shows it (it showed the sample document, whose build would differ)."""
    from studio.data.records import read_dataset

    upload = tmp_path / "星砂港 手册.md"
    upload.write_text("# 星砂港\n\n## 码头\n\n" + "星砂港的码头只在涨潮时开放，渡船每天三班。" * 8 +
                      "\n\n## 集市\n\n" + "集市用贝壳币交易，每月初一开市。" * 8 + "\n", encoding="utf-8")
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        client = Client(url, verbose=False)
        started = client.predict(handle_file(str(upload)), SAMPLE_DOC.name, "starsand", 100, 3000, ["##", "###"],
                                 False, teacher.base_url, "teacher-x", "", "1", 1, 2, DEFAULT_PAIR_PROMPT,
                                 DEFAULT_PARAPHRASE_PROMPT, 0.2, 600, 3, 10, "tutorial", 0, api_name="/build_dataset")
        assert started == "Build started: starsand. The uploaded document is kept in data/ as 星砂港_手册.md."
        job = services.jobs.wait(services.jobs.latest("dataset"), 60)
        assert job.status.value == "done", job.error
    kept = workspace.data_dir / "星砂港_手册.md"
    assert kept.read_text(encoding="utf-8") == upload.read_text(encoding="utf-8")
    rows = read_dataset(job.result["dataset_path"])
    assert rows and {row["source"] for row in rows} == {str(kept.resolve())}
    assert handler(services, "form_of_latest_build")()[0] == kept.name
    # the same upload again reuses the file; another text under the same name gets a name of its own
    from studio.data.documents import keep_document

    assert keep_document(upload, workspace.data_dir) == kept
    upload.write_text("# 星砂港\n\n## 灯塔\n\n" + "灯塔的灯每夜亮到天明。" * 12 + "\n", encoding="utf-8")
    assert keep_document(upload, workspace.data_dir) == workspace.data_dir / "星砂港_手册_2.md"


def test_an_upload_with_no_section_is_named_and_not_kept(workspace, teacher, tmp_path):
    upload = tmp_path / "short.md"
    upload.write_text("# Short\n\n## One\n\nToo short to be a section.\n", encoding="utf-8")
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        with pytest.raises(Exception, match="No section of at least 100 characters was found in short.md"):
            Client(url, verbose=False).predict(handle_file(str(upload)), SAMPLE_DOC.name, "mydata", 100, 3000,
                                               ["##", "###"], False, teacher.base_url, "teacher-x", "", "1", 1, 2,
                                               DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, 0.2, 600, 3, 10,
                                               "tutorial", 0, api_name="/build_dataset")
    assert not (workspace.data_dir / "short.md").exists() and teacher.hits == []


def test_a_document_without_sections_says_how_to_get_some(workspace):
    split = handler(Services(manager=ModelManager(), paths=workspace), "split")
    message, table = split(None, SAMPLE_DOC.name, 100_000, 200_000, ["##", "###"])
    assert message == "No section of at least 100000 characters: lower the shortest section length, or give the " \
                      "document ## headings." and len(table) == 0
    message, table = split(None, SAMPLE_DOC.name, 100, 3000, ["##", "###"])
    assert message.startswith("19 sections") and len(table) == 19
