"""One place that registers every event handler of the studio's page.

Each tab asks the registry to wire its events: `registry.on(button.click, handler, inputs, outputs,
action="train", name="start_training", args=(...))`. The registry

- skips the event entirely when the access policy forbids its action (a demo page has no endpoint
  for loading, files, datasets, training, adapters, reports or teacher calls, named or by fn_index);
- checks the policy again on every call (services check it a third time);
- checks every argument against its spec on the server (numbers in range, a choice from its list,
  an id from the catalog, an upload of an allowed type and size, text of bounded length), because the
  browser's sliders and dropdowns bound nothing for a caller of the HTTP API;
- turns a StudioError into a gr.Error with its message, and any other error into a short message
  without a traceback; in demo mode, server paths in messages and marked outputs are cut to file names;
- remembers the uploads each session handed to a handler and deletes them when the session ends.

Events the page fires on itself (a change, the load, a selection) show no progress unless told.
`registry.table()` lists what was registered and what was left out, for tests and for the README.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gradio as gr

from studio.catalog import UPLOAD_SUFFIXES
from studio.errors import StudioError
from studio.ui.i18n import handler_language, text, translate, translate_outputs

log = logging.getLogger(__name__)
# Events the page fires on itself (a value another event set, the page's load, a table row picked), not a press of
# a button: their handlers read and show at once, so they show no progress unless told (an overlay only flickers)
QUIET_TRIGGERS = ("change", "load", "select")
_ABS_PATH = re.compile(r"(?<![\w.:/~-])(?:~|/)(?:[^\s/\"'`|,;()<>*]+/)+([^\s/\"'`|,;()<>*]*)")


class BadArgument(StudioError):
    """An argument outside its allowed range or list."""


# ----- argument specs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    """A number between `lo` and `hi` (inclusive); `integer` refuses fractions; None/'' allowed when `optional`."""

    label: str
    lo: float
    hi: float
    integer: bool = False
    optional: bool = False

    def check(self, value, ctx):
        if value is None or value == "":
            if self.optional:
                return value
            raise BadArgument(f"{self.label}: a number is needed.")
        if isinstance(value, bool):
            raise BadArgument(f"{self.label}: a number is needed (got {value!r}).")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise BadArgument(f"{self.label}: a number is needed (got {str(value)[:40]!r}).") from None
        if not math.isfinite(number) or not self.lo <= number <= self.hi:
            raise BadArgument(f"{self.label} must be between {_bound(self.lo)} and {_bound(self.hi)} "
                              f"(got {str(value)[:40]}).")
        if self.integer:
            if number != int(number):
                raise BadArgument(f"{self.label} must be a whole number (got {value}).")
            return int(number)
        return number


def _bound(number: float) -> str:
    """A range's end as a person writes it: 1,000,000 rather than 1e+06."""
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


@dataclass(frozen=True)
class NumOrWord:
    """A whole number in range, or one of a few words (e.g. 'auto')."""

    label: str
    lo: int
    hi: int
    words: tuple[str, ...] = ("auto", "")

    def check(self, value, ctx):
        if isinstance(value, str) and value.strip().lower() in self.words:
            return value.strip().lower()
        try:
            return str(Num(self.label, self.lo, self.hi, integer=True).check(value, ctx))
        except BadArgument:
            words = " or ".join(word for word in self.words if word)
            raise BadArgument(f"{self.label}: a whole number from {self.lo} to {self.hi}, or {words}, is needed "
                              f"(got {str(value)[:40]!r}).") from None


@dataclass(frozen=True)
class Choice:
    """One value (or, with `many`, a list of values) from `options` (a tuple or a function returning one)."""

    label: str
    options: Any
    many: bool = False
    optional: bool = False

    def check(self, value, ctx):
        allowed = list(self.options() if callable(self.options) else self.options)
        values = value if self.many else [value]
        if self.many and not isinstance(value, (list, tuple)):
            raise BadArgument(f"{self.label}: a list is needed.")
        for item in values:
            if self.optional and item in (None, ""):
                continue
            if item not in allowed:
                raise BadArgument(f"{self.label}: unknown choice '{str(item)[:60]}'.")
        return value


