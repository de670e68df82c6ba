"""Dataset Builder tab: document -> sections -> teacher -> base pairs -> paraphrases -> JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data import records
from studio.data.builder import (DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, BuildSettings, estimate_cost,
                                 validate_settings)
from studio.data.documents import SplitSettings, keep_document, read_document, split_sections
from studio.data.exam import exam_beside
from studio.data.styles import DEFAULT_STYLE, FACTS_PAIR_PROMPT, FACTS_VARIANT_PROMPT, STYLES, document_language
from studio.data.service import JOB_KIND, start_build
from studio.data.teacher import PROVIDER_PRESETS, OpenAITeacher, RetryPolicy, TeacherConfig, check_connection
from studio.config import SAMPLE_DOCUMENT
from studio.services import Services
from studio.ui.common import job_panel
from studio.ui.i18n import FIXED_CHOICES, column, text
from studio.ui.registry import ANY, Choice, Id, Num, NumOrWord, Text, Upload, page_language
from studio.ui.strings import strings

PREVIEW_COLUMNS = ["instruction", "output", "group", "kind", "section"]
HEADED_FIELDS = PREVIEW_COLUMNS + ["source", "reworded"]  # fields whose header the page shows in its language
SECTION_COLUMNS = ["#", "heading", "chars", "first line"]
LEVELS = {"##": 2, "###": 3}
# every prompt the boxes show by default (stage 1, stage 2): a box holding one of them was not edited
DEFAULT_PROMPTS = tuple({text.strip() for text in texts} for texts in (
    (DEFAULT_PAIR_PROMPT, *FACTS_PAIR_PROMPT.values()), (DEFAULT_PARAPHRASE_PROMPT, *FACTS_VARIANT_PROMPT.values())))
CUSTOM_PROVIDER = "custom"  # the provider box's choice for a base URL that is no preset's
CONFIRM_ABOVE_CALLS = 200  # a build that makes more teacher calls starts on a second click, after its cost is shown


def preset_of(provider: str):
    """A preset's base URL and suggested model; the custom choice keeps what the boxes hold."""
    return PROVIDER_PRESETS.get(provider) or (gr.skip(), gr.skip())


def provider_of(base_url: str) -> str:
    """The preset whose base URL this is (a trailing slash aside), else the custom choice: the provider box
    never names a service that the URL box does not point at."""
    wanted = (base_url or "").strip().rstrip("/")
    return next((name for name, (url, _) in PROVIDER_PRESETS.items() if url == wanted), CUSTOM_PROVIDER)


def _split_settings(min_chars, max_chars, levels) -> SplitSettings:
    return SplitSettings(int(min_chars or 100), tuple(LEVELS[level] for level in levels or []), int(max_chars or 3000))


def _rows_frame(rows: list[dict], lang: str = "en") -> pd.DataFrame:
    """The rows as the preview shows them: the dataset's fields first, their headers in `lang` (the
    field name kept beside the Chinese one, as the JSONL file has it)."""
    frame = pd.DataFrame(rows)
    for name in PREVIEW_COLUMNS:
        if name not in frame:
            frame[name] = ""
    frame = frame[PREVIEW_COLUMNS + [c for c in frame.columns if c not in PREVIEW_COLUMNS]].fillna("")
    return _with_headers(frame, lang)


def _with_headers(frame: pd.DataFrame, lang: str) -> pd.DataFrame:
    """`frame` with the dataset fields' headers in `lang` (headers in either language are understood)."""
    return frame.rename(columns=lambda header: text("tables", f"col_data_{_field(header)}", lang)
                        if _field(header) in HEADED_FIELDS else header)


def _field(header) -> str:
    """The dataset field a preview header stands for, whatever the language it is shown in."""
    for name in HEADED_FIELDS:
        if header in (text("tables", f"col_data_{name}", lang) for lang in ("en", "zh")):
            return name
    return str(header)


