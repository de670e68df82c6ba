"""What the speed presets and switches rely on, checked on the CPU: packed and padded batches compute
the same logits and loss as one sequence at a time, every speed switch that runs on the CPU leaves the
losses the same and is undone after training, the studio's trainer adds no per-step synchronisation
or callback to the plain Trainer's, and the memory formula holds on GPU measurements it was not
fitted to."""

from __future__ import annotations

import contextlib
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from studio.train.collate import PackedCollator, PaddedCollator, make_collator
from studio.train.memory import forward_tokens
from studio.train.settings import PRESETS, LoraSettings, preset

ROOT = Path(__file__).resolve().parent.parent


def rows(vocab: int, lengths=(9, 15, 6, 12), seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in lengths:
        ids = torch.randint(10, vocab, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    return out


@pytest.fixture()
def plain_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture()
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_packed_rows_do_not_attend_to_each_other(plain_model):
    examples = rows(plain_model.config.vocab_size)
    with torch.no_grad():
        alone = [plain_model(input_ids=torch.tensor([e["input_ids"]])).logits[0] for e in examples]
        batch = PackedCollator()(examples)
        packed = plain_model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    assert torch.allclose(torch.cat(alone), packed, atol=1e-4)


def test_packed_padded_and_one_at_a_time_give_the_same_loss(plain_model, tokenizer):
    examples = rows(plain_model.config.vocab_size)
    tokenizer.padding_side = "left"  # the shared tokenizer's side for chat must not change training's padding
    with torch.no_grad():
        packed = plain_model(**PackedCollator()(examples), use_cache=False).loss
        padded_batch = PaddedCollator(tokenizer)(examples)
        padded = plain_model(**padded_batch).loss
        total = sum(plain_model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
                    * sum(l != -100 for l in e["labels"]) for e in examples)
        count = sum(sum(l != -100 for l in e["labels"]) for e in examples)
    assert padded_batch["input_ids"][2, -1].item() == tokenizer.pad_token_id  # padded on the right
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)
    assert packed.item() == pytest.approx((total / count).item(), abs=1e-5)


def test_collators_count_real_tokens_only_while_counting(tokenizer):
    examples = rows(1000)
    for collator in (make_collator(preset("fast"), tokenizer), make_collator(preset("gpu24"), tokenizer)):
        collator(examples)
        collator.counting = False
        collator(examples)
        assert collator.tokens_seen == 9 + 15 + 6 + 12


def test_presets_keep_eight_sequences_per_optimizer_step():
    for name in PRESETS:
        settings = preset(name)
        assert settings.batch_size * settings.grad_accum == 8, name
        assert settings.learning_rate == 1e-3 and settings.epochs == 4.0
    assert preset("fast").packing and not preset("fast").gradient_checkpointing
    assert preset("gpu24").gradient_checkpointing
    tutorial = preset("tutorial")
    assert not (tutorial.liger_kernels or tutorial.dequantize_base or tutorial.compile_layers)
    assert tutorial.checkpoint_fraction == 1.0


def test_forward_tokens():
    lengths = [120, 400, 300, 250, 200, 180, 150, 390, 380, 130]
    assert forward_tokens(preset("tutorial"), lengths) == 400
    assert forward_tokens(replace(preset("gpu24"), packing=False), lengths) == 8 * 400
    assert forward_tokens(replace(preset("fast"), packing=True), lengths) == 400 + 390 + 380 + 300 + 250 + 200 + 180 + 150
    assert forward_tokens(replace(preset("tutorial"), max_length=256), lengths) == 256


def test_checkpointed_layers_are_spread_evenly():
    from studio.train.speedups import checkpointed_layers

    assert checkpointed_layers(4, 1.0) == [True] * 4
    assert checkpointed_layers(4, 0.0) == [False] * 4
    assert checkpointed_layers(4, 0.5) == [False, True, False, True]
    assert sum(checkpointed_layers(28, 0.5)) == 14 and sum(checkpointed_layers(28, 0.25)) == 7


# ----- training through the studio's trainer on the tiny 4-bit model ---------------------------------
class _Job:
    cancelled = False

    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)

    def emit(self, *args, **kwargs):
        pass


def studio_losses(loaded, settings, examples, tmp_path, steps=4, callbacks=(), name="speed",
                  lora=LoraSettings(dropout=0.0), route=True):
    """Losses of `steps` optimizer steps through build_trainer, a fresh adapter (no dropout unless `lora`
    says) each time; `route=False` trains through peft's own LoRA forward."""
    from studio.train.job import add_trainable_adapter
    from studio.train.trainer import ProgressTracker, build_trainer

    settings = replace(settings, max_steps=steps, save_every=0, logging_steps=1, warmup_ratio=0.0)
    model = add_trainable_adapter(loaded.model, name, lora, settings.seed)
    loaded.model = model
    collator = make_collator(settings, loaded.tokenizer)
    job = _Job()
    run = SimpleNamespace(name=name, metrics_path=tmp_path / f"metrics-{len(list(tmp_path.iterdir()))}.jsonl")
    tracker = ProgressTracker(run, job, collator)
    trainer = build_trainer(model, settings, loaded.device, tmp_path / "out", name, examples, [], collator,
                            (tracker, *callbacks))
    trainer.route_trained_adapter = route
    tracker.trainer = trainer
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if getattr(model.get_base_model(), "is_gradient_checkpointing", False):  # as the job leaves the model
        model.get_base_model().gradient_checkpointing_disable()
    model.train(False)
    return losses, trainer, job


@pytest.mark.parametrize("switch", [dict(dequantize_base=True), dict(compile_layers=True),
                                    dict(checkpoint_fraction=0.5), dict(liger_kernels=True)])
def test_speed_switches_keep_the_losses_and_are_undone(manager, tmp_path, monkeypatch, switch):
    from studio.train import speedups

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", "aot_eager")
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 4, seed=1)
        reference, _, _ = studio_losses(loaded, preset("gpu24"), examples, tmp_path)
        losses, trainer, job = studio_losses(loaded, replace(preset("gpu24"), **switch), examples, tmp_path)
        model = loaded.model
        assert losses == pytest.approx(reference, rel=1e-3), switch
        assert reference[0] != pytest.approx(reference[-1], rel=1e-3)  # it trained
        notes = " ".join(job.lines)
        expected = {"liger_kernels": "Liger kernels skipped",  # no CUDA here: said, not failed
                    "dequantize_base": "Dequantized base on: 14 4-bit layers",
                    "compile_layers": "torch.compile on 2 decoder layers"}.get(next(iter(switch)), "")
        assert expected in notes, notes
        # undone: no patched forward or compiled layer is left on the model the studio chats with
        for module in model.modules():
            assert "forward" not in module.__dict__ and "studio_dense_weight" not in module.__dict__
            assert getattr(module, "_compiled_call_impl", None) is None


def test_a_compiler_that_fails_here_leaves_the_run_eager_and_says_so(manager, tmp_path, monkeypatch):
    """No working compiler on the user's machine must not fail the job: the layers go back to eager,
    the losses are the eager ones, and the job's log names the failure."""
    from studio.train import speedups

    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C compiler found")

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", broken_backend)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 2, seed=3)
        reference, _, _ = studio_losses(loaded, preset("gpu24"), examples, tmp_path, steps=2)
        losses, _, job = studio_losses(loaded, replace(preset("gpu24"), compile_layers=True), examples, tmp_path,
                                       steps=2)
        model = loaded.model
    assert losses == pytest.approx(reference, rel=1e-5)
    failures = [line for line in job.lines if line.startswith("torch.compile failed here")]
    assert len(failures) == 1 and "no C compiler found" in failures[0], job.lines
    assert all(getattr(module, "_compiled_call_impl", None) is None for module in model.modules())


def test_the_trained_adapter_alone_gives_peft_s_losses(manager, tmp_path):
    """The studio's LoRA forward while training (the trained adapter only, whatever else is attached) is
    peft's arithmetic: the same losses, bit for bit, with dropout on (the same random draws) and with
    another adapter attached beside it; and peft's forward is back on the layers afterwards."""
    from studio.model.routing import lora_layers

    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12) * 4, seed=4)
        lora = LoraSettings(dropout=0.1)
        studio_losses(loaded, preset("tutorial"), examples, tmp_path, steps=1, name="other")  # attached beside
        peft_losses, _, _ = studio_losses(loaded, preset("tutorial"), examples, tmp_path, steps=3, lora=lora,
                                          route=False)
        routed, _, _ = studio_losses(loaded, preset("tutorial"), examples, tmp_path, steps=3, lora=lora)
        layers = lora_layers(loaded.model)
    assert routed == peft_losses
    assert routed[0] != routed[-1]  # it trained
    assert layers and all("forward" not in layer.__dict__ for layer in layers)


