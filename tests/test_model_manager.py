"""The model manager on the tiny 4-bit model: load, card, prompt, streaming, stop, busy, unload."""

from __future__ import annotations

import gc
import shutil
import threading
import weakref

import pytest

from studio.errors import ModelBusyError, ModelLoadError, ModelNotLoadedError
from studio.model.generation import GenerationSettings, build_messages, generate_text
from studio.model.loading import ModelSpec
from studio.model.manager import ModelManager, ModelState

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


def test_loads_in_4bit_on_cpu(manager):
    import bitsandbytes as bnb

    loaded = manager.require_loaded()
    projections = [m for n, m in loaded.model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    assert projections and all(isinstance(m, bnb.nn.Linear4bit) for m in projections)
    assert loaded.model.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    status = manager.status()
    assert status.state is ModelState.READY and status.device == "cpu" and status.quant == "4bit"


def test_model_card_facts(manager, tiny_model_dir):
    card = manager.card()
    assert card.linear4bit_layers == 2 * 7
    assert card.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert "Linear4bit(in_features=64, out_features=64, bias=True)" in card.module_tree
    tokenizer = manager.require_loaded().tokenizer
    assert card.tokenizer_tuple() == ("<|endoftext|>", "<|im_end|>", tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                                      tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert card.vocab_size == len(tokenizer)
    assert "<|im_start|>" in card.chat_template
    assert card.trainable_params == 0  # the base is frozen
    # logical parameter count: 4-bit weights count as their full shape, not the packed bytes
    loaded = manager.require_loaded()
    config = loaded.model.config
    per_layer_linear = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128
    embeddings = 2 * config.vocab_size * 64
    norms = 2 * 2 * 64 + 64
    assert card.total_params == 2 * per_layer_linear + embeddings + norms
    from studio.ui.chat_tab import card_markdown

    # every row of the page's card keeps two cells: the "|" of <|endoftext|> is escaped
    lines = card_markdown(card).splitlines()
    rows = lines[2:]
    assert all(line.replace("\\|", "").count("|") == 3 for line in rows) and "<\\|endoftext\\|>" in rows[-3]
    assert lines[0] == "| Item | Value |" and card_markdown(card, "zh").splitlines()[0] == "| 项目 | 值 |"
    assert rows[-3] == f"| Padding token (id) | `<\\|endoftext\\|>` ({card.pad_token_id}) |"


def test_prompt_is_the_exact_chatml_string(manager):
    messages = build_messages(SYSTEM, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}],
                              "我该怎么成为守灯人？")
    assert manager.render_prompt(messages) == (
        "<|im_start|>system\n你是《雾灯岛》领域助手，回答准确、简明。<|im_end|>\n"
        "<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！<|im_end|>\n"
        "<|im_start|>user\n我该怎么成为守灯人？<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_streaming_grows_and_matches_plain_generate(manager):
    messages = build_messages(SYSTEM, [], "潮汐长枪怎么锻造？")
    settings = GenerationSettings.greedy(24)
    pieces = list(manager.stream_chat(messages, settings))
    assert len(pieces) > 1
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    loaded = manager.require_loaded()
    prompt = manager.render_prompt(messages)
    assert pieces[-1] == generate_text(loaded.model, loaded.tokenizer, prompt, settings)
    # only new tokens are decoded: the reply does not echo the prompt
    assert "潮汐长枪怎么锻造" not in pieces[-1]


def test_stop_ends_generation_within_two_tokens_and_model_stays_usable(manager):
    loaded = manager.require_loaded()
    forwards = []
    handle = loaded.model.register_forward_hook(lambda *args: forwards.append(1))
    stop = threading.Event()
    messages = build_messages(SYSTEM, [], "介绍雾灯岛")
    stream = manager.stream_chat(messages, GenerationSettings.greedy(200), stop=stop)
    try:
        next(stream)
        stop.set()
        at_stop = len(forwards)
        rest = list(stream)
    finally:
        handle.remove()
    assert len(forwards) - at_stop <= 2, "generation ran on after Stop"
    assert len(forwards) < 100
    assert manager.status().state is ModelState.READY
    assert manager.chat(messages, GenerationSettings.greedy(4)) is not None
    del rest


def test_closing_the_stream_releases_the_model(manager):
    stream = manager.stream_chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(200))
    next(stream)
    assert manager.status().state is ModelState.BUSY
    stream.close()  # what Gradio does when the browser tab goes away
    assert manager.status().state is ModelState.READY


