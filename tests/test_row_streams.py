"""Side by side with the rows on two CUDA streams: only the scheduling changes, never the replies.

On the CPU no CUDA graph is recorded, so the decoder never switches the streams on by itself. These
tests drive the fork/join helper with a stand-in for `torch.cuda` (streams that log what waits on
what and where each row runs), and run the decode step with it switched on, so the code path the
GPU records is exercised and its replies compared byte for byte with rows run one after another.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from studio.model.generation import GenerationSettings, build_messages, render_prompt
from studio.model.graph_decode import GraphDecoder
from studio.model.routing import RowStreams, route_rows

SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


class FakeStream:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait", self.name, other.name))


class FakeCuda:
    """What RowStreams uses of torch.cuda: Stream(), current_stream(), stream(s)."""

    def __init__(self):
        self.log: list = []
        self.current = FakeStream(self.log, "main")
        self.made = 0

    def Stream(self) -> FakeStream:  # noqa: N802 (torch.cuda's name)
        self.made += 1
        return FakeStream(self.log, f"side{self.made}")

    def current_stream(self) -> FakeStream:
        return self.current

    @contextmanager
    def stream(self, stream: FakeStream):
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous


def test_rows_fork_from_the_current_stream_run_apart_and_join_back():
    cuda = FakeCuda()
    streams = RowStreams(cuda)

    def run(row):
        cuda.log.append(("run", row, cuda.current.name))
        return row * 10

    assert streams.map(run, [1, 2]) == [10, 20]
    assert cuda.log == [("wait", "side1", "main"), ("run", 1, "main"), ("run", 2, "side1"), ("wait", "main", "side1")]
    assert cuda.current.name == "main"
    cuda.log.clear()
    assert streams.map(run, [1, 2, 3]) == [10, 20, 30]  # the side stream is kept; a third row gets its own
    assert cuda.made == 2
    assert cuda.log[:2] == [("wait", "side1", "main"), ("wait", "side2", "main")]
    assert cuda.log[2:5] == [("run", 1, "main"), ("run", 2, "side1"), ("run", 3, "side2")]
    assert cuda.log[5:] == [("wait", "main", "side1"), ("wait", "main", "side2")]


def test_a_row_that_fails_still_joins_its_stream_back():
    cuda = FakeCuda()

    def run(row):
        if row == 2:
            raise RuntimeError("capture failed")
        return row

    with pytest.raises(RuntimeError, match="capture failed"):
        RowStreams(cuda).map(run, [1, 2])
    assert cuda.log[-1] == ("wait", "main", "side1") and cuda.current.name == "main"


def test_streams_are_used_only_while_switched_on_and_only_by_4bit_layers(manager):
    import torch

    loaded = manager.require_loaded()
    cuda = FakeCuda()
    streams = RowStreams(cuda)
    quantized = [m for m in loaded.model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    ids = loaded.tokenizer(["你好", "天命人"], return_tensors="pt", padding=True)["input_ids"]
    with torch.inference_mode(), route_rows(loaded.model, [None, None], True, streams):
        off = loaded.model(input_ids=ids).logits
        assert cuda.log == []
        with streams.on():
            on = loaded.model(input_ids=ids).logits
        assert not streams.active
    forks = [entry for entry in cuda.log if entry[:2] == ("wait", "side1")]
    assert quantized and len(forks) == len(quantized)  # once per 4-bit layer; the float output head stays put
    assert torch.equal(on, off)


class StepOnStreams(GraphDecoder):
    """The graph decoder with its eager step run as the recorded one is: rows on (stand-in) streams."""

    def __init__(self, cuda: FakeCuda):
        super().__init__(use_graphs=False)
        self.rows_on_streams = True
        self.rows_together = False  # else the 4-bit layers take the decode step's rows together, not on streams
        self._row_streams_of_steps = RowStreams(cuda)

    def _row_streams(self):
        return self._row_streams_of_steps

    def _run_step(self, model, step):
        with self._row_streams_of_steps.on():
            return super()._run_step(model, step)


def _with_adapter_a(manager):
    """The manager's model with a random LoRA adapter "a" on three projections; returns it loaded."""
    from peft import LoraConfig, get_peft_model

    with manager.using("test") as loaded:
        loaded.model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                               init_lora_weights=False), adapter_name="a")
        loaded.model.eval()
    return manager.require_loaded()


def test_side_by_side_replies_are_unchanged_with_rows_on_streams(manager):
    loaded = _with_adapter_a(manager)
    prompt = render_prompt(loaded.tokenizer, build_messages(SYSTEM, [], "我该怎么成为天命人？"))
    settings = GenerationSettings.greedy(12)
    cuda = FakeCuda()
    on_streams = _decode(StepOnStreams(cuda), loaded, [prompt, prompt], settings, [None, "a"])
    assert any(entry == ("wait", "side1", "main") for entry in cuda.log)  # the streams path did run
    one_after_another = _decode(GraphDecoder(use_graphs=False), loaded, [prompt, prompt], settings, [None, "a"])
    assert on_streams == one_after_another
    chats = [_decode(GraphDecoder(use_graphs=False), loaded, [prompt], settings, [name])[0] for name in (None, "a")]
    assert on_streams == chats and chats[0] != chats[1]  # each column is its chat; the adapter changes the reply


