"""The command line: --help documents every command, and `chat` prints the same reply as the tab."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_studio(*args, timeout=300, lang_env="C.UTF-8"):
    env = {k: v for k, v in os.environ.items() if k not in ("LC_ALL", "LC_MESSAGES")}
    return subprocess.run([sys.executable, str(ROOT / "studio.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**env, "PYTHONUNBUFFERED": "1", "LANG": lang_env})


def test_help_documents_the_ui_options_and_commands():
    result = run_studio("--help")
    assert result.returncode == 0
    for option in ("--model", "--quant", "--host", "--port", "--share", "--load", "chat"):
        assert option in result.stdout
    chat_help = run_studio("chat", "--help").stdout
    for option in ("--model", "--quant", "--system", "--message"):
        assert option in chat_help


def test_chat_prints_the_greedy_reply(tiny_model_dir, manager):
    from studio.model.generation import GenerationSettings, build_messages

    system, question = "你是《雾灯岛》领域助手。", "我该怎么成为守灯人？"
    expected = manager.chat(build_messages(system, [], question), GenerationSettings.greedy(16))
    result = run_studio("chat", "--model", str(tiny_model_dir), "--system", system, "--message", question,
                        "--max-new-tokens", "16", "--repetition-penalty", "1.0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


def test_chat_with_unknown_hub_id_fails_with_a_message():
    result = run_studio("chat", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--message", "hi")
    assert result.returncode == 2
    assert "error: Model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local cache" in result.stderr


def test_commands_speak_chinese_with_lang_zh_or_a_chinese_environment(tiny_model_dir):
    result = run_studio("--lang", "zh", "chat", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--message", "hi")
    assert result.returncode == 2
    assert "错误：模型 'Qwen/Qwen2.5-0.5B-Instruct' 不在本地缓存中" in result.stderr
    result = run_studio("chat", "--model", str(tiny_model_dir), "--message", "hi", "--max-new-tokens", "4",
                        lang_env="zh_CN.UTF-8")
    assert result.returncode == 0, result.stderr
    assert "[load]" in result.stderr and "Resolving" not in result.stderr  # the load's progress in Chinese
    english = run_studio("--lang", "en", "chat", "--model", "Qwen/Qwen2.5-0.5B-Instruct", "--message", "hi",
                         lang_env="zh_CN.UTF-8")
    assert "error: Model 'Qwen/Qwen2.5-0.5B-Instruct' is not in the local cache" in english.stderr  # --lang wins


# ----- options before a command, renamed teacher options, CPU notes ---------------------------------
def _parse(*argv):
    """studio.py's parse_command_line (the script shares its name with the package, so load it by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("studio_cli", ROOT / "studio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_command_line(list(argv))


def test_model_given_before_the_command_is_used(tiny_model_dir, manager):
    from studio.model.generation import GenerationSettings, build_messages

    expected = manager.chat(build_messages("你是助手。", [], "hi"), GenerationSettings.greedy(8))
    result = run_studio("--model", str(tiny_model_dir), "chat", "--system", "你是助手。", "--message", "hi",
                        "--max-new-tokens", "8", "--repetition-penalty", "1.0")
    assert result.returncode == 0, result.stderr  # on main the 7B default was loaded instead
    assert result.stdout.rstrip("\n") == expected
    assert f"[load]   5% Resolving {tiny_model_dir}" in result.stderr  # progress goes to stderr


def test_options_before_and_after_a_command_merge():
    args = _parse("--quant", "8bit", "--decode", "eager", "train", "--dataset", "d.jsonl")
    assert (args.quant, args.decode, args.model) == ("8bit", "eager", "Qwen/Qwen2.5-7B-Instruct")
    args = _parse("train", "--dataset", "d.jsonl")
    assert (args.quant, args.decode) == ("4bit", "graphs")
    assert _parse("--model", "A", "chat", "--model", "B", "--message", "m").model == "B"  # the nearer one wins
    assert _parse("--workdir", "/tmp/w", "compare", "--adapter", "r").workdir == "/tmp/w"
    assert _parse("--port", "9000", "serve").port == 9000
    assert _parse("serve").port == 8000 and _parse().port == 7860
    assert _parse("export", "--adapter", "r", "--out", "o").model is None  # the run's recorded base


def test_a_ui_option_before_a_command_is_refused_by_name(capsys):
    import pytest

    for argv, refusal in ((["--share", "chat", "--message", "m"], "--share given before the chat command"),
                          (["--quant", "8bit", "export", "--adapter", "r", "--out", "o"],
                           "--quant given before the export command"),
                          (["--api-key-env", "K", "build-dataset", "--doc", "d"],
                           "--api-key-env given before the build-dataset command")):
        with pytest.raises(SystemExit) as exit_:
            _parse(*argv)
        assert exit_.value.code == 2
        assert refusal in capsys.readouterr().err


def test_build_dataset_teacher_options_and_their_old_names():
    for argv in (["--teacher-base-url", "http://t/v1", "--teacher-model", "qwen-plus"],
                 ["--base-url", "http://t/v1", "--model", "qwen-plus"]):
        args = _parse("build-dataset", "--doc", "d.md", *argv)
        assert (args.teacher_base_url, args.teacher_model) == ("http://t/v1", "qwen-plus")
    args = _parse("build-dataset", "--doc", "d.md", "--local-teacher", "--teacher-model", "/models/tiny")
    assert args.local_teacher and args.teacher_model == "/models/tiny"
    args = _parse("--model", "/models/tiny", "build-dataset", "--doc", "d.md", "--local-teacher")
    assert args.model == "/models/tiny" and "model" in args.given_options


def test_build_dataset_refuses_a_base_model_option_with_a_remote_teacher(tmp_path):
    result = run_studio("--workdir", str(tmp_path), "--model", "X", "build-dataset", "--doc", "d.md",
                        "--teacher-base-url", "http://127.0.0.1:9/v1", "--teacher-model", "t", timeout=120)
    assert result.returncode == 2
    assert "--model before build-dataset set the local teacher's model" in result.stderr


def test_every_command_help_says_what_happens_without_a_gpu(capsys):
    import pytest

    for command in ([], ["chat"], ["build-dataset"], ["train"], ["compare"], ["export"], ["serve"]):
        with pytest.raises(SystemExit):
            _parse(*command, "--help")
        text = " ".join(capsys.readouterr().out.split())
        assert "CPU only:" in text, command
    with pytest.raises(SystemExit):
        _parse("build-dataset", "--help")
    text = capsys.readouterr().out
    assert "--teacher-model" in text and "--teacher-base-url" in text


def test_the_fast_preset_replays_cuda_graphs_unless_told_not_to(tmp_path):
    import importlib.util

    sys.path.insert(0, str(ROOT))  # studio.py imports the studio package beside it

    spec = importlib.util.spec_from_file_location("studio_cli", ROOT / "studio.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    dataset = tmp_path / "d.jsonl"
    dataset.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    fast = cli.train_request(cli.parse_command_line(["train", "--dataset", str(dataset), "--preset", "fast"]),
                             None, tmp_path)
    eager = cli.train_request(cli.parse_command_line(["train", "--dataset", str(dataset), "--preset", "fast",
                                                      "--no-cuda-graphs"]), None, tmp_path)
    assert fast.train.cuda_graphs and not eager.train.cuda_graphs and eager.train.packing
