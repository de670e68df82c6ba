"""An LLM judge: rates how faithful an answer is to the reference, 1 to 5, with a short reason."""

from __future__ import annotations

from dataclasses import dataclass

from studio.data.parsing import json_values, strip_fences
from studio.data.teacher import Teacher, TeacherCallError

JUDGE_PROMPT = (
    "你是严格的评测员。根据参考答案评价模型回答的忠实度，只看事实是否与参考答案一致，不看文风。"
    '严格输出JSON：{"score": 1到5的整数, "reason": "一句话理由"}。'
    "5=与参考答案完全一致；4=基本一致，略有遗漏；3=部分正确；2=大部分错误；1=完全错误或答非所问。"
)


@dataclass
class Verdict:
    score: int | None
    reason: str


def judge(teacher: Teacher, question: str, reference: str, answer: str) -> Verdict:
    user = f"问题：{question}\n参考答案：{reference}\n模型回答：{answer}"
    messages = [{"role": "system", "content": JUDGE_PROMPT}, {"role": "user", "content": user}]
    try:
        reply = teacher.complete(messages, 0.0, 200, True)
    except TeacherCallError as exc:
        return Verdict(None, f"judge failed: {exc.reason}")
    for value in json_values(strip_fences(reply.text)):
        if isinstance(value, dict) and "score" in value:
            try:
                score = int(round(float(value["score"])))
            except (TypeError, ValueError):
                continue
            if 1 <= score <= 5:
                return Verdict(score, str(value.get("reason", ""))[:200])
    return Verdict(None, "judge reply had no score")
