"""The design card's layout, and the rule that only studio/ui imports gradio."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_layout_exists():
    for name in ("studio.py", "studio", "assets", "data", "tests", "requirements.txt", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), f"{name} is missing"


def test_services_do_not_import_gradio():
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for path in (ROOT / "studio").rglob("*.py")
        if "ui" not in path.relative_to(ROOT / "studio").parts
    )
    modules = [m.removesuffix(".__init__") for m in modules]
    assert "studio.model.manager" in modules
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m!r})\n" for m in modules)
    code += "print('gradio' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False", "a module outside studio/ui imported gradio"


def test_ui_modules_are_the_only_gradio_importers():
    for path in (ROOT / "studio").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        imports_gradio = "import gradio" in text or "from gradio" in text
        if imports_gradio:
            assert "ui" in path.relative_to(ROOT / "studio").parts, f"{path} imports gradio"
