"""Probe: Fast eager vs Fast + CUDA graphs on each size, alternating, then the tutorial-sized job."""
import sys
from dataclasses import replace
from types import SimpleNamespace
from common import ROOT  # noqa
import train_speed as ts
from studio.train.settings import preset

sizes = sys.argv[1].split(","); steps = int(sys.argv[2]); name = sys.argv[3]
args = SimpleNamespace(tiny=False, budget_s=float(sys.argv[4]), no_main=True, recommended_from=None, name=name,
                       model_root="/dev/shm/qwen25-random", keep_models=False)
bench = ts.Bench(args)
for size in sizes:
    info = bench.load(size)
    static = info.pop("static_bytes")
    bench.payload["sizes"][size] = info
    rows = bench.rows(8 * steps + 16)
    for turn in (1, 2):
        for graphs in (False, True):
            bench.setup(size, f"fast{' + cuda graphs' if graphs else ''}, turn {turn}",
                        replace(preset("fast"), cuda_graphs=graphs), rows, steps, 30 + steps, static)
    bench.setup(size, "job 183x4, fast + cuda graphs", replace(preset("fast"), epochs=4.0, cuda_graphs=True),
                bench.rows(183, seed=1), -1, 60, static)
bench.manager.unload()
print("->", bench.save())
