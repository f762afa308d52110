"""Configuration dataclasses: sampling, LSA selection, engine. CLI flags and (later) the Serve
YAML map onto these fields; bad values raise ``ValueError`` naming what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

Mode = Literal["full", "lsa", "recency", "random", "oracle", "snapkv", "quest"]
# modes that rank chunks with the backbone's own queries and keys: single-process engine only
BACKBONE_MODES: tuple[str, ...] = ("oracle", "snapkv", "quest")
MODES: tuple[str, ...] = get_args(Mode)
Attention = Literal["auto", "torch", "triton"]
ATTENTIONS: tuple[str, ...] = get_args(Attention)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters (vLLM-compatible names)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))


@dataclass(frozen=True)
class LSAConfig:
    """Which chunks a request keeps resident during decode, and how often that is re-decided."""

    mode: Mode = "lsa"
    chunk_size: int = 64  # tokens per chunk (C)
    budget: float | None = 0.1  # fraction of prompt chunks a selector may keep ...
    budget_tokens: int | None = None  # ... or a token count (overrides budget)
    threshold: float | None = None  # optional minimum selector score (adaptive budget) ...
    min_budget: float = 0.0  # ... keeping at least this fraction of prompt chunks (the floor)
    sink_chunks: int = 1
    recent_tokens: int = 128  # recency tail W (prompt end + generated)
    repredict_every: int = 64  # decode steps between re-predictions
    oracle_window: int = 64  # steps of future attention mass the oracle ranks by
    seed: int = 0  # random selector
    indexer: str | None = None  # mode lsa: this encoder instead of the engine's (eval variants)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.budget_tokens is not None:
            if self.budget_tokens < 0:
                raise ValueError(f"budget_tokens must be >= 0, got {self.budget_tokens}")
        elif self.budget is None or not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"budget must be a fraction in [0, 1], got {self.budget}")
        if not 0.0 <= self.min_budget <= 1.0:
            raise ValueError(f"min_budget must be a fraction in [0, 1], got {self.min_budget}")
        if self.sink_chunks < 0 or self.recent_tokens < 1 or self.repredict_every < 1:
            raise ValueError("sink_chunks >= 0, recent_tokens >= 1, repredict_every >= 1 required")


@dataclass(frozen=True)
class EngineConfig:
    """A single-process engine: backbone, numerics, indexer and default LSA settings."""

    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    indexer: str = "minilm"  # alias or a sentence-transformers directory
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    prefill_piece_tokens: int = 8192
    store_capacity_gb: float | None = None  # chunk store's device tier; beyond it, pinned host
    attention: Attention = "auto"  # decode attention: triton kernel on GPU, torch SDPA on CPU
    cuda_graphs: bool = True  # replay captured decode steps (GPU + triton only)
    lsa: LSAConfig = field(default_factory=LSAConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of "
                             f"{', '.join(ATTENTIONS)}")
        if self.prefill_piece_tokens < 1:
            raise ValueError("prefill_piece_tokens must be >= 1")
        if self.store_capacity_gb is not None and self.store_capacity_gb < 0:
            raise ValueError("store_capacity_gb must be >= 0")

    @property
    def store_capacity_bytes(self) -> int | None:
        gb = self.store_capacity_gb
        return None if gb is None else int(gb * 2**30)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# keys a mode variant may set, with their types ("lsa:budget=0.05", "lsa:indexer=runs/idx")
_VARIANT_KEYS = {"budget": float, "budget_tokens": int, "threshold": float, "min_budget": float,
                 "indexer": str, "recent_tokens": int, "sink_chunks": int,
                 "repredict_every": int, "seed": int}


def mode_variant(spec: str, base: LSAConfig) -> LSAConfig:
    """``MODE[:key=value]...`` -> ``base`` with that mode and those fields, so one evaluation can
    compare e.g. ``lsa``, ``lsa:budget=0.05``, ``lsa:threshold=0.4:min_budget=0.02`` and
    ``lsa:indexer=runs/idx``. Raises ValueError naming the bad part."""
    from dataclasses import replace

    mode, *parts = spec.strip().split(":")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} in {spec!r}; choose one of {', '.join(MODES)}")
    fields: dict[str, object] = {"mode": mode}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq or key not in _VARIANT_KEYS:
            raise ValueError(f"bad mode option {part!r} in {spec!r}: expected KEY=VALUE with KEY "
                             f"one of {', '.join(_VARIANT_KEYS)}")
        try:
            fields[key] = _VARIANT_KEYS[key](value)
        except ValueError:
            raise ValueError(f"bad value {value!r} for {key} in {spec!r}") from None
    if "budget_tokens" not in fields and "budget" in fields:
        fields["budget_tokens"] = None  # a fraction given here wins over a base token budget
    if "indexer" in fields and mode != "lsa":
        raise ValueError(f"{spec!r}: only mode lsa takes an indexer")
    return replace(base, **fields)  # type: ignore[arg-type]
