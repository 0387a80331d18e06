// Batch-1 int4 GEMV on the tensor cores, for gemlite's packed A16W4 layout, read in place.
//
// Why: the Triton int4 GEMV (gemv_int4.py) spends ~7 SASS instructions a weight turning nibbles into floats
// and multiplying on the CUDA cores, and is bound by issue, not by DRAM (Nsight, run L2: 14-43% of DRAM
// peak). Here a nibble pair becomes a bf16x2 (or f16x2) by one shift and one lop3 (the float 128 + q, or
// 1024 + q, by bits, exact), and `mma.m16n8k16` multiplies and sums: ~1.2 instructions a weight (counted
// from the loop below, not read in SASS).
//
// Layout (gemlite `GemLiteLinearTriton.pack`, W_nbits 4, elements_per_sample 8):
//   W  [K/8, N] int32: weight (n, k) is bits 4*(k%8) .. +3 of W[k/8, n];
//   S, Z [K/G, N] (activation dtype): fma mode W = q*s + z; otherwise W = (q - z)*s.
//
// Scales are not applied per weight: the mma's 8 columns hold x masked to 8 consecutive groups (column j
// = x where k is in group 8c + j, else 0), so C[n, j] is group j's sum of (128 + q) x, and each group's
// scale and zero are applied once per output row when a chunk of 8 groups ends:
//   sum_k W x = s C - 128 s X + z X  (fma)   or   s C - s (128 + z) X,   X = the group's sum of x.
//
// Fragment mapping: the order of k inside an mma is free as long as A and B agree. Thread (g, t) of a warp
// (g = lane / 4, t = lane % 4) reads packed row r0 + t; its nibble pairs (i, i+4) by lop3 are A's register
// pairs, and B's pair is (x[8r + i], x[8r + i + 4]) from shared memory. Rows: mma m takes output rows
// base0 + MT*g + m (A rows g) and base1 + MT*g + m (A rows g + 8), so each thread's MT words of a packed
// row are one vector load from shared memory; base1 is base0 + 8*MT, or the paired row set of an epilogue
// (SiLU: the up rows; RoPE: the other half of the head).
//
// Measured on the H100 (docs/llm-runs.md, runs M1-M6): weights streamed by cp.async into shared memory
// before griddepcontrol.wait, per warp, beat register prefetch (M1: the narrow products 2-5x slower than
// Triton's; M2 on). Against the Triton kernel it wins on gate/up and the LM head inside the decode step and
// loses on q/k/v, o and down (`cuda_int4.TUNED` says by how much).
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace {

template <int MT>
struct Words {
    uint32_t v[MT];
};

template <bool F16>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w, int i) {
    // nibbles i and i + 4 as (magic + q) in the low and high halves: bf16 128 + q or f16 1024 + q, exact.
    constexpr uint32_t magic = F16 ? 0x64006400u : 0x43004300u;
    uint32_t r;
    asm("lop3.b32 %0, %1, 0x000F000F, %2, 0xEA;" : "=r"(r) : "r"(w >> (4 * i)), "n"(magic));
    return r;
}

template <bool F16>
__device__ __forceinline__ void mma(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    if constexpr (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

template <bool F16>
__device__ __forceinline__ float to_f32(uint16_t bits) {
    if constexpr (F16) {
        return __half2float(__ushort_as_half(bits));
    } else {
        return __bfloat162float(__ushort_as_bfloat16(bits));
    }
}

template <bool F16>
__device__ __forceinline__ uint16_t from_f32(float v) {
    if constexpr (F16) {
        return __half_as_ushort(__float2half_rn(v));
    } else {
        return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
}

__device__ __forceinline__ void cp_async16(void* smem_dst, const void* src) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src));
}

// Wait until at most `pending` (0..7) of this thread's copy groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int pending) {
    switch (pending) {
        case 0: asm volatile("cp.async.wait_group 0;" ::: "memory"); break;
        case 1: asm volatile("cp.async.wait_group 1;" ::: "memory"); break;
        case 2: asm volatile("cp.async.wait_group 2;" ::: "memory"); break;
        case 3: asm volatile("cp.async.wait_group 3;" ::: "memory"); break;
        case 4: asm volatile("cp.async.wait_group 4;" ::: "memory"); break;
        case 5: asm volatile("cp.async.wait_group 5;" ::: "memory"); break;
        case 6: asm volatile("cp.async.wait_group 6;" ::: "memory"); break;
        default: asm volatile("cp.async.wait_group 7;" ::: "memory"); break;
    }
}

