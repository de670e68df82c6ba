"""A variant of the studio's 4-bit decode kernel (`studio/model/nf4_cuda.py`): one fp32-pair lookup a byte.

Nsight Compute (`bench/results/nf4_kernels-ncu-h200-2026-11-30.txt`) shows the studio's kernel bound by
issuing instructions: per byte of weights it runs two byte permutes, two table reads and two
multiply-adds, plus the shifts and masks that make the permutes' inputs. `PAIRS32_SOURCE` reads each
byte's two values as one 8-byte fp32 pair from a 256-entry table kept once per lane (64 KB of shared
memory, no bank conflicts), addressed by one byte permute of the raw weight word: a permute, a table
read and two multiply-adds a byte. The multiply-adds are the studio kernel's, in its order, so for the
same launch settings the sums are the same bits. Blocks stay resident and fill the table once.

`bench/nf4_kernels.py --pairs32-sweep` times it against the studio's kernel on the H200.
"""

from __future__ import annotations

from studio.model import nf4_cuda


PAIRS32_SOURCE = nf4_cuda.PRELUDE + r"""
#ifndef ROWS
#define ROWS 1
#endif
#ifndef OUTS
#define OUTS 1
#endif
#ifndef UNROLL
#define UNROLL 2
#endif
#ifndef WARPS
#define WARPS 8
#endif

__device__ __forceinline__ void load_weights(const u32* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// the byte's two values (high nibble, low nibble) from this lane's slot of its table entry
__device__ __forceinline__ void lookup_pair(u32 at, float& first, float& second) {
    asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(first), "=f"(second) : "r"(at));
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_pairs32(
    const u16* __restrict__ x, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
    extern __shared__ __align__(16) float pairs[];  // 256 entries x 32 lanes x (first, second)
    __shared__ float table2[256];
    __shared__ float partial[WARPS][OUTS][ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 256 * 16; i += WARPS * 32) {  // two lanes' slots a store
        const int e = i >> 4;
        const float first = code[e >> 4], second = code[e & 15];
        *(float4*)(pairs + (size_t)i * 4) = make_float4(first, second, first, second);
    }
    if (nested) for (int i = threadIdx.x; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int groups = WARPS / split;
    const int piece = warp % split;
    const int chunks = K >> 4;
    const int blocks_per_row = K >> 6;
    const float offset = (float)offset_d;
    const int stride = 32 * split;
    const u32 base = shared_address(pairs);
    const u32 lane8 = (u32)lane << 3;
    const int per_block = groups * OUTS;
    const int block_count = (N + per_block - 1) / per_block;

    for (int group_block = blockIdx.x; group_block < block_count; group_block += gridDim.x) {
        const int n0 = (group_block * groups + warp / split) * OUTS;
        float acc[OUTS][ROWS];
#pragma unroll
        for (int o = 0; o < OUTS; ++o)
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[o][r] = 0.0f;

        if (n0 < N) {
            for (int c0 = piece * 32 + lane; c0 < chunks; c0 += stride * UNROLL) {
                u32 wv[UNROLL][OUTS][2];
                u32 xv[UNROLL][ROWS][8];
                u32 code_of[UNROLL][OUTS];
                float scale[UNROLL][OUTS];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int c = min(c0 + u * stride, chunks - 1);
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
#pragma unroll
                                for (int b = 0; b < 4; ++b) {
                                    const int j = 4 * h + b;
                                    // byte b * 256 + lane * 8: this lane's slot of the byte's entry
                                    float hi, lo;
                                    lookup_pair(base + __byte_perm(word, lane8, 0x5504u | (b << 4)), hi, lo);
#pragma unroll
                                    for (int r = 0; r < ROWS; ++r) {
                                        s[r] = fmaf(hi, xs[r][2 * j], s[r]);
                                        s[r] = fmaf(lo, xs[r][2 * j + 1], s[r]);
                                    }
                                }
                            }
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
        __syncthreads();
    }
}
"""

