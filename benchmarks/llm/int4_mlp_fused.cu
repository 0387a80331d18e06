// Experiment (run O12): int4 gate/up + SiLU and down + residual of one layer in ONE launch with a grid
// barrier between them, against the engine's two kernels (gate/up 4x8 on a ring of 4, down 1x16 on a ring of
// 4) in a PDL chain. What it tests: whether down's first ring stages and scales, issued at launch (before
// gate/up has even started), plus a ~1 us barrier, beat down's own launch after gate/up.
//
// Built by bench_int4_mlp_fused.py with the engine's source included (its helpers and its entry point, the
// two-kernel peer, in one library). bf16 activations, groups of 64, K = 2048 (gate/up) and 8192 (down),
// N = 2 x 8192 and 2048; 128 programs of 512 threads, one an SM: they must all be resident (the barrier).
#include "../../src/inferforge/llm/csrc/int4_gemv_tc.cu"

namespace {

constexpr int G = 64;

struct MlpArgs {
    const uint16_t* x;      // [2048] layer input: gate/up's RMSNorm input and down's residual
    const uint16_t* norm;   // [2048]
    const uint32_t* w13;    // [256, 16384] packed
    const uint16_t* s13;    // [32, 16384]
    const uint16_t* z13;
    const uint32_t* w2;     // [1024, 2048] packed
    const uint16_t* s2;     // [128, 2048]
    const uint16_t* z2;
    uint16_t* u;            // [8192] SiLU(gate) x up
    uint16_t* y;            // [2048] x + down(u)
    unsigned int* barrier;  // [2], zero between launches
    float eps;
    int fma_mode, pdl;
};

__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// One tile of a product: NW warps (warp `lw` of them) stream K in quads of 4 packed rows through a ring of
// 4 stages in `ws`, as `int4_gemv_tc_kernel` does. Phase objects keep what the prologue loaded.
template <int MT, int NW, int K, int N>
struct Tile {
    static constexpr int ROWS = 16 * MT, HALF = 8 * MT, STRIDE = ROWS + 8, KP = K / 8, STAGES = 4;
    static constexpr int ITERS = KP / 4 / NW, QPG = G / 32;
    const uint32_t* w;
    uint32_t* ws;
    int base0, base1, lw, lane, q0;
    __device__ int slot(int it) const { return (lw * STAGES + it % STAGES) * 4 * STRIDE; }
    __device__ void copy_quad(int it) const {
        constexpr int CHUNKS = 4 * MT;
        if (it < ITERS) {
            for (int c = lane; c < 4 * CHUNKS; c += 32) {
                const int rr = c / CHUNKS, j = c % CHUNKS, r = 4 * (q0 + it) + rr;
                const int h = j / (2 * MT), jj = j % (2 * MT);
                cp_async16(ws + slot(it) + rr * STRIDE + h * HALF + 4 * jj,
                           w + (size_t)r * N + (h ? base1 : base0) + 4 * jj);
            }
        }
        asm volatile("cp.async.commit_group;");
    }
    __device__ void scales(const uint16_t* s, const uint16_t* z, int gbase, float (&sv)[MT][2][2],
                           float (&zv)[MT][2][2]) const {
        const int g = lane >> 2, t = lane & 3, g_first = q0 / QPG, g_end = (q0 + ITERS) / QPG;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    const int gi = gbase + 2 * t + c, row = (h ? base1 : base0) + MT * g + m;
                    const bool ok = gi >= g_first && gi < g_end;
                    sv[m][h][c] = ok ? to_f32<false>(s[(size_t)gi * N + row]) : 0.f;
                    zv[m][h][c] = ok ? to_f32<false>(z[(size_t)gi * N + row]) : 0.f;
                }
    }
    // x operands of this warp's packed rows (optionally RMSNorm'd with `inv` and `gw`), their group sums.
    __device__ void operands(const uint16_t* x, bool cg, const uint16_t* norm, float inv, uint4* xp,
                             float* xsum) const {
        const int r_first = 4 * q0, r_count = 4 * ITERS;
        for (int i = 0; 32 * i < r_count; ++i) {
            const int r = r_first + lane + 32 * i;
            float acc = 0.f;
            if (lane + 32 * i < r_count) {
                const uint4 raw = cg ? __ldcg(reinterpret_cast<const uint4*>(x + 8 * r))
                                     : *reinterpret_cast<const uint4*>(x + 8 * r);
                uint32_t v[4] = {raw.x, raw.y, raw.z, raw.w};
                if (norm) {
                    const uint4 gr = *reinterpret_cast<const uint4*>(norm + 8 * r);
                    const uint32_t gv[4] = {gr.x, gr.y, gr.z, gr.w};
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        uint32_t out = 0;
#pragma unroll
                        for (int hf = 0; hf < 2; ++hf) {
                            const float xv = to_f32<false>((v[j] >> (16 * hf)) & 0xFFFF);
                            const float g1 = to_f32<false>((gv[j] >> (16 * hf)) & 0xFFFF);
                            const float xn = to_f32<false>(from_f32<false>(xv * inv)) * g1;
                            out |= (uint32_t)from_f32<false>(xn) << (16 * hf);
                        }
                        v[j] = out;
                    }
                }
#pragma unroll
                for (int j = 0; j < 4; ++j) acc += to_f32<false>(v[j] & 0xFFFF) + to_f32<false>(v[j] >> 16);
                uint4 p;
                p.x = __byte_perm(v[0], v[2], 0x5410), p.y = __byte_perm(v[0], v[2], 0x7632);
                p.z = __byte_perm(v[1], v[3], 0x5410), p.w = __byte_perm(v[1], v[3], 0x7632);
                xp[r] = p;
            }
#pragma unroll
            for (int off = 1; off < G / 8; off <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
            if (lane + 32 * i < r_count && r % (G / 8) == 0) xsum[r / (G / 8)] = acc;
        }
        __syncwarp();
    }
    // The ring loop; returns this thread's two row sums per m (rows h = 0 and 1), not yet summed over t.
    __device__ void products(const uint16_t* s, const uint16_t* z, int fma_mode, const uint4* xp,
                             const float* xsum, float (&sv)[MT][2][2], float (&zv)[MT][2][2],
                             float (&acc)[MT][2]) const {
        const int g = lane >> 2, t = lane & 3, g_first = q0 / QPG, g_end = (q0 + ITERS) / QPG;
        float c[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.f;
        const uint32_t* wlo = ws + t * STRIDE + MT * g;
        const uint4* xq = xp + 4 * q0 + t;
        for (int it = 0; it < ITERS; ++it) {
            cp_async_wait(STAGES - 1);
            __syncwarp();
            const int quad = q0 + it, group = quad / QPG;
            const bool mine = g == (group & 7);
            const uint4 xv = xq[4 * it];
            const uint32_t b00 = mine ? xv.x : 0u, b01 = mine ? xv.y : 0u;
            const uint32_t b10 = mine ? xv.z : 0u, b11 = mine ? xv.w : 0u;
            const Words<MT> wl = lds_words<MT>(wlo + slot(it));
            const Words<MT> wh = lds_words<MT>(wlo + slot(it) + HALF);
            __syncwarp();
            copy_quad(it + STAGES);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                mma<false>(c[m], nibble_pair<false>(wl.v[m], 0), nibble_pair<false>(wh.v[m], 0),
                           nibble_pair<false>(wl.v[m], 1), nibble_pair<false>(wh.v[m], 1), b00, b01);
                mma<false>(c[m], nibble_pair<false>(wl.v[m], 2), nibble_pair<false>(wh.v[m], 2),
                           nibble_pair<false>(wl.v[m], 3), nibble_pair<false>(wh.v[m], 3), b10, b11);
            }
            const bool chunk_end = ((group & 7) == 7 && (quad + 1) % QPG == 0) || it + 1 == ITERS;
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
                            const float coef = fma_mode ? ze - 128.f * sc : -sc * (128.f + ze);
                            acc[m][h] += sc * c[m][2 * h + cc] + coef * xs;
                            c[m][2 * h + cc] = 0.f;
                        }
                if (it + 1 < ITERS) scales(s, z, gbase + 8, sv, zv);
            }
        }
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                acc[m][h] += __shfl_xor_sync(0xffffffffu, acc[m][h], 1);
                acc[m][h] += __shfl_xor_sync(0xffffffffu, acc[m][h], 2);
            }
    }
};

