"""A CUDA kernel for the decode step's 4-bit products: one to three token rows times an NF4 weight.

A batch-1 decode step of a 4-bit 7B model spends most of its GPU time multiplying one row by each
4-bit weight. bitsandbytes' kernels for that read the weights at about 1 TB/s on an H200, a fifth of
the memory's bandwidth (`bench/nf4_kernels.py`). This kernel reads them with wide streaming loads,
decodes each 4-bit value through a 16-entry table in shared memory (no bank conflicts: 16 words in
16 banks) and adds in fp32; it is compiled at run time with NVRTC (`torch.cuda._compile_kernel`),
so it needs no compiler beyond what PyTorch's CUDA build ships.

The weights are bitsandbytes' own (`Params4bit`, NF4, blocks of 64, absmax plain or double-quantized),
used in place: nothing is converted or copied. Each row's sum is computed by the same instructions in
the same order whatever the other rows are, so a row of a two-row call has the bits of that row alone.
The results differ from bitsandbytes' in the last bits (it rounds each product to bf16 before adding;
this kernel does not), so the graph decoder checks the kernel once per model against bitsandbytes
and a one-row run before it uses it (`studio.model.graph_decode`).

`Nf4Kernels.forward_for(module)` gives a 4-bit layer's forward that takes one to three single-token
rows through the kernel and anything else through bitsandbytes.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

WARPS_PER_BLOCK = 4

# Shared by the studio's kernels (no headers: NVRTC compiles them without a CUDA toolkit's includes).
PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

__device__ __forceinline__ u16 to_bf16(float v) {
    u32 u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                            // round to nearest even
    return (u16)(u >> 16);
}

__device__ __forceinline__ float from_bf16(u16 v) { return __uint_as_float(((u32)v) << 16); }
"""

