"""Safe sharing, end to end: demo mode, ids instead of paths, key routing, login throttle, uploads.

Each test launches the real studio page (tests/uihelpers.py, the same launch options as studio.py)
and talks to it as a stranger would: gradio_client, or raw HTTP by fn_index for hidden events.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from gradio_client import Client

from conftest import SAMPLE_DOC
from fake_teacher import FakeTeacher
from studio.access import ACTIONS, DEMO_ACTIONS, AccessPolicy, policy_for_launch
from studio.catalog import Catalog, UnknownItem
from studio.config import PROJECT_ROOT, StudioPaths
from studio.data.documents import SplitSettings, _cut_long, _hard_wrap
from studio.data.teacher import TeacherConfig, key_routing
from studio.errors import DataError, PermissionDenied
from studio.evaluate import service as evaluate
from studio.jobs import JobBoard, JobStatus
from studio.model.generation import GenerationSettings
from studio.model.loading import ModelSpec
from studio.model.manager import ModelManager
from studio.services import Services
from studio.train.job import RunRequest
from studio.train.service import new_run_dir, start_training
from studio.train.settings import LoraSettings, TrainSettings
from studio.ui.guard import StudioGuard
from studio.ui.launch import launch_options
from studio.ui.registry import BadArgument, History
from test_training import FAST, SYSTEM, write_dataset
from uihelpers import handler, launched

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-server-env-key-0123456789abcdef"
TYPED = "sk-typed-in-the-page-987654321"
PASSWD_LINE = "root:x:0:0"


@pytest.fixture()
def capture():
    """A capture server on 127.0.0.1 that records every Authorization header it receives."""
    server = FakeTeacher().start()
    yield server
    server.stop()


# ----- a studio with an attached adapter, a second run, a private file outside ---------------------
@pytest.fixture(scope="module")
def studio(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    paths = StudioPaths(root / "work" / "data", root / "work" / "runs").ensure()
    dataset = write_dataset(paths.data_dir / "facts.jsonl", source=str(SAMPLE_DOC))
    manager = ModelManager()
    manager.load(ModelSpec(str(tiny_model_dir)))
    board = JobBoard()
    request = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(**{**FAST, "max_steps": 2}),
                         new_run_dir(paths.runs_dir, "shown"))
    job = board.wait(start_training(board, manager, request), 300)
    assert job.status is JobStatus.DONE, job.error
    run = Path(job.result["run_dir"])
    evaluate.attach_run(manager, run)  # the owner attaches this one
    hidden = paths.runs_dir / "not_attached_run"
    shutil.copytree(run, hidden)
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text('{"instruction": "TOPSECRET", "output": "TOPSECRET"}\n', encoding="utf-8")
    yield {"root": root, "paths": paths, "manager": manager, "run": run, "hidden": hidden, "outside": outside,
           "model": tiny_model_dir}
    manager.unload()


def _snapshot(*folders: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime) for folder in folders for p in folder.rglob("*")
            if "__pycache__" not in p.parts and p.name != "events.jsonl"}


def call_by_index(url: str, fn_index: int, data: list, timeout: float = 120, http: httpx.Client | None = None) -> dict:
    """Call one event by fn_index over raw HTTP, as the browser does; returns the final message. Many calls share
    one `http` client: each new one builds a TLS context, which took a third of a long walk's time here."""
    if http is None:
        with httpx.Client() as own:
            return call_by_index(url, fn_index, data, timeout, own)
    session = uuid.uuid4().hex[:12]
    joined = http.post(url + "gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                            "event_data": None, "trigger_id": None}, timeout=30)
    if joined.status_code != 200:
        return {"msg": "refused", "status": joined.status_code, "text": joined.text}
    with http.stream("GET", url + f"gradio_api/queue/data?session_hash={session}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") in ("process_completed", "unexpected_error"):
                    return message
    return {"msg": "no reply"}


def test_demo_mode_walks_every_endpoint_with_hostile_arguments(studio, capture):
    services = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo(),
                        default_model=str(studio["model"]))
    manager = studio["manager"]
    before_files = _snapshot(studio["root"])
    before_status = manager.status()
    hostile = ["/etc/passwd", "../../../../etc/passwd", str(studio["outside"] / "secret.jsonl"),
               capture.base_url, 0, -1, 10**12, -10**12, None, "x" * 200_000]
    with launched(services) as url:
        config = httpx.get(url + "config").json()
        registry = services.registry
        # one place registers everything: each backend event of the page is one registry entry
        backend = [d for d in config["dependencies"] if d.get("backend_fn")]
        registered = [e for e in registry.entries if e.registered]
        assert len(backend) == len(registered)
        assert all(set(e.actions) <= DEMO_ACTIONS for e in registered)
        refused = {e.name for e in registry.entries if not e.registered}
        assert not {"load", "split", "open_dataset", "build_dataset", "test_teacher", "start_training", "attach_adapter",
                    "delete_adapter", "run_report", "import_dataset", "save_dataset",
                    "estimate_memory"} & {e.name for e in registered}
        assert {"load", "attach_adapter", "delete_adapter", "run_report"} <= refused  # Chat's and Compare's own
        assert {d["api_name"] for d in backend if d["api_visibility"] == "public"} == {"chat", "stop", "compare"}
        defaults = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
        # the shortest reply the sliders allow: the walk is about arguments, and each of the page's 256-token
        # replies costs the tiny model over a second here (chat's walk alone took 51 s)
        defaults.update({c["id"]: 16 for c in config["components"] if c.get("props", {}).get("label") == "Max new tokens"})

        def walk(dep) -> list[str]:
            inputs = [defaults.get(i) for i in dep["inputs"]]
            attempts = [[value] * len(inputs) for value in hostile]
            attempts += [inputs[:i] + [value] + inputs[i + 1:] for i in range(len(inputs))
                         for value in ("/etc/passwd", 10**12, -1)]
            replies = []
            for data in attempts:
                reply = call_by_index(url, dep["id"], data, http=http)
                assert reply["msg"] in ("process_completed", "refused"), (dep["api_name"], reply)
                replies.append(json.dumps(reply, ensure_ascii=False))
            return replies

        # the endpoints side by side, as several visitors would call them (one after another took 90 s here)
        with ThreadPoolExecutor(max_workers=6) as pool, httpx.Client() as http:
            replies = [reply for replies in pool.map(walk, backend) for reply in replies]
        # the server still answers, and still chats
        assert httpx.get(url + "config").status_code == 200
        client = Client(url, verbose=False)
        history, _, _ = client.predict("你好", [], SYSTEM, "", 16, 0.0, 1.0, 1.0, api_name="/chat")
        assert history[-1]["role"] == "assistant"
    text = "\n".join(replies)
    assert PASSWD_LINE not in text and "TOPSECRET" not in text
    # Gradio's own refusals echo a hostile argument; the studio's folders and the model folder never show
    assert str(studio["root"] / "work") not in text and str(PROJECT_ROOT) not in text and str(studio["model"]) not in text
    assert ("must be between" in text or "greater than maximum value" in text) and "not in the list of choices" in text
    assert capture.hits == [] and capture.auth_headers == []  # demo mode made no outbound call
    assert _snapshot(studio["root"]) == before_files  # nothing written, deleted or moved
    after = manager.status()
    assert (after.model_name, after.adapters) == (before_status.model_name, before_status.adapters)


