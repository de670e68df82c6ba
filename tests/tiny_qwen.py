"""Build a tiny Qwen2 chat model and tokenizer offline, for tests.

The model has the real Qwen2 architecture (q/k/v with bias, SwiGLU MLP, RMSNorm, RoPE) at a toy
size, and the tokenizer is a byte-level BPE with Qwen's pre-tokenizer, special tokens and a ChatML
template, so everything the studio does with Qwen2.5-7B-Instruct runs on it in about a second.
"""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CORPUS_LINES = [
    "The studio turns a private document into an instruction dataset and a LoRA adapter.",
    "Question: how do I become the chosen one? Answer: collect the relics and light the beacon.",
    "A model answers from its weights; retrieval answers from the document; fine-tuning teaches.",
    "Training uses the same chat template and system prompt as inference, or answers drift.",
    "你是领域助手，回答准确、简明。",
    "我该怎么成为天命人？收集灵根，然后在石卵处激活它们。",
    "如何获得并合成出云棍？找到六个佛目珠，击败石敢当，获得铁石心。",
    "星砂港位于云梦海的东岸，建于第三纪元，港口有七座灯塔。",
    "灯塔守护者每天黄昏点燃琉璃灯，灯油来自深海的银鲸。",
    "商会的会长名叫顾长风，他规定每月初一举行集市。",
    "数据集中的每一行都有指令和输出两个字段。",
    "微调之后，模型能够根据私有文档回答问题。",
    "0123456789 + - * / = ( ) [ ] { } < > , . ; : ? ! \" ' | _ # @ % & ~",
    "问题：什么是量化？答案：用更少的比特表示权重，例如四比特的NF4。",
    "Paraphrase each question many times so the model learns the fact, not the string.",
]


def corpus(extra_text: str = "") -> list[str]:
    """Lines to train the tokenizer on; `extra_text` adds domain text (e.g. the sample document)."""
    lines = list(CORPUS_LINES) * 3
    if extra_text:
        lines.extend(line for line in extra_text.splitlines() if line.strip())
    return lines


def build_tokenizer(folder: Path, extra_text: str = "", vocab_size: int = 4000):
    """Train a byte-level BPE with Qwen's split regex and save it as a Qwen2 tokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus(extra_text), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(folder)
    _mark_as_qwen2(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _mark_as_qwen2(folder: Path) -> None:
    import json

    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")


def build_tiny_qwen(folder: Path, extra_text: str = "", seed: int = 0) -> Path:
    """Write a tiny random Qwen2ForCausalLM plus its tokenizer into `folder` and return it."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, extra_text)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    return folder