def test_compiled_layers_are_reused_by_the_next_run_with_the_same_settings(manager, tmp_path, monkeypatch):
    """A new run (a new adapter name, another adapter attached) with the same LoRA shape and switches
    compiles nothing: the code of the run before is reused, and the log says so. Another rank compiles
    again (and drops the old code first)."""
    from studio.train import speedups

    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    monkeypatch.setattr(speedups, "COMPILE_BACKEND", counting_backend)
    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda real=torch._dynamo.reset: (resets.append(1), real())[1])
    settings = replace(preset("gpu24"), compile_layers=True)
    compiled = []
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 2, seed=3)
        for name, lora in (("first", LoraSettings(dropout=0.0)), ("second", LoraSettings(dropout=0.0)),
                           ("third", LoraSettings(dropout=0.0, r=4))):
            before = len(graphs)
            losses, _, job = studio_losses(loaded, settings, examples, tmp_path, steps=2, name=name, lora=lora)
            compiled.append((len(graphs) - before, len(resets), " ".join(job.lines)))
    (first, first_resets, _), (second, second_resets, second_log), (third, third_resets, _) = compiled
    assert first > 0 and second == 0 and third > 0, compiled
    assert "is reused" in second_log
    assert second_resets == first_resets and third_resets == first_resets + 1


def test_partial_checkpointing_sets_the_layer_flags(manager, tmp_path):
    from studio.train.speedups import decoder_layers

    seen = []

    class Look(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append([layer.gradient_checkpointing for layer in decoder_layers(model)])

    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12) * 4)
        studio_losses(loaded, replace(preset("gpu24"), checkpoint_fraction=0.5), examples, tmp_path, steps=1,
                      callbacks=(Look(),))
    assert seen == [[False, True]]


SYNCS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__")


def count_syncs(monkeypatch) -> dict:
    """Count the tensor-to-host calls (each one waits for the GPU) made while training."""
    counts = {name: 0 for name in SYNCS}
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def test_studio_trainer_adds_no_syncs_or_callbacks_to_the_plain_trainer(manager, tmp_path, monkeypatch):
    """The tutorial preset through the studio's trainer against a plain transformers Trainer with the
    tutorial's arguments: no more host synchronisations per step, no extra callbacks but the progress one."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from studio.train.job import add_trainable_adapter
    from studio.train.trainer import ProgressTracker

    steps = 3
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 3)
        model = add_trainable_adapter(loaded.model, "plain", LoraSettings(), 42)
        loaded.model = model
        args = TrainingArguments(output_dir=str(tmp_path / "plain"), per_device_train_batch_size=1,
                                 gradient_accumulation_steps=8, learning_rate=1e-3, num_train_epochs=4, max_steps=steps,
                                 lr_scheduler_type="linear", warmup_steps=0.03, logging_steps=1, optim="adamw_torch",
                                 use_cpu=True, report_to=[], save_strategy="no", gradient_checkpointing=True,
                                 remove_unused_columns=False)
        plain = Trainer(model=model, args=args, train_dataset=examples,
                        data_collator=DataCollatorForSeq2Seq(loaded.tokenizer, padding=True))
        counts = count_syncs(monkeypatch)
        plain.train()
        plain_syncs = dict(counts)
        for name in counts:
            counts[name] = 0
        _, studio, _ = studio_losses(loaded, preset("tutorial"), examples, tmp_path, steps=steps)
        studio_syncs = dict(counts)
        monkeypatch.undo()
    assert sum(studio_syncs.values()) <= sum(plain_syncs.values()), (studio_syncs, plain_syncs)
    plain_types = {type(c) for c in plain.callback_handler.callbacks}
    extra = {type(c) for c in studio.callback_handler.callbacks} - plain_types
    assert extra == {ProgressTracker}, extra


# ----- the memory estimate against GPU measurements --------------------------------------------------
def newest_measurements():
    """The GPU result files of the newest day (the 7B presets, the tutorial recipe, the sizes table) and their rows."""
    from studio.train.memory import measurements_of, newest_result_files

    paths = newest_result_files(ROOT / "bench" / "results")
    return paths, measurements_of(paths)


def test_memory_fit_predicts_rows_it_was_not_fitted_to_within_10_percent():
    from studio.train.memory import fit, held_out, predict

    paths, measured = newest_measurements()
    coefficients = fit([row for i, row in enumerate(measured) if not held_out(i)])
    checked = [(setup, predict(features, coefficients).total_gib, peak)
               for i, (setup, features, peak) in enumerate(measured) if held_out(i)]
    assert len(checked) >= 6, paths  # a third of one run's 7B presets and sizes table, at least
    for setup, estimate, peak in checked:
        assert abs(estimate - peak) / peak < 0.10, (setup, estimate, peak)


def test_shipped_memory_estimate_is_within_10_percent_on_every_row_of_the_newest_results():
    import json

    from studio.train.memory import FIT_FILE, fitted, predict

    paths, measured = newest_measurements()
    source = json.loads(FIT_FILE.read_text(encoding="utf-8"))["source"]
    names = [path.name for path in paths]
    assert source == names, f"{FIT_FILE.name} was fitted to {source}, not {names}: run bench/fit_memory.py"
    assert len(measured) >= 20  # one run's 7B presets and sizes table, at least
    for setup, features, peak in measured:
        estimate = predict(features, fitted()).total_gib
        assert abs(estimate - peak) / peak < 0.10, (setup, estimate, peak)


def test_a_refit_keeps_the_earlier_value_of_what_no_row_measures():
    """The newest runs all used Liger: the layers that keep their activations without it are measured by
    no row, so a refit keeps the earlier fit's coefficients for them instead of zero bytes."""
    from studio.train.memory import fit, measurements_of, newest_result_files, unmeasured

    rows = measurements_of(newest_result_files(ROOT / "bench" / "results"))
    earlier = {"full_hidden": 37.0, "full_intermediate": 7.0}
    assert set(unmeasured(rows)) == set(earlier)
    assert fit(rows)["full_hidden"] == 0.0  # without an earlier fit: nothing measured, nothing assumed
    refit = fit(rows, earlier)
    assert refit["full_hidden"] == 37.0 and refit["full_intermediate"] == 7.0 and refit["liger_hidden"] > 0


def test_memory_estimate_follows_the_switches(manager):
    from studio.train.memory import estimate_peak

    lengths = [120, 400, 300, 250, 200, 180, 150, 390]
    with manager.using("test") as loaded:
        padded = replace(preset("gpu24"), packing=False, liger_kernels=False, checkpoint_fraction=1.0)
        plain = estimate_peak(loaded.model, padded, lengths)
        dense = estimate_peak(loaded.model, replace(padded, dequantize_base=True), lengths)
        half = estimate_peak(loaded.model, replace(padded, checkpoint_fraction=0.5), lengths)
        fast = estimate_peak(loaded.model, preset("fast"), lengths)
    assert dense.model_gib > plain.model_gib  # the bf16 copies of the 4-bit layers
    assert plain.activations_gib < half.activations_gib
    assert fast.forward_tokens == sum(lengths) and plain.forward_tokens == 8 * 400


def test_memory_estimate_counts_the_kept_dropout_mask_of_graphed_runs_that_do_not_checkpoint(manager, monkeypatch):
    """Where CUDA graphs run (forced here: the CPU has none), Fast keeps PyTorch's dropout mask and the
    estimate counts it; the 24 GB preset, checkpointing inside its graphs, redraws it and keeps nothing;
    without dropout nothing is kept either."""
    from studio.train import memory
    from studio.train.settings import LoraSettings

    monkeypatch.setattr(memory, "graphs_expected", lambda settings, model=None: True)
    with manager.using("test") as loaded:
        def features(name, dropout=0.1):
            return memory.model_features(loaded.model, preset(name), 2048, LoraSettings(dropout=dropout))

        fast, gpu24, no_dropout = features("fast"), features("gpu24"), features("fast", dropout=0.0)
    assert not fast.dropout_redrawn and gpu24.dropout_redrawn and no_dropout.dropout_redrawn
    coefficients, with_liger = memory.fitted(), replace(fast, liger=True)  # Fast's kernels on a GPU
    assert (memory.predict(with_liger, coefficients).activations_gib
            > memory.predict(replace(with_liger, dropout_redrawn=True), coefficients).activations_gib)


