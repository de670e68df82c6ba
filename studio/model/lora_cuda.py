"""Two CUDA kernels for an adapter's update in the decode step: a LoRA layer's update in two launches.

With an adapter, every LoRA layer of a one-token step adds `scaling * B(A(x))` to its base output. peft
computes that with seven kernels a layer: the row cast to the adapter's dtype, cuBLAS's two one-row
products (three kernels), the scaling, the cast back and the add. On the 7B shape that is 1,372 small
kernels a step, most of the difference between the adapter's step (6.6 ms) and the base step (3.7 ms)
on the H200 (`bench/chat_speed.py`, `recorded_steps`). Here the same arithmetic runs in two:

- `lora_down`: the rank's sums `t = x A^T` in fp32, the input split into slices, one block per rank row
  and slice (each block's sum in a fixed order), the slices' partial sums written out;
- `lora_up_add`: each block adds the slices' partial sums in order (giving `t`, rounded to bf16 where the
  adapter is bf16), then one thread per output computes `u = t B^T`, scales it and adds it to the base
  output in place, casting as peft does (for 4-bit and 8-bit layers the update is cast to bf16 before the
  add; for a plain linear layer the bf16 output is added to the fp32 update).

Each row of a call is computed by the same instructions whatever the other rows are, so side by side's
adapter row has the bits of the adapter's chat. The sums run in another order than cuBLAS's, so results
may differ from peft's in the last bits; the graph decoder checks the kernels once per layer shape
against peft's arithmetic (`update_problem`) before it uses them, and peft's path stays in place where
the check fails.

Compiled at run time with NVRTC, like `studio.model.nf4_cuda`: no CUDA toolkit needed.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.model.nf4_cuda import PRELUDE, compile_kernel

THREADS = 256
PER_THREAD = 4      # input elements a thread of `lora_down` adds (sets the number of slices)
MAX_RANK = 64
MAX_ROWS = 3

SOURCE = PRELUDE + r"""
#define THREADS 256
#define MAX_RANK 64
#define MAX_ROWS 3
#ifdef WEIGHTS_BF16
typedef u16 weight_t;
__device__ __forceinline__ float weight(const weight_t* p) { return from_bf16(*p); }
__device__ __forceinline__ float as_weight_dtype(float v) { return from_bf16(to_bf16(v)); }
#else
typedef float weight_t;
__device__ __forceinline__ float weight(const weight_t* p) { return *p; }
__device__ __forceinline__ float as_weight_dtype(float v) { return v; }
#endif

// partial[r][j][s] = sum over slice s of x[r][k] * A[j][k]   (grid: rank x slices)
extern "C" __global__ void __launch_bounds__(THREADS) lora_down(
    const u16* __restrict__ x, const weight_t* __restrict__ A, float* __restrict__ partial,
    int K, int rank, int rows, int slice)
{
    __shared__ float warp_sums[MAX_ROWS][THREADS / 32];
    const int j = blockIdx.x, s = blockIdx.y, slices = gridDim.y;
    const int begin = s * slice, end = min(K, begin + slice);
    float sum[MAX_ROWS];
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) sum[r] = 0.0f;
#pragma unroll 4
    for (int k = begin + threadIdx.x; k < end; k += THREADS) {
        const float a = weight(A + (size_t)j * K + k);
#pragma unroll
        for (int r = 0; r < MAX_ROWS; ++r)
            if (r < rows) sum[r] = fmaf(as_weight_dtype(from_bf16(x[(size_t)r * K + k])), a, sum[r]);
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int r = 0; r < MAX_ROWS; ++r) {
        float v = sum[r];
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
        if (lane == 0) warp_sums[r][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x < rows) {
        float v = 0.0f;
        for (int w = 0; w < THREADS / 32; ++w) v += warp_sums[threadIdx.x][w];
        partial[((size_t)threadIdx.x * rank + j) * slices + s] = v;
    }
}

