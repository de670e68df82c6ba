"""Variants of the studio's 4-bit decode kernel (`studio/model/nf4_cuda.py`), measured and not kept.

`bench/nf4_kernels.py` times them on the H200 (`--mma-sweep`, `--pairs-sweep`, `--pipe-sweep`,
`--blocks-sweep`, `--roofline`; results in `bench/results/nf4_kernels-*-h200-2026-11-29.json`):

- `VARIANT_SOURCE` is the studio's SIMT kernel with compile-time switches. `PAIRS 1` / `PAIRS 2`: one
  lookup a byte in a table of each byte's two values, kept once per half-warp (32 KB) or once per lane
  (64 KB, the address one byte permute) instead of two lookups in the 16-entry table. `DEPTH 2` / `3`:
  the chunks DEPTH - 1 ahead are loaded before each chunk's arithmetic. `MIN_BLOCKS`: fewer registers,
  more blocks a multiprocessor. `READ_ONLY`: the same loads with next to no arithmetic (the roofline).
  With the defaults it is the studio's kernel.
- `MMA_SOURCE` multiplies 16-output tiles on the tensor cores (m16n8k16, bf16): each byte becomes its two
  values as a bf16 pair through a 256-entry table kept once per lane in shared memory.

None was faster than the studio's kernel; the README's Chat section says by how much.
"""

from __future__ import annotations

from studio.model import nf4_cuda

