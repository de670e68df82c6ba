"""bitsandbytes' 4-bit kernels for one and two rows, on each layer shape of the Qwen2.5-7B decoder.

The graph decoder's step spends most of its time in bitsandbytes' few-row NF4 kernel. This bench
times, for each 7B layer shape (and for q/k/v and gate/up fused into one weight), every way
bitsandbytes offers to multiply one or two rows by a 4-bit weight:

- `simt, nested absmax`: what `matmul_4bit` runs for 1-3 rows (`gemm_4bit`, the 8-bit absmax
  dequantized inside the kernel): the studio's decoder today;
- `simt, fp32 absmax`: the same kernel given absmax already dequantized to fp32 (one tensor);
- `gemv (inference_naive), fp32 absmax`: bitsandbytes' older one-row kernel (`gemv_4bit`);
- `bf16 linear`: cuBLAS on the dequantized weight (the bandwidth a plain bf16 layer gets);
- `triton attempt`: a Triton kernel written for this step (`bench/nf4_triton.py`, not used by the
  studio: it is slower); `triton attempt, rows as programs` gives each row programs of its own. Its
  `max_rel_error` is its largest difference from the default, relative to the default's largest value.

- `cuda kernel`: the studio's own CUDA kernel (`studio/model/nf4_cuda.py`, compiled at run time), with
  its default launch settings; `--cuda-sweep` times its settings (unroll, outputs per warp, warps
  along K) on each shape. Its `max_rel_error_exact` (as every variant's) is against the product
  computed in fp32 from the dequantized weight.

With `--sweep`, each shape also times that kernel's launch settings (outputs per program, 64-blocks
per step, warps) and reports the fastest.

Each is recorded as a CUDA graph of 20 calls and replayed, so launch costs do not count. Reported:
microseconds a call, the weight bytes read per second, whether its output equals the default's
bit for bit, and, for two rows, whether each row equals that row alone.

    python bench/nf4_kernels.py [--sweep]     # GPU only, about 30 s on the H200 (sweep: 2 minutes)
"""

from __future__ import annotations

import argparse
import itertools

from common import write_results

SHAPES = {  # (out_features, in_features)
    "q_proj / o_proj": (3584, 3584),
    "k_proj / v_proj": (512, 3584),
    "gate_proj / up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
    "q+k+v fused": (4608, 3584),
    "gate+up fused": (37888, 3584),
}
CALLS_PER_GRAPH, REPLAYS = 20, 30


def quantized(out_features: int, in_features: int):
    import bitsandbytes as bnb
    import torch

    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16) * 0.02
    param = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True,
                              blocksize=64).cuda()
    return param, param.quant_state


def variants(param, state):
    """name -> (function of x, rows it supports)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bf
    import torch

    import nf4_triton
    from studio.model import nf4_cuda

    module = type("Layer", (), {})()
    module.weight, module.bias, module.compute_dtype = param, None, torch.bfloat16
    layer = nf4_triton._Layer(module, torch.bfloat16)
    flat = (bf.dequantize_blockwise(state.absmax, state.state2) + state.offset).float().contiguous()
    dense = bf.dequantize_4bit(param.data, state).to(torch.bfloat16)
    ops = torch.ops.bitsandbytes
    cuda = _cuda_kernels()
    cuda_layer = nf4_cuda.layer_args(param)
    return {
        "cuda kernel": (lambda x: cuda.products(cuda_layer, x.view(-1, x.shape[-1])).view(*x.shape[:-1], -1),
                        (1, 2)),
        "simt, nested absmax": (lambda x: bnb.matmul_4bit(x, param.t(), state), (1, 2)),
        "simt, fp32 absmax": (lambda x: ops.gemm_4bit.default(x, param.data, state.shape, flat, 64, "nf4"), (1, 2)),
        "gemv (inference_naive), fp32 absmax": (
            lambda x: ops.gemv_4bit.default(x, param.data, state.shape, flat, state.code, 64), (1,)),
        "bf16 linear": (lambda x: torch.nn.functional.linear(x, dense), (1, 2)),
        "triton attempt": (lambda x: nf4_triton.products(layer, x.view(-1, x.shape[-1])).view(*x.shape[:-1], -1),
                          (1, 2)),
        "triton attempt, rows as programs": (
            lambda x: nf4_triton.products(layer, x.view(-1, x.shape[-1]), rows_per_program=1).view(*x.shape[:-1], -1),
            (2,)),
    }


_KERNELS: dict = {}


def _cuda_kernels(unroll: int = 2):
    from studio.model import nf4_cuda

    if unroll not in _KERNELS:
        _KERNELS[unroll] = nf4_cuda.Nf4Kernels(unroll=unroll)
    return _KERNELS[unroll]


def time_call(fn, x) -> float:
    """Microseconds a call, from a CUDA graph of CALLS_PER_GRAPH calls."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(side)
    return replay_us([lambda: fn(x)] * CALLS_PER_GRAPH)


def replay_us(calls) -> float:
    """Microseconds a call, from a CUDA graph that records each of `calls` (callables) once, replayed
    REPLAYS times."""
    import torch

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (REPLAYS * len(calls))


