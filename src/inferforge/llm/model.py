"""The decoder in plain torch: Llama, Mistral, Qwen2 (bias on q/k/v) and GPT-2, reading a paged KV cache.

A step is a flat batch of tokens (no padding): `forward(ids, positions, meta)` returns their final hidden
states and `logits(hidden)` projects only the rows that need a next token. q/k/v and gate/up are fused into
one GEMM each so a batch-1 decode launches fewer, larger kernels. The KV cache lives on each attention module
as buffers, so a captured CUDA graph reads it in place.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from inferforge.llm.attention import AttnMeta, decode_attention_torch, prefill_attention, write_cache
from inferforge.llm.config import ModelConfig


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
    return nn.RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)


class Attention(nn.Module):
    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        self.qkv: nn.Module = nn.Linear(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.qkv_bias)
        self.o: nn.Module = nn.Linear(q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.head_dim**-0.5
        self.rope = cfg.positions == "rope"
        self.register_buffer("k_cache", torch.empty(0), persistent=False)
        self.register_buffer("v_cache", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        t = x.shape[0]
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x)
        qk = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d)
        v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
        if self.rope:
            # q and k rotated together; swapping the halves by one flip and a sign-folded sin table gives
            # transformers' `q * cos + rotate_half(q) * sin` exactly, in 4 kernels instead of 10.
            swapped = qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
            qk = qk * cos.unsqueeze(1) + swapped * sin.unsqueeze(1)
        q, k = qk[:, :heads], qk[:, heads:]
        write_cache(self.k_cache, self.v_cache, k, v, meta.slot_mapping)
        return self.o(self._attend(q, k, v, meta).reshape(t, -1))

    def decode(self, q: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """Decode attention of q [B, heads, d] over the cache (this step's keys and values already in it)."""
        assert meta.block_tables is not None and meta.context_lens is not None
        fn = meta.decode_fn or decode_attention_torch
        return fn(q, self.k_cache, self.v_cache, meta.block_tables, meta.context_lens, self.scale)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, meta: AttnMeta
    ) -> torch.Tensor:
        """Attention over the cache, the new keys and values already written into it."""
        if meta.varlen is not None:
            return meta.varlen.attend(q, self.k_cache, self.v_cache, self.scale)
        if meta.prefill is not None:
            assert k is not None
            o = prefill_attention(
                q, k, v, self.k_cache, self.v_cache, meta.prefill, self.scale, meta.fresh_groups
            )
            if meta.num_decode:  # a mixed step: its first rows decode
                o[: meta.num_decode] = self.decode(q[: meta.num_decode], meta)
            return o
        return self.decode(q, meta)

    def forward_fused(self, x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      meta: AttnMeta, ops: ModuleType) -> torch.Tensor:  # fmt: skip
        """As `forward`, with RoPE and both cache writes in one kernel (`fused.rope_write_cache`); cos/sin
        are the whole tables, indexed by `positions` inside the kernel."""
        t = x.shape[0]
        q, k, v = ops.rope_write_cache(
            self.qkv(x), cos, sin, positions, meta.slot_mapping, self.k_cache, self.v_cache,
            self.num_heads, self.num_kv_heads, self.rope, meta.prefill is not None,
        )  # fmt: skip
        return self.o(self._attend(q, k, v, meta).reshape(t, -1))


# Prompt tokens per pass of the fused MLP in a long prefill step (0: all at once). In chunks, gate/up's output
# (8,192 tokens x 16,384 bf16 = 268 MB for the 1B shape) can stay in the 50 MB L2 for SiLU x up and the down
# product instead of a round trip through memory; the products get fewer rows each. Measured within noise on
# the H100 (G3 of 2026-11-23, docs/llm-runs.md), so off.
MLP_CHUNK = {"tokens": 0}


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gated = cfg.mlp == "gated_silu"
        width = 2 * cfg.intermediate_size if self.gated else cfg.intermediate_size
        self.up: nn.Module = nn.Linear(
            cfg.hidden_size, width, bias=cfg.mlp_bias
        )  # gate and up fused when gated
        self.down: nn.Module = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(F.silu(gate) * up)
        return self.down(F.gelu(h, approximate="tanh"))

    def forward_fused(self, x: torch.Tensor, ops: ModuleType) -> torch.Tensor:
        n, down = MLP_CHUNK["tokens"], self.down
        if not n or x.shape[0] <= n or type(down) is not nn.Linear or down.bias is not None:
            return down(ops.silu_mul(self.up(x)))
        out = x.new_empty(x.shape[0], down.out_features)
        for s in range(0, x.shape[0], n):
            torch.mm(ops.silu_mul(self.up(x[s : s + n])), down.weight.t(), out=out[s : s + n])
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = _norm(cfg), Attention(cfg), _norm(cfg), MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, meta)
        return x + self.mlp(self.norm2(x))


