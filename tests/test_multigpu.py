"""Training on several GPUs, as far as CPUs reach: the launch the studio builds, the relay of the processes'
events, Stop reaching every process, a failed process, the kept effective batch and the CLI.

The real worker runs here: `accelerate launch --multi_gpu --num_processes 2` starts two CPU processes
(gloo) that each load the tiny 4-bit model and train the run's adapter data-parallel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from studio.errors import StudioError
from studio.jobs import JobBoard, JobStatus
from studio.train.job import RunRequest, last_complete_checkpoint
from studio.train.multigpu import (EventRelay, MultiGpuRun, check_gpu_count, describe_batch, launch_command,
                                   per_process_settings, start_multigpu_training, worker_environment)
from studio.train.settings import LoraSettings, TrainSettings, preset
from studio.train.worker import EVENTS_FILE, PROCESS_DIR
from test_training import SYSTEM, write_dataset

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(learning_rate=5e-3, epochs=1.0, batch_size=2, grad_accum=2, save_every=0, max_length=64)


def run_request(tmp_path, **train) -> RunRequest:
    data = write_dataset(tmp_path / "facts.jsonl")
    return RunRequest(data, SYSTEM, LoraSettings(r=4, alpha=8), TrainSettings(**{**SMALL, **train}),
                      tmp_path / "runs" / "facts_multi")


def start(board, tiny_model_dir, request, **options):
    from studio.model.loading import ModelSpec

    return start_multigpu_training(board, None, request, 2, spec=ModelSpec(str(tiny_model_dir), "4bit"),
                                   check_gpus=False, **options)


# ----- what the studio builds ------------------------------------------------------------------------
def test_launch_command_runs_the_worker_module_on_n_processes(tmp_path):
    command = launch_command(tmp_path / "run", "Qwen/Qwen2.5-7B-Instruct", "/models/q7", "4bit", 2, port=29555)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    text = " ".join(command)
    assert "--multi_gpu --num_processes 2 --num_machines 1 --machine_rank 0 --main_process_port 29555" in text
    assert text.endswith(f"-m studio.train.worker --run-dir {tmp_path / 'run'} --model Qwen/Qwen2.5-7B-Instruct "
                         "--source /models/q7 --quant 4bit --processes 2")
    assert launch_command(tmp_path, "m", "/m", "4bit", 4, resume=True, port=1)[-1] == "--resume"


def test_worker_environment_has_no_keys_and_the_first_n_gpus():
    base = {"OPENAI_API_KEY": "sk-live-1", "STUDIO_TEACHER_API_KEY": "sk-2", "HF_TOKEN": "hf_x", "STUDIO_AUTH": "a:b",
            "MY_SECRET": "s", "DB_PASSWORD": "p", "TOKENIZERS_PARALLELISM": "true", "PATH": "/usr/bin",
            "CUDA_VISIBLE_DEVICES": "3,5,6", "PYTHONPATH": "/extra"}
    env = worker_environment(2, base)
    assert not {"OPENAI_API_KEY", "STUDIO_TEACHER_API_KEY", "HF_TOKEN", "STUDIO_AUTH", "MY_SECRET",
                "DB_PASSWORD"} & set(env)
    assert not any(v in json.dumps(env) for v in ("sk-live-1", "sk-2", "hf_x"))
    assert env["CUDA_VISIBLE_DEVICES"] == "3,5" and env["PATH"] == "/usr/bin"
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/extra"]
    assert worker_environment(4, {})["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"


def test_effective_batch_is_kept_per_optimizer_step():
    tutorial, fast = preset("tutorial"), preset("fast")
    assert (per_process_settings(tutorial, 2).batch_size, per_process_settings(tutorial, 2).grad_accum) == (1, 4)
    assert (per_process_settings(fast, 2).batch_size, per_process_settings(fast, 2).grad_accum) == (4, 1)
    assert per_process_settings(tutorial, 1) == tutorial
    assert describe_batch(tutorial, 2) == ("effective batch: 8 sequences per optimizer step = 2 GPUs x batch 1 x "
                                           "grad accumulation 4")
    with pytest.raises(StudioError, match="cannot be shared evenly by 3 GPUs"):
        per_process_settings(tutorial, 3)


def test_more_gpus_than_visible_is_refused():
    with pytest.raises(StudioError, match="--gpus 2 asks for 2 GPUs, but 0 are visible"):
        check_gpu_count(2, visible=0)
    check_gpu_count(2, visible=2)


def test_relay_takes_only_complete_lines(tmp_path):
    path = tmp_path / "events.jsonl"
    relay = EventRelay(path)
    assert relay.read() == []
    path.write_text('{"type": "log", "message": "a"}\n{"type": "log", "mess', encoding="utf-8")
    assert [e["message"] for e in relay.read()] == ["a"]
    with open(path, "a", encoding="utf-8") as handle:
        handle.write('age": "b"}\n')
    assert [e["message"] for e in relay.read()] == ["b"] and relay.read() == []


# ----- real processes -----------------------------------------------------------------------------------
def test_two_processes_train_and_the_job_relays_their_events(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-must-not-travel")
    request = run_request(tmp_path)
    board = JobBoard()
    job = start(board, tiny_model_dir, request)
    board.wait(job, 240)
    assert job.status is JobStatus.DONE, job.error + "\n" + "\n".join(
        e["message"] for e in job.events_since(0)[0] if e["type"] == "trace")
    run_dir = request.run_dir
    for name in ("run.json", "studio.json", "train_split.jsonl", "heldout.jsonl", "metrics.jsonl", "loss.png",
                 "adapter_model.safetensors", "adapter_config.json", "events.jsonl"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "studio.json").read_text(encoding="utf-8"))
    train_rows = len((run_dir / "train_split.jsonl").read_text(encoding="utf-8").splitlines())
    steps = -(-train_rows // 4)  # 4 sequences per optimizer step in all: 2 processes x batch 2 x accumulation 1
    assert meta["processes"] == 2 and meta["sequences_per_step"] == 4 and meta["status"] == "completed"
    assert meta["training"]["batch_size"] * meta["training"]["grad_accum"] == 2  # each process's share
    assert job.result["steps"] == meta["steps"] == steps
    assert "base_fingerprint" in json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, steps + 1))  # process 0 alone writes it
    events, _ = job.events_since(0)
    kinds = [e["type"] for e in events]
    assert kinds.count("metric") >= steps and "progress" in kinds
    assert any("Launching 2 training processes" in e["message"] for e in events)
    assert json.loads((run_dir / "events.jsonl").read_text().splitlines()[-1])["status"] == "done"
    assert "sk-must-not-travel" not in (run_dir / PROCESS_DIR / "launch.log").read_text(errors="replace")


def test_stop_reaches_every_process_and_process_zero_saves(tiny_model_dir, tmp_path):
    request = run_request(tmp_path, epochs=200.0, batch_size=1, grad_accum=2, save_every=0)
    board = JobBoard()
    job = start(board, tiny_model_dir, request)
    run_pids = _wait_for_step(job, request.run_dir, 2)
    assert len(run_pids) >= 3  # the launcher and its two training processes
    job.cancel()
    board.wait(job, 120)
    assert job.status is JobStatus.CANCELLED, job.error
    assert not [pid for pid in run_pids if _alive(pid)]
    meta = json.loads((request.run_dir / "studio.json").read_text(encoding="utf-8"))
    assert meta["status"] == f"stopped at step {job.result['steps']}"
    checkpoint = last_complete_checkpoint(request.run_dir)
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{job.result['steps']}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert any("Stop requested: stopping after step" in e["message"] for e in job.events_since(0)[0])


def test_processes_that_ignore_stop_are_killed_as_a_group(tiny_model_dir, tmp_path):
    request = run_request(tmp_path, epochs=200.0, batch_size=1, grad_accum=2)
    board = JobBoard()
    job = start(board, tiny_model_dir, request, stop_grace_s=0.0)  # no time to stop by themselves
    run_pids = _wait_for_step(job, request.run_dir, 1)
    job.cancel()
    board.wait(job, 60)
    assert job.status is JobStatus.CANCELLED
    assert not [pid for pid in run_pids if _alive(pid)]


def test_a_failed_process_ends_the_job_with_its_error(tiny_model_dir, tmp_path):
    request = run_request(tmp_path)
    board = JobBoard()
    job = start(board, tiny_model_dir, request)
    (request.run_dir / "run.json").write_text("{broken", encoding="utf-8")  # every process reads it at start
    board.wait(job, 120)
    assert job.status is JobStatus.FAILED
    assert job.error.startswith("Training process ") and "of 2 failed" in job.error and "run.json is damaged" in job.error


def _processes_of(root_pid: int) -> list[int]:
    """`root_pid` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for_step(job, run_dir: Path, step: int, timeout: float = 120) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [e for e in job.events_since(0)[0] if e["type"] == "progress" and e.get("done", 0) >= step]
        if done:
            launcher = _launcher_pid(job)
            return _processes_of(launcher)
        assert job.running, job.error
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s")


