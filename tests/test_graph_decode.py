"""The graph decoder's loop (static cache, own token choice) gives what transformers' generate() gives.

On the CPU the recorded CUDA graph is not used, but everything around it is: prefill into a static
cache, the per-row mask and positions of a left-padded batch, reuse of a step across replies, the
per-row adapter of side-by-side decoding, and forgetting recorded steps when the model may change.
"""

from __future__ import annotations

import threading

import pytest

from studio.model.generation import GenerationSettings, build_messages, render_prompt
from studio.model.graph_decode import GraphDecoder, cache_length
from studio.model.routing import adapter_block, route_rows

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


class Collect:
    """A streamer that keeps what it is given."""

    def __init__(self):
        self.values, self.ended = [], False

    def put(self, value):
        self.values.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def decode(decoder, loaded, prompts, settings, adapter_names=None, stop=None):
    tokenizer = loaded.tokenizer
    inputs = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, padding=True, padding_side="left")
    sink = Collect()
    decoder.generate(loaded.model, inputs["input_ids"], inputs["attention_mask"], settings, stop or threading.Event(),
                     sink, tokenizer.eos_token_id, tokenizer.pad_token_id, adapter_names)
    assert sink.ended
    steps = sink.values[1:]  # the first put is the prompt, as generate() does
    return [[step[row] for step in steps] for row in range(len(prompts))]


def reference(loaded, prompt, settings):
    import torch

    inputs = loaded.tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, pad_token_id=loaded.tokenizer.pad_token_id,
                                    eos_token_id=loaded.tokenizer.eos_token_id, **settings.generate_kwargs())
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def prompt_for(loaded, question):
    return render_prompt(loaded.tokenizer, build_messages(SYSTEM, [], question))


def test_cache_length_rounds_up_to_buckets():
    assert cache_length(10, 256) == 1024
    assert cache_length(800, 224) == 1024
    assert cache_length(800, 225) == 2048


def test_greedy_tokens_equal_generate_for_a_left_padded_batch_and_a_reused_step(manager):
    loaded = manager.require_loaded()
    settings = GenerationSettings.greedy(20)
    short, long = prompt_for(loaded, "你好"), prompt_for(loaded, "潮汐长枪怎么锻造？需要哪些材料，在哪里找到它们？")
    decoder = GraphDecoder(use_graphs=False)
    rows = decode(decoder, loaded, [short, long], settings)
    for row, prompt in zip(rows, [short, long]):
        expected = reference(loaded, prompt, settings)
        assert row[:len(expected)] == expected
    # the same recorded step serves the next reply (another prompt length, same bucket)
    again = decode(decoder, loaded, [long, short], settings)
    assert again == [rows[1], rows[0]]
    assert len(decoder._steps) == 1


def test_a_prompt_padded_to_its_bucket_gives_generate_s_tokens_and_the_same_reply_every_time(manager):
    from studio.model import graph_decode

    loaded = manager.require_loaded()
    settings = GenerationSettings.greedy(16)
    short, long = prompt_for(loaded, "你好"), prompt_for(loaded, "潮汐长枪怎么锻造？需要哪些材料，在哪里找到它们？")
    decoder = GraphDecoder(use_graphs=False)
    decoder.prompt_graphs = True  # padded prompts, as on a GPU (the runs stay eager here: no CUDA graphs)
    rows = decode(decoder, loaded, [short, long], settings)
    for row, prompt in zip(rows, [short, long]):
        expected = reference(loaded, prompt, settings)
        assert row[:len(expected)] == expected
    assert decode(decoder, loaded, [short, long], settings) == rows
    (step,) = decoder._steps.values()
    (length,) = step.prompts  # both rows padded to one bucket, reused by the second reply
    assert length % graph_decode.PROMPT_BUCKET == 0 and step.prompts[length].runs == 2
    assert decoder._padded_length(graph_decode.PROMPT_GRAPH_LIMIT + 1) == 0  # a long prompt runs as it is


def test_the_prompt_mask_leaves_padding_out_and_gives_each_padding_position_itself():
    import torch

    from studio.model.graph_decode import prompt_mask

    mask = prompt_mask(torch.tensor([[False, False, True, True], [True, True, True, True]]), 6)
    assert mask.shape == (2, 1, 4, 6)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert mask[1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_repetition_penalty_matches_generate(manager):
    loaded = manager.require_loaded()
    settings = GenerationSettings(max_new_tokens=16, temperature=0.0, top_p=1.0, repetition_penalty=1.3)
    prompt = prompt_for(loaded, "介绍雾灯岛")
    assert decode(GraphDecoder(False), loaded, [prompt], settings)[0] == reference(loaded, prompt, settings)


def test_sampling_gives_tokens_of_the_vocabulary(manager):
    loaded = manager.require_loaded()
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.8, repetition_penalty=1.1)
    row = decode(GraphDecoder(False), loaded, [prompt_for(loaded, "你好")], settings)[0]
    assert 1 <= len(row) <= 12 and all(0 <= token < len(loaded.tokenizer) for token in row)