template <int MT>
__device__ __forceinline__ Words<MT> lds_words(const uint32_t* p) {
    // One vector load of a thread's MT words. Other MT would leave words unread (run N10: tiles of MT 8
    // computed garbage), so they do not build.
    static_assert(MT == 1 || MT == 2 || MT == 4, "tiles of 16, 32 or 64 rows a program");
    Words<MT> w;
    if constexpr (MT == 4) {
        const uint4 v = *reinterpret_cast<const uint4*>(p);
        w.v[0] = v.x, w.v[1] = v.y, w.v[2] = v.z, w.v[3] = v.w;
    } else if constexpr (MT == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(p);
        w.v[0] = v.x, w.v[1] = v.y;
    } else {
        w.v[0] = *p;
    }
    return w;
}

// Programmatic dependent launch exists from Hopper (sm_90) on; built for Ampere or Ada the kernel runs
// without it (the engine turns PDL on only on Hopper, so `pdl` is 0 there).
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}

__device__ __forceinline__ void wait_for_inputs() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + __expf(-v)); }

enum Epilogue { STORE = 0, RESIDUAL = 1, ROPE_CACHE = 2, SILU_PAIR = 3 };

struct Args {
    const uint16_t* x;     // [K] activations
    const uint16_t* norm;  // [K] RMSNorm weight, or null: no norm prologue
    const uint32_t* w;     // [K/8, N] packed
    const uint16_t* s;     // [K/G, N]
    const uint16_t* z;     // [K/G, N]
    const uint16_t* res;   // [N] residual (RESIDUAL)
    void* y;               // [N] (or [N/2] for SILU_PAIR), activation dtype or fp32 (out_f32)
    int n, k, fma_mode;
    int pdl;  // `fused.pdl_on`: 0 off; 1 let the next kernel launch once this one passed its wait; 2 at once
    int out_f32;
    float eps;
    // ROPE_CACHE: q/k rows rotated (cos and sign-folded sin tables [positions, D], activation dtype), q
    // stored [heads, D] in y, k and v written to their cache slot ([slots, kv_heads, D] with this slot stride)
    const uint16_t* cos;
    const uint16_t* sin;
    const void* pos;   // [1] position, int64 if idx64 & 1 else int32
    const void* slot;  // [1] cache slot, int64 if idx64 & 2
    uint16_t* kc;
    uint16_t* vc;
    long long stride_slot;
    int heads, kv_heads, head_dim, idx64;
    int norm_shared;  // 1: the RMSNorm's sum of squares split over the program's warps (see the prologue)
};

__device__ __forceinline__ long long load_index(const void* p, int idx64) {
    return idx64 ? *static_cast<const long long*>(p) : (long long)*static_cast<const int*>(p);
}

