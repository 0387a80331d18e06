// Experiment, measured slower than the engine's kernel chain (runs P1-P5 of 2026-11-24, docs/persistent.md;
// int4_step.py says by how much and why). Built and driven by bench_int4_step.py.
//
// The whole batch-1 int4 decode step in one persistent kernel: every layer's q/k/v (RMSNorm, RoPE, cache
// write), attention over the paged cache, o (+ residual), gate/up (RMSNorm, SiLU x up), down (+ residual),
// then the final RMSNorm and the LM head (fp32 logits). One program an SM; the phases meet at grid barriers.
//
// Why: the kernel chain (int4_gemv_tc.cu and Triton, 5 kernels a layer) pays ~3-4 us at every kernel boundary
// beyond its bytes (runs O4-O5, docs/llm-runs.md), ~80 boundaries a step, and the int4 step moves only ~0.7 GB.
// Here each warp streams ITS OWN sequence of weight quads through a ring of shared-memory stages that runs
// on across phases: while a program waits at a barrier, the next phase's (and the next layer's) first
// weights are already on their way, which a kernel boundary only gives when the next kernel's programs fit
// beside the previous one's (O1, O12: a pairwise fusion with one barrier lost for lack of exactly that).
//
// Work split, in every GEMV phase: a tile is 16 x MT output rows by the whole K; its WARPS warps take equal,
// group-aligned K ranges (one chunk of at most 8 groups each, so scales are read once a tile) and meet in
// shared memory. Tiles go to programs round-robin. The product code is int4_gemv_tc.cu's (same operands,
// same mma, same rounding in the epilogues); what differs is where the quads come from.
//
// Activations written inside the launch (the residual stream, q, the attention output, SiLU x up, the new
// keys and values) are read with ld.global.cg: L1 is not coherent across SMs.
#include "../../src/inferforge/llm/csrc/int4_gemv_tc.cu"

