"""The one owner of the GPU: the model, the tokenizer, a lock and a visible state.

Every tab and CLI command goes through a single `ModelManager`. An action that needs the model takes
a `Lease` with `acquire()`; when another action holds it, the call is refused at once with a message
that says what the model is doing (the server refuses, not just a disabled button). A lease may be
released from another thread, so a training job can take it in the request and give it back when
its worker thread ends.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator

from studio.errors import ModelBusyError, ModelLoadError, ModelNotLoadedError
from studio.model import card as model_card
from studio.model import loading
from studio.model.decoding import Decoder, make_decoder
from studio.model.generation import GenerationSettings, render_prompt

DEFAULT_DECODE_MODE = "graphs"
BASE_COLUMN, ADAPTER_COLUMN = "base", "adapter"


class ModelState(str, Enum):
    EMPTY = "empty"
    LOADING = "loading"
    READY = "ready"
    BUSY = "busy"


@dataclass(frozen=True)
class ManagerStatus:
    """A snapshot of the manager, safe to show to any viewer."""

    state: ModelState
    model_name: str | None = None
    quant: str | None = None
    device: str | None = None
    activity: str = ""
    progress: float = 0.0
    adapters: tuple[str, ...] = ()
    since: float = 0.0
    decoder: str = ""  # the decode mode (studio.model.decoding.DECODE_MODES)
    decoder_problem: str = ""  # why decoding runs slower than its mode promises, e.g. a failed graph recording


    def describe(self) -> str:
        if self.state is ModelState.EMPTY:
            return "No model loaded."
        if self.state is ModelState.LOADING:
            return f"Loading {self.model_name} ({self.progress:.0%}): {self.activity}"
        where = f"{self.model_name} ({loading.quant_label(self.quant)}, {self.device})"
        if self.state is ModelState.BUSY:
            return f"Busy: {self.activity} for {time.time() - self.since:.0f}s. Model: {where}"
        return (f"Ready: {where}" + (f"; adapters: {', '.join(self.adapters)}" if self.adapters else "")
                + (f". Warning: {self.decoder_problem}" if self.decoder_problem else ""))


@dataclass
class LoadedModel:
    """The model in memory. `adapters` maps each attached adapter's name to its folder."""

    spec: loading.ModelSpec
    model: object
    tokenizer: object
    device: str
    adapters: dict[str, str] = field(default_factory=dict)
    decode_mode: str = "graphs"  # see studio.model.decoding.DECODE_MODES
    submit: object = None  # runs a generation on the manager's one GPU thread
    decoder: Decoder | None = None  # chosen once, when the model loads (studio.model.decoding.make_decoder)


class Lease:
    """Exclusive use of the loaded model until `release()` (from any thread, once).

    A lease that may change the model (train, attach, delete) drops the decoder's recorded steps when
    it starts and when it ends: they replay the memory of the model as it was when recorded.
    """

    def __init__(self, manager: "ModelManager", loaded: LoadedModel | None, changes_model: bool = True):
        self._manager = manager
        self.loaded = loaded
        self._released = False
        self.changes_model = changes_model
        self._forget_recorded_steps()

    def _forget_recorded_steps(self) -> None:
        if self.changes_model and self.loaded is not None and self.loaded.decoder is not None:
            self.loaded.decoder.clear()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._forget_recorded_steps()
            self._manager._end_activity()


