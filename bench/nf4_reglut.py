"""The studio's 4-bit kernel with its 16-entry table in registers instead of shared memory, timed against
the kernel as it is, over weights the L2 cannot hold (as `bench/nf4_probe.py`).

The variant decodes a word's eight 4-bit values with byte permutes over eight registers that hold the
bf16 code values' low and high bytes (three permutes a table for four values, one more a pair), so
the loop reads no shared memory: more instructions, none on the load/store pipe that the table's
lookups share with the weights' loads. Its code values are rounded to bf16 (the kernel's are fp32),
so its outputs differ in the last bits; `max_rel_error_exact` is against the product from the fp32
dequantized weight.

    python bench/nf4_reglut.py      # GPU only, about a minute
"""

from __future__ import annotations

import re

from common import write_results

SHAPES = {"q_proj / o_proj": (3584, 3584), "gate_proj / up_proj": (18944, 3584), "down_proj": (3584, 18944)}
REPLAYS = 20
REGISTER_DECODE = r"""                            const u32 m = word & 0x77777777u;
                            const u32 sw = ((word >> 1) & 0x44444444u) | 0x32103210u;
#pragma unroll
                            for (int half = 0; half < 2; ++half) {
                                const u32 mh = half ? (m >> 16) : m, sh = half ? (sw >> 16) : sw;
                                const u32 la = __byte_perm(__byte_perm(LOA, LOB, mh), __byte_perm(LOC, LOD, mh), sh);
                                const u32 ha = __byte_perm(__byte_perm(HIA, HIB, mh), __byte_perm(HIC, HID, mh), sh);
#pragma unroll
                                for (int e = 0; e < 2; ++e) {
                                    const u32 pair = __byte_perm(la, ha, e ? 0x6273u : 0x4051u);
                                    const int j = 4 * h + 2 * half + e;
                                    const float hi = __uint_as_float(pair << 16);
                                    const float lo = __uint_as_float(pair & 0xffff0000u);
#pragma unroll
                                    for (int r = 0; r < ROWS; ++r) {
                                        s[r] = fmaf(hi, xs[r][2 * j], s[r]);
                                        s[r] = fmaf(lo, xs[r][2 * j + 1], s[r]);
                                    }
                                }
                            }
"""


def register_source(source: str) -> str:
    pattern = re.compile(r"                            // each byte's high and low nibble.*?\n                            }\n"
                         r"(?=                        }\n                        // bitsandbytes' absmax)", re.S)
    replaced, count = pattern.subn(lambda _: REGISTER_DECODE, source)
    assert count == 1, count
    return replaced


def table_macros(code) -> list[str]:
    import torch

    bf16 = code.float().cpu().to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    low, high = (bf16 & 0xFF).tolist(), (bf16 >> 8).tolist()
    macros = []
    for name, values in (("LO", low), ("HI", high)):
        for i, letter in enumerate("ABCD"):
            word = sum(int(values[4 * i + b]) << (8 * b) for b in range(4))
            macros.append(f"-D{name}{letter}={word:#x}u")
    return macros


def main() -> None:
    import torch

    import bitsandbytes.functional as bf
    from nf4_kernels import quantized
    from studio.model import nf4_cuda

    payload = {"what": "the 4-bit kernel with its table in registers vs shared memory, 1 row, weights beyond the L2",
               "shapes": {}}
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-200_000_000 // (n * k // 2)))
        params = [quantized(n, k)[0] for _ in range(copies)]
        layers = [nf4_cuda.layer_args(p) for p in params]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        y = torch.empty((1, n), dtype=torch.bfloat16, device="cuda")
        exact = (x.float() @ bf.dequantize_4bit(params[0].data, params[0].quant_state).float().t())
        split0, outs0 = nf4_cuda.launch_shape(n)
        entry = {"copies": copies}
        for variant in ("shared-memory table", "register table"):
            for split, outs, unroll in ((split0, outs0, 2), (split0, outs0, 4), (split0, 2, 2), (2, outs0, 2)):
                source = nf4_cuda.SOURCE if variant.startswith("shared") else register_source(nf4_cuda.SOURCE)
                options = ["-DROWS=1", f"-DOUTS={outs}", f"-DUNROLL={unroll}"] + table_macros(layers[0].code)
                kernel = nf4_cuda.compile_kernel(source, "nf4_rows", options)
                per_block = (4 // split) * outs

                def launch(layer):
                    kernel(grid=(-(-n // per_block), 1, 1), block=(128, 1, 1), args=[
                        x, layer.weight, layer.qabsmax, layer.absmax2, layer.code2, y, layer.code, y, y, n, k,
                        layer.offset, 1, 0, split])

                launch(layers[0])
                torch.cuda.synchronize()
                error = ((y.float() - exact).abs().max() / exact.abs().max()).item()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for layer in layers:
                        launch(layer)
                graph.replay()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(REPLAYS):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                us = start.elapsed_time(end) * 1000 / (REPLAYS * copies)
                key = f"{variant}, split {split}, outs {outs}, unroll {unroll}"
                entry[key] = {"us": round(us, 2), "weight_TB_per_s": round(n * k / 2 / us / 1e6, 2),
                              "max_rel_error_exact": float(f"{error:.2e}")}
                print(name, key, entry[key], flush=True)
        payload["shapes"][name] = entry
        del layers, params
        torch.cuda.empty_cache()
    write_results("nf4_reglut", payload)


if __name__ == "__main__":
    main()