class DatasetTab:
    """Builds the tab's components, then wires each event to one handler method."""

    def __init__(self, services: Services, app: gr.Blocks):
        self.services, self.app, self.s = services, app, strings("dataset")
        self.policy, self.board, self.registry = services.policy, services.jobs, services.registry
        with gr.Tab(self.s["tab"], id="dataset"):
            self._layout()
        self._wire()

    # ----- layout ------------------------------------------------------------------------------
    def _layout(self) -> None:
        gr.Markdown(self.s["intro"])
        with gr.Row():
            with gr.Column():
                self._document_controls()
            with gr.Column():
                self._teacher_controls()
        with gr.Row():
            self.build_btn = gr.Button(self.s["build"], variant="primary")
            self.cancel_btn = gr.Button(self.s["cancel"], variant="stop")
        self.cost = gr.Markdown()
        self.cost_seen = gr.State(None)  # the cost this session was shown: a second Build click confirms it
        self.panel = job_panel(self.board, JOB_KIND, self.s)
        self._result_controls()

    def _document_controls(self) -> None:
        s = self.s
        self.upload = gr.File(label=s["document"], file_types=[".md", ".txt", ".markdown"], type="filepath")
        self.doc_path = gr.Dropdown(self.services.catalog.ids("documents"), value=SAMPLE_DOCUMENT.name, label=s["doc_path"])
        self.name = gr.Textbox(label=s["name"])
        with gr.Row():
            self.min_chars = gr.Number(100, label=s["min_chars"], precision=0)
            self.max_chars = gr.Number(3000, label=s["max_chars"], precision=0)
        self.levels = gr.CheckboxGroup(list(LEVELS), value=list(LEVELS), label=s["levels"])
        self.split_btn = gr.Button(s["split"])
        self.split_msg = gr.Markdown()
        self.sections = gr.Dataframe(headers=SECTION_COLUMNS, interactive=False,
                                     label=s["sections"], max_height=320)

    def _teacher_controls(self) -> None:
        s = self.s
        self.use_local = gr.Checkbox(False, label=s["use_local"])
        choices = [(name, name) for name in PROVIDER_PRESETS] + [(s["provider_custom"], CUSTOM_PROVIDER)]
        self.provider = gr.Dropdown(choices, value="SiliconFlow", label=s["provider"], elem_classes=[FIXED_CHOICES])
        self.base_url = gr.Textbox(PROVIDER_PRESETS["SiliconFlow"][0], label=s["base_url"])
        self.teacher_model = gr.Textbox(PROVIDER_PRESETS["SiliconFlow"][1], label=s["teacher_model"])
        self.api_key = gr.Textbox("", label=s["api_key"], type="password", placeholder=s["api_key_placeholder"])
        self.test_btn = gr.Button(s["test"], size="sm")
        self.test_msg = gr.Markdown()
        self.per_section = gr.Textbox("auto", label=s["per_section"])
        self.variants = gr.Slider(0, 30, value=14, step=1, label=s["variants"])
        with gr.Row():
            self.style = gr.Radio([(s[f"style_{name}"], name) for name in STYLES], value=DEFAULT_STYLE,
                                  label=s["style"], info=s["style_info"])
            self.exam = gr.Number(0, label=s["exam"], precision=0, minimum=0)
        self.concurrency = gr.Slider(1, 32, value=8, step=1, label=s["concurrency"])
        with gr.Accordion(s["advanced"], open=False):
            self.system_prompt = gr.Textbox(DEFAULT_PAIR_PROMPT, label=s["system_prompt"], lines=4)
            self.paraphrase_prompt = gr.Textbox(DEFAULT_PARAPHRASE_PROMPT, label=s["paraphrase_prompt"], lines=3)
            with gr.Row():
                self.temperature = gr.Number(0.2, label=s["temperature"])
                self.max_tokens = gr.Number(600, label=s["max_tokens"], precision=0)
                self.attempts = gr.Number(3, label=s["attempts"], precision=0)
                self.timeout = gr.Number(120, label=s["timeout"])

    def _result_controls(self) -> None:
        s = self.s
        with gr.Accordion(s["result"], open=True):
            with gr.Row():
                self.dataset_pick = gr.Dropdown(self._datasets(), label=s["datasets"], scale=4, allow_custom_value=True)
                self.open_btn = gr.Button(s["open"], scale=1)
                self.import_file = gr.File(label=s["import"], file_types=[".jsonl", ".json"], type="filepath", scale=3)
            self.preview = gr.Dataframe(_rows_frame([]), label=s["preview"], interactive=True, wrap=True, max_height=480)
            gr.Markdown(s["preview_legend"])
            self.preview_source = gr.State(None)  # the dataset the preview shows (its exam goes with a saved copy)
            with gr.Row():
                self.save_name = gr.Textbox(label=s["save_name"], scale=3)
                self.save_btn = gr.Button(s["save"], scale=1)
            self.result_msg = gr.Markdown()

    # ----- wiring ------------------------------------------------------------------------------
    def _wire(self) -> None:
        reg = self.registry
        split_inputs = [self.upload, self.doc_path, self.min_chars, self.max_chars, self.levels]
        split_args = (Upload("Document", (".md", ".txt", ".markdown")), Id("Document", "documents", optional=True),
                      Num("Minimum section length", 0, 1_000_000, True),
                      Num("Longest section sent to the teacher", 200, 1_000_000, True),
                      Choice("Heading levels", tuple(LEVELS), many=True))
        split_outputs = [self.split_msg, self.sections]
        self.split_inputs, self.split_args, self.split_outputs = split_inputs, split_args, split_outputs
        build_inputs = split_inputs[:2] + [self.name] + split_inputs[2:] + [
            self.use_local, self.base_url, self.teacher_model, self.api_key, self.per_section, self.variants,
            self.concurrency, self.system_prompt, self.paraphrase_prompt, self.temperature, self.max_tokens,
            self.attempts, self.timeout, self.style, self.exam]
        teacher_args = (Text("Base URL", 500), Text("Teacher model", 200), Text("API key", 500))
        timeout = Num("Timeout (s)", 1, 600)
        knowledge_args = (Choice("Style", tuple(STYLES)), Num("Exam questions per section", 0, 20, True))
        build_args = split_args[:2] + (Text("Dataset name", 200),) + split_args[2:] + (ANY,) + teacher_args + (
            NumOrWord("Questions per section", 1, 50), Num("Rephrasings", 0, 30, True), Num("Concurrency", 1, 32, True),
            Text("System prompt"), Text("Paraphrase prompt"), Num("Temperature", 0, 2), Num("Max tokens", 16, 8192, True),
            Num("Attempts", 1, 10, True), timeout) + knowledge_args
        preview_outputs = [self.preview, self.result_msg, self.save_name]
        if self.services.keys.owner_base_url:
            self.base_url.value = self.services.keys.owner_base_url
            self.provider.value = provider_of(self.base_url.value)
        # a preset picked by the user fills both boxes; the box set from a typed URL (below) must not overwrite the
        # model typed beside it: .input, not .change
        reg.on(self.provider.input, preset_of, self.provider, [self.base_url, self.teacher_model],
               action="build_dataset", args=(Choice("Provider", tuple(PROVIDER_PRESETS) + (CUSTOM_PROVIDER,)),))
        reg.on(self.base_url.change, provider_of, self.base_url, self.provider, action="build_dataset",
               args=(Text("Base URL", 500),), show_progress="hidden")
        splits = [reg.on(self.split_btn.click, self.split, split_inputs, split_outputs, action="read_files",
                         name="split", args=split_args),
                  reg.on(self.upload.change, self.split, split_inputs, split_outputs, action=("read_files", "upload"),
                         args=split_args),
                  reg.on(self.doc_path.input, self.split, split_inputs, split_outputs, action="read_files",
                         args=split_args)]
        for split in filter(None, splits):  # a document that could not be read shows no other one's sections
            reg.on(split.failure, self.not_split, None, split_outputs + [self.cost], action="read_files",
                   show_progress="hidden")
        for changed in (self.base_url.change, self.teacher_model.change):  # a result is of the teacher it tested
            reg.on(changed, lambda: "", None, self.test_msg, action="build_dataset", show_progress="hidden")
        reg.on(self.test_btn.click, self.test, [self.base_url, self.teacher_model, self.api_key, self.timeout],
               self.test_msg, action=("build_dataset", "outbound"), name="test_teacher", args=teacher_args + (timeout,))
        reg.on(self.build_btn.click, self.start, build_inputs + [self.cost_seen], [self.panel.message, self.cost_seen],
               action="build_dataset", name="build_dataset", args=build_args + (ANY,))
        cost_args = split_args + (NumOrWord("Questions per section", 1, 50), Num("Rephrasings", 0, 30, True)) + \
            knowledge_args
        self.cost_events = (split_inputs + [self.per_section, self.variants, self.style, self.exam], self.cost, cost_args)
        for trigger in (self.split_btn.click, self.upload.change, self.doc_path.input):  # the split says a problem
            reg.on(trigger, self.show_cost, *self.cost_events[:2], action="read_files", args=cost_args, quiet=True)
        for trigger in (self.per_section.change, self.variants.change, self.style.change, self.exam.change):
            reg.on(trigger, self.show_cost, *self.cost_events[:2], action="read_files", args=cost_args)
        reg.on(self.cancel_btn.click, self.cancel, None, self.panel.message, action="build_dataset", name="cancel_build")
        prompts = [self.system_prompt, self.paraphrase_prompt]
        prompt_args = split_args[:2] + (Choice("Style", tuple(STYLES)), Text("System prompt"), Text("Paraphrase prompt"))
        self.prompt_events = (split_inputs[:2] + [self.style] + prompts, prompts, prompt_args)
        for trigger, quiet in ((self.style.change, False), (self.upload.change, True), (self.doc_path.change, True)):
            reg.on(trigger, self.prompts_sent, *self.prompt_events[:2], action="read_files", show_progress="hidden",
                   args=prompt_args, quiet=quiet)  # quiet where the split says the document's problem
        reg.on(self.open_btn.click, self.open_dataset, self.dataset_pick, preview_outputs + [self.preview_source],
               action="read_files", name="open_dataset", args=(Id("Dataset", "datasets"),))
        reg.on(self.import_file.upload, self.import_rows, self.import_file,
               preview_outputs[:2] + [self.dataset_pick, self.save_name, self.preview_source],
               action=("upload", "edit_dataset"), name="import_dataset",
               args=(Upload("Dataset file", (".jsonl", ".json")),))
        reg.on(self.save_btn.click, self.save, [self.preview, self.save_name, self.preview_source],
               [self.result_msg, self.dataset_pick, self.preview, self.preview_source], action="edit_dataset",
               name="save_dataset",
               args=(ANY, Text("Save as", 200), Id("Dataset", "datasets", optional=True)))
        self.panel.wire(reg, "build_dataset", self.on_finished, [self.preview, self.dataset_pick, self.preview_source])
        self._wire_page_load()

    def _wire_page_load(self) -> None:
        """On load: the form as the last build had it, then its document's sections, the prompts the build sends
        and its cost, each read from the filled form."""
        reg = self.registry
        filled = reg.on(self.app.load, self.form_of_latest_build, None, self.form_fields, action="read_files",
                        show_progress="hidden")
        reg.on(filled.then, self.split, self.split_inputs, self.split_outputs, action="read_files", args=self.split_args)
        for handler, (inputs, outputs, args) in ((self.prompts_sent, self.prompt_events),
                                                 (self.show_cost, self.cost_events)):
            reg.on(filled.then, handler, inputs, outputs, action="read_files", show_progress="hidden", args=args)

    @property
    def form_fields(self) -> list:
        """The form's fields that a build's manifest fills, in `form_of_latest_build`'s order."""
        return [self.doc_path, self.name, self.min_chars, self.max_chars, self.levels, self.use_local, self.base_url,
                self.teacher_model, self.timeout, self.per_section, self.variants, self.concurrency, self.system_prompt,
                self.paraphrase_prompt, self.temperature, self.max_tokens, self.attempts, self.style, self.exam]

    def form_of_latest_build(self):
        """A reloaded page's form shows the settings of the build this studio ran last (the one going on, or the
        last one started), not the defaults; the API key is never among them."""
        job = self.board.latest(JOB_KIND)
        try:
            manifest = json.loads((job.folder / "build.json").read_text(encoding="utf-8")) if job and job.folder else None
            settings = manifest["settings"] if manifest else None
        except (OSError, ValueError, KeyError, TypeError):  # the manifest is not written yet, gone or damaged
            settings = None
        if not settings:
            return (gr.skip(),) * len(self.form_fields)
        split, place = settings.get("split", {}), manifest.get("teacher_place") or {}
        levels = [mark for mark, level in LEVELS.items() if level in split.get("levels", ())]
        document = self.services.catalog.document_id(manifest.get("source"))
        return (document or gr.skip(), manifest.get("name", ""), split.get("min_chars"), split.get("max_chars"), levels,
                not place, place.get("base_url", gr.skip()), place.get("model", gr.skip()),
                place.get("timeout_s", gr.skip()), settings.get("per_section"), settings.get("variants"),
                settings.get("concurrency"), settings.get("system_prompt"), settings.get("paraphrase_prompt"),
                settings.get("temperature"), settings.get("max_tokens"), settings.get("retry", {}).get("max_attempts"),
                settings.get("style"), settings.get("exam"))

    def _datasets(self) -> list[str]:
        return self.services.catalog.ids("datasets")

    def _document(self, upload_path, document_id) -> Path:
        """The uploaded file, or a catalog document by id (the sample when none is picked)."""
        return Path(upload_path) if upload_path else self.services.catalog.resolve_document(
            document_id or SAMPLE_DOCUMENT.name)

    def prompts_sent(self, upload_path, document_id, style, pair_now, variants_now):
        """The two prompt boxes show what the build will send for the style and the document's language (the facts
        style has its own prompts, in Chinese or English); a box the user edited keeps the user's text."""
        if style == "facts":
            lang = document_language(read_document(self._document(upload_path, document_id)))
            wanted = (FACTS_PAIR_PROMPT[lang], FACTS_VARIANT_PROMPT[lang])
        else:
            wanted = (DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT)
        return tuple(new if (now or "").strip() in known else gr.skip()
                     for new, now, known in zip(wanted, (pair_now, variants_now), DEFAULT_PROMPTS))

    def _teacher(self, url, model, key, seconds) -> TeacherConfig:
        """The environment key goes only to the URL the owner configured; a typed URL gets the typed key."""
        return TeacherConfig(url.strip(), model.strip(), self.services.keys.key_for(url, key), float(seconds or 120))

    # ----- document and teacher ----------------------------------------------------------------
    def split(self, upload_path, document_id, low, high, levels, lang=None):
        found = split_sections(read_document(self._document(upload_path, document_id)),
                               _split_settings(low, high, levels))
        table = pd.DataFrame([[x.index, x.heading, x.chars, x.first_line] for x in found],
                             columns=[column(c, lang or page_language()) for c in SECTION_COLUMNS])
        if not found:
            return self.s["sections_none"].format(low=int(low)), table
        return self.s["sections_found"].format(count=len(found), chars=sum(x.chars for x in found)), table

    def not_split(self):
        """After a failed split: no sections and no cost of another document (the message box says why)."""
        return self.s["sections_failed"], pd.DataFrame(columns=[column(c, page_language()) for c in SECTION_COLUMNS]), ""

    def wire_language(self, language: gr.Radio) -> None:
        """The sections table's headers follow the page's language: on load (the language is set then) and on
        the switch."""
        def sections_in(*args):
            return self.split(*args[:-1], lang=args[-1] or "en")[1]

        self.registry.on(language.change, sections_in, self.split_inputs + [language], self.sections,
                         action="read_files", args=self.split_args + (Choice("Language", ("en", "zh"), optional=True),),
                         show_progress="hidden")
        self.registry.on(language.change, self.preview_in, [self.preview, language], self.preview, action="edit_dataset",
                         args=(ANY, Choice("Language", ("en", "zh"), optional=True)), show_progress="hidden")

    @staticmethod
    def preview_in(frame, lang):
        """The preview with its headers in the page's new language, its rows (and any edits) kept."""
        return _with_headers(frame, lang or "en") if isinstance(frame, pd.DataFrame) else gr.skip()

    def test(self, url, model, key, seconds):
        """Ask the teacher one small question. The last result is cleared first: a failed test shows its error,
        not the "Connected" of an earlier one under it."""
        self.policy.require("outbound")
        yield ""
        yield check_connection(OpenAITeacher(self._teacher(url, model, key, seconds)))

    # ----- the build job -----------------------------------------------------------------------
    def show_cost(self, upload_path, document_id, low, high, levels, per, n_variants, style=DEFAULT_STYLE, exam=0):
        settings = BuildSettings(per_section=str(per), variants=int(n_variants or 0), split=_split_settings(low, high, levels),
                                 style=style or DEFAULT_STYLE, exam=max(0, int(exam or 0)))
        document = read_document(self._document(upload_path, document_id))
        return self.s["cost"].format(cost=estimate_cost(document, settings).describe())

    def start(self, upload_path, document_id, dataset_name, low, high, levels, local, url, model, key, per,
              n_variants, workers, pair_prompt, para_prompt, temperature, tokens, tries, seconds, style=DEFAULT_STYLE,
              exam=0, cost_seen=None):
        settings = BuildSettings(per_section=str(per), variants=int(n_variants), concurrency=int(workers),
                                 temperature=float(temperature), max_tokens=int(tokens), system_prompt=pair_prompt,
                                 paraphrase_prompt=para_prompt, retry=RetryPolicy(int(tries if tries is not None else 3)),
                                 split=_split_settings(low, high, levels), style=style or DEFAULT_STYLE,
                                 exam=max(0, int(exam or 0)))
        validate_settings(settings)
        document_path = self._document(upload_path, document_id)
        cost = estimate_cost(read_document(document_path), settings)
        signature = [str(document_path), cost.calls, cost.chars_sent]
        if (cost.calls > CONFIRM_ABOVE_CALLS or cost.warnings) and cost_seen != signature:
            return self.s["confirm_cost"].format(cost=cost.describe()), signature
        kept = bool(upload_path) and bool(split_sections(read_document(document_path), settings.split))
        if kept:  # in data/, where the rows, the runs and a reloaded page find it (uploads are deleted)
            document_path = keep_document(document_path, self.services.paths.data_dir)
        teacher = None if local is True else self._teacher(url, model, key, seconds)
        job = start_build(self.board, self.services.manager, self.services.paths, document_path, settings, teacher,
                          dataset_name or "", policy=self.policy)
        if kept:
            return self.s["started_kept"].format(name=job.name, path=document_path.name), None
        return self.s["started"].format(name=job.name), None

    def cancel(self):
        job = self.board.latest(JOB_KIND)
        if job is None or not job.running:  # a finished build is not "being cancelled"
            return self.s["no_build"]
        job.cancel()
        return self.s["cancelled"]

    def on_finished(self, job):
        path = job.result.get("dataset_path") if job is not None else None
        if not path:
            return gr.skip(), gr.skip(), gr.skip()
        dataset_id = self.services.catalog.dataset_id(path)
        return (_rows_frame(records.read_dataset(path), page_language()),
                gr.update(choices=self._datasets(), value=dataset_id), dataset_id)

    # ----- the result table --------------------------------------------------------------------
    def open_dataset(self, dataset_id):
        rows = records.read_dataset(self.services.catalog.resolve_dataset(dataset_id))
        return (_rows_frame(rows, page_language()), self.s["opened"].format(rows=len(rows), path=dataset_id),
                Path(dataset_id).stem, dataset_id)

    def import_rows(self, path):
        if not path:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        saved, rows = records.import_dataset(path, self.services.paths.data_dir)
        message = self.s["imported"].format(rows=len(rows), source=Path(path).name, path=saved.name)
        return (_rows_frame(rows, page_language()), message, gr.update(choices=self._datasets(), value=saved.name),
                saved.stem, saved.name)

    def save(self, frame, save_as, source_id=None):
        """The preview's rows as a new dataset file; the exam of the dataset it shows goes with them."""
        frame = frame.rename(columns=_field) if isinstance(frame, pd.DataFrame) else None
        rows = frame.to_dict(orient="records") if frame is not None else []
        exam = exam_beside(self.services.catalog.resolve_dataset(source_id)) if source_id else None
        path = records.save_rows(rows, save_as or "dataset", self.services.paths.data_dir, exam=exam)
        count = sum(1 for _ in open(path, encoding="utf-8"))
        message = (self.s["saved_with_exam"].format(rows=count, path=path.name, exam=exam_beside(path).name) if exam
                   else self.s["saved"].format(rows=count, path=path.name))
        saved = records.read_dataset(path)  # the preview shows the file as saved: deleted rows gone
        return (message, gr.update(choices=self._datasets(), value=path.name), _rows_frame(saved, page_language()),
                path.name)


def build_dataset_tab(services: Services, app: gr.Blocks) -> DatasetTab:
    return DatasetTab(services, app)