class ModelManager:
    """Loads one base model, attaches adapters to it, and serialises every use of it."""

    def __init__(self, device: str | None = None, decode_mode: str = DEFAULT_DECODE_MODE):
        self._device = device
        self.decode_mode = decode_mode
        from concurrent.futures import ThreadPoolExecutor

        self._gpu_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="studio-gpu")
        self._gpu_lock = threading.Lock()
        self._fields_lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._activity = ""
        self._progress = 0.0
        self._loading_spec: loading.ModelSpec | None = None
        self._since = 0.0

    # ----- state -------------------------------------------------------------------------------
    def status(self) -> ManagerStatus:
        with self._fields_lock:
            loaded, activity = self._loaded, self._activity
            if self._loading_spec is not None:
                return ManagerStatus(ModelState.LOADING, self._loading_spec.name_or_path, self._loading_spec.quant,
                                     activity=activity, progress=self._progress, since=self._since)
            if loaded is None:
                return ManagerStatus(ModelState.EMPTY, activity=activity, since=self._since)
            state = ModelState.BUSY if activity else ModelState.READY
            return ManagerStatus(state, loaded.spec.name_or_path, loaded.spec.quant, loaded.device, activity,
                                 adapters=tuple(loaded.adapters), since=self._since,
                                 decoder=loaded.decoder.mode if loaded.decoder else "",
                                 decoder_problem=loaded.decoder.problem if loaded.decoder else "")

    @property
    def is_loaded(self) -> bool:
        return self._loaded is not None

    def _end_activity(self) -> None:
        with self._fields_lock:
            self._activity = ""
            self._loading_spec = None
        self._gpu_lock.release()

    def _busy_message(self) -> str:
        status = self.status()
        what = status.activity or "another action"
        return f"The model is busy ({what}). Wait for it to finish, or stop it, then try again."

    # ----- exclusive use -----------------------------------------------------------------------
    def acquire(self, activity: str, need_model: bool = True, changes_model: bool = True) -> Lease:
        """Take the model for `activity`, or raise ModelBusyError / ModelNotLoadedError at once.

        `changes_model=False` promises the activity only generates (chat, compare)."""
        if not self._gpu_lock.acquire(blocking=False):
            raise ModelBusyError(self._busy_message())
        if need_model and self._loaded is None:
            self._gpu_lock.release()
            raise ModelNotLoadedError("No model is loaded. Load a base model in the Baseline Chat tab first.")
        with self._fields_lock:
            self._activity = activity
            self._since = time.time()
        return Lease(self, self._loaded, changes_model)

    @contextmanager
    def using(self, activity: str, need_model: bool = True, changes_model: bool = True) -> Iterator[LoadedModel]:
        lease = self.acquire(activity, need_model, changes_model)
        try:
            yield lease.loaded
        finally:
            lease.release()

    # ----- load / unload -----------------------------------------------------------------------
    def load(self, spec: loading.ModelSpec, progress: loading.Progress | None = None) -> ManagerStatus:
        """Load `spec`, replacing any model in memory. Refused while the model is busy.

        The new model's folder (or hub id), config and tokenizer are checked before the current model is
        released, so a mistyped name or a broken folder leaves the current model loaded and ready."""
        lease = self.acquire(f"loading {spec.name_or_path}", need_model=False)
        with self._fields_lock:
            self._loading_spec = spec
            self._progress = 0.0

        def report(fraction: float, message: str) -> None:
            with self._fields_lock:
                self._progress, self._activity = fraction, message
            if progress:
                progress(fraction, message)

        try:
            report(0.05, f"Resolving {spec.name_or_path}")
            source = loading.check_source(spec, report)  # a typo or a broken folder leaves the current model loaded
            self._install(*self._replace_model(spec, source, report))
        finally:
            lease.release()
        return self.status()

    def _replace_model(self, spec: loading.ModelSpec, source: str, report) -> tuple:
        """Drop the current model and load `spec` from `source`; if its weights fail, load the previous one again."""
        previous = self._loaded.spec if self._loaded is not None else None
        self._drop_model()
        try:
            return (spec, *loading.load_model(spec, self._device, report, source))
        except ModelLoadError as exc:
            if previous is None:
                raise
            failure = str(exc)
        self._install(previous, *loading.load_model(previous, self._device, report))
        raise ModelLoadError(f"{failure} The previous model {previous.name_or_path} was loaded again "
                             "(without its adapters).")

    def _install(self, spec: loading.ModelSpec, model, tokenizer, device: str) -> None:
        """Make a freshly loaded model the one in memory, with the decoder of the manager's decode mode."""
        with self._fields_lock:
            self._loaded = LoadedModel(spec, model, tokenizer, device, decode_mode=self.decode_mode,
                                       submit=self._gpu_thread.submit, decoder=make_decoder(self.decode_mode, device))

    def unload(self) -> ManagerStatus:
        with self.using("unloading", need_model=False):
            self._drop_model()
        return self.status()

    def _drop_model(self) -> None:
        with self._fields_lock:
            self._loaded = None
        free_memory()

    # ----- what the model is -------------------------------------------------------------------
    def card(self) -> model_card.ModelCard:
        loaded = self.require_loaded()
        return model_card.build_card(loaded.model, loaded.tokenizer, loaded.spec.name_or_path, loaded.spec.quant,
                                     loaded.device, loaded.adapters)

    def render_prompt(self, messages: list[dict]) -> str:
        """The exact templated string for `messages` (no lock needed: it only uses the tokenizer)."""
        return render_prompt(self.require_loaded().tokenizer, messages)

    def loaded_or_none(self) -> LoadedModel | None:
        """The model in memory, or None (for read-only views such as listing compatible adapters)."""
        return self._loaded

    def adapter_folder(self, name: str) -> str | None:
        """Where an attached adapter was loaded from (its run folder), or None."""
        loaded = self._loaded
        return loaded.adapters.get(name) if loaded is not None else None

    def require_loaded(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            raise ModelNotLoadedError("No model is loaded. Load a base model in the Baseline Chat tab first.")
        return loaded

    # ----- generation --------------------------------------------------------------------------
    def stream_chat(self, messages: list[dict], settings: GenerationSettings | None = None,
                    adapter: str | None = None, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield the growing reply to `messages`. `adapter=None` answers with the plain base model.

        The model is taken when the first piece is requested and given back when the stream ends,
        is stopped, or is abandoned by its consumer.
        """
        stop = stop or threading.Event()
        lease = self.acquire("generating a reply", changes_model=False)
        try:
            yield from stream_reply(lease.loaded, messages, settings or GenerationSettings(), adapter, stop)
        finally:
            stop.set()
            lease.release()

    def stream_side_by_side(self, messages: list[dict], adapter: str, settings: GenerationSettings | None = None,
                            stop: threading.Event | None = None) -> Iterator[tuple[str, str]]:
        """Yield growing (base reply, adapter reply) for the same messages, in one batched generation.

        Row 0 runs with every adapter off, row 1 with only `adapter` (studio.model.routing): the base
        column really is the base model, whatever other adapters are attached or active.
        """
        for columns in self.stream_columns(messages, adapter, settings, stop=stop):
            yield columns[BASE_COLUMN], columns[ADAPTER_COLUMN]

    def stream_columns(self, messages: list[dict], adapter: str, settings: GenerationSettings | None = None,
                       extra: dict[str, tuple[list[dict], str | None]] | None = None,
                       stop: threading.Event | None = None) -> Iterator[dict[str, str]]:
        """Yield every column of a comparison as it grows, all under one lease.

        BASE_COLUMN and ADAPTER_COLUMN come from one batched generation; then each `extra` column
        (name -> (messages, adapter or None)) in turn. Nothing else runs on the model between the
        columns: another session that asks for it is told the model is busy.
        """
        stop = stop or threading.Event()
        lease = self.acquire("comparing base and adapter", changes_model=False)
        try:
            yield from comparison_columns(lease.loaded, messages, adapter, settings or GenerationSettings(),
                                          extra or {}, stop)
        finally:
            stop.set()
            lease.release()

    def chat(self, messages: list[dict], settings: GenerationSettings | None = None, adapter: str | None = None) -> str:
        reply = ""
        for reply in self.stream_chat(messages, settings, adapter):
            pass
        return reply



def stream_reply(loaded: LoadedModel, messages: list[dict], settings: GenerationSettings, adapter: str | None,
                 stop: threading.Event) -> Iterator[str]:
    """The growing reply (with only `adapter`, or the plain base when None), for a caller that holds the lease."""
    for texts in loaded.decoder.stream(loaded, [messages], settings, [adapter], stop):
        yield texts[0]


def side_by_side(loaded: LoadedModel, messages: list[dict], adapter: str, settings: GenerationSettings,
                 stop: threading.Event) -> Iterator[tuple[str, str]]:
    """(base, adapter) replies in one batched generation, for a caller that already holds the lease."""
    if not hasattr(loaded.model, "peft_config") or adapter not in loaded.model.peft_config:
        from studio.errors import AdapterError

        raise AdapterError(f"Adapter {adapter!r} is not attached to the loaded model.")
    for base, tuned in loaded.decoder.stream(loaded, [messages, messages], settings, [None, adapter], stop):
        yield base, tuned


def comparison_columns(loaded: LoadedModel, messages: list[dict], adapter: str, settings: GenerationSettings,
                       extra: dict[str, tuple[list[dict], str | None]], stop: threading.Event) -> Iterator[dict[str, str]]:
    """Every column of a comparison as it grows (see ModelManager.stream_columns), under the caller's lease."""
    columns = {BASE_COLUMN: "", ADAPTER_COLUMN: ""}
    for columns[BASE_COLUMN], columns[ADAPTER_COLUMN] in side_by_side(loaded, messages, adapter, settings, stop):
        yield dict(columns)
    for name, (column_messages, column_adapter) in extra.items():
        if stop.is_set():
            return
        columns[name] = ""
        for columns[name] in stream_reply(loaded, column_messages, settings, column_adapter, stop):
            yield dict(columns)


def reply_text(loaded: LoadedModel, messages: list[dict], settings: GenerationSettings, adapter: str | None = None) -> str:
    """The whole reply, for a caller that already holds the model's lease."""
    reply = ""
    for reply in stream_reply(loaded, messages, settings, adapter, threading.Event()):
        pass
    return reply


def free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass
