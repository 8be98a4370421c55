"""A Llama-family decoder (Llama 2/3, SmolLM2, Qwen2) as a plain `nn.Module`.

RMSNorm, rotary embeddings (HF rotate-half layout, with Llama-3 frequency scaling when
the config has it), grouped-query attention, SwiGLU MLP, tied or untied embeddings and
an optional static KV cache (fixed `max_seq_len`, dynamic number of new tokens), the
layout ExecuTorch's LLM export also uses.

Module and parameter names follow Hugging Face's `LlamaForCausalLM`
(`model.layers.3.self_attn.q_proj.weight`), so HF checkpoints load by name and LoRA
module names are PEFT's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelConfig", "RMSNorm", "KVCache", "Attention", "MLP", "Block", "LlamaModel", "CausalLM"]


@dataclass
class ModelConfig:
    """Architecture of a Llama-family decoder (names as in HF `LlamaConfig` in comments)."""

    vocab_size: int  # vocab_size
    dim: int  # hidden_size
    n_layers: int  # num_hidden_layers
    n_heads: int  # num_attention_heads
    n_kv_heads: int  # num_key_value_heads
    hidden_dim: int  # intermediate_size
    norm_eps: float = 1e-5  # rms_norm_eps
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", "factor", ...}
    max_seq_len: int = 2048  # max_position_embeddings
    tie_embeddings: bool = True
    head_dim: int | None = None  # defaults to dim // n_heads
    attention_bias: bool = False  # Qwen2: bias on q, k, v
    arch: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )

    @property
    def hd(self) -> int:
        assert self.head_dim is not None
        return self.head_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**d)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama-3 scaling if `cfg.rope_scaling` asks."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "llama3":
        factor = float(rs["factor"])
        low = float(rs.get("low_freq_factor", 1.0))
        high = float(rs.get("high_freq_factor", 4.0))
        old_ctx = float(rs.get("original_max_position_embeddings", 8192))
        low_wavelen = old_ctx / low
        high_wavelen = old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = torch.where(is_medium, smoothed, scaled)
    elif kind not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: llama3")
    return inv.float()


def rope_tables(cfg: ModelConfig, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (seq_len, head_dim), HF rotate-half layout."""
    inv = rope_inv_freq(cfg)
    t = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv)  # (S, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, hd)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, hd); cos, sin: (T, hd)."""
    return x * cos + rotate_half(x) * sin


