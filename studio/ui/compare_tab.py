"""Compare tab: base vs retrieval vs fine-tuned, side by side, and the scored report."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data.datasets import read_dataset
from studio.data.teacher import TeacherConfig
from studio.errors import StudioError
from studio.evaluate import service
from studio.evaluate.report import table_rows
from studio.evaluate.retrieval import SectionRetriever, retrieval_messages
from studio.model.generation import GenerationSettings, build_messages
from studio.services import SAMPLE_DOCUMENT, Services
from studio.train import adapters
from studio.ui.common import job_panel, user_errors
from studio.ui.history_panel import HistoryPanel
from studio.ui.strings import strings

ADAPTER_COLUMNS = ["name", "status", "attached", "train loss", "eval loss", "dataset", "base", "problem"]
SUMMARY_COLUMNS = ["column", "char_f1", "rouge_l", "judge_mean", "improved", "worse"]
QUESTION_COLUMNS = ["#", "question", "reference", "column", "answer", "char_f1", "rouge_l", "judge", "judge_reason"]


def _rounded(value):
    return None if value is None else round(value, 4)


class CompareTab:
    """Builds the tab's components, then wires each event to one handler method."""

    def __init__(self, services: Services, app: gr.Blocks):
        self.services, self.app, self.s = services, app, strings("compare")
        self.manager, self.policy, self.board = services.manager, services.policy, services.jobs
        with gr.Tab(self.s["tab"], id="compare"):
            self._layout()
        self._wire()

    # ----- layout ------------------------------------------------------------------------------
    def _layout(self) -> None:
        gr.Markdown(self.s["intro"])
        self._adapter_controls()
        self.history = HistoryPanel(self.services, api=True)
        self._question_controls()
        self.compare_btn = gr.Button(self.s["compare"], variant="primary")
        with gr.Row():
            self.base_out = gr.Textbox(label=self.s["base"], lines=8, interactive=False)
            self.rag_out = gr.Textbox(label=self.s["retrieval"], lines=8, interactive=False)
            self.tuned_out = gr.Textbox(label=self.s["tuned"], lines=8, interactive=False)
        with gr.Accordion(self.s["retrieved"], open=False):
            self.retrieved = gr.Markdown()
        self._report_controls()

    def _adapter_controls(self) -> None:
        s = self.s
        with gr.Accordion(s["adapters"], open=True):
            frame, choices = self._listing()
            self.adapters_table = gr.Dataframe(frame, interactive=False, max_height=240)
            with gr.Row():
                self.run_pick = gr.Dropdown(choices, label=s["run"], scale=4, allow_custom_value=True)
                self.refresh_btn = gr.Button(s["refresh"], size="sm")
                self.attach_btn = gr.Button(s["attach"], size="sm")
                self.detach_btn = gr.Button(s["detach"], size="sm")
                self.confirm = gr.Checkbox(False, label=s["confirm"])
                self.delete_btn = gr.Button(s["delete"], size="sm", variant="stop")
            self.adapter_msg = gr.Markdown()

    def _question_controls(self) -> None:
        s = self.s
        with gr.Row():
            self.question = gr.Textbox(label=s["question"], lines=2, scale=3)
            with gr.Column(scale=2):
                self.preset = gr.Dropdown([q for q, _ in service.PRESET_QUESTIONS], value=None, label=s["preset"])
                self.heldout = gr.Dropdown([], label=s["heldout"])
        self.reference = gr.Markdown()
        with gr.Row():
            self.use_retrieval = gr.Checkbox(True, label=s["use_retrieval"])
            self.document = gr.Textbox(str(SAMPLE_DOCUMENT), label=s["document"], scale=3)
            self.top_k = gr.Slider(1, 5, value=2, step=1, label=s["top_k"])
            self.decoding = gr.Radio([s["greedy"], s["sampling"]], value=s["greedy"], label=s["decoding"])
            self.max_new = gr.Slider(16, 1024, value=256, step=16, label=s["max_new_tokens"])

    def _report_controls(self) -> None:
        s = self.s
        with gr.Accordion(s["report"], open=True):
            with gr.Row():
                self.report_source = gr.Radio([s["source_heldout"], s["source_upload"]], value=s["source_heldout"],
                                              label=s["report_source"])
                self.upload = gr.File(label=s["upload"], file_types=[".jsonl", ".json"], type="filepath")
            with gr.Accordion(s["judge"], open=False):
                with gr.Row():
                    self.judge_url = gr.Textbox("", label=s["judge_url"])
                    self.judge_model = gr.Textbox("", label=s["judge_model"])
                    self.judge_key = gr.Textbox("", label=s["judge_key"], type="password")
            self.report_btn = gr.Button(s["run_report"], variant="primary")
            self.panel = job_panel(self.board, service.JOB_KIND, s)
            self.warning = gr.Markdown()
            self.summary = gr.Dataframe(pd.DataFrame(columns=SUMMARY_COLUMNS), label=s["summary"], interactive=False)
            self.chart = gr.BarPlot(x="column", y="score", color="metric", label=s["chart"], height=260)
            self.per_question = gr.Dataframe(pd.DataFrame(columns=QUESTION_COLUMNS), label=s["per_question"],
                                             interactive=False, wrap=True, max_height=420)
            self.exports = gr.File(label=s["exports"], file_count="multiple")

    # ----- wiring ------------------------------------------------------------------------------
    def _wire(self) -> None:
        listing = [self.adapter_msg, self.adapters_table, self.run_pick]
        generation = [self.use_retrieval, self.document, self.top_k, self.decoding, self.max_new]
        self.refresh_btn.click(self.refresh, None, listing[1:], api_name=False)
        self.attach_btn.click(self.attach, self.run_pick, listing, api_name="attach_adapter")
        self.detach_btn.click(self.detach, self.run_pick, listing, api_name="detach_adapter")
        self.delete_btn.click(self.delete, [self.run_pick, self.confirm], listing, api_name="delete_adapter")
        self.run_pick.change(self.pick_run, self.run_pick, [self.heldout, self.document], api_name=False)
        self.app.load(self.pick_run, self.run_pick, [self.heldout, self.document], api_name=False)
        self.preset.change(self.pick_preset, self.preset, [self.question, self.reference], api_name=False)
        self.heldout.change(self.pick_heldout, [self.heldout, self.run_pick], [self.question, self.reference],
                            api_name=False)
        self.compare_btn.click(self.compare, [self.question, self.run_pick] + generation,
                               [self.base_out, self.rag_out, self.tuned_out, self.retrieved], api_name="compare")
        self.report_btn.click(self.report, [self.run_pick, self.report_source, self.upload] + generation +
                              [self.judge_url, self.judge_model, self.judge_key], self.panel.message, api_name="run_report")
        self.panel.on_finish(self.on_report, [self.warning, self.summary, self.chart, self.per_question, self.exports])

    # ----- adapters ----------------------------------------------------------------------------
    def _listing(self) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """The adapters table and the runs that can go on the loaded base, from one scan of runs/."""
        entries = service.list_adapters(self.manager, self.services.paths.runs_dir)
        frame = pd.DataFrame([[e.name, e.status, "yes" if e.attached else "", _rounded(e.train_loss),
                               _rounded(e.eval_loss), e.dataset, e.base_model, e.problem] for e in entries],
                             columns=ADAPTER_COLUMNS)
        return frame, [(e.name, e.folder) for e in entries if not e.problem]

    def refresh(self):
        frame, choices = self._listing()
        return frame, gr.update(choices=choices)

    def _picked(self, folder) -> Path:
        self.policy.require("manage_adapters")
        if not folder:
            raise StudioError(self.s["pick_run"])
        return Path(folder)

    @user_errors
    def attach(self, folder):
        name = service.attach_run(self.manager, self._picked(folder))
        return (self.s["attached"].format(name=name),) + self.refresh()

    @user_errors
    def detach(self, folder):
        folder = self._picked(folder)
        service.detach_run(self.manager, folder.name)
        return (self.s["detached"].format(name=folder.name),) + self.refresh()

    @user_errors
    def delete(self, folder, sure):
        folder = self._picked(folder)
        service.delete_run(self.manager, folder, bool(sure))
        return (self.s["deleted"].format(name=folder.name),) + self.refresh()

    # ----- questions ---------------------------------------------------------------------------
    def pick_run(self, folder):
        if not folder:
            return gr.update(choices=[]), gr.skip()
        rows = service.run_questions(Path(folder), "heldout.jsonl")
        document = service.source_document(Path(folder))
        return gr.update(choices=[(r["instruction"], i) for i, r in enumerate(rows)], value=None), document or gr.skip()

    def pick_preset(self, text):
        answer = dict(service.PRESET_QUESTIONS).get(text, "")
        return text, f"**{self.s['reference']}:** {answer}" if answer else ""

    def pick_heldout(self, index, folder):
        if index is None or not folder:
            return gr.skip(), gr.skip()
        row = service.run_questions(Path(folder), "heldout.jsonl")[int(index)]
        return row["instruction"], f"**{self.s['reference']}:** {row['output']}"

    def _settings(self, mode: str, tokens) -> GenerationSettings:
        if mode == self.s["sampling"]:
            return GenerationSettings.tutorial_sampling(int(tokens))
        return GenerationSettings.greedy(int(tokens))

    # ----- side by side ------------------------------------------------------------------------
    @user_errors
    def compare(self, text, folder, retrieval_on, document, k, mode, tokens):
        self.policy.require("chat")
        if not folder:
            raise StudioError(self.s["pick_run"])
        if not text or not text.strip():
            raise StudioError("Type a question first.")
        name = service.attach_run(self.manager, Path(folder))
        system = adapters.read_metadata(Path(folder)).get("system_prompt", self.services.default_system_prompt)
        settings = self._settings(mode, tokens)
        base = tuned = rag = hits_md = ""
        for base, tuned in self.manager.stream_side_by_side(build_messages(system, [], text), name, settings):
            yield base, "", tuned, gr.skip()
        if retrieval_on and document:
            hits = SectionRetriever.from_document(document).search(text, int(k))
            hits_md = "\n\n".join(f"**{h.section.heading}** (score {h.score:.2f})\n\n{h.section.text}" for h in hits)
            for rag in self.manager.stream_chat(retrieval_messages(system, text, hits), settings):
                yield base, rag, tuned, hits_md
        yield base, rag, tuned, hits_md or "—"

    # ----- the report --------------------------------------------------------------------------
    @user_errors
    def report(self, folder, source, upload_path, retrieval_on, document, k, mode, tokens, url, model, key):
        self.policy.require("chat")
        if not folder:
            raise StudioError(self.s["pick_run"])
        questions = read_dataset(upload_path) if source == self.s["source_upload"] and upload_path else None
        judge = TeacherConfig(url.strip(), model.strip(), key or "") if url and url.strip() else None
        job = service.start_report(self.board, self.manager, Path(folder), questions,
                                   document if retrieval_on else None, self._settings(mode, tokens), judge, int(k))
        return self.s["started"].format(name=job.name)

    def on_report(self, job):
        if job is None or not job.result.get("rows"):
            message = f"**{job.status.value}:** {job.error}" if job is not None and job.error else gr.skip()
            return message, gr.skip(), gr.skip(), gr.skip(), gr.skip()
        result = job.result
        summary = pd.DataFrame([{"column": c, **v} for c, v in result["summary"].items()])
        chart = pd.DataFrame([{"column": c, "metric": m, "score": v[m]} for c, v in result["summary"].items()
                              for m in ("char_f1", "rouge_l")])
        warning = f"⚠️ {result['warning']}" if result.get("warning") else ""
        return warning, summary, chart, pd.DataFrame(table_rows(result)), result.get("files", [])


def build_compare_tab(services: Services, app: gr.Blocks) -> CompareTab:
    return CompareTab(services, app)
