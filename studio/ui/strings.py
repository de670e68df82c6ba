"""Every user-facing string of the UI, one dictionary per tab, so a translation adds one table."""

from __future__ import annotations

EN = {
    "app": {
        "title": "QLoRA Studio",
        "subtitle": "Teach an open LLM your private document: baseline, dataset, QLoRA training, before/after proof.",
        "status_label": "Model",
    },
    "chat": {
        "tab": "Baseline Chat",
        "model": "Base model (hub id or local folder)",
        "model_info": "Presets are Qwen2.5 Instruct models; type a local folder path to load from disk.",
        "quant": "Quantization",
        "quant_info": "4bit = the tutorial's NF4 + double quant + bf16 compute.",
        "load": "Load",
        "unload": "Unload",
        "card": "Model card",
        "card_tree": "Module tree (print(model))",
        "card_template": "Chat template",
        "system": "System prompt",
        "system_info": "Sent first in every conversation; training stores the one it used with the adapter.",
        "settings": "Generation settings",
        "max_new_tokens": "Max new tokens",
        "temperature": "Temperature (0 = greedy)",
        "top_p": "Top-p",
        "repetition_penalty": "Repetition penalty",
        "adapter": "Answer with",
        "adapter_base": "base model (no adapter)",
        "message": "Message",
        "message_placeholder": "Ask the base model about your document, e.g. 我该怎么成为守灯人？",
        "send": "Send",
        "stop": "Stop",
        "clear": "Clear",
        "preview": "Prompt preview (the exact string the chat template produced, special tokens included)",
        "no_model": "No model loaded. Pick a base model and press Load.",
        "loaded": "Loaded {name} ({quant}) on {device}.",
        "unloaded": "Model unloaded; its memory is freed.",
        "empty_message": "Type a message first.",
    },
    "dataset": {"tab": "Dataset Builder"},
    "train": {"tab": "Train"},
    "compare": {"tab": "Compare"},
}

LANGUAGES = {"en": EN}


def strings(tab: str, lang: str = "en") -> dict[str, str]:
    """The strings of one tab in one language (English where a translation lacks a key)."""
    table = LANGUAGES.get(lang, EN)
    return {**EN[tab], **table.get(tab, {})}
