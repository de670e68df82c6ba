"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol, scriptable per call.

By default it answers like a good teacher: stage-1 calls get pairs built from the section text
(long ones for the tutorial prompt, short one-fact ones for the facts prompt), stage-2 calls get
numbered rephrasings (facts style: every other one with a reworded answer), exam calls get questions
with keys (plus two items the builder must drop). A script (a list of behaviours, consumed one per call) makes
it misbehave: fenced JSON, prose, truncation, wrong schema, empty, 429 with Retry-After, 500, a hang.
"""

import json
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from local_server import LocalServer


def _pairs_reply(section_text: str, n: int) -> str:
    heading = section_text.splitlines()[0].lstrip("#").strip()
    body = " ".join(line.strip() for line in section_text.splitlines()[1:] if line.strip())
    pairs = [{"instruction": f"{heading}的第{i}个要点是什么", "output": f"{heading}：{body[:60]}（要点{i}）"}
             for i in range(1, n + 1)]
    return json.dumps({"pairs": pairs}, ensure_ascii=False)


def _paraphrase_reply(question: str, n: int) -> str:
    return json.dumps({"paraphrases": [f"请问{question}（问法{i}）" for i in range(1, n + 1)]}, ensure_ascii=False)


def _section_parts(section_text: str) -> tuple[str, str]:
    heading = section_text.splitlines()[0].lstrip("#").strip()
    body = " ".join(line.strip() for line in section_text.splitlines()[1:] if line.strip())
    return heading, body


def _facts_reply(section_text: str, n: int) -> str:
    heading, body = _section_parts(section_text)
    pairs = [{"instruction": f"{heading}的第{i}个事实是什么", "output": f"{body[(i - 1) * 8:(i - 1) * 8 + 16]}（事实{i}）"}
             for i in range(1, n + 1)]
    return json.dumps({"pairs": pairs}, ensure_ascii=False)


def _variants_reply(question: str, answer: str, n: int) -> str:
    """Rephrased questions; every other variant rewords the answer too (numbers kept)."""
    items = [{"question": f"请问{question}（问法{i}）", **({"answer": f"换句话说，{answer}"} if i % 2 else {})}
             for i in range(1, n + 1)]
    return json.dumps({"variants": items}, ensure_ascii=False)


def _exam_reply(user: str, n: int) -> str:
    """Two items the builder must drop (a training question, a key not in the section), then `n` good ones."""
    section = re.search(r"(?:原文片段：|Excerpt:)\n(.*?)\n\n(?:已有问题|Existing questions)", user, re.S).group(1)
    existing = re.findall(r"(?m)^- (.+)$", user)
    heading, body = _section_parts(section)
    items = [{"question": existing[0], "answer": body[:20], "keys": [body[:4]]}] if existing else []
    items.append({"question": f"{heading}里有没有写到独角兽", "answer": "有。", "keys": ["独角兽的名字"]})
    items += [{"question": f"关于{heading}，考点{i}是什么", "answer": body[(i - 1) * 5:(i - 1) * 5 + 12],
               "keys": [body[(i - 1) * 5:(i - 1) * 5 + 4]]} for i in range(1, n + 1)]
    return json.dumps({"exam": items}, ensure_ascii=False)


def _number(pattern: str, text: str) -> int:
    return int(next(g for g in re.search(pattern, text).groups() if g))


def good_reply(request: dict, extra: int = 0) -> str:
    system, user = request["messages"][0]["content"], request["messages"][-1]["content"]
    if "评测员" in system:
        return json.dumps({"score": 4, "reason": "基本一致"}, ensure_ascii=False)
    if '{"exam"' in system:
        return _exam_reply(user, _number(r"出 (\d+) 道|write (\d+) questions", system))
    if '{"variants"' in system:
        question = re.search(r"(?:原问题：|Original question: )(.*)", user).group(1)
        answer = re.search(r"(?:参考答案：|Reference answer: )(.*)", user).group(1)
        n = _number(r"请给出 (\d+) 种|Give (\d+) different", user)
        return _variants_reply(question.rstrip("？?"), answer, n + extra)
    if "事实问答" in system or "fact-level" in system:
        n = _number(r"提炼 (\d+) 条|into (\d+) fact-level", system)
        return _facts_reply(user, n)
    if "paraphrases" in system:
        question = re.search(r"原问题：(.*)", user).group(1)
        n = int(re.search(r"请给出 (\d+) 种", user).group(1))
        return _paraphrase_reply(question.rstrip("？?"), n + extra)
    n = int(re.search(r"转写为 (\d+) 条", system).group(1)) if "转写为" in system else 1
    return _pairs_reply(user, n)


@dataclass
class Behaviour:
    """What to do with one call. kind: ok, fenced, prose, truncated, wrong_schema, empty, status, hang,
    html (a web page with status 200, as a wrong base URL gives), chatty (far more rephrasings than asked),
    parts (the content as a list of text parts), content_dict (the content an object), choices_str
    (`choices` a string), line_breaks (U+2028 and U+2029 inside the answers' text)."""

    kind: str = "ok"
    status: int = 200
    retry_after: str | None = None
    delay: float = 0.0


@dataclass
class FakeTeacher(LocalServer):
    latency: float = 0.0
    script: deque = field(default_factory=deque)
    hits: list = field(default_factory=list)
    auth_headers: list = field(default_factory=list)
    port: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def then(self, *behaviours: Behaviour) -> "FakeTeacher":
        self.script.extend(behaviours)
        return self

    def _next(self) -> Behaviour:
        with self._lock:
            return self.script.popleft() if self.script else Behaviour()

    def handle(self, request: dict, auth: str):
        """Record one chat-completions request; return its behaviour and how long to wait."""
        with self._lock:
            self.hits.append(request)
            self.auth_headers.append(auth)
        behaviour = self._next()
        return behaviour, self.latency + behaviour.delay + (30 if behaviour.kind == "hang" else 0)

    def respond(self, request: dict, behaviour: Behaviour):
        if behaviour.kind == "status":
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
            return behaviour.status, headers, {"error": {"message": f"scripted {behaviour.status}", "type": "error"}}
        if behaviour.kind == "html":
            return 200, {}, "<!DOCTYPE html><html><head><title>Web UI</title></head><body>Welcome</body></html>"
        text, finish = good_reply(request, extra=80 if behaviour.kind == "chatty" else 0), "stop"
        if behaviour.kind == "fenced":
            text = f"```json\n{text}\n```"
        elif behaviour.kind == "prose":
            text = f"好的，下面是结果：\n{text}\n希望对你有帮助。"
        elif behaviour.kind == "truncated":
            text, finish = text[: max(10, len(text) * 2 // 3)], "length"
        elif behaviour.kind == "wrong_schema":
            text = json.dumps({"question_list": "none", "note": "wrong keys"})
        elif behaviour.kind == "empty":
            text = ""
        elif behaviour.kind == "line_breaks":
            text = text.replace("。", "。\u2028").replace("？", "？\u2029")
        payload = completion(request, text, finish)
        message = payload["choices"][0]["message"]
        if behaviour.kind == "parts":
            message["content"] = [{"type": "text", "text": text[:10]}, {"type": "text", "text": text[10:]}]
        elif behaviour.kind == "content_dict":
            message["content"] = {"text": text}
        elif behaviour.kind == "choices_str":
            payload["choices"] = "oops"
        return 200, {}, payload

    def start(self) -> "FakeTeacher":
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            import asyncio

            body = await request.json()
            behaviour, wait_s = self.handle(body, request.headers.get("authorization", ""))
            await asyncio.sleep(wait_s)  # latency without holding a thread: many calls can wait at once
            status, headers, payload = self.respond(body, behaviour)
            if isinstance(payload, str):
                return HTMLResponse(payload, status_code=status, headers=headers)
            return JSONResponse(payload, status_code=status, headers=headers)

        self.start_app(app)
        return self


def completion(request: dict, text: str, finish: str) -> dict:
    prompt_chars = sum(len(m["content"]) for m in request["messages"])
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": request["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_chars, "completion_tokens": len(text),
                  "total_tokens": prompt_chars + len(text)},
    }
