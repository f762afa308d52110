"""DeepSeek-V4 backbone configuration: one frozen dataclass, built from a HF ``config.json`` dict.

Used by ``model.deepseek_v4.loader`` and every module of the backbone. ``from_hf_dict`` accepts
both the upstream DeepSeek layout (``compress_ratios``, ``num_hash_layers``, flat ``rope_scaling``)
and the layout transformers writes (``layer_types``, ``mlp_layer_types``, nested
``rope_parameters``), folding them the same way ``transformers.DeepseekV4Config`` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from flashmemory.model.config import RopeConfig

LayerType = Literal["sliding_attention", "compressed_sparse_attention",
                    "heavily_compressed_attention"]
MlpType = Literal["hash_moe", "moe"]
ScoringFunc = Literal["sqrtsoftplus", "sigmoid"]

SLIDING: LayerType = "sliding_attention"
CSA: LayerType = "compressed_sparse_attention"
HCA: LayerType = "heavily_compressed_attention"
LAYER_TYPES: tuple[str, ...] = (SLIDING, CSA, HCA)
MLP_TYPES: tuple[str, ...] = ("hash_moe", "moe")
SCORING_FUNCS: tuple[str, ...] = ("sqrtsoftplus", "sigmoid")
# Upstream configs name each layer by its compression ratio.
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}
_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
             "q_lora_rank", "o_groups", "o_lora_rank", "qk_rope_head_dim", "sliding_window",
             "csa_compress_rate", "hca_compress_rate", "index_n_heads", "index_head_dim",
             "index_topk", "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
             "hc_mult", "hc_sinkhorn_iters")


@dataclass(frozen=True)
class DeepseekV4Config:
    """Shapes and choices of one DeepSeek-V4 backbone (field names follow transformers')."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    qk_rope_head_dim: int  # RoPE acts on the last qk_rope_head_dim channels of every head
    sliding_window: int
    layer_types: tuple[LayerType, ...]
    mlp_layer_types: tuple[MlpType, ...]
    csa_compress_rate: int = 4
    hca_compress_rate: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    n_shared_experts: int = 1
    scoring_func: ScoringFunc = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    main_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=10000.0))
    compress_rope: RopeConfig = field(default_factory=lambda: RopeConfig(theta=160000.0))
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in _POSITIVE:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self._check_schedules()
        self._check_shapes()

    def _check_schedules(self) -> None:
        for name, allowed in (("layer_types", LAYER_TYPES), ("mlp_layer_types", MLP_TYPES)):
            values = getattr(self, name)
            if len(values) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(values)} entries; num_hidden_layers is "
                                 f"{self.num_hidden_layers}")
            bad = sorted({v for v in values if v not in allowed})
            if bad:
                raise ValueError(f"{name} entries {bad} not allowed; allowed: {', '.join(allowed)}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"scoring_func {self.scoring_func!r} not supported; allowed: "
                             f"{', '.join(SCORING_FUNCS)}")

    def _check_shapes(self) -> None:
        rd = self.qk_rope_head_dim
        if rd % 2 or rd > self.head_dim:
            raise ValueError(f"qk_rope_head_dim ({rd}) must be even and <= head_dim "
                             f"({self.head_dim})")
        if CSA in self.layer_types and rd > self.index_head_dim:
            raise ValueError(f"qk_rope_head_dim ({rd}) must be <= index_head_dim "
                             f"({self.index_head_dim}): indexer keys carry the same RoPE")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ValueError(f"o_groups ({self.o_groups}) must divide num_attention_heads * "
                             f"head_dim ({self.num_attention_heads * self.head_dim})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                             f"n_routed_experts ({self.n_routed_experts})")
        if self.n_shared_experts != 1:
            raise ValueError(f"n_shared_experts must be 1 (the reference builds exactly one "
                             f"shared expert), got {self.n_shared_experts}")

    def rope_for(self, layer: int) -> RopeConfig:
        """Sliding-only layers use the main RoPE; CSA/HCA layers the (YaRN) compress RoPE."""
        return self.main_rope if self.layer_types[layer] == SLIDING else self.compress_rope

    def compress_rate(self, layer: int) -> int:
        """Tokens per compressed entry for this layer (0 for sliding-only layers)."""
        kind = self.layer_types[layer]
        return {SLIDING: 0, CSA: self.csa_compress_rate, HCA: self.hca_compress_rate}[kind]

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> DeepseekV4Config:
        """Fold a HF / upstream ``config.json`` dict into this config (unknown keys ignored)."""
        _check_fixed_choices(hf)
        n = int(hf.get("num_hidden_layers", 43))
        head_dim = int(hf.get("head_dim", 512))
        rope_dim = _rope_dim(hf, head_dim)
        _check_nested_rope_dims(hf, head_dim, rope_dim)
        main, compress = _ropes(hf)
        rates = dict(hf.get("compress_rates") or {})
        eos = hf.get("eos_token_id", 1)
        kw: dict[str, Any] = {
            "num_hidden_layers": n,
            "head_dim": head_dim,
            "qk_rope_head_dim": rope_dim,
            "layer_types": _layer_types(hf, n),
            "mlp_layer_types": _mlp_types(hf, n),
            "csa_compress_rate": int(hf.get("compress_rate_csa", rates.get(CSA, 4))),
            "hca_compress_rate": int(hf.get("compress_rate_hca", rates.get(HCA, 128))),
            "main_rope": main,
            "compress_rope": compress,
            "eos_token_ids": tuple(eos if isinstance(eos, list) else [eos] if eos is not None
                                   else []),
        }
        defaults = {"vocab_size": 129280, "hidden_size": 4096, "num_attention_heads": 64,
                    "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
                    "sliding_window": 128}
        for f in fields(cls):
            if f.name not in kw and f.name in hf:
                kw[f.name] = hf[f.name]
            elif f.name not in kw and f.name in defaults:
                kw[f.name] = defaults[f.name]
        return cls(**kw)


def _check_fixed_choices(hf: dict[str, Any]) -> None:
    """Reject settings the reference architecture hard-codes (shared-KV MQA, SwiGLU, no bias)."""
    fixed = {"num_key_value_heads": 1, "hidden_act": "silu", "attention_bias": False,
             "mlp_bias": False}
    for name, value in fixed.items():
        if name in hf and hf[name] != value:
            raise ValueError(f"{name} must be {value!r} for DeepSeek-V4, got {hf[name]!r}")


def _rope_dim(hf: dict[str, Any], head_dim: int) -> int:
    factor = hf.get("partial_rotary_factor")
    if factor is not None:
        return int(head_dim * float(factor))
    if hf.get("qk_rope_head_dim") is not None:
        return int(hf["qk_rope_head_dim"])
    return int(head_dim * 64 / 512)  # V4 default: 64 RoPE channels of a 512-d head


def _check_nested_rope_dims(hf: dict[str, Any], head_dim: int, rope_dim: int) -> None:
    """Both RoPE flavours must rotate the same channels: the attention applies either one."""
    params = hf.get("rope_parameters") or {}
    for kind in ("main", "compress"):
        sub = params.get(kind)
        factor = sub.get("partial_rotary_factor") if isinstance(sub, dict) else None
        if factor is not None and int(head_dim * float(factor)) != rope_dim:
            raise ValueError(f"rope_parameters.{kind}.partial_rotary_factor ({factor}) gives "
                             f"{int(head_dim * float(factor))} RoPE channels; the model uses "
                             f"qk_rope_head_dim = {rope_dim}")


def _layer_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    if hf.get("layer_types") is not None:
        return tuple(hf["layer_types"])[:n]
    ratios = hf.get("compress_ratios")
    if ratios is not None:
        bad = sorted({r for r in ratios if r not in _RATIO_TO_TYPE})
        if bad:
            raise ValueError(f"compress_ratios entries {bad} not allowed; allowed: 0, 4, 128")
        return tuple(_RATIO_TO_TYPE[r] for r in ratios)[:n]  # extra entries belong to MTP layers
    # transformers' default schedule: two HCA layers, then CSA / HCA alternating
    rest = [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]
    return tuple([HCA] * min(n, 2) + rest)


def _mlp_types(hf: dict[str, Any], n: int) -> tuple[str, ...]:
    if hf.get("mlp_layer_types") is not None:
        return tuple(hf["mlp_layer_types"])[:n]
    n_hash = int(hf.get("num_hash_layers", 3))
    return tuple(["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash))


def _ropes(hf: dict[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(main, compress) RoPE. Nested ``rope_parameters`` are used as written; a flat dict is the
    YaRN scaling of the compress RoPE, with YaRN's cos/sin multiplier forced to 1 as upstream."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        return _rope(params["main"], hf, False), _rope(params["compress"], hf, False)
    main = RopeConfig(theta=float(hf.get("rope_theta", 10000.0)))
    flat = {k: v for k, v in params.items() if k not in ("main", "compress")}
    flat["rope_theta"] = hf.get("compress_rope_theta", 160000.0)
    return main, _rope(flat, hf, True)


def _rope(p: dict[str, Any], hf: dict[str, Any], unit_yarn_factor: bool) -> RopeConfig:
    rope_type = p.get("rope_type", p.get("type", "default")) or "default"
    kw: dict[str, Any] = {"rope_type": rope_type, "theta": float(p.get("rope_theta", 10000.0))}
    if rope_type == "yarn":
        old = p.get("original_max_position_embeddings")
        if old is None:
            raise ValueError("rope_parameters: YaRN needs original_max_position_embeddings")
        kw["original_max_position_embeddings"] = int(old)
        factor = p.get("factor")
        kw["factor"] = float(factor if factor is not None
                             else hf.get("max_position_embeddings", 1048576) / int(old))
        # transformers reads YaRN's `truncate` from the top-level (type-keyed) dict, where it is
        # never set, so V4 always truncates the correction range: do the same.
        kw["truncate"] = True
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
            if p.get(key) is not None:
                kw[key] = float(p[key])
        if unit_yarn_factor:
            kw.setdefault("attention_factor", 1.0)
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} not supported for DeepSeek-V4; allowed: "
                         "default, yarn")
    return RopeConfig(**kw)
