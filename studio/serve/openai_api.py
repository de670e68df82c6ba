"""OpenAI's chat-completions protocol in front of the model manager.

- `GET /v1/models`: the loaded base (by the name it was loaded with) and every attached adapter.
- `POST /v1/chat/completions`: `model` picks the base or an adapter; an adapter answers under the
  system prompt it was trained with when the request brings none. `stream: true` sends Server-Sent
  Events chunks as OpenAI does, ending with `data: [DONE]`.

Every generation takes the manager's lease, so it never overlaps another generation, a training run
or a load: when the model is busy the request gets HTTP 503 with Retry-After at once. With a key,
requests need `Authorization: Bearer <key>`; the key is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request  # at module level: FastAPI resolves the routes' annotations here

from studio.errors import ModelBusyError, ModelNotLoadedError, PermissionDenied, StudioError
from studio.http_body import SlowBody, body_within, json_values_over
from studio.http_origin import local_request_problem

RETRY_AFTER_S = 5
DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = 8192
MAX_BODY_BYTES = 4 * 2**20  # 100,000 characters of messages are at most about 1 MB of JSON
MAX_JSON_VALUES = 20_000  # 200 messages are about 1,000 values
DISCONNECT_POLL_S = 0.5
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    """A refusal in OpenAI's error shape: HTTP status, message, type and code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.headers = status, message, type_, code, headers or {}

    def response(self):
        from fastapi.responses import JSONResponse

        body = {"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----- the request -----------------------------------------------------------------------------------
@dataclass
class ChatRequest:
    """A validated chat-completions request."""

    model: str
    messages: list[dict]
    stream: bool
    include_usage: bool
    max_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    stop: tuple[str, ...]
    seed: int | None

    @classmethod
    def parse(cls, body) -> "ChatRequest":
        if not isinstance(body, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ApiError(400, "`model` is required: one of the ids GET /v1/models lists.", code="model_required")
        if body.get("n", 1) != 1:
            raise ApiError(400, "Only n=1 is supported.")
        given = [name for name in ("max_completion_tokens", "max_tokens") if body.get(name) is not None]
        max_tokens = body[given[0]] if given else DEFAULT_MAX_TOKENS
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, f"`stream_options` must be an object, not {_shown(options)}.")
        return cls(
            model=model,
            messages=_messages(body.get("messages")),
            stream=_flag(body.get("stream"), "stream"),
            include_usage=_flag((options or {}).get("include_usage"), "stream_options.include_usage"),
            max_tokens=_number(max_tokens, given[0] if given else "max_tokens", 1, MAX_TOKENS_LIMIT, int),
            temperature=_number(body.get("temperature"), "temperature", 0.0, 2.0, default=1.0),
            top_p=_number(body.get("top_p"), "top_p", 0.0, 1.0, default=1.0),
            repetition_penalty=_number(body.get("repetition_penalty"), "repetition_penalty", 0.5, 2.0, default=1.0),
            stop=_stop(body.get("stop")),
            seed=None if body.get("seed") is None else _number(body.get("seed"), "seed", 0, 2**63 - 1, int),
        )

    def settings(self):
        from studio.model.generation import GenerationSettings

        return GenerationSettings(self.max_tokens, self.temperature, self.top_p or 1.0, self.repetition_penalty)


def _number(value, name: str, low: float, high: float, kind=float, default: float | None = None):
    """A number in [low, high]; null or absent is `default` (OpenAI's own default for the field)."""
    if value is None:
        value = low if default is None else default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"`{name}` must be a number from {low:g} to {high:g}, not {_shown(value)}.")
    if kind is int and value != int(value):
        raise ApiError(400, f"`{name}` must be a whole number, not {_shown(value)}.")
    return kind(value)