// One program: 16*MT output rows (two sets of 8*MT: rows h = 0 and h = 1 of each mma, for SILU_PAIR the
// gate rows and the matching up rows) by all of K. Its WARPS warps each take a contiguous, group-aligned K
// range and stream it themselves: before `griddepcontrol.wait` (weights, scales and the norm weight are
// written by no kernel of the step) each warp issues cp.async copies of its whole range into shared memory,
// one commit group per 4 packed rows, so the products start on the first rows while the rest still arrive
// and no block barrier stands between the copies and the products. After the wait each warp builds its
// rows' x operands (RMSNorm'd as transformers rounds it when `norm` is set) and their sums per group.
// The warps' partial sums meet in shared memory at the end.
// STAGES > 0: each warp keeps only that many quads of packed rows in shared memory (a ring refilled as it
// goes), so a program's footprint no longer grows with K; 0: its whole range. (Runs N2-N5: gate/up, down and
// the LM head on rings of 4 took the int4 step from 602-608 to 522-524 us; cuda_int4.TUNED says which.)
template <int MT, int WARPS, int G, bool F16, int EPI, int STAGES>
__global__ void __launch_bounds__(WARPS * 32) int4_gemv_tc_kernel(const Args a) {
    constexpr int ROWS = 16 * MT, HALF = 8 * MT;
    constexpr int STRIDE = ROWS + 8;  // words a packed row takes in shared memory (conflict-free reads)
    constexpr float OFFSET = F16 ? 1024.f : 128.f;
    extern __shared__ __align__(16) unsigned char smem[];
    const int n = a.n, k = a.k, kp = k / 8;
    uint32_t* ws = reinterpret_cast<uint32_t*>(smem);  // [kp][STRIDE], or [WARPS][STAGES][4][STRIDE]
    const size_t ws_words = STAGES ? (size_t)WARPS * STAGES * 4 * STRIDE : (size_t)kp * STRIDE;
    uint4* xp = reinterpret_cast<uint4*>(ws + ws_words);  // [kp]: (x[8r+i], x[8r+i+4]), i < 4
    float* xsum = reinterpret_cast<float*>(xp + kp);                   // [k / G]
    float* red = xsum + k / G;                                         // [WARPS][ROWS]
    float* nsq = red + WARPS * ROWS;                                   // [WARPS] (norm_shared)

    if (a.pdl == 2) launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    // Row sets: SILU_PAIR gate rows and their up rows N/2 later; ROPE_CACHE rows j and j + D/2 of one head.
    const int blocks_per_head = EPI == ROPE_CACHE ? a.head_dim / 2 / HALF : 1;
    const int head = blockIdx.x / blocks_per_head, col0 = (blockIdx.x % blocks_per_head) * HALF;
    const int base0 = EPI == SILU_PAIR ? blockIdx.x * HALF
                      : EPI == ROPE_CACHE ? head * a.head_dim + col0 : blockIdx.x * ROWS;
    const int base1 = EPI == SILU_PAIR ? n / 2 + base0 : EPI == ROPE_CACHE ? base0 + a.head_dim / 2 : base0 + HALF;
    const int iters = kp / 4 / WARPS;  // packed-row quads per warp
    const int q0 = warp * iters;       // first quad
    // Where quad `it` of this warp lives in shared memory (word offset of its first packed row).
    auto slot_of = [&](int it) -> int {
        if constexpr (STAGES > 0) {
            return (warp * STAGES + it % STAGES) * 4 * STRIDE;
        } else {
            return 4 * (q0 + it) * STRIDE;
        }
    };
    auto copy_quad = [&](int it) {  // one commit group, empty past the range (keeps the ring's count)
        constexpr int CHUNKS = 4 * MT;  // 16-byte pieces of a packed row (both row sets)
        if (it < iters) {
            for (int c = lane; c < 4 * CHUNKS; c += 32) {
                const int rr = c / CHUNKS, j = c % CHUNKS, r = 4 * (q0 + it) + rr;
                const int h = j / (2 * MT), jj = j % (2 * MT);
                cp_async16(ws + slot_of(it) + rr * STRIDE + h * HALF + 4 * jj,
                           a.w + (size_t)r * n + (h ? base1 : base0) + 4 * jj);
            }
        }
        asm volatile("cp.async.commit_group;");
    };
    const int quads_per_group = G / 32;
    const int g_first = q0 / quads_per_group, g_end = (q0 + iters) / quads_per_group;
    for (int it = 0; it < (STAGES ? STAGES : iters); ++it) copy_quad(it);
    float sv[MT][2][2], zv[MT][2][2];
    auto load_scales = [&](int gbase) {
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int gi = gbase + 2 * t + c;
                    const int row = (h ? base1 : base0) + MT * g + m;
                    const bool ok = gi >= g_first && gi < g_end;
                    sv[m][h][c] = ok ? to_f32<F16>(a.s[(size_t)gi * n + row]) : 0.f;
                    zv[m][h][c] = ok ? to_f32<F16>(a.z[(size_t)gi * n + row]) : 0.f;
                }
    };
    load_scales(g_first & ~7);
    // This lane's packed rows (at most kp / WARPS / 32 of them, rounded up) of the norm weight.
    const int r_first = 4 * q0, r_count = 4 * iters;
    constexpr int MAX_R = 8;  // packed rows a lane prepares: K / WARPS <= 2048
    uint4 gw[MAX_R];
    if (a.norm) {
#pragma unroll
        for (int i = 0; i < MAX_R; ++i) {
            const int r = r_first + lane + 32 * i;
            if (lane + 32 * i < r_count) gw[i] = *reinterpret_cast<const uint4*>(a.norm + 8 * r);
        }
    }

    float c1 = 0.f, c2 = 0.f, s1 = 0.f, s2 = 0.f;
    long long slot = 0;
    if (EPI == ROPE_CACHE && threadIdx.x < HALF) {  // host-sent inputs: read before the wait
        const long long p = load_index(a.pos, a.idx64 & 1) * a.head_dim + col0 + threadIdx.x;
        const int d2 = a.head_dim / 2;
        c1 = to_f32<F16>(a.cos[p]), c2 = to_f32<F16>(a.cos[p + d2]);
        s1 = to_f32<F16>(a.sin[p]), s2 = to_f32<F16>(a.sin[p + d2]);
        slot = load_index(a.slot, a.idx64 & 2);
    }
    if (a.pdl) wait_for_inputs();
    if (a.pdl == 1) launch_dependents();
    float inv = 1.f;
    if (a.norm) {  // RMSNorm: rsqrt(mean(x^2) + eps) over the whole row
        // norm_shared: each warp sums the squares of its own rows (the ones it turns into operands next,
        // so their second read hits L1) and the program's warps meet in shared memory, in warp order;
        // otherwise every warp reads the whole row from L2 (4 KB for K = 2,048) before its first product.
        const int first = a.norm_shared ? r_first : 0, end = a.norm_shared ? r_first + r_count : kp;
        float sq = 0.f;
        for (int r = first + lane; r < end; r += 32) {
            const uint4 raw = *reinterpret_cast<const uint4*>(a.x + 8 * r);
            const uint32_t v[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float lo = to_f32<F16>(v[i] & 0xFFFF), hi = to_f32<F16>(v[i] >> 16);
                sq += lo * lo + hi * hi;
            }
        }
#pragma unroll
        for (int off = 16; off; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
        if (a.norm_shared) {
            if (lane == 0) nsq[warp] = sq;
            __syncthreads();
            sq = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) sq += nsq[wi];
        }
        inv = rsqrtf(sq / k + a.eps);
    }