def test_second_action_while_busy_is_refused_at_once(manager):
    stream = manager.stream_chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(200))
    next(stream)
    try:
        with pytest.raises(ModelBusyError, match="busy \\(generating a reply\\)"):
            manager.chat(build_messages(SYSTEM, [], "再问一次"))
        with pytest.raises(ModelBusyError):
            manager.unload()
    finally:
        stream.close()


def test_unload_frees_the_model(manager):
    model_ref = weakref.ref(manager.require_loaded().model)
    manager.unload()
    gc.collect()
    assert model_ref() is None
    assert manager.status().state is ModelState.EMPTY
    with pytest.raises(ModelNotLoadedError):
        manager.chat(build_messages(SYSTEM, [], "你好"))


def test_hub_id_offline_fails_fast_with_advice():
    with pytest.raises(ModelLoadError) as info:
        ModelManager().load(ModelSpec("Qwen/Qwen2.5-7B-Instruct"))
    message = str(info.value)
    assert "not in the local cache" in message and "HF_HUB_OFFLINE" in message and "local model folder" in message


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelManager().load(ModelSpec(str(tmp_path)))


def test_tokenizer_without_chat_template_is_refused(tmp_path, tiny_model_dir):
    copy = tmp_path / "no-template"
    shutil.copytree(tiny_model_dir, copy)
    (copy / "chat_template.jinja").unlink(missing_ok=True)
    config = copy / "tokenizer_config.json"
    import json

    data = json.loads(config.read_text(encoding="utf-8"))
    data.pop("chat_template", None)
    config.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="no chat template"):
        ModelManager().load(ModelSpec(str(copy)))


def test_unknown_quantization_is_refused():
    with pytest.raises(ModelLoadError, match="Unknown quantization"):
        ModelSpec("x", "3bit")


def test_full_precision_and_8bit_load(tiny_model_dir):
    import bitsandbytes as bnb

    mgr = ModelManager()
    mgr.load(ModelSpec(str(tiny_model_dir), "none"))
    assert mgr.card().linear4bit_layers == 0
    mgr.load(ModelSpec(str(tiny_model_dir), "8bit"))
    assert mgr.card().linear8bit_layers == 14
    layer = mgr.require_loaded().model.model.layers[0].mlp.up_proj
    assert isinstance(layer, bnb.nn.Linear8bitLt)
    mgr.unload()


@pytest.mark.parametrize("damage", ["missing", "no_config", "bad_config", "no_template", "bad_weights"])
def test_a_failed_load_leaves_the_current_model_loaded_and_ready(manager, tiny_model_dir, tmp_path, damage):
    import json

    messages = build_messages("系统", [], "雾灯岛在哪里？")
    before = manager.chat(messages, GenerationSettings.greedy(8))
    bad = tmp_path / "bad-model"
    if damage != "missing":
        shutil.copytree(tiny_model_dir, bad)
    if damage == "no_config":
        (bad / "config.json").unlink()
    elif damage == "bad_config":
        (bad / "config.json").write_text('{"model_type": "qwen2", "hidden', encoding="utf-8")
    elif damage == "no_template":
        for path in bad.glob("chat_template*"):
            path.unlink()
        config = json.loads((bad / "tokenizer_config.json").read_text(encoding="utf-8"))
        config.pop("chat_template", None)
        (bad / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    elif damage == "bad_weights":
        for path in bad.glob("*.safetensors"):
            path.write_bytes(b"not weights")
    with pytest.raises(ModelLoadError):
        manager.load(ModelSpec(str(bad), "4bit"))
    assert manager.status().state is ModelState.READY
    assert manager.status().model_name == str(tiny_model_dir)
    assert manager.chat(messages, GenerationSettings.greedy(8)) == before
