"""Baseline Chat tab: load the base model, read its card, and chat with it (or with an adapter)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.model.card import ModelCard, human_bytes, human_count
from studio.model.generation import GenerationSettings, StopSignals, build_messages
from studio.model.loading import QUANT_CHOICES, ModelSpec
from studio.services import MODEL_PRESETS, Services
from studio.train.adapters import read_metadata
from studio.ui.common import user_errors
from studio.ui.strings import strings


def card_markdown(card: ModelCard) -> str:
    pad, eos, pad_id, eos_id = card.tokenizer_tuple()
    rows = [
        ("Model", card.name),
        ("Quantization / device", f"{card.quant} / {card.device}"),
        ("Linear4bit layers", str(card.linear4bit_layers)),
        ("Linear8bitLt layers", str(card.linear8bit_layers)),
        ("LoRA-targetable linear layers", ", ".join(f"`{n}`" for n in card.lora_targets)),
        ("Parameters (total / trainable)", f"{human_count(card.total_params)} / {human_count(card.trainable_params)}"),
        ("Memory in use", human_bytes(card.memory_bytes)),
        ("Vocabulary size", str(card.vocab_size)),
        ("pad, eos, pad id, eos id", f"`{(pad, eos, pad_id, eos_id)}`"),
        ("Adapters attached", ", ".join(card.adapters) or "none"),
    ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def adapter_choices(services: Services, s: dict) -> list[tuple[str, str]]:
    status = services.manager.status()
    return [(s["adapter_base"], "")] + [(name, name) for name in status.adapters]


def build_chat_tab(services: Services, stops: StopSignals) -> None:
    s = strings("chat")
    manager, policy = services.manager, services.policy

    with gr.Tab(s["tab"], id="chat"):
        with gr.Row(equal_height=True):
            model_box = gr.Dropdown(list(MODEL_PRESETS), value=services.default_model, allow_custom_value=True,
                                    label=s["model"], info=s["model_info"], scale=4)
            quant = gr.Radio(list(QUANT_CHOICES), value=services.default_quant, label=s["quant"],
                             info=s["quant_info"], scale=2)
            load_btn = gr.Button(s["load"], variant="primary", scale=1)
            unload_btn = gr.Button(s["unload"], scale=1)
        load_status = gr.Markdown(s["no_model"])
        with gr.Accordion(s["card"], open=False):
            card_md = gr.Markdown()
            card_tree = gr.Code(label=s["card_tree"], language=None, lines=12, max_lines=30)
            card_template = gr.Code(label=s["card_template"], language="jinja2", lines=6, max_lines=20)
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(height=460, label=s["tab"], buttons=["copy"])
                message = gr.Textbox(label=s["message"], placeholder=s["message_placeholder"], lines=2)
                with gr.Row():
                    send_btn = gr.Button(s["send"], variant="primary")
                    stop_btn = gr.Button(s["stop"], variant="stop")
                    clear_btn = gr.Button(s["clear"])
            with gr.Column(scale=2):
                system = gr.Textbox(services.default_system_prompt, label=s["system"], info=s["system_info"], lines=3)
                adapter = gr.Dropdown(adapter_choices(services, s), value="", label=s["adapter"])
                with gr.Accordion(s["settings"], open=False):
                    max_new = gr.Slider(16, 2048, value=256, step=16, label=s["max_new_tokens"])
                    temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label=s["temperature"])
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label=s["top_p"])
                    rep = gr.Slider(1.0, 2.0, value=1.05, step=0.01, label=s["repetition_penalty"])
                preview = gr.Textbox(label=s["preview"], lines=10, max_lines=30, interactive=False,
                                     elem_classes=["mono"], buttons=["copy"], elem_id="prompt-preview")

        @user_errors
        def load(name, quant_choice, progress=gr.Progress()):
            policy.require("load_model")
            manager.load(ModelSpec(name, quant_choice), progress=lambda f, m: progress(f, desc=m))
            card = manager.card()
            return (s["loaded"].format(name=card.name, quant=card.quant, device=card.device),
                    card_markdown(card), card.module_tree, card.chat_template,
                    gr.update(choices=adapter_choices(services, s), value=""))

        @user_errors
        def unload():
            policy.require("load_model")
            manager.unload()
            return s["unloaded"], "", "", "", gr.update(choices=adapter_choices(services, s), value="")

        def render_preview(history, system_prompt, pending=None):
            if not manager.is_loaded:
                return ""
            return manager.render_prompt(build_messages(system_prompt, history or [], pending))

        @user_errors
        def respond(text, history, system_prompt, adapter_name, max_tokens, temp, p, penalty, request: gr.Request):
            policy.require("chat")
            if not text or not text.strip():
                raise gr.Error(s["empty_message"])
            history = list(history or [])
            settings = GenerationSettings(int(max_tokens), float(temp), float(p), float(penalty))
            messages = build_messages(system_prompt, history, text)
            stop = stops.fresh(request.session_hash or "cli")
            replies = manager.stream_chat(messages, settings, adapter_name or None, stop)
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
            prompt = manager.render_prompt(messages)
            try:
                for reply in replies:
                    history[-1]["content"] = reply
                    yield history, "", prompt
            finally:
                replies.close()
            yield history, "", prompt

        def stop(request: gr.Request):
            stops.stop(request.session_hash or "cli")

        def refresh_adapters():
            return gr.update(choices=adapter_choices(services, s))

        def adapter_prompt(name, current):
            """Chat with an adapter under the system prompt it was trained with (stored in its studio.json)."""
            folder = manager.adapter_folder(name) if name else None
            if not folder:
                return gr.skip()
            return read_metadata(Path(folder)).get("system_prompt", current)

        load_outputs = [load_status, card_md, card_tree, card_template, adapter]
        load_btn.click(load, [model_box, quant], load_outputs, concurrency_limit=1)
        unload_btn.click(unload, None, load_outputs)
        chat_inputs = [message, chatbot, system, adapter, max_new, temperature, top_p, rep]
        send_event = send_btn.click(respond, chat_inputs, [chatbot, message, preview], api_name="chat")
        submit_event = message.submit(respond, chat_inputs, [chatbot, message, preview], api_name=False)
        stop_btn.click(stop, None, None, cancels=[send_event, submit_event], api_name="stop")
        clear_btn.click(lambda: ([], ""), None, [chatbot, preview], api_name=False)
        system.change(render_preview, [chatbot, system], preview, api_name=False)
        adapter.focus(refresh_adapters, None, adapter, api_name=False)
        adapter.change(adapter_prompt, [adapter, system], system, api_name=False)