#pragma unroll
    for (int i = 0; i < MAX_R; ++i) {
        if (32 * i >= r_count) break;
        const int r = r_first + lane + 32 * i;
        float acc = 0.f;
        if (lane + 32 * i < r_count) {
            const uint4 raw = *reinterpret_cast<const uint4*>(a.x + 8 * r);
            uint32_t v[4] = {raw.x, raw.y, raw.z, raw.w};
            if (a.norm) {
                const uint32_t gv[4] = {gw[i].x, gw[i].y, gw[i].z, gw[i].w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    uint32_t out = 0;
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const float xv = to_f32<F16>((v[j] >> (16 * half)) & 0xFFFF);
                        const float gv1 = to_f32<F16>((gv[j] >> (16 * half)) & 0xFFFF);
                        const float xn = to_f32<F16>(from_f32<F16>(xv * inv)) * gv1;
                        out |= (uint32_t)from_f32<F16>(xn) << (16 * half);
                    }
                    v[j] = out;
                }
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) acc += to_f32<F16>(v[j] & 0xFFFF) + to_f32<F16>(v[j] >> 16);
            uint4 p;
            p.x = __byte_perm(v[0], v[2], 0x5410);  // (x0, x4)
            p.y = __byte_perm(v[0], v[2], 0x7632);  // (x1, x5)
            p.z = __byte_perm(v[1], v[3], 0x5410);  // (x2, x6)
            p.w = __byte_perm(v[1], v[3], 0x7632);  // (x3, x7)
            xp[r] = p;
        }
