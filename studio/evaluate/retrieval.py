"""Lexical retrieval over the source document's sections (the tutorial's "RAG" step, made visible).

BM25 from the bm25s library over tokens that work for Chinese and English alike: CJK characters and
character bigrams, and lower-cased Latin words and numbers. No model, no index files.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from studio.data.documents import Section, SplitSettings, read_document, split_sections

_CJK_RUN = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", text).lower()
    result = _WORD.findall(folded)
    for run in _CJK_RUN.findall(folded):
        result.extend(run)
        result.extend(run[i:i + 2] for i in range(len(run) - 1))
    return result


@dataclass
class Hit:
    section: Section
    score: float


class SectionRetriever:
    def __init__(self, sections: list[Section]):
        import bm25s

        self.sections = sections
        self._retriever = bm25s.BM25()
        self._retriever.index([tokens(s.text) for s in sections], show_progress=False)
        self._vocab = {t for s in sections for t in tokens(s.text)}

    @classmethod
    def from_document(cls, path, settings: SplitSettings = SplitSettings()) -> "SectionRetriever":
        return cls(split_sections(read_document(path), settings))

    def search(self, query: str, k: int = 2) -> list[Hit]:
        query_tokens = [t for t in tokens(query) if t in self._vocab]
        if not query_tokens or not self.sections:
            return []
        k = min(k, len(self.sections))
        ids, scores = self._retriever.retrieve([query_tokens], k=k, show_progress=False)
        return [Hit(self.sections[int(i)], float(score)) for i, score in zip(ids[0], scores[0]) if score > 0]


def retrieval_messages(system: str, question: str, hits: list[Hit]) -> list[dict]:
    """The base model's prompt with the retrieved sections put in front of the question."""
    context = "\n\n".join(hit.section.text for hit in hits)
    user = f"参考资料：\n{context}\n\n请仅依据参考资料回答问题。\n问题：{question}" if hits else question
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]
