"""Helpers shared by the tabs: turning studio errors into Gradio messages, permission checks."""

from __future__ import annotations

import functools
import html
import inspect
import time
from dataclasses import dataclass

import gradio as gr

from studio.errors import StudioError
from studio.ui.i18n import handler_language, text, translate, translate_outputs


def user_errors(fn):
    """Show a StudioError (busy, not loaded, bad input, not allowed) as a Gradio error toast.

    Works for plain functions and generators; the message is the error's own text, which never
    holds a secret. Messages and returned texts are shown in the page's language: the wrapper asks
    Gradio for the request (an extra positional parameter, invisible to API callers) to know it.
    """
    index, added, signature = _with_request(fn)

    def split(args, kwargs):
        """The handler's own arguments, and the page's language from the request among them."""
        args = list(args)
        request = kwargs.get("request")
        if len(args) > index and (args[index] is None or isinstance(args[index], gr.Request)):
            request = args.pop(index) if added else args[index]
        return args, handler_language(request)

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            args, lang = split(args, kwargs)
            try:
                for value in fn(*args, **kwargs):
                    yield translate_outputs(value, lang)
            except StudioError as exc:
                raise gr.Error(translate(str(exc), lang)) from exc
        _expose(gen_wrapper, fn, signature, added)
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args, lang = split(args, kwargs)
        try:
            return translate_outputs(fn(*args, **kwargs), lang)
        except StudioError as exc:
            raise gr.Error(translate(str(exc), lang)) from exc
    _expose(wrapper, fn, signature, added)
    return wrapper


def _expose(wrapper, fn, signature: inspect.Signature, added: bool) -> None:
    wrapper.__signature__ = signature
    if added:  # Gradio finds the request parameter by its type hint
        wrapper.__annotations__ = {**getattr(fn, "__annotations__", {}), "_page_request": gr.Request}


def _with_request(fn) -> tuple[int, bool, inspect.Signature]:
    """Where the request is among `fn`'s positional arguments, whether it was added, and the signature
    Gradio should see. A handler that takes `request: gr.Request` keeps its own; others get an extra
    `_page_request` after their last positional parameter (before any *args), which Gradio fills and
    the wrapper removes again. API callers never see it."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    if "request" in signature.parameters:
        return params.index(signature.parameters["request"]), False, signature
    position = next((i for i, p in enumerate(params) if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)),
                    len(params))
    extra = inspect.Parameter("_page_request", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                              annotation=gr.Request)
    return position, True, signature.replace(parameters=params[:position] + [extra] + params[position:])


@dataclass
class JobPanel:
    """Progress bar, status line and log tail of the latest job of one kind, polled by cursor.

    Each browser session keeps its own cursor in gr.State, so a reload replays the job's whole log
    from the start and a second viewer sees the same progress.
    """

    board: object
    kind: str
    message: gr.Markdown
    progress: gr.HTML
    log: gr.Textbox
    state: gr.State
    timer: gr.Timer
    finished: gr.Textbox

    def on_finish(self, fn, outputs) -> None:
        """Run `fn(job)` once per session when the latest job ends (or is found ended after a reload)."""
        self.finished.change(lambda job_id: fn(self.board.get(job_id)) if job_id else (gr.skip(),) * len(outputs),
                             self.finished, outputs, api_name=False)


LOG_LINES = 300


def progress_html(job, lang: str = "en") -> str:
    if job is None:
        return ""
    latest = job.latest("progress") or {}
    done, total = latest.get("done", 0), latest.get("total", 0)
    fraction = done / total if total else (1.0 if not job.running else 0.0)
    colour = {"failed": "#d9534f", "cancelled": "#999"}.get(job.status.value, "#2f9e44")
    status = text("status", f"job_{job.status.value}", lang)
    message = html.escape(translate(latest.get("message", ""), lang) or status)
    return (f"<div class='job-progress'><div style='background:#eee;border-radius:4px;height:14px'>"
            f"<div style='width:{fraction:.1%};background:{colour};height:14px;border-radius:4px'></div></div>"
            f"<div>{html.escape(job.name)} · {html.escape(status)} · {message} · {job.elapsed:.0f}s</div></div>")


def _log_line(event: dict, lang: str = "en") -> str | None:
    if event["type"] not in ("log", "status") or not event.get("message"):
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(event["t"]))
    message = event["message"]
    if event["type"] == "status" and message == event.get("status"):
        message = text("status", f"job_{message}", lang)
    return f"[{stamp}] {translate(message, lang)}"


def metric_frames(metrics: list[dict]):
    """Long-form frames for the loss plot (train and eval loss) and the learning-rate plot."""
    import pandas as pd

    loss = [{"step": m["step"], "value": m[key], "series": label} for m in metrics
            for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")) if m.get(key) is not None]
    rate = [{"step": m["step"], "value": m["learning_rate"], "series": "learning rate"} for m in metrics
            if m.get("learning_rate") is not None]
    empty = pd.DataFrame({"step": [], "value": [], "series": []})
    return (pd.DataFrame(loss) if loss else empty), (pd.DataFrame(rate) if rate else empty)


def job_panel(board, kind: str, s: dict, poll_s: float = 1.0, plots: bool = False) -> JobPanel:
    message = gr.Markdown()
    progress = gr.HTML()
    plot_outputs = []
    if plots:
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="value", color="series", label=s.get("loss_plot", "Loss"), height=280)
            lr_plot = gr.LinePlot(x="step", y="value", color="series", label=s.get("lr_plot", "Learning rate"), height=280)
        plot_outputs = [loss_plot, lr_plot]
    log = gr.Textbox(label=s.get("log", "Log"), lines=8, max_lines=16, interactive=False, autoscroll=True,
                     elem_classes=["mono"], elem_id=f"{kind}-log")
    state = gr.State({"job": None, "cursor": 0, "lines": [], "finished": None, "metrics": []})
    timer = gr.Timer(poll_s)
    finished = gr.Textbox(visible=False)
    panel = JobPanel(board, kind, message, progress, log, state, timer, finished)
    skips = (gr.skip(),) * len(plot_outputs)

    def poll(view: dict, request: gr.Request = None):
        lang = handler_language(request)
        job = board.latest(kind)
        if job is None:
            return (gr.skip(), gr.skip(), view, gr.skip()) + skips
        if view.get("job") != job.id:
            view = {"job": job.id, "cursor": 0, "lines": [], "finished": None, "metrics": []}
        running = job.running
        events, cursor = job.events_since(view["cursor"])
        lines = (view["lines"] + [line for line in (_log_line(e, lang) for e in events) if line])[-LOG_LINES:]
        new_metrics = [e for e in events if e["type"] == "metric"]
        view = {**view, "cursor": cursor, "lines": lines, "metrics": view["metrics"] + new_metrics}
        newly_finished = not running and not events and view.get("finished") != job.id
        if newly_finished:
            view["finished"] = job.id
        if not events and not running and not newly_finished:
            return (gr.skip(), gr.skip(), view, gr.skip()) + skips
        plot_values = metric_frames(view["metrics"]) if (plots and new_metrics) else skips
        return (progress_html(job, lang), "\n".join(lines) if events else gr.skip(), view,
                job.id if newly_finished else gr.skip()) + tuple(plot_values)

    timer.tick(poll, state, [progress, log, state, finished] + plot_outputs, api_name=False, show_progress="hidden")
    return panel