def _flag(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be true or false, not {_shown(value)}.")
    return value


MAX_STOP = 4


def _stop(value) -> tuple[str, ...]:
    """`stop`: a string or a list of at most four strings, as OpenAI takes it."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or len(value) > MAX_STOP or not all(isinstance(s, str) for s in value):
        raise ApiError(400, f"`stop` must be a string or a list of at most {MAX_STOP} strings, not {_shown(value)}.")
    return tuple(s for s in value if s)


def _shown(value) -> str:
    return repr(value)[:60]


MAX_MESSAGES = 200
MAX_MESSAGE_CHARS = 100_000  # all messages together; the model manager also caps the prompt's tokens


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content} objects.")
    if len(raw) > MAX_MESSAGES:
        raise ApiError(400, f"`messages` holds {len(raw)} messages; at most {MAX_MESSAGES} are accepted.")
    messages = []
    for index, message in enumerate(raw):
        role = message.get("role") if isinstance(message, dict) else None
        if role == "developer":
            role = "system"
        if role not in ROLES:
            raise ApiError(400, f"messages[{index}]: role must be one of {', '.join(ROLES)}, not {role!r}.")
        messages.append({"role": role, "content": _text(message.get("content"), index)})
    if sum(len(m["content"]) for m in messages) > MAX_MESSAGE_CHARS:
        raise ApiError(400, f"The messages are longer than {MAX_MESSAGE_CHARS:,} characters together.")
    return messages


def _text(content, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return "".join(str(p.get("text", "")) for p in content)
        raise ApiError(400, f"messages[{index}]: only text content parts are supported.")
    if content is None:
        return ""
    raise ApiError(400, f"messages[{index}]: content must be a string or a list of text parts.")


# ----- the model -------------------------------------------------------------------------------------
def base_id(loaded) -> str:
    """The base model's id for clients: its hub id, or a local folder's name (never a server path)."""
    name = loaded.spec.name_or_path
    return Path(name).name if name.startswith(("/", ".", "~")) or Path(name).exists() else name


def model_ids(loaded) -> list[str]:
    """The ids a request may name: the base, then each attached adapter."""
    return [base_id(loaded), *loaded.adapters] if loaded is not None else []


_SERVER_PATH = re.compile(r"(?:/[\w.\-]+){2,}")


def without_paths(text: str) -> str:
    """A message with every server path cut to its last part (API clients need no server paths)."""
    return _SERVER_PATH.sub(lambda match: match.group(0).rsplit("/", 1)[-1], text)


def pick_adapter(loaded, model: str) -> str | None:
    """The adapter a request's `model` names (None = the base), or ApiError 404."""
    if model in loaded.adapters:
        return model
    if model in (base_id(loaded), loaded.spec.name_or_path):
        return None
    raise ApiError(404, f"The model {model!r} does not exist here; available: {', '.join(model_ids(loaded))}.",
                   code="model_not_found")


def with_system_prompt(loaded, adapter: str | None, messages: list[dict]) -> list[dict]:
    """An adapter answers under the system prompt it was trained with when the request has none."""
    if adapter is None or any(m["role"] == "system" for m in messages):
        return messages
    from studio.train.adapters import read_metadata

    system = read_metadata(Path(loaded.adapters[adapter])).get("system_prompt", "")
    return ([{"role": "system", "content": system}] if system else []) + messages


def take_model(services, request: ChatRequest):
    """The manager's lease for one generation, or ApiError 503 (busy / nothing loaded) / 403."""
    try:
        services.policy.require("chat")
    except PermissionDenied as exc:
        raise ApiError(403, str(exc), "permission_error") from None
    try:
        lease = services.manager.acquire(f"answering an API request ({request.model})", changes_model=False)
    except (ModelBusyError, ModelNotLoadedError) as exc:
        raise ApiError(503, without_paths(str(exc)), "server_busy", "model_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    try:
        adapter = pick_adapter(lease.loaded, request.model)
    except ApiError:
        lease.release()
        raise
    return lease, adapter


class StopAt:
    """Cuts a growing reply at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1

    def cut(self, text: str) -> tuple[str, bool]:
        """(the part of `text` safe to show, whether a stop string was reached)."""
        found = [text.index(s) for s in self.stops if s in text]
        if found:
            return text[:min(found)], True
        return (text[:len(text) - self.hold] if self.hold else text), False


def generate(lease, adapter: str | None, request: ChatRequest, stop_event: threading.Event):
    """Yield (text so far, finished by a stop string) under the lease; the caller releases it."""
    from studio.model.manager import stream_reply

    if request.seed is not None:
        import torch

        torch.manual_seed(request.seed)
    messages = with_system_prompt(lease.loaded, adapter, request.messages)
    stopper = StopAt(request.stop)
    reply = ""
    for reply in stream_reply(lease.loaded, messages, request.settings(), adapter, stop_event):
        shown, stopped = stopper.cut(reply)
        if stopped:
            stop_event.set()
            yield shown, True
            return
        yield shown, False
    yield reply, False  # the end: nothing is held back any more


def usage(loaded, messages: list[dict], reply: str, max_tokens: int) -> dict:
    """Token counts; the reply's by tokenizing its text again (capped at max_tokens: a reply cut in the
    middle of a character can tokenize to more pieces than were generated)."""
    from studio.model.generation import render_prompt

    prompt = len(loaded.tokenizer(render_prompt(loaded.tokenizer, messages), add_special_tokens=False)["input_ids"])
    completion = min(len(loaded.tokenizer(reply, add_special_tokens=False)["input_ids"]), max_tokens) if reply else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(stopped: bool, counts: dict, request: ChatRequest) -> str:
    return "length" if not stopped and counts["completion_tokens"] >= request.max_tokens else "stop"


# ----- the routes ------------------------------------------------------------------------------------
def mount_openai_routes(fastapi_app, services, api_key: str = "") -> None:
    """Add /v1/models and /v1/chat/completions to `fastapi_app`, answering from `services.manager`."""
    from fastapi import APIRouter

    router = APIRouter(prefix="/v1")

    def refused(request: Request):
        return None if authorized(request, api_key) else ApiError(
            401, "Missing or wrong API key: send Authorization: Bearer <key>.", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"}).response()

    @router.get("/models")
    def list_models(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        loaded = services.manager.loaded_or_none()
        created = int(time.time())
        return {"object": "list", "data": [{"id": mid, "object": "model", "created": created, "owned_by": "studio"}
                                           for mid in model_ids(loaded)]}

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        if (denied := refused(request)) is not None:
            return denied
        try:
            chat = ChatRequest.parse(await _json_body(request))
            lease, adapter = take_model(services, chat)
        except ApiError as exc:
            return exc.response()
        if chat.stream:
            return stream_response(lease, adapter, chat)
        return await _complete_while_connected(request, lease, adapter, chat)

    fastapi_app.include_router(router)


async def _complete_while_connected(request: Request, lease, adapter: str | None, chat: "ChatRequest"):
    """`complete` in a worker thread, stopped at the next token once the client has gone away: an abandoned
    request of 8,192 tokens would otherwise keep the model from everyone else until it ends."""
    stop = threading.Event()
    work = asyncio.ensure_future(asyncio.to_thread(complete, lease, adapter, chat, stop))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and await request.is_disconnected():
                stop.set()
        return work.result()
    finally:
        stop.set()  # the request's task cancelled (server shutting down): the worker stops at the next token


async def _json_body(request: Request):
    """The request's JSON: sent as application/json (a page of another site can send text/plain without
    asking first), read only while it stays within MAX_BODY_BYTES (413 past that) and MAX_JSON_VALUES."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"Send the request as JSON with Content-Type: application/json (got {kind[:60] or 'none'}).")
    try:
        body = await body_within(request.scope, request.receive, MAX_BODY_BYTES)
    except SlowBody:
        raise ApiError(408, "The request body stopped arriving; send it again.") from None
    if body is None:
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES // 2**20} MB.")
    if json_values_over(body, MAX_JSON_VALUES):
        raise ApiError(413, f"The request body holds more than {MAX_JSON_VALUES:,} JSON values.")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON.") from None


