"""Crash safety: runs and builds killed at any point resume to the same result, with nothing counted twice.

In-process tests damage a stopped run the way a kill does (steps logged after the last checkpoint, a torn
log line, a half-written checkpoint); subprocess tests SIGKILL a real `studio.py train` / `build-dataset`
at random moments and resume each to completion.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pytest
from transformers import TrainerCallback

from studio.jobs import JobBoard, JobStatus
from studio.model.manager import ModelState
from studio.train.job import PROGRESS_FILE, last_complete_checkpoint
from studio.train.service import load_request, start_training
from test_training import FACTS, StopAt, greedy, request, write_dataset

ROOT = Path(__file__).resolve().parent.parent


def metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


def test_resume_after_a_kill_cuts_the_logs_falls_back_and_sums_the_time(manager, tmp_path, workspace):
    dataset = write_dataset(tmp_path / "facts.jsonl")
    board, holder = JobBoard(), []
    req = request(dataset, workspace, save_every=2)
    job = start_training(board, manager, req, extra_callbacks=(StopAt(holder, 7),))
    holder.append(job)
    board.wait(job, 300)
    assert job.status is JobStatus.CANCELLED and last_complete_checkpoint(req.run_dir).name == "checkpoint-7"
    run = req.run_dir
    # what a kill -9 after step 9 leaves: no studio.json, steps 8-9 logged, a torn line, the last
    # checkpoint's trainer_state.json cut short
    (run / "studio.json").unlink()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as log:
        log.write('{"step": 8, "loss": 1.0}\n{"step": 9, "loss": 1.0}\n{"step": 10, "lo')
    with open(run / "events.jsonl", "a", encoding="utf-8") as log:
        log.write('{"type": "metric", "step": 9, "loss": 1.0, "message": ""}\n{"type": "progr')
    state = run / "checkpoints" / "checkpoint-7" / "trainer_state.json"
    state.write_text(state.read_text(encoding="utf-8")[:100], encoding="utf-8")
    earlier = json.loads((run / "checkpoints" / "checkpoint-6" / PROGRESS_FILE).read_text())["duration_s"]
    assert earlier > 0

    resumed = board.wait(start_training(board, manager, load_request(run)), 300)
    assert resumed.status is JobStatus.DONE, resumed.error
    steps = metric_steps(run)
    assert steps == list(range(1, 46))  # continuous, nothing twice
    meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
    assert meta["resumed_from"] == 6 and meta["steps"] == 45
    assert meta["duration_s"] > earlier
    assert (run / "checkpoints" / "damaged-checkpoint-7").is_dir()
    events = [json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    log = " ".join(e.get("message", "") for e in events)
    assert "checkpoint-7 cannot be resumed from (trainer_state.json is damaged" in log
    assert "metrics.jsonl: its last line was cut short" in log
    metric_events = [e["step"] for e in events if e["type"] == "metric" and "loss" in e]
    assert metric_events == list(range(1, 46))


def test_a_torn_metrics_line_does_not_fail_a_finished_run(manager, tmp_path, workspace):
    class TearMetrics(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            with open(Path(args.output_dir).parent / "metrics.jsonl", "a", encoding="utf-8") as log:
                log.write('{"step": 99, "lo')

    dataset = write_dataset(tmp_path / "facts.jsonl")
    board = JobBoard()
    job = board.wait(start_training(board, manager, request(dataset, workspace, max_steps=3),
                                    extra_callbacks=(TearMetrics(),)), 300)
    assert job.status is JobStatus.DONE, job.error
    run = Path(job.result["run_dir"])
    assert (run / "studio.json").is_file() and (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert any("last line was cut short" in e["message"] for e in job.events_since(0)[0])


def test_out_of_memory_drops_the_trainer_before_memory_is_freed(manager, tmp_path, workspace, monkeypatch):
    import gc

    import studio.train.job as job_module

    refs, alive_at_free = [], []

    class RaiseOOM(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 2:
                import torch

                refs.append(weakref.ref(optimizer))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def checking_free_memory():
        gc.collect()
        alive_at_free.append([ref() is not None for ref in refs])

    monkeypatch.setattr(job_module, "free_memory", checking_free_memory)
    dataset = write_dataset(tmp_path / "facts.jsonl")
    board = JobBoard()
    job = board.wait(start_training(board, manager, request(dataset, workspace), extra_callbacks=(RaiseOOM(),)), 300)
    assert job.status is JobStatus.FAILED and job.error.startswith("Out of GPU memory")
    assert alive_at_free and alive_at_free[-1] == [False]  # the optimizer was gone when memory was freed
    assert manager.status().state is ModelState.READY and greedy(manager, FACTS[0][0])


# ----- real processes killed with SIGKILL -----------------------------------------------------------

def _as_from_a_terminal() -> None:
    """The child takes Ctrl-C as a terminal's process does, whatever the test runner's thread blocked or ignored
    (a SIGINT sent to a child started from such a thread was once lost, and its run trained to the end)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def studio_process(*args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "studio.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_as_from_a_terminal)


def kill_when(process: subprocess.Popen, ready, extra_delay: float, timeout: float = 240) -> None:
    """SIGKILL `process` `extra_delay` seconds after `ready()` first holds (or when it has ended anyway)."""
    deadline = time.time() + timeout
    while process.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(extra_delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)


def complete_lines(path: Path) -> int:
    if not path.is_file():
        return 0
    return path.read_bytes().count(b"\n")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_training_killed_at_random_resumes_to_the_same_run(tiny_model_dir, tmp_path, seed):
    rng = random.Random(seed)
    dataset = write_dataset(tmp_path / "facts.jsonl")
    run = tmp_path / "runs" / "killed"
    max_steps, save_every = 12, rng.choice((1, 2))
    target = rng.randint(3, max_steps - 2)
    first = studio_process("--workdir", str(tmp_path), "train", "--model", str(tiny_model_dir), "--dataset", str(dataset),
                           "--output", str(run), "--max-steps", str(max_steps), "--save-every", str(save_every),
                           "--lr", "5e-3", "--batch-size", "4", "--grad-accum", "1")
    kill_when(first, lambda: complete_lines(run / "metrics.jsonl") >= target, rng.uniform(0, 0.3))
    assert first.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run / "studio.json").exists()
    resumed = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "train",
                              "--model", str(tiny_model_dir), "--resume", str(run)], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Traceback" not in resumed.stdout + resumed.stderr
    assert metric_steps(run) == list(range(1, max_steps + 1))
    meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
    assert meta["status"] == "completed" and meta["steps"] == max_steps and meta["resumed_from"] >= 1
    events = [json.loads(line) for line in (run / "events.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in events if e["type"] == "metric" and "loss" in e] == list(range(1, max_steps + 1))


def test_ctrl_c_stops_a_training_run_and_keeps_its_adapter(tiny_model_dir, tmp_path):
    """Ctrl-C once ended the process while the training thread ran ('terminate called without an active
    exception'): nothing after the last checkpoint was kept. Now it stops the run as the Stop button does."""
    dataset = write_dataset(tmp_path / "facts.jsonl")
    run = tmp_path / "runs" / "interrupted"
    process = studio_process("--workdir", str(tmp_path), "train", "--model", str(tiny_model_dir), "--dataset",
                             str(dataset), "--output", str(run), "--max-steps", "400", "--save-every", "100",
                             "--lr", "5e-3", "--batch-size", "4", "--grad-accum", "1")
    deadline = time.time() + 240
    while process.poll() is None and complete_lines(run / "metrics.jsonl") < 3 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 130, output
    assert "Ctrl-C: stopping" in output and "Traceback" not in output and "terminate called" not in output
    meta = json.loads((run / "studio.json").read_text(encoding="utf-8"))
    assert 3 <= meta["steps"] < 400 and (run / "adapter_model.safetensors").is_file()


BUILD_DOC = "# 小岛\n\n" + "\n\n".join(f"## 第{i}节\n" + f"第{i}节的事实：灯塔{i}号在岛的{i}号码头旁。" * 6 for i in range(8))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_build_killed_at_random_calls_the_teacher_only_for_what_is_missing(tmp_path, seed):
    from fake_teacher import FakeTeacher

    rng = random.Random(seed)
    doc = tmp_path / "island.md"
    doc.write_text(BUILD_DOC, encoding="utf-8")
    expected_calls = 8 + 8  # one question per section, one rephrasing call per question
    teacher = FakeTeacher(latency=0.15).start()
    try:
        args = ["--workdir", str(tmp_path), "build-dataset", "--doc", str(doc), "--base-url", teacher.base_url,
                "--model", "teacher-x", "--variants", "3", "--per-section", "1", "--concurrency", "2"]
        first = studio_process(*args)
        builds = tmp_path / "data" / "builds"
        journals = lambda: list(builds.glob("*/journal.jsonl"))  # noqa: E731
        target = rng.randint(1, expected_calls - 3)
        kill_when(first, lambda: bool(journals()) and complete_lines(journals()[0]) >= target, rng.uniform(0, 0.2))
        assert first.returncode == -signal.SIGKILL
        journal = journals()[0]
        recorded = complete_lines(journal)
        hits_before = len(teacher.hits)
        assert recorded < expected_calls
        second = subprocess.run([sys.executable, str(ROOT / "studio.py"), *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert second.returncode == 0, second.stdout + second.stderr
        assert len(teacher.hits) - hits_before == expected_calls - recorded  # only what the journal lacked
        assert f"{recorded} reused from the journal" in second.stdout
        assert "8 sections -> 8 base pairs -> 32 rows written" in second.stdout
    finally:
        teacher.stop()
