"""Dataset Builder tab: document -> sections -> teacher -> base pairs -> paraphrases -> JSONL."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from studio.data import datasets
from studio.data.builder import DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, BuildSettings
from studio.data.documents import SplitSettings, read_document, split_sections
from studio.data.service import JOB_KIND, start_build
from studio.data.teacher import PROVIDER_PRESETS, OpenAITeacher, RetryPolicy, TeacherConfig, check_connection
from studio.services import SAMPLE_DOCUMENT, Services
from studio.ui.common import job_panel, user_errors
from studio.ui.strings import strings

PREVIEW_COLUMNS = ["instruction", "output", "group", "kind", "section"]
LEVELS = {"##": 2, "###": 3}


def _split_settings(min_chars, max_chars, levels) -> SplitSettings:
    return SplitSettings(int(min_chars or 100), tuple(LEVELS[level] for level in levels or []), int(max_chars or 3000))


def _document_path(upload, typed_path) -> Path:
    return Path(upload) if upload else Path(typed_path or SAMPLE_DOCUMENT)


def _rows_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in PREVIEW_COLUMNS:
        if column not in frame:
            frame[column] = ""
    return frame[PREVIEW_COLUMNS + [c for c in frame.columns if c not in PREVIEW_COLUMNS]].fillna("")


def _dataset_choices(services: Services) -> list[str]:
    return [str(p) for p in datasets.list_datasets(services.paths.data_dir)]


def build_dataset_tab(services: Services, app: gr.Blocks) -> None:
    s = strings("dataset")
    policy, board = services.policy, services.jobs

    with gr.Tab(s["tab"], id="dataset"):
        gr.Markdown(s["intro"])
        with gr.Row():
            with gr.Column():
                upload = gr.File(label=s["document"], file_types=[".md", ".txt", ".markdown"], type="filepath")
                doc_path = gr.Textbox(str(SAMPLE_DOCUMENT), label=s["doc_path"])
                name = gr.Textbox(label=s["name"])
                with gr.Row():
                    min_chars = gr.Number(100, label=s["min_chars"], precision=0)
                    max_chars = gr.Number(3000, label=s["max_chars"], precision=0)
                levels = gr.CheckboxGroup(list(LEVELS), value=list(LEVELS), label=s["levels"])
                split_btn = gr.Button(s["split"])
                split_msg = gr.Markdown()
                sections = gr.Dataframe(headers=["#", "heading", "chars", "first line"], interactive=False,
                                        label=s["sections"], max_height=320)
            with gr.Column():
                use_local = gr.Checkbox(False, label=s["use_local"])
                provider = gr.Dropdown(list(PROVIDER_PRESETS), value="SiliconFlow", label=s["provider"])
                base_url = gr.Textbox(PROVIDER_PRESETS["SiliconFlow"][0], label=s["base_url"])
                teacher_model = gr.Textbox(PROVIDER_PRESETS["SiliconFlow"][1], label=s["teacher_model"])
                api_key = gr.Textbox("", label=s["api_key"], type="password", placeholder=s["api_key_placeholder"])
                test_btn = gr.Button(s["test"], size="sm")
                test_msg = gr.Markdown()
                per_section = gr.Textbox("auto", label=s["per_section"])
                variants = gr.Slider(0, 30, value=14, step=1, label=s["variants"])
                concurrency = gr.Slider(1, 32, value=8, step=1, label=s["concurrency"])
                with gr.Accordion(s["advanced"], open=False):
                    system_prompt = gr.Textbox(DEFAULT_PAIR_PROMPT, label=s["system_prompt"], lines=4)
                    paraphrase_prompt = gr.Textbox(DEFAULT_PARAPHRASE_PROMPT, label=s["paraphrase_prompt"], lines=3)
                    with gr.Row():
                        temperature = gr.Number(0.2, label=s["temperature"])
                        max_tokens = gr.Number(600, label=s["max_tokens"], precision=0)
                        attempts = gr.Number(3, label=s["attempts"], precision=0)
                        timeout = gr.Number(120, label=s["timeout"])
        with gr.Row():
            build_btn = gr.Button(s["build"], variant="primary")
            cancel_btn = gr.Button(s["cancel"], variant="stop")
        panel = job_panel(board, JOB_KIND, s)
        with gr.Accordion(s["result"], open=True):
            with gr.Row():
                dataset_pick = gr.Dropdown(_dataset_choices(services), label=s["datasets"], scale=4,
                                           allow_custom_value=True)
                open_btn = gr.Button(s["open"], scale=1)
                import_file = gr.File(label=s["import"], file_types=[".jsonl", ".json"], type="filepath", scale=3)
            preview = gr.Dataframe(_rows_frame([]), label=s["preview"], interactive=True, wrap=True, max_height=480)
            with gr.Row():
                save_name = gr.Textbox(label=s["save_name"], scale=3)
                save_btn = gr.Button(s["save"], scale=1)
            result_msg = gr.Markdown()

        def fill_preset(choice):
            url, model = PROVIDER_PRESETS[choice]
            return url, model

        @user_errors
        def split(upload_path, typed, lo, hi, lv):
            path = _document_path(upload_path, typed)
            found = split_sections(read_document(path), _split_settings(lo, hi, lv))
            table = [[x.index, x.heading, x.chars, x.first_line] for x in found]
            return s["sections_found"].format(count=len(found), chars=sum(x.chars for x in found)), table

        def teacher_config(url, model, key, seconds) -> TeacherConfig:
            return TeacherConfig(url.strip(), model.strip(), key or "", float(seconds or 120))

        @user_errors
        def test(url, model, key, seconds):
            policy.require("build_dataset")
            return check_connection(OpenAITeacher(teacher_config(url, model, key, seconds)))

        @user_errors
        def start(upload_path, typed, dataset_name, lo, hi, lv, local, url, model, key, per, n_variants, workers,
                  sys_prompt, para_prompt, temp, tokens, tries, seconds):
            policy.require("build_dataset")
            settings = BuildSettings(per_section=str(per), variants=int(n_variants), concurrency=int(workers),
                                     temperature=float(temp), max_tokens=int(tokens), system_prompt=sys_prompt,
                                     paraphrase_prompt=para_prompt, retry=RetryPolicy(int(tries or 3)),
                                     split=_split_settings(lo, hi, lv))
            teacher = None if local else teacher_config(url, model, key, seconds)
            job = start_build(board, services.manager, services.paths, _document_path(upload_path, typed), settings,
                              teacher, dataset_name or "")
            return s["started"].format(name=job.name)

        @user_errors
        def cancel():
            policy.require("build_dataset")
            job = board.latest(JOB_KIND)
            if job is not None and job.running:
                job.cancel()
            return s["cancelled"]

        @user_errors
        def open_dataset(path):
            rows = datasets.read_dataset(path)
            return _rows_frame(rows), s["opened"].format(rows=len(rows), path=path), Path(path).stem

        @user_errors
        def import_rows(path):
            policy.require("edit_dataset")
            if not path:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            saved, rows = datasets.import_dataset(path, services.paths.data_dir)
            message = s["imported"].format(rows=len(rows), source=Path(path).name, path=saved)
            return _rows_frame(rows), message, gr.update(choices=_dataset_choices(services), value=str(saved)), saved.stem

        @user_errors
        def save(frame, save_as):
            policy.require("edit_dataset")
            rows = frame.to_dict(orient="records") if isinstance(frame, pd.DataFrame) else []
            path = datasets.save_rows(rows, save_as or "dataset", services.paths.data_dir)
            return s["saved"].format(rows=sum(1 for _ in open(path, encoding="utf-8")), path=path), \
                gr.update(choices=_dataset_choices(services), value=str(path))

        def on_finished(job):
            path = job.result.get("dataset_path") if job is not None else None
            if not path:
                return gr.skip(), gr.skip()
            return _rows_frame(datasets.read_dataset(path)), gr.update(choices=_dataset_choices(services), value=path)

        provider.change(fill_preset, provider, [base_url, teacher_model], api_name=False)
        split_btn.click(split, [upload, doc_path, min_chars, max_chars, levels], [split_msg, sections], api_name="split")
        app.load(split, [upload, doc_path, min_chars, max_chars, levels], [split_msg, sections], api_name=False)
        upload.change(split, [upload, doc_path, min_chars, max_chars, levels], [split_msg, sections], api_name=False)
        test_btn.click(test, [base_url, teacher_model, api_key, timeout], test_msg, api_name="test_teacher")
        build_btn.click(start, [upload, doc_path, name, min_chars, max_chars, levels, use_local, base_url,
                                teacher_model, api_key, per_section, variants, concurrency, system_prompt,
                                paraphrase_prompt, temperature, max_tokens, attempts, timeout],
                        panel.message, api_name="build_dataset")
        cancel_btn.click(cancel, None, panel.message, api_name="cancel_build")
        open_btn.click(open_dataset, dataset_pick, [preview, result_msg, save_name], api_name="open_dataset")
        import_file.upload(import_rows, import_file, [preview, result_msg, dataset_pick, save_name], api_name="import_dataset")
        save_btn.click(save, [preview, save_name], [result_msg, dataset_pick], api_name="save_dataset")
        panel.on_finish(on_finished, [preview, dataset_pick])