// y[r][n] = y[r][n] + scaling * (t[r] . B[n])   (t from the slices' partial sums; grid: outputs / THREADS)
extern "C" __global__ void __launch_bounds__(THREADS) lora_up_add(
    const float* __restrict__ partial, const weight_t* __restrict__ B, u16* __restrict__ y,
    int N, int rank, int rows, int slices, double scaling_d, int cast_update_first)
{
    __shared__ float t[MAX_ROWS][MAX_RANK];
    const float scaling = (float)scaling_d;
    for (int i = threadIdx.x; i < rows * rank; i += THREADS) {
        float v = 0.0f;
        for (int s = 0; s < slices; ++s) v += partial[(size_t)i * slices + s];
        t[i / rank][i % rank] = as_weight_dtype(v);
    }
    __syncthreads();
    const int n = blockIdx.x * THREADS + threadIdx.x;
    if (n >= N) return;
    const weight_t* b = B + (size_t)n * rank;
    for (int r = 0; r < rows; ++r) {
        float u = 0.0f;
        for (int j = 0; j < rank; ++j) u = fmaf(weight(b + j), t[r][j], u);
        // the update in the adapter's dtype, scaled there (peft: lora_B(lora_A(x)) * scaling)
        const float update = as_weight_dtype(__fmul_rn(as_weight_dtype(u), scaling));
        const float base = from_bf16(y[(size_t)r * N + n]);
        const float added = cast_update_first ? from_bf16(to_bf16(update)) : update;
        y[(size_t)r * N + n] = to_bf16(__fadd_rn(base, added));
    }
}
"""


@dataclass(frozen=True)
class UpdateShape:
    """What the kernels' arithmetic depends on, for one LoRA layer and adapter (checked once each)."""

    in_features: int
    out_features: int
    rank: int
    weights_bf16: bool      # the adapter's A and B in bf16 (else fp32)
    cast_update_first: bool  # peft's 4/8-bit layers cast the update to the output's dtype before adding


