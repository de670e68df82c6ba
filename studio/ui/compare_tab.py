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
from studio.ui.strings import strings

ADAPTER_COLUMNS = ["name", "status", "attached", "train loss", "eval loss", "dataset", "base", "problem"]


def _adapter_frame(services: Services) -> pd.DataFrame:
    entries = service.list_adapters(services.manager, services.paths.runs_dir)
    rounded = lambda value: None if value is None else round(value, 4)  # noqa: E731
    return pd.DataFrame([[e.name, e.status, "yes" if e.attached else "", rounded(e.train_loss), rounded(e.eval_loss),
                          e.dataset, e.base_model, e.problem] for e in entries], columns=ADAPTER_COLUMNS)


def _run_choices(services: Services) -> list[tuple[str, str]]:
    return [(e.name, e.folder) for e in service.list_adapters(services.manager, services.paths.runs_dir) if not e.problem]


def _settings(decoding: str, max_new: int, s: dict) -> GenerationSettings:
    if decoding == s["sampling"]:
        return GenerationSettings.tutorial_sampling(int(max_new))
    return GenerationSettings.greedy(int(max_new))


def build_compare_tab(services: Services, app: gr.Blocks) -> None:
    s = strings("compare")
    manager, policy, board = services.manager, services.policy, services.jobs

    with gr.Tab(s["tab"], id="compare"):
        gr.Markdown(s["intro"])
        with gr.Accordion(s["adapters"], open=True):
            adapters_table = gr.Dataframe(_adapter_frame(services), interactive=False, max_height=240)
            with gr.Row():
                run_pick = gr.Dropdown(_run_choices(services), label=s["run"], scale=4, allow_custom_value=True)
                refresh_btn = gr.Button(s["refresh"], size="sm")
                attach_btn = gr.Button(s["attach"], size="sm")
                detach_btn = gr.Button(s["detach"], size="sm")
                confirm = gr.Checkbox(False, label=s["confirm"])
                delete_btn = gr.Button(s["delete"], size="sm", variant="stop")
            adapter_msg = gr.Markdown()
        with gr.Row():
            question = gr.Textbox(label=s["question"], lines=2, scale=3)
            with gr.Column(scale=2):
                preset = gr.Dropdown([q for q, _ in service.PRESET_QUESTIONS], value=None, label=s["preset"])
                heldout = gr.Dropdown([], label=s["heldout"])
        reference = gr.Markdown()
        with gr.Row():
            use_retrieval = gr.Checkbox(True, label=s["use_retrieval"])
            document = gr.Textbox(str(SAMPLE_DOCUMENT), label=s["document"], scale=3)
            top_k = gr.Slider(1, 5, value=2, step=1, label=s["top_k"])
            decoding = gr.Radio([s["greedy"], s["sampling"]], value=s["greedy"], label=s["decoding"])
            max_new = gr.Slider(16, 1024, value=256, step=16, label=s["max_new_tokens"])
        compare_btn = gr.Button(s["compare"], variant="primary")
        with gr.Row():
            base_out = gr.Textbox(label=s["base"], lines=8, interactive=False)
            rag_out = gr.Textbox(label=s["retrieval"], lines=8, interactive=False)
            tuned_out = gr.Textbox(label=s["tuned"], lines=8, interactive=False)
        with gr.Accordion(s["retrieved"], open=False):
            retrieved = gr.Markdown()
        with gr.Accordion(s["report"], open=True):
            with gr.Row():
                report_source = gr.Radio([s["source_heldout"], s["source_upload"]], value=s["source_heldout"],
                                         label=s["report_source"])
                upload = gr.File(label=s["upload"], file_types=[".jsonl", ".json"], type="filepath")
            with gr.Accordion(s["judge"], open=False):
                with gr.Row():
                    judge_url = gr.Textbox("", label=s["judge_url"])
                    judge_model = gr.Textbox("", label=s["judge_model"])
                    judge_key = gr.Textbox("", label=s["judge_key"], type="password")
            report_btn = gr.Button(s["run_report"], variant="primary")
            panel = job_panel(board, service.JOB_KIND, s)
            warning = gr.Markdown()
            summary = gr.Dataframe(pd.DataFrame(columns=["column", "char_f1", "rouge_l", "judge_mean", "improved", "worse"]),
                                   label=s["summary"], interactive=False)
            chart = gr.BarPlot(x="column", y="score", color="metric", label=s["chart"], height=260)
            per_question = gr.Dataframe(pd.DataFrame(columns=["#", "question", "reference", "column", "answer", "char_f1",
                                                              "rouge_l", "judge", "judge_reason"]),
                                        label=s["per_question"], interactive=False, wrap=True, max_height=420)
            exports = gr.File(label=s["exports"], file_count="multiple")

        def refresh():
            return _adapter_frame(services), gr.update(choices=_run_choices(services))

        @user_errors
        def attach(folder):
            policy.require("manage_adapters")
            if not folder:
                raise StudioError(s["pick_run"])
            name = service.attach_run(manager, Path(folder))
            return (s["attached"].format(name=name),) + refresh()

        @user_errors
        def detach(folder):
            policy.require("manage_adapters")
            if not folder:
                raise StudioError(s["pick_run"])
            service.detach_run(manager, Path(folder).name)
            return (s["detached"].format(name=Path(folder).name),) + refresh()

        @user_errors
        def delete(folder, sure):
            policy.require("manage_adapters")
            if not folder:
                raise StudioError(s["pick_run"])
            service.delete_run(manager, Path(folder), bool(sure))
            return (s["deleted"].format(name=Path(folder).name),) + refresh()

        def pick_run(folder):
            if not folder:
                return gr.update(choices=[]), gr.skip()
            rows = service.run_questions(Path(folder), "heldout.jsonl")
            doc = service.source_document(Path(folder))
            return gr.update(choices=[(r["instruction"], i) for i, r in enumerate(rows)], value=None), doc or gr.skip()

        def pick_preset(text):
            answer = dict(service.PRESET_QUESTIONS).get(text, "")
            return text, f"**{s['reference']}:** {answer}" if answer else ""

        def pick_heldout(index, folder):
            if index is None or not folder:
                return gr.skip(), gr.skip()
            row = service.run_questions(Path(folder), "heldout.jsonl")[int(index)]
            return row["instruction"], f"**{s['reference']}:** {row['output']}"

        @user_errors
        def compare(text, folder, retrieval_on, doc, k, mode, tokens, request: gr.Request):
            policy.require("chat")
            if not folder:
                raise StudioError(s["pick_run"])
            if not text or not text.strip():
                raise StudioError("Type a question first.")
            name = service.attach_run(manager, Path(folder))
            system = adapters.read_metadata(Path(folder)).get("system_prompt", services.default_system_prompt)
            settings = _settings(mode, tokens, s)
            messages = build_messages(system, [], text)
            base = tuned = rag = ""
            hits_md = ""
            for base, tuned in manager.stream_side_by_side(messages, name, settings):
                yield base, "", tuned, gr.skip()
            if retrieval_on and doc:
                hits = SectionRetriever.from_document(doc).search(text, int(k))
                hits_md = "\n\n".join(f"**{h.section.heading}** (score {h.score:.2f})\n\n{h.section.text}" for h in hits)
                for rag in manager.stream_chat(retrieval_messages(system, text, hits), settings):
                    yield base, rag, tuned, hits_md
            yield base, rag, tuned, hits_md or "—"

        @user_errors
        def report(folder, source, upload_path, retrieval_on, doc, k, mode, tokens, url, model, key):
            policy.require("chat")
            if not folder:
                raise StudioError(s["pick_run"])
            questions = read_dataset(upload_path) if source == s["source_upload"] and upload_path else None
            judge = TeacherConfig(url.strip(), model.strip(), key or "") if url and url.strip() else None
            job = service.start_report(board, manager, Path(folder), questions, doc if retrieval_on else None,
                                       _settings(mode, tokens, s), judge, int(k))
            return s["started"].format(name=job.name)

        def on_report(job):
            if job is None or not job.result.get("rows"):
                return (f"**{job.status.value}:** {job.error}" if job is not None and job.error else gr.skip(),
                        gr.skip(), gr.skip(), gr.skip(), gr.skip())
            result = job.result
            summary_frame = pd.DataFrame([{"column": c, **v} for c, v in result["summary"].items()])
            chart_frame = pd.DataFrame([{"column": c, "metric": m, "score": v[m]} for c, v in result["summary"].items()
                                        for m in ("char_f1", "rouge_l")])
            files = result.get("files", [])
            text = f"⚠️ {result['warning']}" if result.get("warning") else ""
            return text, summary_frame, chart_frame, pd.DataFrame(table_rows(result)), files

        refresh_btn.click(refresh, None, [adapters_table, run_pick], api_name=False)
        attach_btn.click(attach, run_pick, [adapter_msg, adapters_table, run_pick], api_name="attach_adapter")
        detach_btn.click(detach, run_pick, [adapter_msg, adapters_table, run_pick], api_name="detach_adapter")
        delete_btn.click(delete, [run_pick, confirm], [adapter_msg, adapters_table, run_pick], api_name="delete_adapter")
        run_pick.change(pick_run, run_pick, [heldout, document], api_name=False)
        app.load(pick_run, run_pick, [heldout, document], api_name=False)
        preset.change(pick_preset, preset, [question, reference], api_name=False)
        heldout.change(pick_heldout, [heldout, run_pick], [question, reference], api_name=False)
        compare_btn.click(compare, [question, run_pick, use_retrieval, document, top_k, decoding, max_new],
                          [base_out, rag_out, tuned_out, retrieved], api_name="compare")
        report_btn.click(report, [run_pick, report_source, upload, use_retrieval, document, top_k, decoding, max_new,
                                  judge_url, judge_model, judge_key], panel.message, api_name="run_report")
        panel.on_finish(on_report, [warning, summary, chart, per_question, exports])
