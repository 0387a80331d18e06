"""The persistent decode-layer kernel (`llm/persistent.py`) against the eager chain of the same layers.

On the CPU through Triton's interpreter (programs run one after another, so one program with barriers, or
several with one launch per phase); fp32 activations, since the interpreter rounds fp32 -> bf16 wrongly.
CI's CPU environment has no Triton, so there these tests skip. The multi-program barrier test needs CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import persistent as P

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _stack(seed: int, weights: torch.dtype = torch.float32, act: torch.dtype = torch.float32, layers: int = 2,
           h: int = 64, nq: int = 96, f: int = 128) -> P.LayerStack:  # fmt: skip
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, std: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(DEVICE)

    mats = [rnd(layers, n, k).to(weights) for n, k in ((nq, h), (h, h), (2 * f, h), (h, f))]
    norms = [(1 + rnd(layers, h)).to(act) for _ in range(2)]
    return P.LayerStack(*mats, *norms, eps=1e-5)


def _run(stack: P.LayerStack, x: torch.Tensor, **cfg: int | bool) -> tuple[torch.Tensor, P.PersistentDecoder]:
    """One launch with every buffer it writes poisoned first (NaN survives any unwritten element)."""
    dec = P.PersistentDecoder(stack, P.PersistentConfig(**cfg))  # type: ignore[arg-type]
    dec.t.fill_(float("nan"))
    dec.u.fill_(float("nan"))
    out = torch.full_like(x, float("nan"))
    return dec(x, out), dec


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("block_n", [2, 8])
def test_one_program_with_barriers_matches_the_chain_in_fp32(block_n: int, prefetch: int) -> None:
    """Two layers, every phase, the cross-phase prefetch in each placement; the counters end at zero."""
    stack = _stack(block_n * 10 + prefetch)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(prefetch)).to(DEVICE)
    got, dec = _run(stack, x, block_n=block_n, nprog=1, prefetch=prefetch)
    torch.testing.assert_close(got, P.reference(x, stack), rtol=1e-4, atol=1e-4)
    assert dec.counters.tolist() == [0, 0]


def test_int8_weights_with_row_scales() -> None:
    stack = _stack(7)
    q = P.quantize(stack)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got, _ = _run(q, x, block_n=4, nprog=1)
    torch.testing.assert_close(got, P.reference(x, q), rtol=1e-4, atol=1e-4)
    want = P.reference(x, stack)  # int8 rounding only, against the float weights
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_bf16_weights() -> None:
    stack = _stack(8, weights=torch.bfloat16)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got, _ = _run(stack, x, block_n=8, nprog=1)
    torch.testing.assert_close(got, P.reference(x, stack), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nprog", [3, 5, 8])
def test_several_programs_share_each_phase_one_launch_a_phase(nprog: int) -> None:
    """Split mode: ragged tile counts per program (12 QKV, 8 O, 32 GU, 8 x 2 DOWN tiles), the up rows
    paired with their gate rows, the down product's K in two chunks."""
    stack = _stack(20 + nprog)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(nprog)).to(DEVICE)
    got, _ = _run(stack, x, block_n=8, nprog=nprog, split=True)
    torch.testing.assert_close(got, P.reference(x, stack), rtol=1e-4, atol=1e-4)


def test_relaunch_reads_only_x_in_and_gives_the_same_result() -> None:
    """What a CUDA-graph replay relies on: the counters reset, x_in unchanged, the result identical."""
    stack = _stack(30)
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x0 = x.clone()
    dec = P.PersistentDecoder(stack, P.PersistentConfig(block_n=8, nprog=1))
    first = dec(x).clone()
    second = dec(x)
    assert torch.equal(x, x0) and torch.equal(first, second)
    assert dec.counters.tolist() == [0, 0]


def test_refuses_what_it_cannot_run() -> None:
    stack = _stack(40)
    with pytest.raises(P.PersistentError, match="nprog"):
        P.PersistentDecoder(stack, P.PersistentConfig(block_n=8, nprog=9))  # 64 / 8 row blocks in O
    with pytest.raises(P.PersistentError, match="block_n"):
        P.PersistentConfig(block_n=6)
    with pytest.raises(P.PersistentError, match="scales"):
        P.LayerStack(*(m.to(torch.int8) for m in (stack.qkv, stack.o, stack.gu, stack.down)), stack.norm1,
                     stack.norm2)  # fmt: skip
    with pytest.raises(P.PersistentError, match="x_in"):
        P.PersistentDecoder(stack, P.PersistentConfig(nprog=1))(torch.zeros(1, 32, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_all_sms_with_grid_barriers_match_the_gemv_chain(weights: str) -> None:
    """One program per SM, barriers between phases, bf16 activations: equal to the chain of `gemv.gemv`
    within bf16 rounding, and bit-identical from one launch to the next (a race would move it)."""
    stack = _stack(50, weights=torch.bfloat16, act=torch.bfloat16, layers=4, h=512, nq=768, f=1024)
    stack = P.quantize(stack) if weights == "int8" else stack
    x = torch.randn(1, 512, device=DEVICE, dtype=torch.bfloat16)
    dec = P.PersistentDecoder(stack, P.PersistentConfig(block_n=4, num_warps=4))
    assert dec.nprog > 1 and dec.resident is not None
    got = dec(x).clone()
    want = P.chain(x, stack)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 2e-2
    for _ in range(3):
        assert torch.equal(dec(x), got)
    assert dec.counters.tolist() == [0, 0]