namespace {

enum Kind { K_QKV = 0, K_ATTN = 1, K_O = 2, K_GATEUP = 3, K_DOWN = 4, K_HEAD = 5 };

// One phase, as the host packs it: 12 64-bit fields (int4_step.py builds the same layout).
struct Phase {
    long long kind, n, k;
    unsigned long long w, s, z;  // packed weight [K/8, N] int32, scales and zeros [K/G, N]
    unsigned long long x;        // input row: QKV, GATEUP, HEAD the residual stream (RMSNorm'd); O unused
                                 // (the attention partials); DOWN SiLU x up; ATTN q
    unsigned long long norm;     // RMSNorm weight [K] or 0
    unsigned long long y;        // QKV q; ATTN unused (its partials go to StepArgs.part, which o combines);
                                 // O, DOWN the residual stream (in place);
                                 // GATEUP SiLU x up; HEAD fp32 logits
    unsigned long long kc, vc;   // QKV, ATTN: this layer's caches [blocks, block_size, kv_heads, D]
    unsigned long long pad;
};

struct StepArgs {
    const Phase* phases;
    int num_phases;
    const long long* pos;    // [1] position of the new token
    const long long* slot;   // [1] its cache slot
    const long long* ctx;    // [1] context length including it
    const long long* table;  // [max_blocks] block table
    const uint16_t* cos;     // [positions, D] (sin sign-folded), activation dtype
    const uint16_t* sin;
    float* part;             // attention partials [kv_heads][MAX_SPLITS][GP][PART]
    unsigned int* bar;       // [2] grid barrier, zero between launches
    int* error;              // set when a barrier timed out (then the outputs are garbage, not a hang)
    long long* trace;        // [programs][phases][2] globaltimer at each phase's start and end, then
                             // [TRACE_UNITS]: when program 0's warp 0 had each unit in hand; or null
    int heads, kv_heads, block_size, fma_mode;
    long long stride_slot;   // elements from one cache slot to the next (kv_heads * D)
    float eps, scale;
};

constexpr int WARPS = 16, THREADS = WARPS * 32, STAGES = 7;
// A ring stage holds one unit: 1 KB of packed weights whatever the tile (4 / MT quads of 4 packed rows of
// 16 MT words), so every phase keeps the same bytes in flight (run P2: with one quad a stage, the 16-row
// tiles of q/k/v, o and down kept a quarter of that and their phases were latency). Rows are swizzled by
// 16-byte chunk instead of padded, so the mma operand reads stay free of bank conflicts (`chunk_at`).
constexpr int SLOT_WORDS = 256;
constexpr int TRACE_UNITS = 2048;
constexpr int MAX_KP = 1024;              // packed rows of x: K <= 8192
constexpr int D = 64, GP = 4;             // head dim, q heads per KV head
constexpr int MAX_SPLITS = 32, MIN_SPLIT_TOKENS = 32;
constexpr int PART = D + 4;  // floats a split's partial of one q head takes: o[D], max, sum (16-byte rows)
// A tile's scales and zeros for one warp (its groups x both row sets), copied beside the tile's first unit
// into that stage's scale slot: at most 8 (groups x MT) x 2 x 2 x 8 halves = 512 bytes
// (int4_step.reasons checks groups x MT <= 8). The consumer moves them to `cur` before the slot refills.
constexpr int SC_WORDS = 128;


// Physical 16-byte chunk of logical chunk c in packed row rr of a stage: rows t = rr % 4 are read together
// by the four lanes of a quad group, so their chunks are spread over distinct bank groups.
template <int MT>
__device__ __forceinline__ int chunk_at(int rr, int c) {
    static_assert(MT == 1 || MT == 4, "tiles of 16 or 64 rows");
    const int t = rr & 3;
    return MT == 4 ? c ^ (2 * t) : c ^ (2 * (t >> 1));
}

// Where logical word `word` of packed row rr of a stage lives (rows of 16 MT words, chunks swizzled).
template <int MT>
__device__ __forceinline__ const uint32_t* word_at(const uint32_t* stage, int rr, int word) {
    return stage + rr * 16 * MT + 4 * chunk_at<MT>(rr, word >> 2) + (word & 3);
}

__host__ __device__ constexpr int mt_of(int kind) { return kind == K_GATEUP || kind == K_HEAD ? 4 : 1; }

__device__ __forceinline__ uint4 ldcg4(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint32_t ldcg32(const void* p) {
    return __ldcg(reinterpret_cast<const unsigned int*>(p));
}
__device__ __forceinline__ uint16_t ldcg16(const uint16_t* p) {
    return __ldcg(reinterpret_cast<const unsigned short*>(p));
}

__device__ __forceinline__ long long now_ns() {
    long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ __forceinline__ unsigned int ld_acquire(const unsigned int* p) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

struct Smem {
    uint32_t ring[WARPS][STAGES][SLOT_WORDS];
    uint32_t sc[WARPS][STAGES][SC_WORDS];  // the stages' scale slots (used by a tile's first unit)
    uint32_t cur[WARPS][SC_WORDS];         // the scales of the tile each warp is on
    float rope[2][D];                        // cos and sin at this step's position
    union {
        uint4 xp[MAX_KP];                     // x operands: (x[8r+i], x[8r+i+4]), i < 4
        float attn[WARPS][GP][PART];          // per-warp attention partials (o, then max and sum)
    } u;
    float xsum[MAX_KP / 8];                   // per group of 64 (or 128) x values
    float red[2][WARPS][64];                  // per-warp row sums of a tile, double-buffered by tile
    float nsq[WARPS];
    int ok;  // the last grid barrier passed
};

// Tile geometry: output rows base0 + MT g + m (A rows g) and base1 + MT g + m (A rows g + 8).
struct Rows {
    int base0, base1;
};

__device__ __forceinline__ Rows rows_of(int kind, int tile, int n) {
    if (kind == K_QKV) {  // 8 rows of one head's first half and the matching 8 of its second half
        const int per_head = D / 2 / 8, head = tile / per_head, col0 = (tile % per_head) * 8;
        return {head * D + col0, head * D + col0 + D / 2};
    }
    if (kind == K_GATEUP) return {tile * 32, n / 2 + tile * 32};  // gate rows and their up rows
    const int rows = 16 * mt_of(kind);
    return {tile * rows, tile * rows + rows / 2};
}

__device__ __forceinline__ int tiles_of(int kind, int n) {
    return kind == K_GATEUP ? n / 64 : n / (16 * mt_of(kind));
}

// The sequence of weight units one warp streams: for each GEMV phase, for each of its program's tiles, the
// warp's K range in units of 1 KB. `issue` copies the next unit (and with a tile's first, its scales) into a
// stage (one commit group, empty past the end, so that cp.async.wait_group keeps counting right).
struct Producer {
    int p, tile, q;  // next unit to issue: phase, tile, unit of this warp's range
    int kind, n, iters, units, ntiles;
    const uint32_t* w;
    const uint16_t *s, *z;
    const uint32_t *src0, *src1;  // this lane's two 16-byte chunks of the next unit (set at a tile's start)

    __device__ void load(const StepArgs& a) {
        if (p >= a.num_phases) return;
        const Phase& ph = a.phases[p];
        kind = (int)ph.kind, n = (int)ph.n, iters = (int)ph.k / 32 / WARPS, ntiles = tiles_of(kind, n);
        units = iters * mt_of(kind) / 4;
        w = reinterpret_cast<const uint32_t*>(ph.w);
        s = reinterpret_cast<const uint16_t*>(ph.s), z = reinterpret_cast<const uint16_t*>(ph.z);
    }
    // Move to the first phase at or after p that has a tile for this program.
    __device__ void settle(const StepArgs& a, int lane) {
        while (p < a.num_phases) {
            load(a);
            if (kind != K_ATTN && (int)blockIdx.x < ntiles) break;
            ++p;
        }
        tile = blockIdx.x, q = 0;
        if (p < a.num_phases) start_tile(lane);
    }
    // Sources of this lane's chunks (c = lane, lane + 32 of a unit's 64) in the tile's first unit; each
    // later unit is 16 / MT packed rows further.
    __device__ void start_tile(int lane) {
        const int mt = mt_of(kind), chunks = 4 * mt;
        const Rows rw = rows_of(kind, tile, n);
        const int r0 = 4 * (threadIdx.x >> 5) * iters;
        const int c0 = lane, c1 = lane + 32;
        const int j0 = c0 % chunks, j1 = c1 % chunks;
        src0 = w + (size_t)(r0 + c0 / chunks) * n + (j0 / (2 * mt) ? rw.base1 : rw.base0) + 4 * (j0 % (2 * mt));
        src1 = w + (size_t)(r0 + c1 / chunks) * n + (j1 / (2 * mt) ? rw.base1 : rw.base0) + 4 * (j1 % (2 * mt));
    }
    template <int MT>
    __device__ void copy(uint32_t* dst, int lane) {
        constexpr int CHUNKS = 4 * MT, WORDS = 16 * MT;  // 16-byte chunks and words of a packed row
        const int c0 = lane, c1 = lane + 32;
        cp_async16(dst + (c0 / CHUNKS) * WORDS + 4 * chunk_at<MT>(c0 / CHUNKS, c0 % CHUNKS), src0);
        cp_async16(dst + (c1 / CHUNKS) * WORDS + 4 * chunk_at<MT>(c1 / CHUNKS, c1 % CHUNKS), src1);
        const size_t step = (size_t)(16 / MT) * n;
        src0 += step, src1 += step;
    }
    // This warp's scales and zeros of the tile: [groups][s, z][row set][8 MT rows] halves.
    template <int MT, int G>
    __device__ void copy_scales(uint32_t* dst, int warp, int lane) const {
        constexpr int HALF = 8 * MT, QPG = G / 32;
        const Rows rw = rows_of(kind, tile, n);
        const int g_first = warp * iters / QPG, chunks = iters / QPG * 4 * MT;
        uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
        for (int c = lane; c < chunks; c += 32) {
            const int gl = c / (4 * MT), rem = c % (4 * MT);
            const int which = rem / (2 * MT), h = (rem / MT) % 2, part = rem % MT;
            const uint16_t* src = (which ? z : s) + (size_t)(g_first + gl) * n + (h ? rw.base1 : rw.base0) + 8 * part;
            cp_async16(d16 + ((gl * 2 + which) * 2 + h) * HALF + 8 * part, src);
        }
    }
    template <int G>
    __device__ void issue(const StepArgs& a, uint32_t* dst, uint32_t* sc_dst, int warp, int lane) {
        if (p < a.num_phases) {
            if (mt_of(kind) == 4) {
                if (q == 0) copy_scales<4, G>(sc_dst, warp, lane);
                copy<4>(dst, lane);
            } else {
                if (q == 0) copy_scales<1, G>(sc_dst, warp, lane);
                copy<1>(dst, lane);
            }
            if (++q == units) {
                q = 0;
                tile += gridDim.x;
                if (tile >= ntiles) {
                    ++p;
                    settle(a, lane);
                } else {
                    start_tile(lane);
                }
            }
        }
        asm volatile("cp.async.commit_group;");
    }
};

// Returns false once any barrier of this launch timed out (then every program leaves: garbage, not a hang).
// Thread 0 decides for its program and tells the others through shared memory, so a program never splits.
__device__ bool grid_barrier(const StepArgs& a, unsigned int target, int* ok_smem) {
    __syncthreads();
    if (threadIdx.x == 0) {
        int ok = *reinterpret_cast<volatile int*>(a.error) == 0;
        if (ok) {
            __threadfence();
            atomicAdd(&a.bar[0], 1u);
            const long long t0 = clock64();
            while (ld_acquire(&a.bar[0]) < target) {
                if (clock64() - t0 > (1LL << 31)) {  // ~1 s: a bug, not a wait
                    atomicExch(a.error, 1);
                    ok = 0;
                    break;
                }
            }
        }
        *ok_smem = ok;
    }
    __syncthreads();
    return *ok_smem != 0;
}

// Per-warp state of the consumer side.
struct Consumer {
    int warp, lane, g, t;
    int used;  // units consumed so far (ring stage = used % STAGES)
};

// x operands of this warp's K range (RMSNorm'd when `norm`), as int4_gemv_tc_kernel builds them; the norm's
// sum of squares is split over the warps and met in shared memory.
template <bool F16>
__device__ uint4 attention_row(const StepArgs& a, int r, int splits);

// splits > 0: x is the attention output, combined here from the splits' partials (`attention_row`).
template <bool F16>
__device__ void build_operands(Smem& sm, const Consumer& cs, const StepArgs& a, const uint16_t* x,
                               const uint16_t* norm, int k, int group, float eps, int splits) {
    const int iters = k / 32 / WARPS, r_first = 4 * cs.warp * iters, r_count = 4 * iters;
    constexpr int MAX_R = 2;  // packed rows a lane prepares: K / WARPS <= 512
    uint4 raw[MAX_R];
#pragma unroll
    for (int i = 0; i < MAX_R; ++i) {
        if (cs.lane + 32 * i >= r_count) continue;
        const int r = r_first + cs.lane + 32 * i;
        raw[i] = splits ? attention_row<F16>(a, r, splits) : ldcg4(x + 8 * r);
    }
    float inv = 1.f;
    if (norm) {
        float sq = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_R; ++i) {
            if (cs.lane + 32 * i >= r_count) continue;
            const uint32_t v[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float lo = to_f32<F16>(v[j] & 0xFFFF), hi = to_f32<F16>(v[j] >> 16);
                sq += lo * lo + hi * hi;
            }
        }
#pragma unroll
        for (int off = 16; off; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
        if (cs.lane == 0) sm.nsq[cs.warp] = sq;
        __syncthreads();
        sq = 0.f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) sq += sm.nsq[wi];
        inv = rsqrtf(sq / k + eps);
    }
    const int per_group = group / 8;  // packed rows a group
#pragma unroll
    for (int i = 0; i < MAX_R; ++i) {
        if (32 * i >= r_count) break;
        const int r = r_first + cs.lane + 32 * i;
        float acc = 0.f;
        if (cs.lane + 32 * i < r_count) {
            uint32_t v[4] = {raw[i].x, raw[i].y, raw[i].z, raw[i].w};
            if (norm) {
                const uint4 gw = *reinterpret_cast<const uint4*>(norm + 8 * r);
                const uint32_t gv[4] = {gw.x, gw.y, gw.z, gw.w};
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
            p.x = __byte_perm(v[0], v[2], 0x5410);
            p.y = __byte_perm(v[0], v[2], 0x7632);
            p.z = __byte_perm(v[1], v[3], 0x5410);
            p.w = __byte_perm(v[1], v[3], 0x7632);
            sm.u.xp[r] = p;
        }
        for (int off = 1; off < per_group; off <<= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (cs.lane + 32 * i < r_count && r % per_group == 0) sm.xsum[r / per_group] = acc;
    }
    __syncwarp();
}

// One tile of a GEMV phase: this warp's quads out of the ring (refilled STAGES ahead by `prod`), the
// per-group scales once at the end (the warp's range is one chunk of <= 8 groups), the warps' sums met in
// shared memory, then the epilogue (as int4_gemv_tc_kernel's, same rounding).
template <int MT, int G, bool F16>
__device__ void gemv_tile(Smem& sm, Consumer& cs, Producer& prod, const StepArgs& a, const Phase& ph, int kind,
                          int tile, int parity, long long slot) {
    constexpr int HALF = 8 * MT, ROWS = 16 * MT, U = 4 / MT;  // U: quads a unit
    constexpr float OFFSET = F16 ? 1024.f : 128.f;
    const int n = (int)ph.n, k = (int)ph.k, iters = k / 32 / WARPS, q0 = cs.warp * iters;
    const Rows rw = rows_of(kind, tile, n);
    constexpr int quads_per_group = G / 32;
    const int g_first = q0 / quads_per_group, g_end = (q0 + iters) / quads_per_group, gbase = g_first & ~7;
    // The residual row this thread adds in the epilogue (O, DOWN), read now so its latency hides under the
    // products: written two barriers ago at the latest.
    uint16_t* y16 = reinterpret_cast<uint16_t*>(ph.y);
    float resv = 0.f;
    if ((kind == K_O || kind == K_DOWN) && threadIdx.x < ROWS) {
        const int j = threadIdx.x;
        resv = to_f32<F16>(ldcg16(y16 + (j < HALF ? rw.base0 : rw.base1 - HALF) + j));
    }
    // Accumulators: MT sets, or for 16-row tiles two (even and odd quads: the unit's 8 mma then form two
    // chains of 4, not one of 8), added before the scales.
    constexpr int CS = MT == 1 ? 2 : MT;
    float c[CS][4];
#pragma unroll
    for (int m = 0; m < CS; ++m) c[m][0] = c[m][1] = c[m][2] = c[m][3] = 0.f;
    for (int it = 0; it < iters / U; ++it) {
        cp_async_wait(STAGES - 1);
        __syncwarp();
        const int st = cs.used % STAGES;
        const uint32_t* stage = sm.ring[cs.warp][st];
        if (a.trace && blockIdx.x == 0 && threadIdx.x == 0 && cs.used < TRACE_UNITS)
            a.trace[(size_t)gridDim.x * a.num_phases * 2 + cs.used] = now_ns();
        if (it == 0)  // the tile's scales, out of the stage's slot before it refills
            reinterpret_cast<uint4*>(sm.cur[cs.warp])[cs.lane] =
                reinterpret_cast<const uint4*>(sm.sc[cs.warp][st])[cs.lane];
        Words<MT> wl[U], wh[U];
#pragma unroll
        for (int qq = 0; qq < U; ++qq) {
            const int rr = 4 * qq + cs.t;
            wl[qq] = lds_words<MT>(word_at<MT>(stage, rr, MT * cs.g));
            wh[qq] = lds_words<MT>(word_at<MT>(stage, rr, HALF + MT * cs.g));
        }
        __syncwarp();  // every lane has read this stage: refill it with the unit STAGES ahead
        prod.issue<G>(a, sm.ring[cs.warp][st], sm.sc[cs.warp][st], cs.warp, cs.lane);
        ++cs.used;
#pragma unroll
        for (int qq = 0; qq < U; ++qq) {
            const int qi = q0 + it * U + qq;
            const bool mine = cs.g == ((qi / quads_per_group) & 7);
            const uint4 xv = sm.u.xp[4 * qi + cs.t];
            const uint32_t b00 = mine ? xv.x : 0u, b01 = mine ? xv.y : 0u;
            const uint32_t b10 = mine ? xv.z : 0u, b11 = mine ? xv.w : 0u;
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                float* acc = c[MT == 1 ? (qq & 1) : m];
                mma<F16>(acc, nibble_pair<F16>(wl[qq].v[m], 0), nibble_pair<F16>(wh[qq].v[m], 0),
                         nibble_pair<F16>(wl[qq].v[m], 1), nibble_pair<F16>(wh[qq].v[m], 1), b00, b01);
                mma<F16>(acc, nibble_pair<F16>(wl[qq].v[m], 2), nibble_pair<F16>(wh[qq].v[m], 2),
                         nibble_pair<F16>(wl[qq].v[m], 3), nibble_pair<F16>(wh[qq].v[m], 3), b10, b11);
            }
        }
    }
    if constexpr (MT == 1) {
#pragma unroll
        for (int e = 0; e < 4; ++e) c[0][e] += c[1][e];
    }
    const uint16_t* scs = reinterpret_cast<const uint16_t*>(sm.cur[cs.warp]);
    float* red = &sm.red[parity][0][0];
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float v = 0.f;
#pragma unroll
            for (int cc = 0; cc < 2; ++cc) {
                const int gi = gbase + 2 * cs.t + cc, gl = gi - g_first, r = MT * cs.g + m;
                const bool ok = gi >= g_first && gi < g_end;
                const float xs = ok ? sm.xsum[gi] : 0.f;
                const float sc = ok ? to_f32<F16>(scs[((gl * 2 + 0) * 2 + h) * HALF + r]) : 0.f;
                const float ze = ok ? to_f32<F16>(scs[((gl * 2 + 1) * 2 + h) * HALF + r]) : 0.f;
                const float coef = a.fma_mode ? ze - OFFSET * sc : -sc * (OFFSET + ze);
                v += sc * c[m][2 * h + cc] + coef * xs;
            }
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (cs.t == 0) red[cs.warp * 64 + h * HALF + MT * cs.g + m] = v;
        }
    __syncthreads();
    const bool paired = kind == K_QKV || kind == K_GATEUP;
    for (int j = threadIdx.x; j < (paired ? HALF : ROWS); j += THREADS) {
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) v += red[wi * 64 + j];
        if (kind == K_QKV) {
            float x2 = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) x2 += red[wi * 64 + HALF + j];
            const float x1 = to_f32<F16>(from_f32<F16>(v));
            x2 = to_f32<F16>(from_f32<F16>(x2));
            const int head = rw.base0 / D, cidx = rw.base0 % D + j;
            if (head < a.heads + a.kv_heads) {
                const float c1 = sm.rope[0][cidx], c2 = sm.rope[0][cidx + D / 2];
                const float s1 = sm.rope[1][cidx], s2 = sm.rope[1][cidx + D / 2];
                const float y1 = x1 * c1 + x2 * s1, y2 = x2 * c2 + x1 * s2;
                uint16_t* dst = head < a.heads ? y16 + head * D
                                               : reinterpret_cast<uint16_t*>(ph.kc) + slot * a.stride_slot +
                                                     (head - a.heads) * D;
                dst[cidx] = from_f32<F16>(y1);
                dst[cidx + D / 2] = from_f32<F16>(y2);
            } else {
                uint16_t* dst =
                    reinterpret_cast<uint16_t*>(ph.vc) + slot * a.stride_slot + (head - a.heads - a.kv_heads) * D;
                dst[cidx] = from_f32<F16>(x1);
                dst[cidx + D / 2] = from_f32<F16>(x2);
            }
        } else if (kind == K_GATEUP) {
            float up = 0.f;
#pragma unroll
            for (int wi = 0; wi < WARPS; ++wi) up += red[wi * 64 + HALF + j];
            const float gate = to_f32<F16>(from_f32<F16>(v));
            const float act = to_f32<F16>(from_f32<F16>(silu(gate)));
            y16[rw.base0 + j] = from_f32<F16>(act * to_f32<F16>(from_f32<F16>(up)));
        } else {
            const int row = (j < HALF ? rw.base0 : rw.base1 - HALF) + j;
            if (kind == K_HEAD) {
                reinterpret_cast<float*>(ph.y)[row] = v;
            } else {  // O, DOWN: the residual stream, in place (this thread read and writes this row only)
                y16[row] = from_f32<F16>(to_f32<F16>(from_f32<F16>(v)) + resv);
            }
        }
    }
}

