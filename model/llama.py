"""Llama-family decoder (Llama 3, Qwen2, Qwen3, Mistral, SmolLM2) in plain PyTorch, single device.

Attention over cached KV is delegated to an ``AttentionBackend`` so that prefill (dense, writes
chunks) and LSA decode (resident chunks only) share one model. Parameter names follow Hugging Face.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from flashmemory.model.config import ModelConfig
from flashmemory.model.rope import RotaryEmbedding, apply_rotary


class AttentionBackend(Protocol):
    """Attends the new tokens' queries to the cache they belong to, after storing their K/V."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (N, Hq, D), k/v: (N, Hkv, D) post-RoPE for the N new tokens -> (N, Hq, D)."""
        ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one Triton kernel instead of ~7 launches (same math)
            from flashmemory.kernels.fused import rms_norm

            return rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # one fused kernel; same math as below in fp32
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def fuse(self) -> None:
        """Replace q/k/v projections by one matmul (after weights are loaded)."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        w = torch.cat([p.weight for p in projs])
        self.qkv_proj = nn.Linear(w.shape[1], w.shape[0], bias=projs[0].bias is not None,
                                  device=w.device, dtype=w.dtype)
        self.qkv_proj.weight = nn.Parameter(w, requires_grad=False)
        if projs[0].bias is not None:
            self.qkv_proj.bias = nn.Parameter(torch.cat([p.bias for p in projs]),
                                              requires_grad=False)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        n = x.shape[0]
        hq, hkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([hq, hkv, hkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(n, self.num_heads, self.head_dim)  # (N, Hq, D)
        k = k.view(n, self.num_kv_heads, self.head_dim)  # (N, Hkv, D)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if q.is_cuda:  # one Triton kernel per tensor instead of five
            from flashmemory.kernels.fused import rotary

            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        else:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = backend.attend(self.layer, q, k, v)  # (N, Hq, D)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def fuse(self) -> None:
        """Replace gate/up projections by one matmul (after weights are loaded)."""
        if self.gate_proj.bias is not None:
            return
        w = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_up_proj = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device,
                                      dtype=w.dtype)
        self.gate_up_proj.weight = nn.Parameter(w, requires_grad=False)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # no temporaries
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x.add_(self.mlp(self.post_attention_layernorm(x)))  # x is this layer's own


class Backbone(nn.Module):
    """Holds ``embed_tokens``, ``layers`` and ``norm`` (HF's ``model.*`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim)


class CausalLM(nn.Module):
    """The decoder with its LM head; ``forward`` runs N tokens (any mix of requests)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        """input_ids, positions: (N,) int64 -> final hidden states (N, hidden) after the norm."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, backend)
        return self.model.norm(x)

    def fuse(self) -> CausalLM:
        """Fuse q/k/v and gate/up matmuls for speed (inference only; call after loading)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (M, hidden) -> fp32 logits (M, vocab)."""
        return self.lm_head(hidden).float()