def test_decode_kernels_leave_a_cpu_model_as_it_is(manager):
    from studio.model.kernels import decode_kernels

    model = manager.require_loaded().model
    before = {id(m): m.__dict__.get("forward") for m in model.modules()}
    with decode_kernels(model) as note:
        assert note == "Liger kernels skipped: Liger kernels need a CUDA GPU." or "not installed" in note
        assert {id(m): m.__dict__.get("forward") for m in model.modules()} == before
    assert {id(m): m.__dict__.get("forward") for m in model.modules()} == before



# ----- packed rows through a variable-length kernel ---------------------------------------------
def reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                     enable_gqa=False, calls=None):
    """varlen_attn's contract on the CPU: (tokens, heads, dim) rows between the boundaries, each alone."""
    # the longest row's length or more: flash attention sizes its grid with it, blocks past a row's end do nothing
    assert torch.equal(cu_seq_q, cu_seq_k) and max_q == max_k >= int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    assert cu_seq_q.dtype == torch.int32
    if calls is not None:
        calls.append(query.shape)
    out = []
    for start, end in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        out.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=tuple(window_size) == (-1, 0), scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(out)


def reference_varlen_without_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                                 is_causal=False, calls=None):
    """An older varlen_attn's signature: a causal flag, no grouped key/value heads."""
    assert key.shape[1] == query.shape[1]  # the caller repeated the key/value heads
    return reference_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                            window_size=(-1, 0) if is_causal else (-1, -1), calls=calls)


def test_packed_batches_carry_the_rows_boundaries():
    batch = PackedCollator()(rows(500))  # lengths 9, 15, 6, 12
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 9, 24, 30, 42]
    assert batch["max_length_q"] == batch["max_length_k"] == 15
    assert batch["position_ids"][0, 9].item() == 0 and batch["input_ids"].shape == (1, 42)


@pytest.mark.parametrize("reference", [reference_varlen, reference_varlen_without_gqa])
def test_packed_rows_through_the_variable_length_kernel_give_sdpa_s_logits(plain_model, tokenizer, reference):
    from functools import partial

    from studio.model.attention import packed_row_attention

    assert plain_model.config.num_attention_heads != plain_model.config.num_key_value_heads  # grouped heads
    examples = rows(plain_model.config.vocab_size)
    batch = PackedCollator()(examples)
    calls, notes = [], []
    kernel = partial(reference, calls=calls)
    with torch.no_grad():
        masked = plain_model(**batch, use_cache=False)
        with packed_row_attention(plain_model, True, notes, kernel=kernel):
            assert plain_model.config._attn_implementation == "studio-varlen"
            rows_alone = plain_model(**batch, use_cache=False)
            assert len(calls) == plain_model.config.num_hidden_layers
            padded = PaddedCollator(tokenizer)(examples)  # no boundaries: SDPA as before
            plain_model(**padded)
            assert len(calls) == plain_model.config.num_hidden_layers
    assert plain_model.config._attn_implementation == "sdpa"
    assert torch.allclose(masked.logits, rows_alone.logits, atol=1e-5)
    assert rows_alone.loss.item() == pytest.approx(masked.loss.item(), rel=1e-6)
    assert "variable-length kernel" in notes[0]


def test_the_trainer_attends_to_packed_rows_alone_where_a_kernel_is_there(manager, tmp_path, monkeypatch):
    from functools import partial

    from studio.model import attention

    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 2, seed=3)
        reference_losses, _, job = studio_losses(loaded, preset("gpu24"), examples, tmp_path)
        assert "variable-length" not in " ".join(job.lines)  # the CPU has no kernel: SDPA's block mask
        calls = []
        monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen, calls=calls))
        losses, _, job = studio_losses(loaded, preset("gpu24"), examples, tmp_path)
        padded_losses, _, _ = studio_losses(loaded, replace(preset("gpu24"), packing=False), examples, tmp_path)
        model = loaded.model
    layers = model.get_base_model().config.num_hidden_layers if hasattr(model, "get_base_model") else 2
    assert len(calls) >= 4 * layers  # each layer of each of the 4 packed passes
    assert losses == pytest.approx(reference_losses, rel=1e-3)  # the same sums, in another order
    assert "variable-length kernel" in " ".join(job.lines)
    assert padded_losses == pytest.approx(reference_losses, rel=1e-3)
    assert all(getattr(c, "_attn_implementation", "sdpa") == "sdpa" for c in attention.attention_configs(model))


@pytest.mark.parametrize("available", [True, False])
def test_the_packed_attention_notes_read_in_chinese(plain_model, monkeypatch, available):
    from studio.model import attention
    from studio.ui.i18n import translate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the notes are written on a GPU
    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen if available else None)
    notes = []
    with attention.packed_row_attention(plain_model, True, notes):
        assert (plain_model.config._attn_implementation == "studio-varlen") == available
    assert plain_model.config._attn_implementation == "sdpa"
    assert len(notes) == 1 and ("variable-length" in notes[0]) == available
    assert "拼接的样本" in translate(notes[0], "zh")


# ----- CUDA graphs of training passes (studio.train.graphs) -----------------------------------------
def rerunning_recorder(recorded: list):
    """`CudaRecorder`'s contract without a GPU: the recorded work runs once at capture, and each replay
    runs it again; the work reads only the graph's static inputs, as a replayed graph does, so a pass whose
    tensors were not copied into them would train on the captured batch again."""
    def record(work):
        recorded.append(work)
        work()
        return work

    return SimpleNamespace(record=record)


def test_a_padded_packed_pass_gives_the_unpadded_loss(plain_model):
    from functools import partial

    from studio.model.attention import packed_row_attention
    from studio.train.graphs import pad_packed

    batch = PackedCollator()(rows(plain_model.config.vocab_size))  # 4 rows, 42 positions
    padded = pad_packed(batch, 16, 7)
    assert padded["input_ids"].shape == padded["labels"].shape == padded["position_ids"].shape == (1, 48)
    assert padded["cu_seq_lens_q"].tolist() == [0, 9, 24, 30, 42, 43, 44, 48]  # 3 padding segments
    assert padded["position_ids"][0, 42:].tolist() == [0, 0, 0, 1, 2, 3]
    assert padded["labels"][0, 42:].tolist() == [-100] * 6 and padded["max_length_q"] == 48
    assert padded["cu_seq_lens_q"].dtype == batch["cu_seq_lens_q"].dtype == torch.int32  # what flash attention takes
    assert pad_packed(batch, 16, 4) is batch  # no room for a padding segment: as it was
    calls = []
    with torch.no_grad(), packed_row_attention(plain_model, True, [], kernel=partial(reference_varlen, calls=calls)):
        plain = plain_model(**batch, use_cache=False)
        both = plain_model(**padded, use_cache=False)
    assert both.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert torch.allclose(both.logits[:, :42], plain.logits, atol=1e-5)


def test_a_pass_padded_up_to_a_larger_graph_gives_the_unpadded_loss(plain_model):
    """`extend_padding` lengthens the last padding segment to a larger captured size: same loss, same
    logits on the real positions, the segment's positions continuing, its labels ignored."""
    from functools import partial

    from studio.model.attention import packed_row_attention
    from studio.train.graphs import extend_padding, pad_packed, padded_size

    batch = PackedCollator()(rows(plain_model.config.vocab_size))  # 4 rows, 42 positions
    padded = pad_packed(batch, 16, 5)
    assert padded["input_ids"].shape[1] == padded_size(42, 16) == 48
    longer = extend_padding(padded, 80)
    assert longer["input_ids"].shape == longer["labels"].shape == longer["position_ids"].shape == (1, 80)
    assert longer["cu_seq_lens_q"].tolist() == [0, 9, 24, 30, 42, 80] and longer["cu_seq_lens_k"] is longer["cu_seq_lens_q"]
    assert longer["position_ids"][0, 42:].tolist() == list(range(38)) and longer["max_length_q"] == 80
    assert longer["labels"][0, 42:].tolist() == [-100] * 38 and padded["input_ids"].shape[1] == 48  # a copy
    assert extend_padding(padded, 48) is padded
    with torch.no_grad(), packed_row_attention(plain_model, True, [], kernel=partial(reference_varlen, calls=[])):
        plain = plain_model(**batch, use_cache=False)
        both = plain_model(**longer, use_cache=False)
    assert both.loss.item() == pytest.approx(plain.loss.item(), rel=1e-6)
    assert torch.allclose(both.logits[:, :42], plain.logits, atol=1e-5)


