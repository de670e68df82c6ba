"""Attention for the one-token decode step, as a CUDA kernel: one query per row over the static KV cache.

Over a static cache PyTorch's attention kernels are slow for a single query: the memory-efficient
kernel walks the whole cache in one block per head (about 40 us a layer on an H200 for a 1,024-slot
cache), and transformers first copies the cache's 4 key/value heads out to the 28 query heads
(another 20 us a layer). That was a third of a 7B decode step (`bench/chat_speed.py`'s step profile).

This kernel splits the cache into chunks of 32 slots (the "flash-decoding" split): one block per
chunk and key/value head computes the scores of that head's query heads, their softmax within the
chunk and the weighted values; a second kernel combines the chunks per head. Slots the mask leaves
out are neither read nor counted. Each row (batch entry) is computed by the same instructions
whatever the other rows are, so a row of side by side has the bits of that row alone. Compiled at
run time with NVRTC like the 4-bit kernel (`studio.model.nf4_cuda.compile_kernel`).

The graph decoder puts it in place for the generation (`decode_attention`): the model's attention
implementation is switched to `studio-decode`, which runs this kernel for one-token steps with a
boolean mask over the cache and PyTorch's SDPA (transformers' `sdpa`) for everything else (the
prompt). Its masks are SDPA's.

A third kernel writes a one-token step's new keys and values into the static cache (`cache_write`): one
launch a layer where transformers' `StaticLayer.update` takes five (an arange, two integer adds and two
index copies). The graph decoder gives its caches' layers that update (`one_launch_cache_writes`) once
the kernel has passed its check (`cache_write_problem`); it copies, so the cache holds the same bits.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from studio.model.attention import replacing_sdpa, sdpa_configs
from studio.model.nf4_cuda import PRELUDE, aligned, compile_kernel

IMPLEMENTATION = "studio-decode"
KEYS_PER_CHUNK = 32

SOURCE = PRELUDE + r"""
struct __align__(16) uint4_ { u32 x, y, z, w; };
#define uint4 uint4_

#ifndef HEAD_DIM
#define HEAD_DIM 128
#endif
#define MAX_GROUP 8
#define CHUNK 32
#define THREADS HEAD_DIM
#define WARPS (THREADS / 32)

// One block per (chunk of CHUNK cache slots, key/value head, row). q: (B, H, HEAD_DIM);
// k, v: (B, KVH, L, HEAD_DIM); mask: (B, L) bytes, nonzero = attend. Writes, per query head and chunk,
// the unnormalised weighted values (fp32), the chunk's largest score and its sum of exponentials.
// Scores: lane j takes slot j of the chunk, warp w the dimensions [w * 32, w * 32 + 32); every load of
// a stage is issued before its arithmetic.
extern "C" __global__ void __launch_bounds__(THREADS) attention_chunks(
    const u16* __restrict__ q, const u16* __restrict__ k, const u16* __restrict__ v,
    const u8* __restrict__ mask, float* __restrict__ part_out, float* __restrict__ part_max,
    float* __restrict__ part_sum, int H, int KVH, int L, int chunks, double scale_d)
{
    __shared__ float qs[MAX_GROUP][HEAD_DIM];
    __shared__ float dots[WARPS][MAX_GROUP][CHUNK];
    __shared__ float weight[MAX_GROUP][CHUNK];
    __shared__ int on[CHUNK];
    const int chunk = blockIdx.x, kv_head = blockIdx.y, row = blockIdx.z;
    const int group = H / KVH;
    if (group > MAX_GROUP) return;  // refused by the caller; never write past the shared arrays
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float scale = (float)scale_d;
    const int first = chunk * CHUNK;
    const float NEG_INF = __int_as_float(0xff800000);

    for (int i = tid; i < group * HEAD_DIM; i += THREADS) {
        const int g = i / HEAD_DIM, d = i % HEAD_DIM;
        qs[g][d] = from_bf16(q[((size_t)row * H + kv_head * group + g) * HEAD_DIM + d]);
    }
    const int slot = first + lane;
    const bool mine = slot < L && mask[(size_t)row * L + slot] != 0;
    if (warp == 0) on[lane] = mine;
    const size_t head_base = ((size_t)row * KVH + kv_head) * (size_t)L;

    // this lane's slot, this warp's 32 dimensions: 64 bytes in four 16-byte loads
    u32 kw[16];
    if (mine) {
        const uint4* key = (const uint4*)(k + (head_base + slot) * HEAD_DIM + warp * 32);
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const uint4 part = key[t];
            kw[4 * t] = part.x; kw[4 * t + 1] = part.y; kw[4 * t + 2] = part.z; kw[4 * t + 3] = part.w;
        }
    }
    __syncthreads();
    for (int g = 0; g < group; ++g) {
        float dot = 0.0f;
        if (mine) {
#pragma unroll
            for (int t = 0; t < 16; ++t) {
                dot = fmaf(__uint_as_float(kw[t] << 16), qs[g][warp * 32 + 2 * t], dot);
                dot = fmaf(__uint_as_float(kw[t] & 0xffff0000u), qs[g][warp * 32 + 2 * t + 1], dot);
            }
        }
        dots[warp][g][lane] = dot;
    }
    __syncthreads();

    for (int g = warp; g < group; g += WARPS) {  // CHUNK == 32: one slot per lane
        float score = NEG_INF;
        if (on[lane]) {
            float dot = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) dot += dots[w][g][lane];
            score = dot * scale;
        }
        float top = score;
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, d));
        const float p = (top == NEG_INF) ? 0.0f : expf(score - top);
        float total = p;
