"""An ASGI middleware in front of Gradio's routes, for what Gradio itself does not do.

- Failed logins are throttled per client address: after `free` failures in a row each further attempt
  is refused (429, Retry-After) until a lock that doubles with every failure has run out, even with the
  right password. A success clears the count.
- Uploads: refused outright in demo mode; otherwise only files named .md .txt .jsonl .json, and no
  request larger than the size limit (Gradio checks the size too, but accepts any file type).
- The login page (served before a login) carries no endpoint list: Gradio embeds its API description
  in every page, the login page included.
- A file named by URL is refused wherever it comes: `/file=<URL>` and Gradio's older `/file/<...>` route
  (Gradio would fetch the URL from the server and serve it back), and a file object whose `path` is a URL
  inside an event's JSON body (Gradio downloads it, of any size, before a handler of the studio can check
  it). The page itself only ever sends files it uploaded, by their place in Gradio's upload folder.
- Every other request body is bounded too (an event's inputs: a chat history, a dataset table): at most
  the upload limit plus 1 MB, 2 MB in demo mode, where only chat and compare are served. In demo mode a
  JSON body of more than 20,000 values is refused as well: Gradio checks a chat history's shape before
  any handler of the studio sees it, and half a million empty message parts in 2 MB held the server
  for half a minute.
- A request with two Content-Type or Content-Length headers is refused: the guard and Gradio could read
  different ones (an upload's type checked on one, stored by the other).
- A body that stops arriving is refused (408), so slow clients cannot hold connections open for ever
  (`studio/http_body.py`).
- Served on loopback without a share link, a request another site's page made the browser send (a
  foreign Host: DNS rebinding; a foreign Origin; an embedding page's Sec-Fetch-Site) is refused
  (`studio/http_origin.py`), and every response forbids other sites' frames.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import PurePath

from studio.catalog import UPLOAD_SUFFIXES
from studio.http_body import SlowBody, body_within, json_values_over
from studio.http_origin import FRAME_HEADERS, local_request_problem
from studio.ui.i18n import COOKIE, pick_language, text

# a URL's scheme (two letters at least: `C:` is a Windows drive) or a bare //host
_REMOTE = re.compile(r"^\s*(?:[a-z][a-z0-9+.\-]+:|[/\\]{2})", re.IGNORECASE)
_API_INFO = re.compile(rb"window\.gradio_api_info = .*?;</script>", re.DOTALL)
_FILENAME = re.compile(rb'filename\*?=(?:"([^"]*)"|([^;\r\n]*))', re.IGNORECASE)


@dataclass
class LoginThrottle:
    """Failed logins per client; `free` failures are let through, then the lock doubles from `base_s`."""

    free: int = 5
    base_s: float = 30.0
    max_s: float = 3600.0
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_s(self, client: str, now: float | None = None) -> float:
        """Seconds this client must wait before its next attempt (0: it may try now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            _, locked_until = self._failures.get(client, (0, 0.0))
        return max(0.0, locked_until - now)

    def failed(self, client: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            count = self._failures.get(client, (0, 0.0))[0] + 1
            lock = 0.0 if count < self.free else min(self.base_s * 2 ** (count - self.free), self.max_s)
            self._failures[client] = (count, now + lock)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def fetch_route(path: str) -> bool:
    """Whether a request path asks Gradio for a file by URL (`/file=<URL>`) or through its older `/file/<...>`
    route, which fetches URLs too."""
    head, marker, rest = path.partition("/file=")
    return bool(marker and _REMOTE.match(rest)) or re.search(r"(?:^|/)file/", head) is not None


def remote_file_in(body: bytes) -> str | None:
    """The first URL a JSON body gives as a file's `path` (Gradio would download it before any handler runs),
    else None. Every object with a `path` counts, with or without Gradio's file marker. A body without the
    word, plain or escaped, is not parsed (most bodies: a poll, a chat turn, a saved table)."""
    if b"path" not in body and b"\\u" not in body:
        return None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None  # not JSON: the app refuses it as well
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            path = item.get("path")
            if isinstance(path, str) and _REMOTE.match(path):
                return path
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _is_multipart(scope) -> bool:
    content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
    return content_type.lower().startswith(b"multipart/")


SINGLE_HEADERS = (b"content-type", b"content-length")
DEMO_BODY_BYTES = 2 * 2**20
DEMO_JSON_VALUES = 20_000


def _repeated_header(scope) -> str | None:
    """The name of a header that must come once and comes more often, else None."""
    names = [name.lower() for name, _ in scope.get("headers") or []]
    for name in SINGLE_HEADERS:
        if names.count(name) > 1:
            return name.decode()
    return None


_FRAME_HEADER_NAMES = frozenset(name for name, _ in FRAME_HEADERS)


def _with_frame_headers(send):
    """`send` that marks every response as not to be shown inside another site's frame (clickjacking)."""
    async def framed(message):
        if message["type"] == "http.response.start":
            kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _FRAME_HEADER_NAMES]
            message = {**message, "headers": kept + FRAME_HEADERS}
        await send(message)

    return framed


def _client(scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


MAX_LOGIN_BODY = 64 * 1024


def _replaying(body: bytes, receive):
    """A `receive` that hands the app the body already read, then whatever the connection sends next."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


def _login_user(body: bytes) -> str:
    """The user name of a login form (urlencoded or multipart), lower-cased; '' when none is found."""
    from urllib.parse import parse_qs

    try:
        fields = parse_qs(body.decode("utf-8", "replace"))
        if "username" in fields:
            return fields["username"][0].strip().lower()
    except ValueError:
        pass
    match = re.search(rb'name="username"\r\n\r\n([^\r]*)', body)
    return match.group(1).decode("utf-8", "replace").strip().lower() if match else ""


def scope_language(scope, forced: str | None = None) -> str:
    """The language of the page that sent this request: --lang, the switch's cookie, the browser's Accept-Language."""
    from http.cookies import CookieError, SimpleCookie

    headers = dict(scope.get("headers") or [])
    cookies = SimpleCookie()
    try:
        cookies.load(headers.get(b"cookie", b"").decode("latin-1"))
    except CookieError:
        pass
    cookie = cookies[COOKIE].value if COOKIE in cookies else None
    return pick_language(forced=forced, cookie=cookie,
                         accept_language=headers.get(b"accept-language", b"").decode("latin-1"))


async def _reply(send, status: int, text: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": text}, ensure_ascii=False).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json; charset=utf-8"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


def upload_names(content_type: bytes, body: bytes) -> list[str] | None:
    """The file names of a multipart body's file parts; None when the body is not multipart."""
    match = re.search(rb'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith(b"multipart/form-data") or not match:
        return None
    names = []
    for part in body.split(b"--" + match.group(1))[1:]:
        headers = part.split(b"\r\n\r\n", 1)[0]
        for line in headers.split(b"\r\n"):
            if line.lower().startswith(b"content-disposition") and b"filename" in line.lower():
                found = _FILENAME.findall(line)  # every filename parameter: parsers differ on which one wins
                values = [quoted or bare for quoted, bare in found] or [b""]
                names += [value.decode("utf-8", "replace").strip().split("''")[-1] for value in values]
    return names


class StudioGuard:
    """The middleware; one per launched app (see studio/ui/launch.py)."""

    def __init__(self, app, throttle: LoginThrottle | None = None, max_upload_bytes: int = 20 * 2**20,
                 uploads_allowed: bool = True, login_required: bool = False, suffixes=UPLOAD_SUFFIXES,
                 lang: str | None = None, local_only: bool = False):
        self.app = app
        self.local_only = local_only  # served on loopback without a share link: refuse other sites' requests
        self.lang = lang  # --lang, when the owner forced one
        self.throttle = throttle or LoginThrottle()
        self.max_upload_bytes = max_upload_bytes
        self.uploads_allowed = uploads_allowed
        self.login_required = login_required
        self.suffixes = tuple(suffixes)
        self.max_body_bytes = DEMO_BODY_BYTES if not uploads_allowed else max_upload_bytes + 2**20
        self.max_json_values = DEMO_JSON_VALUES if not uploads_allowed else None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        if self.local_only and (problem := local_request_problem(scope)) is not None:
            return await self._refuse_foreign(scope, send, problem)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _with_frame_headers(send)
        try:
            return await self._route(scope, receive, send)
        except SlowBody:
            return await _reply(send, 408, self._say(scope, "guard_slow_body"))

    async def _refuse_foreign(self, scope, send, problem: tuple[str, dict]):
        """A request a page of another site made the browser send (see studio/http_origin.py)."""
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        key, values = problem
        return await _reply(send, 403, self._say(scope, key, **values))

    async def _route(self, scope, receive, send):
        path, method = scope.get("path", ""), scope.get("method", "GET")
        tail = path.rstrip("/").rsplit("/", 1)[-1]
        if fetch_route(path):
            return await _reply(send, 403, self._say(scope, "guard_no_fetch"))
        repeated = _repeated_header(scope)
        if repeated:
            return await _reply(send, 400, self._say(scope, "guard_repeated_header", header=repeated))
        if method == "POST" and tail == "login":
            return await self._login(scope, receive, send)
        if method == "POST" and tail == "upload":
            return await self._upload(scope, receive, send)
        if method == "POST" and not self.uploads_allowed and _is_multipart(scope):
            return await _reply(send, 403, self._say(scope, "guard_no_uploads"))
        if method == "GET" and self.login_required and "." not in tail and "gradio_api" not in path:
            return await self._page(scope, receive, send)
        if method in ("POST", "PUT", "PATCH"):
            return await self._bounded(scope, receive, send)
        return await self.app(scope, receive, send)

    def _say(self, scope, key: str, **values) -> str:
        """A refusal in the language of the page that sent the request."""
        return text("messages", key, scope_language(scope, self.lang)).format(**values)

    # ----- login -------------------------------------------------------------------------------
    async def _login(self, scope, receive, send):
        """Throttle by client address and by user name: an address that changes (a forged X-Forwarded-For)
        still meets the user name's lock."""
        body = await body_within(scope, receive, MAX_LOGIN_BODY)
        if body is None:
            return await _reply(send, 413, self._say(scope, "guard_body_large", size=f"{MAX_LOGIN_BODY / 2**20:g}"))
        receive = _replaying(body, receive)
        keys = [f"address {_client(scope)}", f"user {_login_user(body)}"]
        wait = max(self.throttle.wait_s(key) for key in keys)
        if wait > 0:
            return await _reply(send, 429, self._say(scope, "guard_login_wait", seconds=f"{wait:.0f}"),
                                [(b"retry-after", str(int(wait) + 1).encode())])
        status = {}

        async def watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        for key in keys:
            if status.get("code") == 200:
                self.throttle.succeeded(key)
            elif status.get("code") in (400, 401, 403):
                self.throttle.failed(key)

    # ----- request bodies ----------------------------------------------------------------------
    async def _bounded(self, scope, receive, send):
        """Pass the request on once its body is known to fit max_body_bytes; 413 otherwise."""
        body = await body_within(scope, receive, self.max_body_bytes)
        if body is None:
            return await _reply(send, 413, self._say(scope, "guard_body_large",
                                                     size=f"{self.max_body_bytes / 2**20:g}"))
        if self.max_json_values and json_values_over(body, self.max_json_values):
            return await _reply(send, 413, self._say(scope, "guard_json_values", most=f"{self.max_json_values:,}"))
        if not _is_multipart(scope) and remote_file_in(body) is not None:
            return await _reply(send, 403, self._say(scope, "guard_file_url"))
        await self.app(scope, _replaying(body, receive), send)

    # ----- uploads -----------------------------------------------------------------------------
    async def _upload(self, scope, receive, send):
        if not self.uploads_allowed:
            return await _reply(send, 403, self._say(scope, "guard_no_uploads"))
        limit = self.max_upload_bytes + 64 * 1024  # the multipart framing around the file
        headers = dict(scope.get("headers") or [])
        body = await body_within(scope, receive, limit)
        if body is None:
            return await _reply(send, 413, self._say(scope, "guard_too_large", size=f"{self.max_upload_bytes / 2**20:g}"))
        names = upload_names(headers.get(b"content-type", b""), body)
        if names is None or not names or any(PurePath(n).suffix.lower() not in self.suffixes for n in names):
            return await _reply(send, 415, self._say(scope, "guard_file_type", suffixes=", ".join(self.suffixes)))
        await self.app(scope, _replaying(body, receive), send)

    # ----- the login page ----------------------------------------------------------------------
    async def _page(self, scope, receive, send):
        """Drop the embedded endpoint list from a page served to a visitor who has not logged in."""
        start, parts = {}, []

        async def hold(message):
            if message["type"] == "http.response.start":
                start.update(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(parts)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            is_html = any(k.lower() == b"content-type" and b"text/html" in v for k, v in headers)
            if is_html and b'"auth_required":true' in body.replace(b" ", b""):
                body = _API_INFO.sub(b"window.gradio_api_info = {};</script>", body)
            await send({**start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, hold)