SOURCE = PRELUDE + r"""
#ifndef ROWS
#define ROWS 1
#endif
#ifndef OUTS
#define OUTS 1
#endif
#ifndef UNROLL
#define UNROLL 2
#endif
// warps a block: the studio launches 4 (WARPS_PER_BLOCK); bench/nf4_probe.py sweeps 8 too
#ifndef WARPS
#define WARPS 4
#endif

__device__ __forceinline__ void load_weights(const u32* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

// y[r, n] = sum_k x[r, k] * code[q(n, k)] * absmax(n, k / 64)  (+ bias[n])
// One warp (or `split` warps along K) per OUTS output features; each lane takes chunks of 16 weights,
// UNROLL chunks at a time: first every load of those chunks (weights, absmax, x), then the arithmetic.
__device__ __forceinline__ void nf4_rows_block(const int block,
    const u16* __restrict__ x, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
    __shared__ float table[16];
    __shared__ float table2[256];
    __shared__ float partial[WARPS][OUTS][ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
    if (nested) for (int i = threadIdx.x; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int groups = WARPS / split;
    const int piece = warp % split;
    const int n0 = (block * groups + warp / split) * OUTS;
    const int chunks = K >> 4;          // 16 weights (8 bytes) a chunk; 4 chunks a 64-block
    const int blocks_per_row = K >> 6;
    const float offset = (float)offset_d;
    const int stride = 32 * split;

    float acc[OUTS][ROWS];
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[o][r] = 0.0f;

    if (n0 < N) {
        for (int c0 = piece * 32 + lane; c0 < chunks; c0 += stride * UNROLL) {
            u32 wv[UNROLL][OUTS][2];
            u32 xv[UNROLL][ROWS][8];
            u32 code_of[UNROLL][OUTS];   // nested: the absmax's 8-bit code
            float scale[UNROLL][OUTS];   // nested: its block's second-level absmax; else the absmax
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int c = min(c0 + u * stride, chunks - 1);  // past the end: loaded, not added
#pragma unroll
                for (int o = 0; o < OUTS; ++o) {
                    const int n = min(n0 + o, N - 1);
                    load_weights(w + ((size_t)n * chunks + c) * 2, wv[u][o][0], wv[u][o][1]);
                    const size_t b = (size_t)n * blocks_per_row + (c >> 2);
                    if (nested) {
                        code_of[u][o] = qabsmax[b];
                        scale[u][o] = absmax2[b >> 8];
                    } else {
                        code_of[u][o] = 0u;
                        scale[u][o] = absmax[b];
                    }
                }
#pragma unroll
                for (int r = 0; r < ROWS; ++r) load_x(x + (size_t)r * K + c * 16, xv[u][r]);
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (c0 + u * stride < chunks) {
                    float xs[ROWS][16];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            xs[r][2 * j] = __uint_as_float(xv[u][r][j] << 16);
                            xs[r][2 * j + 1] = __uint_as_float(xv[u][r][j] & 0xffff0000u);
                        }
#pragma unroll
                    for (int o = 0; o < OUTS; ++o) {
                        float s[ROWS];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const u32 word = wv[u][o][h];
                            // each byte's high and low nibble times 4: a byte offset into the table
                            const u32 high4 = (word >> 2) & 0x3c3c3c3cu, low4 = (word << 2) & 0x3c3c3c3cu;
#pragma unroll
                            for (int b = 0; b < 4; ++b) {
                                const int j = 4 * h + b;
                                const float hi = *(const float*)((const char*)table + __byte_perm(high4, 0u, 0x4440u + b));
                                const float lo = *(const float*)((const char*)table + __byte_perm(low4, 0u, 0x4440u + b));
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) {
                                    s[r] = fmaf(hi, xs[r][2 * j], s[r]);
                                    s[r] = fmaf(lo, xs[r][2 * j + 1], s[r]);
                                }
                            }
                        }
                        // bitsandbytes' absmax: code2[q] * absmax2 + offset, in fp32, in that order
                        const float am = nested ? __fadd_rn(__fmul_rn(table2[code_of[u][o]], scale[u][o]), offset)
                                                : scale[u][o];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[o][r] = fmaf(s[r], am, acc[o][r]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
            float v = acc[o][r];
#pragma unroll
            for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
            if (lane == 0) partial[warp][o][r] = v;
        }
    __syncthreads();
    if (piece == 0 && lane < OUTS * ROWS) {
        const int o = lane / ROWS, r = lane % ROWS;
        const int n = n0 + o;
        if (n < N) {
            float v = 0.0f;
            for (int p = 0; p < split; ++p) v += partial[warp + p][o][r];
            u16 out = to_bf16(v);
            if (has_bias) out = to_bf16(from_bf16(out) + from_bf16(bias[n]));
            y[(size_t)r * N + n] = out;
        }
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_rows(
    const u16* __restrict__ x, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
    nf4_rows_block(blockIdx.x, x, w, qabsmax, absmax2, code2, absmax, code, bias, y, N, K, offset_d, nested,
                   has_bias, split);
}

// Up to three weights that take the same rows (q, k and v; gate and up) in one launch: the first
// `blocks0` blocks compute the first weight's outputs exactly as its own launch would, and so on.
#define SEGMENT(i) const u32* __restrict__ w##i, const u8* __restrict__ qabsmax##i, \
    const float* __restrict__ absmax2##i, const float* __restrict__ code2##i, const float* __restrict__ absmax##i, \
    const float* __restrict__ code##i, const u16* __restrict__ bias##i, u16* __restrict__ y##i, int N##i, \
    double offset##i, int nested##i, int has_bias##i, int split##i, int blocks##i
#define SEGMENT_ARGS(i) x, w##i, qabsmax##i, absmax2##i, code2##i, absmax##i, code##i, bias##i, y##i, N##i, K, \
    offset##i, nested##i, has_bias##i, split##i

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_rows_grouped(
    const u16* __restrict__ x, int K, SEGMENT(0), SEGMENT(1), SEGMENT(2))
{
    int b = blockIdx.x;
    if (b < blocks0) { nf4_rows_block(b, SEGMENT_ARGS(0)); return; }
    b -= blocks0;
    if (b < blocks1) { nf4_rows_block(b, SEGMENT_ARGS(1)); return; }
    nf4_rows_block(b - blocks1, SEGMENT_ARGS(2));
}
"""


def launch_shape(out_features: int) -> tuple[int, int]:
    """(warps along K for one output, outputs a warp computes) for a layer with `out_features` outputs:
    the fastest of `bench/nf4_kernels.py --cuda-sweep` on the H200 for the 7B's shapes (many outputs:
    gate/up; some: q/o and down; few: k/v), and still the fastest on gate/up and down over weights the L2
    cannot hold (`bench/nf4_probe.py`, H100)."""
    if out_features >= 8192:
        return 2, 4
    if out_features >= 2048:
        return 4, 4
    return 4, 2


