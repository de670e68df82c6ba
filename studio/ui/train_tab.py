"""Train tab: dataset, template guard, LoRA and training settings, and the training job's live view."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import gradio as gr

from studio.data import records
from studio.data.exam import is_exam_file
from studio.errors import StudioError
from studio.model.card import base_parameter_count, human_count, lora_target_names
from studio.services import Services
from studio.train.estimate import lora_param_count
from studio.train.formatting import GUARD_WORDS, guard_html, template_guard
from studio.train.job import RunRequest
from studio.train.memory import estimate_for_dataset, free_gpu_gib
from studio.train.service import JOB_KIND, REQUEST_FILE, list_runs, load_request, new_run_dir, start_training, stop_training
from studio.train.settings import ALL_PROJECTIONS, PRESETS, LoraSettings, TrainSettings, peft_default_targets, preset
from studio.train.split import split_heldout
from studio.ui.common import job_panel
from studio.ui.history_panel import HistoryPanel
from studio.ui.i18n import FIXED_CHOICES, text as table_text, translate
from studio.ui.registry import ANY, BadArgument, Choice, Flag, Id, Num, Text, page_language
from studio.ui.strings import strings

SETTING_FIELDS = ("learning_rate", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "max_length",
                  "save_every", "heldout_per_group", "seed", "gradient_checkpointing", "packing",
                  "checkpoint_fraction", "liger_kernels", "dequantize_base", "compile_layers", "cuda_graphs",
                  "early_stop_patience")
INPUTS_LEVEL = "inputs-level"  # a row whose boxes line up at the bottom when one label wraps (assets/studio.css)
SETTING_TYPES = {name: type(getattr(TrainSettings(), name)) for name in SETTING_FIELDS}
# Server-side ranges of the settings, in SETTING_FIELDS order (the page's number boxes bound nothing over HTTP).
SETTING_SPECS = (Num("Learning rate", 1e-8, 1.0), Num("Epochs", 0.01, 1000), Num("Max steps", -1, 1_000_000, True),
                 Num("Batch size", 1, 256, True), Num("Gradient accumulation", 1, 1024, True), Num("Warmup", 0, 1),
                 Num("Max length", 16, 32768, True), Num("Checkpoint every N steps", 0, 1_000_000, True),
                 Num("Held out per group", 0, 100, True), Num("Seed", 0, 2**32 - 1, True),
                 Flag("Gradient checkpointing"), Flag("Packing"), Num("Checkpointed share", 0, 1),
                 Flag("Liger kernels"), Flag("bf16 copy of the base"), Flag("Compile the layers"), Flag("CUDA graphs"),
                 Num("Early stop", 0, 100, True))
RANK = Num("LoRA rank", 1, 512, True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def settings_from(*values) -> TrainSettings:
    """TrainSettings from the tab's inputs, in SETTING_FIELDS order."""
    return TrainSettings(**{f: SETTING_TYPES[f](v) for f, v in zip(SETTING_FIELDS, values)}, logging_steps=1)