#pragma unroll
        for (int off = 1; off < G / 8; off <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (lane + 32 * i < r_count && r % (G / 8) == 0) xsum[r / (G / 8)] = acc;
    }
    __syncwarp();

    float c[MT][4];
    float acc[MT][2];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
        acc[m][0] = acc[m][1] = 0.f;
        c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.f;
    }
    const uint32_t* wlo = ws + t * STRIDE + MT * g;
    const uint4* xq = xp + 4 * q0 + t;
    for (int it = 0; it < iters; ++it) {
        cp_async_wait(STAGES ? STAGES - 1 : iters - 1 - it);  // ring: one group committed per quad consumed
        __syncwarp();
        const int quad = q0 + it;
        const int group = quad / quads_per_group;
        const bool mine = g == (group & 7);
        const uint4 xv = xq[4 * it];
        const uint32_t b00 = mine ? xv.x : 0u, b01 = mine ? xv.y : 0u;
        const uint32_t b10 = mine ? xv.z : 0u, b11 = mine ? xv.w : 0u;
        const Words<MT> wl = lds_words<MT>(wlo + slot_of(it));
        const Words<MT> wh = lds_words<MT>(wlo + slot_of(it) + HALF);
        if constexpr (STAGES > 0) {  // every lane has read this slot: refill it with the quad STAGES ahead
            __syncwarp();
            copy_quad(it + STAGES);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
            mma<F16>(c[m], nibble_pair<F16>(wl.v[m], 0), nibble_pair<F16>(wh.v[m], 0),
                     nibble_pair<F16>(wl.v[m], 1), nibble_pair<F16>(wh.v[m], 1), b00, b01);
            mma<F16>(c[m], nibble_pair<F16>(wl.v[m], 2), nibble_pair<F16>(wh.v[m], 2),
                     nibble_pair<F16>(wl.v[m], 3), nibble_pair<F16>(wh.v[m], 3), b10, b11);
        }
        const bool chunk_end = ((group & 7) == 7 && (quad + 1) % quads_per_group == 0) || it + 1 == iters;
        if (chunk_end) {
            const int gbase = group & ~7;
#pragma unroll
            for (int m = 0; m < MT; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int cc = 0; cc < 2; ++cc) {
                        const int gi = gbase + 2 * t + cc;
                        const float xs = (gi >= g_first && gi < g_end) ? xsum[gi] : 0.f;
                        const float sc = sv[m][h][cc], ze = zv[m][h][cc];
                        const float coef = a.fma_mode ? ze - OFFSET * sc : -sc * (OFFSET + ze);
                        acc[m][h] += sc * c[m][2 * h + cc] + coef * xs;
                        c[m][2 * h + cc] = 0.f;
                    }
            if (it + 1 < iters) load_scales(gbase + 8);
        }
    }
    // Sum over the quad (t), then over the warps; the epilogue rounds as the unfused model does.
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = acc[m][h];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (t == 0) red[warp * ROWS + h * HALF + MT * g + m] = v;
        }
    __syncthreads();
    for (int j = threadIdx.x; j < (EPI == SILU_PAIR || EPI == ROPE_CACHE ? HALF : ROWS); j += WARPS * 32) {
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) v += red[wi * ROWS + j];
        uint16_t* y16 = static_cast<uint16_t*>(a.y);
        if constexpr (EPI == ROPE_CACHE) {
            float x2 = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) x2 += red[wi * ROWS + HALF + j];
            const float x1 = to_f32<F16>(from_f32<F16>(v));
            x2 = to_f32<F16>(from_f32<F16>(x2));
            const int d = a.head_dim, c = col0 + j;
            if (head < a.heads + a.kv_heads) {
                const float y1 = x1 * c1 + x2 * s1, y2 = x2 * c2 + x1 * s2;
                uint16_t* dst = head < a.heads ? y16 + head * d
                                               : a.kc + slot * a.stride_slot + (head - a.heads) * d;
                dst[c] = from_f32<F16>(y1);
                dst[c + d / 2] = from_f32<F16>(y2);
            } else {
                uint16_t* dst = a.vc + slot * a.stride_slot + (head - a.heads - a.kv_heads) * d;
                dst[c] = from_f32<F16>(x1);
                dst[c + d / 2] = from_f32<F16>(x2);
            }
        } else if constexpr (EPI == SILU_PAIR) {
            float up = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) up += red[wi * ROWS + HALF + j];
            const float gate = to_f32<F16>(from_f32<F16>(v));
            const float act = to_f32<F16>(from_f32<F16>(silu(gate)));
            y16[base0 + j] = from_f32<F16>(act * to_f32<F16>(from_f32<F16>(up)));
        } else {
            const int row = (j < HALF ? base0 : base1 - HALF) + j;
            if constexpr (EPI == RESIDUAL) {
                y16[row] = from_f32<F16>(to_f32<F16>(from_f32<F16>(v)) + to_f32<F16>(a.res[row]));
            } else {
                if (a.out_f32) {
                    static_cast<float*>(a.y)[row] = v;
                } else {
                    y16[row] = from_f32<F16>(v);
                }
            }
        }
    }
}