def test_demo_compares_only_the_owners_attached_adapters(studio):
    services = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo())
    run, hidden = studio["run"].name, studio["hidden"].name
    with launched(services) as url:
        client = Client(url, verbose=False)
        base, rag, tuned, retrieved, both = client.predict("雾灯岛的通用货币是什么？", run, True, SAMPLE_DOC.name, 1, "greedy", 16,
                                                     api_name="/compare")
        assert base and tuned and rag and both and retrieved.startswith("**")
        for run_id, message in ((hidden, "unknown run"), (str(studio["run"]), "unknown run"),
                                ("/etc/passwd", "unknown run")):
            with pytest.raises(Exception, match=message):
                client.predict("q", run_id, False, SAMPLE_DOC.name, 1, "greedy", 16, api_name="/compare")
        with pytest.raises(Exception, match="must be between 1 and 1024|greater than maximum value 1024"):
            client.predict("q", run, False, SAMPLE_DOC.name, 1, "greedy", 10**9, api_name="/compare")
    assert "not_attached_run" not in studio["manager"].status().adapters


def test_demo_page_shows_no_server_path(studio):
    services = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo(),
                        default_model=str(studio["model"]))
    with launched(services) as url:
        page = httpx.get(url).text
        config = httpx.get(url + "config").text
        info = httpx.get(url + "gradio_api/info").text
    for text in (page, config, info):
        assert str(studio["root"]) not in text and str(PROJECT_ROOT) not in text and str(studio["model"]) not in text


def test_demo_page_lists_none_of_the_owners_files_runs_or_teacher_address(studio, monkeypatch):
    """The page's config carries every component's choices and value: a demo page has no Dataset or Train tab,
    its Compare tab lists the attached adapters only and a document only once their run is picked."""
    private = studio["paths"].data_dir / "private_notes.md"
    private.write_text("## 机密\n内部资料\n", encoding="utf-8")
    owner_url = "http://10.1.2.3:8000/v1"
    try:
        services = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo(),
                            keys=key_routing(owner_url))
        with launched(services) as url:
            config = httpx.get(url + "config").text
            client = Client(url, verbose=False)
            _, rag, _, retrieved, _ = client.predict("雾灯岛的通用货币是什么？", studio["run"].name, True,
                                                     SAMPLE_DOC.name, 1, "greedy", 16, api_name="/compare")
            # a refusal reads the same whether the owner has such a run or document or not
            refusals = []
            for run_id, document in (("not_attached_run", SAMPLE_DOC.name), ("no_such_run", SAMPLE_DOC.name),
                                     (studio["run"].name, "private_notes.md"), (studio["run"].name, "nope.md")):
                with pytest.raises(Exception) as refused:
                    client.predict("q", run_id, True, document, 1, "greedy", 16, api_name="/compare")
                refusals.append(str(refused.value).replace(run_id, "X").replace(document, "Y"))
        assert refusals[0] == refusals[1] and refusals[2] == refusals[3], refusals
        assert "unknown run 'X'" in refusals[0] and "unknown document 'Y'" in refusals[2]
        full = Services(manager=studio["manager"], paths=studio["paths"], keys=key_routing(owner_url))
        with launched(full) as url:
            owner_config = httpx.get(url + "config").text
    finally:
        private.unlink()
    for secret in ("private_notes", "facts.jsonl", "not_attached_run", owner_url):
        assert secret in owner_config  # the owner's own page shows them: the check below can fail
        assert secret not in config, secret
    assert studio["run"].name in config and rag and retrieved.startswith("**")


