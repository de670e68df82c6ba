"""The document itself as training rows: one row per section, mixed with the question/answer rows.

Training on a document's text alone lowers its perplexity without teaching the model to answer
questions about it; mixed with question/answer rows it helps (instruction tuning before or while the
documents are learned absorbs more knowledge than documents first). Each section becomes a row
"介绍一下《<title>》中的「<heading>」。" (or its English form) -> the section's text.
"""

from __future__ import annotations

from pathlib import Path

from studio.data.documents import SplitSettings, document_title, read_document, split_sections
from studio.data.styles import document_language

DOCUMENT_KIND = "document"
DOCUMENT_PROMPT = {"zh": "介绍一下《{title}》中的「{heading}」。", "en": "Describe \"{heading}\" from {title}."}


def _body(text: str) -> str:
    """The section without its Markdown heading line (the question already names it)."""
    lines = text.strip().split("\n", 1)
    return lines[1].strip() if lines[0].lstrip().startswith("#") and len(lines) > 1 and lines[1].strip() else text.strip()


def document_rows(path: str | Path, settings: SplitSettings = SplitSettings()) -> list[dict]:
    """One training row per section of the document at `path` (kind "document", no group: never held out)."""
    path = Path(path)
    text = read_document(path)
    title, language = document_title(text, path.stem), document_language(text)
    return [{"instruction": DOCUMENT_PROMPT[language].format(title=title, heading=section.heading),
             "output": _body(section.text), "kind": DOCUMENT_KIND, "section": section.heading,
             "source": str(path.resolve())}
            for section in split_sections(text, settings)]