using GateUp = Tile<4, 8, 2048, 16384>;  // one half of a program: 32 gate rows and their 32 up rows
using Down = Tile<1, 16, 8192, 2048>;    // the whole program: 16 rows

struct Smem {
    uint32_t ws13[2][8 * 4 * 4 * GateUp::STRIDE];
    uint4 xp13[2][256];
    float xsum13[2][32], red13[2][8 * 64], nsq[2][8];
    uint32_t ws2[16 * 4 * 4 * Down::STRIDE];
    uint4 xp2[1024];
    float xsum2[128], red2[16 * 16];
};

__global__ void __launch_bounds__(512, 1) int4_mlp_fused_kernel(const MlpArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, half = warp >> 3, lw = warp & 7;
    const int g = lane >> 2, t = lane & 3;

    // Down's tile: its first ring stages and scales before anything else (its weights are no kernel's
    // output), committed first so that gate/up's ring waits below cover them.
    Down dn{a.w2, sm.ws2, blockIdx.x * 16, blockIdx.x * 16 + 8, warp, lane, warp * Down::ITERS};
    for (int it = 0; it < Down::STAGES; ++it) dn.copy_quad(it);
    float sv2[1][2][2], zv2[1][2][2];
    dn.scales(a.s2, a.z2, (dn.q0 / Down::QPG) & ~7, sv2, zv2);

    // Gate/up: program half `half` takes gate rows [32 p, 32 p + 32) of pair tile p = 2 blockIdx + half.
    const int tile = 2 * blockIdx.x + half;
    GateUp gu{a.w13, sm.ws13[half], tile * 32, 8192 + tile * 32, lw, lane, lw * GateUp::ITERS};
    for (int it = 0; it < GateUp::STAGES; ++it) gu.copy_quad(it);
    float sv[4][2][2], zv[4][2][2];
    gu.scales(a.s13, a.z13, (gu.q0 / GateUp::QPG) & ~7, sv, zv);

    if (a.pdl) wait_for_inputs();
    // RMSNorm: each warp its own rows, the half's 8 warps meet in shared memory (as NORM["shared"]).
    float sq = 0.f;
    for (int r = 4 * gu.q0 + lane; r < 4 * (gu.q0 + GateUp::ITERS); r += 32) {
        const uint4 raw = *reinterpret_cast<const uint4*>(a.x + 8 * r);
        const uint32_t v[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float lo = to_f32<false>(v[i] & 0xFFFF), hi = to_f32<false>(v[i] >> 16);
            sq += lo * lo + hi * hi;
        }
    }
#pragma unroll
    for (int off = 16; off; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
    if (lane == 0) sm.nsq[half][lw] = sq;
    named_sync(1 + half, 256);
    sq = 0.f;
#pragma unroll
    for (int wi = 0; wi < 8; ++wi) sq += sm.nsq[half][wi];
    const float inv = rsqrtf(sq / 2048 + a.eps);
    gu.operands(a.x, false, a.norm, inv, sm.xp13[half], sm.xsum13[half]);
    float acc[4][2];
    gu.products(a.s13, a.z13, a.fma_mode, sm.xp13[half], sm.xsum13[half], sv, zv, acc);
#pragma unroll
    for (int m = 0; m < 4; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            if (t == 0) sm.red13[half][lw * 64 + h * 32 + 4 * g + m] = acc[m][h];
    named_sync(1 + half, 256);
    for (int j = threadIdx.x & 255; j < 32; j += 256) {
        float gate = 0.f, up = 0.f;
#pragma unroll
        for (int wi = 0; wi < 8; ++wi) gate += sm.red13[half][wi * 64 + j], up += sm.red13[half][wi * 64 + 32 + j];
        gate = to_f32<false>(from_f32<false>(gate));
        const float act = to_f32<false>(from_f32<false>(silu(gate)));
        a.u[tile * 32 + j] = from_f32<false>(act * to_f32<false>(from_f32<false>(up)));
    }

    // Grid barrier: every program's u rows written before any program reads u. The last program to leave
    // puts both counters back to zero for the next launch or graph replay.
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(&a.barrier[0], 1u);
        while (atomicAdd(&a.barrier[0], 0u) < gridDim.x) {
        }
        __threadfence();
        if (atomicAdd(&a.barrier[1], 1u) == gridDim.x - 1) {
            a.barrier[0] = 0;
            a.barrier[1] = 0;
        }
    }
    __syncthreads();
    if (a.pdl) launch_dependents();

    // Down: x = u from other SMs (read past L1), then its ring, the residual, the store.
    dn.operands(a.u, true, nullptr, 1.f, sm.xp2, sm.xsum2);
    float acc2[1][2];
    dn.products(a.s2, a.z2, a.fma_mode, sm.xp2, sm.xsum2, sv2, zv2, acc2);
    if (t == 0) {
        sm.red2[warp * 16 + g] = acc2[0][0];
        sm.red2[warp * 16 + 8 + g] = acc2[0][1];
    }
    __syncthreads();
    if (threadIdx.x < 16) {
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < 16; ++wi) v += sm.red2[wi * 16 + threadIdx.x];
        const int row = blockIdx.x * 16 + threadIdx.x;
        a.y[row] = from_f32<false>(to_f32<false>(from_f32<false>(v)) + to_f32<false>(a.x[row]));
    }
}

}  // namespace