#pragma unroll
        for (int d = 16; d > 0; d >>= 1) total += __shfl_xor_sync(0xffffffffu, total, d);
        weight[g][lane] = p;
        if (lane == 0) {
            const size_t at = ((size_t)row * H + kv_head * group + g) * chunks + chunk;
            part_max[at] = top;
            part_sum[at] = total;
        }
    }
    __syncthreads();

    float values[CHUNK];
#pragma unroll
    for (int j = 0; j < CHUNK; ++j)
        values[j] = on[j] ? from_bf16(v[(head_base + first + j) * HEAD_DIM + tid]) : 0.0f;
    float out[MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) out[g] = 0.0f;
#pragma unroll
    for (int j = 0; j < CHUNK; ++j)
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g)
            if (g < group) out[g] = fmaf(weight[g][j], values[j], out[g]);
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g)
        if (g < group)
            part_out[(((size_t)row * H + kv_head * group + g) * chunks + chunk) * HEAD_DIM + tid] = out[g];
}

// One block per (query head, row): combines the chunks into out (B, 1, H, HEAD_DIM), bf16.
extern "C" __global__ void __launch_bounds__(THREADS) attention_combine(
    const float* __restrict__ part_out, const float* __restrict__ part_max, const float* __restrict__ part_sum,
    u16* __restrict__ out, int H, int chunks)
{
    const int head = blockIdx.x, row = blockIdx.y, tid = threadIdx.x;
    const size_t base = ((size_t)row * H + head) * chunks;
    const float NEG_INF = __int_as_float(0xff800000);
    float top = NEG_INF;
    for (int c = 0; c < chunks; ++c) top = fmaxf(top, part_max[base + c]);
    float numerator = 0.0f, denominator = 0.0f;
    if (top != NEG_INF) {
        for (int c = 0; c < chunks; ++c) {
            const float m = part_max[base + c];
            if (m == NEG_INF) continue;
            const float f = expf(m - top);
            numerator = fmaf(f, part_out[(base + c) * HEAD_DIM + tid], numerator);
            denominator = fmaf(f, part_sum[base + c], denominator);
        }
    }
    const float value = denominator > 0.0f ? numerator / denominator : 0.0f;
    out[((size_t)row * H + head) * HEAD_DIM + tid] = to_bf16(value);
}