STAGED_SOURCE = nf4_cuda.PRELUDE + r"""
#ifndef ROWS
#define ROWS 1
#endif
#ifndef OUTS
#define OUTS 4
#endif
#ifndef UNROLL
#define UNROLL 2
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef SPLIT
#define SPLIT 2
#endif

__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void copy16(const void* to, const void* from, int size) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(shared_address(to)), "l"(from), "r"(size));
}

__device__ __forceinline__ void copy8(const void* to, const void* from, int size) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" :: "r"(shared_address(to)), "l"(from), "r"(size));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

// As the studio's nf4_rows (nested absmax only, K a multiple of 512), but the block's weight rows and
// their 8-bit absmax codes come into shared memory by asynchronous copies, STAGES rounds in flight,
// so the loads in flight do not hold registers. The arithmetic is nf4_rows' in its order.
extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_staged(
    const u16* __restrict__ x, const u8* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split_argument)
{
    extern __shared__ __align__(16) u8 staged[];
    __shared__ float table[16];
    __shared__ float table2[256];
    __shared__ float partial[WARPS][OUTS][ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr int split = SPLIT;  // warps along K for one output (split_argument is the same)
    constexpr int groups = WARPS / split;
    const int piece = warp % split, group = warp / split;
    constexpr int block_rows = groups * OUTS;
    constexpr int stride = 32 * split;
    constexpr int round_chunks = stride * UNROLL;          // 16 weights (8 bytes) a chunk
    constexpr int round_bytes = round_chunks * 8, round_codes = round_chunks / 4;
    const int chunks = K >> 4, row_bytes = K >> 1, blocks_per_row = K >> 6;
    const int rounds = (chunks + round_chunks - 1) / round_chunks;
    const int first_row = blockIdx.x * block_rows;
    u8* weights = staged;
    u8* codes = staged + STAGES * block_rows * round_bytes;

    auto issue = [&](int t) {
        if (t < rounds) {
            const int buffer = t % STAGES;
            constexpr int pieces = round_bytes / 16;
            for (int i = threadIdx.x; i < block_rows * pieces; i += WARPS * 32) {
                const int r = i / pieces, p = i % pieces;
                const int n = first_row + r, at = t * round_bytes + p * 16;
                const bool inside = n < N && at < row_bytes;
                copy16(weights + (buffer * block_rows + r) * round_bytes + p * 16,
                       w + (inside ? (size_t)n * row_bytes + at : 0), inside ? 16 : 0);
            }
            constexpr int code_pieces = round_codes / 8;
            for (int i = threadIdx.x; i < block_rows * code_pieces; i += WARPS * 32) {
                const int r = i / code_pieces, p = i % code_pieces;
                const int n = first_row + r, at = t * round_codes + p * 8;
                const bool inside = n < N && at < blocks_per_row;
                copy8(codes + (buffer * block_rows + r) * round_codes + p * 8,
                      qabsmax + (inside ? (size_t)n * blocks_per_row + at : 0), inside ? 8 : 0);
            }
        }
        asm volatile("cp.async.commit_group;");
    };

#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) issue(t);
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
    for (int i = threadIdx.x; i < 256; i += WARPS * 32) table2[i] = code2[i];
    const float offset = (float)offset_d;
    const int n0 = first_row + group * OUTS;

    float acc[OUTS][ROWS];
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[o][r] = 0.0f;

    for (int t = 0; t < rounds; ++t) {
        issue(t + STAGES - 1);
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 1));
        __syncthreads();
        const int buffer = t % STAGES;
        if (n0 < N) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int local = piece * 32 + lane + u * stride;
                const int c = t * round_chunks + local;
                if (c < chunks) {
                    u32 xv[ROWS][8];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r) load_x(x + (size_t)r * K + c * 16, xv[r]);
                    float xs[ROWS][16];
#pragma unroll
                    for (int r = 0; r < ROWS; ++r)
#pragma unroll
                        for (int j = 0; j < 8; ++j) {
                            xs[r][2 * j] = __uint_as_float(xv[r][j] << 16);
                            xs[r][2 * j + 1] = __uint_as_float(xv[r][j] & 0xffff0000u);
                        }
#pragma unroll
                    for (int o = 0; o < OUTS; ++o) {
                        const int row = group * OUTS + o;
                        const uint2 wv = *(const uint2*)(weights + (buffer * block_rows + row) * round_bytes + local * 8);
                        const u32 code_of = codes[(buffer * block_rows + row) * round_codes + (local >> 2)];
                        const int n = min(n0 + o, N - 1);
                        const float scale = absmax2[((size_t)n * blocks_per_row + (c >> 2)) >> 8];
                        float s[ROWS];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            const u32 word = h ? wv.y : wv.x;
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
                        const float am = __fadd_rn(__fmul_rn(table2[code_of], scale), offset);
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[o][r] = fmaf(s[r], am, acc[o][r]);
                    }
                }
            }
        }
        __syncthreads();
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
"""