extern "C" int if_int4_mlp_fused(const void* x, const void* norm, const void* w13, const void* s13,
                                 const void* z13, const void* w2, const void* s2, const void* z2, void* u,
                                 void* y, void* barrier, float eps, int fma_mode, int pdl, void* stream) {
    const MlpArgs a{static_cast<const uint16_t*>(x),  static_cast<const uint16_t*>(norm),
                    static_cast<const uint32_t*>(w13), static_cast<const uint16_t*>(s13),
                    static_cast<const uint16_t*>(z13), static_cast<const uint32_t*>(w2),
                    static_cast<const uint16_t*>(s2),  static_cast<const uint16_t*>(z2),
                    static_cast<uint16_t*>(u),         static_cast<uint16_t*>(y),
                    static_cast<unsigned int*>(barrier), eps, fma_mode, pdl};
    const int smem = (int)sizeof(Smem);
    cudaError_t e = cudaFuncSetAttribute(int4_mlp_fused_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    int per_sm = 0, sms = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, int4_mlp_fused_kernel, 512, smem);
    if (per_sm * sms < 128) return -5;  // the barrier needs all 128 programs resident at once
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(128);
    cfg.blockDim = dim3(512);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = reinterpret_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return (int)cudaLaunchKernelEx(&cfg, int4_mlp_fused_kernel, a);
}
