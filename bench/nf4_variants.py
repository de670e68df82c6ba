"""Two variants of the studio's 4-bit decode kernel (`studio/model/nf4_cuda.py`), measured and not kept.

`bench/nf4_kernels.py --pairs-sweep` and `--mma-sweep [--x-late]` time them on the H200 against the
studio's kernel, over twelve copies of each weight (the L2 holds none of them, as in a decode step);
results in `bench/results/nf4_kernels-pairs-bf16-sweep-h200-2026-11-30.json` and
`nf4_kernels-mma-resident-*-h200-2026-11-30.json`:

- `PAIRS_SOURCE`: the studio's SIMT kernel, but one lookup a byte: a 256-entry table of each byte's two
  values as a bf16 pair, kept once per lane (64 KB, the address one byte permute), half the
  shared-memory reads; blocks stay resident and fill the table once.
- `MMA_SOURCE`: 16-output tiles on the tensor cores (m16n8k16), the same bf16-pair table filled once
  per resident block, the lookups going straight into the tensor cores; `X_LATE` reads the token rows
  when needed instead of ahead; `INTERLEAVE` runs the blocks in flight as independent chains of
  products (`--mma-sweep --interleave`).

Neither is faster for one row; the README's Chat section says by how much.
"""

from __future__ import annotations

from studio.model import nf4_cuda


PAIRS_SOURCE = nf4_cuda.PRELUDE + r"""
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
#define SLOTS 64  // u32 slots a table entry (lanes 0..31 use theirs): a lookup's address is one byte permute

__device__ __forceinline__ void load_weights(const u32* p, u32& a, u32& b) {
    asm("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(a), "=r"(b) : "l"(p));
}

__device__ __forceinline__ void load_x(const u16* p, u32* v) {
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "l"(p));
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[4]), "=r"(v[5]), "=r"(v[6]), "=r"(v[7]) : "l"(p + 8));
}

// As nf4_rows, but each byte (two 4-bit values) is one lookup: a 256-entry table of the byte's two
// values as a bf16 pair, kept once per lane (no bank conflicts) in 64 KB of dynamic shared memory.
// Blocks stay resident and take groups of outputs in turn, so each fills its table once.
extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_pairs(
    const u16* __restrict__ x, const u32* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
    extern __shared__ __align__(16) u32 pairs[];
    __shared__ float table2[256];
    __shared__ float partial[WARPS][OUTS][ROWS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < 256 * 8; i += WARPS * 32) {
        const int e = i >> 3;  // the byte: high nibble first value, low nibble second
        const u32 v = (u32)to_bf16(code[e >> 4]) | ((u32)to_bf16(code[e & 15]) << 16);
        *(uint4*)(pairs + e * SLOTS + (i & 7) * 4) = make_uint4(v, v, v, v);
    }
    if (nested) for (int i = threadIdx.x; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int groups = WARPS / split;
    const int piece = warp % split;
    const int chunks = K >> 4;
    const int blocks_per_row = K >> 6;
    const float offset = (float)offset_d;
    const int stride = 32 * split;
    const u32 lane4 = (u32)lane << 2;
    const char* table = (const char*)pairs;
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
                                    // byte b * 256 + lane * 4: this lane's slot of the byte's entry
                                    const u32 pair = *(const u32*)(table + __byte_perm(word, lane4, 0x5504u | (b << 4)));
                                    const float first = __uint_as_float(pair << 16);
                                    const float second = __uint_as_float(pair & 0xffff0000u);
#pragma unroll
                                    for (int r = 0; r < ROWS; ++r) {
                                        s[r] = fmaf(first, xs[r][2 * j], s[r]);
                                        s[r] = fmaf(second, xs[r][2 * j + 1], s[r]);
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
PAIRS_TABLE_BYTES = 256 * 64 * 4

MMA_SOURCE = nf4_cuda.PRELUDE + r"""
#ifndef ROWS
#define ROWS 1
#endif
#ifndef UNROLL
#define UNROLL 2
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef X_LATE
#define X_LATE 0
#endif
#ifndef INTERLEAVE
#define INTERLEAVE 0
#endif
#define SLOTS 64