@dataclass
class LayerArgs:
    """What the kernel reads of one 4-bit weight, gathered once (reading the offset syncs the GPU, which a
    CUDA graph being recorded does not allow)."""

    weight: object
    out_features: int
    in_features: int
    nested: bool
    qabsmax: object   # absmax codes (nested) or None
    absmax2: object
    code2: object
    absmax: object    # fp32 absmax (not nested) or None
    code: object      # the 16 NF4 values, fp32
    offset: float


def layer_args(weight) -> LayerArgs:
    """The kernel's view of a bitsandbytes `Params4bit` (NF4, blocks of 64); ValueError for another kind."""
    import torch

    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or state.blocksize != 64:
        raise ValueError("the kernel takes NF4 weights quantized in blocks of 64")
    out_features, in_features = (int(d) for d in state.shape)
    if in_features % 64:
        raise ValueError(f"in_features {in_features} is not a multiple of 64")
    nested = bool(state.nested)
    if nested and state.state2.blocksize != 256:
        raise ValueError("the kernel takes double-quantized absmax in blocks of 256")
    # used in place (recorded CUDA graphs keep their addresses): tensors of another dtype are refused, not copied
    tables = (state.code, state.state2.absmax, state.state2.code) if nested else (state.code, state.absmax)
    if any(t.dtype != torch.float32 for t in tables):
        raise ValueError("the kernel takes bitsandbytes' fp32 code tables and absmax")
    if weight.data.data_ptr() % 8:
        raise ValueError("the kernel's loads need the 4-bit weight to start on 8 bytes")
    return LayerArgs(weight=weight.data, out_features=out_features, in_features=in_features, nested=nested,
                     qabsmax=state.absmax if nested else None,
                     absmax2=state.state2.absmax if nested else None,
                     code2=state.state2.code if nested else None,
                     absmax=None if nested else state.absmax,
                     code=state.code,
                     offset=float(state.offset) if nested else 0.0)