def test_a_run_captures_only_the_pass_sizes_that_pay():
    """`PassSizes`: the first graph at a size holding nearly every pass; a smaller size gets its own graph only
    where the replay time it saves over the rest of the run outweighs a capture. A model whose pass
    takes as long at every size keeps one graph; one whose time grows with positions captures its
    frequent sizes and pads its rare ones."""
    from studio.train.graphs import PassSizes

    def run(pass_sizes, replay_seconds, capture_seconds=0.2, first=3328):
        sizes, captured, replayed = PassSizes(first), [], []
        for n, positions in enumerate(pass_sizes):
            sizes.observe(positions)
            size = sizes.choose(positions, captured, remaining=len(pass_sizes) - n - 1)
            if size not in captured:
                captured.append(size)
                sizes.captured(capture_seconds)
            sizes.replayed(size, replay_seconds(size))
            replayed.append(size)
        return captured, replayed

    passes = [2304, 2048, 2304, 2560, 2048, 2304, 1792, 2304, 2048, 2304] * 10
    flat = run(passes, lambda size: 0.030)  # a small model: kernel launches, whatever the size
    assert flat[0] == [3328, 2048]  # the second graph teaches it that a smaller size saves nothing: no third
    proportional = run(passes, lambda size: 0.150 * size / 2048)  # a 7B: arithmetic, proportional to positions
    assert proportional[0][0] == 3328 and {2048, 2304} <= set(proportional[0])
    assert proportional[1][1:] == [min(s for s in proportional[0] if s >= p) for p in passes[1:]]
    short = run(passes[:20], lambda size: 0.030)  # 19 passes left: nothing but the first graph pays
    assert short[0] == [3328] and set(short[1]) == {3328}
    # a 20-pass run of a 7B (as measured on an H100: 188 ms at 2816 positions, captures of 0.25 s): a graph
    # of 2304 positions serves most passes (every smaller one too), so it pays even in so short a run
    short_7b = run(passes[:20], lambda size: 0.188 * size / 2816, capture_seconds=0.25, first=2816)
    assert len(short_7b[0]) >= 2 and short_7b[1].count(2816) <= 4, short_7b
    rare = run([2048] * 60 + [1536], lambda size: 0.150 * size / 2048)  # one pass of a size: padded
    assert 1536 not in rare[0] and rare[1][-1] == 2048
    unknown = run([2048, 2304], lambda size: 0.03, first=None)  # rows not known: each size as it comes
    assert unknown[0] == [2048, 2304]


def test_the_trainer_reads_row_lengths_from_a_dataset_or_a_list():
    """The job trains on a `datasets.Dataset` (tokenised with `map`), the benches on lists of rows: the
    first graph's size is drawn from the same lengths either way."""
    import datasets

    from studio.train.trainer import StudioTrainer

    ids = [[1] * 7, [2] * 3, [3] * 12]
    table = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})
    assert StudioTrainer._row_lengths(SimpleNamespace(train_dataset=table)) == [7, 3, 12]
    listed = [{"input_ids": row, "labels": row} for row in ids]
    assert StudioTrainer._row_lengths(SimpleNamespace(train_dataset=listed)) == [7, 3, 12]
    assert StudioTrainer._row_lengths(SimpleNamespace(train_dataset=None)) == []


def test_the_first_graph_holds_nearly_every_pass_the_rows_can_make():
    import random

    from studio.train.graphs import usual_largest_pass

    draw = random.Random(5)
    lengths = [draw.randint(120, 400) for _ in range(183)]  # the tutorial's dataset size, the bench's row lengths
    first = usual_largest_pass(lengths, 8)
    passes = [sum(draw.sample(lengths, 8)) for _ in range(5000)]
    assert 0.97 < sum(p <= first for p in passes) / len(passes) < 1.0  # about 99% of the passes fit
    assert first < sum(sorted(lengths)[-8:]) - 200  # well under the 8 longest rows together
    assert usual_largest_pass([300, 200, 100], 8) == 600  # fewer rows than a pass: all of them
    assert usual_largest_pass([50] * 20, 8) == 400


def test_graphed_steps_train_as_the_eager_ones_and_are_undone(manager, tmp_path, monkeypatch):
    """The trainer's CUDA-graph plumbing on the CPU, with a recorder that replays by running the recorded
    pass again over its static inputs: passes padded to the bucket, one capture per size, every pass but
    the first replayed, the gradients handed to the optimizer, the losses of the eager run, and the
    collator's padding gone afterwards."""
    from functools import partial

    from studio.model import attention
    from studio.train import graphs
    from studio.train.trainer import StudioTrainer
    from studio.ui.i18n import translate

    monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen))
    monkeypatch.setattr(graphs, "BUCKET_TOKENS", 32)
    recorded: list = []
    monkeypatch.setattr(StudioTrainer, "graph_recorder", rerunning_recorder(recorded))
    fast = replace(preset("fast"), liger_kernels=False, dequantize_base=False, cuda_graphs=False)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 3, seed=3)
        reference, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=6)
        losses, trainer, job = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=6)
        model = loaded.model
    from studio.train.graphs import padded_size, usual_largest_pass

    captured = trainer.graphed.captured
    sizes = [c["positions"] for c in captured]
    assert sizes and all(size % 32 == 0 for size in sizes) and len(set(sizes)) == len(sizes) == len(recorded)
    lengths = [len(row["input_ids"]) for row in examples]
    assert sizes[0] == trainer.graphed.sizes.first == padded_size(usual_largest_pass(lengths, 8), 32)
    assert all(c["segments"] == 9 for c in captured)  # 8 rows and 1 padding segment
    assert trainer.graphed.replayed_passes == 5  # the first pass runs eagerly (warm-up)
    assert trainer.graphed.casts is not None  # the adapter's weights were cast, and their gradients gathered, in one go
    # the padded bucket sums in fp32 in another order: after 6 optimizer steps the losses drift about 1e-4 apart
    # (1.04e-4 on one CPU, under 1e-4 on another); a replay that lost its gradients is off by percents
    assert losses == pytest.approx(reference, rel=3e-4)
    assert losses[-1] != losses[1]  # the adapter learned: the optimizer got each replay's gradients
    assert "Chunked loss on: the logits are computed a chunk at a time and never kept whole." in job.lines
    note = next(line for line in job.lines if line.startswith("CUDA graphs on: forward, loss and backward of the 2-layer"))
    assert translate(note, "zh").startswith("已启用 CUDA graph：2 层模型每次拼接的前向、损失与反向")
    assert trainer.data_collator.graph_padding is None and not trainer.graphed.graphs
    assert all("forward" not in module.__dict__ for module in model.modules())