class DecoderLM(nn.Module):
    """Build it on the `meta` device, then `weights.load_weights` assigns the checkpoint's tensors."""

    def __init__(self, cfg: ModelConfig, max_model_len: int) -> None:
        super().__init__()
        self.cfg, self.max_model_len = cfg, max_model_len
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos_embed = (
            nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.positions == "learned" else None
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = _norm(cfg)
        self.lm_head: nn.Module = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.compiled_block: Callable[..., torch.Tensor] | None = None
        self.fused_ops: ModuleType | None = None  # `inferforge.llm.fused` once verified on the device
        self.gemv_ops: ModuleType | None = None  # `inferforge.llm.gemv` once verified (batch-1 decode)
        self.fp32_logits_mm = False

    def can_fuse(self) -> bool:
        """The fused kernels cover RMSNorm, gated-SiLU models with RoPE (Llama, Mistral, Qwen2) whose head
        size is a power of two; GPT-2 (LayerNorm, GELU, learned positions) stays on eager kernels."""
        d = self.cfg.head_dim
        return (
            self.cfg.norm != "layer" and self.cfg.mlp == "gated_silu" and self.cfg.positions == "rope"
            and d >= 16 and d & (d - 1) == 0
        )  # fmt: skip

    def blocks(self) -> list[Block]:
        """The layers, typed (nn.ModuleList items are plain Modules to a type checker)."""
        return [layer for layer in self.layers if isinstance(layer, Block)]

    def init_rope(self, device: torch.device, dtype: torch.dtype) -> None:
        """cos/sin tables for every position, computed in fp32 like transformers, stored in the model
        dtype."""
        if self.cfg.positions != "rope":
            self.rope_cos = torch.zeros(1, device=device, dtype=dtype)
            self.rope_sin = torch.zeros(1, device=device, dtype=dtype)
            return
        inv = torch.tensor(self.cfg.rope_inv_freq(self.max_model_len), dtype=torch.float32)
        freqs = torch.outer(torch.arange(self.max_model_len, dtype=torch.float32), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.cfg.rope_attention_factor()  # YaRN's temperature; 1 otherwise
        self.rope_cos = (emb.cos() * scale).to(device=device, dtype=dtype)
        sin = emb.sin() * scale
        half = sin.shape[-1] // 2
        signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)  # folds rotate_half's minus sign in
        self.rope_sin = signed.to(device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        x = self.embed(input_ids)
        if self.fused_ops is not None:
            return self._forward_fused(x, positions, meta, self.fused_ops)
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
            cos = sin = self.rope_cos
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        decoding = meta.prefill is None and meta.varlen is None
        block = self.compiled_block if decoding and self.compiled_block is not None else None
        for layer in self.layers:
            x = layer(x, cos, sin, meta) if block is None else block(layer, x, cos, sin, meta)
        return self.norm(x)

    def _forward_fused(
        self, x: torch.Tensor, positions: torch.Tensor, meta: AttnMeta, ops: ModuleType
    ) -> torch.Tensor:
        """The residual stream through fused kernels: each RMSNorm also adds the previous sub-layer's output
        into the residual (vLLM's pattern), so a layer is 4 matrix products and 5 small kernels."""
        eps = self.cfg.norm_eps
        residual: torch.Tensor | None = None
        for layer in self.blocks():
            h, residual = ops.add_rmsnorm(x, residual, layer.norm1.weight, eps)
            a = layer.attn.forward_fused(h, positions, self.rope_cos, self.rope_sin, meta, ops)
            h, residual = ops.add_rmsnorm(a, residual, layer.norm2.weight, eps)
            x = layer.mlp.forward_fused(h, ops)
        return ops.add_rmsnorm(x, residual, self.norm.weight, eps)[0]

    def compile_decode(self) -> None:
        """Fuse the small element-wise kernels of a decode step (norms, RoPE, SiLU, residual adds) with
        Inductor.

        One compiled `Block.forward`, shared by every layer and dynamic in the batch size, so it compiles
        once; the captured CUDA graphs then replay the fused kernels. Prefill stays eager (its shapes vary per
        step).
        """
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.compiled_block = torch.compile(Block.forward, dynamic=True)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.fp32_logits_mm and type(self.lm_head) is nn.Linear:  # cuBLAS writes fp32 itself
            return torch.mm(hidden, self.lm_head.weight.t(), out_dtype=torch.float32)  # type: ignore[call-overload]
        return self.lm_head(hidden).float()

    def enable_fp32_logits_mm(self) -> bool:
        """Use `torch.mm(..., out_dtype=float32)` for the LM head where it exists (CUDA) and agrees with the
        bf16 product; returns whether it is on."""
        head = self.lm_head
        if type(head) is not nn.Linear or head.bias is not None or head.weight.device.type != "cuda":
            return False
        x = torch.randn(3, head.weight.shape[1], device=head.weight.device, dtype=head.weight.dtype)
        try:
            got = torch.mm(x, head.weight.t(), out_dtype=torch.float32)  # type: ignore[call-overload]
        except (RuntimeError, TypeError):
            return False
        want = head(x).float()
        self.fp32_logits_mm = bool(((got - want).abs().max() <= 1e-2 * want.abs().max()).item())
        return self.fp32_logits_mm

    def decode_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """fp32 logits of a decode step; one sequence runs through `gemv`: norms, residual adds, RoPE with
        the cache writes and SiLU x up all inside the products, so a layer is 5 kernels (9 unfused)."""
        gv = self.gemv_ops
        if gv is None or input_ids.shape[0] != 1 or meta.prefill is not None:
            return self.logits(self(input_ids, positions, meta))
        eps = self.cfg.norm_eps
        x = self.embed(input_ids)  # the residual stream; each product's epilogue adds into it
        blocks = self.blocks()
        for i, layer in enumerate(blocks):
            attn, mlp = layer.attn, layer.mlp
            rc = gv.RopeCache(self.rope_cos, self.rope_sin, positions, meta.slot_mapping, attn.k_cache,
                              attn.v_cache, attn.num_heads, attn.num_kv_heads)  # fmt: skip
            nxt = blocks[i + 1].attn.qkv if i + 1 < len(blocks) else self.lm_head
            pf = gv.prefetch_plan({"o": attn.o, "gate_up": mlp.up, "down": mlp.down, "next_qkv": nxt})
            n1, n2 = layer.norm1.weight, layer.norm2.weight
            q = gv.linear(x, attn.qkv, norm_weight=n1, eps=eps, rope_cache=rc, prefetch=pf["qkv"])
            x = gv.linear(attn.decode(q, meta).reshape(1, -1), attn.o, residual=x, prefetch=pf["o"])
            h = gv.linear(x, mlp.up, norm_weight=n2, eps=eps, silu_pair=True, prefetch=pf["gate_up"])
            x = gv.linear(h, mlp.down, residual=x, prefetch=pf["down"])
        return gv.linear(x, self.lm_head, norm_weight=self.norm.weight, eps=eps, out_dtype=torch.float32)

    def gemv_ready(self) -> bool:
        """Every product of the decode step can run through `gemv` (float layers, or gemlite's int8 / fp8
        ones), in a model the fused kernels cover (RMSNorm, gated SiLU, RoPE)."""
        from inferforge.llm import decode_gemv

        layers = [self.lm_head]
        layers += [m for b in self.blocks() for m in (b.attn.qkv, b.attn.o, b.mlp.up, b.mlp.down)]
        return self.can_fuse() and all(decode_gemv.can_run(m) for m in layers)