def test_a_hostile_chat_history_is_refused_before_the_model_is_touched(studio):
    services = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo())
    turn = [{"role": "user", "content": [{"type": "text", "text": "雾灯岛" * 1000}]},
            {"role": "assistant", "content": [{"type": "text", "text": "灯贝"}]}]
    with launched(services) as url:
        chat = next(d["id"] for d in httpx.get(url + "config").json()["dependencies"] if d.get("api_name") == "chat")
        busy_before = studio["manager"].status().state
        replies = {
            "long": call_by_index(url, chat, ["hi", turn * 40, "s", "", 16, 0, 1, 1]),
            "many": call_by_index(url, chat, ["hi", turn[1:] * 201, "s", "", 16, 0, 1, 1]),
            "role": call_by_index(url, chat, ["hi", [{"role": "system", "content": "x"}], "s", "", 16, 0, 1, 1]),
        }
        big = httpx.post(url + "gradio_api/queue/join", content=b"{" + b" " * (3 * 2**20) + b"}",
                         headers={"content-type": "application/json"}, timeout=60)
        # 2 MB of empty message parts: Gradio's own shape check of them held the server for 30 s
        parts = call_by_index(url, chat, ["hi", [{"role": "user", "content": [{}] * 100_000}], "s", "", 16, 0, 1, 1])
        client = Client(url, verbose=False)
        history, _, _ = client.predict("你好", turn, "s", "", 16, 0.0, 1.0, 1.0, api_name="/chat")
    assert "Chat history is too long (" in json.dumps(replies["long"]) and "at most 100,000)" in json.dumps(replies["long"])
    assert "holds 201 messages; at most 200" in json.dumps(replies["many"])
    assert replies["role"].get("success") is False  # Gradio's own check or the studio's, below
    with pytest.raises(BadArgument, match="role must be user or assistant"):
        History("Chat history").check([{"role": "system", "content": "x"}], None)
    assert big.status_code == 413 and "larger than 2 MB" in big.text
    assert parts["status"] == 413 and "more than 20,000 values" in parts["text"]
    assert history[-1]["role"] == "assistant" and busy_before == studio["manager"].status().state


def test_two_content_type_headers_are_refused(workspace):
    """The guard checked an upload's file type on one Content-Type header while Gradio stored the file by the other."""
    inner = (b"--B1\r\nContent-Disposition: form-data; name=\"files\"; filename=\"evil.html\"\r\n\r\n<b>x</b>\r\n--B1--\r\n")
    headers = [("content-type", "multipart/form-data; boundary=B1"), ("content-type", "multipart/form-data; boundary=B2")]
    with launched(Services(manager=ModelManager(), paths=workspace)) as url:
        reply = httpx.post(url + "gradio_api/upload", content=inner, headers=httpx.Headers(headers))
        one = httpx.post(url + "gradio_api/upload", content=inner, headers={"content-type": headers[0][1]})
    assert reply.status_code == 400 and "more than one content-type header" in reply.text
    assert one.status_code == 415  # the same body with one header: refused for its type, as before


def test_a_local_studio_refuses_what_another_sites_page_makes_the_browser_send(workspace, tmp_path):
    """DNS rebinding (a page's own name resolving to 127.0.0.1) read the owner's datasets through the default
    loopback studio, which has no login; a page on another local origin could call it across origins."""
    (workspace.data_dir / "owner_facts.jsonl").write_text('{"instruction": "q", "output": "OWNERSECRET"}\n', "utf-8")
    with launched(Services(manager=ModelManager(), paths=workspace)) as url:
        port = url.rstrip("/").rsplit(":", 1)[1]
        rebound = httpx.get(url + "config", headers={"host": f"rebind.attacker.example:{port}"})
        rebound_zh = httpx.get(url + "config", headers={"host": "evil.example", "accept-language": "zh-CN"})
        foreign = httpx.post(url + "gradio_api/queue/join", json={}, headers={"origin": "http://localhost:3000"})
        other_port = httpx.get(url + "config", headers={"origin": "http://127.0.0.1:1"})
        own = httpx.get(url + "config", headers={"origin": url.rstrip("/")})
        by_name = httpx.get(url.replace("127.0.0.1", "localhost") + "config")
        program = httpx.get(url + "config")
        framed = httpx.get(url, headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate",
                                         "sec-fetch-dest": "iframe"})
        followed_link = httpx.get(url, headers={"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate",
                                                "sec-fetch-dest": "document"})
        no_host = _raw_reply(int(port), b"GET /config HTTP/1.0\r\n\r\n")
    assert rebound.status_code == 403 and "127.0.0.1 or localhost only, not at rebind.attacker.example" in rebound.text
    assert "OWNERSECRET" not in rebound.text and "owner_facts" not in rebound.text
    assert rebound_zh.status_code == 403 and "只在 127.0.0.1 或 localhost 上应答" in rebound_zh.json()["detail"]
    assert foreign.status_code == 403 and "another site's page (http://localhost:3000)" in foreign.text
    assert other_port.status_code == 403
    assert own.status_code == by_name.status_code == program.status_code == 200 and "owner_facts" in program.text
    assert framed.status_code == 403 and followed_link.status_code == 200 and no_host.startswith(b"HTTP/1.1 403")
    assert followed_link.headers["x-frame-options"] == "SAMEORIGIN"  # no other site may frame the page
    assert "frame-ancestors 'self'" in followed_link.headers["content-security-policy"]
    guard = StudioGuard(app=None, local_only=False)  # --host or --share: a login or demo mode instead
    assert guard.local_only is False and launch_options(Services(manager=ModelManager(), paths=workspace),
                                                        host="0.0.0.0")["app_kwargs"]["middleware"][0].kwargs["local_only"] is False