VARIANT_SOURCE = nf4_cuda.PRELUDE + r"""
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
#define WARPS 4
#endif
#ifndef PAIRS
#define PAIRS 0
#endif

__device__ __forceinline__ void load_weights(const u32* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

#ifndef DEPTH
#define DEPTH 0
#endif

// One chunk (16 weights of each of a warp's OUTS outputs) as loaded: the weights, their absmax (or its
// 8-bit code and second-level scale) and the 16 matching values of each token row.
struct Chunk {
    u32 w[OUTS][2];
    u32 code_of[OUTS];
    float scale[OUTS];
    u32 x[ROWS][8];
};

__device__ __forceinline__ void load_chunk(Chunk& k, int c, int n0, int N, int chunks, int blocks_per_row, int K,
                                           int nested, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
                                           const float* __restrict__ absmax2, const float* __restrict__ absmax,
                                           const u16* __restrict__ x) {
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
        const int n = min(n0 + o, N - 1);
        load_weights(w + ((size_t)n * chunks + c) * 2, k.w[o][0], k.w[o][1]);
        const size_t b = (size_t)n * blocks_per_row + (c >> 2);
        if (nested) {
            k.code_of[o] = qabsmax[b];
            k.scale[o] = absmax2[b >> 8];
        } else {
            k.code_of[o] = 0u;
            k.scale[o] = absmax[b];
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) load_x(x + (size_t)r * K + c * 16, k.x[r]);
}

__device__ __forceinline__ void add_chunk(const Chunk& k, float (&acc)[OUTS][ROWS], const float* table,
                                          const float* table2, float offset, int nested) {
    float xs[ROWS][16];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            xs[r][2 * j] = __uint_as_float(k.x[r][j] << 16);
            xs[r][2 * j + 1] = __uint_as_float(k.x[r][j] & 0xffff0000u);
        }
#pragma unroll
    for (int o = 0; o < OUTS; ++o) {
        float s[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) s[r] = 0.0f;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const u32 word = k.w[o][h];
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
        const float am = nested ? __fadd_rn(__fmul_rn(table2[k.code_of[o]], k.scale[o]), offset) : k.scale[o];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[o][r] = fmaf(s[r], am, acc[o][r]);
    }
}

// The studio's kernel (DEPTH 0, PAIRS 0, MIN_BLOCKS 1) with the variants measured against it.
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1
#endif
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS) nf4_rows(
    const u16* __restrict__ x, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
#if DEPTH > 0
    // the first DEPTH - 1 chunks' loads go out before the tables are filled
    const int lane_ = threadIdx.x & 31, warp_ = threadIdx.x >> 5;
    const int n0_ = (blockIdx.x * (WARPS / split) + warp_ / split) * OUTS;
    const int chunks_ = K >> 4, stride_ = 32 * split, first = (warp_ % split) * 32 + lane_;
    Chunk ring[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH - 1; ++d)
        if (n0_ < N && first + d * stride_ < chunks_)
            load_chunk(ring[d], first + d * stride_, n0_, N, chunks_, K >> 6, K, nested, w, qabsmax, absmax2, absmax, x);
#endif
#if PAIRS == 1
    // each byte's two values (high nibble, low nibble), once for each lane of a half-warp (a 64-bit load's
    // bank conflicts are counted per half-warp): one lookup a byte, no conflicts
    __shared__ __align__(16) float pairs[256 * 16 * 2];
    for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
        const int b = i >> 3;
        const float hi = code[b >> 4], lo = code[b & 15];
        float* entry = pairs + b * 32 + (i & 7) * 4;
        entry[0] = hi; entry[1] = lo; entry[2] = hi; entry[3] = lo;
    }
#elif PAIRS == 2
    // the same once for every lane (64 KB, dynamic): a lookup's address is one byte permute
    extern __shared__ __align__(16) float pairs[];
    for (int i = threadIdx.x; i < 256 * 16; i += WARPS * 32) {
        const int b = i >> 4;
        const float hi = code[b >> 4], lo = code[b & 15];
        float* entry = pairs + b * 64 + (i & 15) * 4;
        entry[0] = hi; entry[1] = lo; entry[2] = hi; entry[3] = lo;
    }
#else
    __shared__ float table[16];
    if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
#endif
    __shared__ float table2[256];
    __shared__ float partial[WARPS][OUTS][ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (nested) for (int i = threadIdx.x; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int groups = WARPS / split;
    const int piece = warp % split;
    const int n0 = (blockIdx.x * groups + warp / split) * OUTS;
    const int chunks = K >> 4;          // 16 weights (8 bytes) a chunk; 4 chunks a 64-block
    const int blocks_per_row = K >> 6;
    const float offset = (float)offset_d;
    const int stride = 32 * split;

    float acc[OUTS][ROWS];
#pragma unroll
    for (int o = 0; o < OUTS; ++o)
#pragma unroll
        for (int r = 0; r < ROWS; ++r) acc[o][r] = 0.0f;

#if DEPTH > 0
    // DEPTH chunks in flight: the loads of the chunk DEPTH - 1 ahead go out before each chunk's arithmetic
    if (n0 < N) {
        for (int base = first; base < chunks; base += DEPTH * stride) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                const int c = base + d * stride, ahead = c + (DEPTH - 1) * stride;
                if (ahead < chunks)
                    load_chunk(ring[(d + DEPTH - 1) % DEPTH], ahead, n0, N, chunks, blocks_per_row, K, nested, w,
                               qabsmax, absmax2, absmax, x);
                if (c < chunks) add_chunk(ring[d], acc, table, table2, offset, nested);
            }
        }
    }
#else
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
#ifdef READ_ONLY  // bench/nf4_kernels.py --roofline: the same loads, next to no arithmetic
#pragma unroll
                    for (int o = 0; o < OUTS; ++o)
                        acc[o][0] += __uint_as_float((wv[u][o][0] ^ wv[u][o][1] ^ xv[u][0][o]) & 0x3fffffffu)
                                     * (nested ? table2[code_of[u][o]] * scale[u][o] : scale[u][o]);
#else
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
#if PAIRS
#pragma unroll
                            for (int b = 0; b < 4; ++b) {
                                const int j = 4 * h + b;
#if PAIRS == 1
                                const u32 at = ((b == 0 ? word << 7 : word >> (8 * b - 7)) & 0x7f80u) | ((u32)(lane & 15) << 3);
#else
                                const u32 at = __byte_perm(word, (u32)lane << 3, 0x5504u | (b << 4));  // byte b * 256 + lane * 8
#endif
                                const float2 v = *(const float2*)((const char*)pairs + at);
#pragma unroll
                                for (int r = 0; r < ROWS; ++r) {
                                    s[r] = fmaf(v.x, xs[r][2 * j], s[r]);
                                    s[r] = fmaf(v.y, xs[r][2 * j + 1], s[r]);
                                }
                            }
#else
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
#endif
                        }
                        // bitsandbytes' absmax: code2[q] * absmax2 + offset, in fp32, in that order
                        const float am = nested ? __fadd_rn(__fmul_rn(table2[code_of[u][o]], scale[u][o]), offset)
                                                : scale[u][o];
#pragma unroll
                        for (int r = 0; r < ROWS; ++r) acc[o][r] = fmaf(s[r], am, acc[o][r]);
                    }
#endif
                }
            }
        }
    }
#endif
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

MMA_SOURCE = nf4_cuda.PRELUDE + r"""
#ifndef ROWS
#define ROWS 1
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef UNROLL
#define UNROLL 2
#endif

