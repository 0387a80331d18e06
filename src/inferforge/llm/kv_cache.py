"""The paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence.

Paging means memory is reserved 16 tokens at a time as a sequence grows, so many sequences of unknown length
share one preallocated pool without fragmentation; finishing or aborting a sequence returns its blocks at
once. Block 0 is never handed out: padded rows of a captured decode graph write their junk there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferforge.errors import InferforgeError
from inferforge.llm.model import DecoderLM
from inferforge.llm.sampler import to_device

BLOCK_SIZE = 16


class CacheFullError(InferforgeError):
    """The KV cache cannot hold a request even when empty; the message names the limit to raise."""


@dataclass(frozen=True)
class CacheSpec:
    """How many blocks to allocate and their shape."""

    num_blocks: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int = BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.num_blocks < 2:
            raise CacheFullError(
                f"the KV cache would hold {self.num_blocks} blocks; "
                "raise kv_cache_tokens or the memory fraction"
            )

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


def plan_cache(
    model: DecoderLM, dtype: torch.dtype, *, tokens: int | None, memory_fraction: float, device: torch.device
) -> CacheSpec:
    """Size from a token count when given (CPU, tests) or else from free device memory times the fraction."""
    cfg = model.cfg
    probe = CacheSpec(2, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)
    if tokens is not None:
        blocks = -(-tokens // BLOCK_SIZE) + 1
    elif device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        blocks = int(free * memory_fraction) // probe.bytes_per_block
    else:
        raise CacheFullError("on CPU give kv_cache_tokens (how many tokens the KV cache holds)")
    return CacheSpec(blocks, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype)


def attach_cache(model: DecoderLM, spec: CacheSpec, device: torch.device) -> None:
    """Allocate the pool and hang each layer's slice on its attention module (buffers, so graphs read in
    place)."""
    shape = (spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    for layer in model.blocks():
        layer.attn.k_cache = torch.zeros(shape, dtype=spec.dtype, device=device)
        layer.attn.v_cache = torch.zeros(shape, dtype=spec.dtype, device=device)


class BlockAllocator:
    """A free list of block ids; block 0 is reserved as the scratch block."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(
                f"asked for {n} KV blocks with {len(self._free)} free; the scheduler must check"
            )
        out = [self._free.pop() for _ in range(n)]
        return out

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
        blocks.clear()


def blocks_needed(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-num_tokens // block_size)


def copy_blocks(model: DecoderLM, src: list[int], dst: list[int]) -> None:
    """Copy whole blocks in every layer (forking a sequence for `n` > 1 after its prompt is cached)."""
    device = model.blocks()[0].attn.k_cache.device
    s, d = to_device(src, device, torch.long), to_device(dst, device, torch.long)
    for layer in model.blocks():
        layer.attn.k_cache[d] = layer.attn.k_cache[s]
        layer.attn.v_cache[d] = layer.attn.v_cache[s]
