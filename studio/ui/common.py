"""Helpers shared by the tabs: the job panel (progress, log, plots) polled by cursor."""

from __future__ import annotations

import html
import time
from dataclasses import dataclass

import gradio as gr

from studio.ui.i18n import column, handler_language, text, translate


@dataclass
class JobPanel:
    """Progress bar, status line and log tail of the latest job of one kind, polled by cursor.

    Each browser session keeps its own cursor in gr.State, so a reload replays the job's whole log
    from the start and a second viewer sees the same progress.

    The panel polls every `fast_s` while its job runs or has news, and every IDLE_POLL_S otherwise: each poll
    is an event the browser handles for the whole page (a few hundred milliseconds of a slow machine's main
    thread), so three panels polling each second kept a page busy doing nothing. The message line's changes
    (a job started or stopped from this page) and `wake_on`'s events bring the fast polls back at once.
    """

    board: object
    kind: str
    message: gr.Markdown
    progress: gr.HTML
    log: gr.Textbox
    state: gr.State
    timer: gr.Timer
    finished: gr.Textbox
    poll: object = None
    poll_outputs: list = None
    fast_s: float = 1.0
    registry: object = None
    action: str = ""

    def wire(self, registry, action: str, on_finish=None, finish_outputs=()) -> None:
        """Poll the job log on the timer and run `on_finish(job)` once per session when the latest job ends
        (or is found ended after a reload); both through the registry under `action`. Polls skip the queue:
        they are quick, and must not wait behind a reply being generated."""
        self.registry, self.action = registry, action
        registry.on(self.timer.tick, self.poll, self.state, self.poll_outputs, action=action,
                    show_progress="hidden", queue=False)
        self.wake_on(self.message.change)
        if on_finish is not None:
            outputs = list(finish_outputs) + [self.message]

            def finished(job_id):
                """`on_finish`'s values, and the message line cleared: "... started" no longer stands above the
                ended job's progress line."""
                job = self.board.get(job_id) if isinstance(job_id, str) and job_id else None
                if job is None:
                    return (gr.skip(),) * len(outputs)
                shown = on_finish(job)
                return (shown if isinstance(shown, tuple) else (shown,)) + ("",)

            registry.on(self.finished.change, finished, self.finished, outputs, action=action)

    def wake_on(self, *events) -> None:
        """Poll fast again after each of `events` (the page's language switched: the log is redrawn in it)."""
        for event in events:
            self.registry.on(event, self.wake, self.state, [self.timer, self.state], action=self.action,
                             show_progress="hidden", queue=False)

    def wake(self, view):
        """The fast pace, recorded in the session's view so that the next quiet poll slows the timer again."""
        view = view if isinstance(view, dict) else {}
        return gr.update(value=self.fast_s), {**view, "interval": self.fast_s}


LOG_LINES = 300
IDLE_POLL_S = 5.0  # how often a panel whose job is not running looks for a new one (a second viewer's, say)


def progress_html(job, lang: str = "en") -> str:
    if job is None:
        return ""
    latest = job.latest("progress") or {}
    done, total = latest.get("done", 0), latest.get("total", 0)
    fraction = done / total if total else (1.0 if not job.running else 0.0)
    colour = {"failed": "#d9534f", "cancelled": "#999"}.get(job.status.value, "#2f9e44")
    status = text("status", f"job_{job.status.value}", lang)
    message = latest.get("message", "")
    if not job.running and "eta" in latest:  # an ended run: the step it reached, no time still to go
        message = f"step {done}/{total} · epoch {latest.get('epoch') or 0:.2f}"
    message = html.escape(translate(message, lang) or status)
    return (f"<div class='job-progress'><div style='background:#eee;border-radius:4px;height:14px'>"
            f"<div style='width:{fraction:.1%};background:{colour};height:14px;border-radius:4px'></div></div>"
            f"<div>{html.escape(translate(job.name, lang))} · {html.escape(status)} · {message} · {job.elapsed:.0f}s</div></div>")


def _log_line(event: dict, lang: str = "en") -> str | None:
    if event["type"] not in ("log", "status") or not event.get("message"):
        return None
    stamp = time.strftime("%H:%M:%S", time.localtime(event["t"]))
    message = event["message"]
    if event["type"] == "status" and message == event.get("status"):
        message = text("status", f"job_{message}", lang)
    return f"[{stamp}] {translate(message, lang)}"