__device__ __forceinline__ int num_splits(long long ctx, int kv_heads) {
    const int splits = (int)((ctx + MIN_SPLIT_TOKENS - 1) / MIN_SPLIT_TOKENS);
    return max(1, min(splits, min(MAX_SPLITS, (int)gridDim.x / kv_heads)));
}

// Attention of the GP q heads of one KV head over a range of the context (split-KV): each warp takes every
// WARPS-th token (online softmax; the keys and values of TOKENS tokens loaded before any is used), the warps
// meet in shared memory and the program writes its partial (sum of p v, max, sum of p) for the o phase to
// combine: no arrival counter, no fence beyond the grid barrier (run P2: the last-arriver combine made the
// attention phase 6-7 us).
template <bool F16>
__device__ void attention(Smem& sm, const Consumer& cs, const StepArgs& a, const Phase& ph, long long ctx) {
    constexpr int TOKENS = 4;
    const int kvh = a.kv_heads, splits = num_splits(ctx, kvh);
    if ((int)blockIdx.x >= kvh * splits) return;
    const int h = blockIdx.x / splits, s = blockIdx.x % splits;
    const long long per = (ctx + splits - 1) / splits, t0 = s * per, t1 = min(ctx, t0 + per);
    const uint16_t* q = reinterpret_cast<const uint16_t*>(ph.x);
    const uint16_t* kc = reinterpret_cast<const uint16_t*>(ph.kc);
    const uint16_t* vc = reinterpret_cast<const uint16_t*>(ph.vc);
    float qv[GP][2], m[GP], l[GP], o[GP][2];
#pragma unroll
    for (int gh = 0; gh < GP; ++gh) {
        const uint32_t qq = ldcg32(q + (h * GP + gh) * D + 2 * cs.lane);
        qv[gh][0] = to_f32<F16>(qq & 0xFFFF) * a.scale, qv[gh][1] = to_f32<F16>(qq >> 16) * a.scale;
        m[gh] = -INFINITY, l[gh] = 0.f, o[gh][0] = o[gh][1] = 0.f;
    }
    for (long long base = t0 + cs.warp; base < t1; base += (long long)WARPS * TOKENS) {
        uint32_t kk[TOKENS], vv[TOKENS];
        long long off[TOKENS];
#pragma unroll
        for (int i = 0; i < TOKENS; ++i) {
            const long long tk = base + (long long)i * WARPS;
            off[i] = tk < t1 ? a.table[tk / a.block_size] * a.block_size + tk % a.block_size : -1;
        }
#pragma unroll
        for (int i = 0; i < TOKENS; ++i) {
            const long long e = off[i] * a.stride_slot + h * D + 2 * cs.lane;
            kk[i] = off[i] >= 0 ? ldcg32(kc + e) : 0u;
            vv[i] = off[i] >= 0 ? ldcg32(vc + e) : 0u;
        }
#pragma unroll
        for (int i = 0; i < TOKENS; ++i) {
            if (off[i] < 0) break;
            const float k0 = to_f32<F16>(kk[i] & 0xFFFF), k1 = to_f32<F16>(kk[i] >> 16);
            const float v0 = to_f32<F16>(vv[i] & 0xFFFF), v1 = to_f32<F16>(vv[i] >> 16);
#pragma unroll
            for (int gh = 0; gh < GP; ++gh) {
                float sc = qv[gh][0] * k0 + qv[gh][1] * k1;
#pragma unroll
                for (int o2 = 16; o2; o2 >>= 1) sc += __shfl_xor_sync(0xffffffffu, sc, o2);
                const float mn = fmaxf(m[gh], sc), corr = __expf(m[gh] - mn), p = __expf(sc - mn);
                l[gh] = l[gh] * corr + p;
                o[gh][0] = o[gh][0] * corr + p * v0, o[gh][1] = o[gh][1] * corr + p * v1;
                m[gh] = mn;
            }
        }
    }
#pragma unroll
    for (int gh = 0; gh < GP; ++gh) {
        sm.u.attn[cs.warp][gh][2 * cs.lane] = o[gh][0];
        sm.u.attn[cs.warp][gh][2 * cs.lane + 1] = o[gh][1];
        if (cs.lane == 0) sm.u.attn[cs.warp][gh][D] = m[gh], sm.u.attn[cs.warp][gh][D + 1] = l[gh];
    }
    __syncthreads();
    if (threadIdx.x < GP * D) {  // one (q head, dim) a thread, over the warps
        const int gh = threadIdx.x / D, d = threadIdx.x % D;
        float mo = -INFINITY, lo = 0.f, oo = 0.f;
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) mo = fmaxf(mo, sm.u.attn[wi][gh][D]);
#pragma unroll
        for (int wi = 0; wi < WARPS; ++wi) {
            const float mw = sm.u.attn[wi][gh][D];
            const float f = mw == -INFINITY ? 0.f : __expf(mw - mo);
            lo += sm.u.attn[wi][gh][D + 1] * f, oo += sm.u.attn[wi][gh][d] * f;
        }
        float* mine = a.part + (((size_t)h * MAX_SPLITS + s) * GP + gh) * PART;
        mine[d] = oo;
        if (d == 0) mine[D] = mo, mine[D + 1] = lo;
    }
}

