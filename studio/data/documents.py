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
    """Decode bytes as text: UTF-8, UTF-16 with a byte-order mark, else a charset detector's answer.

    The detector (charset-normalizer) is trusted only when every plausible encoding it finds gives the
    same text; otherwise the document is refused with the candidates named, because a wrong guess
    (German cp1252 read as GB18030, say) would silently turn every row into mojibake.
    """
    if not data.strip():
        raise DataError(f"{name} is empty: there is nothing to build a dataset from.")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return _normal_newlines(_decode_or_refuse(data, "utf-16", name))
    if b"\x00" in data[:4096]:
        raise DataError(f"{name} looks like a binary file (it contains NUL bytes). Give a Markdown or text file.")
    try:
        return _normal_newlines(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        pass
    return _normal_newlines(_detected_text(data, name))


# Encodings a text editor commonly saves in; among equally likely guesses these win over exotic ones.
COMMON_ENCODINGS = ("cp1252", "cp1250", "latin_1", "iso8859_15", "gb18030", "gbk", "gb2312", "big5", "shift_jis",
                    "euc_jp", "euc_kr", "cp949", "cp1251", "koi8_r")
CHAOS_MARGIN = 0.1  # guesses whose "chaos" (share of unlikely characters) is this close to the best tie


def _normal_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _decode_or_refuse(data: bytes, encoding: str, name: str) -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        raise DataError(f"{name} starts with a UTF-16 byte-order mark but is not valid UTF-16. "
                        "Save it as UTF-8 and try again.") from None
    if not _mostly_printable(text):
        raise DataError(f"{name} looks like a binary file. Give a Markdown or text file.")
    return text


def _detected_text(data: bytes, name: str) -> str:
    """The text in the one encoding the detector is sure of, or DataError naming the candidates."""
    from charset_normalizer import from_bytes

    matches = [m for m in from_bytes(data) if m.encoding not in ("utf_8", "utf_16", "utf_16_be", "utf_16_le",
                                                                  "utf_32", "utf_32_be", "utf_32_le")]
    if not matches:
        raise DataError(f"{name} is not valid text in UTF-8 or UTF-16, and no other encoding fits it. "
                        "Save it as UTF-8 and try again.")
    best = min(m.chaos for m in matches)
    plausible = [m for m in matches if m.chaos <= best + CHAOS_MARGIN]
    common = [m for m in plausible if m.encoding in COMMON_ENCODINGS] or plausible
    texts = {str(m) for m in common}
    if len(texts) == 1:
        text = texts.pop()
        if _mostly_printable(text):
            return text
    candidates = ", ".join(dict.fromkeys(m.encoding for m in common))
    raise DataError(f"{name} is not UTF-8, and its encoding cannot be told for sure: it could be {candidates}, "
                    "which give different text. Open it in an editor, save it as UTF-8 and try again.")


def _mostly_printable(text: str) -> bool:
    if not text:
        return False
    bad = sum(1 for ch in text if not (ch.isprintable() or ch in "\n\r\t"))
    return bad / len(text) < 0.01


def read_document(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a document. Give the path of a Markdown or text file in it.")
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


def keep_document(source: str | Path, data_dir: str | Path) -> Path:
    """An uploaded document saved in `data_dir` as UTF-8 Markdown or text under its own (cleaned) name, so a
    build's rows, the runs trained on them and a reloaded page point at a file that stays (uploads are
    deleted within the hour). A file there with the same text is reused; another text gets name_2, name_3..."""
    from studio.data.records import safe_name, write_text_atomic

    source = Path(source)
    text = read_document(source)
    suffix = ".txt" if source.suffix.lower() == ".txt" else ".md"
    stem = safe_name(source.stem)
    for n in range(1, 1000):
        path = Path(data_dir) / f"{stem}{suffix if n == 1 else f'_{n}{suffix}'}"
        if not path.exists():
            return write_text_atomic(path, text)
        if path.is_file() and read_document(path) == text:
            return path
    raise DataError(f"Could not find a free name for {source.name} in {data_dir}.")