def metric_frames(metrics: list[dict], lang: str = "en"):
    """Long-form frames for the loss plot (train and eval loss), the learning-rate plot and the
    gradient-norm plot; series named in `lang`."""
    import pandas as pd

    def series(keys: tuple[tuple[str, str], ...]):
        rows = [{"step": m["step"], "value": m[key], "series": text("tables", f"col_{name}", lang)}
                for m in metrics for key, name in keys if m.get(key) is not None]
        return pd.DataFrame(rows) if rows else pd.DataFrame({"step": [], "value": [], "series": []})

    return (series((("loss", "train_loss"), ("eval_loss", "eval_loss"))),
            series((("learning_rate", "learning_rate"),)), series((("grad_norm", "grad_norm"),)))


def localized_frame(frame, lang: str, value_columns=()):
    """A table the page shows, its headers (and the report-column names in `value_columns`) in `lang`.

    Only the shown copy changes: CSV and JSON files keep the English keys.
    """
    if frame is None or not hasattr(frame, "rename"):  # English too: the files' keys (char_f1) read as words
        return frame
    frame = frame.copy()
    for name in value_columns:
        if name in frame:
            frame[name] = frame[name].map(lambda value: " = ".join(column(part, lang) for part in value.split(" = "))
                                          if isinstance(value, str) else value)
    return frame.rename(columns=lambda name: column(str(name), lang))


def job_panel(board, kind: str, s: dict, poll_s: float = 1.0, plots: bool = False) -> JobPanel:
    message = gr.Markdown()
    progress = gr.HTML()
    plot_outputs = []
    if plots:
        # no fixed height: a height cuts the loss plot's legend off; the one-series plots need no legend
        axes = dict(x="step", y="value", x_title=s.get("plot_step", "Step"), y_title=" ")
        with gr.Row():
            loss_plot = gr.LinePlot(color="series", color_title=" ", label=s.get("loss_plot", "Loss"), **axes)
            lr_plot = gr.LinePlot(label=s.get("lr_plot", "Learning rate"), **axes)
            grad_plot = gr.LinePlot(label=s.get("grad_plot", "Gradient norm"), **axes)
        plot_outputs = [loss_plot, lr_plot, grad_plot]
    log = gr.Textbox(label=s.get("log", "Log"), lines=8, max_lines=16, interactive=False, autoscroll=True,
                     elem_classes=["mono"], elem_id=f"{kind}-log")
    state = gr.State({"job": None, "cursor": 0, "lines": [], "finished": None, "metrics": []})
    timer = gr.Timer(poll_s)
    finished = gr.Textbox(visible=False)
    panel = JobPanel(board, kind, message, progress, log, state, timer, finished, fast_s=poll_s)
    skips = (gr.skip(),) * len(plot_outputs)

    def pace(view: dict, busy: bool):
        """The timer's new interval when it should change (and `view` records it), else a skip."""
        wanted = poll_s if busy else IDLE_POLL_S
        if view.get("interval") == wanted:
            return view, gr.skip()
        return {**view, "interval": wanted}, gr.update(value=wanted)

    def poll(view: dict, request: gr.Request = None):
        lang = handler_language(request)
        view = view if isinstance(view, dict) and isinstance(view.get("cursor", 0), int) else {}
        view = {"job": None, "cursor": 0, "lines": [], "finished": None, "metrics": [], **view}
        job = board.latest(kind)
        if job is None:
            view, interval = pace(view, False)
            return (gr.skip(), gr.skip(), view, gr.skip()) + skips + (interval,)
        if view.get("job") != job.id:
            view = {"job": job.id, "cursor": 0, "lines": [], "finished": None, "metrics": [], "lang": lang,
                    "interval": view.get("interval")}
        if view.get("lang") != lang:  # the page's language changed: the whole log, progress and plots again in it
            view = {**view, "lang": lang, "cursor": 0, "lines": [], "metrics": []}
        running = job.running
        events, cursor = job.events_since(view["cursor"])
        lines = (view["lines"] + [line for line in (_log_line(e, lang) for e in events) if line])[-LOG_LINES:]
        new_metrics = [e for e in events if e["type"] == "metric"]
        view = {**view, "cursor": cursor, "lines": lines, "metrics": view["metrics"] + new_metrics}
        newly_finished = not running and not events and view.get("finished") != job.id
        if newly_finished:
            view["finished"] = job.id
        view, interval = pace(view, running or bool(events) or newly_finished)
        if not events and not running and not newly_finished:
            return (gr.skip(), gr.skip(), view, gr.skip()) + skips + (interval,)
        plot_values = metric_frames(view["metrics"], lang) if (plots and new_metrics) else skips
        return (progress_html(job, lang), "\n".join(lines) if events else gr.skip(), view,
                job.id if newly_finished else gr.skip()) + tuple(plot_values) + (interval,)

    panel.poll, panel.poll_outputs = poll, [progress, log, state, finished] + plot_outputs + [timer]
    return panel
