"""The 4-bit decode kernel (`studio.model.nf4_rows`) against bitsandbytes, on the 7B's layer shapes.

For each shape (random NF4 layers, double quantized, bf16, as the studio loads them): the largest
difference from bitsandbytes' own product relative to its largest value, whether two rows together
give each row the bits of one row alone, and the time of one and of two rows, each replayed from a
CUDA graph, for bitsandbytes and for the kernel.

    python bench/nf4_rows_check.py
"""

from __future__ import annotations

import time

from common import write_results  # noqa: F401  (sets sys.path)

SHAPES = {"q/o 3584x3584": (3584, 3584), "k/v 512x3584": (512, 3584), "gate/up 18944x3584": (18944, 3584),
          "down 3584x18944": (3584, 18944)}


def replay_ms(run, times: int = 200) -> float:
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(times):
        graph.replay()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) / times * 1000, 4)


def main() -> None:
    import bitsandbytes as bnb
    import torch

    from studio.model import nf4_rows

    torch.manual_seed(0)
    out = {}
    for label, (n, k) in SHAPES.items():
        layer = bnb.nn.Linear4bit(k, n, bias=label.startswith("k/v"), compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(torch.randn(n, k) * 0.02, requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        layer = layer.to(torch.bfloat16).cuda() if layer.bias is not None else layer.cuda()
        assert nf4_rows.eligible(layer), label
        nf4_rows._prepare(layer)
        x = torch.randn(2, 1, k, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            reference = layer(x)
            mine = nf4_rows.nf4_rows_linear(layer, x)
            alone = torch.cat([nf4_rows.nf4_rows_linear(layer, x[i:i + 1]) for i in range(2)])
            row = {"max_rel_diff_vs_bitsandbytes": round(float((mine.float() - reference.float()).abs().max()
                                                              / reference.float().abs().max()), 5),
                   "rows_together_equal_alone": bool(torch.equal(mine, alone)),
                   "bitsandbytes_1_row_ms": replay_ms(lambda: layer(x[:1])),
                   "bitsandbytes_2_rows_ms": replay_ms(lambda: layer(x)),
                   "kernel_1_row_ms": replay_ms(lambda: nf4_rows.nf4_rows_linear(layer, x[:1])),
                   "kernel_2_rows_ms": replay_ms(lambda: nf4_rows.nf4_rows_linear(layer, x))}
        out[label] = row
        print(label, row, flush=True)
    write_results("nf4_rows_check", {"shapes": out})


if __name__ == "__main__":
    main()
