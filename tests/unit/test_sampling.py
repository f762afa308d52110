"""Sampling (greedy, temperature, top-k, top-p, seeds), stop strings and config validation."""

from __future__ import annotations

import pytest
import torch

from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.sampling import find_stop, sample


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 400, seed: int = 0) -> set[int]:
    gen = torch.Generator().manual_seed(seed)
    return {sample(logits, params, gen) for _ in range(n)}


def test_greedy_is_argmax() -> None:
    assert sample(torch.tensor([0.1, 3.0, 2.9]), SamplingParams(), None) == 1


def test_top_k_and_top_p_restrict_the_support() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert draws(SamplingParams(temperature=1.0, top_k=2), logits) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.7), logits) == {0, 1}
    assert draws(SamplingParams(temperature=1.0, top_p=0.45), logits) == {0}
    assert draws(SamplingParams(temperature=1.0), logits) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p", [1e-300, 1e-50, 1e-40])
def test_a_top_p_below_float32_keeps_the_most_likely_token(top_p: float) -> None:
    """Found by the API fuzzer: a top_p that rounds to 0 in float32 dropped every token and the
    request failed with a NaN distribution; the most likely token always stays."""
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert draws(SamplingParams(temperature=1.0, top_p=top_p, top_k=10**30), logits) == {1}


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(50)
    p = SamplingParams(temperature=0.8)

    def seq(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sample(logits, p, g) for _ in range(20)]

    assert seq(3) == seq(3) and seq(3) != seq(4)


def test_find_stop_only_searches_the_new_text() -> None:
    assert find_stop("hello world. END more", ("END",), 10) == 13
    assert find_stop("hello", ("END",), 0) is None
    assert find_stop("abEN", ("END",), 3) is None
    assert find_stop("abEND", ("END",), 4) == 2  # a stop string split across two tokens


@pytest.mark.parametrize("kwargs,msg", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
])
def test_bad_sampling_params(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,msg", [
    ({"mode": "dense"}, "unknown mode"), ({"budget": 1.5}, "budget"),
    ({"budget": None}, "budget"), ({"budget_tokens": -1}, "budget_tokens"),
    ({"chunk_size": 0}, "chunk_size"), ({"recent_tokens": 0}, "recent_tokens"),
])
def test_bad_lsa_config(kwargs: dict, msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        LSAConfig(**kwargs)


def test_bad_engine_dtype() -> None:
    with pytest.raises(ValueError, match="bfloat16"):
        EngineConfig(dtype="int8")
