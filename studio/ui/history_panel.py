"""The runs history panel, shown in the Train and Compare tabs: past runs, rename, delete, open in Compare."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.services import Services
from studio.train import history
from studio.train.service import JOB_KIND
from studio.ui.i18n import text
from studio.ui.registry import ANY, Choice, Id, Text
from studio.ui.strings import strings

# what tells runs apart first (status, losses, report), what made them after; each column a width, so that none is
# squeezed to one character a line
COLUMNS = ("run", "date", "status", "train_loss", "eval_loss", "report", "settings", "dataset", "exam", "base")
WIDTHS = (220, 130, 80, 90, 90, 260, 230, 200, 170, 200)


def _rounded(value):
    return None if value is None else round(value, 4)


def _report_text(report: dict, lang: str) -> str:
    if not report:
        return ""
    values = {key: "-" if report.get(key) is None else report[key] for key in ("tuned_f1", "base_f1", "improved", "worse")}
    return text("history", "report_summary", lang).format(tuned=values["tuned_f1"], base=values["base_f1"],
                                                          improved=values["improved"], worse=values["worse"])


def history_frame(records: list[history.RunRecord], lang: str = "en") -> pd.DataFrame:
    """The history as a table with headers, statuses and summaries in `lang`; the first column is the run's name."""
    rows = []
    for r in records:
        exam = " · ".join(text("history", key, lang).format(count=count) for key, count in
                          (("exam_count", r.exam), ("heldout_exam", r.heldout)) if count is not None)
        settings = history.describe_settings(r.setting_parts, {key: text("history", f"set_{key}", lang)
                                                               for key in history.SETTING_TEXTS})
        rows.append([r.name, r.date, text("history", f"status_{r.status}", lang), _rounded(r.train_loss),
                     _rounded(r.eval_loss), _report_text(r.report, lang), settings, r.dataset, exam, r.base_model])
    return pd.DataFrame(rows, columns=[text("history", f"col_{c}", lang) for c in COLUMNS])


class HistoryPanel:
    """Layout in the tab that holds it; `wire` connects it once every tab exists (Open needs Compare's run box)."""

    def __init__(self, services: Services, api: bool = False):
        self.services, self.api, self.s = services, api, strings("history")
        self.shown = services.policy.allows("read_files")  # demo mode: no history (it names models and data)
        if self.shown:
            self._layout()

    def _layout(self) -> None:
        s = self.s
        with gr.Accordion(s["title"], open=False) as self.accordion:
            gr.Markdown(s["intro"])
            self.table = gr.Dataframe(self.frame("en"), interactive=False, wrap=True, max_height=320,
                                      column_widths=list(WIDTHS))
            with gr.Row():
                self.run = gr.Textbox(label=s["run"], scale=3)
                self.open_btn = gr.Button(s["open"], variant="primary", size="sm")
                self.refresh_btn = gr.Button(s["refresh"], size="sm")
            with gr.Row():
                self.new_name = gr.Textbox(label=s["new_name"], scale=3)
                self.rename_btn = gr.Button(s["rename"], size="sm")
                self.confirm = gr.Checkbox(False, label=s["confirm"])
                self.delete_btn = gr.Button(s["delete"], size="sm", variant="stop")
            self.message = gr.Markdown()

    def _running(self) -> set[str]:
        job = self.services.jobs.latest(JOB_KIND)
        return {Path(job.folder).name} if job is not None and job.running and job.folder else set()

    def frame(self, lang) -> pd.DataFrame:
        return history_frame(history.list_history(self.services.paths.runs_dir, self._running()), lang or "en")

    def wire(self, registry, run_pick: gr.Dropdown, tabs: gr.Tabs, language: gr.Radio, fresh_on=()) -> None:
        """Every event through the studio's registry: reading runs, renaming and deleting them are checked there.
        The table is read again when the panel opens, on the language switch and on each of `fresh_on` (a tab
        switch, a training run's end), so a run trained since the page was made shows without Refresh."""
        if not self.shown:
            return
        name = (lambda api_name: api_name) if self.api else (lambda api_name: None)
        lang = Choice("Language", ("en", "zh"), optional=True)
        run, new_name = Id("Run", "runs"), Text("New name", 200)
        registry.on(self.refresh_btn.click, self.frame, language, self.table, action="read_files",
                    name=name("runs_history"), args=(lang,))
        for trigger in (language.change, self.accordion.expand) + tuple(fresh_on):
            registry.on(trigger, self.frame, language, self.table, action="read_files", args=(lang,),
                        show_progress="hidden")
        registry.on(self.table.select, self.select, None, [self.run, self.new_name], action="read_files")
        registry.on(self.rename_btn.click, self.rename, [self.run, self.new_name, language],
                    [self.message, self.table, self.run], action="manage_adapters", name=name("rename_run"),
                    args=(run, new_name, lang))
        registry.on(self.delete_btn.click, self.delete, [self.run, self.confirm, language],
                    [self.message, self.table, self.run, self.confirm], action="manage_adapters",
                    name=name("delete_run"), args=(run, ANY, lang))
        registry.on(self.open_btn.click, self.open, self.run, [run_pick, tabs], action="compare", args=(run,))

    def select(self, event: gr.SelectData):
        row = event.row_value or []
        return (row[0], row[0]) if row else (gr.skip(), gr.skip())

    def rename(self, run_name, new_name, lang):
        self.services.policy.require("manage_adapters")
        folder = history.rename_run(self.services.paths.runs_dir, run_name, new_name, self.services.manager,
                                    self._running())
        message = self.s["renamed"].format(old=run_name, new=folder.name)
        return message, self.frame(lang), folder.name

    def delete(self, run_name, sure, lang):
        self.services.policy.require("manage_adapters")
        folder = history.delete_run(self.services.paths.runs_dir, run_name, sure is True, self.services.manager,
                                    self._running())
        return self.s["deleted"].format(name=folder.name), self.frame(lang), "", False

    def open(self, run_name):
        """The run in the Compare tab's run box (by its id, the folder name), and the Compare tab."""
        folder = history.resolve_run(self.services.paths.runs_dir, run_name or "")
        return gr.update(value=folder.name), gr.Tabs(selected="compare")


def wire_history(panels: list[HistoryPanel], registry, run_pick, tabs, language, fresh_on=()) -> None:
    for panel in panels:
        panel.wire(registry, run_pick, tabs, language, fresh_on)
