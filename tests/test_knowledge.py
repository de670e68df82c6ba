"""Knowledge, not recitation: the exam kept apart, fact-level data, document rows, the fourth column,
the key-fact report, and the knowledge bench's mechanics (tiny model, CPU, fake teacher)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fake_teacher import Behaviour, FakeTeacher
from studio.data.builder import BuildSettings
from studio.data.records import read_dataset
from studio.data.documents import split_sections
from studio.data.exam import exam_beside, exam_rows, parse_exam
from studio.data.normalize import dedup_key
from studio.data.parsing import parse_variants
from studio.data.service import start_build
from studio.data.teacher import RetryPolicy, TeacherConfig
from studio.errors import DataError
from studio.ui.i18n import translate
from studio.evaluate import service
from studio.evaluate.keys import clean_keys, key_hit, normalize_key
from studio.evaluate.knowledge import NO_KEYS_NOTE, annotate
from studio.evaluate.report import BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL, format_table, recitation_warnings
from studio.jobs import JobBoard, JobStatus
from studio.model.generation import GenerationSettings
from studio.model.manager import ModelManager
from studio.config import StudioPaths
from studio.train.job import RunRequest
from studio.train.service import load_request, new_run_dir, start_training
from studio.train.settings import LoraSettings, TrainSettings
from test_builder import KEY, SMALL_DOC

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = "你是小岛领域助手，回答准确、简明。"
ENGLISH_DOC = "# Harbour\n\n" + "\n\n".join(
    f"## Pier {i}\nPier {i} holds lighthouse number {i}; the keeper there is called Warden{i} and sails at dawn. " * 3
    for i in range(3))


@pytest.fixture()
def teacher():
    server = FakeTeacher().start()
    yield server
    server.stop()


def build(paths, doc: Path, teacher, **overrides):
    settings = BuildSettings(**{"variants": 3, "retry": RetryPolicy(3, 0.05), **overrides})
    board = JobBoard()
    job = start_build(board, ModelManager(), paths, doc, settings, TeacherConfig(teacher.base_url, "teacher-x", KEY, 2.0))
    return board.wait(job, 60)


@pytest.fixture()
def island(tmp_path) -> Path:
    path = tmp_path / "island.md"
    path.write_text(SMALL_DOC, encoding="utf-8")
    return path


# ----- the exam and fact-level data from the builder ---------------------------------------------
def test_facts_build_writes_short_pairs_reworded_answers_and_an_exam(workspace, island, teacher):
    job = build(workspace, island, teacher, exam=2)  # style facts is the default
    assert job.status is JobStatus.DONE, job.error
    result = job.result
    rows = read_dataset(result["dataset_path"])
    base = [r for r in rows if r["kind"] == "base"]
    assert len(base) == 4 * 2  # about one fact per 150 characters: 2 for these ~100-character sections
    assert all(len(r["output"]) < 40 for r in base)  # short, one fact each
    reworded = [r for r in rows if r.get("reworded")]
    assert reworded and all(r["output"].startswith("换句话说") for r in reworded)
    assert any(r["kind"] == "paraphrase" and not r.get("reworded") for r in rows)
    # the exam: beside the dataset, same timestamp, kind exam, keys normalised and found in the section
    exam_path = Path(result["exam_path"])
    assert exam_path.name == Path(result["dataset_path"]).name.replace("_dataset_", "_exam_")
    assert exam_beside(result["dataset_path"]) == exam_path
    exam = read_dataset(exam_path)
    assert result["exam_questions"] == len(exam) == 4 * 2
    sections = {s.heading: s.text for s in split_sections(SMALL_DOC)}
    for row in exam:
        assert row["kind"] == "exam" and row["section"] in sections and row["keys"]
        assert all(key == normalize_key(key) and key in normalize_key(sections[row["section"]]) for key in row["keys"])
    # never a training phrasing; the teacher's copy of a training question and its invented key were dropped
    trained = {dedup_key(r["instruction"]) for r in rows}
    assert not any(dedup_key(r["instruction"]) in trained for r in exam)
    assert result["exam_dropped"] == {"rephrasing": 4, "no_keys": 4}
    saved = next(e["message"] for e in job.events_since(0)[0] if e["message"].startswith("exam saved"))
    assert saved.endswith("(dropped: 4 too close to a training question, 4 without key facts found in the section)")
    assert translate(saved, "zh").endswith("（丢弃：4 道与训练问题过于相近，4 道在章节中找不到关键事实）")
    assert not any(r["kind"] == "exam" for r in rows)
    # the exam prompt showed the teacher the section's training questions
    exam_calls = [h for h in teacher.hits if '{"exam"' in h["messages"][0]["content"]]
    assert len(exam_calls) == 4
    assert any(base[0]["instruction"].rstrip("？") in call["messages"][1]["content"] for call in exam_calls)


def test_journal_keys_include_the_style(workspace, island, teacher):
    first = build(workspace, island, teacher)
    assert first.status is JobStatus.DONE and first.result["cached_calls"] == 0
    again = build(workspace, island, teacher)
    assert again.result["calls"] == 0 and again.result["cached_calls"] == first.result["calls"]
    tutorial = build(workspace, island, teacher, style="tutorial")
    assert tutorial.status is JobStatus.DONE and tutorial.result["cached_calls"] == 0  # no facts reply reused
    assert all(r["output"].startswith("第") for r in read_dataset(tutorial.result["dataset_path"]))


def test_english_document_gets_english_facts_and_exam_prompts(workspace, tmp_path, teacher):
    doc = tmp_path / "harbour.md"
    doc.write_text(ENGLISH_DOC, encoding="utf-8")
    job = build(workspace, doc, teacher, exam=1)
    assert job.status is JobStatus.DONE, job.error
    systems = [h["messages"][0]["content"] for h in teacher.hits]
    assert any("fact-level question/answer" in s for s in systems)
    assert any(s.startswith("Output strictly a JSON object") for s in systems)
    assert any("You write an exam" in s for s in systems)
    assert job.result["exam_questions"] == 3


def test_facts_build_survives_teacher_faults(workspace, island, teacher):
    teacher.then(Behaviour("fenced"), Behaviour("prose"), Behaviour("wrong_schema"), Behaviour("empty"),
                 Behaviour("status", 500))
    job = build(workspace, island, teacher, exam=1)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["base_pairs"] == 8 and job.result["exam_questions"] == 4
    assert job.result["retries"] >= 3


def test_parse_variants_reads_questions_and_reworded_answers_from_any_shape():
    reply = json.dumps({"variants": [{"question": "灯塔在哪？", "answer": "在码头旁。"}, {"question": "灯塔位置？"},
                                     "灯塔位于何处？"]}, ensure_ascii=False)
    expected = [{"instruction": "灯塔在哪？", "output": "在码头旁。"}, {"instruction": "灯塔位置？"},
                {"instruction": "灯塔位于何处？"}]
    assert parse_variants(reply).items == expected
    assert parse_variants(f"```json\n{reply}\n```").items == expected
    assert parse_variants(f"好的：{reply}谢谢").items == expected
    cut = parse_variants(reply[:60], "length")
    assert cut.items == expected[:1] and cut.problem == "truncated"
    assert parse_variants('{"paraphrases": ["问法一", "问法二"]}').items == [{"instruction": "问法一"}, {"instruction": "问法二"}]
    assert parse_variants('{"note": 1}').problem == "wrong_schema" and parse_variants("").problem == "empty"


def test_exam_parsing_keys_and_the_rephrasing_filter():
    reply = '```json\n{"exam":[{"question":"铁匠叫什么？","answer":"石阿满。","keys":["石 阿满"]},' \
            '{"q":"锻造要几枚灯贝？","a":"３００枚。","关键词":"３００枚灯贝"}]}\n```'
    items = parse_exam(reply).items
    assert [i["keys"] for i in items] == [["石 阿满"], ["３００枚灯贝"]]
    assert clean_keys(["３００枚、灯贝!", " 石阿满 "]) == ["300枚灯贝", "石阿满"]
    section = "## 铁匠\n铁匠石阿满锻造潮汐长枪，收300枚灯贝。"
    rows, dropped = exam_rows(items + [{"instruction": "铁匠的名字是什么？", "output": "石阿满", "keys": ["石阿满"]},
                                       {"instruction": "谁是铁匠", "output": "x", "keys": ["不存在"]}],
                              "铁匠", section, ["铁匠的名字是什么"])
    assert [r["instruction"] for r in rows] == ["铁匠叫什么？", "锻造要几枚灯贝？"]
    assert rows[1]["keys"] == ["300枚灯贝"] and dropped == {"rephrasing": 1, "no_keys": 1}
    assert key_hit("他叫 石阿满！", ["石阿满"]) == 1.0 and key_hit("ABC", ["abc", "d"]) == 0.5 and key_hit("x", []) is None


# ----- training: the exam is never trained on; document rows ------------------------------------
def _facts_dataset(folder: Path, stamp: str = "20260101_000000") -> tuple[Path, Path]:
    rows, exam = [], []
    for g in range(3):
        answer = f"第{g}号灯塔在{g}号码头旁，守灯人叫阿{g}。"
        for k in range(5):
            rows.append({"instruction": f"第{g}号灯塔在哪里（问法{k}）？", "output": answer, "group": f"s{g:02d}-q1",
                         "kind": "base" if k == 0 else "paraphrase", "section": f"第{g}节"})
        exam.append({"instruction": f"第{g}号灯塔的守灯人叫什么？", "output": f"阿{g}", "keys": [f"阿{g}"],
                     "section": f"第{g}节", "kind": "exam"})
    dataset = folder / f"island_dataset_{stamp}.jsonl"
    exam_path = folder / f"island_exam_{stamp}.jsonl"
    leaked = [dict(exam[0])]  # an exam row that found its way into the dataset: dropped, never trained on
    dataset.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows + leaked), encoding="utf-8")
    exam_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in exam), encoding="utf-8")
    return dataset, exam_path


FAST = dict(learning_rate=5e-3, epochs=1.0, max_steps=6, batch_size=4, grad_accum=1, save_every=0)


def test_an_exam_given_as_the_dataset_is_refused_before_the_model_is_taken(tmp_path):
    _, exam = _facts_dataset(tmp_path)
    manager = ModelManager()  # no model: the refusal must come first, naming the file
    request = RunRequest(exam, SYSTEM, LoraSettings(), TrainSettings(**FAST), tmp_path / "run")
    with pytest.raises(DataError, match=r"island_exam_20260101_000000\.jsonl is an exam"):
        start_training(JobBoard(), manager, request)
    dataset, _ = _facts_dataset(tmp_path, "20260101_000001")
    missing = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(**FAST), tmp_path / "run2",
                         exam=tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="Exam file not found"):
        start_training(JobBoard(), manager, missing)


@pytest.fixture(scope="module")
def knowledge_run(tiny_model_dir, tmp_path_factory):
    """A run on a dataset with a leaked exam row, its exam found beside it, and document rows."""
    from studio.model.loading import ModelSpec

    root = tmp_path_factory.mktemp("knowledge")
    paths = StudioPaths(root / "data", root / "runs").ensure()
    dataset, exam = _facts_dataset(paths.data_dir)
    doc = paths.data_dir / "island.md"
    doc.write_text(SMALL_DOC, encoding="utf-8")
    manager = ModelManager()
    manager.load(ModelSpec(str(tiny_model_dir)))
    board = JobBoard()
    request = RunRequest(dataset, SYSTEM, LoraSettings(), TrainSettings(**FAST), new_run_dir(paths.runs_dir, "island"),
                         document=doc)
    job = board.wait(start_training(board, manager, request), 300)
    assert job.status is JobStatus.DONE, job.error
    yield {"manager": manager, "paths": paths, "run": Path(job.result["run_dir"]), "job": job, "dataset": dataset,
           "exam": exam, "doc": doc}
    manager.unload()


def test_exam_rows_are_dropped_document_rows_added_and_both_recorded(knowledge_run):
    run, exam, doc = knowledge_run["run"], knowledge_run["exam"], knowledge_run["doc"]
    train = read_dataset(run / "train_split.jsonl")
    heldout = read_dataset(run / "heldout.jsonl")
    assert not any(r.get("kind") == "exam" for r in train + heldout)
    asked = {dedup_key(r["instruction"]) for r in read_dataset(exam)}
    assert not any(dedup_key(r["instruction"]) in asked for r in train + heldout)
    documents = [r for r in train if r["kind"] == "document"]
    assert [r["instruction"] for r in documents] == [f"介绍一下《小岛》中的「第{i}节」。" for i in range(4)]
    assert documents[0]["output"].startswith("第0节的事实：") and not any(r["kind"] == "document" for r in heldout)
    messages = [e["message"] for e in knowledge_run["job"].events_since(0)[0] if e["type"] == "log"]
    assert any("1 exam rows were dropped" in m for m in messages)
    assert any("4 document rows added" in m for m in messages)
    meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
    assert meta["exam"] == str(exam) and meta["exam_sha256"] == hashlib.sha256(exam.read_bytes()).hexdigest()
    assert meta["dataset_sha256"] == hashlib.sha256(knowledge_run["dataset"].read_bytes()).hexdigest()
    assert meta["exam_questions"] == 3 and (run / "exam.jsonl").read_bytes() == exam.read_bytes()
    assert meta["document"] == str(doc) and meta["document_rows"] == 4
    assert meta["document_sha256"] == hashlib.sha256(doc.read_bytes()).hexdigest()
    resumed = load_request(run)  # a resume keeps the exam and the document
    assert resumed.exam == exam and resumed.document == doc


def test_report_offers_the_exam_first_with_four_columns_and_key_facts(knowledge_run):
    manager, run = knowledge_run["manager"], knowledge_run["run"]
    board = JobBoard()
    job = board.wait(service.start_report(board, manager, run, None, str(knowledge_run["doc"]),
                                          GenerationSettings.greedy(16)), 300)
    assert job.status is JobStatus.DONE, job.error
    report = job.result
    assert report["question_set"] == "exam" and len(report["rows"]) == 3
    assert set(report["summary"]) == {BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL}
    for column, item in report["summary"].items():
        entries = [r["columns"][column] for r in report["rows"]]
        assert item["key_hit"] == round(sum(e["key_hit"] for e in entries) / 3, 4)
        assert item["key_right"] == round(sum(e["key_right"] for e in entries) / 3, 4)
    row = report["rows"][0]
    assert row["keys"] == ["阿0"] and row["section"] == "第0节" and row["best"]
    assert row["columns"][TUNED_RETRIEVAL]["key_hit"] == key_hit(row["columns"][TUNED_RETRIEVAL]["answer"], ["阿0"])
    assert [s["section"] for s in report["sections"]] == ["第0节", "第1节", "第2节"]
    assert all(s["questions"] == 1 and TUNED in s for s in report["sections"])
    assert set(report["recitation"]) >= {"training_char_f1", "heldout_char_f1", "exam_char_f1"}
    # the progress counts the 3 exam questions, then each recitation set apart; the bar covers all of them
    progress = [e for e in job.events_since(0)[0] if e["type"] == "progress"]
    assert [e["message"] for e in progress[:3]] == ["1/3 questions", "2/3 questions", "3/3 questions"]
    assert progress[3]["message"].startswith("recitation check: 1/") and progress[-1]["done"] == progress[-1]["total"]
    assert progress[2]["total"] == progress[-1]["total"] > 3
    assert report["keys_note"] == ""
    assert "key hit" in format_table(report) and "per section" in format_table(report)
    csv_header = Path(report["files"][1]).read_text(encoding="utf-8").splitlines()[0]
    assert "key_hit" in csv_header and "confused_with" in csv_header and "best" in csv_header


def test_report_without_keys_says_so(knowledge_run):
    manager, run = knowledge_run["manager"], knowledge_run["run"]
    board = JobBoard()
    questions = [{"instruction": "第1号灯塔在哪里？", "output": "在1号码头旁。"}]
    job = board.wait(service.start_report(board, manager, run, questions, None, GenerationSettings.greedy(8)), 300)
    assert job.status is JobStatus.DONE, job.error
    assert job.result["keys_note"] == NO_KEYS_NOTE and job.result["sections"] == []
    assert job.result["rows"][0]["columns"][TUNED]["key_hit"] is None
    assert "no key facts" in format_table(job.result)


def test_key_facts_confusion_best_column_and_section_tally():
    rows = [
        {"question": "q0", "reference": "阿零", "section": "A", "keys": ["阿零"], "columns": {
            BASE: {"answer": "不知道", "char_f1": 0.0}, TUNED: {"answer": "守灯人是阿壹", "char_f1": 0.3},
            TUNED_RETRIEVAL: {"answer": "阿零", "char_f1": 1.0}}},
        {"question": "q1", "reference": "阿壹", "section": "B", "keys": ["阿壹"], "columns": {
            BASE: {"answer": "x", "char_f1": 0.0}, TUNED: {"answer": "阿壹", "char_f1": 1.0},
            TUNED_RETRIEVAL: {"answer": "阿壹。", "char_f1": 1.0}}},
    ]
    knowledge = annotate(rows)
    assert rows[0]["columns"][TUNED]["confused_with"] == ["B"]  # it recited section B's fact
    assert rows[0]["columns"][BASE]["confused_with"] == [] and rows[0]["best"] == TUNED_RETRIEVAL
    assert rows[1]["best"] == f"{TUNED} = {TUNED_RETRIEVAL}"
    assert knowledge["summary"][TUNED] == {"key_hit": 0.5, "key_right": 0.5, "confused": 1}
    assert knowledge["sections"] == [{"section": "A", "questions": 1, BASE: 0, TUNED: 0, TUNED_RETRIEVAL: 1},
                                     {"section": "B", "questions": 1, BASE: 0, TUNED: 1, TUNED_RETRIEVAL: 1}]


def test_recitation_warning_compares_the_three_sets_separately():
    assert recitation_warnings({"training": 0.9, "heldout": 0.85, "exam": 0.85}) == []
    only_exam = recitation_warnings({"training": 0.97, "heldout": 0.95, "exam": 0.4})
    assert len(only_exam) == 1 and "the exam (questions never trained on) only 0.40" in only_exam[0]
    both = recitation_warnings({"training": 0.97, "heldout": 0.5, "exam": 0.2})
    assert "reciting the training questions" in both[0] and "Held-out phrasings score 0.50" in both[1]


# ----- the command line --------------------------------------------------------------------------
def test_cli_builds_an_exam_and_train_takes_document_and_exam(tmp_path, teacher, monkeypatch):
    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    doc = tmp_path / "island.md"
    doc.write_text(SMALL_DOC, encoding="utf-8")
    result = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "build-dataset",
                             "--doc", str(doc), "--base-url", teacher.base_url, "--model", "teacher-x", "--variants",
                             "2", "--exam", "1", "--style", "facts"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Exam: 4 questions, never trained on." in result.stdout
    assert len(list((tmp_path / "data").glob("island_exam_*.jsonl"))) == 1
    import studio as _  # noqa: F401
    sys.path.insert(0, str(ROOT))
    from importlib import util

    spec = util.spec_from_file_location("studio_cli", ROOT / "studio.py")
    cli = util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args(["train", "--dataset", "d.jsonl", "--document", "doc.md", "--exam", "e.jsonl"])
    assert (args.document, args.exam) == ("doc.md", "e.jsonl")
    assert cli.build_parser().parse_args(["build-dataset", "--doc", "x"]).style == "facts"
    assert cli.build_parser().parse_args(["build-dataset", "--doc", "x"]).exam == 0


# ----- the bench's mechanics ---------------------------------------------------------------------
def test_knowledge_bench_smoke_runs_on_the_tiny_model(tmp_path):
    dataset, exam = _facts_dataset(tmp_path)
    doc = tmp_path / "island.md"
    doc.write_text(SMALL_DOC, encoding="utf-8")
    results = tmp_path / "results"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "knowledge.py"), "--tiny", "--doc", str(doc),
                          "--dataset", str(dataset), "--exam", str(exam), "--document-rows", "--max-steps", "2",
                          "--max-new-tokens", "8", "--results", str(results), "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    [json_file] = results.glob("knowledge-tiny-*.json")
    payload = json.loads(json_file.read_text(encoding="utf-8"))
    assert payload["tiny"] and payload["exam_questions"] == 3
    assert [(r["dataset"], r["document_rows"]) for r in payload["results"]] == [(dataset.name, False), (dataset.name, True)]
    assert set(payload["results"][0]["columns"]) == {BASE, RETRIEVAL, TUNED, TUNED_RETRIEVAL}
    table = json_file.with_suffix(".md").read_text(encoding="utf-8")
    assert "These numbers mean nothing" in table and table.count("| island_dataset_") == 2


# ----- the tabs ----------------------------------------------------------------------------------
def test_tabs_build_an_exam_train_with_document_rows_and_report_on_the_exam(knowledge_run, teacher, monkeypatch):
    from gradio_client import Client

    from studio.data.builder import DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT
    from studio.services import Services
    from uihelpers import handler, launched

    monkeypatch.setenv("STUDIO_TEACHER_API_KEY", KEY)
    services = Services(manager=knowledge_run["manager"], paths=knowledge_run["paths"])
    doc = str(knowledge_run["doc"])
    with launched(services) as url:
        client = Client(url, verbose=False)
        client.predict(None, Path(doc).name, "isle", 100, 3000, ["##", "###"], False, teacher.base_url, "teacher-x", "", "auto",
                       2, 8, DEFAULT_PAIR_PROMPT, DEFAULT_PARAPHRASE_PROMPT, 0.2, 600, 3, 10, "facts", 1,
                       api_name="/build_dataset")
        built = services.jobs.wait(services.jobs.latest("dataset"), 60)
        assert built.status is JobStatus.DONE and built.result["exam_questions"] == 4
        assert any("事实问答" in h["messages"][0]["content"] for h in teacher.hits)
        dataset = built.result["dataset_path"]
        settings = [5e-3, 1, 4, 4, 1, 0.03, 512, 0, 1, 42, False, False]
        # the Train tab does not offer the exam; the server refuses it too
        lists = handler(services, "refresh_lists")
        offered = lists()[0]["choices"]
        assert Path(dataset).name in str(offered) and Path(built.result["exam_path"]).name not in str(offered)
        # an empty dataset box (the page was made before the build) gets the newest dataset, never the exam;
        # a picked one stays
        assert lists(None)[0]["value"] == Path(dataset).name and "value" not in lists("other.jsonl")[0]
        with pytest.raises(Exception, match="is an exam"):  # the exam is never trained on
            client.predict(Path(built.result["exam_path"]).name, "exam-run", SYSTEM, ["q_proj"], 8, 16, 0.05, False, None,
                           *settings, api_name="/start_training")
        started = client.predict(Path(dataset).name, "doc-run", SYSTEM, ["q_proj"], 8, 16, 0.05, True, None, *settings,
                                 api_name="/start_training")
        assert started.startswith("Training started: doc-run_")
        job = services.jobs.wait(services.jobs.latest("train"), 300)
        assert job.status is JobStatus.DONE, job.error
        run = Path(job.result["run_dir"])
        meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
        assert meta["exam"] == built.result["exam_path"] and meta["document"] == str(Path(doc).resolve())
        assert meta["document_rows"] == 4
        client.predict(run.name, "exam", None, True, Path(doc).name, 1, "greedy", 16, "", "", "",
                       api_name="/run_report")
        report = services.jobs.wait(services.jobs.latest("report"), 300)
        assert report.status is JobStatus.DONE, report.error
        assert report.result["question_set"] == "exam" and len(report.result["rows"]) == 4
        assert report.result["summary"][TUNED_RETRIEVAL]["key_hit"] is not None
        # an exam question picked in Compare shows its reference and key facts, in the page's words
        pick = handler(services, "pick_exam_question")
        exam_row = report.result["rows"][0]
        question, reference = pick(0, run.name)
        assert question == exam_row["question"] and reference.startswith(f"**Reference answer:** {exam_row['reference']}")
        assert reference.endswith(" · key facts: " + ", ".join(exam_row["keys"])), reference
