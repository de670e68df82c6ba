"""Train tab: dataset, template guard, LoRA and training settings, and the training job's live view."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import gradio as gr

from studio.data import datasets
from studio.errors import StudioError
from studio.model.card import human_count
from studio.train.estimate import lora_param_count
from studio.train.memory import dataset_lengths, estimate_peak, free_gpu_gib
from studio.train.formatting import guard_html, template_guard
from studio.train.job import RunRequest
from studio.train.service import JOB_KIND, list_runs, load_request, new_run_dir, start_training, stop_training
from studio.train.settings import ALL_PROJECTIONS, PRESETS, LoraSettings, TrainSettings, peft_default_targets, preset
from studio.train.split import split_heldout
from studio.services import Services
from studio.ui.common import job_panel, user_errors
from studio.ui.strings import strings

SETTING_FIELDS = ("learning_rate", "epochs", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "max_length",
                  "save_every", "heldout_per_group", "seed", "gradient_checkpointing", "packing")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _datasets(services: Services) -> list[str]:
    return [str(p) for p in datasets.list_datasets(services.paths.data_dir)]


def _runs(services: Services) -> list[str]:
    return [str(p) for p in list_runs(services.paths.runs_dir)]


def build_train_tab(services: Services, app: gr.Blocks) -> None:
    s = strings("train")
    manager, policy, board = services.manager, services.policy, services.jobs
    defaults = TrainSettings()

    with gr.Tab(s["tab"], id="train"):
        gr.Markdown(s["intro"])
        with gr.Row():
            dataset = gr.Dropdown(_datasets(services), value=(_datasets(services) or [None])[0], label=s["dataset"],
                                  allow_custom_value=True, scale=4)
            refresh = gr.Button(s["refresh"], scale=1, size="sm")
            run_name = gr.Textbox(label=s["run_name"], scale=3)
        system = gr.Textbox(services.default_system_prompt, label=s["system"], lines=2)
        with gr.Accordion(s["guard"], open=True):
            guard_btn = gr.Button(s["guard_button"], size="sm")
            split_md = gr.Markdown()
            guard = gr.HTML()
        with gr.Row():
            with gr.Column():
                with gr.Accordion(s["lora"], open=True):
                    with gr.Row():
                        r = gr.Number(16, label=s["r"], precision=0)
                        alpha = gr.Number(32, label=s["alpha"], precision=0)
                        dropout = gr.Number(0.05, label=s["dropout"])
                    targets = gr.CheckboxGroup(list(ALL_PROJECTIONS), value=list(ALL_PROJECTIONS), label=s["targets"])
                    with gr.Row():
                        all_btn = gr.Button(s["all_targets"], size="sm")
                        peft_btn = gr.Button(s["peft_default"], size="sm")
                    trainable = gr.Markdown()
            with gr.Column():
                with gr.Accordion(s["training"], open=True):
                    preset_pick = gr.Dropdown([(label, key) for key, (label, _) in PRESETS.items()], value="tutorial",
                                              label=s["preset"])
                    with gr.Row():
                        lr = gr.Number(defaults.learning_rate, label=s["lr"])
                        epochs = gr.Number(defaults.epochs, label=s["epochs"])
                        max_steps = gr.Number(defaults.max_steps, label=s["max_steps"], precision=0)
                    with gr.Row():
                        batch = gr.Number(defaults.batch_size, label=s["batch"], precision=0)
                        accum = gr.Number(defaults.grad_accum, label=s["accum"], precision=0)
                        warmup = gr.Number(defaults.warmup_ratio, label=s["warmup"])
                    with gr.Row():
                        max_length = gr.Number(defaults.max_length, label=s["max_length"], precision=0)
                        save_every = gr.Number(defaults.save_every, label=s["save_every"], precision=0)
                        heldout = gr.Number(defaults.heldout_per_group, label=s["heldout"], precision=0)
                    with gr.Row():
                        seed = gr.Number(defaults.seed, label=s["seed"], precision=0)
                        checkpointing = gr.Checkbox(defaults.gradient_checkpointing, label=s["checkpointing"])
                        packing = gr.Checkbox(defaults.packing, label=s["packing"])
                    estimate_btn = gr.Button(s["estimate"], size="sm")
                    estimate_md = gr.Markdown()
        with gr.Row():
            start_btn = gr.Button(s["start"], variant="primary")
            stop_btn = gr.Button(s["stop"], variant="stop")
            resume_pick = gr.Dropdown(_runs(services), label=s["resume_run"], allow_custom_value=True, scale=3)
            resume_btn = gr.Button(s["resume"])
        panel = job_panel(board, JOB_KIND, s, plots=True)
        with gr.Accordion(s["result"], open=True):
            result_md = gr.Markdown()
            loss_png = gr.Image(type="filepath", label="loss.png", height=300)

        setting_inputs = [lr, epochs, max_steps, batch, accum, warmup, max_length, save_every, heldout, seed, checkpointing,
                          packing]

        def settings_from(*values) -> TrainSettings:
            kinds = {f: type(getattr(defaults, f)) for f in SETTING_FIELDS}
            return TrainSettings(**{f: kinds[f](v) for f, v in zip(SETTING_FIELDS, values)}, logging_steps=1)

        def apply_preset(name):
            chosen = asdict(preset(name))
            return [chosen[f] for f in SETTING_FIELDS]

        @user_errors
        def show_guard(path, prompt, per_group):
            if not path:
                raise StudioError(s["no_dataset"])
            rows = datasets.read_dataset(path)
            train_rows, held = split_heldout(rows, int(per_group or 0))
            groups = len({row.get("group") for row in held})
            split = f"**{s['split']}:** {len(rows)} rows → {len(train_rows)} for training, {len(held)} held out ({groups} groups)."
            if not manager.is_loaded:
                return split, ""
            tokenizer = manager.require_loaded().tokenizer
            first = train_rows[0]
            return split, guard_html(template_guard(tokenizer, first.get("system") or prompt, first["instruction"], first["output"]))

        def count_trainable(chosen, rank):
            if not manager.is_loaded or not chosen:
                return ""
            model = manager.require_loaded().model
            count = lora_param_count(model, chosen, int(rank or 0))
            total = manager.card().total_params
            return s["trainable"].format(count=f"{count:,} ({human_count(count)})", share=f"{count / max(total, 1):.3%}")

        @user_errors
        def estimate(path, prompt, chosen, rank, *values):
            if not path:
                raise StudioError(s["no_dataset"])
            if not manager.is_loaded:
                raise StudioError(strings("chat")["no_model"])
            settings = settings_from(*values)
            loaded = manager.require_loaded()
            lengths = dataset_lengths(loaded.tokenizer, datasets.read_dataset(path), prompt, settings.max_length)
            lora = LoraSettings(r=int(rank), targets=tuple(chosen))
            return estimate_peak(loaded.model, settings, lengths, lora).describe(free_gpu_gib())

        def peft_default():
            if not manager.is_loaded:
                return gr.update(value=["q_proj", "v_proj"])
            model_type = manager.require_loaded().model.config.model_type
            return gr.update(value=list(peft_default_targets(model_type)))

        def refresh_lists():
            choices = list(ALL_PROJECTIONS)
            if manager.is_loaded:
                choices = manager.card().lora_targets
            return gr.update(choices=_datasets(services)), gr.update(choices=choices), gr.update(choices=_runs(services))

        @user_errors
        def start(path, name, prompt, chosen, rank, lora_alpha, lora_dropout, *values):
            policy.require("train")
            if not path:
                raise StudioError(s["no_dataset"])
            lora = LoraSettings(int(rank), int(lora_alpha), float(lora_dropout), "none", tuple(chosen))
            request = RunRequest(Path(path), prompt, lora, settings_from(*values),
                                 new_run_dir(services.paths.runs_dir, name or Path(path).stem))
            job = start_training(board, manager, request)
            return s["started"].format(name=job.name)

        @user_errors
        def stop():
            policy.require("train")
            return s["stopping"] if stop_training(board) else s["not_running"]

        @user_errors
        def resume(run_dir):
            policy.require("train")
            if not run_dir:
                raise StudioError(s["resume_run"])
            job = start_training(board, manager, load_request(Path(run_dir)))
            return s["started"].format(name=job.name)

        def on_finished(job):
            if job is None:
                return gr.skip(), gr.skip(), gr.skip()
            if job.error:
                return f"**{job.status.value}:** {job.error}", None, gr.update(choices=_runs(services))
            result = job.result
            png = Path(result.get("run_dir", "")) / "loss.png"
            text = (f"**{result.get('adapter')}**: {result.get('status')} after {result.get('steps')} steps · "
                    f"train loss {_fmt(result.get('final_train_loss'))} · eval loss {_fmt(result.get('final_eval_loss'))} · "
                    f"folder `{result.get('run_dir')}`")
            return text, str(png) if png.exists() else None, gr.update(choices=_runs(services))

        preset_pick.change(apply_preset, preset_pick, setting_inputs, api_name=False)
        estimate_btn.click(estimate, [dataset, system, targets, r] + setting_inputs, estimate_md, api_name="estimate_memory")
        refresh.click(refresh_lists, None, [dataset, targets, resume_pick], api_name=False)
        guard_btn.click(show_guard, [dataset, system, heldout], [split_md, guard], api_name="template_guard")
        dataset.change(show_guard, [dataset, system, heldout], [split_md, guard], api_name=False)
        app.load(lambda *values: show_guard(*values) if values[0] else ("", ""), [dataset, system, heldout],
                 [split_md, guard], api_name=False)
        for control in (targets, r):
            control.change(count_trainable, [targets, r], trainable, api_name=False)
        app.load(count_trainable, [targets, r], trainable, api_name=False)
        all_btn.click(lambda: gr.update(value=list(ALL_PROJECTIONS)), None, targets, api_name=False)
        peft_btn.click(peft_default, None, targets, api_name=False)
        start_btn.click(start, [dataset, run_name, system, targets, r, alpha, dropout] + setting_inputs, panel.message,
                        api_name="start_training")
        stop_btn.click(stop, None, panel.message, api_name="stop_training")
        resume_btn.click(resume, resume_pick, panel.message, api_name="resume_training")
        panel.on_finish(on_finished, [result_md, loss_png, resume_pick])