// The o phase's input: packed row r (8 values of one q head) of the attention output, from the splits'
// partials, rounded to the activation dtype as the attention kernel of the chain writes it.
template <bool F16>
__device__ uint4 attention_row(const StepArgs& a, int r, int splits) {
    const int head = 8 * r / D, d0 = 8 * r % D, kvh = head / GP, gh = head % GP;
    const float* base = a.part + ((size_t)kvh * MAX_SPLITS * GP + gh) * PART;
    constexpr size_t SPLIT = (size_t)GP * PART;
    float mx = -INFINITY;
    for (int si = 0; si < splits; ++si) mx = fmaxf(mx, __ldcg(base + si * SPLIT + D));
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, lt = 0.f;
    for (int si = 0; si < splits; ++si) {
        const float* ps = base + si * SPLIT;
        const float ms = __ldcg(ps + D);
        const float f = ms == -INFINITY ? 0.f : __expf(ms - mx);
        lt += __ldcg(ps + D + 1) * f;
        const float4 lo = __ldcg(reinterpret_cast<const float4*>(ps + d0));
        const float4 hi = __ldcg(reinterpret_cast<const float4*>(ps + d0 + 4));
        acc[0] += lo.x * f, acc[1] += lo.y * f, acc[2] += lo.z * f, acc[3] += lo.w * f;
        acc[4] += hi.x * f, acc[5] += hi.y * f, acc[6] += hi.z * f, acc[7] += hi.w * f;
    }
    uint32_t w[4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
        w[j] = (uint32_t)from_f32<F16>(acc[2 * j] / lt) | ((uint32_t)from_f32<F16>(acc[2 * j + 1] / lt) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int G, bool F16>
__global__ void __launch_bounds__(THREADS, 1) int4_step_kernel(const StepArgs a) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
    Consumer cs;
    cs.lane = threadIdx.x & 31, cs.warp = threadIdx.x >> 5, cs.g = cs.lane >> 2, cs.t = cs.lane & 3;
    cs.used = 0;
    const long long pos = *a.pos, slot = *a.slot, ctx = *a.ctx;
    Producer prod;
    prod.p = 0;
    prod.settle(a, cs.lane);
    for (int i = 0; i < STAGES; ++i) prod.issue<G>(a, sm.ring[cs.warp][i], sm.sc[cs.warp][i], cs.warp, cs.lane);
    if (threadIdx.x < D) {  // read before the first barrier that the epilogues need them behind
        sm.rope[0][threadIdx.x] = to_f32<F16>(a.cos[pos * D + threadIdx.x]);
        sm.rope[1][threadIdx.x] = to_f32<F16>(a.sin[pos * D + threadIdx.x]);
    }
    __syncthreads();
    int parity = 0;
    unsigned int barriers = 0;
    for (int p = 0; p < a.num_phases; ++p) {
        const Phase& ph = a.phases[p];
        const int kind = (int)ph.kind;
        if (p > 0 && !grid_barrier(a, ++barriers * gridDim.x, &sm.ok)) return;
        if (a.trace && threadIdx.x == 0) a.trace[((size_t)blockIdx.x * a.num_phases + p) * 2] = now_ns();
        if (kind == K_ATTN) {
            attention<F16>(sm, cs, a, ph, ctx);
        } else if ((int)blockIdx.x < tiles_of(kind, (int)ph.n)) {
            const int ntiles = tiles_of(kind, (int)ph.n);
            build_operands<F16>(sm, cs, a, reinterpret_cast<const uint16_t*>(ph.x),
                                reinterpret_cast<const uint16_t*>(ph.norm), (int)ph.k, G, a.eps,
                                kind == K_O ? num_splits(ctx, a.kv_heads) : 0);
            for (int tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
                if (mt_of(kind) == 4) {
                    gemv_tile<4, G, F16>(sm, cs, prod, a, ph, kind, tile, parity, slot);
                } else {
                    gemv_tile<1, G, F16>(sm, cs, prod, a, ph, kind, tile, parity, slot);
                }
                parity ^= 1;
            }
        }
        if (a.trace) {
            __syncthreads();
            if (threadIdx.x == 0) a.trace[((size_t)blockIdx.x * a.num_phases + p) * 2 + 1] = now_ns();
        }
    }
    // The last program out puts the barrier back to zero for the next launch or replay.
    __syncthreads();
    if (threadIdx.x == 0 && atomicAdd(&a.bar[1], 1u) == gridDim.x - 1) {
        a.bar[0] = 0;
        a.bar[1] = 0;
    }
}

template <int G, bool F16>
int launch_step(const StepArgs& a, cudaStream_t stream) {
    auto kernel = int4_step_kernel<G, F16>;
    const int smem = (int)sizeof(Smem);
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return (int)e;
    int per_sm = 0, sms = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, THREADS, smem);
    if (e != cudaSuccess) return (int)e;
    if (per_sm < 1) return -5;  // the grid barrier needs every program resident: one an SM
    kernel<<<sms, THREADS, smem, stream>>>(a);
    return (int)cudaGetLastError();
}

}  // namespace

