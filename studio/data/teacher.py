"""The teacher LLM: any OpenAI-compatible endpoint, or the model already loaded in the studio.

Retries are ours, not the HTTP client's, so every attempt is counted and every failure has a reason:
429 waits for Retry-After (capped), 5xx, time-outs and dropped connections back off exponentially,
and a reply that parses to nothing is asked again. The API key lives only in the client object; every
message that leaves this module is redacted.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from studio.errors import StudioError
from studio.secrets import KeyRouting, redact

PROVIDER_PRESETS: dict[str, tuple[str, str]] = {
    # name: (base URL, a suggested teacher model)
    "SiliconFlow": ("https://api.siliconflow.cn/v1", "Qwen/Qwen3-235B-A22B-Instruct-2507"),
    "DeepSeek": ("https://api.deepseek.com/v1", "deepseek-chat"),
    "DashScope (Alibaba)": ("https://dashscope.aliyuncs.com/compatible-mode/v1", "qwen-plus"),
    "OpenAI": ("https://api.openai.com/v1", "gpt-4o-mini"),
    "Ollama (local)": ("http://127.0.0.1:11434/v1", "qwen2.5:14b"),
    "vLLM (local)": ("http://127.0.0.1:8000/v1", "Qwen/Qwen2.5-32B-Instruct"),
}
MAX_RETRY_AFTER_S = 60.0


def key_routing(owner_base_url: str | None = None, env_var: str | None = None) -> KeyRouting:
    """Where the environment key may go: `owner_base_url` (a URL or a preset's name, else
    STUDIO_TEACHER_BASE_URL), or, when none is configured, the hosted presets' fixed https URLs (not the
    local plain-http ones: whoever listens on such a port would receive the key)."""
    import os

    owner = (owner_base_url or os.environ.get("STUDIO_TEACHER_BASE_URL", "")).strip()
    owner = PROVIDER_PRESETS[owner][0] if owner in PROVIDER_PRESETS else owner
    hosted = tuple(url for url, _ in PROVIDER_PRESETS.values() if url.startswith("https://"))
    return KeyRouting(owner, env_var, hosted)


@dataclass
class TeacherConfig:
    """Where the teacher is. The key is never stored on disk or shown; repr() hides it."""

    base_url: str = field(default=PROVIDER_PRESETS["SiliconFlow"][0], metadata={"help": "OpenAI-compatible base URL."})
    model: str = field(default=PROVIDER_PRESETS["SiliconFlow"][1], metadata={"help": "Teacher model id."})
    api_key: str = field(default="", repr=False, metadata={
        "help": "The key sent to base_url; empty = none. The server's environment key is put here only for the URL "
                "the owner configured (see secrets.KeyRouting)."})
    timeout_s: float = field(default=120.0, metadata={"help": "Seconds to wait for one reply."})

    def resolved_key(self) -> str:
        return self.api_key.strip()


@dataclass
class TeacherReply:
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class TeacherCallError(StudioError):
    """One failed attempt, with a short reason code and whether trying again can help."""

    def __init__(self, reason: str, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable
        self.retry_after = retry_after


class Teacher(Protocol):
    label: str
    max_concurrency: int

    def complete(self, messages: list[dict], temperature: float, max_tokens: int, json_mode: bool) -> TeacherReply: ...


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible chat-completions endpoint."""

    max_concurrency = 64

    def __init__(self, config: TeacherConfig):
        from openai import OpenAI

        self.config = config
        self._key = config.resolved_key()
        self.label = f"{config.model} @ {config.base_url}"
        self._json_mode_supported = True
        self._client = OpenAI(api_key=self._key or "not-needed", base_url=config.base_url,
                              timeout=config.timeout_s, max_retries=0)

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self._key,) if self._key else ()

    def complete(self, messages, temperature, max_tokens, json_mode) -> TeacherReply:
        import openai

        kwargs = dict(model=self.config.model, messages=messages, temperature=temperature, max_tokens=max_tokens)
        if json_mode and self._json_mode_supported:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            response = self._client.chat.completions.create(**kwargs)
        except openai.BadRequestError as exc:
            if "response_format" in kwargs and "response_format" in str(exc):
                self._json_mode_supported = False  # some local servers reject JSON mode: ask without it
                return self.complete(messages, temperature, max_tokens, json_mode=False)
            raise self._error("http_400", exc, retryable=False) from None
        except openai.APITimeoutError as exc:
            raise self._error("timeout", exc, retryable=True) from None
        except openai.APIConnectionError as exc:
            raise self._error("connection", exc, retryable=True) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            retry_after = _retry_after(exc.response.headers.get("retry-after")) if status == 429 else None
            retryable = status in (408, 409, 429) or status >= 500
            raise self._error(f"http_{status}", exc, retryable, retry_after) from None
        return _reply_from(response)

    def _error(self, reason: str, exc: Exception, retryable: bool, retry_after: float | None = None) -> TeacherCallError:
        message = redact(f"{self.label}: {reason}: {exc}", self.secrets)
        return TeacherCallError(reason, message[:500], retryable, retry_after)


def _reply_from(response) -> TeacherReply:
    """The reply's text and counts. The client builds its objects from whatever JSON came back without
    checking it, so every field is checked here: a reply of another shape is a `wrong_schema` failure of
    this call (asked again, then counted), never an error that stops the build."""
    if isinstance(response, (str, bytes)):  # a 200 reply that is not JSON (the client hands back its text)
        raise not_json_error(response if isinstance(response, str) else response.decode("utf-8", "replace"))
    choices = _field(response, "choices")
    if not choices:
        return TeacherReply("", "empty")
    if not isinstance(choices, (list, tuple)):
        raise _schema_error(f"`choices` is {type(choices).__name__}, not a list")
    message, finish = _field(choices[0], "message"), _field(choices[0], "finish_reason")
    usage = _field(response, "usage")
    return TeacherReply(
        text=_content_text(_field(message, "content")),
        finish_reason=finish if isinstance(finish, str) else None,
        prompt_tokens=_count(_field(usage, "prompt_tokens")),
        completion_tokens=_count(_field(usage, "completion_tokens")),
    )


