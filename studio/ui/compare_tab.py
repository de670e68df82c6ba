"""Compare tab: base vs retrieval vs fine-tuned vs fine-tuned + retrieval, side by side, and the scored report."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data.records import read_dataset
from studio.data.teacher import TeacherConfig
from studio.errors import StudioError
from studio.evaluate import service
from studio.evaluate.report import table_rows
from studio.evaluate.retrieval import SectionRetriever, retrieval_messages
from studio.model.generation import GenerationSettings, build_messages
from studio.config import SAMPLE_DOCUMENT
from studio.services import Services
from studio.train import adapters
from studio.ui.common import job_panel, localized_frame
from studio.ui.history_panel import HistoryPanel
from studio.ui.i18n import column, term, text, translate
from studio.ui.registry import ANY, Choice, Id, Num, Text, Upload, page_language
from studio.ui.strings import strings

ADAPTER_COLUMNS = ["name", "status", "attached", "train loss", "eval loss", "dataset", "base", "problem"]
SUMMARY_COLUMNS = ["column", "char_f1", "rouge_l", "judge_mean", "improved", "worse"]
# the per-question table as the page shows it: the scores beside the column's name, the long texts after them, each
# column a width (the answer took the whole width and pushed the scores out of sight); the CSV keeps its own order
QUESTION_COLUMNS = ["#", "question", "column", "key_hit", "char_f1", "rouge_l", "judge", "answer", "reference",
                    "judge_reason", "section", "confused_with", "best"]
QUESTION_WIDTHS = [44, 220, 130, 90, 80, 80, 70, 320, 240, 200, 120, 140, 130]
REPORT_SOURCES = ("exam", "heldout", "upload")  # the report's question sets: the radio's values, its labels in the tables


def _rounded(value):
    return None if value is None else round(value, 4)


class CompareTab:
    """Builds the tab's components, then wires each event to one handler method."""

    def __init__(self, services: Services, app: gr.Blocks):
        self.services, self.app, self.s = services, app, strings("compare")
        self.manager, self.policy, self.board = services.manager, services.policy, services.jobs
        self.catalog, self.registry = services.catalog, getattr(services, "registry", None)
        with gr.Tab(self.s["tab"], id="compare"):
            self._layout()
        self._wire()

    # ----- layout ------------------------------------------------------------------------------
    def _layout(self) -> None:
        """The comparison first (the run, the question, the columns), then the report; the adapters' table,
        attach, detach, delete and export below them, folded; the run history last."""
        gr.Markdown(self.s["intro"])
        frame, choices = self._listing()
        with gr.Row():
            self.run_pick = gr.Dropdown(choices, label=self.s["run"], scale=4, allow_custom_value=True)
            self.refresh_btn = gr.Button(self.s["refresh"], size="sm", scale=1)
        self._question_controls()
        self.compare_btn = gr.Button(self.s["compare"], variant="primary")
        with gr.Row():
            self.base_out = gr.Textbox(label=self.s["base"], lines=8, interactive=False)
            self.rag_out = gr.Textbox(label=self.s["retrieval"], lines=8, interactive=False)
            self.tuned_out = gr.Textbox(label=self.s["tuned"], lines=8, interactive=False)
            self.both_out = gr.Textbox(label=self.s["tuned_retrieval"], lines=8, interactive=False)
        with gr.Accordion(self.s["retrieved"], open=False):
            self.retrieved = gr.Markdown()
        self._report_controls()
        self._adapter_controls(frame)
        self.history = HistoryPanel(self.services, api=True)

    def _adapter_controls(self, frame) -> None:
        """The loaded base's adapters, and what can be done with the picked run: attach, detach, delete, export."""
        s = self.s
        with gr.Accordion(s["adapters"], open=False):
            gr.Markdown(s["adapters_hint"])
            self.adapters_table = gr.Dataframe(frame, interactive=False, max_height=240)
            with gr.Row():
                self.attach_btn = gr.Button(s["attach"], size="sm")
                self.detach_btn = gr.Button(s["detach"], size="sm")
                self.confirm = gr.Checkbox(False, label=s["confirm"])
                self.delete_btn = gr.Button(s["delete"], size="sm", variant="stop")
            self.adapter_msg = gr.Markdown()
            self._export_controls()

    def _export_controls(self) -> None:
        s = self.s
        with gr.Row():
            self.export_merge = gr.Checkbox(False, label=s["export_merge"], scale=3)
            self.export_btn = gr.Button(s["export"], size="sm")
        self.export_msg = gr.Markdown()
        self.export_files = gr.File(label=s["export_files"], file_count="multiple", interactive=False)

    def _question_controls(self) -> None:
        s = self.s
        with gr.Row():
            self.question = gr.Textbox(label=s["question"], lines=2, scale=3)
            with gr.Column(scale=2):
                self.preset = gr.Dropdown([q for q, _ in service.PRESET_QUESTIONS], value=None, label=s["preset"])
                self.exam_q = gr.Dropdown([], label=s["exam_questions"])
                self.heldout = gr.Dropdown([], label=s["heldout"])
        self.reference = gr.Markdown()
        with gr.Row():
            self.use_retrieval = gr.Checkbox(True, label=s["use_retrieval"])
            demo = self.policy.is_demo  # the page lists no file of the owner's: a run's own document once picked
            self.document = gr.Dropdown([] if demo else self.services.catalog.ids("documents"),
                                        value=None if demo else SAMPLE_DOCUMENT.name, label=s["document"], scale=3,
                                        allow_custom_value=demo)  # demo: the server checks it is the run's own
            self.top_k = gr.Slider(1, 5, value=2, step=1, label=s["top_k"], scale=2)
        with gr.Row():  # a row of their own: beside the retrieval controls their labels wrapped to three lines
            self.decoding = gr.Radio([s["greedy"], s["sampling"]], value=s["greedy"], label=s["decoding"], scale=3)
            self.max_new = gr.Slider(16, 1024, value=256, step=16, label=s["max_new_tokens"], scale=2)

    def _report_controls(self) -> None:
        s = self.s
        with gr.Accordion(s["report"], open=True):
            with gr.Row():
                self.report_source = gr.Radio([(s[f"source_{name}"], name) for name in REPORT_SOURCES], value="heldout",
                                              label=s["report_source"])
                self.upload = gr.File(label=s["upload"], file_types=[".jsonl", ".json"], type="filepath")
            with gr.Accordion(s["judge"], open=False):
                with gr.Row():
                    self.judge_url = gr.Textbox("", label=s["judge_url"])
                    self.judge_model = gr.Textbox("", label=s["judge_model"])
                    self.judge_key = gr.Textbox("", label=s["judge_key"], type="password")
            with gr.Row():
                self.report_btn = gr.Button(s["run_report"], variant="primary", scale=3)
                self.stop_report_btn = gr.Button(s["stop_report"], variant="stop", scale=1)
            self.panel = job_panel(self.board, service.JOB_KIND, s)
            self.warning = gr.Markdown()
            self.summary = gr.Dataframe(pd.DataFrame(columns=SUMMARY_COLUMNS), label=s["summary"], interactive=False)
            # no fixed height (it cut the legend off), no axis titles (the label says what the bars are)
            self.chart = gr.BarPlot(x="column", y="score", color="metric", label=s["chart"], x_title=" ", y_title=" ",
                                    color_title=" ")
            self.sections_table = gr.Dataframe(pd.DataFrame(columns=["section", "questions"]), label=s["per_section"],
                                               interactive=False)
            self.per_question = gr.Dataframe(pd.DataFrame(columns=QUESTION_COLUMNS), label=s["per_question"],
                                             interactive=False, wrap=True, max_height=420,
                                             column_widths=QUESTION_WIDTHS)
            self.exports = gr.File(label=s["exports"], file_count="multiple")

    # ----- wiring ------------------------------------------------------------------------------
    def _wire(self) -> None:
        reg = self.registry
        listing = [self.adapter_msg, self.adapters_table, self.run_pick]
        generation = [self.use_retrieval, self.document, self.top_k, self.decoding, self.max_new]
        run = Id("Run", "runs")
        gen_args = (ANY, Id("Document", "documents", optional=True), Num("Sections retrieved", 1, 10, True),
                    Choice("Decoding", (self.s["greedy"], self.s["sampling"])), Num("Max new tokens", 1, 1024, True))
        reg.on(self.refresh_btn.click, self.refresh, None, listing[1:], action="view", scrub=True)
        reg.on(self.attach_btn.click, self.attach, self.run_pick, listing, action="manage_adapters",
               name="attach_adapter", args=(run,))
        reg.on(self.detach_btn.click, self.detach, self.run_pick, listing, action="manage_adapters",
               name="detach_adapter", args=(run,))
        reg.on(self.delete_btn.click, self.delete, [self.run_pick, self.confirm], listing, action="manage_adapters",
               name="delete_adapter", args=(run, ANY))
        reg.on(self.export_btn.click, self.export, [self.run_pick, self.export_merge],
               [self.export_msg, self.export_files], action="export", name="export_adapter", args=(run, ANY))
        picked = (Id("Run", "runs", optional=True),)
        reg.on(self.run_pick.change, self.pick_run, self.run_pick, [self.heldout, self.document], action="compare",
               args=picked)
        reg.on(self.app.load, self.pick_run, self.run_pick, [self.heldout, self.document], action="compare", args=picked)
        for trigger in (self.run_pick.change, self.app.load):
            reg.on(trigger, self.pick_exam, self.run_pick, [self.exam_q, self.report_source], action="compare",
                   args=picked)
        reg.on(self.preset.change, self.pick_preset, self.preset, [self.question, self.reference], action="view",
               args=(Text("Preset", 500),))
        reg.on(self.heldout.change, self.pick_heldout, [self.heldout, self.run_pick], [self.question, self.reference],
               action="compare", args=(Num("Held-out question", 0, 100_000, True, optional=True), picked[0]))
        reg.on(self.exam_q.change, self.pick_exam_question, [self.exam_q, self.run_pick], [self.question, self.reference],
               action="compare", args=(Num("Exam question", 0, 100_000, True, optional=True), picked[0]))
        reg.on(self.compare_btn.click, self.compare, [self.question, self.run_pick] + generation,
               [self.base_out, self.rag_out, self.tuned_out, self.retrieved, self.both_out], action="compare",
               name="compare", args=(Text("Question", 4000), run) + gen_args, generated=True)
        reg.on(self.report_btn.click, self.report, [self.run_pick, self.report_source, self.upload] + generation +
               [self.judge_url, self.judge_model, self.judge_key], self.panel.message, action="write_reports",
               name="run_report", args=(run, Choice("Questions", REPORT_SOURCES),
                                        Upload("Questions file", (".jsonl", ".json"))) + gen_args +
               (Text("Judge URL", 500), Text("Judge model", 200), Text("Judge key", 500)))
        reg.on(self.stop_report_btn.click, self.stop_report, None, self.panel.message, action="write_reports",
               name="stop_report")
        self.panel.wire(reg, "write_reports", self.on_report,
                        [self.warning, self.summary, self.chart, self.per_question, self.exports, self.sections_table])

    # ----- adapters ----------------------------------------------------------------------------
    def _listing(self, lang: str = "en") -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """The adapters table (headers in `lang`) and the runs that can go on the loaded base, from one scan of runs/.

        In demo mode only the adapters the owner attached are listed, the base model by name only, and not
        the dataset file each was trained on.
        """
        entries = service.list_adapters(self.manager, self.services.paths.runs_dir)
        demo = self.policy.is_demo
        if demo:
            entries = [e for e in entries if e.attached]
        yes = text("tables", "yes", lang)
        frame = pd.DataFrame([[e.name, term(e.status, lang), yes if e.attached else "", _rounded(e.train_loss),
                               _rounded(e.eval_loss), "" if demo else e.dataset, self._public(e.base_model),
                               self._public(e.problem)]
                              for e in entries], columns=[column(c, lang) for c in ADAPTER_COLUMNS])
        return frame, [(e.name, e.name) for e in entries if not e.problem]

    def _public(self, text: str) -> str:
        return self.registry.scrub_text(text) if self.registry is not None else text

    def refresh(self):
        frame, choices = self._listing(page_language())
        return frame, gr.update(choices=choices)

    def wire_fresh_lists(self, *triggers) -> None:
        """Fill the run list and the adapters table again on each trigger (the page's load, a tab switch, a
        training run's end, which attaches its adapter), so a run trained since the page was made can be picked
        without a click on Refresh and the table lists what the header says is attached."""
        for trigger in triggers:
            self.registry.on(trigger, self.run_choices, self.run_pick, [self.run_pick, self.adapters_table],
                             action="view", args=(Id("Run", "runs", optional=True),), scrub=True,
                             show_progress="hidden")

    def run_choices(self, current=None):
        """The runs to pick from and the adapters table; an empty picker (a reloaded page) gets the run of the
        report the tab shows, else the newest run, so the question lists and buttons work on what the page shows."""
        frame, choices = self._listing(page_language())
        if current:
            return gr.update(choices=choices), frame
        names = [name for name, _ in choices]
        job = self.board.latest(service.JOB_KIND)
        reported = job.result.get("adapter") if job is not None and not job.running and job.result else None
        opening = reported if reported in names else (names[0] if names else None)
        return gr.update(choices=choices, value=opening), frame

    def attach(self, run_id):
        name = service.attach_run(self.manager, self.catalog.resolve_run(run_id), policy=self.policy)
        return (self.s["attached"].format(name=name),) + self.refresh()

    def detach(self, run_id):
        folder = self.catalog.resolve_run(run_id)
        attached = folder.name in self.manager.status().adapters
        service.detach_run(self.manager, folder.name, policy=self.policy)
        message = self.s["detached" if attached else "not_attached"].format(name=folder.name)
        return (message,) + self.refresh()

    def delete(self, run_id, sure):
        folder = self.catalog.resolve_run(run_id)
        service.delete_run(self.manager, folder, sure is True, policy=self.policy)
        return (self.s["deleted"].format(name=folder.name),) + self.refresh()

    def export(self, run_id, merge):
        """Export the picked run (adapter + zip, or merged bf16 model) as a job; show its commands and files."""
        from studio.export import ExportRequest, export_folder, start_export, shown_files

        self.policy.require("export")
        folder = self.catalog.resolve_run(run_id)
        out = export_folder(self.services.paths.runs_dir.parent / "exports", folder.name, bool(merge))
        lang = page_language()  # HOW_TO_USE.txt in the page's language
        request = ExportRequest(folder, out, bool(merge), wording=lambda line: translate(line, lang))
        job = start_export(self.board, request)
        yield self.s["export_started"].format(name=folder.name, folder=out), gr.skip()
        self.board.wait(job)
        if job.error:
            raise StudioError(job.error)
        yield f"```\n{job.result['instructions']}\n```", shown_files(job.result)

    # ----- questions ---------------------------------------------------------------------------
    def pick_run(self, run_id):
        if not run_id:
            return gr.update(choices=[]), gr.skip()
        folder = service.comparable_run(self.manager, self.catalog, run_id, self.policy)
        rows = service.run_questions(folder, "heldout.jsonl")
        document = self.catalog.document_id(service.source_document(folder))
        questions = gr.update(choices=[(r["instruction"], i) for i, r in enumerate(rows)], value=None)
        if self.policy.is_demo:
            return questions, gr.update(choices=[document] if document else [], value=document)
        return questions, document or gr.skip()

    def pick_preset(self, text):
        answer = dict(service.PRESET_QUESTIONS).get(text, "")
        return text, self.s["reference_line"].format(answer=answer) if answer else ""

    def pick_heldout(self, index, run_id):
        if index is None or not run_id:
            return gr.skip(), gr.skip()
        folder = service.comparable_run(self.manager, self.catalog, run_id, self.policy)
        rows = service.run_questions(folder, "heldout.jsonl")
        if not 0 <= int(index) < len(rows):
            raise StudioError(f"Held-out question {index} is not in {run_id}.")
        row = rows[int(index)]
        return row["instruction"], self.s["reference_line"].format(answer=row["output"])

    def pick_exam(self, run_id):
        """The run's exam questions, and the exam as the report's default questions when there is one."""
        folder = service.comparable_run(self.manager, self.catalog, run_id, self.policy) if run_id else None
        rows = service.run_exam(folder) if folder else []
        choices = gr.update(choices=[(r["instruction"], i) for i, r in enumerate(rows)], value=None)
        return choices, gr.update(value="exam" if rows else "heldout")  # a value, not a label to translate

    def pick_exam_question(self, index, run_id):
        if index is None or not run_id:
            return gr.skip(), gr.skip()
        rows = service.run_exam(service.comparable_run(self.manager, self.catalog, run_id, self.policy))
        if not 0 <= int(index) < len(rows):
            raise StudioError(f"Exam question {index} is not in {run_id}.")
        row = rows[int(index)]
        if row.get("keys"):
            return row["instruction"], self.s["reference_keys_line"].format(answer=row["output"],
                                                                          keys=", ".join(row["keys"]))
        return row["instruction"], self.s["reference_line"].format(answer=row["output"])

    def _settings(self, mode: str, tokens) -> GenerationSettings:
        if mode == self.s["sampling"]:
            return GenerationSettings.tutorial_sampling(int(tokens))
        return GenerationSettings.greedy(int(tokens))

    def _retrieval_document(self, folder: Path, retrieval_on, document_id) -> Path | None:
        """The document for the retrieval column, by id. In demo mode only the run's own source document."""
        if not retrieval_on or not document_id:
            return None
        if self.policy.is_demo and document_id != self.catalog.document_id(service.source_document(folder)):
            raise StudioError("In demo mode the retrieval column reads only the run's own source document.")
        return self.catalog.resolve_document(document_id)

    # ----- side by side ------------------------------------------------------------------------
    def compare(self, text, run_id, retrieval_on, document_id, k, mode, tokens):
        if not text or not text.strip():
            raise StudioError("Type a question first.")
        folder = service.comparable_run(self.manager, self.catalog, run_id, self.policy)
        name = service.side_by_side_adapter(self.manager, folder, self.policy)
        document = self._retrieval_document(folder, retrieval_on, document_id)
        system = adapters.read_metadata(folder).get("system_prompt", self.services.default_system_prompt)
        settings = self._settings(mode, tokens)
        hits_md, extra = "", {}
        if document is not None:
            hits = SectionRetriever.from_document(document).search(text, int(k))
            hits_md = "\n\n".join(_retrieved(h) for h in hits)
            with_context = retrieval_messages(system, text, hits)
            extra["retrieval"] = (with_context, None)
            extra["both"] = (with_context, name)  # the fine-tuned adapter with the same sections
        columns: dict = {}
        for columns in self.manager.stream_columns(build_messages(system, [], text), name, settings, extra):
            yield columns["base"], columns.get("retrieval", ""), columns["adapter"], gr.skip(), columns.get("both", "")
        yield (columns.get("base", ""), columns.get("retrieval", ""), columns.get("adapter", ""), hits_md or "—",
               columns.get("both", ""))

    # ----- the report --------------------------------------------------------------------------
    def report(self, run_id, source, upload_path, retrieval_on, document_id, k, mode, tokens, url, model, key):
        folder = self.catalog.resolve_run(run_id)
        questions, question_set = self._report_questions(folder, source, upload_path)
        judge = None
        if url and url.strip():
            judge = TeacherConfig(url.strip(), model.strip(), self.services.keys.key_for(url, key))
        service.start_report(self.board, self.manager, folder, questions,
                             self._retrieval_document(folder, retrieval_on, document_id),
                             self._settings(mode, tokens), judge, int(k), question_set=question_set, policy=self.policy)
        return self.s["started"].format(name=folder.name)

    def _report_questions(self, folder: Path, source, upload_path) -> tuple[list[dict] | None, str]:
        """The chosen question set: the run's exam, its held-out phrasings, or an uploaded file."""
        if source == "upload":  # without a file: said so, not another question set scored in its place
            if not upload_path:
                raise StudioError(self.s["no_upload"])
            return read_dataset(upload_path), "uploaded"
        if source == "exam":
            exam = service.run_exam(folder)
            if not exam:
                raise StudioError(self.s["no_exam"])
            return exam, "exam"
        return service.run_questions(folder, "heldout.jsonl"), "heldout"

    @staticmethod
    def _sections_frame(job, lang: str = "en"):
        sections = job.result.get("sections") if job is not None and job.result else None
        return localized_frame(pd.DataFrame(sections), lang) if sections else gr.skip()

    def tables(self, lang):
        """The tab's tables in `lang` (on load and on the language switch): adapters, and the latest report or
        empty report tables."""
        lang = lang or "en"
        frame, _ = self._listing(lang)
        job = self.board.latest(service.JOB_KIND)
        if job is not None and not job.running and job.result and job.result.get("rows"):
            _, summary, chart, questions, _, sections = self.on_report(job, lang)
            return frame, summary, chart, questions, sections
        empty = [localized_frame(pd.DataFrame(columns=c), lang)
                 for c in (SUMMARY_COLUMNS, QUESTION_COLUMNS, ["section", "questions"])]
        return frame, empty[0], gr.skip(), empty[1], empty[2]

    def wire_language(self, language: gr.Radio) -> None:
        """The tables follow the page's language: on load (the language is set then) and on the switch."""
        self.registry.on(language.change, self.tables, language,
                         [self.adapters_table, self.summary, self.chart, self.per_question, self.sections_table],
                         action="view", args=(Choice("Language", ("en", "zh"), optional=True),), scrub=True,
                         show_progress="hidden")

    def stop_report(self):
        """Stop the running report after its current answer (what it scored so far is saved, marked as stopped)."""
        job = self.board.latest(service.JOB_KIND)
        if job is None or not job.running:
            return self.s["no_report"]
        job.cancel()
        return self.s["report_stopping"]

    def on_report(self, job, lang: str | None = None):
        """The report's tables as the page shows them: headers, column and metric names in the page's language."""
        if job is None or not job.result.get("rows"):
            message = f"**{job.status.value}:** {job.error}" if job is not None and job.error else gr.skip()
            return message, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        lang = lang or page_language()
        result = job.result
        summary = pd.DataFrame([{"column": c, **v} for c, v in result["summary"].items()])
        # one metric, one bar a column (two metrics stacked read as their sum): the key facts' hit rate where the
        # questions carry keys, else character F1; the legend names it
        metric = "key_hit" if any(v.get("key_hit") is not None for v in result["summary"].values()) else "char_f1"
        chart = pd.DataFrame([{"column": column(c, lang), "metric": column(metric, lang), "score": v[metric]}
                              for c, v in result["summary"].items() if v.get(metric) is not None])
        warnings = result.get("warnings") or ([result["warning"]] if result.get("warning") else [])
        stopped = ([self.s["report_stopped_note"].format(done=result["stopped_after"], total=result["questions_total"])]
                   if "stopped_after" in result else [])
        notes = [f"⚠️ {translate(text, lang)}" for text in stopped + warnings] + [translate(result.get("keys_note", ""), lang)]
        warning = "\n\n".join(note for note in notes if note)  # each sentence matched alone: joined, none matched
        questions = localized_frame(pd.DataFrame(table_rows(result), columns=QUESTION_COLUMNS), lang, ("column", "best"))
        return (warning, localized_frame(summary, lang, ("column",)), chart, questions, result.get("files", []),
                self._sections_frame(job, lang))


def _retrieved(hit) -> str:
    """A retrieved section as the page lists it: its heading and BM25 score once, then its text (whose own
    heading line is dropped: it was shown twice)."""
    lines = hit.section.text.strip().split("\n")
    if lines and lines[0].lstrip("#").strip() == hit.section.heading.strip():
        lines = lines[1:]
    body = "\n".join(lines).strip()
    return f"**{hit.section.heading}** · BM25 {hit.score:.2f}\n\n{body}"


def build_compare_tab(services: Services, app: gr.Blocks) -> CompareTab:
    return CompareTab(services, app)