class TrainTab:
    """Builds the tab's components, then wires each event to one handler method."""

    def __init__(self, services: Services, app: gr.Blocks):
        self.services, self.app, self.s = services, app, strings("train")
        self.manager, self.policy, self.board = services.manager, services.policy, services.jobs
        self.catalog, self.registry = services.catalog, services.registry
        with gr.Tab(self.s["tab"], id="train"):
            self._layout()
        self._wire()

    # ----- layout ------------------------------------------------------------------------------
    def _layout(self) -> None:
        s = self.s
        gr.Markdown(s["intro"])
        with gr.Row():
            choices = self._datasets()
            self.dataset = gr.Dropdown(choices, value=(choices or [None])[0], label=s["dataset"],
                                       allow_custom_value=True, scale=4)
            self.refresh = gr.Button(s["refresh"], scale=1, size="sm")
            self.run_name = gr.Textbox(label=s["run_name"], scale=3)
        self.system = gr.Textbox(self.services.default_system_prompt, label=s["system"], lines=2)
        with gr.Accordion(s["guard"], open=True):
            self.guard_btn = gr.Button(s["guard_button"], size="sm")
            self.split_md = gr.Markdown()
            self.guard = gr.HTML()
        with gr.Row():
            with gr.Column():
                self._lora_controls()
            with gr.Column():
                self._training_controls()
        with gr.Row():
            self.start_btn = gr.Button(s["start"], variant="primary")
            self.stop_btn = gr.Button(s["stop"], variant="stop")
            self.resume_pick = gr.Dropdown(self._runs(), label=s["resume_run"], allow_custom_value=True, scale=3)
            self.resume_btn = gr.Button(s["resume"])
        self.panel = job_panel(self.board, JOB_KIND, s, plots=True)
        with gr.Accordion(s["result"], open=True):
            self.result_md = gr.Markdown()
            self.loss_png = gr.Image(type="filepath", label=s["loss_png"], height=300)
        self.history = HistoryPanel(self.services)

    def _lora_controls(self) -> None:
        s = self.s
        with gr.Accordion(s["lora"], open=True):
            with gr.Row():
                self.r = gr.Number(16, label=s["r"], precision=0)
                self.alpha = gr.Number(32, label=s["alpha"], precision=0)
                self.dropout = gr.Number(0.05, label=s["dropout"])
            self.targets = gr.CheckboxGroup(list(ALL_PROJECTIONS), value=list(ALL_PROJECTIONS), label=s["targets"])
            with gr.Row():
                self.all_btn = gr.Button(s["all_targets"], size="sm")
                self.peft_btn = gr.Button(s["peft_default"], size="sm")
            self.trainable = gr.Markdown()

    def _training_controls(self) -> None:
        s, d = self.s, TrainSettings()
        with gr.Accordion(s["training"], open=True):
            # short names in the box (a preset's whole description was cut there), the description under it
            self.preset = gr.Dropdown([(s[f"preset_name_{key}"], key) for key in PRESETS], value="tutorial",
                                      label=s["preset"], elem_classes=[FIXED_CHOICES])  # relabelled in Chinese
            self.preset_note = gr.Markdown(s["preset_tutorial"])
            with gr.Row(elem_classes=[INPUTS_LEVEL]):
                lr = gr.Number(d.learning_rate, label=s["lr"])
                epochs = gr.Number(d.epochs, label=s["epochs"])
                max_steps = gr.Number(d.max_steps, label=s["max_steps"], precision=0)
            with gr.Row(elem_classes=[INPUTS_LEVEL]):
                batch = gr.Number(d.batch_size, label=s["batch"], precision=0)
                accum = gr.Number(d.grad_accum, label=s["accum"], precision=0)
                warmup = gr.Number(d.warmup_ratio, label=s["warmup"])
            with gr.Row(elem_classes=[INPUTS_LEVEL]):
                max_length = gr.Number(d.max_length, label=s["max_length"], precision=0)
                save_every = gr.Number(d.save_every, label=s["save_every"], precision=0)
                self.heldout = gr.Number(d.heldout_per_group, label=s["heldout"], precision=0)
            with gr.Row():
                seed = gr.Number(d.seed, label=s["seed"], precision=0)
                checkpointing = gr.Checkbox(d.gradient_checkpointing, label=s["checkpointing"])
                packing = gr.Checkbox(d.packing, label=s["packing"])
            early_stop = gr.Number(d.early_stop_patience, label=s["early_stop"], info=s["early_stop_info"], precision=0,
                                   minimum=0)
            speed = self._speed_switches(d)
            with gr.Row():
                self.document_rows = gr.Checkbox(False, label=s["document_rows"], info=s["document_rows_info"])
                self.document_file = gr.Dropdown(self.catalog.ids("documents"), value=None, label=s["document_file"],
                                                 allow_custom_value=False, scale=2)
            self.estimate_btn = gr.Button(s["estimate"], size="sm")
            self.estimate_md = gr.Markdown()
        self.settings = [lr, epochs, max_steps, batch, accum, warmup, max_length, save_every, self.heldout, seed,
                         checkpointing, packing, *speed, early_stop]

    def _speed_switches(self, d: TrainSettings) -> list:
        """The presets' speed switches (GPU only; each keeps the loss), in SETTING_FIELDS order."""
        s = self.s
        with gr.Accordion(s["speed"], open=False):
            with gr.Row():
                fraction = gr.Number(d.checkpoint_fraction, label=s["checkpoint_fraction"], minimum=0, maximum=1)
                liger = gr.Checkbox(d.liger_kernels, label=s["liger_kernels"])
                dequantized = gr.Checkbox(d.dequantize_base, label=s["dequantize_base"])
                compiled = gr.Checkbox(d.compile_layers, label=s["compile_layers"])
                graphs = gr.Checkbox(d.cuda_graphs, label=s["cuda_graphs"])
        return [fraction, liger, dequantized, compiled, graphs]

    # ----- wiring ------------------------------------------------------------------------------
    def _wire(self) -> None:
        reg = self.registry
        guard_inputs, guard_outputs = [self.dataset, self.system, self.heldout], [self.split_md, self.guard]
        guard_args = (Id("Dataset", "datasets"), Text("System prompt", 4000), SETTING_SPECS[8])
        lora_inputs = [self.targets, self.r, self.alpha, self.dropout]
        lora_args = (ANY, RANK, Num("LoRA alpha", 1, 4096, True), Num("LoRA dropout", 0, 0.9))
        reg.on(self.preset.change, self.apply_preset, self.preset, self.settings, action="train",
               args=(Choice("Preset", tuple(PRESETS)),))
        reg.on(self.preset.change, self.describe_preset, self.preset, self.preset_note, action="view",
               args=(Choice("Preset", tuple(PRESETS)),), show_progress="hidden")
        reg.on(self.refresh.click, self.refresh_lists, None, [self.dataset, self.targets, self.resume_pick],
               action="read_files")
        reg.on(self.guard_btn.click, self.show_guard, guard_inputs, guard_outputs, action="read_files",
               name="template_guard", args=guard_args)
        reg.on(self.dataset.change, self.show_guard, guard_inputs, guard_outputs, action="read_files", args=guard_args)
        self.guard_events = (guard_inputs, guard_outputs, (Id("Dataset", "datasets", optional=True),) + guard_args[1:])
        reg.on(self.app.load, self.guard_on_load, guard_inputs, guard_outputs, action="read_files",
               args=self.guard_events[2])
        for trigger in (self.targets.change, self.r.change, self.app.load):  # the rank is checked in the handler
            reg.on(trigger, self.count_trainable, [self.targets, self.r], self.trainable, action="train",
                   args=(ANY, ANY))
        reg.on(self.all_btn.click, lambda: gr.update(value=list(ALL_PROJECTIONS)), None, self.targets, action="train")
        reg.on(self.peft_btn.click, self.peft_default, None, self.targets, action="train")
        reg.on(self.estimate_btn.click, self.estimate, [self.dataset, self.system, self.targets, self.r] + self.settings,
               self.estimate_md, action="read_files", name="estimate_memory",
               args=guard_args[:2] + (ANY, RANK) + SETTING_SPECS)
        document_args = (ANY, Id("Document", "documents", optional=True))
        reg.on(self.start_btn.click, self.start, [self.dataset, self.run_name, self.system] + lora_inputs +
               [self.document_rows, self.document_file] + self.settings,
               self.panel.message, action="train", name="start_training",
               args=(Id("Dataset", "datasets", optional=True), Text("Run name", 200), guard_args[1]) + lora_args +
               document_args + SETTING_SPECS)
        reg.on(self.stop_btn.click, self.stop, None, self.panel.message, action="train", name="stop_training")
        reg.on(self.resume_btn.click, self.resume, self.resume_pick, self.panel.message, action="train",
               name="resume_training", args=(Id("Run", "runs"),))
        self.panel.wire(reg, "train", self.on_finished, [self.result_md, self.loss_png, self.resume_pick])
        reg.on(self.app.load, self.form_of_latest_run, None, self.form_fields, action="read_files",
               show_progress="hidden")

    @property
    def form_fields(self) -> list:
        """The form's fields that a run's request fills, in `form_of_latest_run`'s order."""
        return [self.dataset, self.system, self.targets, self.r, self.alpha, self.dropout, self.document_rows,
                self.document_file] + self.settings

    # ----- lists -------------------------------------------------------------------------------
    def _datasets(self) -> list[str]:
        """The datasets to train on: an exam is never one (it stays listed in the Dataset tab to open)."""
        return [name for name in self.services.catalog.ids("datasets") if not is_exam_file(name)]

    def _runs(self) -> list[str]:
        return [p.name for p in list_runs(self.services.paths.runs_dir)]

    def wire_fresh_lists(self, *triggers) -> None:
        """Fill the dataset, target and run lists again on each trigger (the page's load, a tab switch): a
        dataset built or a run trained since the page was made is then listed without a click on Refresh."""
        for trigger in triggers:
            self.registry.on(trigger, self.refresh_lists, self.dataset, [self.dataset, self.targets, self.resume_pick],
                             action="read_files", args=(Id("Dataset", "datasets", optional=True),),
                             show_progress="hidden")

    def refresh_lists(self, current=None):
        """The lists again; an empty dataset box (no dataset when the page was made) gets the newest dataset."""
        model = self.manager.require_loaded().model if self.manager.is_loaded else None
        targets = lora_target_names(model) if model is not None else list(ALL_PROJECTIONS)
        datasets = self._datasets()
        dataset = gr.update(choices=datasets) if current or not datasets else gr.update(choices=datasets,
                                                                                        value=datasets[0])
        return dataset, gr.update(choices=targets), gr.update(choices=self._runs())

    def describe_preset(self, name):
        """What the picked preset sets (the page's registry puts it in the page's language)."""
        return self.s[f"preset_{name}"]

    def apply_preset(self, name):
        chosen = asdict(preset(name))
        return [chosen[f] for f in SETTING_FIELDS]

    # ----- before training ---------------------------------------------------------------------
    def show_guard(self, dataset_id, prompt, per_group):
        rows = records.read_dataset(self.catalog.resolve_dataset(dataset_id))
        train_rows, held = split_heldout(rows, int(per_group or 0))
        groups = len({row.get("group") for row in held})
        split = (f"**{self.s['split']}:** {len(rows)} rows → {len(train_rows)} for training, {len(held)} held out "
                 f"({groups} groups).")
        if not self.manager.is_loaded:
            return split, ""
        first = train_rows[0]
        guard = template_guard(self.manager.require_loaded().tokenizer, first.get("system") or prompt,
                               first["instruction"], first["output"])
        words = strings("train", page_language())
        return split, guard_html(guard, {key: words[key] for key in GUARD_WORDS})

    def wire_after_relabel(self, relabelled) -> None:
        """What a page opened (or reloaded) shows once the load's relabelling has written back the texts it
        read when the page opened: the note of whose settings the form holds."""
        self.registry.on(relabelled.then, self.note_of_latest_run, None, self.preset_note, action="read_files",
                         show_progress="hidden")

    def wire_language_switch(self, switched) -> None:
        """The template guard again after the language switch: its words are the page's."""
        inputs, outputs, args = self.guard_events
        self.registry.on(switched.then, self.guard_on_load, inputs, outputs, action="read_files", args=args,
                         show_progress="hidden")

    def guard_on_load(self, path, prompt, per_group):
        return self.show_guard(path, prompt, per_group) if path else ("", "")

    def count_trainable(self, chosen, rank):
        """The adapter's parameter count, or what is wrong with the rank: said here as it is typed, where a
        message box on every keystroke (and another from Start) said it twice, with two ranges."""
        if rank in (None, ""):
            return ""
        try:
            rank = RANK.check(rank, None)
        except BadArgument as problem:
            return str(problem)
        if not self.manager.is_loaded or not chosen or not isinstance(chosen, (list, tuple)):
            return ""
        model = self.manager.require_loaded().model
        count = lora_param_count(model, [str(name) for name in chosen[:32]], rank)
        total = base_parameter_count(model) + count  # as peft's print_trainable_parameters: the new adapter's share
        return self.s["trainable"].format(count=f"{count:,} ({human_count(count)})", share=f"{count / total:.3%}")

    def peft_default(self):
        if not self.manager.is_loaded:
            return gr.update(value=["q_proj", "v_proj"])
        return gr.update(value=list(peft_default_targets(self.manager.require_loaded().model.config.model_type)))

    def estimate(self, dataset_id, prompt, chosen, rank, *values):
        path = self.catalog.resolve_dataset(dataset_id)
        if not self.manager.is_loaded:
            raise StudioError(strings("chat")["no_model"])
        lora = LoraSettings(r=int(rank), targets=tuple(chosen))
        estimate = estimate_for_dataset(self.manager.require_loaded(), path, prompt, settings_from(*values), lora)
        return estimate.describe(free_gpu_gib())

    # ----- the job -----------------------------------------------------------------------------
    def start(self, dataset_id, name, prompt, chosen, rank, lora_alpha, lora_dropout, with_document, document_id,
              *values):
        if not dataset_id:  # none picked yet: say what to do rather than "unknown dataset"
            raise StudioError(self.s["no_dataset"])
        path = self.catalog.resolve_dataset(dataset_id)
        lora = LoraSettings(int(rank), int(lora_alpha), float(lora_dropout), "none", tuple(chosen))
        request = RunRequest(Path(path), prompt, lora, settings_from(*values),
                             new_run_dir(self.services.paths.runs_dir, name or Path(path).stem),
                             document=self._document_for(path, document_id) if with_document is True else None)
        job = start_training(self.board, self.manager, request, policy=self.policy)
        return self.s["started"].format(name=job.name)

    def _document_for(self, dataset: Path, document_id) -> Path:
        """The document for document rows: the one picked, else the dataset's source if it is a studio document."""
        if document_id:
            return self.catalog.resolve_document(document_id)
        source = next((row.get("source") for row in records.read_dataset(dataset) if row.get("source")), None)
        source_id = self.catalog.document_id(source)
        if not source_id:
            raise StudioError(self.s["no_document"])
        return self.catalog.resolve_document(source_id)

    def form_of_latest_run(self):
        """A reloaded page's form shows the settings of the run this studio trained last (the one going on, or
        the last one started), not the defaults: a page that reloads mid-run sees what is being trained."""
        job = self.board.latest(JOB_KIND)
        try:
            request = load_request(job.folder) if job is not None and job.folder is not None else None
        except (OSError, ValueError, StudioError):  # its request file is gone or damaged: keep the defaults
            request = None
        if request is None:
            return (gr.skip(),) * len(self.form_fields)
        lora, settings = request.lora, request.train
        document = self.catalog.document_id(request.document) if request.document else None
        return (self.catalog.dataset_id(request.dataset) or gr.skip(), request.system_prompt, list(lora.targets),
                lora.r, lora.alpha, lora.dropout, request.document is not None, document,
                *(getattr(settings, name) for name in SETTING_FIELDS))

    def note_of_latest_run(self):
        """The line under the preset when the form shows the last run's settings: whose they are (the preset's
        own line no longer fits them)."""
        job = self.board.latest(JOB_KIND)
        if job is None or job.folder is None or not (Path(job.folder) / REQUEST_FILE).is_file():
            return gr.skip()
        return self.s["preset_last_run"].format(name=Path(job.folder).name)

    def stop(self):
        return self.s["stopping"] if stop_training(self.board, policy=self.policy) else self.s["not_running"]

    def resume(self, run_id):
        job = start_training(self.board, self.manager, load_request(self.catalog.resolve_run(run_id)), policy=self.policy)
        return self.s["started"].format(name=job.name)

    def on_finished(self, job):
        if job is None:
            return gr.skip(), gr.skip(), gr.skip()
        if job.error:
            lang = page_language()  # the status word and the error in the page's language
            outcome = f"**{table_text('status', f'job_{job.status.value}', lang)}:** {translate(job.error, lang)}"
            return outcome, None, gr.update(choices=self._runs())
        result = job.result
        png = Path(result.get("run_dir", "")) / "loss.png"
        text = (f"**{result.get('adapter')}**: {result.get('status')} after {result.get('steps')} of "
                f"{result.get('max_steps')} steps · "
                f"train loss {_fmt(result.get('final_train_loss'))} · eval loss {_fmt(result.get('final_eval_loss'))} · "
                f"folder `{result.get('run_dir')}`")
        return text, str(png) if png.exists() else None, gr.update(choices=self._runs())


def build_train_tab(services: Services, app: gr.Blocks) -> TrainTab:
    return TrainTab(services, app)