def _field(value, name: str):
    """value.name or value[name] (the client leaves unexpected shapes as plain dicts), else None."""
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None) if value is not None and not isinstance(value, (str, bytes, list)) else None


def _content_text(content) -> str:
    """A message's content: text, or the text parts of a list of parts; anything else is refused."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(_field(part, "text"), str) for part in content):
        return "".join(_field(part, "text") for part in content)
    raise _schema_error(f"the message's `content` is {type(content).__name__}, not text")


def _count(value) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _schema_error(what: str) -> TeacherCallError:
    return TeacherCallError("wrong_schema", f"wrong_schema: {what} (the reply is not chat-completions JSON)",
                            retryable=True)


# Reasons no retry and no other call can fix: the build stops at the first one instead of asking again.
FATAL_REASONS = ("not_json",)


def not_json_error(body: str) -> TeacherCallError:
    """A 200 reply whose body is not the chat-completions JSON: usually a wrong base URL (a web page)."""
    head = body.lstrip()[:200].lower()
    if head.startswith(("<!doctype", "<html", "<head", "<?xml")) or "<html" in head:
        what = "the endpoint answered HTML (is the base URL right? it usually ends in /v1)"
    else:
        what = f"the endpoint answered {body.strip()[:60]!r} instead of chat-completions JSON (is the base URL right? it usually ends in /v1)"
    return TeacherCallError("not_json", f"not_json: {what}", retryable=False)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None


class LocalTeacher:
    """The studio's loaded model as teacher, so the pipeline runs with no API key.

    It runs under a lease the build job holds on the model for its whole duration, one call at a time.
    """

    max_concurrency = 1
    secrets: tuple[str, ...] = ()

    def __init__(self, loaded, max_new_tokens_cap: int = 1024):
        from studio.model.manager import reply_text

        self._loaded = loaded
        self._reply_text = reply_text
        self._cap = max_new_tokens_cap
        self.label = f"local model {loaded.spec.name_or_path}"

    def complete(self, messages, temperature, max_tokens, json_mode) -> TeacherReply:
        from studio.model.generation import GenerationSettings

        settings = GenerationSettings(min(max_tokens, self._cap), temperature, 0.9, 1.05)
        tokenizer = self._loaded.tokenizer
        text = self._reply_text(self._loaded, messages, settings)
        completion_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        finish = "length" if completion_tokens >= settings.max_new_tokens else "stop"
        return TeacherReply(text, finish, 0, completion_tokens)


@dataclass
class RetryPolicy:
    """How often and how patiently a call is tried again."""

    max_attempts: int = field(default=3, metadata={"help": "Attempts per call, the first included."})
    base_delay_s: float = field(default=1.0, metadata={"help": "First back-off; doubles each retry, with jitter."})


def call_with_retries(attempt: Callable[[], object], policy: RetryPolicy, cancel: threading.Event,
                      on_attempt: Callable[[], None] = lambda: None,
                      on_retry: Callable[[str, float], None] = lambda reason, wait: None):
    """Run `attempt` until it returns, is out of attempts, or `cancel` is set.

    `attempt` raises TeacherCallError for a failed try (retryable or not). Returns the attempt's
    result; raises the last TeacherCallError when every try failed.
    """
    if policy.max_attempts < 1:
        raise StudioError(f"Attempts per teacher call must be at least 1, not {policy.max_attempts}.")
    last: TeacherCallError | None = None
    for number in range(policy.max_attempts):
        if cancel.is_set():
            raise TeacherCallError("cancelled", "cancelled", retryable=False)
        on_attempt()
        try:
            return attempt()
        except TeacherCallError as exc:
            last = exc
            if not exc.retryable or number == policy.max_attempts - 1:
                break
            wait = exc.retry_after if exc.retry_after is not None else policy.base_delay_s * (2 ** number)
            wait *= 1.0 if exc.retry_after is not None else random.uniform(0.75, 1.25)
            on_retry(exc.reason, wait)
            if cancel.wait(wait):
                raise TeacherCallError("cancelled", "cancelled", retryable=False) from None
    assert last is not None
    raise last


CONNECTION_HINTS = {  # what to do about a failed test call, by its reason
    "connection": "Check the base URL and that the server is running (local servers answer under /v1).",
    "timeout": "The server did not answer in time: check that it is running, or raise the timeout.",
    "http_401": "Check the API key.",
    "http_403": "Check the API key and that it may use this model.",
    "http_404": "Check that the base URL ends in /v1 and that the model name exists there.",
}


def check_connection(teacher: Teacher) -> str:
    """A one-token round trip; returns a short report or raises TeacherCallError that says what to check."""
    started = time.time()
    try:
        reply = teacher.complete([{"role": "user", "content": "Reply with the single word OK."}], 0.0, 8, False)
    except TeacherCallError as exc:
        hint = CONNECTION_HINTS.get(exc.reason)
        if hint is None:
            raise
        # no answer at all: said in a sentence of its own (the client library's "Connection error." added nothing)
        error = {"connection": f"Could not connect to {teacher.label}.",
                 "timeout": f"No answer from {teacher.label}."}.get(exc.reason, str(exc))
        raise TeacherCallError(exc.reason, f"{error} {hint}", exc.retryable, exc.retry_after) from None
    return f"Connected to {teacher.label} in {time.time() - started:.1f}s; it replied {reply.text.strip()[:40]!r}."