def test_the_setting_is_off_without_cuda_and_a_failed_recording_on_streams_falls_back(manager, caplog, monkeypatch):
    from studio.model.decoding import make_decoder

    assert make_decoder("graphs", "cpu").rows_on_streams is False
    assert GraphDecoder(use_graphs=False, rows_on_streams=True)._row_streams() is None
    decoder = GraphDecoder(use_graphs=True, rows_on_streams=True)
    decoder.rows_together = False  # streams are for 4-bit layers that do not take the rows together
    assert decoder._row_streams() is decoder._row_streams_of_steps
    tried = []

    def try_record(model, step, row_streams):  # streams fail, rows one after another "record" (run eagerly)
        tried.append(row_streams)
        return "RuntimeError: operation not permitted when stream is capturing" if row_streams else ""

    monkeypatch.setattr(decoder, "_try_record", try_record)
    loaded = manager.require_loaded()
    prompt = render_prompt(loaded.tokenizer, build_messages(SYSTEM, [], "你好"))
    settings = GenerationSettings.greedy(6)
    with caplog.at_level("WARNING", logger="studio.model.graph_decode"):
        pair = _decode(decoder, loaded, [prompt, prompt], settings, [None, None])
    assert tried == [decoder._row_streams_of_steps, None]
    assert "rows on two streams failed, recorded the rows one after another" in decoder.problem
    assert "operation not permitted" in decoder.problem
    assert any("rows on two streams failed" in record.getMessage() for record in caplog.records)
    assert pair == _decode(GraphDecoder(use_graphs=False), loaded, [prompt, prompt], settings, [None, None])
    tried.clear()
    _decode(decoder, loaded, [prompt, prompt], GenerationSettings.greedy(40), [None, None])  # a new step: streams are no longer wanted
    assert tried == [None]  # streams are not tried again
    tried.clear()
    _decode(decoder, loaded, [prompt], settings, [None])
    assert tried == [None]  # a chat (one row) never records on streams


def _decode(decoder, loaded, prompts, settings, adapters):
    from test_graph_decode import decode

    return decode(decoder, loaded, prompts, settings, adapters, threading.Event())


# ----- 4-bit rows together -------------------------------------------------------------------------------

def _rows_seen(model) -> tuple[list, list]:
    """Wrap every linear layer to record how many rows each call gets: (4-bit calls, other calls)."""
    import torch

    four_bit, other = [], []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if module is model.get_output_embeddings():
                continue  # the head may take the rows together too, where it gives each row its bits
            seen = four_bit if type(module.weight).__name__ == "Params4bit" else other

            def wrapped(x, *args, _forward=module.forward, _seen=seen, **kwargs):
                _seen.append(x.numel() // x.shape[-1])
                return _forward(x, *args, **kwargs)

            module.forward = wrapped
            module.rows_seen_wrapper = True
    return four_bit, other


def _unwrap(model) -> None:
    for module in model.modules():
        if module.__dict__.pop("rows_seen_wrapper", False):
            module.__dict__.pop("forward", None)


def test_rows_together_tells_a_row_exact_kernel_from_one_that_is_not(manager):
    from studio.model.routing import rows_together

    model = manager.require_loaded().model
    quantized = [m for m in model.modules() if type(getattr(m, "weight", None)).__name__ == "Params4bit"]
    found = rows_together(model)
    assert {id(m) for m in quantized} <= found  # bitsandbytes' kernel on this machine: the bits of one row
    assert found <= {id(m) for m in quantized} | {id(model.get_output_embeddings())}
    first = quantized[0]
    shape = (first.in_features, first.out_features)
    original = first.forward
    try:  # a kernel that rounds a batch differently from one row: its shape's layers are left out
        first.forward = lambda x, *a, **k: original(x, *a, **k) * (1.0 if x.shape[0] == 1 else 1.0 + 2 ** -10)
        found = rows_together(model)
    finally:
        first.__dict__.pop("forward", None)
    same_shape = {id(m) for m in quantized if (m.in_features, m.out_features) == shape}
    assert same_shape and not same_shape & found
    assert {id(m) for m in quantized} - same_shape <= found
    from transformers import Qwen2Config, Qwen2ForCausalLM

    plain = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    assert rows_together(plain) <= {id(plain.lm_head)}  # no 4-bit layers; at most the head


def test_side_by_side_runs_4bit_decode_rows_together_and_stays_exact(manager, monkeypatch):
    import studio.model.decoding as decoding

    loaded = _with_adapter_a(manager)
    prompt = render_prompt(loaded.tokenizer, build_messages(SYSTEM, [], "我该怎么成为天命人？"))
    settings = GenerationSettings.greedy(12)
    chats = [_decode(GraphDecoder(use_graphs=False), loaded, [prompt], settings, [name])[0] for name in (None, "a")]
    four_bit, other = _rows_seen(loaded.model)
    try:
        together = _decode(GraphDecoder(use_graphs=False), loaded, [prompt, prompt], settings, [None, "a"])
        assert together == chats and chats[0] != chats[1]  # each column is its chat; the adapter changes it
        prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
        assert 2 in four_bit  # the decode steps' 4-bit calls took both rows at once
        assert max(four_bit) == prompt_tokens  # the prompt: one row's tokens a call, never both rows'
        assert 2 not in other and max(other) == prompt_tokens  # the LoRA matrices: one row a call
        four_bit.clear()
        other.clear()
        monkeypatch.setattr(decoding, "rows_together", lambda model, rows: frozenset())  # kernels that differ
        apart = _decode(GraphDecoder(use_graphs=False), loaded, [prompt, prompt], settings, [None, "a"])
        assert apart == chats
        assert four_bit and 2 not in four_bit  # every 4-bit call one row
    finally:
        _unwrap(loaded.model)