def _raw_reply(port: int, request: bytes) -> bytes:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        return sock.recv(4096)


def test_a_body_that_stops_arriving_is_given_up_and_json_values_are_counted_without_parsing():
    import asyncio
    import threading

    from studio.http_body import SlowBody, body_within, json_values_over

    async def trickle():
        await asyncio.sleep(3600)

    with pytest.raises(SlowBody, match="stopped arriving"):
        asyncio.run(body_within({"headers": []}, trickle, 1000, idle_s=0.05))
    flood = b"[" + b",".join([b"[]"] * 30_000) + b"]"
    text = json.dumps({"data": ["a, b, c, " * 20_000]}).encode()  # commas inside a string are not values
    assert json_values_over(flood, 20_000) and not json_values_over(text, 20_000)
    assert json_values_over(json.dumps(list(range(20_000))).encode(), 20_000)  # 20,001 values with the list
    assert not json_values_over(json.dumps(list(range(19_999))).encode(), 20_000)
    # unclosed strings of escaped quotes: the string pattern rescanned from every quote (quadratic; a 140 KB body
    # held the event loop 28 s, this one would hold it for minutes); linear now, well within the join below
    hostile, answers = b"[" * 20_001 + b'"' + b'\\"' * 200_000, []
    counting = threading.Thread(target=lambda: answers.append(json_values_over(hostile, 20_000)), daemon=True)
    counting.start()
    counting.join(30)
    assert answers == [True]


# ----- the login -------------------------------------------------------------------------------------
def test_login_page_lists_no_endpoint_and_api_needs_login(workspace):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services, logins=[("owner", "right-pass")]) as url:
        page = httpx.get(url)
        assert page.status_code == 200 and "window.gradio_api_info = {};" in page.text
        assert "/build_dataset" not in page.text and "split" not in page.text and str(workspace.data_dir) not in page.text
        for route in ("config", "gradio_api/info", "gradio_api/queue/join"):
            assert httpx.get(url + route).status_code in (401, 405)
        with httpx.Client() as browser:
            assert browser.post(url + "login", data={"username": "owner", "password": "right-pass"}).status_code == 200
            assert "/build_dataset" in browser.get(url).text  # logged in: the full page


def test_failed_logins_are_throttled_per_client(workspace):
    from studio.ui.guard import LoginThrottle

    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services, logins=[("owner", "right-pass")], throttle=LoginThrottle(free=5, base_s=2)) as url:
        wrong = [httpx.post(url + "login", data={"username": "owner", "password": f"guess{i}"}).status_code
                 for i in range(5)]
        assert wrong == [400] * 5
        locked = httpx.post(url + "login", data={"username": "owner", "password": "right-pass"})
        assert locked.status_code == 429 and "Too many failed logins" in locked.text
        assert int(locked.headers["retry-after"]) >= 1
        time.sleep(2.2)
        assert httpx.post(url + "login", data={"username": "owner", "password": "right-pass"}).status_code == 200


def test_lock_doubles_with_each_failure():
    from studio.ui.guard import LoginThrottle

    throttle = LoginThrottle(free=5, base_s=30)
    for _ in range(4):
        throttle.failed("a", now=0)
    assert throttle.wait_s("a", now=0) == 0
    throttle.failed("a", now=0)
    assert throttle.wait_s("a", now=0) == 30 and throttle.wait_s("b", now=0) == 0
    throttle.failed("a", now=0)
    assert throttle.wait_s("a", now=0) == 60
    throttle.succeeded("a")
    assert throttle.wait_s("a", now=0) == 0


