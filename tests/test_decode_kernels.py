"""The graph decoder's own kernels, without a GPU: what they read and where they are put in place.

The CUDA kernels themselves run on the GPU only (`bench/nf4_kernels.py`, `bench/chat_speed.py`). Here:
- the 4-bit weight layout the kernel reads (`layer_args`: nibble order, double-quantized absmax) is
  decoded in plain PyTorch and must equal bitsandbytes' own dequantization of the tiny model's layers;
- with stand-in kernels that compute on the CPU, the token rows of the decode step go through them and
  the prompt does not, the model's outputs are unchanged, and the attention implementation is put back;
- the check that decides whether the 4-bit kernel is used refuses one that differs from bitsandbytes
  and one whose rows depend on each other;
- an adapter row's LoRA updates of the token steps go through the LoRA kernels' stand-in (the prompt and
  base rows do not) with peft's replies, and their check refuses a stand-in that differs from peft.
"""

from __future__ import annotations

import pytest

from studio.model import decode_attention, lora_cuda, nf4_cuda
from studio.model.generation import GenerationSettings
from studio.model.graph_decode import GraphDecoder

from test_graph_decode import decode, prompt_for, reference


def dequantized(layer: nf4_cuda.LayerArgs):
    """The layer's weight (out, in) in fp32, decoded as the CUDA kernel decodes it."""
    import torch

    packed = layer.weight.reshape(-1)
    high, low = (packed >> 4).long(), (packed & 15).long()
    indices = torch.stack([high, low], dim=1).reshape(layer.out_features, layer.in_features)
    if layer.nested:
        blocks = torch.arange(layer.qabsmax.numel())
        absmax = layer.code2[layer.qabsmax.long()] * layer.absmax2[blocks // 256] + layer.offset
    else:
        absmax = layer.absmax
    values = layer.code[indices].reshape(layer.out_features, -1, 64)
    return (values * absmax.reshape(layer.out_features, -1, 1)).reshape(layer.out_features, layer.in_features)


class CpuProducts:
    """Stands in for nf4_cuda.Nf4Kernels on the CPU: the same layer view; like bitsandbytes' CPU layers,
    it takes fp32 rows and multiplies them in bf16 (adding in fp32, as the CUDA kernel does)."""

    dtype_name, compute_dtype_name, device_type = "float32", "bfloat16", "cpu"

    def __init__(self, skew=None):
        self.rows_seen: list[int] = []
        self.skew = skew  # a mistake to plant: f(y, rows) -> y

    def grouped(self, layers, x2d, biases):
        self.grouped_calls += 1
        outputs = [self.products(layer, x2d, bias) for layer, bias in zip(layers, biases)]
        return [self.group_skew(y) for y in outputs] if self.group_skew else outputs

    grouped_calls, group_skew = 0, None

    def products(self, layer, x2d, bias=None):
        self.rows_seen.append(x2d.shape[0])
        import torch

        y = (x2d.to(torch.bfloat16).float() @ dequantized(layer).t()).to(torch.bfloat16).float()
        if bias is not None:
            y = y + bias.float()
        if self.skew is not None:
            y = self.skew(y, x2d.shape[0])
        return y.to(x2d.dtype)


class CpuAttention:
    """Stands in for decode_attention.DecodeAttentionKernels on the CPU (PyTorch's attention)."""

    dtype_name, device_type, head_dims = "float32", "cpu", (16,)  # the tiny model's heads

    def __init__(self):
        self.calls = 0

    def attend(self, query, key, value, mask, scaling):
        import torch

        self.calls += 1
        group = query.shape[1] // key.shape[1]
        rows = [torch.nn.functional.scaled_dot_product_attention(  # row by row, as the kernel computes them
            query[i:i + 1], key[i:i + 1].repeat_interleave(group, 1), value[i:i + 1].repeat_interleave(group, 1),
            attn_mask=mask[i:i + 1], scale=scaling) for i in range(query.shape[0])]
        return torch.cat(rows).transpose(1, 2).contiguous()

    writes = 0

    def write_cache(self, key_states, value_states, keys, values, length):
        """The cache-write kernel's contract: the token's keys and values at slot `length`, then length + 1."""
        self.writes += 1
        keys[:, :, int(length)] = key_states[:, :, 0]
        values[:, :, int(length)] = value_states[:, :, 0]
        length.add_(1)


def test_the_kernel_reads_the_4bit_layout_bitsandbytes_writes(manager):
    import bitsandbytes.functional as bf

    layers = nf4_cuda.four_bit_layers(manager.require_loaded().model)
    assert layers
    for module in layers:
        layer = nf4_cuda.layer_args(module.weight)
        assert layer.nested  # the seed's recipe: double quantization
        expected = bf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        assert (dequantized(layer) - expected).abs().max().item() <= 1e-6 * expected.abs().max().item()


def test_a_layer_s_kernel_view_is_gathered_once_per_weight(manager, monkeypatch):
    module = nf4_cuda.four_bit_layers(manager.require_loaded().model)[0]
    kernels, gathered = nf4_cuda.Nf4Kernels(), []
    real = nf4_cuda.layer_args
    monkeypatch.setattr(nf4_cuda, "layer_args", lambda weight: gathered.append(weight) or real(weight))
    first = nf4_cuda.args_of(module.weight, kernels)
    assert nf4_cuda.args_of(module.weight, kernels) is first and len(gathered) == 1  # no second GPU read
    assert nf4_cuda.args_of(module.weight, nf4_cuda.Nf4Kernels()) is not first  # another kernels object: its own
    assert nf4_cuda.args_of(module.weight, CpuProducts()) is not first and len(gathered) == 3  # no cache: fresh


def test_token_rows_take_the_kernel_and_the_prompt_takes_bitsandbytes(manager):
    import torch

    model = manager.require_loaded().model
    products = CpuProducts()
    count = len(nf4_cuda.four_bit_layers(model))
    with torch.no_grad():
        token = model(torch.tensor([[5]])).logits
        prompt = model(torch.tensor([[5, 6, 7]])).logits
        with nf4_cuda.kernel_layers(model, products):
            token_kernel = model(torch.tensor([[5]])).logits
            assert products.rows_seen == [1] * count
            prompt_kernel = model(torch.tensor([[5, 6, 7]])).logits
            assert products.rows_seen == [1] * count  # three rows: bitsandbytes
            model(torch.tensor([[5], [6]]))
            assert products.rows_seen[count:] == [2] * count
        model(torch.tensor([[5]]))
    assert products.rows_seen == [1] * count + [2] * count  # taken off again
    assert (token_kernel - token).abs().max().item() <= 0.02 * token.abs().max().item()  # bf16 rounding
    assert torch.equal(prompt_kernel, prompt)


def test_the_check_refuses_a_kernel_that_differs_or_whose_rows_depend_on_each_other(manager):
    module = nf4_cuda.four_bit_layers(manager.require_loaded().model)[0]
    assert nf4_cuda.layer_problem(module, CpuProducts(), (1, 2)) is None
    wrong = nf4_cuda.layer_problem(module, CpuProducts(skew=lambda y, rows: y * 1.1), (1, 2))
    assert "differs from bitsandbytes" in wrong
    coupled = nf4_cuda.layer_problem(module, CpuProducts(skew=lambda y, rows: y + 1e-3 * (rows - 1)), (1, 2))
    assert "a row of 2 rows differs from that row alone" in coupled


def test_token_steps_attend_through_the_kernel_and_the_implementation_is_put_back(manager):
    loaded = manager.require_loaded()
    model = loaded.model
    assert model.config._attn_implementation == "sdpa"
    settings = GenerationSettings.greedy(8)
    prompt = prompt_for(loaded, "潮汐长枪怎么锻造？")
    attention = CpuAttention()
    seen = []

    def during(*args, **kwargs):
        seen.append(model.config._attn_implementation)

    with decode_attention.decode_attention(model, attention):
        during()
        rows = decode(GraphDecoder(use_graphs=False), loaded, [prompt], settings)
    assert seen == [decode_attention.IMPLEMENTATION]
    assert model.config._attn_implementation == "sdpa"
    layers = model.config.num_hidden_layers
    assert attention.calls == 7 * layers  # each one-token step (the prompt went to SDPA)
    assert rows[0] == reference(loaded, prompt, settings)


def decode_with_cache_writes(loaded, attention, settings, prompt):
    """A reply from the stand-in decoder with the cache-write kernel switched on (`attention` its stand-in)."""
    decoder = decoder_with_stand_ins()
    decoder.cache_write_kernel, decoder._attention = True, attention
    return decoder, decode(decoder, loaded, [prompt], settings)


def test_token_steps_write_the_cache_through_the_kernel_and_replies_are_unchanged(manager):
    loaded = manager.require_loaded()
    settings = GenerationSettings.greedy(8)
    prompt = prompt_for(loaded, "潮汐长枪怎么锻造？")
    decoder, rows = decode_with_cache_writes(loaded, CpuAttention(), settings, prompt)
    assert "cache writes: the studio's CUDA kernel" in decoder.cuda_kernels_note
    # the check's two writes (one row, two rows), then each token step's, not the prompt's
    assert decoder._attention.writes == 2 + 7 * loaded.model.config.num_hidden_layers
    assert rows[0] == reference(loaded, prompt, settings)
    again = decode(decoder, loaded, [prompt], settings)  # the recorded step's cache, reused from slot 0
    assert again == rows


class MisplacedWrites(CpuAttention):
    def write_cache(self, key_states, value_states, keys, values, length):
        keys[:, :, int(length) + 1], values[:, :, int(length)] = key_states[:, :, 0], value_states[:, :, 0]
        length.add_(1)


class LengthStays(CpuAttention):
    def write_cache(self, key_states, value_states, keys, values, length):
        keys[:, :, int(length)], values[:, :, int(length)] = key_states[:, :, 0], value_states[:, :, 0]


def test_the_cache_write_check_refuses_a_kernel_that_writes_elsewhere_or_leaves_the_length():
    assert decode_attention.cache_write_problem(CpuAttention(), 16, 2) is None
    assert "wrote other values than an index copy (1 rows)" in decode_attention.cache_write_problem(MisplacedWrites(), 16, 2)
    assert "left the cache length at 17 instead of 18" in decode_attention.cache_write_problem(LengthStays(), 16, 2)
    assert "heads of 80 dimensions" in decode_attention.cache_write_problem(CpuAttention(), 80, 2)


def test_a_refused_cache_write_kernel_leaves_transformers_update_and_says_why(manager):
    loaded = manager.require_loaded()
    settings = GenerationSettings.greedy(6)
    prompt = prompt_for(loaded, "你好")
    decoder, rows = decode_with_cache_writes(loaded, LengthStays(), settings, prompt)
    assert ("cache writes: transformers' (the studio's kernel is not used: the cache-write kernel left the cache "
            "length at 17 instead of 18)") in decoder.cuda_kernels_note
    assert not any("update" in layer.__dict__ for step in decoder._steps.values() for layer in step.cache.layers)
    assert rows[0] == reference(loaded, prompt, settings)


def decoder_with_stand_ins() -> GraphDecoder:
    """A graph decoder whose kernels are the CPU stand-ins (the CUDA graphs themselves stay off)."""
    decoder = GraphDecoder(use_graphs=False)
    decoder.use_graphs = decoder.nf4_kernel = decoder.attention_kernel = decoder.grouped_launches = True
    decoder._nf4, decoder._attention = CpuProducts(), CpuAttention()
    return decoder


def patched_layers(model) -> int:
    return sum("forward" in m.__dict__ for m in nf4_cuda.four_bit_layers(model))


def test_the_decoder_puts_its_kernels_in_place_for_a_generation_and_takes_them_off(manager):
    model = manager.require_loaded().model
    decoder = decoder_with_stand_ins()
    with decoder._layer_kernels(model):
        assert model.config._attn_implementation == decode_attention.IMPLEMENTATION
        assert patched_layers(model) == len(nf4_cuda.four_bit_layers(model)) > 0
    assert "the studio's CUDA kernel;" in decoder.cuda_kernels_note and "PyTorch's" not in decoder.cuda_kernels_note
    assert model.config._attn_implementation == "sdpa" and patched_layers(model) == 0
    with pytest.raises(RuntimeError, match="mid-reply"):
        with decoder._layer_kernels(model):
            raise RuntimeError("mid-reply")
    assert model.config._attn_implementation == "sdpa" and patched_layers(model) == 0


def test_when_the_attention_switch_fails_the_4bit_layers_are_put_back(manager, monkeypatch):
    model = manager.require_loaded().model
    decoder = decoder_with_stand_ins()

    def broken(kernels):
        raise RuntimeError("no registry")

    monkeypatch.setattr(decode_attention, "register", broken)
    with pytest.raises(RuntimeError, match="no registry"):
        with decoder._layer_kernels(model):
            pass
    assert patched_layers(model) == 0 and model.config._attn_implementation == "sdpa"


def test_a_model_that_does_not_attend_with_sdpa_keeps_its_attention(manager):
    model = manager.require_loaded().model
    decoder = decoder_with_stand_ins()
    model.config._attn_implementation = "eager"
    try:
        with decoder._layer_kernels(model):
            assert model.config._attn_implementation == "eager"
            assert patched_layers(model) > 0
    finally:
        model.config._attn_implementation = "sdpa"
    assert "PyTorch's (the studio's kernel is not used: the model does not attend with PyTorch's SDPA)" in decoder.cuda_kernels_note


class NeverLaunched(CpuAttention):
    def attend(self, *args, **kwargs):
        raise AssertionError("a shape the kernel cannot take was launched")


@pytest.mark.parametrize("head_dim, heads, kv_heads, reason", [
    (80, 32, 8, "heads of 80 dimensions"),
    (64, 48, 4, "48 query heads over 4 key/value heads"),
])
def test_heads_the_attention_kernel_cannot_take_are_refused_before_a_launch(head_dim, heads, kv_heads, reason):
    kernels = NeverLaunched()
    kernels.head_dims = (64, 128)
    assert reason in decode_attention.kernels_ready(kernels, head_dim, heads, kv_heads)


def test_switching_attention_leaves_each_sub_config_its_own_implementation():
    import torch
    from transformers import LlavaConfig

    config = LlavaConfig()
    for part, value in ((config, "sdpa"), (config.text_config, "sdpa"), (config.vision_config, "eager")):
        part.__dict__["_attn_implementation_internal"] = value
    model = torch.nn.Module()
    model.config = config
    model.language, model.vision = torch.nn.Module(), torch.nn.Module()
    model.language.config, model.vision.config = config.text_config, config.vision_config
    with decode_attention.decode_attention(model, CpuAttention()):
        assert config._attn_implementation == config.text_config._attn_implementation == decode_attention.IMPLEMENTATION
        assert config.vision_config._attn_implementation == "eager"
    assert (config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation) == ("sdpa", "sdpa", "eager")


def test_tables_of_another_dtype_are_refused_not_copied():
    import torch

    class Weight:
        quant_state = type("State", (), {"quant_type": "nf4", "blocksize": 64, "shape": (64, 64), "nested": False,
                                         "code": torch.zeros(16, dtype=torch.float16),
                                         "absmax": torch.ones(64, dtype=torch.float32), "offset": 0.0})()
        data = torch.zeros(2048, dtype=torch.uint8)

    with pytest.raises(ValueError, match="fp32 code tables and absmax"):
        nf4_cuda.layer_args(Weight())


@pytest.mark.parametrize("rows", [0, 4])
def test_the_kernel_refuses_rows_it_does_not_take(rows):
    import torch

    with pytest.raises(ValueError, match="1 to 3 bf16 rows"):
        nf4_cuda.Nf4Kernels().products(None, torch.zeros(rows, 64, dtype=torch.bfloat16))


def test_a_weight_that_is_not_nf4_in_blocks_of_64_is_refused():
    import torch

    class Weight:
        quant_state = type("State", (), {"quant_type": "fp4", "blocksize": 64})()
        data = torch.zeros(1)

    with pytest.raises(ValueError, match="NF4 weights quantized in blocks of 64"):
        nf4_cuda.layer_args(Weight())


def test_rows_that_do_not_start_on_16_bytes_are_copied_for_the_vector_loads():
    import torch

    storage = torch.zeros(130, dtype=torch.bfloat16)
    on_boundary, off_boundary = storage[8:72], storage[1:65]
    assert nf4_cuda.aligned(on_boundary) is on_boundary
    copied = nf4_cuda.aligned(off_boundary)
    assert copied.data_ptr() % 16 == 0 and torch.equal(copied, off_boundary)


# ----- an adapter's LoRA updates of the token step (studio.model.lora_cuda) -------------------------
class CpuLora(lora_cuda.LoraKernels):
    """Stands in for lora_cuda.LoraKernels on the CPU: the same calls, peft's arithmetic row by row (as
    the kernels compute each row on its own), in the rows' dtype (the tiny model computes in fp32)."""

    device_type = "cpu"

    def __init__(self, skew=None):
        super().__init__()
        self.rows_seen: list[int] = []
        self.skew = skew  # a mistake to plant: f(update, rows) -> update

    def takes(self, x, part, weight_a, weight_b):
        return x.device.type == "cpu" and x.numel() // x.shape[-1] <= lora_cuda.MAX_ROWS and part.is_contiguous()

    def add_update(self, x2d, y2d, weight_a, weight_b, scaling, cast_update_first):
        rows = x2d.shape[0]
        self.rows_seen.append(rows)
        for r in range(rows):
            update = (x2d[r:r + 1].to(weight_a.dtype) @ weight_a.t() @ weight_b.t()) * scaling
            if self.skew is not None:
                update = self.skew(update, rows)
            y = y2d[r:r + 1]
            y2d[r:r + 1] = y + update.to(y.dtype) if cast_update_first else (y + update).to(y.dtype)

    grouped_calls, group_skew = 0, None

    def add_updates(self, x2d, updates):
        """The grouped launch's contract: each member's update as its own call gives it."""
        self.grouped_calls += 1
        for y2d, weight_a, weight_b, scaling, cast_update_first in updates:
            self.add_update(x2d, y2d, weight_a, weight_b, scaling, cast_update_first)
            if self.group_skew is not None:
                y2d.add_(self.group_skew)


def with_adapters(manager):
    from test_compare import ALL_SEVEN, _attach_random_adapter

    _attach_random_adapter(manager, "x", ALL_SEVEN, seed=1)
    _attach_random_adapter(manager, "y", ["q_proj", "v_proj"], seed=2)
    manager.require_loaded().model.set_adapter("x")  # x left active: y's rows must still get y alone
    return manager.require_loaded()


def lora_decoder(kernels) -> GraphDecoder:
    """The CPU graph decoder with the LoRA kernels' stand-in switched on (nothing else)."""
    decoder = GraphDecoder(use_graphs=False)
    decoder.lora_kernel, decoder._lora = True, kernels
    return decoder


def test_adapter_token_rows_take_the_lora_kernels_and_give_peft_s_replies(manager):
    loaded = with_adapters(manager)
    settings = GenerationSettings.greedy(12)
    prompt = prompt_for(loaded, "潮汐长枪怎么锻造？")
    plain = GraphDecoder(use_graphs=False)
    kernels = CpuLora()
    decoder = lora_decoder(kernels)
    layers = loaded.model.config.num_hidden_layers
    assert decoder._lora_kernels(loaded.model, ["y"]) is kernels  # checked once per layer shape, here
    kernels.rows_seen.clear()

    assert decode(decoder, loaded, [prompt], settings, ["y"]) == decode(plain, loaded, [prompt], settings, ["y"])
    assert kernels.rows_seen == [1] * (2 * layers * (settings.max_new_tokens - 1))  # q and v, each token step
    assert decoder.lora_kernels_note == "adapter updates: the studio's CUDA kernels"
    kernels.rows_seen.clear()
    pair = decode(decoder, loaded, [prompt, prompt], settings, [None, "y"])
    assert pair == decode(plain, loaded, [prompt, prompt], settings, [None, "y"])
    assert pair[1] != pair[0]  # y changes the reply: the equalities above can fail
    assert kernels.rows_seen == [1] * (2 * layers * (settings.max_new_tokens - 1))  # the adapter row alone
    kernels.rows_seen.clear()
    assert decode(decoder, loaded, [prompt], settings) == decode(plain, loaded, [prompt], settings)
    assert kernels.rows_seen == []  # a base chat runs no update


def test_with_padded_prompts_each_column_of_side_by_side_still_equals_its_chat(manager):
    loaded = with_adapters(manager)
    settings = GenerationSettings.greedy(10)
    prompt = prompt_for(loaded, "潮汐长枪怎么锻造？")
    decoder = GraphDecoder(use_graphs=False)
    decoder.prompt_graphs = True
    base, tuned = decode(decoder, loaded, [prompt, prompt], settings, [None, "y"])
    assert base == decode(decoder, loaded, [prompt], settings)[0]
    assert tuned == decode(decoder, loaded, [prompt], settings, ["y"])[0] != base


def test_the_lora_check_refuses_kernels_that_differ_or_whose_rows_depend_on_each_other(manager):
    import torch

    from studio.model.routing import lora_layers

    loaded = with_adapters(manager)
    layers = lora_layers(loaded.model)
    assert lora_cuda.adapter_problem(layers, "y", CpuLora()) is None
    wrong = lora_cuda.adapter_problem(layers, "y", CpuLora(skew=lambda update, rows: update * 1.1))
    assert "the kernels' update differs from peft's" in wrong
    coupled = lora_cuda.adapter_problem(layers, "y", CpuLora(skew=lambda update, rows: update + 1e-2 * (rows - 1)))
    assert "a row of 2 rows differs from that row alone" in coupled
    assert lora_cuda.adapter_problem(layers, "z", CpuLora()) == "no layer holds adapter 'z'"

    decoder = lora_decoder(CpuLora(skew=lambda update, rows: update * 1.1))
    assert decoder._lora_kernels(loaded.model, ["y"]) is None
    assert decoder.lora_kernels_note.startswith("adapter updates: peft's (the studio's kernels are not used: on a rank-8")
    decoder.lora_kernel = False
    assert decoder._lora_kernels(loaded.model, [None, "y"]) is None
    layer = next(layer for layer in layers if "y" in layer.lora_A)
    layer.lora_dropout["y"] = torch.nn.Dropout(0.1)  # dropout that is on: peft's arithmetic draws it
    assert lora_cuda.adapter_problem(layers, "y", CpuLora()) == "its dropout is on"
    layer.lora_dropout["y"].eval()
    assert lora_cuda.adapter_problem(layers, "y", CpuLora()) is None


def test_sibling_lora_layers_take_an_adapter_row_s_updates_together_with_peft_s_replies(manager):
    loaded = with_adapters(manager)
    settings = GenerationSettings.greedy(10)
    prompt = prompt_for(loaded, "潮汐长枪怎么锻造？")
    layers, steps = loaded.model.config.num_hidden_layers, settings.max_new_tokens - 1
    plain = GraphDecoder(use_graphs=False)
    kernels = CpuLora()
    decoder = lora_decoder(kernels)
    decoder.lora_grouped = True
    for name in ("x", "y"):  # each group shape is checked once, here (three grouped calls each)
        decoder._lora_groups(loaded.model, [name], decoder._lora_kernels(loaded.model, [name]))
    assert kernels.grouped_calls == 3 * 3  # q/k/v and gate/up of x, q/v of y
    kernels.grouped_calls = 0

    assert decode(decoder, loaded, [prompt], settings, ["x"]) == decode(plain, loaded, [prompt], settings, ["x"])
    assert kernels.grouped_calls == 2 * layers * steps  # q/k/v and gate/up, each token step
    assert kernels.rows_seen.count(1) >= 7 * layers * steps  # every layer's update (and the checks')
    kernels.grouped_calls = 0
    pair = decode(decoder, loaded, [prompt, prompt], settings, [None, "x"])
    assert pair == decode(plain, loaded, [prompt, prompt], settings, [None, "x"])
    assert pair[1] != pair[0] and kernels.grouped_calls == 2 * layers * steps  # the adapter row only
    kernels.grouped_calls = 0
    assert decode(decoder, loaded, [prompt], settings, ["y"]) == decode(plain, loaded, [prompt], settings, ["y"])
    assert kernels.grouped_calls == layers * steps  # y holds q and v: one group a block, k runs the base alone
    groups = decoder._lora_groups(loaded.model, ["y"], kernels)
    assert [[layer.base_layer.out_features for layer in members] for members in groups] == \
        [[m.q_proj.base_layer.out_features, m.v_proj.base_layer.out_features]
         for m in loaded.model.modules() if type(m).__name__ == "Qwen2Attention"]
    kernels.grouped_calls = 0
    assert decode(decoder, loaded, [prompt], settings) == decode(plain, loaded, [prompt], settings)
    assert kernels.grouped_calls == 0 and decoder.lora_groups_note == ""  # a base chat runs no update
    decoder.lora_grouped = False
    assert decode(decoder, loaded, [prompt], settings, ["x"]) == decode(plain, loaded, [prompt], settings, ["x"])
    assert kernels.grouped_calls == 0
    assert decoder.lora_groups_note == "each LoRA layer takes its own launches (switched off)"


def test_a_grouped_lora_launch_that_differs_from_the_layers_own_is_not_used(manager, caplog):
    import logging

    loaded = with_adapters(manager)
    settings = GenerationSettings.greedy(6)
    prompt = prompt_for(loaded, "你好")
    kernels = CpuLora()
    kernels.group_skew = 1e-3
    decoder = lora_decoder(kernels)
    decoder.lora_grouped = True
    with caplog.at_level(logging.INFO, logger="studio.model.graph_decode"):
        rows = decode(decoder, loaded, [prompt], settings, ["x"])
    assert rows == decode(GraphDecoder(use_graphs=False), loaded, [prompt], settings, ["x"])
    assert decoder._lora_groups(loaded.model, ["x"], kernels) == []
    assert "each LoRA layer takes its own launches (on 64+32+32x64 layers a grouped launch of the LoRA kernels " \
        "differs from the layers' own (1 rows))" in caplog.text
    assert kernels.grouped_calls == 2  # the two group shapes' checks, nothing after them


# ----- q/k/v and gate/up in one launch each ------------------------------------------------------
def test_q_k_v_and_gate_up_take_one_launch_each_with_the_same_outputs(manager):
    import torch

    model = manager.require_loaded().model
    layers = model.config.num_hidden_layers
    groups = nf4_cuda.sibling_groups(model)
    assert sorted(len(members) for members in groups) == [2] * layers + [3] * layers
    products = CpuProducts()
    ready, problem = nf4_cuda.groups_ready(model, products)
    assert problem is None and len(ready) == 2 * layers
    with torch.no_grad():
        with nf4_cuda.kernel_layers(model, products):
            alone = model(torch.tensor([[5]])).logits
        products.grouped_calls, seen = 0, len(products.rows_seen)
        with nf4_cuda.kernel_layers(model, products), nf4_cuda.grouped_layers(ready, products):
            together = model(torch.tensor([[5]])).logits
            assert products.grouped_calls == 2 * layers  # one launch for q/k/v, one for gate/up
            assert len(products.rows_seen) - seen == 7 * layers  # every layer's outputs, once
            model(torch.tensor([[5, 6, 7]]))  # a prompt: bitsandbytes, no grouped launch
            assert products.grouped_calls == 2 * layers
    assert torch.equal(together, alone)


def test_groups_are_launched_together_only_where_their_rows_reach_them_together(manager):
    import torch

    model = manager.require_loaded().model
    layers = model.config.num_hidden_layers
    decoder = decoder_with_stand_ins()
    products = decoder._nf4
    with torch.no_grad(), decoder._layer_kernels(model):
        assert "groups of 4-bit layers (q/k/v, gate/up) in one launch each" in decoder.cuda_kernels_note
        for batch, together, launches in ((1, frozenset(), 2 * layers),  # a chat
                                          (2, frozenset(), 0),  # side by side, rows one by one: none
                                          (2, frozenset(id(m) for m in nf4_cuda.four_bit_layers(model)), 2 * layers)):
            products.grouped_calls = 0
            with decoder._grouped_layers(model, batch, together):
                model(torch.tensor([[5]] * batch))
            assert products.grouped_calls == launches, (batch, together)
        decoder.rows_alone, products.grouped_calls = False, 0  # every layer takes the rows batched
        with decoder._grouped_layers(model, 2, frozenset()):
            model(torch.tensor([[5], [6]]))
        assert products.grouped_calls == 2 * layers


def test_a_grouped_launch_that_differs_from_the_layers_own_is_not_used(manager):
    model = manager.require_loaded().model
    products = CpuProducts()
    products.group_skew = lambda y: y * 1.01
    ready, problem = nf4_cuda.groups_ready(model, products)
    assert ready == [] and "a grouped launch differs from the layers' own launches" in problem
    decoder = decoder_with_stand_ins()
    decoder._nf4 = products
    with decoder._layer_kernels(model):
        pass
    assert "each 4-bit layer in its own launch (on 64+32+32x64 layers a grouped launch differs" in decoder.cuda_kernels_note