def test_a_tiny_temperature_is_greedy_and_a_broken_row_never_reaches_the_sampler(manager):
    """temperature 1e-300 (a demo visitor's or an API client's value) overflowed the logits to inf; on a GPU
    the sampler's assert on the NaN probabilities then broke every later generation of the process."""
    import torch

    from studio.model.graph_decode import _sample

    loaded = manager.require_loaded()
    prompt = prompt_for(loaded, "介绍雾灯岛")
    tiny = GenerationSettings(max_new_tokens=10, temperature=1e-300, top_p=0.9, repetition_penalty=1.0)
    assert not tiny.sampling and tiny.generate_kwargs()["do_sample"] is False
    greedy = reference(loaded, prompt, GenerationSettings.greedy(10))
    assert decode(GraphDecoder(False), loaded, [prompt], tiny)[0] == greedy
    assert GenerationSettings(temperature=0.01).sampling and GenerationSettings(temperature=0.7).sampling
    scores = torch.tensor([[0.0, 5.0, 1.0], [float("nan"), 2.0, 3.0], [float("inf"), float("inf"), 0.0]])
    drawn = _sample(torch, scores)
    assert drawn[1].item() == 2 and drawn[2].item() in (0, 1) and 0 <= drawn[0].item() <= 2


def test_stop_event_ends_after_the_current_token(manager):
    loaded = manager.require_loaded()
    stop = threading.Event()
    stop.set()
    row = decode(GraphDecoder(False), loaded, [prompt_for(loaded, "你好")], GenerationSettings.greedy(50), stop=stop)[0]
    assert len(row) == 1


def test_adapter_rows_must_be_one_block_of_one_adapter():
    assert adapter_block([None, "a"]) == ("a", slice(1, 2))
    assert adapter_block(["a", "a", None]) == ("a", slice(0, 2))
    assert adapter_block([None, None]) == (None, slice(0, 0))
    for bad in (["a", "b"], ["a", None, "a"]):
        with pytest.raises(ValueError):
            adapter_block(bad)


def test_rows_with_adapter_restores_every_layer(manager):
    import torch
    from peft import LoraConfig, get_peft_model

    with manager.using("test") as loaded:
        loaded.model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                               init_lora_weights=False), adapter_name="a")
        layers = [m for m in loaded.model.modules() if hasattr(m, "lora_A") and "a" in m.lora_A]
        linears = [m for m in loaded.model.modules() if isinstance(m, torch.nn.Linear)]
        with route_rows(loaded.model, [None, "a"]):
            assert all("forward" in layer.__dict__ for layer in layers + linears)
        assert layers and not any("forward" in layer.__dict__ for layer in layers + linears)


def test_a_lease_that_may_change_the_model_forgets_recorded_steps(manager):
    loaded = manager.require_loaded()
    manager.chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(4))
    assert len(loaded.decoder._steps) == 1  # chat keeps its step for the next reply
    manager.chat(build_messages(SYSTEM, [], "你好"), GenerationSettings.greedy(4))
    assert len(loaded.decoder._steps) == 1
    with manager.using("attaching an adapter"):
        assert len(loaded.decoder._steps) == 0


def test_a_failed_recording_is_shown_in_the_model_status_and_the_log(manager, caplog):
    loaded = manager.require_loaded()
    loaded.decoder.use_graphs = True  # on the CPU, recording a CUDA graph fails
    messages = build_messages(SYSTEM, [], "你好")
    with caplog.at_level("WARNING", logger="studio.model.graph_decode"):
        reply = manager.chat(messages, GenerationSettings.greedy(6))
    assert reply == manager.chat(messages, GenerationSettings.greedy(6))  # decoded step by step instead
    status = manager.status()
    assert status.decoder == "graphs" and "recording the decode step failed" in status.decoder_problem
    assert "Warning: recording the decode step failed, decoding step by step, about 10x slower" in status.describe()
    assert any("recording the decode step failed" in record.getMessage() for record in caplog.records)


def test_a_failed_prompt_recording_keeps_the_eager_run_and_says_why(manager, caplog):
    loaded = manager.require_loaded()
    settings = GenerationSettings.greedy(6)
    prompt = prompt_for(loaded, "你好")
    decoder = GraphDecoder(use_graphs=False)
    decoder.use_graphs = decoder.prompt_graphs = True  # on the CPU, recording a CUDA graph fails
    with caplog.at_level("WARNING", logger="studio.model.graph_decode"):
        first = decode(decoder, loaded, [prompt], settings)  # runs the prompt twice: records there
    assert decode(decoder, loaded, [prompt], settings) == first == [reference(loaded, prompt, settings)]
    (step,) = decoder._steps.values()
    (recorded,) = step.prompts.values()
    assert recorded.graph is None and recorded.failure and recorded.runs == 3  # not tried again
    assert decoder.problem.startswith("recording the decode step failed")  # the first problem stays named
    assert decoder.problem.count("recording a prompt's run failed, prompts run step by step") == 1
    assert any("recording a prompt's run failed" in record.getMessage() for record in caplog.records)


def test_the_decode_mode_is_chosen_once_at_load(tiny_model_dir):
    from studio.model.decoding import GenerateDecoder
    from studio.model.loading import ModelSpec
    from studio.model.manager import ModelManager

    for mode, kind in (("graphs", GraphDecoder), ("eager", GenerateDecoder), ("static", GenerateDecoder)):
        manager = ModelManager(decode_mode=mode)
        manager.load(ModelSpec(str(tiny_model_dir)))
        decoder = manager.require_loaded().decoder
        assert type(decoder) is kind and manager.status().decoder == ("graphs" if mode == "graphs" else "eager")
        assert not manager.status().decoder_problem