// Returns 0, a CUDA error code, -3 (group), -5 (a program does not fit an SM), -6 (shape).
extern "C" int if_int4_step(const void* phases, int num_phases, const void* pos, const void* slot,
                            const void* ctx, const void* table, const void* cos, const void* sin, void* part,
                            void* bar, void* error, void* trace, int heads, int kv_heads, int head_dim,
                            int block_size, long long stride_slot, int group, int fma_mode, int f16, float eps,
                            float scale, void* stream) {
    if (head_dim != D || heads != GP * kv_heads) return -6;
    const StepArgs a{static_cast<const Phase*>(phases), num_phases, static_cast<const long long*>(pos),
                     static_cast<const long long*>(slot), static_cast<const long long*>(ctx),
                     static_cast<const long long*>(table), static_cast<const uint16_t*>(cos),
                     static_cast<const uint16_t*>(sin), static_cast<float*>(part),
                     static_cast<unsigned int*>(bar),
                     static_cast<int*>(error), static_cast<long long*>(trace), heads, kv_heads, block_size,
                     fma_mode, stride_slot, eps, scale};
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    if (group == 64) return f16 ? launch_step<64, true>(a, st) : launch_step<64, false>(a, st);
    if (group == 128) return f16 ? launch_step<128, true>(a, st) : launch_step<128, false>(a, st);
    return -3;
}

// Shared memory a program takes, for the host's checks and the docs.
extern "C" int if_int4_step_smem() { return (int)sizeof(Smem); }
