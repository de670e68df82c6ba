"""Export: the adapter alone (PEFT folder + zip) or merged into a bf16 base that plain transformers loads
with the same greedy answers as base + adapter; an adapter of another base is refused."""

import json
import zipfile
from pathlib import Path

import pytest

PROMPTS = ["我该怎么成为守灯人？", "What does the studio do?", "灯塔守护者每天做什么？"]
SYSTEM = "你是《雾灯岛》领域助手，回答准确、简明。"


def _fp32_base(folder):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, tmp_path_factory):
    """A run folder holding a LoRA adapter with large random weights (so it changes the answers)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from studio.train import adapters

    torch.manual_seed(1)
    model = get_peft_model(_fp32_base(tiny_model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        init_lora_weights=False, task_type="CAUSAL_LM"), adapter_name="run")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    folder = tmp_path_factory.mktemp("runs") / "lighthouse_20261201_120000"
    adapters.save_adapter(model, "run", folder)
    (folder / adapters.METADATA_FILE).write_text(json.dumps({
        "name": "run", "status": "completed", "base_model": str(tiny_model_dir), "system_prompt": SYSTEM,
        "base_fingerprint": adapters.base_fingerprint(model), "lora": {"r": 4, "alpha": 8},
    }, ensure_ascii=False), encoding="utf-8")
    return folder


def _export(run, out, merge, base=None):
    from studio.export import ExportRequest, start_export
    from studio.jobs import JobBoard

    board = JobBoard()
    job = board.wait(start_export(board, ExportRequest(run, out, merge, base)), timeout=300)
    return job


def _greedy_tokens(model, tokenizer, prompt_text, n=24):
    import torch

    ids = tokenizer([prompt_text], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, repetition_penalty=1.0,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return out[0, ids["input_ids"].shape[1]:].tolist()


def test_merged_export_answers_like_base_plus_adapter(tiny_model_dir, adapter_run, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    job = _export(adapter_run, out, merge=True)
    assert job.status.value == "done", job.error
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "Modelfile"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    with safe_open(str(out / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
        assert not any("lora" in k for k in weights.keys())
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM .\n") and "<|im_start|>" in modelfile and SYSTEM in modelfile
    assert "ollama create" in job.result["instructions"] and "vllm serve" in job.result["instructions"]

    tokenizer = AutoTokenizer.from_pretrained(out)  # plain transformers, tokenizer and template from the export
    reference = PeftModel.from_pretrained(_fp32_base(tiny_model_dir), str(adapter_run)).eval()
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
    base_only = _fp32_base(tiny_model_dir).eval()
    differs_from_base = 0
    for question in PROMPTS:
        prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                {"role": "user", "content": question}],
                                               tokenize=False, add_generation_prompt=True)
        expected = _greedy_tokens(reference, tokenizer, prompt)
        assert _greedy_tokens(merged, tokenizer, prompt) == expected, question
        differs_from_base += _greedy_tokens(base_only, tokenizer, prompt) != expected
    assert differs_from_base, "the adapter must change the answers, or the comparison proves nothing"


def test_merged_weights_are_base_plus_scaled_update_rounded_to_bf16(tiny_model_dir, adapter_run, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "merged"
    assert _export(adapter_run, out, merge=True).status.value == "done"
    base = _fp32_base(tiny_model_dir)
    lora = load_file(str(adapter_run / "adapter_model.safetensors"))
    key = "model.layers.0.self_attn.q_proj"
    a = next(v for k, v in lora.items() if key in k and "lora_A" in k)
    b = next(v for k, v in lora.items() if key in k and "lora_B" in k)
    w = base.get_submodule(key).weight.detach().to(torch.bfloat16).float()  # the base as loaded in bf16
    expected = (w + (8 / 4) * (b @ a)).to(torch.bfloat16)
    merged = load_file(str(out / "model.safetensors"))[f"{key}.weight"]
    assert (merged.float() - expected.float()).abs().max().item() <= 2 ** -7 * expected.float().abs().max().item()


def test_adapter_export_writes_the_peft_folder_a_zip_and_the_vllm_command(tiny_model_dir, adapter_run, tmp_path):
    import torch
    from peft import PeftModel

    out = tmp_path / "adapter-only"
    job = _export(adapter_run, out, merge=False, base=str(tiny_model_dir))
    assert job.status.value == "done", job.error
    folder = out / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "studio.json"]
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    with zipfile.ZipFile(next(out.glob("*.zip"))) as zipped:
        assert sorted(zipped.namelist()) == sorted(f"{adapter_run.name}/{p.name}" for p in folder.iterdir())
    text = job.result["instructions"]
    assert f"--enable-lora --lora-modules {adapter_run.name}={folder.resolve()}" in text
    assert (out / "HOW_TO_USE.txt").read_text().strip() == text.strip()
    ids = torch.tensor([[5, 6, 7, 8]])
    original = PeftModel.from_pretrained(_fp32_base(tiny_model_dir), str(adapter_run)).eval()
    exported = PeftModel.from_pretrained(_fp32_base(tiny_model_dir), str(folder)).eval()
    with torch.no_grad():
        assert torch.equal(original(ids).logits, exported(ids).logits)


def test_adapter_of_another_base_is_refused_and_nothing_is_written(tiny_model_dir, adapter_run, tmp_path):
    import shutil

    from studio.train import adapters

    other = tmp_path / "other_run"
    shutil.copytree(adapter_run, other)
    meta = json.loads((other / adapters.METADATA_FILE).read_text())
    meta["base_fingerprint"]["hidden_size"] = 3584
    meta["base_model"] = "Qwen/Qwen2.5-7B-Instruct-like"
    (other / adapters.METADATA_FILE).write_text(json.dumps(meta))
    job = _export(other, tmp_path / "out", merge=True, base=str(tiny_model_dir))  # the tiny base: hidden 64
    assert job.status.value == "failed"
    assert "made for another base model" in job.error and "hidden_size 3584 vs 64" in job.error
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_empty_folder_and_an_incomplete_run(adapter_run, tmp_path):
    from studio.errors import StudioError

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(StudioError, match="already exists and is not empty"):
        _export(adapter_run, tmp_path / "busy", merge=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    half = tmp_path / "half_run"
    half.mkdir()
    (half / "adapter_config.json").write_text((adapter_run / "adapter_config.json").read_text())
    with pytest.raises(StudioError, match="adapter_model.safetensors is missing"):
        _export(half, tmp_path / "new", merge=False)


def test_compare_tab_export_button(services, adapter_run, tmp_path):
    """The Compare tab's Export: the run's adapter, its zip and the commands, offered for download."""
    import shutil

    from gradio_client import Client

    from uihelpers import launched

    run = services.paths.runs_dir / adapter_run.name
    shutil.copytree(adapter_run, run)
    with launched(services) as url:
        client = Client(url, verbose=False, headers={"Accept-Language": "zh-CN,zh;q=0.9"})  # a Chinese page
        message, files = client.predict(run.name, False, api_name="/export_adapter")
    assert "--enable-lora --lora-modules" in message
    assert sorted(Path(f["path"] if isinstance(f, dict) else f).name for f in files) == \
        sorted([f"{run.name}-adapter.zip", "HOW_TO_USE.txt"])
    exported = next((services.paths.runs_dir.parent / "exports").glob(f"{run.name}-adapter-*"))
    assert (exported / "adapter" / "adapter_model.safetensors").is_file()
    # the file beside it reads like the page: Chinese prose, the commands as they are
    howto = (exported / "HOW_TO_USE.txt").read_text(encoding="utf-8").split("\n")
    assert howto[0].startswith("适配器已导出到 ") and any(line.startswith("  vllm serve ") for line in howto), howto


def test_a_failed_merge_leaves_no_folder_and_the_run_may_go_while_it_exports(tiny_model_dir, adapter_run, tmp_path,
                                                                             monkeypatch):
    import shutil

    import studio.export as export

    run = tmp_path / "run_copy"
    shutil.copytree(adapter_run, run)
    real_export_adapter = export.export_adapter

    def delete_the_run_then_export(adapter_dir, out_dir, base, run_name=None):
        shutil.rmtree(run)  # the run is deleted (or renamed) while its export runs
        return real_export_adapter(adapter_dir, out_dir, base, run_name)

    monkeypatch.setattr(export, "export_adapter", delete_the_run_then_export)
    out = tmp_path / "from-snapshot"
    job = _export(run, out, merge=False, base=str(tiny_model_dir))
    assert job.status.value == "done", job.error
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (adapter_run / "adapter_model.safetensors").read_bytes()
    assert not export.staging_folder(out).exists() and not (out / ".adapter").exists()
    assert all(Path(f).is_file() and str(out) in f for f in job.result["files"])

    def fail_halfway(job, source, adapter_dir, out_dir, metadata):
        (out_dir / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise RuntimeError("disk went away")

    monkeypatch.setattr(export, "export_merged", fail_halfway)
    job = _export(adapter_run, tmp_path / "merged", merge=True, base=str(tiny_model_dir))
    assert job.status.value == "failed" and "disk went away" in job.error
    assert not (tmp_path / "merged").exists() and not export.staging_folder(tmp_path / "merged").exists()


def test_a_merge_that_would_not_fit_in_memory_is_refused_with_both_figures(tiny_model_dir, adapter_run, tmp_path,
                                                                          monkeypatch):
    import studio.export as export

    needed = export.bf16_bytes(str(tiny_model_dir))
    assert needed > 0  # read from the safetensors headers: 2 bytes a parameter
    monkeypatch.setattr(export, "available_memory", lambda: needed // 2)
    job = _export(adapter_run, tmp_path / "merged", merge=True, base=str(tiny_model_dir))
    assert job.status.value == "failed"
    assert "Merging needs about" in job.error and "GiB is free" in job.error and "export the adapter alone" in job.error
    assert not (tmp_path / "merged").exists()


def test_a_merge_that_cannot_apply_the_adapter_names_the_users_folder(tiny_model_dir, adapter_run, tmp_path,
                                                                      monkeypatch):
    """The merge reads a copy of the run in a hidden staging folder: its error named that copy."""
    import studio.export as export
    from studio.errors import AdapterError

    def cannot_apply(job, source, adapter_dir, out_dir, metadata):
        raise AdapterError(f"Could not apply {adapter_dir} to the base: RuntimeError: size mismatch")

    monkeypatch.setattr(export, "export_merged", cannot_apply)
    job = _export(adapter_run, tmp_path / "merged", merge=True, base=str(tiny_model_dir))
    assert job.status.value == "failed"
    assert f"Could not apply {adapter_run} to the base" in job.error and ".adapter" not in job.error


def test_the_ollama_command_names_the_model_as_ollama_accepts(tmp_path):
    """Run names are often Chinese; Ollama takes lowercase ASCII letters, digits, '.', '-' and '_' only."""
    from studio.export import merged_instructions, ollama_tag

    assert ollama_tag("雾灯岛-长跑_20261207_134435") == "studio-20261207_134435"
    assert ollama_tag("Lighthouse Run_2") == "lighthouse-run_2" and ollama_tag("灯") == "studio"
    text = merged_instructions(tmp_path, "雾灯岛-长跑_20261207_134435")
    assert "ollama create studio-20261207_134435 -f Modelfile && ollama run studio-20261207_134435" in text


def test_the_export_instructions_read_in_chinese_on_a_chinese_page_with_the_commands_unchanged(tmp_path):
    """Each prose line of both instruction texts is in the tables; the command lines are left as they are."""
    import re

    from studio.export import adapter_instructions, merged_instructions
    from studio.ui.i18n import translate

    (tmp_path / "run.zip").write_bytes(b"")
    texts = [adapter_instructions(tmp_path, "Qwen/Qwen2.5-7B-Instruct", "灯塔", {"system_prompt": SYSTEM}),
             adapter_instructions(tmp_path / "none", "/models/q", "run_1", {}),
             merged_instructions(tmp_path, "灯塔_1")]
    for text in texts:
        shown = translate(f"```\n{text}\n```", "zh").split("\n")[1:-1]
        for english, chinese in zip(text.split("\n"), shown, strict=True):
            if english.startswith("  ") and "then ask for model" not in english:  # a command
                assert chinese == english
            elif english:
                assert re.search(r"[\u4e00-\u9fff]", chinese) and not re.search(r"\b(it|the|with)\b", chinese), chinese
    first, second = (translate(f"```\n{text}\n```", "zh") for text in texts[:2])  # as the Compare tab shows them
    assert "（可下载的 zip：" in first and "请把它作为 system 消息发送：" + SYSTEM in first
    assert "  然后在 http://127.0.0.1:8000/v1/chat/completions 请求模型 'run_1'" in second
