"""The OpenAI-compatible API, driven by the official `openai` client against a real server on 127.0.0.1."""

import json
import threading
import time

import pytest

from uihelpers import free_port

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"
QUESTION = "我该怎么成为守灯人？"


class Server:
    """uvicorn in a thread, serving a FastAPI app."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture()
def adapter_folder(manager, tmp_path):
    """A LoRA adapter with large random weights trained for another system prompt, saved as a run folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    from studio.train import adapters

    loaded = manager.require_loaded()
    torch.manual_seed(2)
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                    init_lora_weights=False, task_type="CAUSAL_LM"), adapter_name="tmp")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    folder = tmp_path / "lighthouse_run"
    adapters.save_adapter(model, "tmp", folder)
    (folder / adapters.METADATA_FILE).write_text(json.dumps(
        {"system_prompt": SYSTEM, "base_fingerprint": adapters.base_fingerprint(model)}, ensure_ascii=False))
    loaded.model = model.unload()
    return folder


@pytest.fixture()
def served(services, adapter_folder):
    from studio.serve import attach_named_adapters, create_api_app

    assert attach_named_adapters(services.manager, [f"lighthouse={adapter_folder}"]) == ["lighthouse"]
    with Server(create_api_app(services)) as server:
        yield server


def _client(base_url, key="none"):
    from openai import OpenAI

    return OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def _expected(manager, messages, adapter=None, tokens=12):
    from studio.model.generation import GenerationSettings

    return manager.chat(messages, GenerationSettings.greedy(tokens), adapter=adapter)


def test_models_lists_the_base_and_the_adapters(served, tiny_model_dir):
    ids = [m.id for m in _client(served.base_url).models.list().data]
    assert ids == [tiny_model_dir.name, "lighthouse"]  # a local base is listed by its folder name, never its server path


def test_non_streaming_reply_is_the_managers_greedy_reply(served, services, tiny_model_dir):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    reply = _client(served.base_url).chat.completions.create(model=str(tiny_model_dir), messages=messages,
                                                             temperature=0, max_tokens=12)
    assert reply.choices[0].message.content == _expected(services.manager, messages)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 10
    assert reply.model == str(tiny_model_dir)


def test_streaming_sends_openai_chunks_that_add_up_to_the_reply(served, services, tiny_model_dir):
    messages = [{"role": "user", "content": QUESTION}]
    stream = _client(served.base_url).chat.completions.create(
        model=str(tiny_model_dir), messages=messages, temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == _expected(services.manager, messages)
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and chunks[-1].usage.completion_tokens == 12 and finishes[0] == "length"


def test_model_picks_the_adapter_with_its_own_system_prompt(served, services, tiny_model_dir):
    client = _client(served.base_url)
    question = [{"role": "user", "content": QUESTION}]
    tuned = client.chat.completions.create(model="lighthouse", messages=question, temperature=0, max_tokens=12)
    expected = _expected(services.manager, [{"role": "system", "content": SYSTEM}, *question], adapter="lighthouse")
    assert tuned.choices[0].message.content == expected
    base = client.chat.completions.create(model=str(tiny_model_dir), messages=question, temperature=0, max_tokens=12)
    assert base.choices[0].message.content != expected  # the adapter really answered, not the base
    import openai

    with pytest.raises(openai.NotFoundError, match="lighthouse"):
        client.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)


def test_busy_model_answers_503_with_retry_after(served, services, tiny_model_dir):
    import openai

    lease = services.manager.acquire("training lighthouse")
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            _client(served.base_url).chat.completions.create(model=str(tiny_model_dir), max_tokens=4,
                                                             messages=[{"role": "user", "content": "hi"}])
    finally:
        lease.release()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "5"
    assert "training lighthouse" in caught.value.message


def test_a_second_request_during_a_stream_gets_503_never_a_second_generation(served, services, tiny_model_dir):
    import openai

    client = _client(served.base_url)
    stream = client.chat.completions.create(model=str(tiny_model_dir), messages=[{"role": "user", "content": QUESTION}],
                                            temperature=0, max_tokens=400, stream=True)
    next(iter(stream))  # the stream holds the model now
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="lighthouse", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503
    stream.close()  # the client leaves: the generation stops and the model is free again soon
    deadline = time.time() + 30
    while services.manager.status().state.value == "busy" and time.time() < deadline:
        time.sleep(0.05)
    assert services.manager.status().state.value == "ready"


