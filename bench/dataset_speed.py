"""Dataset-builder speed: the same build at concurrency 1 and at higher concurrency, in one run.

A local OpenAI-protocol server answers every call after a fixed latency (default 0.5 s). The
document has 20 sections, one base question each, 14 paraphrases per question: 40 teacher calls.
Runs on the CPU; writes bench/results/dataset_speed-cpu-<date>.json.

    python bench/dataset_speed.py [--latency 0.5] [--concurrency 1 8 16]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fake_teacher import FakeTeacher  # noqa: E402
from studio.data.builder import BuildSettings  # noqa: E402
from studio.data.service import start_build  # noqa: E402
from studio.data.teacher import TeacherConfig  # noqa: E402
from studio.jobs import JobBoard  # noqa: E402
from studio.model.manager import ModelManager  # noqa: E402
from studio.config import StudioPaths  # noqa: E402


def document(sections: int = 20) -> str:
    return "# 基准文档\n\n" + "\n\n".join(f"## 第{i}节\n" + f"第{i}节记录了灯塔{i}号的位置与历史。" * 8
                                         for i in range(sections))


def one_build(server: FakeTeacher, concurrency: int, doc_path: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        paths = StudioPaths(Path(scratch) / "data", Path(scratch) / "runs").ensure()
        settings = BuildSettings(per_section="1", variants=14, concurrency=concurrency)
        before = len(server.hits)
        started = time.perf_counter()
        board = JobBoard()
        job = board.wait(start_build(board, ModelManager(), paths, doc_path, settings,
                                     TeacherConfig(server.base_url, "bench-teacher", "bench")))
        seconds = time.perf_counter() - started
        return {"concurrency": concurrency, "seconds": round(seconds, 3), "calls": len(server.hits) - before,
                "rows": job.result.get("rows"), "status": job.status.value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 16])
    args = parser.parse_args()
    server = FakeTeacher(latency=args.latency).start()
    with tempfile.TemporaryDirectory() as scratch:
        doc_path = Path(scratch) / "bench.md"
        doc_path.write_text(document(), encoding="utf-8")
        runs = [one_build(server, c, doc_path) for c in args.concurrency]
    server.stop()
    baseline = next(r["seconds"] for r in runs if r["concurrency"] == 1) if 1 in args.concurrency else None
    for run in runs:
        run["speedup_vs_concurrency_1"] = round(baseline / run["seconds"], 2) if baseline else None
        print(f"concurrency {run['concurrency']:>3}: {run['seconds']:6.2f}s, {run['calls']} calls, "
              f"{run['rows']} rows, x{run['speedup_vs_concurrency_1']}")
    out = ROOT / "bench" / "results" / f"dataset_speed-cpu-{time.strftime('%Y-%m-%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"latency_s": args.latency, "sections": 20, "variants": 14, "runs": runs,
                               "python": platform.python_version(), "machine": platform.machine()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