__device__ __forceinline__ void load_weights(const u8* p, u32& a, u32& b) {
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

#if INTERLEAVE  // lookups the compiler may schedule freely (they depend on the loaded weights)
__device__ __forceinline__ u32 lookup(u32 at) {
    u32 v;
    asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(at));
    return v;
}
#else
__device__ __forceinline__ u32 lookup(u32 at) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(at));
    return v;
}
#endif

// c += a (16 outputs x 16 k, bf16) times b (16 k x 8 token rows, bf16), in fp32 on the tensor cores
__device__ __forceinline__ void mma_bf16(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// y[r, n] = sum_k x[r, k] * code[q(n, k)] * absmax(n, k / 64)  (+ bias[n]) on the tensor cores.
// Tiles of 16 outputs; `split` warps share a tile's 64-blocks and add their sums in a fixed order; a
// block takes WARPS / split tiles a round and stays resident for further rounds (its table filled once).
// For a 64-block, lane (g = lane / 4, t = lane % 4) loads the bytes [8t, 8t + 8) of outputs g and g + 8
// and the values [16t, 16t + 16) of token row g; mma j takes the lane's bytes 2j and 2j + 1, i.e.
// values 16t + 4j .. 16t + 4j + 3, the same k order for weights and rows. A byte becomes its two
// values as a bf16 pair through a 256-entry table kept once per lane (no bank conflicts; the address is
// one byte permute); each block's sum is scaled by its absmax in fp32.
extern "C" __global__ void __launch_bounds__(WARPS * 32) nf4_mma(
    const u16* __restrict__ x, const u8* __restrict__ w, const u8* __restrict__ qabsmax,
    const float* __restrict__ absmax2, const float* __restrict__ code2, const float* __restrict__ absmax,
    const float* __restrict__ code, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, double offset_d, int nested, int has_bias, int split)
{
    extern __shared__ __align__(16) u32 pairs[];
    __shared__ float table2[256];
    __shared__ float partial[WARPS][16][ROWS];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    for (int i = tid; i < 256 * 8; i += WARPS * 32) {
        const int e = i >> 3;
        const u32 v = (u32)to_bf16(code[e >> 4]) | ((u32)to_bf16(code[e & 15]) << 16);
        *(uint4*)(pairs + e * SLOTS + (i & 7) * 4) = make_uint4(v, v, v, v);
    }
    if (nested) for (int i = tid; i < 256; i += WARPS * 32) table2[i] = code2[i];
    __syncthreads();

    const int g = lane >> 2, t = lane & 3;
    const int blocks_per_row = K >> 6;
    const size_t row_bytes = (size_t)(K >> 1);
    const float offset = (float)offset_d;
    const u32 lane4 = (u32)lane << 2;
    const u32 table = shared_address(pairs);
    const u16* xr = x + (size_t)min(g, ROWS - 1) * K + 16 * t;
    const int tiles = (N + 15) >> 4;
    const int per_round = WARPS / split;
    const int rounds = (tiles + per_round - 1) / per_round;
    const int piece = warp % split;
    const bool scaled = 2 * t < ROWS;  // these lanes' sums are token rows

    for (int round = blockIdx.x; round < rounds; round += gridDim.x) {
        const int tile = round * per_round + warp / split;
        const int na = min(tile * 16 + g, N - 1), nb = min(tile * 16 + g + 8, N - 1);
        const u8* wa = w + (size_t)na * row_bytes + 8 * t;
        const u8* wb = w + (size_t)nb * row_bytes + 8 * t;
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (tile < tiles) {
            for (int blk0 = piece * UNROLL; blk0 < blocks_per_row; blk0 += split * UNROLL) {
                u32 va[UNROLL][2], vb[UNROLL][2];
                float sa[UNROLL], sb[UNROLL];
                u32 qa[UNROLL], qb[UNROLL];
#if !X_LATE
                u32 xr_ahead[UNROLL][8];
#endif
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const int blk = min(blk0 + u, blocks_per_row - 1);  // past the end: loaded, not added
                    load_weights(wa + (size_t)blk * 32, va[u][0], va[u][1]);
                    load_weights(wb + (size_t)blk * 32, vb[u][0], vb[u][1]);
#if !X_LATE
                    if (g < ROWS) {
                        load_x(xr + (size_t)blk * 64, xr_ahead[u]);
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; ++j) xr_ahead[u][j] = 0u;
                    }
#endif
                    qa[u] = qb[u] = 0u;
                    sa[u] = sb[u] = 0.0f;
                    if (scaled) {
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
#if INTERLEAVE && !X_LATE
                // the blocks in flight as independent chains of products, one accumulator each
                float cs[UNROLL][4];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) cs[u][0] = cs[u][1] = cs[u][2] = cs[u][3] = 0.0f;
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) {
                        const u32 word_a = va[u][j >> 1], word_b = vb[u][j >> 1];
                        const u32 first = 0x5504u | (((2 * j) & 3) << 4), second = 0x5504u | (((2 * j + 1) & 3) << 4);
                        mma_bf16(cs[u], lookup(table + __byte_perm(word_a, lane4, first)),
                                 lookup(table + __byte_perm(word_b, lane4, first)),
                                 lookup(table + __byte_perm(word_a, lane4, second)),
                                 lookup(table + __byte_perm(word_b, lane4, second)),
                                 xr_ahead[u][2 * j], xr_ahead[u][2 * j + 1]);
                    }
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    if (blk0 + u < blocks_per_row && scaled) {
                        const float ma = nested ? __fadd_rn(__fmul_rn(table2[qa[u]], sa[u]), offset) : sa[u];
                        const float mb = nested ? __fadd_rn(__fmul_rn(table2[qb[u]], sb[u]), offset) : sb[u];
                        acc[0] = fmaf(cs[u][0], ma, acc[0]);
                        acc[1] = fmaf(cs[u][1], ma, acc[1]);
                        acc[2] = fmaf(cs[u][2], mb, acc[2]);
                        acc[3] = fmaf(cs[u][3], mb, acc[3]);
                    }
                }
#else
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    if (blk0 + u < blocks_per_row) {
                        u32 xv[8];
#if X_LATE  // the token rows' values read when needed (the L1 holds them), not held in registers
                        if (g < ROWS) {
                            load_x(xr + (size_t)(blk0 + u) * 64, xv);
                        } else {
#pragma unroll
                            for (int j = 0; j < 8; ++j) xv[j] = 0u;
                        }
#else
#pragma unroll
                        for (int j = 0; j < 8; ++j) xv[j] = xr_ahead[u][j];
#endif
                        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const u32 word_a = va[u][j >> 1], word_b = vb[u][j >> 1];
                            const u32 first = 0x5504u | (((2 * j) & 3) << 4), second = 0x5504u | (((2 * j + 1) & 3) << 4);
                            mma_bf16(c, lookup(table + __byte_perm(word_a, lane4, first)),
                                     lookup(table + __byte_perm(word_b, lane4, first)),
                                     lookup(table + __byte_perm(word_a, lane4, second)),
                                     lookup(table + __byte_perm(word_b, lane4, second)),
                                     xv[2 * j], xv[2 * j + 1]);
                        }
                        if (scaled) {
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
#endif
            }
        }
        if (scaled) {
            partial[warp][g][2 * t] = acc[0];
            partial[warp][g + 8][2 * t] = acc[2];
            if (2 * t + 1 < ROWS) {
                partial[warp][g][2 * t + 1] = acc[1];
                partial[warp][g + 8][2 * t + 1] = acc[3];
            }
        }
        __syncthreads();
        if (tid < per_round * 16 * ROWS) {
            const int slot = tid / (16 * ROWS), o = (tid / ROWS) % 16, r = tid % ROWS;
            const int n = (round * per_round + slot) * 16 + o;
            if (n < N) {
                float v = 0.0f;
                for (int p = 0; p < split; ++p) v += partial[slot * split + p][o][r];
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
    """`Nf4Kernels` with the byte-pair and tensor-core variants (`pairs_products`, `mma_products`)."""

    def __init__(self, x_late: bool = False, interleave: bool = False):
        super().__init__()
        self.x_late, self.interleave = x_late, interleave

    def pairs_kernel(self, rows: int, outs: int, unroll: int, warps: int):
        key = ("pairs", rows, outs, unroll, warps)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DOUTS={outs}", f"-DUNROLL={unroll}", f"-DWARPS={warps}"]
            kernel = nf4_cuda.compile_kernel(PAIRS_SOURCE, "nf4_pairs", options)
            kernel.set_shared_memory_config(PAIRS_TABLE_BYTES)
            self._compiled[key] = kernel
        return self._compiled[key]

    def pairs_products(self, layer: nf4_cuda.LayerArgs, x2d, bias=None, shape=(2, 4, 2, 8, 3)):
        """As `products`, through the byte-pair kernel; shape = (split, outs, unroll, warps, blocks a
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
        self.pairs_kernel(rows, outs, unroll, warps)(
            grid=(grid, 1, 1), block=(32 * warps, 1, 1), shared_mem=PAIRS_TABLE_BYTES, args=[
                x2d, layer.weight, nf4_cuda._or(layer.qabsmax, unused), nf4_cuda._or(layer.absmax2, unused), nf4_cuda._or(layer.code2, unused),
                nf4_cuda._or(layer.absmax, unused), layer.code, nf4_cuda._or(bias, unused), y, n, layer.in_features, layer.offset,
                int(layer.nested), int(bias is not None), split])
        return y

    _sm_count = None

    def mma_kernel(self, rows: int, unroll: int, warps: int):
        key = ("mma", rows, unroll, warps, self.x_late, self.interleave)
        if key not in self._compiled:
            options = [f"-DROWS={rows}", f"-DUNROLL={unroll}", f"-DWARPS={warps}", f"-DX_LATE={int(self.x_late)}",
                       f"-DINTERLEAVE={int(self.interleave)}"]
            kernel = nf4_cuda.compile_kernel(MMA_SOURCE, "nf4_mma", options)
            kernel.set_shared_memory_config(PAIRS_TABLE_BYTES)
            self._compiled[key] = kernel
        return self._compiled[key]

    def mma_products(self, layer: nf4_cuda.LayerArgs, x2d, bias=None, shape=(2, 2, 8, 3)):
        """As `products`, on the tensor cores; shape = (split, unroll, warps, blocks a multiprocessor)."""
        import torch

        split, unroll, warps, per_sm = shape
        rows, n = x2d.shape[0], layer.out_features
        x2d = nf4_cuda.aligned(x2d.contiguous())
        y = torch.empty((rows, n), dtype=torch.bfloat16, device=x2d.device)
        unused = y
        rounds = -(-(-(-n // 16)) // (warps // split))
        if self._sm_count is None:
            self._sm_count = torch.cuda.get_device_properties(x2d.device).multi_processor_count
        grid = min(rounds, self._sm_count * per_sm)
        self.mma_kernel(rows, unroll, warps)(
            grid=(grid, 1, 1), block=(32 * warps, 1, 1), shared_mem=PAIRS_TABLE_BYTES, args=[
                x2d, layer.weight, nf4_cuda._or(layer.qabsmax, unused), nf4_cuda._or(layer.absmax2, unused), nf4_cuda._or(layer.code2, unused),
                nf4_cuda._or(layer.absmax, unused), layer.code, nf4_cuda._or(bias, unused), y, n, layer.in_features, layer.offset,
                int(layer.nested), int(bias is not None), split])
        return y