def test_the_chunked_loss_gives_the_model_s_loss_and_gradients(plain_model):
    """`studio.train.fused_loss`: the loss of a packed pass (some labels -100, chunks of 8 positions) and
    the gradients it sends back equal the model's own loss, with and without the Trainer's count of
    labels; a forward without labels or gradients is the model's own."""
    from studio.train.fused_loss import fused_training_loss, linear_cross_entropy
    from studio.ui.i18n import translate

    plain_model.lm_head.weight.requires_grad_(False)
    batch = PackedCollator()(rows(plain_model.config.vocab_size))
    labels = batch["labels"]

    def loss_and_grads(chunked: bool, num_items):
        plain_model.zero_grad(set_to_none=True)
        notes: list = []
        context = fused_training_loss(plain_model, notes) if chunked else contextlib.nullcontext()
        with context:
            loss = plain_model(**batch, use_cache=False, num_items_in_batch=num_items).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in plain_model.named_parameters() if p.grad is not None}, notes

    for num_items in (None, torch.tensor(11)):
        own, own_grads, _ = loss_and_grads(False, num_items)
        chunked, grads, notes = loss_and_grads(True, num_items)
        assert notes == ["Chunked loss on: the logits are computed a chunk at a time and never kept whole."]
        assert chunked.item() == pytest.approx(own.item(), rel=1e-5)
        assert grads.keys() == own_grads.keys() and len(grads) > 5
        for name, grad in grads.items():
            assert torch.allclose(grad, own_grads[name], atol=1e-6, rtol=1e-4), name
    assert translate(notes[0], "zh") == "已启用分块损失：logits 逐块计算，从不整体保留。"
    hidden = torch.randn(1, labels.shape[1], plain_model.config.hidden_size, requires_grad=True)
    whole = linear_cross_entropy(hidden, plain_model.lm_head.weight, labels)
    whole.backward()
    whole_grad, hidden.grad = hidden.grad.clone(), None
    chunks = linear_cross_entropy(hidden, plain_model.lm_head.weight, labels, chunk_rows=8)  # 6 chunks
    chunks.backward()
    assert chunks.item() == pytest.approx(whole.item(), rel=1e-6)
    assert torch.allclose(hidden.grad, whole_grad, atol=1e-7) and hidden.grad[0, :-1].abs().sum() > 0
    with fused_training_loss(plain_model, []), torch.no_grad():
        evaluated = plain_model(**batch, use_cache=False)
    assert evaluated.logits is not None and "forward" not in plain_model.__dict__


def test_the_chunked_loss_keeps_away_from_a_trained_output_head(plain_model):
    from studio.train.fused_loss import fused_training_loss
    from studio.ui.i18n import translate

    notes: list = []
    with fused_training_loss(plain_model, notes) as applied:  # the head of the plain model is trained
        assert not applied and "forward" not in plain_model.__dict__
    assert notes == ["Chunked loss skipped: the output head has a bias or is trained."]
    assert translate(notes[0], "zh") == "未使用分块损失：输出层带偏置或参与训练。"
    plain_model.lm_head.weight.requires_grad_(False)
    patched = plain_model.forward  # a forward another patch put on the instance comes back afterwards
    plain_model.forward = patched
    with fused_training_loss(plain_model, notes) as applied:
        assert applied and plain_model.__dict__["forward"] is not patched
    assert plain_model.__dict__["forward"] is patched
    del plain_model.forward
    plain_model.config.model_type = "granite"  # scales its logits after the head: a forward it does not know
    with fused_training_loss(plain_model, notes) as applied:
        assert not applied
    assert notes[-1] == "Chunked loss skipped: the studio computes it for Qwen2, Qwen3, Llama and Mistral models only."
    assert "Qwen2" in translate(notes[-1], "zh") and "未使用分块损失" in translate(notes[-1], "zh")


def test_layers_computing_in_another_dtype_than_the_casts_keep_their_own_gradients(manager, tmp_path,
                                                                                     monkeypatch):
    """A run whose layers compute in another dtype than the precision's (fp16 asked of a bf16 model;
    here bf16 asked of the fp32 test model) takes its LoRA weights' gradients from autograd, not from
    the one-go buffer the layers never wrote: the graphed run still learns as the eager one."""
    from functools import partial

    from studio.model import attention
    from studio.train import graphs
    from studio.train.trainer import StudioTrainer

    monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen))
    monkeypatch.setattr(graphs, "BUCKET_TOKENS", 32)
    monkeypatch.setattr(StudioTrainer, "graph_recorder", rerunning_recorder([]))
    monkeypatch.setattr(StudioTrainer, "_compute_dtype", lambda self: torch.bfloat16)
    fast = replace(preset("fast"), liger_kernels=False, dequantize_base=False, cuda_graphs=False)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 3, seed=3)
        reference, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=5)
        losses, trainer, _ = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=5)
    assert trainer.graphed.casts is not None and trainer.graphed.replayed_passes == 4
    # bf16 arithmetic, and the chunked loss rounds its gradient before the 1/count scaling, not after:
    # within 1e-3 (a run that stopped learning is off by the 0.3 its loss drops in two steps)
    assert losses == pytest.approx(reference, rel=1e-3) and losses[2] < losses[0] - 0.1


def test_a_failed_capture_leaves_the_run_eager_and_says_why(manager, tmp_path, monkeypatch):
    from functools import partial

    from studio.model import attention
    from studio.train import graphs
    from studio.train.trainer import StudioTrainer

    def broken(work):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen))
    monkeypatch.setattr(graphs, "BUCKET_TOKENS", 32)
    monkeypatch.setattr(StudioTrainer, "graph_recorder", SimpleNamespace(record=broken))
    fast = replace(preset("fast"), liger_kernels=False, dequantize_base=False, cuda_graphs=False)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 2, seed=3)
        reference, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=2)
        losses, _, job = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=2)
    assert losses == pytest.approx(reference, rel=1e-4)
    failures = [line for line in job.lines if line.startswith("CUDA graphs failed here")]
    assert len(failures) == 1 and "stream is capturing" in failures[0], job.lines


@pytest.mark.parametrize("change, device, varlen, reason", [
    ({}, "cpu", True, "they need a CUDA GPU"),
    (dict(packing=False), "cuda:0", True, "they need packed passes (packing on)"),
    (dict(gradient_checkpointing=True), "cuda:0", True, None),  # the recomputation is captured too
    (dict(compile_layers=True), "cuda:0", True, "not with compiled layers"),
    (dict(grad_accum=2), "cuda:0", True, "gradient accumulation 1"),
    ({}, "cuda:0", False, "varlen_attn"),
    ({}, "cuda:0", True, None),
])
def test_cuda_graphs_say_why_they_cannot_apply(change, device, varlen, reason):
    from studio.train.graphs import graph_problem
    from studio.ui.i18n import translate

    problem = graph_problem(replace(preset("fast"), cuda_graphs=True, **change), device, varlen)
    assert (problem is None) if reason is None else (reason in problem)
    if problem:
        chinese = translate(f"CUDA graphs skipped: {problem}.", "zh")
        assert "CUDA" in chinese and re.search(r"[\u4e00-\u9fff]", chinese) and not re.search(r"\b(they|with|need)\b",
                                                                                              chinese), chinese
    assert graph_problem(replace(preset("fast"), cuda_graphs=False), "cpu", False) is None