def staged_bytes(split: int, outs: int, unroll: int, warps: int, stages: int) -> int:
    """Dynamic shared memory of the staged kernel: each stage's weight rows and absmax codes."""
    rows = (warps // split) * outs
    round_chunks = 32 * split * unroll
    return stages * rows * (round_chunks * 8 + round_chunks // 4)

PAIRS32_TABLE_BYTES = 256 * 32 * 8


class VariantKernels(nf4_cuda.Nf4Kernels):
    """`Nf4Kernels` with the fp32-pair and staged variants (`pairs32_products`, `staged_products`)."""

    _sm_count = None

    def pairs32_kernel(self, rows: int, outs: int, unroll: int, warps: int):
        key = ("pairs32", rows, outs, unroll, warps)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={unroll}", f"-DWARPS={warps}"]
            kernel = nf4_cuda.compile_kernel(PAIRS32_SOURCE, "nf4_pairs32", options)
            kernel.set_shared_memory_config(PAIRS32_TABLE_BYTES)
            self._compiled[key] = kernel
        return self._compiled[key]

    def pairs32_products(self, layer: nf4_cuda.LayerArgs, x2d, bias=None, shape=(2, 4, 2, 8, 3)):
        """As `products`, through the fp32-pair kernel; shape = (split, outs, unroll, warps, blocks a
        multiprocessor)."""
        import torch

        split, outs, unroll, warps, per_sm = shape
        rows, n = x2d.shape[0], layer.out_features
        x2d = nf4_cuda.aligned(x2d.contiguous())
        y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
        unused = y
        needed = -(-n // ((warps // split) * outs))
        if self._sm_count is None:
            self._sm_count = torch.cuda.get_device_properties(x2d.device).multi_processor_count
        grid = min(needed, self._sm_count * per_sm)
        self.pairs32_kernel(rows, outs, unroll, warps)(
            grid=(grid, 1, 1), block=(32 * warps, 1, 1), shared_mem=PAIRS32_TABLE_BYTES, args=[
                x2d, layer.weight, nf4_cuda._or(layer.qabsmax, unused), nf4_cuda._or(layer.absmax2, unused),
                nf4_cuda._or(layer.code2, unused), nf4_cuda._or(layer.absmax, unused), layer.code,
                nf4_cuda._or(bias, unused), y, n, layer.in_features, layer.offset,
                int(layer.nested), int(bias is not None), split])
        return y

    def staged_kernel(self, rows: int, outs: int, unroll: int, warps: int, stages: int, split: int):
        key = ("staged", rows, outs, unroll, warps, stages, split)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={unroll}", f"-DWARPS={warps}",
                       f"-DSTAGES={stages}", f"-DSPLIT={split}"]
            self._compiled[key] = nf4_cuda.compile_kernel(STAGED_SOURCE, "nf4_staged", options)
        return self._compiled[key]

    def staged_products(self, layer: nf4_cuda.LayerArgs, x2d, bias=None, shape=(2, 4, 2, 4, 2)):
        """As `products`, through the staged kernel; shape = (split, outs, unroll, warps, stages)."""
        import torch

        split, outs, unroll, warps, stages = shape
        rows, n = x2d.shape[0], layer.out_features
        if not layer.nested or layer.in_features % 512:
            raise ValueError("the staged kernel takes nested absmax and K a multiple of 512")
        x2d = nf4_cuda.aligned(x2d.contiguous())
        y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
        unused = y
        size = staged_bytes(split, outs, unroll, warps, stages)
        kernel = self.staged_kernel(rows, outs, unroll, warps, stages, split)
        if size > 48 * 1024:
            kernel.set_shared_memory_config(size)
        per_block = (warps // split) * outs
        kernel(grid=(-(-n // per_block), 1, 1), block=(32 * warps, 1, 1), shared_mem=size, args=[
            x2d, layer.weight, layer.qabsmax, layer.absmax2, layer.code2, unused, layer.code,
            nf4_cuda._or(bias, unused), y, n, layer.in_features, layer.offset, 1, int(bias is not None), split])
        return y