def test_bearer_key_is_required_when_set(services, tiny_model_dir, monkeypatch):
    import openai

    from studio.serve import create_api_app, server_key

    monkeypatch.setenv("STUDIO_API_KEY_TEST", "sk-local-secret-123")
    with Server(create_api_app(services, api_key=server_key("STUDIO_API_KEY_TEST"))) as server:
        with pytest.raises(openai.AuthenticationError) as caught:
            _client(server.base_url, key="wrong").models.list()
        assert caught.value.status_code == 401 and "sk-local-secret-123" not in str(caught.value.body)
        import httpx

        assert httpx.get(f"{server.base_url}/models").status_code == 401  # no header at all
        ids = [m.id for m in _client(server.base_url, key="sk-local-secret-123").models.list().data]
        assert ids == [tiny_model_dir.name]


def test_empty_key_variable_is_refused():
    from studio.errors import StudioError
    from studio.serve import server_key

    with pytest.raises(StudioError, match="STUDIO_NO_SUCH_VAR is not set or empty"):
        server_key("STUDIO_NO_SUCH_VAR")


def test_routes_mounted_beside_the_ui(services, tiny_model_dir):
    """`studio.py --api`: the same routes on the UI's own server, the UI still served."""
    import httpx

    from studio.serve import mount_openai_routes
    from studio.ui.app import build_app

    app = build_app(services)
    port = free_port()
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        mount_openai_routes(app.app, services)
        base_url = f"http://127.0.0.1:{port}/v1"
        assert [m.id for m in _client(base_url).models.list().data] == [tiny_model_dir.name]
        reply = _client(base_url).chat.completions.create(model=str(tiny_model_dir), temperature=0, max_tokens=6,
                                                          messages=[{"role": "user", "content": QUESTION}])
        assert reply.choices[0].message.content == _expected(services.manager, [{"role": "user", "content": QUESTION}],
                                                             tokens=6)
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
    finally:
        app.close()


def test_studio_is_its_own_teacher(served, services, workspace, tiny_model_dir):
    """build-dataset pointed at the studio's API: the request reaches the model and the builder parses it."""
    from studio.data.teacher import OpenAITeacher, TeacherConfig, check_connection

    teacher = OpenAITeacher(TeacherConfig(served.base_url, str(tiny_model_dir), "unused", 60))
    report = check_connection(teacher)
    assert report.startswith(f"Connected to {tiny_model_dir}")
    reply = teacher.complete([{"role": "user", "content": QUESTION}], 0.0, 8, json_mode=True)
    assert reply.text == _expected(services.manager, [{"role": "user", "content": QUESTION}], tokens=8)


def test_fields_of_the_wrong_type_are_400s_that_name_them_and_null_is_openais_default(served, tiny_model_dir):
    """`stop: 5` and `stream_options: "x"` were 500s; `max_tokens: 0` became 512 and `temperature: null` greedy."""
    import httpx

    from studio.serve.openai_api import DEFAULT_MAX_TOKENS, ApiError, ChatRequest

    base = {"model": str(tiny_model_dir), "messages": [{"role": "user", "content": QUESTION}]}
    for field, value, words in (("stop", 5, "`stop` must be a string or a list"),
                                ("stop", ["a"] * 5, "at most 4 strings"),
                                ("stream_options", "x", "`stream_options` must be an object"),
                                ("stream", "false", "`stream` must be true or false"),
                                ("max_tokens", 0, "`max_tokens` must be a number from 1"),
                                ("max_tokens", 2.5, "`max_tokens` must be a whole number")):
        with pytest.raises(ApiError, match=words):
            ChatRequest.parse({**base, field: value})
        reply = httpx.post(served.base_url + "/chat/completions", json={**base, field: value}, timeout=60)
        assert reply.status_code == 400 and words in reply.json()["error"]["message"], (field, reply.text)
    defaults = ChatRequest.parse({**base, "temperature": None, "top_p": None, "max_tokens": None, "stop": None})
    assert (defaults.temperature, defaults.top_p, defaults.max_tokens, defaults.stop) == (1.0, 1.0, DEFAULT_MAX_TOKENS, ())
    assert ChatRequest.parse({**base, "max_completion_tokens": 7, "max_tokens": 9}).max_tokens == 7