def authorized(request, api_key: str) -> bool:
    if not api_key:
        return True
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def complete(lease, adapter: str | None, request: ChatRequest, stop: threading.Event | None = None):
    """The whole reply as one chat.completion object (the lease is released here); `stop` ends it early."""
    from fastapi.responses import JSONResponse

    try:
        text, stopped = "", False
        for text, stopped in generate(lease, adapter, request, stop or threading.Event()):
            pass
        messages = with_system_prompt(lease.loaded, adapter, request.messages)
        counts = usage(lease.loaded, messages, text, request.max_tokens)
    except StudioError as exc:
        return ApiError(400, without_paths(str(exc))).response()
    finally:
        lease.release()
    return JSONResponse({
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()), "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason(stopped, counts, request), "logprobs": None}],
        "usage": counts,
    })


def stream_response(lease, adapter: str | None, request: ChatRequest):
    """Server-Sent Events: a role chunk, content chunks, a finish chunk (and usage if asked), [DONE].

    The generation runs in its own thread that owns the lease and gives it back when it ends; a client
    that goes away stops it at the next token.
    """
    from fastapi.responses import StreamingResponse

    pieces: queue.Queue = queue.Queue()
    stop_event = threading.Event()
    base = {"id": _completion_id(), "object": "chat.completion.chunk", "created": int(time.time()),
            "model": request.model}

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        payload = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def produce() -> None:
        shown, stopped = "", False
        try:
            for text, stopped in generate(lease, adapter, request, stop_event):
                if len(text) > len(shown):
                    pieces.put(chunk({"content": text[len(shown):]}))
                    shown = text
            messages = with_system_prompt(lease.loaded, adapter, request.messages)
            counts = usage(lease.loaded, messages, shown, request.max_tokens)
            pieces.put(chunk({}, finish_reason(stopped, counts, request)))
            if request.include_usage:
                pieces.put(f"data: {json.dumps({**base, 'choices': [], 'usage': counts})}\n\n")
        except Exception as exc:  # reported in the stream: the status line has already been sent
            message = without_paths(str(exc) if isinstance(exc, StudioError) else f"{exc.__class__.__name__}: {exc}")
            pieces.put(f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n")
        finally:
            lease.release()
            pieces.put(None)

    threading.Thread(target=produce, name="studio-api-stream", daemon=True).start()

    async def events():
        try:
            yield chunk({"role": "assistant", "content": ""})
            while (item := await asyncio.to_thread(pieces.get)) is not None:
                yield item
            yield "data: [DONE]\n\n"
        finally:
            stop_event.set()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ----- the standalone server ----------------------------------------------------------------------
def server_key(var: str | None) -> str:
    """The bearer key from environment variable `var` ('' without one); an empty variable is refused."""
    if not var:
        return ""
    key = os.environ.get(var, "").strip()
    if not key:
        raise StudioError(f"--api-key-env {var}: the environment variable {var} is not set or empty.")
    return key


def attach_named_adapters(manager, specs: list[str]) -> list[str]:
    """Attach each `NAME=RUN_DIR` (or `RUN_DIR`, named after its folder); returns the names."""
    from studio.train import adapters

    names = []
    with manager.using("attaching adapters for the API") as loaded:
        for spec in specs:
            name, sep, folder = spec.partition("=")
            if not sep:
                name, folder = Path(spec).name, spec
            name = name.strip()
            if not name or name == loaded.spec.name_or_path:
                raise StudioError(f"--adapter {spec}: give the adapter a name of its own (NAME=RUN_DIR).")
            names.append(adapters.attach(loaded, Path(folder.strip()), name))
    return names


class LocalOnly:
    """ASGI middleware of a server on loopback: refuses what another site's page made the browser send
    (see studio/http_origin.py), in OpenAI's error shape."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        problem = local_request_problem(scope) if scope["type"] == "http" else None
        if problem is None:
            return await self.app(scope, receive, send)
        key, values = problem
        message = (f"This server answers at 127.0.0.1 or localhost only, not at {values['host']}."
                   if key == "guard_foreign_host" else f"A request from another site's page ({values['origin']}) is refused.")
        await ApiError(403, message, code="forbidden").response()(scope, receive, send)


def create_api_app(services, api_key: str = "", local_only: bool = False):
    """A FastAPI app with the OpenAI-compatible routes only (for `studio.py serve`); `local_only` for a
    server on loopback."""
    from fastapi import FastAPI

    app = FastAPI(title="QLoRA Studio API", docs_url=None, redoc_url=None)
    mount_openai_routes(app, services, api_key)
    if local_only:
        app.add_middleware(LocalOnly)
    return app


def run_server(app, host: str, port: int) -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="info")