template <int MT, int WARPS, int G, bool F16, int EPI, int STAGES>
int launch(const Args& a, cudaStream_t stream) {
    constexpr int ROWS = 16 * MT;
    const int k = a.k, n = a.n;
    const bool paired = EPI == SILU_PAIR || EPI == ROPE_CACHE;
    const int rows_total = paired ? n / 2 : n;
    if (n % 4 || rows_total % (paired ? 8 * MT : ROWS) || k % (32 * WARPS)) return -2;
    if (EPI == ROPE_CACHE && ((a.head_dim / 2) % (8 * MT) || n != (a.heads + 2 * a.kv_heads) * a.head_dim))
        return -2;
    if ((k / 32 / WARPS) % (G / 32) || k / WARPS > 2048) return -2;
    const size_t ws_words = STAGES ? (size_t)WARPS * STAGES * 4 * (ROWS + 8) : (size_t)(k / 8) * (ROWS + 8);
    const size_t smem = ws_words * 4 + (size_t)(k / 8) * 16 + (size_t)(k / G) * 4 +
                        (size_t)WARPS * ROWS * 4 + (size_t)WARPS * 4;
    auto kernel = int4_gemv_tc_kernel<MT, WARPS, G, F16, EPI, STAGES>;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(paired ? n / 2 / (8 * MT) : n / ROWS);
    cfg.blockDim = dim3(WARPS * 32);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = a.pdl ? 1 : 0;
    return (int)cudaLaunchKernelEx(&cfg, kernel, a);
}

template <int MT, int WARPS, int G, bool F16, int S>
int by_epilogue(int epilogue, const Args& a, cudaStream_t st) {
    switch (epilogue) {
        case STORE: return launch<MT, WARPS, G, F16, STORE, S>(a, st);
        case RESIDUAL: return launch<MT, WARPS, G, F16, RESIDUAL, S>(a, st);
        case ROPE_CACHE: return launch<MT, WARPS, G, F16, ROPE_CACHE, S>(a, st);
        case SILU_PAIR: return launch<MT, WARPS, G, F16, SILU_PAIR, S>(a, st);
        default: return -4;
    }
}

template <int MT, int WARPS, int S>
int by_group(int group, int f16, int epilogue, const Args& a, cudaStream_t st) {
    if (group == 64) {
        return f16 ? by_epilogue<MT, WARPS, 64, true, S>(epilogue, a, st)
                   : by_epilogue<MT, WARPS, 64, false, S>(epilogue, a, st);
    }
    if (group == 128) {
        return f16 ? by_epilogue<MT, WARPS, 128, true, S>(epilogue, a, st)
                   : by_epilogue<MT, WARPS, 128, false, S>(epilogue, a, st);
    }
    return -3;
}

}  // namespace

// Returns 0, a CUDA error code, or -1 (no such (mt, warps, stages)), -2 (shape), -3 (group), -4 (epilogue).
extern "C" int if_int4_gemv_tc(const void* x, const void* norm, const void* w, const void* s, const void* z,
                               const void* res, void* y, int n, int k, int group, int fma_mode, int f16,
                               int epilogue, int out_f32, float eps, int mt, int warps, int pdl, void* stream,
                               const void* cos, const void* sin, const void* pos, const void* slot, void* kc,
                               void* vc, long long stride_slot, int heads, int kv_heads, int head_dim,
                               int idx64, int stages, int norm_shared) {
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    const Args a{static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(norm),
                 static_cast<const uint32_t*>(w), static_cast<const uint16_t*>(s),
                 static_cast<const uint16_t*>(z), static_cast<const uint16_t*>(res), y, n, k, fma_mode, pdl,
                 out_f32, eps, static_cast<const uint16_t*>(cos), static_cast<const uint16_t*>(sin), pos, slot,
                 static_cast<uint16_t*>(kc), static_cast<uint16_t*>(vc), stride_slot, heads, kv_heads,
                 head_dim, idx64, norm_shared};
#define IF_CASE(MT_, W_, S_)                      \
    if (mt == MT_ && warps == W_ && stages == S_) \
        return by_group<MT_, W_, S_>(group, f16, epilogue, a, st);
    IF_CASE(1, 8, 0) IF_CASE(1, 16, 0) IF_CASE(2, 8, 0) IF_CASE(2, 16, 0) IF_CASE(4, 4, 0) IF_CASE(4, 8, 0)
    IF_CASE(1, 8, 4) IF_CASE(1, 8, 8) IF_CASE(1, 16, 2) IF_CASE(1, 16, 4) IF_CASE(1, 16, 8) IF_CASE(2, 16, 4)
    IF_CASE(4, 8, 2) IF_CASE(4, 8, 4)
#undef IF_CASE
    return -1;
}
