"""Baseline Chat tab: load the base model, read its card, and chat with it (or with an adapter)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.access import page_model_source
from studio.model.card import ModelCard, human_bytes, human_count
from studio.model.generation import GenerationSettings, StopSignals, build_messages
from studio.model.loading import QUANT_CHOICES, ModelSpec, quant_label
from studio.config import MODEL_PRESETS
from studio.services import Services
from studio.train.adapters import read_metadata
from studio.ui.i18n import text, translate
from studio.ui.registry import Choice, History, Num, Text, page_language
from studio.ui.strings import strings


def card_markdown(card: ModelCard, lang: str = "en") -> str:
    """The model card as a two-column table, its row names in `lang`."""
    pad, eos, pad_id, eos_id = card.tokenizer_tuple()
    rows = [
        ("card_model", card.name),
        ("card_quant", f"{translate(quant_label(card.quant), lang)} / {card.device}"),
        ("card_4bit", str(card.linear4bit_layers)),
        ("card_8bit", str(card.linear8bit_layers)),
        ("card_targets", ", ".join(f"`{n}`" for n in card.lora_targets)),
        ("card_params", f"{human_count(card.total_params)} / {human_count(card.trainable_params)}"),
        ("card_memory", human_bytes(card.memory_bytes)),
        ("card_vocab", str(card.vocab_size)),
        ("card_pad", _token(pad, pad_id, lang)),
        ("card_eos", _token(eos, eos_id, lang)),
        ("card_adapters", ", ".join(card.adapters) or text("terms", "none", lang)),
    ]
    # a "|" inside a value (Qwen's <|endoftext|>) ends a Markdown table cell unless escaped, even in code
    head = f"| {text('tables', 'card_item', lang)} | {text('tables', 'card_value', lang)} |\n|---|---|\n"
    return head + "\n".join(f"| {text('tables', k, lang)} | {v.replace('|', chr(92) + '|')} |"
                                             for k, v in rows)


def _token(token: str | None, token_id: int | None, lang: str) -> str:
    """A special token as the card shows it: the token in code, its id beside it."""
    if token is None:
        return text("terms", "none", lang)
    return f"`{token}` ({token_id})"


class ChatTab:
    """Builds the tab's components, then wires each event to one handler method."""

    def __init__(self, services: Services, stops: StopSignals):
        self.services, self.stops, self.s = services, stops, strings("chat")
        self.manager, self.policy, self.registry = services.manager, services.policy, services.registry
        with gr.Tab(self.s["tab"], id="chat"):
            self._layout()
        self._wire()

    # ----- layout ------------------------------------------------------------------------------
    def _layout(self) -> None:
        s = self.s
        with gr.Row(equal_height=True):
            self.model_box = gr.Dropdown(list(MODEL_PRESETS), value=self.services.default_model, allow_custom_value=True,
                                         label=s["model"], info=s["model_info"], scale=4)
            self.quant = gr.Radio([(quant_label(q), q) for q in QUANT_CHOICES], value=self.services.default_quant,
                                  label=s["quant"], info=s["quant_info"], scale=2)
            self.load_btn = gr.Button(s["load"], variant="primary", scale=1)
            self.unload_btn = gr.Button(s["unload"], scale=1)
        self.load_status = gr.Markdown(s["no_model"])
        with gr.Accordion(s["card"], open=False):
            self.card_md = gr.Markdown()
            self.card_tree = gr.Code(label=s["card_tree"], language=None, lines=12, max_lines=30)
            self.card_template = gr.Code(label=s["card_template"], language="jinja2", lines=6, max_lines=20)
        with gr.Row():
            with gr.Column(scale=3):
                self._conversation()
            with gr.Column(scale=2):
                self._options()

    def _conversation(self) -> None:
        s = self.s
        self.chatbot = gr.Chatbot(height=460, label=s["tab"], buttons=["copy"])
        self.message = gr.Textbox(label=s["message"], placeholder=s["message_placeholder"], lines=2)
        with gr.Row():
            self.send_btn = gr.Button(s["send"], variant="primary")
            self.stop_btn = gr.Button(s["stop"], variant="stop")
            self.clear_btn = gr.Button(s["clear"])

    def _options(self) -> None:
        s = self.s
        self.system = gr.Textbox(self.services.default_system_prompt, label=s["system"], info=s["system_info"], lines=3)
        self.adapter = gr.Dropdown(self.adapter_choices(), value="", label=s["adapter"])
        with gr.Accordion(s["settings"], open=False):
            self.max_new = gr.Slider(16, 2048, value=256, step=16, label=s["max_new_tokens"])
            self.temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label=s["temperature"])
            self.top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label=s["top_p"])
            self.rep = gr.Slider(1.0, 2.0, value=1.05, step=0.01, label=s["repetition_penalty"])
        self.preview = gr.Textbox(label=s["preview"], lines=10, max_lines=30, interactive=False,
                                  elem_classes=["mono"], buttons=["copy"], elem_id="prompt-preview")

    # ----- wiring ------------------------------------------------------------------------------
    def _wire(self) -> None:
        reg = self.registry
        load_outputs = [self.load_status, self.card_md, self.card_tree, self.card_template, self.adapter]
        self.load_outputs = load_outputs
        chat_inputs = [self.message, self.chatbot, self.system, self.adapter, self.max_new, self.temperature,
                       self.top_p, self.rep]
        chat_args = (Text("Message", 8000), History("Chat history"), Text("System prompt", 4000),
                     Choice("Adapter", self.attached_names, optional=True), Num("Max new tokens", 1, 2048, True),
                     Num("Temperature", 0.0, 2.0), Num("Top-p", 0.01, 1.0), Num("Repetition penalty", 1.0, 2.0))
        chat_outputs = [self.chatbot, self.message, self.preview]
        if reg.demo:
            self.model_box.value = reg.scrub_text(self.model_box.value)
        reg.on(self.load_btn.click, self.load, [self.model_box, self.quant], load_outputs, action="load_model",
               name="load", args=(Text("Model", 500), Choice("Quantization", QUANT_CHOICES)), concurrency_limit=1)
        reg.on(self.unload_btn.click, self.unload, None, load_outputs, action="load_model", name="unload")
        send_event = reg.on(self.send_btn.click, self.respond, chat_inputs, chat_outputs, action="chat", name="chat",
                            args=chat_args, generated=True)
        submit_event = reg.on(self.message.submit, self.respond, chat_inputs, chat_outputs, action="chat",
                              args=chat_args, generated=True)
        reg.on(self.stop_btn.click, self.stop, None, None, action="chat", name="stop",
               cancels=[e for e in (send_event, submit_event) if e is not None])
        reg.on(self.clear_btn.click, lambda: ([], ""), None, [self.chatbot, self.preview], action="view")
        reg.on(self.system.change, self.render_preview, [self.chatbot, self.system], self.preview, action="chat",
               args=(History("Chat history"), Text("System prompt", 4000)))
        reg.on(self.adapter.focus, lambda: gr.update(choices=self.adapter_choices()), None, self.adapter, action="view")
        reg.on(self.adapter.change, self.adapter_prompt, [self.adapter, self.system], self.system, action="chat",
               args=(Choice("Adapter", self.attached_names, optional=True), Text("System prompt", 4000)))

    def attached_names(self) -> list[str]:
        return list(self.manager.status().adapters)

    def adapter_choices(self) -> list[tuple[str, str]]:
        """The base (no adapter) and each attached adapter; the base's label in the page's language."""
        base = text("chat", "adapter_base", page_language())
        return [(base, "")] + [(name, name) for name in self.manager.status().adapters]

    # ----- the model ---------------------------------------------------------------------------
    def load(self, name, quant, progress=gr.Progress()):
        lang = page_language()  # the progress line (resolving, downloading, loading weights) in the page's language
        source = page_model_source(self.services.policy, name,
                                   (self.services.default_model, *MODEL_PRESETS))  # the owner's choices
        self.manager.load(ModelSpec(source, quant),
                          progress=lambda fraction, message: progress(fraction, desc=translate(message, lang)))
        return self._shown_model(lang)

    def current_model(self):
        """What a page opened (or reloaded) after the model was loaded shows: the model, not 'no model'."""
        if self.manager.loaded_or_none() is None:  # the adapter list's one choice (the base) in the page's language
            return (gr.skip(),) * 4 + (gr.update(choices=self.adapter_choices()),)
        return self._shown_model(page_language())

    def _shown_model(self, lang: str):
        card = self.manager.card()
        loaded = self.s["loaded"].format(name=card.name, quant=quant_label(card.quant), device=card.device)
        return (loaded, card_markdown(card, lang),
                card.module_tree, card.chat_template, gr.update(choices=self.adapter_choices(), value=""))

    def unload(self):
        self.manager.unload()
        return self.s["unloaded"], "", "", "", gr.update(choices=self.adapter_choices(), value="")

    def adapter_prompt(self, name, current):
        """Chat with an adapter under the system prompt it was trained with (stored in its studio.json)."""
        folder = self.manager.adapter_folder(name) if name else None
        if not folder:
            return gr.skip()
        return read_metadata(Path(folder)).get("system_prompt", current)

    # ----- the conversation --------------------------------------------------------------------
    def render_preview(self, history, system_prompt):
        if not self.manager.is_loaded:
            return ""
        return self.manager.render_prompt(build_messages(system_prompt, history or []))

    def respond(self, text, history, system_prompt, adapter_name, max_tokens, temperature, top_p, penalty,
                request: gr.Request):
        if not text or not text.strip():
            raise gr.Error(self.s["empty_message"])
        history = list(history or [])
        settings = GenerationSettings(int(max_tokens), float(temperature), float(top_p), float(penalty))
        messages = build_messages(system_prompt, history, text)
        stop = self.stops.fresh(request.session_hash or "cli")
        replies = self.manager.stream_chat(messages, settings, adapter_name or None, stop)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]
        prompt = self.manager.render_prompt(messages)
        try:
            for reply in replies:
                history[-1]["content"] = reply
                yield history, "", prompt
        finally:
            replies.close()
        yield history, "", prompt

    def stop(self, request: gr.Request):
        self.stops.stop(request.session_hash or "cli")


def build_chat_tab(services: Services, stops: StopSignals) -> ChatTab:
    return ChatTab(services, stops)