def test_redrawn_dropout_gives_a_recomputed_layer_the_forward_s_mask():
    """`studio.model.lora_dropout` in the LoRA node: the same mask for the same pass seed and layer (another
    for another layer or pass), kept with probability 1 - rate and scaled; values and gradients those of
    the update with that mask; no mask kept for the backward; and under a checkpoint that replays no
    generator state, the gradients of the plain run, where PyTorch's dropout gives others."""
    from torch.utils.checkpoint import checkpoint

    from studio.model.lora_dropout import DropoutSeeds
    from studio.model.lora_update import lora_update

    seeds = DropoutSeeds("cpu")
    dropout = seeds.layer(3)
    x = torch.randn(64, 1024)
    once = dropout(x, 0.3)
    assert torch.equal(once, dropout(x, 0.3)) and not torch.equal(once, seeds.layer(4)(x, 0.3))
    same, other = dropout.pair(x, 2 * x, 0.3)
    assert torch.equal(same, once) and torch.equal(other, 2 * once)  # one mask for both
    assert abs((once == 0).float().mean().item() - 0.3) < 0.01
    assert torch.allclose(once[once != 0], (x / 0.7)[once != 0])
    seeds.refresh()
    assert not torch.equal(once, dropout(x, 0.3)) and torch.equal(dropout(x, 0.0), x)
    # two layers' masks are unrelated, not one mask at shifted or swapped positions
    ones = torch.ones(64 * 1024)
    masks = [seeds.layer(n)(ones, 0.3) != 0 for n in (2, 3)]
    positions = torch.arange(ones.numel())
    assert not any(torch.equal(masks[1], masks[0][positions ^ k]) for k in range(1, 8))
    assert abs((masks[0] & masks[1]).float().mean().item() - 0.7 * 0.7) < 0.01

    torch.manual_seed(0)
    inputs = [torch.randn(2, 5, 16), torch.randn(2, 5, 8), torch.randn(4, 16), torch.randn(8, 4)]
    mask = (dropout(torch.ones(10, 16), 0.3) != 0).float().view(2, 5, 16) / 0.7
    upstream = torch.randn(2, 5, 8)

    def run(update, checkpointed=False, redrawn=dropout):
        leaves = [t.clone().requires_grad_() for t in inputs]
        saved: list = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            def call(x, result):
                return update(x, result, leaves[2], leaves[3], redrawn)
            out = (checkpoint(call, *leaves[:2], use_reentrant=False, preserve_rng_state=False) if checkpointed
                   else call(*leaves[:2]))
        out.backward(upstream)
        return out.detach(), [t.grad for t in leaves], saved

    def reference(x, result, a, b, redrawn):
        return result + 2.0 * ((x * mask) @ a.t()) @ b.t()

    def node(x, result, a, b, redrawn):
        return lora_update(x, result, a, b, 2.0, 0.3, None, redrawn)

    expected, expected_grads, _ = run(reference)
    for checkpointed in (False, True):
        out, grads, saved = run(node, checkpointed)
        assert torch.allclose(out, expected, atol=1e-5)
        assert all(torch.allclose(g, e, atol=1e-4) for g, e in zip(grads, expected_grads))
        assert not any(t.dtype == torch.bool for t in saved)  # no mask kept
    _, plain_grads, saved = run(node, redrawn=None)
    assert any(t.dtype == torch.bool for t in saved)  # PyTorch's dropout keeps its mask
    _, recomputed_grads, _ = run(node, checkpointed=True, redrawn=None)
    assert not torch.allclose(recomputed_grads[2], plain_grads[2], atol=1e-3)  # the recomputation drew another mask


def test_graphed_runs_recompute_checkpointed_layers_with_the_same_dropout(manager, tmp_path, monkeypatch):
    """Gradient checkpointing inside the graphs (the CPU recorder re-runs the recorded pass): each LoRA layer
    draws its dropout once forward, once more when its checkpointed forward is recomputed and once in the
    backward, all from the pass's seed; the losses are those of the graphed run without checkpointing
    drawing the same way; PyTorch's checkpoint replays no generator state; a graphed run without
    checkpointing keeps PyTorch's mask (no draws); a run whose dropout stays in peft's own forward keeps
    checkpointing out of the graphs and says why."""
    from functools import partial

    from transformers import modeling_utils

    from studio.model import attention, lora_dropout
    from studio.train import graphs, speedups
    from studio.train.trainer import StudioTrainer
    from studio.ui.i18n import translate

    monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen))
    monkeypatch.setattr(graphs, "BUCKET_TOKENS", 32)
    monkeypatch.setattr(StudioTrainer, "graph_recorder", rerunning_recorder([]))
    draws: list = []
    real_pair = lora_dropout.LayerDropout.pair

    def counted(self, x, y, rate):
        draws.append(self.number)
        return real_pair(self, x, y, rate)

    monkeypatch.setattr(lora_dropout.LayerDropout, "pair", counted)
    checkpoint_calls: list = []
    real_checkpoint = modeling_utils.checkpoint

    def checkpoint(function, *args, **kwargs):  # what the layers pass to PyTorch's checkpoint
        checkpoint_calls.append(kwargs.get("preserve_rng_state", True))
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", checkpoint)
    fast = replace(preset("fast"), liger_kernels=False, dequantize_base=False, cuda_graphs=True)
    lora = LoraSettings(dropout=0.1)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 3, seed=3)
        kept, kept_trainer, _ = studio_losses(loaded, fast, examples, tmp_path, steps=4, lora=lora)
        kept_draws = len(draws)
        real_redraws = speedups.redraws_dropout
        monkeypatch.setattr(speedups, "redraws_dropout", lambda settings, graphed: graphed)  # redrawn, unchecked
        plain, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=4, lora=lora)
        monkeypatch.setattr(speedups, "redraws_dropout", real_redraws)
        layers = len(set(draws))
        plain_draws, draws[:] = len(draws), []
        checkpointed, trainer, job = studio_losses(loaded, replace(fast, gradient_checkpointing=True), examples,
                                                   tmp_path, steps=4, lora=lora)
        graphed_calls, checkpoint_calls[:] = list(checkpoint_calls), []
        without_dropout, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=4)
        _, peft_trainer, peft_job = studio_losses(loaded, replace(fast, gradient_checkpointing=True), examples,
                                                  tmp_path, steps=2, lora=lora, route=False)
        model = loaded.model
    # 5 runs of a pass (the eager first, the capture, 3 replays): a draw forward, one in the backward (the
    # input and its gradient together), and one more in each recomputed forward
    assert layers == 14 and plain_draws == 5 * 2 * layers
    assert len(draws) == 5 * 3 * layers
    assert kept_draws == 0 and kept_trainer.graphed.replayed_passes == 3 and kept != pytest.approx(plain, rel=1e-6)
    assert trainer.graphed.replayed_passes == 3
    # every layer's checkpoint left the generator's state alone in the graphed run, and kept it in the eager one
    assert graphed_calls and not any(graphed_calls) and checkpoint_calls and all(checkpoint_calls)
    assert checkpointed == pytest.approx(plain, rel=1e-5) and plain != pytest.approx(without_dropout, rel=1e-4)
    assert not any("studio_dropout" in layer.__dict__ for layer in model.modules())
    assert peft_trainer.graphed is None
    note = ("CUDA graphs skipped: not with gradient checkpointing where the adapter's dropout runs in peft's own "
            "forward.")
    assert note in peft_job.lines, peft_job.lines
    assert "梯度检查点" in translate(note, "zh") and "peft" in translate(note, "zh")


def test_a_graphed_run_is_estimated_without_whole_logits_unless_its_head_is_trained(manager, monkeypatch):
    """CUDA-graphed runs compute the chunked loss (no whole logits), like Liger's fused loss in eager runs;
    the estimate counts the logits where neither applies: an eager run without Liger, a trained head."""
    from studio.model import attention
    from studio.train import speedups
    from studio.train.memory import model_features

    monkeypatch.setattr(attention, "varlen_kernel", lambda: reference_varlen)  # what a GPU has
    monkeypatch.setattr(speedups, "liger_available", lambda: None)
    with manager.using("test") as loaded:
        graphed = model_features(loaded.model, preset("fast"), 2048)
        eager = model_features(loaded.model, replace(preset("fast"), cuda_graphs=False), 2048)
        plain = model_features(loaded.model, replace(preset("fast"), cuda_graphs=False, liger_kernels=False), 2048)
        head = loaded.model.get_output_embeddings().weight
        head.requires_grad_(True)
        try:
            trained_head = model_features(loaded.model, preset("fast"), 2048)
        finally:
            head.requires_grad_(False)
    assert graphed.fused_loss and eager.fused_loss and not plain.fused_loss and not trained_head.fused_loss
    assert graphed.vector()[4] == eager.vector()[4] == 0 and plain.vector()[4] > 0  # the logits term
    assert trained_head.vector()[4] == plain.vector()[4]