@dataclass(frozen=True)
class Id:
    """An id from the catalog's list of `kind` (documents, datasets, runs); refused as 'unknown' otherwise."""

    label: str
    kind: str
    optional: bool = False

    def check(self, value, ctx):
        if self.optional and value in (None, ""):
            return value
        if isinstance(value, str) and value in ctx.ids(self.kind):
            return value
        if value in (None, ""):  # nothing picked: said so, not "unknown run 'None'"
            raise BadArgument(f"Pick a {self.kind.rstrip('s')} from the list first.")
        raise BadArgument(f"unknown {self.kind.rstrip('s')} '{Path(str(value)[:60]).name}': pick one from the list.")


@dataclass(frozen=True)
class Text:
    label: str
    max_chars: int = 20_000

    def check(self, value, ctx):
        if value is None:
            return ""
        if not isinstance(value, str):
            raise BadArgument(f"{self.label}: text is needed.")
        if len(value) > self.max_chars:
            raise BadArgument(f"{self.label} is too long ({len(value):,} characters; at most {self.max_chars:,}).")
        return value


def _text_size(value, depth: int = 0) -> int:
    """Characters of every string inside chat messages as the browser sent them (keys included)."""
    if isinstance(value, str):
        return len(value)
    if depth > 5:
        raise BadArgument("A chat message is nested too deeply.")
    if isinstance(value, dict):
        return sum(_text_size(k, depth + 1) + _text_size(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_text_size(item, depth + 1) for item in value)
    return len(str(value)) if value is not None else 0


def _text_only(content) -> bool:
    """Whether a chat message's content is text: a string, or a list of strings and text parts."""
    if content is None or isinstance(content, str):
        return True
    if isinstance(content, (list, tuple)):
        return all(isinstance(part, str) or (isinstance(part, dict) and part.get("type") == "text"
                                             and isinstance(part.get("text", ""), str)) for part in content)
    return False


@dataclass(frozen=True)
class History:
    """A chat's earlier turns as the chatbot sends them back: at most `max_messages` messages of the user
    or the assistant, with at most `max_chars` characters together (the API server's limits), checked
    before anything renders or tokenizes them or waits for the model."""

    label: str
    max_messages: int = 200
    max_chars: int = 100_000

    def check(self, value, ctx):
        if value in (None, ""):
            return []
        if not isinstance(value, list):
            raise BadArgument(f"{self.label}: a list is needed.")
        if len(value) > self.max_messages:
            raise BadArgument(f"{self.label} holds {len(value):,} messages; at most {self.max_messages:,} are accepted.")
        for message in value:
            role = message.get("role") if isinstance(message, dict) else getattr(message, "role", None)
            if role not in ("user", "assistant"):
                raise BadArgument(f"{self.label}: a message's role must be user or assistant (got {str(role)[:20]}).")
            content = message.get("content") if isinstance(message, dict) else getattr(message, "content", None)
            if not _text_only(content):  # a file part would be answered with its path on the server
                raise BadArgument(f"{self.label}: a message may hold text only.")
        total = _text_size(value)
        if total > self.max_chars:
            raise BadArgument(f"{self.label} is too long ({total:,} characters; at most {self.max_chars:,}).")
        return value


def _upload_folder() -> Path:
    """Where Gradio keeps what browsers upload (GRADIO_TEMP_DIR, else its default)."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder()).resolve()


@dataclass(frozen=True)
class Upload:
    """A file the browser uploaded (Gradio only passes files from its upload folder): type and size checked."""

    label: str
    suffixes: tuple[str, ...] = UPLOAD_SUFFIXES

    def check(self, value, ctx):
        if value in (None, ""):
            return None
        path = Path(str(value))
        try:
            size = path.stat().st_size
            inside = path.resolve().is_relative_to(_upload_folder())
        except (OSError, ValueError):
            inside = False
        if not inside:  # Gradio hands over uploads only; anything else is never read, nor deleted at session end
            raise BadArgument(f"{self.label}: the upload is gone; upload it again.")
        ctx.remember_upload(path)  # deleted with the session, a refused file too
        if path.suffix.lower() not in self.suffixes:
            raise BadArgument(f"{self.label}: only {', '.join(self.suffixes)} files are accepted.")
        if size > ctx.max_upload_bytes:
            raise BadArgument(f"{self.label}: the file is larger than {ctx.max_upload_bytes / 2**20:g} MB.")
        return str(path)


@dataclass(frozen=True)
class Flag:
    """True or false (a checkbox); anything else, the string "false" included, is refused."""

    label: str

    def check(self, value, ctx):
        if isinstance(value, bool):
            return value
        raise BadArgument(f"{self.label}: true or false is needed (got {str(value)[:40]!r}).")


class Any_:
    """No check: a value a component's own preprocessing already bounds (a checkbox, a table, a gr.State)."""

    def check(self, value, ctx):
        return value


ANY = Any_()


# ----- the registry -----------------------------------------------------------------------------
@dataclass
class Registered:
    name: str
    actions: tuple[str, ...]
    registered: bool
    dependency: Any = None
    args: tuple = ()  # the argument specs, whose labels name the field in a refusal


@dataclass
class Registry:
    """Wires a tab's events through the policy, argument checks and error mapping. One per app."""

    policy: Any
    catalog: Any
    max_upload_bytes: int = 20 * 2**20
    entries: list[Registered] = field(default_factory=list)
    # demo mode: the ids of a kind a visitor may name (the attached runs and their documents), so that a
    # refusal reads the same whether the owner has such a file or not
    demo_ids: Callable[[str], list[str]] | None = None
    _uploads: dict[str, set[Path]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def for_services(cls, services) -> "Registry":
        from studio.evaluate.service import demo_visible_ids

        registry = cls(services.policy, services.catalog, int(services.max_upload_mb * 2**20))
        if services.policy.is_demo:
            registry.demo_ids = lambda kind: demo_visible_ids(services.manager, services.catalog, kind)
        return registry

    def ids(self, kind: str) -> list[str]:
        """The ids of `kind` (documents, datasets, runs) an argument may name."""
        return self.demo_ids(kind) if self.demo_ids is not None else self.catalog.ids(kind)

    @property
    def demo(self) -> bool:
        return self.policy.is_demo

    def on(self, trigger: Callable, fn: Callable, inputs=None, outputs=None, *, action: str | tuple[str, ...],
           name: str | None = None, args: tuple = (), scrub: bool = False, generated: bool = False,
           quiet: bool = False, **event_kwargs):
        """Register `fn` on `trigger` (a bound event such as `button.click`) unless the policy forbids `action`.

        `name` becomes the api_name (None: a hidden endpoint, still callable by fn_index, still checked).
        `args` holds one spec per input. `generated`: the handler returns what the model wrote, shown
        exactly as written (never translated); its errors are still translated. `quiet`: a refusal or
        failure leaves the outputs as they are and shows no message box, for an event that shares its
        trigger and its inputs with one that says the same problem (one message box, not three).
        Returns the event (for `cancels=`/`.then`) or None if left out.
        """
        actions = (action,) if isinstance(action, str) else tuple(action)
        label = name or getattr(fn, "__name__", "handler")
        if not all(self.policy.allows(a) for a in actions):
            self.entries.append(Registered(label, actions, False))
            return None
        inputs_list = inputs if isinstance(inputs, (list, tuple)) else ([] if inputs is None else [inputs])
        if args and len(args) != len(inputs_list):
            raise ValueError(f"{label}: {len(inputs_list)} inputs but {len(args)} argument specs")
        outputs_list = outputs if isinstance(outputs, (list, tuple)) else ([] if outputs is None else [outputs])
        wrapped = self._wrap(fn, actions, tuple(args), label, scrub, generated, len(outputs_list) if quiet else None)
        if getattr(trigger, "event_name", None) in QUIET_TRIGGERS:
            event_kwargs.setdefault("show_progress", "hidden")
        if event_kwargs.get("show_progress") == "hidden":
            # No loading status for an event that shows none: the page updates the status of every component any
            # event ever marked on each later event, copying each one's state (the language switch marks ~200
            # components, and every poll then cost the browser ~200 state copies)
            event_kwargs.setdefault("show_progress_on", [])
        event = trigger(wrapped, inputs, outputs, api_name=name if name else False, **event_kwargs)
        self.entries.append(Registered(label, actions, True, event, tuple(args)))
        return event

    def unload(self, app: gr.Blocks, fn: Callable | None = None) -> None:
        """On session end: run `fn(request)` (if any) and delete the uploads that session handed in."""
        def on_close(request: gr.Request):
            try:
                if fn is not None:
                    fn(request)
            finally:
                self.forget_uploads(request.session_hash or "")

        app.unload(on_close)
        self.entries.append(Registered("session end", ("view",), True))

    def table(self) -> list[tuple[str, tuple[str, ...], bool]]:
        return [(e.name, e.actions, e.registered) for e in self.entries]

    # ----- uploads -------------------------------------------------------------------------------
    def remember_upload(self, path: Path) -> None:
        from gradio.context import LocalContext

        request = LocalContext.request.get(None)
        session = getattr(request, "session_hash", None) or ""
        with self._lock:
            self._uploads.setdefault(session, set()).add(path)

    def forget_uploads(self, session: str) -> None:
        with self._lock:
            paths = self._uploads.pop(session, set())
        for path in paths:
            path.unlink(missing_ok=True)
            try:
                path.parent.rmdir()  # Gradio keeps each upload in a folder named by its hash
            except OSError:
                pass

    # ----- the wrapper ---------------------------------------------------------------------------
    def scrub_text(self, text: str) -> str:
        """In demo mode, absolute paths cut to their last part; unchanged otherwise."""
        return _ABS_PATH.sub(lambda m: m.group(1) or "…", text) if self.demo and isinstance(text, str) else text

    def _scrub_value(self, value):
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, tuple):
            return tuple(self._scrub_value(v) for v in value)
        if isinstance(value, list):
            return [self._scrub_value(v) for v in value]
        if isinstance(value, dict) and "__type__" in value:
            return {k: (self._scrub_value(v) if k in ("value", "choices", "info", "label") else v)
                    for k, v in value.items()}
        return value

    def _error(self, exc: Exception, label: str, lang: str = "en") -> gr.Error:
        if isinstance(exc, StudioError):
            return gr.Error(translate(self.scrub_text(str(exc)), lang))
        log.exception("handler %s failed", label)
        error = type(exc).__name__ + ("" if self.demo else f": {str(exc)[:300]}")
        return gr.Error(text("messages", "handler_failed", lang).format(name=label, error=error))

    def _checked(self, actions, specs, args, label):
        self.policy.require(*actions)
        if not specs:
            return args
        args = list(args)
        for index, spec in enumerate(specs):
            if index < len(args):
                args[index] = spec.check(args[index], self)
        return tuple(args)

    def _wrap(self, fn, actions, specs, label, scrub, generated=False, quiet_outputs: int | None = None):
        """The handler behind the policy and argument checks; its messages and errors in the page's language
        (what the model generated is shown exactly as written). With `quiet_outputs` (the number of outputs),
        a failure skips them all instead of raising."""
        scrub_value = self._scrub_value if (scrub and self.demo) else (lambda value: value)
        if quiet_outputs is not None:
            if inspect.isgeneratorfunction(fn):
                raise ValueError(f"{label}: a streaming handler cannot be quiet")
            checked = self._wrap(fn, actions, specs, label, scrub, generated)

            @functools.wraps(fn)
            def quiet_wrapper(*args, **kwargs):
                try:
                    return checked(*args, **kwargs)
                except Exception:  # noqa: BLE001 - the event beside it on the same trigger shows the message
                    return gr.skip() if quiet_outputs == 1 else tuple(gr.skip() for _ in range(quiet_outputs))
            return quiet_wrapper

        def finish(value, lang: str):
            value = scrub_value(value)
            return value if generated else translate_outputs(value, lang)

        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                lang = page_language()
                try:
                    args = self._checked(actions, specs, args, label)
                    for value in fn(*args, **kwargs):
                        yield finish(value, lang)
                except gr.Error as exc:
                    raise _translated(exc, lang)
                except Exception as exc:  # noqa: BLE001 - every failure becomes a message, never a traceback
                    raise self._error(exc, label, lang) from exc
            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            lang = page_language()
            try:
                args = self._checked(actions, specs, args, label)
                return finish(fn(*args, **kwargs), lang)
            except gr.Error as exc:
                raise _translated(exc, lang)
            except Exception as exc:  # noqa: BLE001
                raise self._error(exc, label, lang) from exc
        return wrapper


def _translated(error: gr.Error, lang: str) -> gr.Error:
    """A gr.Error a handler raised itself (e.g. from the tables' English text), shown in the page's language."""
    error.message = translate(error.message, lang) if isinstance(error.message, str) else error.message
    return error


def page_language() -> str:
    """The language of the page whose event is being handled (English outside an event)."""
    from gradio.context import LocalContext

    return handler_language(LocalContext.request.get(None))