class KVCache(nn.Module):
    """Static KV cache: buffers (B, n_kv_heads, max_seq_len, head_dim), written at `input_pos`."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hd) at positions `input_pos` (T,); return the full caches."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.hd
        qkv_bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.hd, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.hd, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.hd, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.hd, cfg.dim, bias=False)
        self.kv_cache: KVCache | None = None
        # an export pass may hand the cache and the attention to one module (ExecuTorch's
        # fused ops): sdpa(q, k, v, input_pos) -> (B, T, H*hd); None in eager training
        self.sdpa: nn.Module | None = None
        # with a cache, fold each KV head's query heads into its rows instead of repeating
        # K and V (set by the ONNX export, whose cache grows each step; a static cache of
        # dynamic length does not trace through the fold)
        self.fold_gqa = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x).view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # q: (B, H, T, hd); k, v: (B, KV, T, hd)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if self.sdpa is not None:
            if input_pos is None:
                raise ValueError("an attention with a fused cache needs input_pos")
            return self.o_proj(self.sdpa(q, k, v, input_pos))
        mask: torch.Tensor | None = None
        if self.kv_cache is not None:
            if input_pos is None:
                raise ValueError("a model with a KV cache needs input_pos")
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, KV, S_max, hd)
            key_pos = torch.arange(k.shape[2], device=x.device)
            mask = key_pos.unsqueeze(0) <= input_pos.unsqueeze(1)  # (T, S_max)
        rep = self.n_heads // self.n_kv_heads
        if rep > 1 and mask is not None and self.fold_gqa:
            # (B, KV, rep*T, hd) queries against (B, KV, S, hd) attend as the repeated
            # heads do, without copying the cache rep times per step
            q = q.reshape(bsz, self.n_kv_heads, rep * seqlen, self.head_dim)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(rep, 1))
            y = y.reshape(bsz, self.n_heads, seqlen, self.head_dim)
        elif rep > 1 and mask is None:
            # no cache: the flash kernel reads the KV heads as they are, so neither the
            # forward nor the saved-for-backward tensors hold rep copies of k and v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            if rep > 1:
                b, kvh, s, hd = k.shape
                k = k[:, :, None].expand(b, kvh, rep, s, hd).reshape(b, kvh * rep, s, hd)
                v = v[:, :, None].expand(b, kvh, rep, s, hd).reshape(b, kvh * rep, s, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        # (B, H, T, hd) -> (B, T, H*hd)
        return self.o_proj(y.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
            act = _SwiGLU.apply(g, u)
            assert isinstance(act, torch.Tensor)
        else:
            act = F.silu(g) * u
        return self.down_proj(act)


class _SwiGLU(torch.autograd.Function):
    """silu(g) * u keeping only g and u for the backward (autograd would also keep
    silu(g): a third (B, T, hidden) tensor per block); sigmoid(g) is recomputed."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(g, u)
        return F.silu(g).mul_(u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        # d silu(g) / dg = sig * (1 + g * (1 - sig))
        dg = grad * u * sig * (1 + g * (1 - sig)) if ctx.needs_input_grad[0] else None
        du = grad * (g * sig) if ctx.needs_input_grad[1] else None
        return dg, du


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class CausalLM(nn.Module):
    """Decoder with an LM head. `frozen_prefix` bottom blocks run without an autograd graph.

    LoRA sets `frozen_prefix = n_layers - depth`: nothing below the lowest LoRA block
    needs a gradient, so its activations are not kept and its backward never runs.
    """

    rope_cos: torch.Tensor  # (S, head_dim)
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.frozen_prefix = 0
        self._rope_len = 0
        self._ensure_rope(min(cfg.max_seq_len, 4096))

    def _ensure_rope(self, length: int) -> None:
        if length <= self._rope_len:
            return
        cos, sin = rope_tables(self.config, length)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._rope_len = length

    def blocks(self) -> list[Block]:
        """The decoder blocks, typed."""
        return [b for b in self.model.layers if isinstance(b, Block)]

    # --- KV cache -------------------------------------------------------------
    def setup_cache(self, batch: int, max_seq_len: int, dtype: torch.dtype = torch.float32) -> None:
        """Give every attention a static KV cache of `max_seq_len` positions."""
        self._ensure_rope(max_seq_len)
        for layer in self.blocks():
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype)

    def clear_cache(self) -> None:
        for layer in self.blocks():
            layer.self_attn.kv_cache = None
            layer.self_attn.sdpa = None

    # --- forward --------------------------------------------------------------
    def hidden_states(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None,
                      *, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, dim) for tokens (B, T).

        `prefix` (B, T, dim), when given, is `prefix_states(tokens)` computed before (the
        output of the frozen prefix blocks); the blocks above it run from there.
        """
        cos, sin = self._rope(tokens.shape[1], input_pos)
        layers = self.blocks()
        split = self.frozen_prefix if torch.is_grad_enabled() else 0
        if prefix is not None:
            if split == 0:
                raise ValueError("prefix states need a frozen prefix (LoRA above block 0) "
                                 "and grad mode")
            h = prefix
        elif split > 0:
            h = self._prefix(tokens, cos, sin, input_pos)
        else:
            h = self.model.embed_tokens(tokens)  # (B, T, dim)
        for layer in layers[split:]:
            h = layer(h, cos, sin, input_pos)
        return self.model.norm(h)

    def prefix_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Output (B, T, dim) of the embedding and the `frozen_prefix` blocks (no graph)."""
        cos, sin = self._rope(tokens.shape[1], None)
        return self._prefix(tokens, cos, sin, None)

    @torch.no_grad()
    def _prefix(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                input_pos: torch.Tensor | None) -> torch.Tensor:
        h = self.model.embed_tokens(tokens)  # (B, T, dim)
        for layer in self.blocks()[:self.frozen_prefix]:
            h = layer(h, cos, sin, input_pos)
        return h

    def _rope(self, seqlen: int, input_pos: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_pos is None:
            self._ensure_rope(seqlen)
            return self.rope_cos[:seqlen], self.rope_sin[:seqlen]
        return self.rope_cos[input_pos], self.rope_sin[input_pos]  # (T, hd)

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T); with a KV cache, `input_pos` (T,) is required."""
        return self.lm_head(self.hidden_states(tokens, input_pos))

    def num_parameters(self) -> int:
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total