def test_a_capture_out_of_memory_or_past_the_size_cap_leaves_those_passes_eager(manager, tmp_path, monkeypatch):
    from functools import partial

    from studio.model import attention
    from studio.train import graphs
    from studio.train.trainer import StudioTrainer

    def out_of_memory(work):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(attention, "varlen_kernel", lambda: partial(reference_varlen))
    monkeypatch.setattr(graphs, "BUCKET_TOKENS", 16)
    fast = replace(preset("fast"), liger_kernels=False, dequantize_base=False, cuda_graphs=False)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 2, seed=3)
        reference, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=2)
        monkeypatch.setattr(StudioTrainer, "graph_recorder", SimpleNamespace(record=out_of_memory))
        losses, _, job = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=2)
        assert losses == pytest.approx(reference, rel=1e-4)
        assert any(line.startswith("CUDA graphs ran out of GPU memory capturing a pass of") for line in job.lines)
        recorded: list = []
        monkeypatch.setattr(StudioTrainer, "graph_recorder", rerunning_recorder(recorded))
        monkeypatch.setattr(graphs, "MAX_SIZES", 1)
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7, 40, 41, 9, 8) * 4,
                        seed=3)
        reference, _, _ = studio_losses(loaded, fast, examples, tmp_path, steps=6)
        with monkeypatch.context() as unknown:  # rows of unknown lengths: a size at a time, as they come
            unknown.setattr(StudioTrainer, "_row_lengths", lambda self: [])
            losses, trainer, job = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=6)
        assert len(recorded) == 1 and 1 <= trainer.graphed.replayed_passes < 5  # the first pass, other sizes: eager
        assert losses == pytest.approx(reference, rel=1e-4)
        assert any("pass sizes captured, the most a run keeps" in line for line in job.lines), job.lines
        recorded.clear()  # known lengths: the one graph holds nearly every pass, the others pad up to it
        losses, trainer, job = studio_losses(loaded, replace(fast, cuda_graphs=True), examples, tmp_path, steps=6)
    assert len(recorded) == 1 and trainer.graphed.replayed_passes == 5 and trainer.graphed.padded_passes >= 4
    assert losses == pytest.approx(reference, rel=1e-4)
    assert not any("pass sizes captured, the most a run keeps" in line for line in job.lines)


def test_graphs_refuse_models_whose_attention_would_see_across_rows(plain_model):
    """Inside the graph every layer gets the rows' boundaries and no mask: a sliding window (Mistral sets
    one in its config), attention dropout or soft-capped logits would fall back to SDPA without the mask."""
    from transformers import MistralConfig, MistralForCausalLM

    from studio.train.graphs import model_problem
    from studio.ui.i18n import translate

    assert model_problem(plain_model) is None  # Qwen2: full attention on every layer
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    assert mistral.config.sliding_window is not None
    assert model_problem(mistral) == "not on a model with sliding-window attention layers"
    plain_model.config.attention_dropout = 0.1
    assert model_problem(plain_model) == "not on a model whose attention uses dropout or soft-capped logits"
    for problem in (model_problem(mistral), model_problem(plain_model)):
        assert re.search(r"[\u4e00-\u9fff]", translate(f"CUDA graphs skipped: {problem}.", "zh"))


def test_the_one_node_lora_update_is_peft_s_update_with_its_gradients():
    """`studio.model.lora_update`: result + scaling * dropout(x) A^T B^T, its gradients checked numerically,
    and with dropout the forward and the backward use one mask, the kept inputs scaled by 1 / (1 - p)."""
    from studio.model.lora_update import lora_update

    torch.manual_seed(0)
    x, result = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 5, 6, dtype=torch.float64)
    a, b = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    inputs = tuple(t.requires_grad_() for t in (x, result, a, b))
    assert torch.autograd.gradcheck(lambda *t: lora_update(*t, 2.0, 0.0), inputs)
    assert torch.allclose(lora_update(x, result, a, b, 2.0, 0.0), result + (x @ a.T @ b.T) * 2.0)

    torch.manual_seed(1)
    out = lora_update(x, result, a, b, 2.0, 0.5)
    out.sum().backward()
    torch.manual_seed(1)
    _, mask = torch.native_dropout(x.detach().reshape(-1, 8), 0.5, True)
    dropped = x * mask.view(2, 5, 8) * 2.0
    assert 0 < mask.sum() < mask.numel()
    reference = result + (dropped @ a.T @ b.T) * 2.0
    assert torch.allclose(out, reference)
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    reference.sum().backward()
    assert all(torch.allclose(mine, t.grad) for mine, t in zip(grads, inputs))


def test_the_dense_base_and_its_lora_update_in_one_node_are_the_two_apart():
    """`dense_lora_linear` (a dequantized base layer and the trained update in one autograd node, its
    input gradient summed in one product) gives `F.linear` + `lora_update`: values and gradients, checked
    numerically, with and without a bias, and with dropout the same mask for the same random state."""
    from studio.model.lora_update import dense_lora_linear, lora_update

    torch.manual_seed(0)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    for base_bias in (bias, None):
        assert torch.autograd.gradcheck(lambda *t: dense_lora_linear(t[0], weight, base_bias, t[1], t[2], 2.0, 0.0),
                                        (x, a, b))
        for rate in (0.0, 0.5):
            torch.manual_seed(3)
            fused = dense_lora_linear(x, weight, base_bias, a, b, 2.0, rate)
            fused.square().sum().backward()
            fused_grads = [t.grad.clone() for t in (x, a, b)]
            for t in (x, a, b):
                t.grad = None
            torch.manual_seed(3)
            apart = lora_update(x, torch.nn.functional.linear(x, weight, base_bias), a, b, 2.0, rate)
            apart.square().sum().backward()
            assert torch.allclose(fused, apart)
            assert all(torch.allclose(mine, t.grad) for mine, t in zip(fused_grads, (x, a, b)))
            for t in (x, a, b):
                t.grad = None


def test_training_over_a_dequantized_base_joins_base_and_update_and_keeps_the_losses(manager, tmp_path,
                                                                                       monkeypatch):
    """With `dequantize_base`, each trained projection runs `dense_lora_linear` (its copies in the
    activations' dtype, as on a GPU: bf16 both) and the losses are those of the base and update apart."""
    import studio.model.lora_update as lora_update
    from studio.train import speedups

    real_dequantize, real_joined = speedups.dequantize_base, lora_update.dense_lora_linear

    def dequantize_in_float32(model, undo):
        note = real_dequantize(model, undo)
        for module in model.modules():
            if "studio_dense_weight" in module.__dict__:
                module.studio_dense_weight = module.studio_dense_weight.float()
        return note

    def apart(x, weight, bias, a, b, scaling, dropout, casts=None, redrawn=None):
        return lora_update.lora_update(x, torch.nn.functional.linear(x, weight, bias), a, b, scaling, dropout, casts,
                                       redrawn)

    joined_calls: list = []
    monkeypatch.setattr(speedups, "dequantize_base", dequantize_in_float32)
    dense = replace(preset("fast"), dequantize_base=True, liger_kernels=False, cuda_graphs=False)
    with manager.using("test") as loaded:
        examples = rows(loaded.model.config.vocab_size, lengths=(9, 15, 6, 12, 10, 8, 14, 7) * 3, seed=1)
        monkeypatch.setattr(lora_update, "dense_lora_linear", apart)
        reference, _, _ = studio_losses(loaded, dense, examples, tmp_path, steps=3, lora=LoraSettings())
        monkeypatch.setattr(lora_update, "dense_lora_linear",
                            lambda *args: joined_calls.append(1) or real_joined(*args))
        losses, _, _ = studio_losses(loaded, dense, examples, tmp_path, steps=3, lora=LoraSettings())
    assert len(joined_calls) == 3 * 14  # 3 passes, 14 trained projections (2 layers of 7)
    assert losses == pytest.approx(reference, rel=1e-5) and losses[0] != losses[-1]


def test_a_capture_that_fails_mid_pass_leaves_nothing_in_the_one_go_casts():
    """A pass that raises while captured (out of memory, an op a graph cannot hold) must not leave the
    casts holding buffers of the failed capture for the rest of the run."""
    from studio.model.lora_update import FlatCasts
    from studio.train.graphs import _Captured

    weights = [torch.zeros(3, 4, requires_grad=True), torch.zeros(4, 3, requires_grad=True)]
    casts = FlatCasts(weights, torch.float32)
    layer = torch.nn.Linear(2, 2)

    def failing_step(inputs, num_items):
        assert layer.__dict__["studio_casts"] is casts and casts.casts  # set for the pass
        raise torch.OutOfMemoryError("CUDA out of memory")

    captured = _Captured({"input_ids": torch.zeros(1, 4, dtype=torch.long)}, None, "cpu")
    with pytest.raises(torch.OutOfMemoryError):
        captured.run(failing_step, weights, casts, [layer])
    assert casts.casts == [] and casts.grads is None and not casts.served
    assert "studio_casts" not in layer.__dict__


class _LoggedStream:
    """A stand-in CUDA stream that writes what is asked of it into a shared log."""

    def __init__(self, name: str, log: list):
        self.name, self.log, self.events = name, log, 0

    def wait_stream(self, other):
        self.log.append((self.name, "waits for all of", other.name))

    def record_event(self):
        self.events += 1
        event = f"{self.name} event {self.events}"
        self.log.append((self.name, "records", event))
        return event

    def wait_event(self, event):
        self.log.append((self.name, "waits for", event))


