"""DeepSeek-V4 causal LM (single request, single device): embeddings, hyper-connected blocks of
attention + MoE, stream merge, final norm and LM head.

Built by ``model.deepseek_v4.loader.load_deepseek_v4``. A request's state is an explicit
``DSV4Cache`` (``new_cache``); ``forward`` runs a prefill piece of T tokens or one decode token,
appending to that cache, and returns the final hidden states; ``logits`` applies the head.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from flashmemory.model.deepseek_v4.attention import Attention, IndexerTrace, StepInputs
from flashmemory.model.deepseek_v4.cache import DSV4Cache, LayerCache
from flashmemory.model.deepseek_v4.config import CSA, DeepseekV4Config
from flashmemory.model.deepseek_v4.hyper import HyperConnection, HyperHead
from flashmemory.model.deepseek_v4.layers import RMSNorm, Rotary
from flashmemory.model.deepseek_v4.moe import MoE

# Parameters upstream keeps in fp32 whatever the compute dtype: norms, mHC, sinks, gate biases.
_FP32_PARAMS = re.compile(r"(norm\.weight|_hc\.\w+|hc_head\.\w+|\.sink|\.ape|gate\.bias)$")


class Block(nn.Module):
    """One decoder layer: mHC-wrapped attention, then mHC-wrapped MoE."""

    def __init__(self, cfg: DeepseekV4Config, layer: int) -> None:
        super().__init__()
        hc = (cfg.hidden_size, cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn_hc = HyperConnection(*hc)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ffn_hc = HyperConnection(*hc)
        self.ffn = MoE(cfg, layer)

    def forward(self, streams: torch.Tensor, step: StepInputs, cache: LayerCache) -> torch.Tensor:
        """streams (T, N, hidden) -> (T, N, hidden)."""
        pre, post, comb = self.attn_hc.mixings(streams)
        x = self.attn_norm(HyperConnection.collapse(streams, pre))
        streams = HyperConnection.expand(streams, self.attn(x, step, cache), post, comb)
        pre, post, comb = self.ffn_hc.mixings(streams)
        x = self.ffn_norm(HyperConnection.collapse(streams, pre))
        return HyperConnection.expand(streams, self.ffn(x, step.input_ids), post, comb)


class DeepseekV4ForCausalLM(nn.Module):
    def __init__(self, cfg: DeepseekV4Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.hc_head = HyperHead(cfg.hidden_size, cfg.hc_mult, cfg.hc_eps, cfg.rms_norm_eps)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.build_rotary()

    def build_rotary(self) -> None:
        """(Re)create the RoPE tables: fp32 whatever the weights' dtype, on the embedding's device
        (the loader calls this again once a model built on ``meta`` holds its weights)."""
        cfg = self.config
        with torch.device(self.embed.weight.device):
            self.rope_main = Rotary(cfg.main_rope, cfg.qk_rope_head_dim)
            self.rope_compress = Rotary(cfg.compress_rope, cfg.qk_rope_head_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def cast(self, dtype: torch.dtype) -> DeepseekV4ForCausalLM:
        """Cast weights to ``dtype``, keeping norms, mHC, sinks, ape and gate biases in fp32."""
        for name, p in self.named_parameters():
            p.data = p.data.float() if _FP32_PARAMS.search(name) else p.data.to(dtype)
        for name, b in self.named_buffers():
            if b.is_floating_point() and not name.startswith("rope_"):
                b.data = b.data.float()  # gate.bias: score correction stays fp32
        return self

    def new_cache(self) -> DSV4Cache:
        """An empty KV state for one request, in the model's dtype and device."""
        return DSV4Cache.empty(self.config, self.dtype, self.embed.weight.device)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: DSV4Cache,
                resident: Mapping[int, torch.Tensor] | None = None,
                trace: IndexerTrace | None = None) -> torch.Tensor:
        """Run T new tokens of one request and append them to ``cache``.

        input_ids, positions: (T,) int64; positions must continue the cache
        (cache.length, ..., cache.length + T - 1). resident: optional per-CSA-layer residency of
        the entries the cache held before this call, as a bool mask (n,) or a list/tensor of
        entry indices; non-resident entries are never picked by the indexer. trace: records the
        indexers' picks. Returns the final hidden states (T, hidden) in the model's dtype.
        """
        t = input_ids.shape[0]
        expected = torch.arange(cache.length, cache.length + t, device=positions.device)
        if positions.shape != (t,) or not torch.equal(positions, expected):
            raise ValueError(f"positions must be {cache.length}..{cache.length + t - 1} "
                             "(consecutive, continuing the cache)")
        step = self._step_inputs(input_ids, positions, cache, resident, trace)
        streams = self.embed(input_ids)[:, None, :].expand(-1, self.config.hc_mult, -1)
        for block, layer_cache in zip(self.layers, cache.layers, strict=True):
            streams = block(streams, step, layer_cache)
        cache.length += t
        return self.norm(self.hc_head(streams))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, hidden) -> logits (T, vocab) fp32."""
        return self.head(hidden).float()

    def _step_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: DSV4Cache,
                     resident: Mapping[int, torch.Tensor] | None,
                     trace: IndexerTrace | None) -> StepInputs:
        dtype = self.dtype
        rope = {"main": self.rope_main(positions, dtype),
                "compress": self.rope_compress(positions, dtype)}
        masks = {}
        for layer, given in (resident or {}).items():
            if self.config.layer_types[layer] != CSA:
                raise ValueError(f"resident entries given for layer {layer}, which is not a "
                                 "compressed_sparse_attention layer")
            masks[layer] = _residency(given, cache.num_entries(layer))
        return StepInputs(input_ids, positions, rope, self.rope_compress, masks, trace)


def _residency(given: torch.Tensor | list[int], num_entries: int) -> torch.Tensor:
    """A bool mask (num_entries,) from a bool mask or a list of entry indices."""
    given_t = torch.as_tensor(given)
    if given_t.dtype == torch.bool:
        if given_t.shape != (num_entries,):
            raise ValueError(f"resident mask has shape {tuple(given_t.shape)}; the layer holds "
                             f"{num_entries} entries")
        return given_t
    mask = torch.zeros(num_entries, dtype=torch.bool)
    idx = given_t.long().flatten()
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_entries):
        raise ValueError(f"resident entry indices must lie in [0, {num_entries})")
    mask[idx] = True
    return mask
