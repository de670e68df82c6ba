"""Dataset styles: the tutorial's one long answer per question, or short fact-level pairs.

`facts` (the default) asks the teacher for several short question/answer pairs per section, one fact
each, together covering the section; stage 2 rephrases the question and, for about half of the
variants, the answer's wording too, so the model does not learn one string per fact. `tutorial` keeps
the tutorial's prompts. The facts prompts come in Chinese and English, chosen by the document's
language.
"""

from __future__ import annotations

import re

STYLES = ("facts", "tutorial")
DEFAULT_STYLE = "facts"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LATIN = re.compile(r"[A-Za-z]")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")

FACTS_PAIR_PROMPT = {
    "zh": ("你是“{title}”相关资料的资深整理者。从给定原文片段中提炼 {n} 条事实问答，严格输出JSON："
           '{"pairs":[{"instruction":"只问一个事实的简短问题","output":"一两句话的简短答案"}]}。'
           "要求：1. 每条只问一个事实，各条问不同的事实，合起来覆盖片段中的全部要点（名称、数字、条件、步骤、结果）；"
           "2. output 仅依据原文，简短直接，只回答所问的事实，不要复述整段；"
           "3. 禁止任何额外说明或代码块。"),
    "en": ("You curate source material about \"{title}\". Turn the given excerpt into {n} fact-level question/answer "
           'pairs. Output strictly JSON: {"pairs":[{"instruction":"a short question about one fact",'
           '"output":"a short answer of one or two sentences"}]}. Rules: 1. each pair asks about one fact, every pair '
           "about a different fact, together covering everything the excerpt states (names, numbers, conditions, "
           "steps, outcomes); 2. answer only from the excerpt, briefly, answering just the question, never "
           "restating the whole excerpt; 3. no extra text, no code fences."),
}
FACTS_VARIANT_PROMPT = {
    "zh": ('严格输出 JSON 对象：{"variants": [{"question": "...", "answer": "..."}]}；禁止任何额外文本/代码块/前后缀。'
           "每个 question 都是原问题的等价问法：意思相同、答案相同，不引入原问题没有的信息，措辞和句式尽量多样。"
           "约一半的条目同时给出 answer：用不同的措辞和句式表达参考答案，名称和数字原样保留，不增不减事实；"
           "其余条目只给 question。"),
    "en": ('Output strictly a JSON object: {"variants": [{"question": "...", "answer": "..."}]}; no extra text, '
           "no code fences. Every question is an equivalent rephrasing of the original: same meaning, same answer, "
           "no new information, varied wording and sentence shape. About half of the items also give an answer: "
           "the reference answer in different words, keeping every name and number exactly, adding and dropping no "
           "fact; the other items give only the question."),
}
FACTS_VARIANT_USER = {
    "zh": "原问题：{question}\n参考答案：{answer}\n请给出 {n} 种不同的问法。",
    "en": "Original question: {question}\nReference answer: {answer}\nGive {n} different rephrasings.",
}


def document_language(text: str) -> str:
    """"zh" when Chinese characters are at least a fifth of the letters, else "en"."""
    cjk, latin = len(_CJK.findall(text)), len(_LATIN.findall(text))
    return "zh" if cjk and cjk >= 0.2 * (cjk + latin) else "en"


def check_style(style: str) -> str:
    from studio.errors import DataError

    if style not in STYLES:
        raise DataError(f"Unknown dataset style {style!r}; choose one of {', '.join(STYLES)}.")
    return style


def facts_per_section(chars: int, chars_per_fact: int = 150, most: int = 12) -> int:
    """How many fact-level pairs to ask for: about one per `chars_per_fact` characters, 2 to `most`."""
    return max(2, min(most, round(chars / max(1, chars_per_fact))))


def keeps_numbers(reworded: str, original: str) -> bool:
    """A reworded answer must state the same numbers as the original (a cheap guard against a changed fact)."""
    return sorted(_NUMBER.findall(reworded)) == sorted(_NUMBER.findall(original))