__device__ __forceinline__ void load_weights(const u8* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

// c += a (16 outputs x 16 k, bf16) times b (16 k x 8 token rows, bf16), in fp32 on the tensor cores
__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// y[r, n] = sum_k x[r, k] * code[q(n, k)] * absmax(n, k / 64)  (+ bias[n]), on the tensor cores.
// A block takes `tiles_per_block` tiles of 16 outputs one after another; its WARPS warps share each tile's
// 64-blocks (UNROLL neighbours at a time) and add their sums in a fixed order. For one 64-block, lane
// (g = lane / 4, t = lane % 4) loads the 8 bytes [8t, 8t + 8) of outputs g and g + 8 and the 16 values
// [16t, 16t + 16) of token row g; four m16n8k16 products cover the block, the k order inside each being
// the same for every lane (mma j takes the lane's bytes 2j and 2j + 1, i.e. values 16t + 4j .. 16t + 4j + 3).
// Each byte becomes its two values as a bf16 pair through a 256-entry table kept once per lane in
// shared memory (no bank conflicts); the block's sum is scaled by its absmax in fp32.
extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_mma(
    const u16* __restrict__ x, const u8* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int tiles_per_block)
{
    __shared__ __align__(16) u32 pairs[256 * 32];
    __shared__ float table2[256];
    __shared__ float partial[WARPS][16][ROWS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int i = tid; i < 256 * 8; i += WARPS * 32) {
        const int b = i >> 3;
        const u32 v = (u32)to_bf16(code[b >> 4]) | ((u32)to_bf16(code[b & 15]) << 16);
        *(uint4*)(pairs + b * 32 + (i & 7) * 4) = make_uint4(v, v, v, v);
    }
    if (nested) for (int i = tid; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int g = lane >> 2, t = lane & 3;
    const int blocks_per_row = K >> 6;
    const size_t row_bytes = (size_t)(K >> 1);
    const float offset = (float)offset_d;
    const u32* mine = pairs + lane;
    const u16* xr = x + (size_t)min(g, ROWS - 1) * K + 16 * t;
    const int tiles = (N + 15) >> 4;
    const int last = min(tiles, (blockIdx.x + 1) * tiles_per_block);

    for (int tile = blockIdx.x * tiles_per_block; tile < last; ++tile) {
        const int na = min(tile * 16 + g, N - 1), nb = min(tile * 16 + g + 8, N - 1);
        const u8* wa = w + (size_t)na * row_bytes + 8 * t;
        const u8* wb = w + (size_t)nb * row_bytes + 8 * t;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int blk0 = warp * UNROLL; blk0 < blocks_per_row; blk0 += WARPS * UNROLL) {
            u32 va[UNROLL][2], vb[UNROLL][2], xv[UNROLL][8];
            float sa[UNROLL], sb[UNROLL];
            u32 qa[UNROLL], qb[UNROLL];
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                const int blk = min(blk0 + u, blocks_per_row - 1);  // past the end: loaded, not added
                load_weights(wa + (size_t)blk * 32, va[u][0], va[u][1]);
                load_weights(wb + (size_t)blk * 32, vb[u][0], vb[u][1]);
                if (g < ROWS) {
                    load_x(xr + (size_t)blk * 64, xv[u]);
                } else {
#pragma unroll
                    for (int j = 0; j < 8; ++j) xv[u][j] = 0u;
                }
                qa[u] = qb[u] = 0u;
                sa[u] = sb[u] = 0.0f;
                if (2 * t < ROWS) {  // only these lanes' sums are token rows
                    const size_t ia = (size_t)na * blocks_per_row + blk, ib = (size_t)nb * blocks_per_row + blk;
                    if (nested) {
                        qa[u] = qabsmax[ia];
                        qb[u] = qabsmax[ib];
                        sa[u] = absmax2[ia >> 8];
                        sb[u] = absmax2[ib >> 8];
                    } else {
                        sa[u] = absmax[ia];
                        sb[u] = absmax[ib];
                    }
                }
            }
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) {
                if (blk0 + u < blocks_per_row) {
                    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        const u32 word_a = va[u][j >> 1], word_b = vb[u][j >> 1];
                        const u32 first = 0x4440u + ((2 * j) & 3), second = first + 1;
                        mma_bf16(c, mine[__byte_perm(word_a, 0u, first) << 5], mine[__byte_perm(word_b, 0u, first) << 5],
                                 mine[__byte_perm(word_a, 0u, second) << 5], mine[__byte_perm(word_b, 0u, second) << 5],
                                 xv[u][2 * j], xv[u][2 * j + 1]);
                    }
                    if (2 * t < ROWS) {
                        // bitsandbytes' absmax: code2[q] * absmax2 + offset, in fp32, in that order
                        const float ma = nested ? __fadd_rn(__fmul_rn(table2[qa[u]], sa[u]), offset) : sa[u];
                        const float mb = nested ? __fadd_rn(__fmul_rn(table2[qb[u]], sb[u]), offset) : sb[u];
                        acc[0] = fmaf(c[0], ma, acc[0]);
                        acc[1] = fmaf(c[1], ma, acc[1]);
                        acc[2] = fmaf(c[2], mb, acc[2]);
                        acc[3] = fmaf(c[3], mb, acc[3]);
                    }
                }
            }
        }
        if (2 * t < ROWS) {
            partial[warp][g][2 * t] = acc[0];
            partial[warp][g + 8][2 * t] = acc[2];
            if (2 * t + 1 < ROWS) {
                partial[warp][g][2 * t + 1] = acc[1];
                partial[warp][g + 8][2 * t + 1] = acc[3];
            }
        }
        __syncthreads();
        if (tid < 16 * ROWS) {
            const int o = tid / ROWS, r = tid % ROWS, n = tile * 16 + o;
            if (n < N) {
                float v = 0.0f;
                for (int p = 0; p < WARPS; ++p) v += partial[p][o][r];
                u16 out = to_bf16(v);
                if (has_bias) out = to_bf16(from_bf16(out) + from_bf16(bias[n]));
                y[(size_t)r * N + n] = out;
            }
        }
        __syncthreads();
    }
}
"""


class VariantKernels(nf4_cuda.Nf4Kernels):
    """`Nf4Kernels` whose `shape` may also be (split, outs, warps, pairs, depth) for the SIMT variants or
    ("mma", warps, unroll, tiles a block) for the tensor-core kernel; `options` go to every compile."""

    def __init__(self, unroll: int = 2, options: list[str] | None = None):
        super().__init__(unroll=unroll)
        self.options = options or []

    def kernel(self, rows: int, outs: int, warps: int = nf4_cuda.WARPS_PER_BLOCK, pairs: int = 0, depth: int = 0):
        key = (rows, outs, warps, pairs, depth)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={self.unroll}", f"-DWARPS={warps}",
                       f"-DPAIRS={pairs}", f"-DDEPTH={depth}", *self.options]
            self._compiled[key] = nf4_cuda.compile_kernel(VARIANT_SOURCE, "nf4_rows", options)
        return self._compiled[key]

    def mma_kernel(self, rows: int, warps: int, unroll: int):
        key = ("mma", rows, warps, unroll)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DWARPS={warps}", f"-DUNROLL={unroll}"]
            self._compiled[key] = nf4_cuda.compile_kernel(MMA_SOURCE, "nf4_mma", options)
        return self._compiled[key]

    def products(self, layer, x2d, bias=None, shape=None):
        import torch

        rows, n = x2d.shape[0], layer.out_features
        shape = shape or nf4_cuda.launch_shape(n)
        x2d = nf4_cuda.aligned(x2d.contiguous())
        y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
        unused = y
        args = [x2d, layer.weight, layer.qabsmax if layer.nested else unused, layer.absmax2 if layer.nested else unused,
                layer.code2 if layer.nested else unused, unused if layer.nested else layer.absmax, layer.code,
                unused if bias is None else bias, y, n, layer.in_features, layer.offset, int(layer.nested),
                int(bias is not None)]
        if shape[0] == "mma":
            _, warps, unroll, tiles_per_block = shape
            blocks = -(-(-(-n // 16)) // tiles_per_block)
            self.mma_kernel(rows, warps, unroll)(grid=(blocks, 1, 1), block=(32 * warps, 1, 1),
                                                 args=[*args, tiles_per_block])
            return y
        split, outs, warps, pairs, depth = (*shape, nf4_cuda.WARPS_PER_BLOCK, 0, 0, 0)[:5]
        kernel = self.kernel(rows, outs, warps, pairs, depth)
        dynamic = PAIRS_TABLE_BYTES if pairs == 2 else 0
        if dynamic and kernel._max_shared_mem_bytes < dynamic:
            kernel.set_shared_memory_config(dynamic)
        per_block = (warps // split) * outs
        kernel(grid=(-(-n // per_block), 1, 1), block=(32 * warps, 1, 1), args=[*args, split], shared_mem=dynamic)
        return y


PAIRS_TABLE_BYTES = 256 * 32 * 8  # PAIRS 2: a byte's two fp32 values for each of 32 lanes
