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

The LoRA layers that take the same rows (q, k and v; gate and up) can take their updates together:
`add_updates` runs each kernel once for two or three layers (8 launches a block of the 7B instead of 14),
each member's blocks running the single layer's code, so each update keeps its bits (`group_problem`
checks it once per group shape; `lora_groups` finds the groups an adapter has).

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

// partial[r][j][s] = sum over slice s of x[r][k] * A[j][k]   (one block per rank row j and slice s)
__device__ __forceinline__ void lora_down_block(const int j, const int s, const int slices,
    const u16* __restrict__ x, const weight_t* __restrict__ A, float* __restrict__ partial,
    int K, int rank, int rows, int slice)
{
    __shared__ float warp_sums[MAX_ROWS][THREADS / 32];
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

// grid: rank x slices
extern "C" __global__ void __launch_bounds__(THREADS) lora_down(
    const u16* __restrict__ x, const weight_t* __restrict__ A, float* __restrict__ partial,
    int K, int rank, int rows, int slice)
{
    lora_down_block(blockIdx.x, blockIdx.y, gridDim.y, x, A, partial, K, rank, rows, slice);
}

// y[r][n] = y[r][n] + scaling * (t[r] . B[n])   (t from the slices' partial sums; block b: outputs from b * THREADS)
__device__ __forceinline__ void lora_up_add_block(const int block,
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
    const int n = block * THREADS + threadIdx.x;
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

// grid: outputs / THREADS
extern "C" __global__ void __launch_bounds__(THREADS) lora_up_add(
    const float* __restrict__ partial, const weight_t* __restrict__ B, u16* __restrict__ y,
    int N, int rank, int rows, int slices, double scaling_d, int cast_update_first)
{
    lora_up_add_block(blockIdx.x, partial, B, y, N, rank, rows, slices, scaling_d, cast_update_first);
}

// Up to three LoRA layers that take the same rows (q, k and v; gate and up) in one launch of each kernel.
// Each member's blocks run the single-layer code above with that member's arguments, so its update has
// the bits of its own launches (`group_problem` checks it). lora_down_grouped: grid rank x slices x 3
// (rank: the largest member's; blocks past a member's rank or members do nothing).
extern "C" __global__ void __launch_bounds__(THREADS) lora_down_grouped(
    const u16* __restrict__ x, int K, int rows, int slice, int members,
    const weight_t* __restrict__ A0, float* __restrict__ partial0, int rank0,
    const weight_t* __restrict__ A1, float* __restrict__ partial1, int rank1,
    const weight_t* __restrict__ A2, float* __restrict__ partial2, int rank2)
{
    const int m = blockIdx.z;
    if (m >= members) return;
    const weight_t* A = m == 0 ? A0 : (m == 1 ? A1 : A2);
    float* partial = m == 0 ? partial0 : (m == 1 ? partial1 : partial2);
    const int rank = m == 0 ? rank0 : (m == 1 ? rank1 : rank2);
    if (blockIdx.x >= rank) return;
    lora_down_block(blockIdx.x, blockIdx.y, gridDim.y, x, A, partial, K, rank, rows, slice);
}

// lora_up_add_grouped: the first blocks0 blocks add the first member's update, the next blocks1 the second's, ...
#define UP_SEGMENT(i) const float* __restrict__ partial##i, const weight_t* __restrict__ B##i, u16* __restrict__ y##i, \
    int N##i, int rank##i, double scaling##i, int cast##i, int blocks##i
#define UP_ARGS(i) partial##i, B##i, y##i, N##i, rank##i, rows, slices, scaling##i, cast##i
extern "C" __global__ void __launch_bounds__(THREADS) lora_up_add_grouped(
    int rows, int slices, UP_SEGMENT(0), UP_SEGMENT(1), UP_SEGMENT(2))
{
    int b = blockIdx.x;
    if (b < blocks0) { lora_up_add_block(b, UP_ARGS(0)); return; }
    b -= blocks0;
    if (b < blocks1) { lora_up_add_block(b, UP_ARGS(1)); return; }
    lora_up_add_block(b - blocks1, UP_ARGS(2));
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

    def add_updates(self, x2d, updates: list) -> None:
        """`add_update` for 2 or 3 layers that take the same rows x2d (q, k and v; gate and up), each of
        `updates` a (y2d, weight_a, weight_b, scaling, cast_update_first), in one launch of each kernel;
        each member's update has the bits of its own `add_update` (`group_problem` checks it)."""
        import torch

        if not 2 <= len(updates) <= 3 or len({u[1].dtype for u in updates}) != 1:
            raise ValueError(f"grouped updates take 2 or 3 layers with weights of one dtype, got {len(updates)}")
        rows, in_features = x2d.shape
        slice_len = THREADS * PER_THREAD
        slices = -(-in_features // slice_len)
        partials = [torch.empty((rows, a.shape[0], slices), dtype=torch.float32, device=x2d.device)
                    for _, a, _, _, _ in updates]
        down, up_add = self.grouped_kernels(updates[0][1].dtype == torch.bfloat16)
        members = [[a, partial, a.shape[0]] for (_, a, _, _, _), partial in zip(updates, partials)]
        members += [members[-1]] * (3 - len(members))  # unused slots: never read (`members` bounds them)
        down(grid=(max(a.shape[0] for _, a, _, _, _ in updates), slices, len(updates)), block=(THREADS, 1, 1),
             args=[x2d, in_features, rows, slice_len, len(updates), *[arg for member in members for arg in member]])
        segments = [[partial, b, y2d, y2d.shape[1], a.shape[0], float(scaling), int(cast), -(-y2d.shape[1] // THREADS)]
                    for (y2d, a, b, scaling, cast), partial in zip(updates, partials)]
        if len(segments) == 2:
            segments.append(segments[1][:-1] + [0])  # a third segment of no blocks
        up_add(grid=(sum(segment[-1] for segment in segments), 1, 1), block=(THREADS, 1, 1),
               args=[rows, slices, *[arg for segment in segments for arg in segment]])

    def grouped_kernels(self, weights_bf16: bool):
        key = ("grouped", weights_bf16)
        if key not in self._compiled:
            options = ["-DWEIGHTS_BF16"] if weights_bf16 else []
            self._compiled[key] = (compile_kernel(SOURCE, "lora_down_grouped", options),
                                   compile_kernel(SOURCE, "lora_up_add_grouped", options))
        return self._compiled[key]

    def takes(self, x, part, weight_a, weight_b) -> bool:
        """Whether `add_update` takes this call (see `takes`)."""
        return takes(x, part, weight_a, weight_b, self.device_type)

    def group_problem(self, shapes: tuple, device) -> str | None:
        """Why one grouped launch cannot stand in for the own launches of layers of `shapes` (None: it
        can); checked once per tuple of shapes (see `group_problem`)."""
        key = ("grouped", shapes)
        if key not in self._checked:
            try:
                self._checked[key] = group_problem(self, shapes, device)
            except Exception as exc:  # a compile or launch failure: each layer keeps its own launches
                self._checked[key] = f"{exc.__class__.__name__}: {str(exc)[:300]}"
        return self._checked[key]

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


def group_problem(kernels, shapes: tuple, device) -> str | None:
    """The grouped launches against each member's own `add_update` on random weights of `shapes` (one
    input size): every member's output bit for bit, for 1 to MAX_ROWS rows. None, or what differs."""
    import torch

    generator = torch.Generator().manual_seed(2)

    def drawn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device)

    members = []
    for shape in shapes:
        dtype = torch.bfloat16 if shape.weights_bf16 else torch.float32
        members.append((drawn(shape.rank, shape.in_features, scale=shape.in_features ** -0.5).to(dtype),
                        drawn(shape.out_features, shape.rank, scale=shape.rank ** -0.5).to(dtype),
                        drawn(MAX_ROWS, shape.out_features, scale=4.0).to(torch.bfloat16), 1.7, shape.cast_update_first))
    x = drawn(MAX_ROWS, shapes[0].in_features).to(torch.bfloat16)
    label = "+".join(f"{shape.out_features}" for shape in shapes) + f"x{shapes[0].in_features}"
    with torch.inference_mode():
        for rows in range(1, MAX_ROWS + 1):
            together = [base[:rows].clone() for _, _, base, _, _ in members]
            kernels.add_updates(x[:rows], [(y, a, b, scaling, cast) for y, (a, b, _, scaling, cast)
                                           in zip(together, members)])
            for got, (a, b, base, scaling, cast) in zip(together, members):
                alone = base[:rows].clone()
                kernels.add_update(x[:rows], alone, a, b, scaling, cast)
                if not torch.equal(got, alone):
                    return f"on {label} layers a grouped launch of the LoRA kernels differs from the layers' own ({rows} rows)"
    return None


def lora_groups(model, name: str, kernels) -> tuple[list, str | None]:
    """The LoRA layers of `model` that hold adapter `name` and take the same input (q, k and v; gate and
    up, in the order the block calls them; two or three of them), whose grouped launch passed its check,
    and why other such groups did not (None when all did)."""
    from studio.model.nf4_cuda import SIBLINGS

    groups, problem = [], None
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if m is not None and hasattr(m, "lora_A") and hasattr(m, "base_layer")
                       and name in m.lora_A and unsupported(m, name) is None]
            if len(members) < 2 or len({m.lora_A[name].in_features for m in members}) != 1:
                continue
            shapes = tuple(update_shape(m, name) for m in members)
            if len({shape.weights_bf16 for shape in shapes}) != 1:
                continue
            found = kernels.group_problem(shapes, members[0].lora_A[name].weight.device)
            if found is None:
                groups.append(members)
            else:
                problem = problem or found
    return groups, problem


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
                       cast_update_first=casts_update_first(layer))


def casts_update_first(layer) -> bool:
    """Whether peft casts `layer`'s LoRA update to the output's dtype before adding it (its 4/8-bit
    layers do; its plain Linear adds first, then casts)."""
    return type(layer).__module__.endswith(".bnb")


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