// A one-token step's keys and values into the static cache at slot *length, then *length += 1: what
// transformers' StaticLayer.update does (index copies at arange(1) + length, then length += 1). k_new,
// v_new: (heads, HEAD_DIM) with heads = rows x key/value heads; keys, values: (heads, L, HEAD_DIM), bf16.
// One block, so every thread reads the slot before thread 0 moves it on; a slot past the cache is not written.
extern "C" __global__ void cache_write(const uint4* __restrict__ k_new, const uint4* __restrict__ v_new,
    uint4* __restrict__ keys, uint4* __restrict__ values, long long* __restrict__ length, int heads, int L)
{
    const long long slot = *length;
    const int per_head = HEAD_DIM / 8;  // 16-byte pieces of a head's vector
    if (slot >= 0 && slot < L) {
        for (int i = threadIdx.x; i < heads * per_head; i += blockDim.x) {
            const size_t at = ((size_t)(i / per_head) * L + slot) * per_head + i % per_head;
            keys[at] = k_new[i];
            values[at] = v_new[i];
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) *length = slot + 1;
}
"""


class DecodeAttentionKernels:
    """The two kernels for one head size, compiled on first use."""

    dtype_name = "bfloat16"  # the tensors they take
    device_type = "cuda"
    head_dims = (64, 128)  # compiled with HEAD_DIM threads a block; Qwen2.5's sizes use these

    def __init__(self):
        self._compiled: dict = {}
        self._writers: dict = {}  # head size -> the compiled cache_write

    def _kernels(self, head_dim: int):
        if head_dim not in self._compiled:
            options = [f"-DHEAD_DIM={head_dim}"]
            self._compiled[head_dim] = (compile_kernel(SOURCE, "attention_chunks", options),
                                        compile_kernel(SOURCE, "attention_combine", options))
        return self._compiled[head_dim]

    def write_cache(self, key_states, value_states, keys, values, length) -> None:
        """key_states/value_states (B, KVH, 1, D) into keys/values (B, KVH, L, D) bf16 at slot `length`
        (an int64 scalar on the GPU), then `length` += 1, in one launch."""
        head_dim = key_states.shape[-1]
        if head_dim not in self._writers:
            self._writers[head_dim] = compile_kernel(SOURCE, "cache_write", [f"-DHEAD_DIM={head_dim}"])
        heads = keys.shape[0] * keys.shape[1]
        self._writers[head_dim](grid=(1, 1, 1), block=(256, 1, 1), args=[
            aligned(key_states.contiguous()), aligned(value_states.contiguous()), keys, values, length, heads,
            keys.shape[2]])

    def attend(self, query, key, value, mask, scaling: float):
        """query (B, H, 1, D), key/value (B, KVH, L, D) bf16, mask (B, 1, 1, L) bool: (B, 1, H, D) bf16."""
        import torch

        batch, heads, _, head_dim = query.shape
        kv_heads, slots = key.shape[1], key.shape[2]
        chunks = -(-slots // KEYS_PER_CHUNK)
        chunk_kernel, combine_kernel = self._kernels(head_dim)
        part_out = torch.empty((batch, heads, chunks, head_dim), dtype=torch.float32, device=query.device)
        part_max = torch.empty((batch, heads, chunks), dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        out = torch.empty((batch, 1, heads, head_dim), dtype=torch.bfloat16, device=query.device)
        chunk_kernel(grid=(chunks, kv_heads, batch), block=(head_dim, 1, 1), args=[
            query.contiguous(), aligned(key.contiguous()), value.contiguous(), mask.contiguous(), part_out, part_max,
            part_sum, heads, kv_heads, slots, chunks, float(scaling)])
        combine_kernel(grid=(heads, batch, 1), block=(head_dim, 1, 1),
                       args=[part_out, part_max, part_sum, out, heads, chunks])
        return out


def kernels_ready(kernels: DecodeAttentionKernels, head_dim: int, heads: int, kv_heads: int) -> str | None:
    """None when the kernels compile and agree with PyTorch's attention on random rows (within bf16
    rounding) with part of the cache masked out, each row of two equal to that row alone; else why not."""
    import torch

    if kernels.device_type == "cuda" and not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    problem = shape_problem(kernels, head_dim, heads, kv_heads)
    if problem:
        return problem
    try:
        generator = torch.Generator().manual_seed(0)
        slots = 3 * KEYS_PER_CHUNK + 5

        dtype = getattr(torch, kernels.dtype_name)

        def draw(*shape):
            return torch.randn(*shape, generator=generator).to(kernels.device_type, dtype)

        query, key, value = draw(2, heads, 1, head_dim), draw(2, kv_heads, slots, head_dim), draw(2, kv_heads, slots, head_dim)
        mask = torch.zeros(2, 1, 1, slots, dtype=torch.bool)
        mask[0, ..., 3:70] = True  # a left-padded row with an empty chunk at the end
        mask[1, ..., :slots - 1] = True
        mask = mask.to(kernels.device_type)
        scale = head_dim ** -0.5
        both = kernels.attend(query, key, value, mask, scale)
        group = heads // kv_heads
        expected = torch.nn.functional.scaled_dot_product_attention(
            query.float(), key.float().repeat_interleave(group, 1), value.float().repeat_interleave(group, 1),
            attn_mask=mask, scale=scale).transpose(1, 2)
        error = (both.float() - expected).abs().max().item()
        if not error <= 0.02 * expected.abs().max().item():
            return f"the attention kernel differs from PyTorch's by {error:.3g}"
        for row in range(2):
            alone = kernels.attend(query[row:row + 1], key[row:row + 1], value[row:row + 1], mask[row:row + 1], scale)
            if not torch.equal(alone, both[row:row + 1]):
                return "a row of two differs from that row alone in the attention kernel"
    except Exception as exc:  # no NVRTC, a compile or launch failure: PyTorch's attention is used
        return f"{exc.__class__.__name__}: {str(exc)[:300]}"
    return None


def shape_problem(kernels, head_dim: int, heads: int, kv_heads: int) -> str | None:
    """Why the kernels cannot take heads of this shape (None: they can)."""
    if head_dim not in kernels.head_dims:
        return f"heads of {head_dim} dimensions (the kernel takes {', '.join(map(str, kernels.head_dims))})"
    if heads % kv_heads or heads // kv_heads > 8:
        return f"{heads} query heads over {kv_heads} key/value heads (the kernel takes up to 8 a key/value head)"
    return None


def usable(kernels, query, key, value, attention_mask, dropout: float, kwargs: dict) -> bool:
    """Whether a call of the attention function is a one-token step the kernels compute exactly as asked."""
    import torch

    if query.shape[2] != 1 or query.device.type != kernels.device_type or dropout:
        return False
    if kwargs.get("sliding_window") or kwargs.get("softcap") or kwargs.get("position_bias") is not None:
        return False
    batch, heads, _, head_dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    if shape_problem(kernels, head_dim, heads, kv_heads):
        return False
    dtype = getattr(torch, kernels.dtype_name)
    if any(t.dtype != dtype for t in (query, key, value)) or value.shape != key.shape:
        return False
    return (attention_mask is not None and attention_mask.dtype == torch.bool
            and tuple(attention_mask.shape) == (batch, 1, 1, slots))


def attention_function(kernels: DecodeAttentionKernels):
    """transformers' attention-function signature: the kernel for one-token steps, SDPA otherwise."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
        if usable(kernels, query, key, value, attention_mask, dropout, kwargs):
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            return kernels.attend(query, key, value, attention_mask, scale), None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    return attention