class LoraKernels:
    """The compiled kernel pairs (fp32 and bf16 adapter weights), compiled on first use."""

    device_type = "cuda"

    def __init__(self):
        self._compiled: dict = {}
        self._checked: dict = {}  # UpdateShape -> None or why the kernels are not used for it

    def kernels(self, weights_bf16: bool):
        if weights_bf16 not in self._compiled:
            options = ["-DWEIGHTS_BF16"] if weights_bf16 else []
            self._compiled[weights_bf16] = (compile_kernel(SOURCE, "lora_down", options),
                                            compile_kernel(SOURCE, "lora_up_add", options))
        return self._compiled[weights_bf16]

    def add_update(self, x2d, y2d, weight_a, weight_b, scaling: float, cast_update_first: bool) -> None:
        """y2d (rows, out) bf16 += scaling * (x2d A^T) B^T, in place, as peft computes it for each row."""
        import torch

        rows, in_features = x2d.shape
        rank = weight_a.shape[0]
        slice_len = THREADS * PER_THREAD
        slices = -(-in_features // slice_len)
        partial = torch.empty((rows, rank, slices), dtype=torch.float32, device=x2d.device)
        down, up_add = self.kernels(weight_a.dtype == torch.bfloat16)
        down(grid=(rank, slices, 1), block=(THREADS, 1, 1),
             args=[x2d, weight_a, partial, in_features, rank, rows, slice_len])
        out_features = y2d.shape[1]
        up_add(grid=(-(-out_features // THREADS), 1, 1), block=(THREADS, 1, 1),
               args=[partial, weight_b, y2d, out_features, rank, rows, slices, float(scaling),
                     int(cast_update_first)])

    def takes(self, x, part, weight_a, weight_b) -> bool:
        """Whether `add_update` takes this call (see `takes`)."""
        return takes(x, part, weight_a, weight_b, self.device_type)

    def problem(self, shape: UpdateShape, device) -> str | None:
        """Why the kernels cannot stand in for peft's arithmetic on a layer of `shape` (None: they can);
        checked once per shape."""
        if getattr(device, "type", str(device)) != self.device_type:
            return f"the adapter is on {device}; the kernels need a CUDA GPU"
        if shape not in self._checked:
            try:
                self._checked[shape] = update_problem(self, shape, device)
            except Exception as exc:  # no NVRTC, a compile or launch failure: peft's arithmetic is used
                self._checked[shape] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
        return self._checked[shape]


def takes(x, part, weight_a, weight_b, device_type: str = "cuda") -> bool:
    """Whether the kernels take this call: 1 to 3 bf16 token rows on `device_type` (the GPU), a
    contiguous output, the adapter's weights in fp32 or bf16 and a rank of at most 64."""
    import torch

    in_features = x.shape[-1]
    rows = x.numel() // in_features if in_features else 0
    return (x.device.type == device_type and x.dtype == torch.bfloat16 and part.dtype == torch.bfloat16 and 1 <= rows <= MAX_ROWS
            and x.is_contiguous() and part.is_contiguous() and part.numel() == rows * weight_b.shape[0]
            and weight_a.dtype == weight_b.dtype and weight_a.dtype in (torch.float32, torch.bfloat16)
            and weight_a.shape[0] <= MAX_RANK and weight_a.is_contiguous() and weight_b.is_contiguous())


def update_problem(kernels, shape: UpdateShape, device) -> str | None:
    """The kernels against peft's arithmetic on random weights of `shape`: the update alone within 1% of
    the largest update (the sums' order differs), the update added to a base output within 1% of the
    largest output, and each row of 2 and 3 rows bit for bit that row alone. None, or what differs."""
    import torch

    dtype = torch.bfloat16 if shape.weights_bf16 else torch.float32
    generator = torch.Generator().manual_seed(0)  # on the CPU: the GPU's random state is left alone

    def drawn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device)

    a = drawn(shape.rank, shape.in_features, scale=shape.in_features ** -0.5).to(dtype)
    b = drawn(shape.out_features, shape.rank, scale=shape.rank ** -0.5).to(dtype)
    x = drawn(MAX_ROWS, shape.in_features).to(torch.bfloat16)
    base = drawn(MAX_ROWS, shape.out_features, scale=4.0).to(torch.bfloat16)
    scaling = 1.7  # not a power of two: a scaling applied at the wrong precision shows
    label = f"a rank-{shape.rank} {shape.out_features}x{shape.in_features} update ({dtype})"

    def reference(y):
        update = ((x.to(dtype) @ a.t()) @ b.t()) * scaling
        if shape.cast_update_first:
            return y + update.to(y.dtype)
        return (y + update).to(y.dtype)

    def kernel(y, rows: slice):
        out = y[rows].clone()
        kernels.add_update(x[rows], out, a, b, scaling, shape.cast_update_first)
        return out

    with torch.inference_mode():
        zero = torch.zeros_like(base)
        expected, got = reference(zero).float(), kernel(zero, slice(0, MAX_ROWS)).float()
        if not (got - expected).abs().max().item() <= 0.01 * expected.abs().max().item() + 1e-6:
            return f"on {label} the kernels' update differs from peft's"
        expected, alone = reference(base).float(), [kernel(base, slice(i, i + 1)) for i in range(MAX_ROWS)]
        if not (torch.cat(alone).float() - expected).abs().max().item() <= 0.01 * expected.abs().max().item():
            return f"on {label} the kernels' sum with the base output differs from peft's"
        for rows in range(2, MAX_ROWS + 1):
            together = kernel(base, slice(0, rows))
            if not torch.equal(together, torch.cat(alone[:rows])):
                return f"on {label} a row of {rows} rows differs from that row alone"
    return None


def unsupported(layer, name: str) -> str | None:
    """Why the kernels do not compute `name`'s update on peft LoRA layer `layer` (None: they can): a
    LoRA layer with biases of its own, dropout that is on, weights that are not an fp32 or bf16 matrix
    pair of rank 64 at most, or a scaling that is not a number."""
    import torch

    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    dropout = layer.lora_dropout[name]
    if not (isinstance(lora_a, torch.nn.Linear) and isinstance(lora_b, torch.nn.Linear)):
        return "its LoRA matrices are not linear layers"
    if lora_a.bias is not None or lora_b.bias is not None:
        return "the adapter has biases of its own"
    if dropout.training and float(getattr(dropout, "p", 0.0)) > 0.0:
        return "its dropout is on"
    if lora_a.weight.dtype != lora_b.weight.dtype or lora_a.weight.dtype not in (torch.float32, torch.bfloat16):
        return f"its weights are {lora_a.weight.dtype} and {lora_b.weight.dtype}; the kernels take fp32 or bf16 pairs"
    if lora_a.out_features > MAX_RANK:
        return f"its rank {lora_a.out_features} is above {MAX_RANK}"
    if not isinstance(layer.scaling[name], (int, float)):
        return "its scaling is not a number"
    return None


def update_shape(layer, name: str) -> UpdateShape:
    """What the kernels' arithmetic depends on for `name`'s update on `layer` (see `unsupported` first)."""
    import torch

    lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
    return UpdateShape(in_features=lora_a.in_features, out_features=lora_b.out_features, rank=lora_a.out_features,
                       weights_bf16=lora_a.weight.dtype == torch.bfloat16,
                       cast_update_first=type(layer).__module__.endswith(".bnb"))


def adapter_problem(layers: list, name: str, kernels) -> str | None:
    """Why the kernels do not compute `name`'s update on these LoRA layers (None: they do, on every layer
    that holds it). Each layer shape is checked once (`LoraKernels.problem`)."""
    held = [layer for layer in layers if name in layer.lora_A]
    if not held:
        return f"no layer holds adapter {name!r}"
    for layer in held:
        problem = unsupported(layer, name) or kernels.problem(update_shape(layer, name),
                                                              layer.lora_A[name].weight.device)
        if problem:
            return problem
    return None