def test_logins_from_flag_file_and_environment(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import studio as _  # noqa: F401
    spec = __import__("importlib.util").util.spec_from_file_location("studio_cli", ROOT / "studio.py")
    cli = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    logins = tmp_path / "logins"
    logins.write_text("# owners\nann:pa:ss\nbob:secret\n", encoding="utf-8")
    monkeypatch.setenv("STUDIO_AUTH", "cat:meow")
    args = cli.build_parser().parse_args(["--auth", "dan:pw", "--auth-file", str(logins)])
    assert cli.read_logins(args) == [("dan", "pw"), ("ann", "pa:ss"), ("bob", "secret"), ("cat", "meow")]
    monkeypatch.setenv("STUDIO_AUTH", "nopassword")
    with pytest.raises(Exception, match="USER:PASSWORD"):
        cli.read_logins(cli.build_parser().parse_args([]))


def test_demo_mode_is_on_when_the_page_is_reachable_without_a_login():
    assert policy_for_launch(share=True, host="127.0.0.1", has_login=False, demo=False).is_demo
    assert policy_for_launch(share=False, host="0.0.0.0", has_login=False, demo=False).is_demo
    assert policy_for_launch(share=False, host="127.0.0.1", has_login=True, demo=True).is_demo
    assert not policy_for_launch(share=True, host="0.0.0.0", has_login=True, demo=False).is_demo
    assert not policy_for_launch(share=False, host="localhost", has_login=False, demo=False).is_demo
    assert set(AccessPolicy.demo().allowed) == {"view", "chat", "compare"} and set(ACTIONS) > DEMO_ACTIONS


def test_share_without_login_prints_what_demo_mode_allows(tmp_path, tiny_model_dir):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    from uihelpers import free_port

    proc = subprocess.Popen([sys.executable, str(ROOT / "studio.py"), "--share", "--port", str(free_port()),
                             "--workdir", str(tmp_path), "--model", str(tiny_model_dir)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = []
        deadline = time.time() + 120
        while time.time() < deadline and not any(w in "".join(lines) for w in ("No share link", "public URL")):
            lines.append(proc.stderr.readline())
    finally:
        proc.terminate()
        proc.wait(30)
    line = next(line for line in lines if "WARNING" in line)
    assert "without a login" in line and "chat with the base model" in line and "refused" in line
    # without internet (as here) Gradio cannot fetch its tunnel: the studio says so and where it runs
    said = "".join(lines)
    assert "public URL" in said or ("No share link could be made" in said and "runs on http://127.0.0.1:" in said)


# ----- keys go only where the owner said -------------------------------------------------------------
def test_environment_key_goes_only_to_the_owners_url(workspace, capture, monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    visitor = FakeTeacher().start()
    try:
        services = Services(manager=ModelManager(), paths=workspace, keys=key_routing(capture.base_url))
        with launched(services) as url:
            client = Client(url, verbose=False)
            client.predict(visitor.base_url, "m", "", 5, api_name="/test_teacher")
            client.predict(visitor.base_url, "m", TYPED, 5, api_name="/test_teacher")
            client.predict(capture.base_url, "m", "", 5, api_name="/test_teacher")
    finally:
        visitor.stop()
    assert KEY not in "".join(visitor.auth_headers) and visitor.auth_headers[1] == f"Bearer {TYPED}"
    assert capture.auth_headers == [f"Bearer {KEY}"]


def test_key_routing_rules(monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    monkeypatch.delenv("STUDIO_TEACHER_BASE_URL", raising=False)
    presets = key_routing()
    assert presets.key_for("https://api.deepseek.com/v1/") == KEY  # no owner URL: the presets' fixed URLs only
    assert presets.key_for("http://attacker.example/v1") == ""
    owner = key_routing("DeepSeek")
    assert owner.key_for("https://api.deepseek.com/v1") == KEY and owner.key_for("https://api.openai.com/v1") == ""
    assert owner.key_for("http://attacker.example/v1", TYPED) == TYPED
    monkeypatch.setenv("STUDIO_TEACHER_BASE_URL", "http://127.0.0.1:9/v1")
    assert key_routing().key_for("http://127.0.0.1:9/v1") == KEY and key_routing().key_for("https://api.deepseek.com/v1") == ""
    assert TeacherConfig("http://attacker.example/v1", "m", "").resolved_key() == ""  # no fallback to the environment


def test_judge_url_typed_in_the_page_gets_no_server_key(studio, capture, monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    services = Services(manager=studio["manager"], paths=studio["paths"], keys=key_routing("http://owner.invalid/v1"))
    with launched(services) as url:
        client = Client(url, verbose=False)
        client.predict(studio["run"].name, "heldout", None, False, SAMPLE_DOC.name, 1, "greedy", 16, capture.base_url,
                       "judge", "", api_name="/run_report")
        job = services.jobs.wait(services.jobs.latest("report"), 300)
    assert job.status is JobStatus.DONE, job.error
    assert capture.auth_headers and KEY not in "".join(capture.auth_headers)


# ----- services refuse too ---------------------------------------------------------------------------
def test_services_refuse_under_the_demo_policy(studio, workspace):
    from studio.data.builder import BuildSettings
    from studio.data.service import start_build

    demo, manager, run = AccessPolicy.demo(), studio["manager"], studio["run"]
    board = JobBoard()
    with pytest.raises(PermissionDenied, match="build dataset"):
        start_build(board, manager, workspace, SAMPLE_DOC, BuildSettings(), None, policy=demo)
    request = RunRequest(run / "x.jsonl", SYSTEM, LoraSettings(), TrainSettings(), workspace.runs_dir / "r")
    with pytest.raises(PermissionDenied, match="train"):
        start_training(board, manager, request, policy=demo)
    for call in (lambda: evaluate.attach_run(manager, studio["hidden"], policy=demo),
                 lambda: evaluate.detach_run(manager, run.name, policy=demo),
                 lambda: evaluate.delete_run(manager, run, True, policy=demo),
                 lambda: evaluate.start_report(board, manager, run, None, None, GenerationSettings.greedy(8), policy=demo)):
        with pytest.raises(PermissionDenied):
            call()
    assert run.is_dir() and run.name in manager.status().adapters


# ----- the catalog -----------------------------------------------------------------------------------
def test_catalog_resolves_ids_inside_its_folders_only(workspace, tmp_path):
    (workspace.data_dir / "notes.md").write_text("# n\n", encoding="utf-8")
    (workspace.data_dir / "rows.jsonl").write_text("{}\n", encoding="utf-8")
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("{}\n", encoding="utf-8")
    catalog = Catalog(workspace, SAMPLE_DOC)
    assert catalog.ids("documents") == ["notes.md", SAMPLE_DOC.name] and catalog.ids("datasets") == ["rows.jsonl"]
    assert catalog.resolve_dataset("rows.jsonl") == workspace.data_dir / "rows.jsonl"
    messages = set()
    for bad in (str(outside), "../elsewhere.jsonl", "/etc/passwd", "missing.jsonl", "", None, 7):
        with pytest.raises(UnknownItem) as refused:
            catalog.resolve_dataset(bad)
        assert "unknown dataset" in str(refused.value) and str(tmp_path) not in str(refused.value)
        messages.add(str(refused.value).split("'")[0])
    assert messages == {"unknown dataset "}  # an existing outside file and a missing one read the same
    assert catalog.document_id(SAMPLE_DOC) == SAMPLE_DOC.name and catalog.document_id("/etc/passwd") is None


# ----- bounded work ----------------------------------------------------------------------------------
def test_hard_wrap_ends_for_any_limit_and_split_settings_are_range_checked():
    assert _hard_wrap("甲" * 500 + "。" + "乙" * 50, 0) and len(_hard_wrap("x" * 100, -5)) == 100
    parts = _cut_long("h", "## " + "H" * 5000 + "\n\n" + "t" * 20000, 300)
    assert 0 < len(parts) < 200
    for bad in (dict(max_chars=1), dict(max_chars=0), dict(max_chars=-3), dict(min_chars=-1), dict(levels=(9,))):
        with pytest.raises(DataError):
            SplitSettings(**bad)


def test_split_with_a_tiny_section_length_is_refused_by_the_server(workspace):
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception, match="Longest section sent to the teacher must be between 200"):
            client.predict(None, SAMPLE_DOC.name, 100, 1, ["##"], api_name="/split")
        with pytest.raises(Exception, match="not in the list of choices|unknown document"):
            client.predict(None, "/etc/passwd", 100, 3000, ["##"], api_name="/split")
        message, _ = client.predict(None, SAMPLE_DOC.name, 100, 3000, ["##", "###"], api_name="/split")
        assert message.startswith("19 sections")


# ----- uploads ---------------------------------------------------------------------------------------
def _upload(url: str, name: str, data: bytes) -> httpx.Response:
    return httpx.post(url + "gradio_api/upload", files={"files": (name, data)}, timeout=60)


def test_uploads_are_limited_in_size_and_type(workspace):
    services = Services(manager=ModelManager(), paths=workspace, max_upload_mb=1)
    with launched(services) as url:
        assert _upload(url, "big.txt", b"a" * (2 * 2**20)).status_code == 413
        for name in ("run.sh", "x.exe", "page.html", "noext", "doc.md.html"):
            assert _upload(url, name, b"#!/bin/sh\n").status_code == 415, name
        accepted = _upload(url, "notes.md", "## 标题\n正文\n".encode("utf-8"))
        assert accepted.status_code == 200 and accepted.json()[0].endswith("notes.md")
    demo = Services(manager=ModelManager(), paths=workspace, policy=AccessPolicy.demo())
    with launched(demo) as url:
        assert _upload(url, "notes.md", b"## a\n").status_code == 403


def test_uploads_handed_to_a_handler_are_deleted_when_the_session_ends(workspace, tmp_path):
    from gradio_client import handle_file

    source = tmp_path / "rows.jsonl"
    source.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services) as url:
        client = Client(url, verbose=False)
        client.predict(handle_file(str(source)), api_name="/import_dataset")
        uploads = [p for paths in services.registry._uploads.values() for p in paths]
        assert len(uploads) == 1 and uploads[0].is_file()
        for session in list(services.registry._uploads):
            services.registry.forget_uploads(session)  # what the page's unload event runs
        assert not uploads[0].exists()
    assert list(workspace.data_dir.glob("rows*.jsonl"))  # the imported dataset itself stays


# ----- what a hostile review of the merged studio found -------------------------------------------
def test_an_upload_with_two_file_names_is_refused_and_demo_takes_no_multipart_post(workspace):
    """Gradio's parser takes the last filename= of a part: every one of them must be an accepted kind."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=d.txt; filename=e.html\r\n"
            b"Content-Type: text/plain\r\n\r\n<script>x</script>\r\n--b--\r\n")
    headers = {"content-type": "multipart/form-data; boundary=b"}
    with launched(Services(manager=ModelManager(), paths=workspace)) as url:
        assert httpx.post(url + "gradio_api/upload", content=body, headers=headers).status_code == 415
    with launched(Services(manager=ModelManager(), paths=workspace, policy=AccessPolicy.demo())) as url:
        for route in ("gradio_api/process_recording", "gradio_api/upload"):
            assert httpx.post(url + route, content=body, headers=headers).status_code == 403, route


def test_a_forged_forwarded_address_does_not_escape_the_login_throttle(workspace):
    from studio.ui.guard import LoginThrottle

    services = Services(manager=ModelManager(), paths=workspace)
    with launched(services, logins=[("owner", "right-pass")], throttle=LoginThrottle(free=5, base_s=30)) as url:
        codes = [httpx.post(url + "login", data={"username": "owner", "password": f"guess{i}"},
                            headers={"x-forwarded-for": f"10.0.0.{i}"}).status_code for i in range(7)]
    assert codes[:5] == [400] * 5 and codes[5:] == [429, 429]


def test_the_api_beside_a_login_needs_its_own_key(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIO_AUTH", "owner:right-pass")
    result = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "--api"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "--api-key-env" in result.stderr and "login" in result.stderr
    result = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "--api",
                             "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, cwd=ROOT,
                            env={k: v for k, v in os.environ.items() if k != "STUDIO_AUTH"})
    assert result.returncode == 2 and "--api-key-env" in result.stderr


def test_a_too_long_conversation_is_refused_before_generation(manager):
    from studio.errors import StudioError
    from studio.model.decoding import MAX_PROMPT_TOKENS
    from studio.model.generation import GenerationSettings, build_messages

    history = [{"role": "user", "content": "雾灯岛" * 2000}, {"role": "assistant", "content": "灯贝" * 2000}] * 3
    with pytest.raises(StudioError, match=f"at most {MAX_PROMPT_TOKENS:,} tokens"):
        manager.chat(build_messages("s", history, "hi"), GenerationSettings.greedy(4))
    assert manager.chat(build_messages("s", [], "hi"), GenerationSettings.greedy(4)) is not None  # still answers


def test_the_environment_key_never_goes_to_a_local_plain_http_preset(monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    monkeypatch.delenv("STUDIO_TEACHER_BASE_URL", raising=False)
    routing = key_routing()
    assert routing.key_for("http://127.0.0.1:11434/v1") == "" and routing.key_for("http://127.0.0.1:8000/v1") == ""
    assert routing.key_for("https://api.deepseek.com/v1") == KEY


def test_a_demo_started_with_attached_adapters_compares_them(studio, tmp_path):
    """The owner's way to give a shared demo something to compare: --load --attach NAME=RUN_DIR at start."""
    from uihelpers import free_port

    port = free_port()
    command = [sys.executable, str(ROOT / "studio.py"), "--model", str(studio["model"]), "--load", "--demo",
               "--workdir", str(studio["paths"].data_dir.parent), "--attach", f"shown={studio['run']}",
               "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = Client(url, verbose=False)
        base, _, tuned, _, _ = client.predict("雾灯岛的通用货币是什么？", studio["run"].name, False, None, 1, "greedy", 16,
                                              api_name="/compare")
        assert base and tuned
        with pytest.raises(Exception):
            client.predict(studio["run"].name, api_name="/attach_adapter")  # still not callable in demo
    finally:
        server.terminate()
        output = server.communicate(timeout=60)[0]
    assert "attached: shown" in output


def test_attach_without_load_is_refused(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "--attach", "a=b"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "--attach needs --load" in result.stderr


def test_signed_in_visitors_load_hub_ids_and_the_owners_models_never_other_server_folders(tiny_model_dir, tmp_path,
                                                                                         monkeypatch):
    from studio.access import page_model_source
    from studio.errors import PermissionDenied
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.i18n import translate

    monkeypatch.chdir(tmp_path)
    signed_in = policy_for_launch(share=True, host="0.0.0.0", has_login=True, demo=False)
    owner = policy_for_launch(share=False, host="127.0.0.1", has_login=False, demo=False)
    assert owner.server_folders and not signed_in.server_folders
    secret = tmp_path / "secret_model"
    secret.mkdir()
    refusals = []
    for name in (str(secret), str(tmp_path / "nothing_here"), "../etc", "~/models/x", "secret_model"):
        with pytest.raises(PermissionDenied) as refused:
            page_model_source(signed_in, name, ("Qwen/Qwen2.5-7B-Instruct",))
        refusals.append(str(refused.value).replace(repr(name[:200]), "NAME"))
    assert len(set(refusals)) == 1  # the same words whether the folder exists or not
    assert "模型" in translate(str(refused.value), "zh")
    assert page_model_source(signed_in, "Qwen/Qwen2.5-0.5B-Instruct", ()) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert page_model_source(signed_in, "modelscope:qwen/Qwen2.5-7B-Instruct", ()).startswith("modelscope:")
    assert page_model_source(signed_in, str(tiny_model_dir), (str(tiny_model_dir),)) == str(tiny_model_dir)  # --model
    assert page_model_source(owner, str(secret), ()) == str(secret)  # the owner at this machine: any folder
    # through the page's own handler: the manager is never asked to look at the folder
    manager = ModelManager()
    services = Services(manager=manager, policy=signed_in, default_model=str(tiny_model_dir))
    load = handler(services, "load")
    monkeypatch.setattr(manager, "load", lambda spec, progress=None: pytest.fail(f"loaded {spec}"))
    import gradio as gr

    with pytest.raises(gr.Error, match="signed-in visitors load hub ids"):
        load(str(secret), "4bit", progress=lambda *a, **k: None)


def test_files_named_by_url_are_never_fetched_and_gradios_extra_routes_are_closed(studio, workspace):
    """Gradio downloads a file object whose path is a URL (of any size, kept on disk, its server path
    answered) before any handler runs, and its older /file/<...> route fetches URLs too: the guard refuses
    both in every mode, whatever case or JSON escapes the URL is written in."""
    remote = "http://1.2.3.4:8081/big.md"  # a public address: Gradio's own check only refuses private ones
    file_part = {"path": remote, "url": remote, "meta": {"_type": "gradio.FileData"}}
    history = [{"role": "user", "content": [{"type": "file", "file": file_part}]},
               {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]
    demo = Services(manager=studio["manager"], paths=studio["paths"], policy=AccessPolicy.demo())
    with launched(demo) as url, httpx.Client() as http:
        config = http.get(url + "config").json()
        chat = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")
        refused = call_by_index(url, chat, ["hi", history, "s", "", 16, 0, 1, 1], http=http)
        escaped = http.post(url + "gradio_api/queue/join", headers={"content-type": "application/json"},
                            content=json.dumps({"data": ["hi", history], "fn_index": chat, "session_hash": "x"})
                            .replace("http://", "\\u0048TTP:\\/\\/"))
        routes = {route: http.get(url + route).status_code for route in (
            f"gradio_api/file/{remote}", "gradio_api/file=HTTPS://1.2.3.4/x", "gradio_api/file//etc/passwd",
            "openapi.json", "monitoring/summary")}
        local_part = call_by_index(url, chat, ["hi", [{"role": "user", "content": [
            {"type": "file", "file": {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}}]}],
            "s", "", 16, 0, 1, 1], http=http)
    assert refused["status"] == 403 and "A file given by URL is not fetched" in refused["text"], refused
    assert escaped.status_code == 403 and "A file given by URL" in escaped.text
    assert routes == {f"gradio_api/file/{remote}": 403, "gradio_api/file=HTTPS://1.2.3.4/x": 403,
                      "gradio_api/file//etc/passwd": 403, "openapi.json": 404, "monitoring/summary": 403}, routes
    assert local_part.get("success") is False and PASSWD_LINE not in json.dumps(local_part)
    with pytest.raises(BadArgument, match="a message may hold text only"):
        History("Chat history").check([{"role": "user", "content": [{"type": "file", "file": {"path": "x"}}]}], None)
    assert History("Chat history").check([{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                          {"role": "assistant", "content": "ok"}], None)
    owner = Services(manager=ModelManager(), paths=workspace)  # uploads allowed: the document box takes a file
    with launched(owner) as url, httpx.Client() as http:
        split = next(d["id"] for d in http.get(url + "config").json()["dependencies"] if d.get("api_name") == "split")
        document = call_by_index(url, split, [file_part, None, 100, 3000, ["##", "###"]], http=http)
    assert document["status"] == 403 and "A file given by URL" in document["text"], document


def test_the_guard_tells_urls_from_file_paths():
    from studio.ui.guard import fetch_route, remote_file_in

    for path in ("/gradio_api/file=http://h/x", "/gradio_api/file= HtTp://h/x", "/gradio_api/file=//h/x",
                 "/gradio_api/file=ftp://h/x", "/gradio_api/file/x", "/file/http://h/x"):
        assert fetch_route(path), path
    for path in ("/gradio_api/file=/tmp/gradio/ab/notes.md", "/gradio_api/file=C:/gradio/notes.md",
                 "/gradio_api/file=/tmp/gradio/file/x.md", "/gradio_api/queue/join", "/v1/chat/completions"):
        assert not fetch_route(path), path
    assert remote_file_in(b'{"data": [[{"x": {"path": "\\u0068ttps:\\/\\/h/x"}}]]}') == "https://h/x"
    assert remote_file_in(b'{"data": [{"\\u0070ath": "http://h/x"}]}') == "http://h/x"  # the key escaped too
    assert remote_file_in(b'{"data": [{"path": "/tmp/gradio/ab/notes.md", "url": "http://127.0.0.1/file=x"}]}') is None
    assert remote_file_in(b'{"data": [{"path": "C:\\\\Temp\\\\gradio\\\\notes.md"}]}') is None
    assert remote_file_in(b"not json") is None and remote_file_in(b"[" * 100_000) is None


def test_an_upload_argument_outside_gradios_upload_folder_is_neither_read_nor_deleted(workspace, tmp_path):
    """Gradio hands a handler only files it received; the spec refuses anything else itself, so no path a client
    names is ever read or put on the session's list of files to delete."""
    from gradio.utils import get_upload_folder

    from studio.ui.registry import Registry, Upload

    registry = Registry.for_services(Services(manager=ModelManager(), paths=workspace))
    owner_file = tmp_path / "notes.md"
    owner_file.write_text("## 标题\n正文\n", encoding="utf-8")
    with pytest.raises(BadArgument, match="the upload is gone"):
        Upload("Document").check(str(owner_file), registry)
    uploaded = Path(get_upload_folder()) / uuid.uuid4().hex / "notes.md"
    uploaded.parent.mkdir(parents=True)
    uploaded.write_text("## 标题\n正文\n", encoding="utf-8")
    assert Upload("Document").check(str(uploaded), registry) == str(uploaded)
    remembered = [p for paths in registry._uploads.values() for p in paths]
    assert remembered == [uploaded] and owner_file.is_file()
    for session in list(registry._uploads):
        registry.forget_uploads(session)
    assert not uploaded.exists() and owner_file.is_file()
