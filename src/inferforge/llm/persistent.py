"""A persistent batch-1 decode kernel: the GEMV part of L decoder layers in ONE launch, phases joined by grid
barriers (an experiment measured against the per-kernel chain of `gemv.gemv` calls; not in the engine;
design and checks in docs/persistent.md).

The chain pays a fixed cost per GEMV (first loads, the PDL wait, the tail wave), ~65 times a token. Here one
program per SM (or more where the compiled kernel provably fits) lives for the whole step and walks each
layer's phases: QKV `t = W_qkv @ rmsnorm(x; g1)`; O `x += W_o @ t[:H]` (t[:H] stands in for attention);
GU `u = silu(W_g @ n) * (W_u @ n)`, `n = rmsnorm(x; g2)`; DOWN `x += W_down @ u`, rounded as `gemv` rounds.
One tile shape for every phase (`BN` rows x H columns; the down product's K in F / H chunks), so the
prefetched tile is one loop-carried register tensor: the next tile is loaded before this tile's math, and
the NEXT phase's first tile (weights never depend on the previous phase) between this program's arrive and
its wait, in flight across the barrier. The barrier is a monotonically increasing int32 counter (release add,
acquire spin); the last program to finish resets it, so every launch and graph replay starts from zero.
Under `TRITON_INTERPRET=1` programs run one after another: use `nprog=1`, or `split=True` (one launch per
phase, no barrier) to run several programs on the CPU. Weights are stacked [L, N, K] tensors, one per
matrix kind: a layer is a constant offset, no pointer-table load before the first weight load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.errors import InferforgeError
from inferforge.llm import gemv
from inferforge.llm.gemv import _store, _weights_f32

QKV, OPROJ, GU, DOWN = 0, 1, 2, 3  # the phases of a layer


@triton.jit
def _arrive(CTR):
    """Count this program in: its threads' stores issued (`debug_barrier`), then one release add (in sm_90
    SASS a MEMBAR.ALL.GPU and a REDG from one thread; the fence also waits for that thread's loads in
    flight, so a prefetch must be issued after it, not before)."""
    tl.debug_barrier()
    tl.atomic_add(CTR, 1, sem="release", scope="gpu")


@triton.jit
def _wait(CTR, target):
    """Spin until `target` programs arrived. Triton turns an acquire add of 0 into an acquire load
    (LDG.STRONG.GPU + CCTL.IVALL, which drops this SM's L1) by one thread, broadcast through shared memory."""
    seen = tl.atomic_add(CTR, 0, sem="acquire", scope="gpu")
    while seen < target:
        seen = tl.atomic_add(CTR, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _tile_args(KIND: tl.constexpr, lyr, rb, c, Ws, H: tl.constexpr, NQ: tl.constexpr, F: tl.constexpr,
               BN: tl.constexpr):  # fmt: skip
    """Where row block `rb`, K chunk `c` of layer `lyr`'s `KIND` matrix lies: (its first row's weights at the
    chunk, its first row's scale, row stride, gap between the two row halves). For GU the halves are BN / 2
    gate rows j and the up rows j + F, so one program owns matching pairs; otherwise BN consecutive rows."""
    HALF: tl.constexpr = BN // 2
    N: tl.constexpr = NQ * (KIND == 0) + H * (KIND == 1) + 2 * F * (KIND == 2) + H * (KIND == 3)
    K: tl.constexpr = H + (F - H) * (KIND == 3)
    W = Ws[2 * KIND]  # Ws: (W_qkv, its scales, W_o, ..., W_down, its scales)
    S = Ws[2 * KIND + 1]
    if KIND == 2:
        row0 = rb * HALF
        gap = F
    else:
        row0 = rb * BN
        gap = HALF
    lo = tl.cast(lyr, tl.int64)
    return W + lo * (N * K) + tl.cast(row0, tl.int64) * K + c * H, S + lo * N + row0, K, gap


@triton.jit
def _load_tile(Wt, St, stride, gap, valid, H: tl.constexpr, BN: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Weights [BN, H] and their scales (predicated off, no memory traffic, when not `valid`)."""
    HALF: tl.constexpr = BN // 2
    i = tl.arange(0, BN)
    rows = (i // HALF) * gap + i % HALF
    w = tl.load(Wt + rows[:, None].to(tl.int64) * stride + tl.arange(0, H)[None, :], mask=valid, other=0.0)
    if HAS_SCALE:
        s = tl.load(St + rows, mask=valid, other=0.0).to(tl.float32)
    else:
        s = tl.full([BN], 1.0, tl.float32)
    return w, s


@triton.jit
def _norm(SRC, g, eps, H: tl.constexpr):
    """rmsnorm(x) * g rounded as `gemv`'s NORM prologue; x read through L2 (other SMs wrote it)."""
    act_ty = SRC.dtype.element_ty
    xf = tl.load(SRC + tl.arange(0, H), cache_modifier=".cg").to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    return ((xf * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)


@triton.jit
def _epilogue(KIND: tl.constexpr, acc, res, rb, X, T, U, F: tl.constexpr, BN: tl.constexpr):
    """Store a finished row block: t (QKV), SiLU(gate) x up (GU, `gemv._store`'s rounding), or x + the
    residual `res` (O, DOWN; loaded one row block ahead, so no load waits here)."""
    act_ty = X.dtype.element_ty
    rows = rb * BN + tl.arange(0, BN)
    if KIND == 0:
        tl.store(T + rows, acc.to(T.dtype.element_ty))
    elif KIND == 2:
        _store(acc, X, X, U, rows, rows >= 0, rb * (BN // 2), 2 * F, 3, BN // 2)
    else:
        tl.store(X + rows, (acc.to(act_ty).to(tl.float32) + res).to(act_ty))


@triton.jit
def _residual(R, rb, valid, KIND: tl.constexpr, BN: tl.constexpr):
    """Row block `rb` of the residual x (O and DOWN only), through L2."""
    if KIND == 1 or KIND == 3:
        rows = rb * BN + tl.arange(0, BN)
        return tl.load(R + rows, mask=valid, other=0.0, cache_modifier=".cg").to(tl.float32)
    else:
        return tl.zeros([BN], tl.float32)


@triton.jit
def _phase(KIND: tl.constexpr, NEXT: tl.constexpr, lyr, lyr_next, has_next, target, w, s, Acts, Ws, eps,
           H: tl.constexpr, NQ: tl.constexpr, F: tl.constexpr, BN: tl.constexpr, W_MODE: tl.constexpr,
           HAS_SCALE: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """One phase for this program: wait for its input, then its tiles, the next tile's weights always in
    flight; then arrive, and return the next phase's first tile, issued before that phase's wait.
    PREFETCH (the experiment's switch): 0 the next phase's first tile after the arrive (default); 1 before
    the arrive (its fence then waits for it); 2 none (each phase loads its first tile after its wait)."""
    X_IN, X, T, U, G1, G2, CTR = Acts
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    N: tl.constexpr = NQ * (KIND == 0) + H * (KIND == 1) + 2 * F * (KIND == 2) + H * (KIND == 3)
    K: tl.constexpr = H + (F - H) * (KIND == 3)
    KCH: tl.constexpr = K // H
    n_items = (N // BN - pid + nprog - 1) // nprog * KCH  # >= KCH: the grid is at most N // BN programs
    offs_h = tl.arange(0, H)
    first_layer = lyr == 0
    if KIND == 0:  # the norm weight: no phase writes it, so before the wait
        g = tl.load(G1 + lyr * H + offs_h).to(tl.float32)
    elif KIND == 2:
        g = tl.load(G2 + lyr * H + offs_h).to(tl.float32)
    if target > 0:
        _wait(CTR, target)
    if PREFETCH == 2:
        wt, st, k, gap = _tile_args(KIND, lyr, pid, 0, Ws, H, NQ, F, BN)
        w, s = _load_tile(wt, st, k, gap, True, H, BN, HAS_SCALE)
    if KIND == 0:  # the input: what earlier phases wrote, read through L2
        if first_layer:  # noqa: SIM108 (Triton: a runtime branch)
            xin = _norm(X_IN, g, eps, H)
        else:
            xin = _norm(X, g, eps, H)
    elif KIND == 1:
        xin = tl.load(T + offs_h, cache_modifier=".cg").to(tl.float32)
    elif KIND == 2:
        xin = _norm(X, g, eps, H)
    else:
        xin = tl.load(U + offs_h, cache_modifier=".cg").to(tl.float32)
    R = X
    if KIND == 1:  # noqa: SIM102 (Triton: a constexpr branch around a runtime one)
        if first_layer:
            R = X_IN
    res = _residual(R, pid, True, KIND, BN)
    acc = tl.zeros([BN], tl.float32)
    for idx in range(0, n_items):
        nxt = idx + 1
        in_phase = nxt < n_items
        wt, st, k, gap = _tile_args(KIND, lyr, pid + (nxt // KCH) * nprog, nxt % KCH, Ws, H, NQ, F, BN)
        w_n, s_n = _load_tile(wt, st, k, gap, in_phase, H, BN, HAS_SCALE)  # the next tile, issued first
        if KCH > 1:  # the down product's next u chunk (this phase's input, so ready)
            u_n = tl.load(U + (nxt % KCH) * H + offs_h, mask=in_phase, other=0.0, cache_modifier=".cg")
        res_n = _residual(R, pid + (nxt // KCH) * nprog, in_phase, KIND, BN)
        c = idx % KCH
        part = tl.sum(_weights_f32(w, W_MODE) * xin[None, :], 1)
        acc = tl.where(c == 0, part, acc + part)
        if c == KCH - 1:
            _epilogue(KIND, acc * s, res, pid + (idx // KCH) * nprog, X, T, U, F, BN)
        if KCH > 1:
            xin = u_n.to(tl.float32)
        w, s, res = w_n, s_n, res_n
    # The next phase's first tile never depends on this phase: in flight across the barrier.
    wt, st, k, gap = _tile_args(NEXT, lyr_next, pid, 0, Ws, H, NQ, F, BN)
    if PREFETCH == 1:
        w, s = _load_tile(wt, st, k, gap, has_next, H, BN, HAS_SCALE)
    if has_next:
        _arrive(CTR)
    if PREFETCH == 0:
        w, s = _load_tile(wt, st, k, gap, has_next, H, BN, HAS_SCALE)
    return w, s


@triton.jit(do_not_specialize=["L", "ONLY_L"])
def _persistent_kernel(X_IN, X, T, U, G1, G2, WQ, SQ, WO, SO, WG, SG, WD, SD, CTR, L, ONLY_L, eps,
                       H: tl.constexpr, NQ: tl.constexpr, F: tl.constexpr, BN: tl.constexpr,
                       W_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, ONLY: tl.constexpr,
                       BARRIERS_ONLY: tl.constexpr, PREFETCH: tl.constexpr):  # fmt: skip
    """L layers (CTR: [arrivals, finished] int32, zero at launch and left zero). ONLY >= 0: phase ONLY of
    layer ONLY_L alone, no barrier (split mode). BARRIERS_ONLY: the 4 L - 1 barriers and nothing else."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    Acts = (X_IN, X, T, U, G1, G2, CTR)
    Ws = (WQ, SQ, WO, SO, WG, SG, WD, SD)
    if BARRIERS_ONLY:
        for b in range(1, 4 * L):
            _arrive(CTR)
            _wait(CTR, b * nprog)
    elif ONLY >= 0:
        wt, st, k, g = _tile_args(ONLY, ONLY_L, pid, 0, Ws, H, NQ, F, BN)
        w, s = _load_tile(wt, st, k, g, True, H, BN, HAS_SCALE)
        _phase(ONLY, ONLY, ONLY_L, ONLY_L, False, 0, w, s, Acts, Ws, eps, H, NQ, F, BN, W_MODE, HAS_SCALE,
               PREFETCH)  # fmt: skip
    else:
        wt, st, k, g = _tile_args(0, ONLY_L * 0, pid, 0, Ws, H, NQ, F, BN)
        w, s = _load_tile(wt, st, k, g, True, H, BN, HAS_SCALE)
        for lyr in range(0, L):
            gp = 4 * lyr
            w, s = _phase(0, 1, lyr, lyr, True, gp * nprog, w, s, Acts, Ws, eps, H, NQ, F, BN, W_MODE,
                          HAS_SCALE, PREFETCH)  # fmt: skip
            w, s = _phase(1, 2, lyr, lyr, True, (gp + 1) * nprog, w, s, Acts, Ws, eps, H, NQ, F, BN, W_MODE,
                          HAS_SCALE, PREFETCH)  # fmt: skip
            w, s = _phase(2, 3, lyr, lyr, True, (gp + 2) * nprog, w, s, Acts, Ws, eps, H, NQ, F, BN, W_MODE,
                          HAS_SCALE, PREFETCH)  # fmt: skip
            w, s = _phase(3, 0, lyr, lyr + 1, lyr + 1 < L, (gp + 3) * nprog, w, s, Acts, Ws, eps, H, NQ, F,
                          BN, W_MODE, HAS_SCALE, PREFETCH)  # fmt: skip
    # Graph-safe: the last program to finish (all have left their last spin) sets both counters back to 0.
    tl.debug_barrier()
    ticket = tl.atomic_add(CTR + 1, 1, sem="acq_rel", scope="gpu")
    if ticket == nprog - 1:
        tl.atomic_xchg(CTR, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(CTR + 1, 0, sem="relaxed", scope="gpu")


class PersistentError(InferforgeError, ValueError):
    """A layer stack or launch configuration the persistent kernel cannot run."""


@dataclass(frozen=True)
class PersistentConfig:
    """How the persistent kernel is launched."""

    block_n: int = 8
    """Rows per tile; a tile is block_n x hidden weights (8 x 2048 bf16 = 32 KB in flight per program)."""
    num_warps: int = 8
    """Warps per program."""
    programs_per_sm: int = 1
    """Programs per SM; above 1 only where the compiled kernel's registers and shared memory let them all be
    resident (checked), since a grid barrier deadlocks otherwise."""
    nprog: int | None = None
    """The exact grid (1 under the interpreter); None: SMs x programs_per_sm, at most hidden / block_n."""
    split: bool = False
    """One launch per phase instead of grid barriers (the control; the CPU tests' multi-program mode)."""
    prefetch: int = 0
    """The next phase's first tile: 0 after this program's arrive, before the wait; 1 before the arrive;
    2 not at all (loaded after the wait). An experiment's switch: 0 is the design."""

    def __post_init__(self) -> None:
        if self.block_n < 2 or self.block_n & (self.block_n - 1):
            raise PersistentError(f"block_n must be a power of 2 >= 2, got {self.block_n}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise PersistentError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.programs_per_sm < 1:
            raise PersistentError(f"programs_per_sm must be >= 1, got {self.programs_per_sm}")
        if self.prefetch not in (0, 1, 2):
            raise PersistentError(f"prefetch must be 0, 1 or 2, got {self.prefetch}")
        if self.nprog is not None and self.nprog < 1:
            raise PersistentError(f"nprog must be >= 1 or None, got {self.nprog}")


@dataclass
class LayerStack:
    """Each matrix kind's weights for all layers, stacked [L, N, K]; int8 weights carry per-row scales [L, N]
    (fp32 or bf16), float weights none. GU holds the gate rows, then the up rows."""

    qkv: torch.Tensor  # [L, NQ, H]
    o: torch.Tensor  # [L, H, H]
    gu: torch.Tensor  # [L, 2F, H]
    down: torch.Tensor  # [L, H, F]
    norm1: torch.Tensor  # [L, H]
    norm2: torch.Tensor  # [L, H]
    scales: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        L, nq, h = self.qkv.shape
        f = self.down.shape[-1]
        want = {"qkv": (L, nq, h), "o": (L, h, h), "gu": (L, 2 * f, h), "down": (L, h, f),
                "norm1": (L, h), "norm2": (L, h)}  # fmt: skip
        for name, shape in want.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or not t.is_contiguous():
                raise PersistentError(f"{name} must be a contiguous {shape} tensor, got {tuple(t.shape)}")
        mats = (self.qkv, self.o, self.gu, self.down)
        if len({m.dtype for m in mats}) != 1:
            raise PersistentError(f"all weights must share one dtype, got {[m.dtype for m in mats]}")
        if h & (h - 1) or f % h or nq < h:
            raise PersistentError(
                f"hidden must be a power of 2, ffn its multiple, qkv >= hidden: {h} {f} {nq}"
            )
        if (self.qkv.dtype == torch.int8) != (self.scales is not None):
            raise PersistentError("int8 weights need per-row scales (and float weights none): see quantize()")
        if self.scales is not None:
            for m, sc in zip(mats, self.scales, strict=True):
                if tuple(sc.shape) != tuple(m.shape[:2]) or not sc.is_contiguous():
                    raise PersistentError(
                        f"scales: contiguous {tuple(m.shape[:2])} wanted, got {tuple(sc.shape)}"
                    )

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(layers, hidden, qkv rows, ffn)."""
        L, nq, h = self.qkv.shape
        return L, h, nq, self.down.shape[-1]

    def weight_bytes(self) -> int:
        mats = (self.qkv, self.o, self.gu, self.down) + (self.scales or ())
        return sum(m.numel() * m.element_size() for m in mats)

    def layer(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Layer i's [qkv, o, gu, down, norm1, norm2] and its four scales (Nones for float weights)."""
        sc: list[torch.Tensor | None] = [s[i] for s in self.scales] if self.scales is not None else [None] * 4
        return [self.qkv[i], self.o[i], self.gu[i], self.down[i], self.norm1[i], self.norm2[i]], sc


def quantize(stack: LayerStack) -> LayerStack:
    """Symmetric per-row int8 of a float stack (fp32 scales): the layout `gemv` reads with `scale=`."""

    def q(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = w.float().abs().amax(-1).clamp_min(1e-8) / 127
        return (w.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale.contiguous()

    (wq, sq), (wo, so), (wg, sg), (wd, sd) = (q(m) for m in (stack.qkv, stack.o, stack.gu, stack.down))
    return LayerStack(wq, wo, wg, wd, stack.norm1, stack.norm2, scales=(sq, so, sg, sd), eps=stack.eps)


def chain(x: torch.Tensor, stack: LayerStack) -> torch.Tensor:
    """The peer: the same layers as 4 `gemv.gemv` calls each (norm prologue, residual and SiLU-pair
    epilogues), x [1, H]."""
    L, h, _, _ = stack.dims
    for i in range(L):
        (wq, wo, wg, wd, g1, g2), (sq, so, sg, sd) = stack.layer(i)
        t = gemv.gemv(x, wq, norm_weight=g1, eps=stack.eps, scale=sq)
        x = gemv.gemv(t[:, :h], wo, scale=so, residual=x)
        u = gemv.gemv(x, wg, norm_weight=g2, eps=stack.eps, scale=sg, silu_pair=True)
        x = gemv.gemv(u, wd, scale=sd, residual=x)
    return x


def reference(x: torch.Tensor, stack: LayerStack) -> torch.Tensor:
    """The same chain in eager torch (`gemv_check.gemv_reference`, the unfused model's rounding)."""
    from inferforge.llm.gemv_check import gemv_reference as ref

    L, h, _, _ = stack.dims
    for i in range(L):
        (wq, wo, wg, wd, g1, g2), (sq, so, sg, sd) = stack.layer(i)
        t = ref(x, wq, norm_weight=g1, eps=stack.eps, scale=sq)
        x = ref(t[:, :h], wo, scale=so, residual=x)
        u = ref(x, wg, norm_weight=g2, eps=stack.eps, scale=sg, silu_pair=True)
        x = ref(u, wd, scale=sd, residual=x)
    return x


def resident_per_sm(kernel, num_warps: int, device: torch.device) -> int:
    """Programs of a compiled kernel one SM holds at once (registers, shared memory, threads): what a grid of
    more than one program per SM must not exceed. Registers are allocated per warp in units of 256."""
    props = torch.cuda.get_device_properties(device)
    kernel._init_handles()
    regs_warp = -(-kernel.n_regs * 32 // 256) * 256
    by_regs = getattr(props, "regs_per_multiprocessor", 65536) // (regs_warp * num_warps)
    smem = kernel.metadata.shared + 1024  # the runtime reserves 1 KB per block
    by_smem = props.shared_memory_per_multiprocessor // smem
    by_threads = props.max_threads_per_multi_processor // (32 * num_warps)
    return int(min(by_regs, by_smem, by_threads, 32))


class PersistentDecoder:
    """The kernel over one stack with its own buffers (t, u, the two counters), so a CUDA graph can capture
    `__call__`: x_in [1, H] is only read, the result is written into `out` (allocated here if None)."""

    def __init__(self, stack: LayerStack, config: PersistentConfig | None = None) -> None:
        self.stack, self.config = stack, config or PersistentConfig()
        _, h, nq, f = stack.dims
        bn = self.config.block_n
        if h % bn or nq % bn or bn > h:
            raise PersistentError(f"block_n {bn} must divide hidden {h} and the qkv rows {nq}")
        dev = stack.qkv.device
        most = h // bn  # the smallest phase's row blocks: every program owns a tile of every phase
        if self.config.nprog is not None:
            self.nprog = self.config.nprog
        elif dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            self.nprog = min(sms * self.config.programs_per_sm, most)
        else:
            self.nprog = 1
        if self.nprog > most:
            raise PersistentError(f"nprog {self.nprog} exceeds hidden / block_n = {most}: lower one of them")
        act = stack.norm1.dtype
        self.counters = torch.zeros(2, dtype=torch.int32, device=dev)
        self.t = torch.empty(nq, dtype=act, device=dev)
        self.u = torch.empty(f, dtype=act, device=dev)
        self.w_mode = gemv._int8_mode(self.t) if stack.qkv.dtype == torch.int8 else 0
        self.resident: int | None = None
        if dev.type == "cuda" and not self.config.split:
            self.resident = self._check_residency()

    def _args(self, x_in: torch.Tensor, out: torch.Tensor, only: int, only_l: int, barriers_only: bool):
        s, cfg = self.stack, self.config
        L, h, nq, f = s.dims
        sc = s.scales or (out,) * 4
        args = (x_in, out, self.t, self.u, s.norm1, s.norm2, s.qkv, sc[0], s.o, sc[1], s.gu, sc[2], s.down,
                sc[3], self.counters, L, only_l, s.eps)  # fmt: skip
        kw = dict(H=h, NQ=nq, F=f, BN=cfg.block_n, W_MODE=self.w_mode, HAS_SCALE=s.scales is not None,
                  ONLY=only, BARRIERS_ONLY=barriers_only, PREFETCH=cfg.prefetch, num_warps=cfg.num_warps,
                  num_stages=1)  # fmt: skip
        return args, kw

    def _check_residency(self) -> int:
        """Compile without launching; refuse a grid the SMs cannot hold all at once (it would deadlock)."""
        dev = self.stack.qkv.device
        x = torch.empty(1, self.stack.dims[1], dtype=self.stack.norm1.dtype, device=dev)
        args, kw = self._args(x, x, -1, 0, False)
        compiled = _persistent_kernel.warmup(*args, grid=(self.nprog,), **kw)
        compiled = compiled.result() if hasattr(compiled, "result") else compiled  # async compile mode
        per_sm = resident_per_sm(compiled, self.config.num_warps, dev)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        if self.nprog > per_sm * sms:
            raise PersistentError(
                f"{self.nprog} programs cannot all be resident ({per_sm} per SM x {sms} SMs; registers "
                f"{compiled.n_regs}, shared {compiled.metadata.shared} B): lower programs_per_sm or block_n"
            )
        return per_sm

    def __call__(self, x_in: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        h = self.stack.dims[1]
        if tuple(x_in.shape) != (1, h) or x_in.dtype != self.stack.norm1.dtype:
            raise PersistentError(f"x_in must be [1, {h}] {self.stack.norm1.dtype}, got {tuple(x_in.shape)}")
        out = torch.empty_like(x_in) if out is None else out
        if self.config.split:
            for i in range(self.stack.dims[0]):
                for kind in (QKV, OPROJ, GU, DOWN):
                    args, kw = self._args(x_in, out, kind, i, False)
                    _persistent_kernel[(self.nprog,)](*args, **kw)
        else:
            args, kw = self._args(x_in, out, -1, 0, False)
            _persistent_kernel[(self.nprog,)](*args, **kw)
        return out

    def barriers_only(self, layers: int | None = None) -> None:
        """The 4 L - 1 grid barriers of `layers` (default the stack's) with no work: their cost alone."""
        x = torch.empty(1, self.stack.dims[1], dtype=self.stack.norm1.dtype, device=self.stack.qkv.device)
        args, kw = self._args(x, x, -1, 0, True)
        args = (*args[:15], layers or self.stack.dims[0], *args[16:])
        _persistent_kernel[(self.nprog,)](*args, **kw)