def measure_shape(out_features: int, in_features: int) -> dict:
    import torch

    param, state = quantized(out_features, in_features)
    weight_bytes = param.data.numel() + state.absmax.numel()
    x2 = torch.randn(2, in_features, dtype=torch.bfloat16, device="cuda")
    x1 = x2[:1].contiguous()
    found = variants(param, state)
    reference = {1: found["simt, nested absmax"][0](x1), 2: found["simt, nested absmax"][0](x2)}
    import bitsandbytes.functional as bf

    dense32 = bf.dequantize_4bit(param.data, state).float()
    exact = {1: x1.float() @ dense32.t(), 2: x2.float() @ dense32.t()}
    out = {}
    for name, (fn, rows) in found.items():
        for count in rows:
            x = x1 if count == 1 else x2
            micro = time_call(fn, x)
            value = fn(x)
            entry = {"us": round(micro, 2), "weight_GB_per_s": round(weight_bytes / micro / 1e3, 0),
                     "equals_default": bool(torch.equal(value, reference[count]))}
            if not entry["equals_default"]:
                scale = reference[count].float().abs().max().item()
                entry["max_rel_error"] = float(f"{(value.float() - reference[count].float()).abs().max().item() / scale:.2e}")
            entry["max_rel_error_exact"] = float(f"{(value.float() - exact[count]).abs().max().item() / exact[count].abs().max().item():.2e}")
            if count == 2:
                entry["rows_equal_alone"] = bool(torch.equal(value[:1], fn(x1)) and
                                                 torch.equal(value[1:], fn(x2[1:].contiguous())))
            out[f"{name}, {count} row{'s' if count > 1 else ''}"] = entry
    return out


def sweep_shape(out_features: int, in_features: int) -> dict:
    """The Triton attempt's microseconds for one and two rows under each launch setting."""
    import torch

    import nf4_triton

    param, state = quantized(out_features, in_features)
    module = type("Layer", (), {})()
    module.weight, module.bias, module.compute_dtype = param, None, torch.bfloat16
    layer = nf4_triton._Layer(module, torch.bfloat16)
    x2 = torch.randn(2, in_features, dtype=torch.bfloat16, device="cuda")
    blocks = in_features // 64
    timed = {}
    for block_n, groups, warps in itertools.product((2, 4, 8, 16), (1, 2, 4, 8), (4, 8)):
        if blocks % groups:
            continue
        config = (block_n, groups, warps)
        try:
            one = time_call(lambda x: nf4_triton.products(layer, x, config), x2[:1].contiguous())
            two = time_call(lambda x: nf4_triton.products(layer, x, config), x2)
        except Exception as exc:  # a setting the compiler refuses (too many registers)
            timed[str(config)] = f"{exc.__class__.__name__}"
            continue
        timed[str(config)] = {"1 row us": round(one, 2), "2 rows us": round(two, 2)}
    scored = {k: v for k, v in timed.items() if isinstance(v, dict)}
    best = min(scored, key=lambda k: scored[k]["1 row us"] + 0.25 * scored[k]["2 rows us"])
    return {"best": best, "best_us": scored[best], "default": str(nf4_triton.launch_config(out_features, in_features)),
            "all": timed}


def cuda_sweep_shape(out_features: int, in_features: int) -> dict:
    """The CUDA kernel's microseconds for one and two rows under each launch setting."""
    import torch

    from studio.model import nf4_cuda

    param, _ = quantized(out_features, in_features)
    layer = nf4_cuda.layer_args(param)
    x2 = torch.randn(2, in_features, dtype=torch.bfloat16, device="cuda")
    timed = {}
    for unroll, outs, split in itertools.product((2, 4, 8), (1, 2, 4), (1, 2, 4)):
        if unroll == 8 and outs == 4:
            continue
        kernels = _cuda_kernels(unroll)
        shape = (split, outs)
        one = time_call(lambda x: kernels.products(layer, x, shape=shape), x2[:1].contiguous())
        two = time_call(lambda x: kernels.products(layer, x, shape=shape), x2)
        timed[f"unroll {unroll}, outs {outs}, split {split}"] = {"1 row us": round(one, 2), "2 rows us": round(two, 2)}
    best = min(timed, key=lambda k: timed[k]["1 row us"] + 0.25 * timed[k]["2 rows us"])
    return {"best": best, "best_us": timed[best], "default": str(nf4_cuda.launch_shape(out_features)), "all": timed}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time the Triton attempt's launch settings")
    parser.add_argument("--cuda-sweep", action="store_true", help="also time the CUDA kernel's launch settings")
    args = parser.parse_args()
    payload = {"what": "4-bit NF4 (double quant, block 64) products of 1 and 2 bf16 rows, CUDA-graph replay",
               "shapes": {}}
    if args.sweep:
        payload["sweep"] = {}
        for name, (n, k) in SHAPES.items():
            payload["sweep"][name] = sweep_shape(n, k)
            print(name, "best", payload["sweep"][name]["best"], payload["sweep"][name]["best_us"], flush=True)
    if args.cuda_sweep:
        payload["cuda_sweep"] = {}
        for name, (n, k) in SHAPES.items():
            payload["cuda_sweep"][name] = cuda_sweep_shape(n, k)
            print(name, "best", payload["cuda_sweep"][name]["best"], payload["cuda_sweep"][name]["best_us"], flush=True)
    for name, (n, k) in SHAPES.items():
        payload["shapes"][name] = measure_shape(n, k)
        print(name, payload["shapes"][name], flush=True)
    per_layer = {"q_proj / o_proj": 2, "k_proj / v_proj": 2, "gate_proj / up_proj": 2, "down_proj": 1}
    fused_layer = {"q+k+v fused": 1, "q_proj / o_proj": 1, "gate+up fused": 1, "down_proj": 1}
    totals = {}
    for label, layout in (("7 layers", per_layer), ("4 fused layers", fused_layer)):
        for variant in next(iter(payload["shapes"].values())):
            if all(variant in payload["shapes"][shape] for shape in layout):
                us = sum(payload["shapes"][shape][variant]["us"] * count for shape, count in layout.items())
                totals[f"{label}: {variant}"] = round(us * 28 / 1000, 3)
    payload["decoder_ms_per_step_28_layers"] = totals
    print(totals, flush=True)
    torch.cuda.synchronize()
    write_results("nf4_kernels", payload)


if __name__ == "__main__":
    main()
