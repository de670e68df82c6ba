"""The command line: --help documents every command, and `chat` prints the same reply as the tab."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_studio(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "studio.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


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