class _LoggedCuda:
    """torch.cuda's stream calls, as `FlatCasts` makes them, on `_LoggedStream`s."""

    def __init__(self, log: list):
        self.main, self.log, self.on = _LoggedStream("main", log), log, None

    def current_stream(self):
        return self.on or self.main

    @contextlib.contextmanager
    def stream(self, stream):
        self.on = stream
        try:
            yield
        finally:
            self.on = None


def _logged_casts(weights, log):
    """FlatCasts on stand-in streams; the gradients' read at the end of a pass is logged too."""
    from studio.model.lora_update import FlatCasts

    cuda = _LoggedCuda(log)
    casts = FlatCasts(weights, torch.float32, side=_LoggedStream("side", log), cuda=cuda)
    views = casts._views
    casts.begin()
    casts._views = lambda flat: log.append(("main", "reads the gradients")) or views(flat)
    return casts, cuda


def test_the_weights_gradient_products_run_beside_the_backward_and_are_waited_for_before_reuse():
    """On a side stream, each product starts after the backward's stream has written what it reads; the
    backward's stream waits for product i (an event recorded after it) once `SIDE_LAG` more were started
    (its tensors are kept till then, and released after), and for all of them before the gradients are
    read (`finish`) or dropped (`reset`)."""
    log: list = []
    weights = [torch.ones(2, 3, requires_grad=True), torch.ones(3, 2, requires_grad=True)]
    casts, cuda = _logged_casts(weights, log)
    lag = casts.SIDE_LAG
    for number in range(1, lag + 3):
        casts.aside(lambda n=number: log.append((cuda.current_stream().name, "runs product", n)),
                    (torch.zeros(1) + number,))
        assert len(casts.in_flight) == min(number, lag)
    assert log[:3] == [("side", "waits for all of", "main"), ("side", "runs product", 1), ("side", "records", "side event 1")]
    assert ("main", "runs product", 1) not in log  # never on the backward's own stream
    waits = [entry for entry in log if entry[0] == "main"]
    assert waits == [("main", "waits for", "side event 1"), ("main", "waits for", "side event 2")]
    assert log.index(("main", "waits for", "side event 1")) > log.index(("side", "runs product", lag + 1))
    assert [int(reads[0].item()) for _, reads in casts.in_flight] == list(range(3, lag + 3))  # 1 and 2 let go
    grads = casts.finish()
    assert log[-2:] == [("main", "waits for all of", "side"), ("main", "reads the gradients")]
    assert casts.in_flight == [] and grads == {}  # no layer took a weight from these casts
    assert log.count(("main", "waits for all of", "side")) == 1


def test_a_pass_whose_first_side_product_fails_still_joins_the_side_stream_and_lets_go():
    """A capture must end with every stream it forked joined back, or ending it fails with another error
    than the pass's own (an out-of-memory error the run would otherwise recover from)."""
    log: list = []
    casts, _ = _logged_casts([torch.ones(2, 3, requires_grad=True)], log)

    def failing_product():
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError):
        casts.aside(failing_product, (torch.zeros(1),))
    casts.reset()
    assert log[-1] == ("main", "waits for all of", "side")
    assert casts.in_flight == [] and casts.grads is None and not casts.forked
    casts.reset()  # nothing forked since: no second wait
    assert log.count(("main", "waits for all of", "side")) == 1


def test_the_lora_backward_keeps_every_tensor_its_side_products_read():
    """What the side stream reads (the incoming gradient, the update's hidden product and its gradient,
    the dropped input) stays referenced until the main stream waits for it: every storage the products
    read is one of the kept tensors'."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from studio.model.lora_update import lora_update

    class ReadStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.read: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            outputs = {id(t) for t in torch.utils._pytree.tree_leaves(kwargs.get("out"))}
            for value in torch.utils._pytree.tree_leaves((args, kwargs)):
                if torch.is_tensor(value) and id(value) not in outputs:
                    self.read.add(value.untyped_storage().data_ptr())
            return func(*args, **kwargs)

    torch.manual_seed(0)
    weight_a = torch.randn(4, 6, requires_grad=True)
    weight_b = torch.randn(5, 4, requires_grad=True)
    log: list = []
    casts, _ = _logged_casts([weight_a, weight_b], log)
    reads_seen, kept = [], []
    side_aside = casts.aside

    def watched(work, reads):
        def watched_work():
            with ReadStorages() as mode:
                work()
            reads_seen.append(mode.read)

        kept.append({t.untyped_storage().data_ptr() for t in reads})
        side_aside(watched_work, reads)

    casts.aside = watched
    x = torch.randn(3, 6, requires_grad=True)
    result = torch.randn(3, 5, requires_grad=True)
    out = lora_update(x, result, weight_a, weight_b, 2.0, 0.1, casts)
    out.square().sum().backward()
    assert len(reads_seen) == 1 and len(kept[0]) == 4
    flat_grads = casts.grads.untyped_storage().data_ptr()
    weights_cast = casts.casts[0].untyped_storage().data_ptr()
    assert reads_seen[0] - {flat_grads, weights_cast} <= kept[0]
    assert reads_seen[0] & kept[0] == kept[0]  # and each kept tensor is read


def test_without_a_side_stream_the_weights_gradient_products_run_at_once():
    from studio.model.lora_update import FlatCasts

    casts = FlatCasts([torch.ones(2, requires_grad=True)], torch.float32)
    ran = []
    casts.aside(lambda: ran.append(1), (torch.zeros(1),))
    assert ran == [1] and casts.in_flight == []


@pytest.mark.parametrize("lora_bias", [False, True])
def test_training_forward_equals_peft_s_and_keeps_an_adapter_s_own_biases(plain_model, lora_bias):
    """While `name` trains, a pass with gradients gives peft's output and gradients (one node, or peft's
    own arithmetic for an adapter with biases of its own, which the one-node update has no place for)."""
    from peft import LoraConfig, get_peft_model

    from studio.model.routing import lora_layers, only_adapter

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        lora_bias=lora_bias)
    model = get_peft_model(plain_model, config, adapter_name="mine")
    for layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B["mine"].weight, std=0.02)
        if lora_bias:
            torch.nn.init.normal_(layer.lora_B["mine"].bias, std=0.5)
    ids = torch.randint(0, plain_model.config.vocab_size, (1, 12))

    def logits_and_grads():
        model.zero_grad()
        logits = model(input_ids=ids).logits
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    peft_logits, peft_grads = logits_and_grads()
    with only_adapter(model, "mine"):
        logits, grads = logits_and_grads()
        one_node = [layer for layer in lora_layers(model) if "forward" in layer.__dict__]
    assert len(one_node) == 2 * plain_model.config.num_hidden_layers
    assert torch.allclose(logits, peft_logits, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads, peft_grads))
    if lora_bias:
        assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n and n.endswith("bias"))


def test_bench_result_files_hold_one_row_a_line_and_load_back_unchanged(tmp_path, monkeypatch):
    """`bench/common.write_results`: the file (and its $OUT copy) loads back to the payload, and each row
    of a results list is one line, so a table of twenty setups is twenty lines, not thousands."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setenv("OUT", str(tmp_path))
    rows = [{"setup": f"fast {i}", "losses": [1.5, 1.25], "graphs": {"replay_ms": {"2816": 27.6}}} for i in range(20)]
    payload = {"results": rows, "skipped": [], "sizes": {"7B": {"load_s": 3.5}}, "note": "二",
               "versions": {"gpu": "NVIDIA H100 80GB HBM3"}, "date": "2026-12-07"}
    path = common.write_results("train_speed-check", payload)
    assert path == tmp_path / "bench" / "results" / "train_speed-check-h100-80gb-hbm3-2026-12-07.json"
    text = path.read_text()
    assert json.loads(text) == payload
    assert (tmp_path / path.name).read_text() == text
    lines = text.splitlines()
    assert len(lines) == 1 + 1 + len(rows) + 1 + 5 + 1  # {, "results": [, the rows, ], five other keys, }
    assert lines[2] == '    {"setup":"fast 0","losses":[1.5,1.25],"graphs":{"replay_ms":{"2816":27.6}}},'
