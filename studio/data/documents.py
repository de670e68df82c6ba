"""Read a private document and cut it into sections for the teacher.

Splitting follows the tutorial: a section starts at each `##` or `###` heading and runs to the next;
blocks shorter than a minimum are dropped and duplicates are removed. A document with no headings is
cut into paragraph blocks instead, and a section too long for the teacher is cut at paragraph
boundaries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from studio.errors import DataError

ENCODINGS = ("utf-8-sig", "gb18030", "big5", "utf-16")


@dataclass(frozen=True)
class SplitSettings:
    """How a document is cut into sections."""

    min_chars: int = field(default=100, metadata={"help": "Drop sections shorter than this (the tutorial keeps >= 100)."})
    levels: tuple[int, ...] = field(default=(2, 3), metadata={"help": "Heading levels that start a section (## and ###)."})
    max_chars: int = field(default=3000, metadata={"help": "Cut longer sections at paragraph boundaries."})

    MIN_MAX_CHARS = 200
    LIMIT = 1_000_000

    def __post_init__(self):
        if not (isinstance(self.min_chars, int) and 0 <= self.min_chars <= self.LIMIT):
            raise DataError(f"Shortest section kept must be between 0 and {self.LIMIT:,} characters (got {self.min_chars}).")
        if not (isinstance(self.max_chars, int) and self.MIN_MAX_CHARS <= self.max_chars <= self.LIMIT):
            raise DataError(f"Maximum section length must be between {self.MIN_MAX_CHARS} and {self.LIMIT:,} "
                            f"characters (got {self.max_chars}).")
        if any(level not in (1, 2, 3, 4, 5, 6) for level in self.levels):
            raise DataError(f"Heading levels must be 1 to 6 (got {list(self.levels)}).")


@dataclass(frozen=True)
class Section:
    index: int
    heading: str
    text: str

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def content_hash(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def first_line(self) -> str:
        body = [line for line in self.text.splitlines()[1:] if line.strip()] or self.text.splitlines()
        return body[0][:80] if body else ""


def decode_document(data: bytes, name: str) -> str:
    """Decode bytes as text, trying UTF-8 first and then common Chinese encodings."""
    if not data.strip():
        raise DataError(f"{name} is empty: there is nothing to build a dataset from.")
    if b"\x00" in data[:4096] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name} looks like a binary file (it contains NUL bytes). Give a Markdown or text file.")
    for encoding in ENCODINGS:
        try:
            text = data.decode(encoding)
        except UnicodeDecodeError:
            continue
        if _mostly_printable(text):
            return text.replace("\r\n", "\n").replace("\r", "\n")
    raise DataError(f"{name} is not valid text in UTF-8, GB18030, Big5 or UTF-16. Save it as UTF-8 and try again.")


def _mostly_printable(text: str) -> bool:
    if not text:
        return False
    bad = sum(1 for ch in text if not (ch.isprintable() or ch in "\n\r\t"))
    return bad / len(text) < 0.01


def read_document(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Document not found: {path}")
    return decode_document(path.read_bytes(), path.name)


def document_title(text: str, fallback: str) -> str:
    match = re.search(r"(?m)^#\s+(.+)$", text)
    return match.group(1).strip() if match else fallback


def split_sections(text: str, settings: SplitSettings = SplitSettings()) -> list[Section]:
    """Sections of at least `min_chars`, at most `max_chars`, without duplicates, in document order."""
    blocks = _heading_blocks(text, settings.levels) or _paragraph_blocks(text, settings)
    pieces: list[tuple[str, str]] = []
    for heading, block in blocks:
        pieces.extend(_cut_long(heading, block, settings.max_chars))
    seen: set[str] = set()
    sections: list[Section] = []
    for heading, block in pieces:
        body = block.split("\n", 1)[1] if block.lstrip().startswith("#") and "\n" in block else block
        key = re.sub(r"\s+", "", body)
        if len(block) < settings.min_chars or key in seen:
            continue
        seen.add(key)
        sections.append(Section(len(sections), heading, block))
    return sections


def _heading_blocks(text: str, levels: tuple[int, ...]) -> list[tuple[str, str]]:
    if not levels:
        return []
    hashes = "|".join("#" * level for level in sorted(levels, reverse=True))
    matches = list(re.finditer(rf"(?m)^({hashes})\s+(.+)$", text))
    blocks = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        blocks.append((match.group(2).strip(), text[match.start():end].strip()))
    return blocks


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def _paragraph_blocks(text: str, settings: SplitSettings) -> list[tuple[str, str]]:
    """Without headings: consecutive paragraphs joined until a block reaches `min_chars`."""
    blocks, current = [], ""
    for paragraph in _paragraphs(text):
        current = f"{current}\n\n{paragraph}" if current else paragraph
        if len(current) >= settings.min_chars:
            blocks.append(current)
            current = ""
    if current:
        if blocks and len(blocks[-1]) + len(current) <= settings.max_chars:
            blocks[-1] = f"{blocks[-1]}\n\n{current}"
        else:
            blocks.append(current)
    return [(block.splitlines()[0][:40], block) for block in blocks]


def _cut_long(heading: str, block: str, max_chars: int) -> list[tuple[str, str]]:
    """Cut a block longer than `max_chars` at paragraph boundaries; parts repeat the heading line."""
    if len(block) <= max_chars:
        return [(heading, block)]
    lines = block.split("\n", 1)
    head_line = lines[0] if lines[0].lstrip().startswith("#") else ""
    body = lines[1] if head_line and len(lines) > 1 else block
    parts, current = [], ""
    room = max(max_chars - len(head_line) - 2, max_chars // 2, 1)  # a very long heading line still leaves room
    for paragraph in _paragraphs(body):
        for chunk in _hard_wrap(paragraph, room):
            if current and len(current) + len(chunk) + 2 > room:
                parts.append(current)
                current = chunk
            else:
                current = f"{current}\n\n{chunk}" if current else chunk
    if current:
        parts.append(current)
    total = len(parts)
    return [(f"{heading} ({i}/{total})", f"{head_line}\n\n{part}".strip()) for i, part in enumerate(parts, 1)]


def _hard_wrap(paragraph: str, limit: int) -> list[str]:
    """A single paragraph longer than the limit is cut at sentence ends, then anywhere.

    The limit is at least 1 character: a heading line longer than the section limit leaves a
    non-positive room, which would otherwise never shorten a sentence.
    """
    limit = max(int(limit), 1)
    if len(paragraph) <= limit:
        return [paragraph]
    sentences = re.split(r"(?<=[。！？!?\.])", paragraph)
    chunks, current = [], ""
    for sentence in sentences:
        while len(sentence) > limit:
            chunks.append(sentence[:limit])
            sentence = sentence[limit:]
        if len(current) + len(sentence) > limit:
            chunks.append(current)
            current = sentence
        else:
            current += sentence
    if current:
        chunks.append(current)
    return [c for c in chunks if c]