def register(kernels: DecodeAttentionKernels) -> None:
    """Make `studio-decode` an attention implementation transformers knows, with SDPA's masks."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, attention_function(kernels))
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


@contextlib.contextmanager
def decode_attention(model, kernels: DecodeAttentionKernels) -> Iterator[None]:
    """For the block, `model` attends with `studio-decode` where it attended with SDPA. Each config is
    switched on its own (transformers' setter would also overwrite the sub-configs) and gets its own
    value back."""
    configs = sdpa_configs(model)
    if not configs:
        yield
        return
    register(kernels)
    with replacing_sdpa(configs, IMPLEMENTATION):
        yield


def uses_sdpa(model) -> bool:
    """Whether any of the model's configs attends with SDPA (what `decode_attention` switches)."""
    return bool(sdpa_configs(model))


def cache_write_problem(kernels, head_dim: int, kv_heads: int) -> str | None:
    """None when the cache-write kernel does what `StaticLayer.update` does for one token, bit for bit, on
    caches of one and two rows (the keys and values in their slot, nothing else changed, the length moved
    on by one); else why not."""
    import torch

    if kernels.device_type == "cuda" and not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    if head_dim not in kernels.head_dims:
        return f"heads of {head_dim} dimensions (the kernel takes {', '.join(map(str, kernels.head_dims))})"
    try:
        generator = torch.Generator().manual_seed(1)
        dtype, device = getattr(torch, kernels.dtype_name), kernels.device_type
        for rows in (1, 2):
            def draw(slots):
                return torch.randn(rows, kv_heads, slots, head_dim, generator=generator).to(device, dtype)

            keys, values, new_keys, new_values = draw(40), draw(40), draw(1), draw(1)
            length = torch.tensor(17, dtype=torch.long, device=device)
            expected_keys, expected_values = keys.clone(), values.clone()
            expected_keys[:, :, 17], expected_values[:, :, 17] = new_keys[:, :, 0], new_values[:, :, 0]
            kernels.write_cache(new_keys, new_values, keys, values, length)
            if not (torch.equal(keys, expected_keys) and torch.equal(values, expected_values)):
                return f"the cache-write kernel wrote other values than an index copy ({rows} rows)"
            if int(length) != 18:
                return f"the cache-write kernel left the cache length at {int(length)} instead of 18"
    except Exception as exc:  # no NVRTC, a compile or launch failure: transformers' update is used
        return f"{exc.__class__.__name__}: {str(exc)[:300]}"
    return None


def one_launch_cache_writes(cache, kernels) -> int:
    """Give each of `cache`'s static layers an update that writes a one-token step through the kernel
    (anything else, such as the prompt, through transformers' own); returns how many layers took it."""
    taken = 0
    for layer in getattr(cache, "layers", []):
        if type(layer).__name__ != "StaticLayer" or "update" in layer.__dict__:
            continue
        layer.update = _one_launch_update(layer, layer.update, kernels)
        taken += 1
    return taken


def _one_launch_update(layer, update, kernels):
    import torch

    dtype = getattr(torch, kernels.dtype_name)

    def one_launch(key_states, value_states, *args, **kwargs):
        if (getattr(layer, "is_initialized", False) and key_states.shape[-2] == 1
                and key_states.device.type == kernels.device_type and key_states.dtype == dtype
                and value_states.shape == key_states.shape and layer.keys.dtype == dtype
                and key_states.shape[:2] == layer.keys.shape[:2] and key_states.shape[-1] == layer.keys.shape[-1]
                and key_states.shape[-1] in kernels.head_dims and layer.keys.is_contiguous()):
            kernels.write_cache(key_states, value_states, layer.keys, layer.values, layer.cumulative_length)
            return layer.keys, layer.values
        return update(key_states, value_states, *args, **kwargs)

    return one_launch
