"""The paged KV cache: fixed-size blocks handed out from a free list, one block table per sequence.

Paging means memory is reserved 16 tokens at a time as a sequence grows, so many sequences of unknown length
share one preallocated pool without fragmentation; finishing or aborting a sequence returns its blocks at
once. Block 0 is never handed out: padded rows of a captured decode graph write their junk there.

Prefix caching (on by default, `EngineConfig.enable_prefix_caching`): a full block of prompt tokens is
registered under a key that digests every token up to its end (`prompt_block_keys`), so a later prompt that
starts with the same tokens takes the block instead of computing it again. Blocks of generated tokens join
the same chain as they fill (`next_block_key`), so the next turn of a chat, whose prompt repeats the last
answer, and a preempted request coming back read them too. Blocks count references; a freed
block that holds a registered prefix stays cached, least recently freed first to be reused, until a new
allocation needs it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
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
    """A free list of block ids with reference counts; block 0 is reserved as the scratch block. Blocks
    registered as prompt prefixes (`register`) stay matchable (`match`, `acquire`) after their last user
    frees them, until `allocate` needs them (least recently freed first)."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs: dict[int, int] = {}
        self._block_of: dict[bytes, int] = {}  # prefix key -> block holding it
        self._key_of: dict[int, bytes] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks that hold a prefix

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_free

    def can_allocate(self, n: int, reuse: list[int] | None = None) -> bool:
        """Whether `n` new blocks fit after taking `reuse` (matched prefix blocks) out of the pool."""
        taken = sum(1 for b in reuse or () if b in self._cached)
        return n <= self.num_free - taken

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks with {self.num_free} free; the scheduler must check")
        out = [self._free.pop() if self._free else self._evict() for _ in range(n)]
        for b in out:
            self._refs[b] = 1
        return out

    def free(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            left = self._refs.pop(b) - 1
            if left:
                self._refs[b] = left
            elif b in self._key_of:
                self._cached[b] = None
            else:
                self._free.append(b)
        blocks.clear()

    def match(self, keys: list[bytes]) -> list[int]:
        """The blocks holding the longest registered prefix of `keys` (nothing is taken)."""
        out = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            out.append(b)
        return out

    def acquire(self, blocks: list[int]) -> None:
        """Take matched prefix blocks for one more user."""
        for b in blocks:
            if b in self._cached:
                del self._cached[b]
                self._refs[b] = 1
            else:
                self._refs[b] += 1

    def register(self, block: int, key: bytes) -> None:
        """`block` now holds the prefix `key` (a block already registered under it keeps it)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key

    def _evict(self) -> int:
        b, _ = self._cached.popitem(last=False)
        del self._block_of[self._key_of.pop(b)]
        return b


def prompt_block_keys(
    prompt_ids: tuple[int, ...], block_size: int = BLOCK_SIZE, salt: str | None = None
) -> list[bytes]:
    """One key per full block of the prompt: a digest of every token up to the block's end (chained), so
    equal keys mean equal prefixes; a cryptographic digest, so no prompt can be crafted to collide with
    another user's and read its cache. A salt starts the chain, so salted prompts share blocks only with
    prompts of the same salt. Tokens as little-endian int32 bytes, made in one numpy call (0.26 ms for 4,096
    tokens on the CPU box, 0.87 converting token by token)."""
    raw = np.asarray(prompt_ids, dtype="<i4").tobytes()
    prev = chain_seed(salt)
    keys, step = [], 4 * block_size
    for end in range(step, step * (len(prompt_ids) // block_size) + 1, step):
        prev = hashlib.blake2b(prev + raw[end - step : end], digest_size=16).digest()
        keys.append(prev)
    return keys


def chain_seed(salt: str | None) -> bytes:
    """What the chain of block keys starts from: nothing, or a digest of the salt."""
    if salt is None:
        return b""
    return hashlib.blake2b(salt.encode(), digest_size=16, person=b"cache_salt").digest()


def next_block_key(prev: bytes, tokens: list[int]) -> bytes:
    """The key of the block holding `tokens` after the block keyed `prev` (`prompt_block_keys`' chain, one
    block at a time: generated blocks join the chain as they complete)."""
    return hashlib.blake2b(prev + np.asarray(tokens, dtype="<i4").tobytes(), digest_size=16).digest()


def slot_of(blocks: list[int], pos: int) -> int:
    """The flat cache slot of position `pos` of a sequence whose blocks are `blocks`."""
    return blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE


def blocks_needed(num_tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-num_tokens // block_size)


def copy_blocks(model: DecoderLM, src: list[int], dst: list[int]) -> None:
    """Copy whole blocks in every layer (forking a sequence for `n` > 1 after its prompt is cached)."""
    device = model.blocks()[0].attn.k_cache.device
    s, d = to_device(src, device, torch.long), to_device(dst, device, torch.long)
    for layer in model.blocks():
        layer.attn.k_cache[d] = layer.attn.k_cache[s]
        layer.attn.v_cache[d] = layer.attn.v_cache[s]