def test_a_body_over_the_limit_is_413_and_broken_json_400_before_any_model_work(served, tiny_model_dir):
    import httpx

    from studio.serve.openai_api import MAX_BODY_BYTES

    url = served.base_url + "/chat/completions"
    padding = " " * (MAX_BODY_BYTES + 1)
    big = httpx.post(url, content=b'{"model": "x",' + padding.encode() + b'"messages": []}',
                     headers={"content-type": "application/json"}, timeout=60)
    chunked = httpx.post(url, content=iter([b'{"model": "x", ', padding.encode(), b"}"]),
                         headers={"content-type": "application/json"}, timeout=60)
    broken = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"}, timeout=60)
    for reply in (big, chunked):
        assert reply.status_code == 413 and "larger than 4 MB" in reply.json()["error"]["message"]
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]


def test_a_request_another_sites_page_could_send_is_refused(services, tiny_model_dir):
    """text/plain needs no preflight, so any web page could start generations on a keyless local API; on
    loopback a foreign Host (DNS rebinding) or Origin is refused too."""
    import httpx

    from studio.serve import create_api_app

    body = json.dumps({"model": str(tiny_model_dir), "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    with Server(create_api_app(services, local_only=True)) as server:
        url = server.base_url + "/chat/completions"
        plain = httpx.post(url, content=body, headers={"content-type": "text/plain", "origin": server.base_url[:-3]})
        rebound = httpx.get(server.base_url + "/models", headers={"host": f"rebind.example:{server.port}"})
        foreign = httpx.post(url, content=body, headers={"content-type": "application/json",
                                                          "origin": "https://evil.example"})
        flood = httpx.post(url, content=b"[" + b",".join([b"[]"] * 30_000) + b"]",
                           headers={"content-type": "application/json"})
        fine = httpx.post(url, content=body, headers={"content-type": "application/json; charset=utf-8"}, timeout=60)
    assert plain.status_code == 415 and "Content-Type: application/json (got text/plain)" in plain.text
    assert rebound.status_code == 403 and "127.0.0.1 or localhost only, not at rebind.example" in rebound.text
    assert foreign.status_code == 403 and "another site's page (https://evil.example)" in foreign.text
    assert flood.status_code == 413 and "more than 20,000 JSON values" in flood.text
    assert fine.status_code == 200 and fine.json()["choices"][0]["message"]["role"] == "assistant"


def test_an_abandoned_request_frees_the_model_at_once(services, tiny_model_dir):
    """A client that asked for 8,192 tokens without streaming and went away kept the model busy until the end."""
    import socket

    from studio.serve import create_api_app

    body = json.dumps({"model": str(tiny_model_dir), "max_tokens": 8192, "temperature": 0,
                       "messages": [{"role": "user", "content": QUESTION}]}).encode()
    with Server(create_api_app(services)) as server:
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.time() + 30
            while services.manager.status().state.value != "busy" and time.time() < deadline:
                time.sleep(0.02)
            assert services.manager.status().state.value == "busy"
        left = time.time()
        while services.manager.status().state.value == "busy" and time.time() < left + 30:
            time.sleep(0.05)
        assert services.manager.status().state.value == "ready" and time.time() - left < 5


def test_serve_on_another_interface_needs_a_key(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, str(root / "studio.py"), "--workdir", str(tmp_path), "serve", "--model",
                             "unused", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 2 and "serve --host 0.0.0.0 without --api-key-env would answer anyone" in result.stderr
    result = subprocess.run([sys.executable, str(root / "studio.py"), "--workdir", str(tmp_path), "--lang", "zh", "serve",
                             "--model", "unused", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120,
                            cwd=root)
    assert result.returncode == 2 and "会应答任何能访问本机的人" in result.stderr