class Nf4Kernels:
    """The compiled kernels (one per row count and outputs per warp), compiled on first use (about a
    second each)."""

    dtype_name = "bfloat16"  # the rows it takes
    compute_dtype_name = "bfloat16"  # the 4-bit layers' compute dtype it stands in for
    device_type = "cuda"

    def __init__(self, unroll: int = 2, shapes: dict | None = None):
        self.unroll = unroll
        self.shapes = shapes or {}  # out_features -> (split, outs), overriding launch_shape
        self._compiled: dict = {}
        self.layer_cache: dict = {}  # id of a weight's quant state -> (the state, its LayerArgs): see `args_of`

    def kernel(self, rows: int, outs: int, name: str = "nf4_rows"):
        key = (rows, outs, name)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={self.unroll}"]
            self._compiled[key] = compile_kernel(SOURCE, name, options)
        return self._compiled[key]

    def grouped(self, layers: list[LayerArgs], x2d, biases: list) -> list:
        """x2d (1 to 3 rows) bf16 times each of 2 or 3 weights with the same in_features (q, k and v;
        gate and up), plus each one's bias, in one launch: [(rows, out) for each]. Each weight's outputs
        are computed as `products` computes them (its own launch shape; the outputs a warp takes do not
        change a sum), so they have the same bits (`group_problem` checks it)."""
        import torch

        rows = x2d.shape[0]
        if not 1 <= rows <= 3 or x2d.dtype != torch.bfloat16 or len(layers) not in (2, 3):
            raise ValueError(f"grouped products take 2 or 3 weights and 1 to 3 bf16 rows, got {len(layers)} "
                             f"weights and {rows} {x2d.dtype} rows")
        shapes = [self.shapes.get(layer.out_features) or launch_shape(layer.out_features) for layer in layers]
        outs = max(shape[1] for shape in shapes)
        x2d = aligned(x2d.contiguous())
        outputs, segments = [], []
        for layer, bias, (split, _) in zip(layers, biases, shapes):
            n = layer.out_features
            y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
            outputs.append(y)
            segments.append([layer.weight, _or(layer.qabsmax, y), _or(layer.absmax2, y), _or(layer.code2, y),
                             _or(layer.absmax, y), layer.code, _or(bias, y), y, n, layer.offset, int(layer.nested),
                             int(bias is not None), split, -(-n // ((WARPS_PER_BLOCK // split) * outs))])
        if len(segments) == 2:
            segments.append(segments[1][:-1] + [0])  # a third segment of no blocks
        blocks = sum(segment[-1] for segment in segments)
        args = [x2d, layers[0].in_features] + [arg for segment in segments for arg in segment]
        self.kernel(rows, outs, "nf4_rows_grouped")(grid=(blocks, 1, 1), block=(32 * WARPS_PER_BLOCK, 1, 1), args=args)
        return outputs

    def products(self, layer: LayerArgs, x2d, bias=None, shape: tuple[int, int] | None = None):
        """x2d (1 to 3 rows, in_features) bf16 times the layer's 4-bit weight, plus `bias`: (rows, out)."""
        import torch

        rows = x2d.shape[0]
        if not 1 <= rows <= 3 or x2d.dtype != torch.bfloat16:
            raise ValueError(f"the kernel takes 1 to 3 bf16 rows, got {rows} {x2d.dtype} rows")
        n = layer.out_features
        split, outs = shape or self.shapes.get(n) or launch_shape(n)
        x2d = aligned(x2d.contiguous())
        y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
        unused = y  # a pointer the kernel does not read for this layer's kind
        per_block = (WARPS_PER_BLOCK // split) * outs
        self.kernel(rows, outs)(grid=(-(-n // per_block), 1, 1), block=(32 * WARPS_PER_BLOCK, 1, 1), args=[
            x2d, layer.weight, _or(layer.qabsmax, unused), _or(layer.absmax2, unused), _or(layer.code2, unused),
            _or(layer.absmax, unused), layer.code, _or(bias, unused), y, n, layer.in_features, layer.offset,
            int(layer.nested), int(bias is not None), split])
        return y


def compile_kernel(source: str, name: str, options: list[str]):
    """Compile `source` with NVRTC for this GPU and load kernel `name` (a callable taking grid, block and
    args, launched on the current stream). Unlike `torch.cuda._compile_kernel`, needs no CUDA toolkit
    (no CUDA_HOME): the source includes no headers, and NVRTC comes with PyTorch's CUDA build."""
    import ctypes

    import torch
    from torch.cuda import _utils

    major, minor = torch.cuda.get_device_capability()
    nvrtc = _utils._get_gpu_rtc_library()
    program = ctypes.c_void_p()
    _nvrtc_check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(),
                                                 0, None, None))
    try:
        flags = [f"--gpu-architecture=sm_{major}{minor}", "-std=c++17", *options]
        array = (ctypes.c_char_p * len(flags))(*[flag.encode() for flag in flags])
        if nvrtc.nvrtcCompileProgram(program, len(flags), array) != 0:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
            text = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(program, text)
            raise RuntimeError(f"NVRTC could not compile {name}: {text.value.decode(errors='replace')[:2000]}")
        size = ctypes.c_size_t()
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        binary = ctypes.create_string_buffer(size.value)
        _nvrtc_check(nvrtc, nvrtc.nvrtcGetCUBIN(program, binary))
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return _utils._cuda_load_module(binary.raw, [name])[name]


def _nvrtc_check(nvrtc, result: int) -> None:
    if result != 0:
        import ctypes

        message = ctypes.c_char_p()
        nvrtc.nvrtcGetErrorString(result, ctypes.byref(message))
        raise RuntimeError(f"NVRTC error {result}: {(message.value or b'').decode()}")


def four_bit_layers(model) -> list:
    """bitsandbytes' 4-bit linear layers of `model` (peft's LoRA wrappers excluded: their base layers count)."""
    import torch

    return [m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and type(getattr(m, "weight", None)).__name__ == "Params4bit"]


def kernel_ready(model, kernels: Nf4Kernels, rows: tuple[int, ...] = (1, 2)) -> str | None:
    """None when the kernel can stand in for bitsandbytes on every 4-bit layer of `model`: each layer
    shape is checked on random rows against bitsandbytes (within bf16 rounding: 3% of the largest
    output) and, for several rows, each row against that row alone, bit for bit. Else why not."""
    import torch

    if kernels.device_type == "cuda" and not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    shapes: dict = {}
    for module in four_bit_layers(model):
        shapes.setdefault((module.in_features, module.out_features, module.bias is not None), module)
    if not shapes:
        return "the model has no 4-bit layers"
    try:
        for module in shapes.values():
            problem = layer_problem(module, kernels, rows)
            if problem:
                return problem
    except Exception as exc:  # no NVRTC, a compile or launch failure: bitsandbytes' kernel is used
        return f"{exc.__class__.__name__}: {str(exc)[:300]}"
    return None


def layer_problem(module, kernels: Nf4Kernels, rows: tuple[int, ...]) -> str | None:
    """Why the kernel cannot stand in for bitsandbytes on this 4-bit layer (None: it can)."""
    import torch

    dtype, compute = getattr(torch, kernels.dtype_name), getattr(torch, kernels.compute_dtype_name)
    if getattr(module, "compute_dtype", compute) != compute:
        return f"4-bit layers compute in {module.compute_dtype}, the kernel in {compute}"
    layer = layer_args(module.weight)
    shape = f"{module.out_features}x{module.in_features}"
    # drawn on the CPU with its own generator: the GPU's random state is left alone
    x = torch.randn(max(rows), module.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(device=module.weight.device, dtype=dtype)
    with torch.inference_mode():
        reference = module(x[:1]).float()
        bias = _bias_of(module, kernels)
        alone = [kernels.products(layer, x[i:i + 1], bias) for i in range(max(rows))]
        error = (alone[0].float() - reference).abs().max().item()
        if not error <= 0.03 * reference.abs().max().item():
            return f"on a {shape} layer the kernel differs from bitsandbytes by {error:.3g}"
        for count in rows:
            together = kernels.products(layer, x[:count], bias)
            if not torch.equal(together, torch.cat(alone[:count])):
                return f"on a {shape} layer a row of {count} rows differs from that row alone"
    return None


SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def sibling_groups(model) -> list[list]:
    """The 4-bit layers that take the same input in each block of `model` (q, k and v; gate and up), in
    the order the block calls them; peft's LoRA wrappers are looked through to their 4-bit layers."""
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [_four_bit(getattr(parent, name, None)) for name in names]
            if all(m is not None for m in members) and len({m.in_features for m in members}) == 1:
                groups.append(members)
    return groups


def _four_bit(module):
    module = getattr(module, "base_layer", module)
    return module if type(getattr(module, "weight", None)).__name__ == "Params4bit" else None


def group_problem(members: list, kernels: Nf4Kernels, rows: tuple[int, ...]) -> str | None:
    """Why the grouped launch cannot stand in for the members' own launches (None: it can): on random
    rows, each member's outputs must equal its own launch's bit for bit."""
    import torch

    dtype = getattr(torch, kernels.dtype_name)
    layers = [layer_args(m.weight) for m in members]
    biases = [_bias_of(m, kernels) for m in members]
    x = torch.randn(max(rows), members[0].in_features, generator=torch.Generator().manual_seed(1))
    x = x.to(device=members[0].weight.device, dtype=dtype)
    shape = "+".join(str(m.out_features) for m in members) + f"x{members[0].in_features}"
    with torch.inference_mode():
        for count in rows:
            together = kernels.grouped(layers, x[:count], biases)
            for layer, bias, got in zip(layers, biases, together):
                if not torch.equal(got, kernels.products(layer, x[:count], bias)):
                    return f"on {shape} layers a grouped launch differs from the layers' own launches"
    return None


def groups_ready(model, kernels: Nf4Kernels, rows: tuple[int, ...] = (1, 2)) -> tuple[list, str | None]:
    """(the sibling groups whose grouped launch passed its check, why the others did not): each shape
    of group is checked once."""
    checked: dict = {}
    ready, problem = [], None
    try:
        for members in sibling_groups(model):
            key = tuple((m.in_features, m.out_features, m.bias is not None) for m in members)
            if key not in checked:
                checked[key] = group_problem(members, kernels, rows)
            if checked[key] is None:
                ready.append(members)
            else:
                problem = problem or checked[key]
    except Exception as exc:  # a compile or launch failure: every layer keeps its own launch
        return [], f"{exc.__class__.__name__}: {str(exc)[:300]}"
    return ready, problem


@contextmanager
def kernel_layers(model, kernels: Nf4Kernels, max_rows: int = 2) -> Iterator[None]:
    """For the block, every 4-bit layer of `model` takes 1 to `max_rows` bf16 token rows through the
    kernel; other inputs (a prompt, another dtype) still go to bitsandbytes."""
    from studio.model.routing import override_forward, restore_forwards

    patched: list = []
    try:
        for module in four_bit_layers(model):
            override_forward(patched, module, _kernel_forward(module, kernels, max_rows))
        yield
    finally:
        restore_forwards(patched)


@contextmanager
def grouped_layers(groups: list, kernels: Nf4Kernels, max_rows: int = 2) -> Iterator[None]:
    """For the block (inside `kernel_layers`), the layers of each of `groups` (from `groups_ready`) take
    their token rows in one launch: the first layer called computes every member's outputs, and the
    others hand back theirs when called with the very same input. Only for batches whose rows reach the
    layers together: rows split one by one reach each layer as new tensors, and each member would run
    its own launch after the grouped one (see `GraphDecoder._grouped_layers`)."""
    from studio.model.routing import override_forward, restore_forwards

    patched: list = []
    try:
        for members in groups:
            for module, forward in zip(members, _grouped_forwards(members, kernels, max_rows)):
                override_forward(patched, module, forward)
        yield
    finally:
        restore_forwards(patched)


def _grouped_forwards(members: list, kernels: Nf4Kernels, max_rows: int) -> list:
    """The members' forwards: the first computes every member's outputs in one launch and keeps the
    others' for them, with the input they belong to; a member called with another input (or after its
    outputs were taken) runs its own launch."""
    from studio.model.routing import sibling_forwards

    own = [module.forward for module in members]  # each layer's own launch (from `kernel_layers`)
    layers = [args_of(module.weight, kernels) for module in members]

    def every_output(x):
        if not _kernel_takes(x, kernels, max_rows):
            return None
        rows = x.numel() // x.shape[-1]
        outputs = kernels.grouped(layers, x.reshape(rows, x.shape[-1]), [_bias_of(m, kernels) for m in members])
        return [y.view(*x.shape[:-1], y.shape[-1]) for y in outputs]

    return sibling_forwards(every_output, own)


def _kernel_takes(x, kernels: Nf4Kernels, max_rows: int) -> bool:
    import torch

    return (x.numel() // x.shape[-1] <= max_rows and x.dtype == getattr(torch, kernels.dtype_name)
            and x.device.type == kernels.device_type)


def _bias_of(module, kernels: Nf4Kernels):
    import torch

    compute = getattr(torch, kernels.compute_dtype_name)
    bias = module.bias  # bitsandbytes adds it in the compute dtype
    return bias if bias is None or bias.dtype == compute else bias.to(compute)


def _kernel_forward(module, kernels: Nf4Kernels, max_rows: int):
    layer, original = args_of(module.weight, kernels), module.forward

    def forward(x, *args, **kwargs):
        rows = x.numel() // x.shape[-1]
        if not _kernel_takes(x, kernels, max_rows) or args or kwargs:
            return original(x, *args, **kwargs)
        y = kernels.products(layer, x.reshape(rows, x.shape[-1]), _bias_of(module, kernels))
        return y.view(*x.shape[:-1], layer.out_features)

    return forward


def args_of(weight, kernels) -> LayerArgs:
    """`layer_args(weight)`, gathered once per weight for `kernels` (it reads the absmax offset from the GPU,
    a sync: once per 4-bit layer per reply added some 5 ms to each reply's first token on the 7B). Kept
    while the weight's quant state and data are the same objects and address."""
    cache = getattr(kernels, "layer_cache", None)
    if cache is None:
        return layer_args(weight)
    state = getattr(weight, "quant_state", None)
    kept = cache.get(id(state))
    if kept is not None and kept[0] is state and kept[1].weight.data_ptr() == weight.data.data_ptr():
        return kept[1]
    args = layer_args(weight)
    cache[id(state)] = (state, args)
    return args


def aligned(tensor):
    """`tensor`, or a copy of it where its data does not start on 16 bytes (the kernels' vector loads)."""
    return tensor if tensor.data_ptr() % 16 == 0 else tensor.clone()


def _or(tensor, fallback):
    return fallback if tensor is None else tensor
