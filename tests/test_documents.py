"""Reading and splitting documents; importing datasets in every supported shape."""

import json

import pytest

from studio.data.records import read_dataset, write_jsonl_atomic
from studio.data.documents import SplitSettings, read_document, split_sections
from studio.data.normalize import dedup_key, normalize_question
from studio.errors import DataError
from conftest import SAMPLE_DOC


def test_sample_document_has_the_promised_shape():
    text = read_document(SAMPLE_DOC)
    sections = split_sections(text)
    assert 12 <= len(sections) <= 20
    assert all(s.chars >= 100 for s in sections)
    assert max(s.chars for s in sections) > 1000 and min(s.chars for s in sections) < 150
    assert "| 灯塔 | 所在区域 |" in text and "\n1. " in text and "\n- " in text
    assert [s.heading for s in sections][:3] == ["基本信息", "世界观", "守灯人"]


def test_split_by_headings_keeps_min_length_and_drops_duplicates():
    body = "内容" * 60
    text = f"# 标题\n\n## 甲\n{body}\n\n### 乙\n短\n\n## 丙\n{body}\n\n## 丁\n{body}\n#### 戊\n{body}\n"
    sections = split_sections(text, SplitSettings(min_chars=100))
    assert [s.heading for s in sections] == ["甲", "丁"]  # 乙 too short, 丙 repeats 甲; #### is not a level
    assert "#### 戊" in sections[1].text
    only_h3 = split_sections(f"## 甲\n{body}\n### 乙\n{body}X", SplitSettings(min_chars=10, levels=(3,)))
    assert [s.heading for s in only_h3] == ["乙"]


def test_no_headings_falls_back_to_paragraph_blocks():
    paragraphs = [f"第{i}段。" + "文字" * 30 for i in range(6)]
    sections = split_sections("\n\n".join(paragraphs), SplitSettings(min_chars=100))
    assert len(sections) >= 2
    assert "".join(s.text for s in sections).replace("\n", "") == "".join(paragraphs)


def test_long_section_is_cut_at_paragraph_boundaries():
    paragraphs = [f"段落{i}：" + "字" * 90 for i in range(10)]
    text = "## 长节\n\n" + "\n\n".join(paragraphs)
    sections = split_sections(text, SplitSettings(min_chars=50, max_chars=300))
    assert len(sections) > 3
    assert all(s.chars <= 300 for s in sections)
    assert all(s.text.startswith("## 长节") for s in sections)
    assert sections[0].heading.startswith("长节 (1/")
    for s in sections:  # every paragraph is whole in exactly one part
        for p in s.text.split("\n\n")[1:]:
            assert p in paragraphs


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"   \n\n", "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    (bytes([0x80, 0x81, 0xFF, 0xFE, 0x90]) * 50, "not valid text"),
])
def test_bad_documents_get_a_clear_message(tmp_path, content, message):
    path = tmp_path / "doc.md"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_document(path)
    assert "doc.md" in str(info.value)


def test_gb18030_document_is_read(tmp_path):
    path = tmp_path / "gbk.md"
    path.write_bytes("## 守灯人\n成为守灯人需要完成序章任务。".encode("gb18030"))
    assert "守灯人" in read_document(path)


GERMAN = "Köln liegt am Rhein. Die Straße zum Dom ist schön, die Brücke über den Fluss ist größer als üblich.\n\n"


def test_german_cp1252_is_read_as_german_not_gb18030(tmp_path):
    path = tmp_path / "koeln.md"
    path.write_bytes(("## Köln\n" + GERMAN * 3).encode("cp1252"))
    text = read_document(path)
    assert "Köln" in text and "Straße" in text and "größer" in text
    assert "鰈" not in text and "遝" not in text


@pytest.mark.parametrize("content, candidates", [
    ("Köln".encode("cp1252"), "gb18030"),  # four bytes: Latin or Chinese cannot be told apart
    (("Le garçon était très fâché, il a mangé un gâteau à la crème. Où est la forêt?\n" * 3).encode("cp1252"), "cp1252"),
])
def test_an_encoding_that_cannot_be_told_is_refused_with_the_candidates(tmp_path, content, candidates):
    path = tmp_path / "doc.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="save it as UTF-8") as info:
        read_document(path)
    assert "doc.txt is not UTF-8" in str(info.value) and candidates in str(info.value)


def test_utf16_with_bom_and_a_directory(tmp_path):
    path = tmp_path / "wide.md"
    path.write_bytes("## 守灯人\n雾灯岛".encode("utf-16"))
    assert read_document(path) == "## 守灯人\n雾灯岛"
    with pytest.raises(DataError, match="is a directory, not a document"):
        read_document(tmp_path)


def test_questions_are_normalised_and_near_duplicates_share_a_key():
    assert normalize_question("1. 我该怎么成为守灯人") == "我该怎么成为守灯人？"
    assert normalize_question("“如何锻造潮汐长枪。”") == "如何锻造潮汐长枪？"
    assert normalize_question("How do I forge it") == "How do I forge it?"
    assert dedup_key("我该怎么 成为守灯人？") == dedup_key("我该怎么成为守灯人?")
    assert dedup_key("我该怎么成为守灯人？") != dedup_key("我该怎样成为守灯人？")


def test_import_supports_studio_alpaca_and_messages(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"instruction": "问一", "output": "答一", "group": "g1"},
        {"instruction": "翻译", "input": "灯塔", "output": "lighthouse"},
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "问三"},
                      {"role": "assistant", "content": "答三"}]},
    ]) + "\n\n", encoding="utf-8")
    rows = read_dataset(path)
    assert rows == [
        {"instruction": "问一", "output": "答一", "group": "g1"},
        {"instruction": "翻译\n\n灯塔", "output": "lighthouse"},
        {"instruction": "问三", "output": "答三", "system": "S"},
    ]


@pytest.mark.parametrize("lines, message", [
    (['{"instruction": "a", "output": "b"}', '{"instruction": "c", "output": '], "bad.jsonl, line 2: not valid JSON"),
    (['{"instruction": "a"}'], "bad.jsonl, line 1: missing the field \"output\""),
    (['{"instruction": "a", "output": 42}'], "bad.jsonl, line 1: the field \"output\" has the wrong type: int"),
    (['{"instruction": "a", "output": " "}'], "bad.jsonl, line 1: the field \"output\" is empty"),
    (['["a", "b"]'], "bad.jsonl, item 1: expected a JSON object"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], "bad.jsonl, line 1: \"messages\" needs"),
])
def test_import_errors_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_dataset(path)
    assert message in str(info.value)


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    target = write_jsonl_atomic(tmp_path / "out.jsonl", [{"instruction": "问", "output": "答"}])
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    assert json.loads(target.read_text(encoding="utf-8")) == {"instruction": "问", "output": "答"}
