"""The studio's 4-bit kernel's launch settings on each 7B layer shape, over weights the L2 cannot hold.

`bench/nf4_kernels.py --cuda-sweep` chose the launch settings (`nf4_cuda.launch_shape`) by replaying
calls on one weight, which the 50 MB L2 holds for most 7B shapes; in a decode step every weight comes
from memory. Here each call reads another copy of the weight (as many copies as make 200 MB or more),
recorded as a CUDA graph and replayed (`nf4_kernels.replay_us`). Swept: warps along K (split), outputs
a warp (outs), chunks a round (unroll) and warps a block. Each setting's output is compared with the
default's bit for bit (a setting that splits K otherwise may differ in the last bits).

    python bench/nf4_probe.py      # GPU only, about two minutes
"""

from __future__ import annotations

from common import write_results

SHAPES = {"q_proj / o_proj": (3584, 3584), "k_proj / v_proj": (512, 3584),
          "gate_proj / up_proj": (18944, 3584), "down_proj": (3584, 18944)}
SPLITS, OUTS, UNROLLS, WARPS = (1, 2, 4), (1, 2, 4), (2, 4), (4, 8)


def main() -> None:
    import itertools

    import torch

    from nf4_kernels import quantized, replay_us
    from studio.model import nf4_cuda

    payload = {"what": "the studio's 4-bit kernel's launch settings, 1 and 2 rows, weights beyond the L2",
               "shapes": {}}
    compiled = {}

    def kernel(rows, outs, unroll, warps):
        key = (rows, outs, unroll, warps)
        if key not in compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={unroll}", f"-DWARPS={warps}"]
            compiled[key] = nf4_cuda.compile_kernel(nf4_cuda.SOURCE, "nf4_rows", options)
        return compiled[key]

    for name, (n, k) in SHAPES.items():
        default = nf4_cuda.launch_shape(n)
        copies = max(2, -(-200_000_000 // (n * k // 2)))
        layers = [nf4_cuda.layer_args(quantized(n, k)[0]) for _ in range(copies)]
        x = torch.randn(2, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty((2, n), dtype=torch.bfloat16, device="cuda")

        def launch(layer, rows, split, outs, unroll, warps):
            per_block = (warps // split) * outs
            kernel(rows, outs, unroll, warps)(grid=(-(-n // per_block), 1, 1), block=(32 * warps, 1, 1), args=[
                x, layer.weight, layer.qabsmax, layer.absmax2, layer.code2, y, layer.code, y, y, n, k,
                layer.offset, 1, 0, split])

        reference = {}
        for rows in (1, 2):
            launch(layers[0], rows, *default, 2, 4)
            reference[rows] = y[:rows].clone()
        entry = {"copies": copies, "default": {"split": default[0], "outs": default[1], "unroll": 2, "warps": 4},
                 "settings": {}}
        for split, outs, unroll, warps in itertools.product(SPLITS, OUTS, UNROLLS, WARPS):
            if split > warps:
                continue
            setting = {}
            for rows in (1, 2):
                launch(layers[0], rows, split, outs, unroll, warps)
                torch.cuda.synchronize()
                same = bool(torch.equal(y[:rows], reference[rows]))
                us = replay_us([lambda layer=layer: launch(layer, rows, split, outs, unroll, warps) for layer in layers])
                setting[f"{rows} row us"] = round(us, 2)
                setting[f"{rows} row equals default"] = same
            entry["settings"][f"split {split}, outs {outs}, unroll {unroll}, warps {warps}"] = setting
        scored = entry["settings"]
        best = min(scored, key=lambda s: scored[s]["1 row us"] + 0.25 * scored[s]["2 row us"])
        default_key = f"split {default[0]}, outs {default[1]}, unroll 2, warps 4"
        entry["best"], entry["best_us"], entry["default_us"] = best, scored[best], scored[default_key]
        print(name, "best", best, scored[best], "default", scored[default_key], flush=True)
        payload["shapes"][name] = entry
        del layers
        torch.cuda.empty_cache()
    layout = (("q_proj / o_proj", 2), ("k_proj / v_proj", 2), ("gate_proj / up_proj", 2), ("down_proj", 1))
    for which in ("best_us", "default_us"):
        payload[f"step_ms_28_layers_{which[:-3]}"] = round(
            28 * sum(payload["shapes"][s][which]["1 row us"] * c for s, c in layout) / 1000, 3)
    print({key: value for key, value in payload.items() if key.startswith("step")}, flush=True)
    write_results("nf4_probe", payload)


if __name__ == "__main__":
    main()