def _launcher_pid(job) -> int:
    run = job.thread._args[1].__self__  # JobBoard._run(job, target, on_exit): target is MultiGpuRun.run
    return run.process.pid


# ----- the CLI ----------------------------------------------------------------------------------------------
def test_cli_prints_the_effective_batch_and_refuses_missing_gpus(tmp_path):
    data = write_dataset(tmp_path / "facts.jsonl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "studio.py"), "--workdir", str(tmp_path), "train",
                          "--dataset", str(data), "--gpus", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert "[log] effective batch: 8 sequences per optimizer step = 2 GPUs x batch 1 x grad accumulation 4" in out.stdout
    assert "--gpus 2 asks for 2 GPUs, but 0 are visible here" in out.stderr


# ----- the Train tab ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("visible", [0, 2])
def test_train_tab_offers_a_gpu_count_only_with_several_gpus(workspace, monkeypatch, visible):
    import studio.train.multigpu as multigpu
    from studio.model.manager import ModelManager
    from studio.services import Services
    from studio.ui.app import build_app
    from studio.ui.i18n import translate

    monkeypatch.setattr(multigpu, "visible_gpu_count", lambda: visible)
    app = build_app(Services(manager=ModelManager(), paths=workspace))
    start = next(e for e in app.studio_registry.entries if e.name == "start_training")
    labels = [getattr(spec, "label", "") for spec in start.args]
    assert ("GPUs" in labels) is (visible > 1)
    if visible > 1:
        spec = start.args[labels.index("GPUs")]
        assert (spec.lo, spec.hi) == (1, 2)
        assert translate("GPUs: a number is needed.", "zh").startswith("GPU 数")
