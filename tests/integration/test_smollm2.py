"""The embedded default model (SmolLM2-135M-Instruct GGUF) against transformers, and LSA needle
retrieval end to end through ``LLM.chat``."""

from __future__ import annotations

import os

import pytest
import torch

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.engine import LLM
from tests.helpers import full_decode_logits

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def hf(llm: LLM):
    from transformers import AutoModelForCausalLM

    src = llm.source
    return AutoModelForCausalLM.from_pretrained(str(src.path.parent), gguf_file=src.path.name,
                                                dtype=torch.float32).eval()


def test_logits_match_transformers(llm: LLM, hf) -> None:
    ids = llm.tokenize("Explain in one paragraph why the sky is blue. " * 8, chat=True).token_ids
    n = len(ids)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0].tolist()
        ref = hf(torch.tensor([greedy])).logits[0, n - 1:-1]
    got = full_decode_logits(llm.model, greedy[:-1], n, chunk_size=64)
    assert (got - ref).abs().max().item() <= 1e-4


def test_full_mode_generates_transformers_greedy_tokens(llm: LLM, hf) -> None:
    msg = "List three primary colors, separated by commas."
    out = llm.chat(msg, SamplingParams(max_tokens=12), LSAConfig(mode="full"))[0]
    ids = llm.tokenize(msg, chat=True).token_ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):]
    ref = [t for t in ref.tolist() if t not in llm.eos_ids]
    assert out.token_ids == ref[: len(out.token_ids)] and out.token_ids
    assert out.stats.kv_footprint_mean == 1.0 and out.stats.transfer_ratio == 1.0


def _haystack(n_sentences: int) -> str:
    subjects = ["The gardener", "A tired clerk", "My neighbour", "The old captain", "A student"]
    verbs = ["painted", "repaired", "described", "sold", "photographed"]
    objects = ["a wooden fence", "the red bicycle", "an oil lamp", "the harbour wall", "a kite"]
    places = ["near the station", "in the village", "after lunch", "by the river", "at dawn"]
    return " ".join(
        f"{subjects[i % 5]} {verbs[(i * 3) % 5]} {objects[(i * 7) % 5]} {places[(i * 2) % 5]}."
        for i in range(n_sentences)
    )


def test_lsa_retrieves_a_needle_at_15_percent(llm: LLM) -> None:
    hay = _haystack(220)
    cut = len(hay) // 3
    doc = hay[:cut] + " The special magic number for quiet-river is 4817302. " + hay[cut:]
    msg = doc + "\n\nWhat is the special magic number for quiet-river? Answer with the number."
    out = llm.chat(msg, SamplingParams(max_tokens=24), LSAConfig(mode="lsa", budget=0.15))[0]
    assert 1800 <= out.stats.prompt_tokens <= 2600
    assert "4817302" in out.text
    # 15% of the chunks selected, plus the sink chunk and the 128-token recency tail
    assert out.stats.chunks_selected == 6  # ceil(0.15 * 35 prompt chunks)
    assert out.stats.kv_footprint_mean <= 0.30 and out.stats.transfer_ratio <= 0.30
    rec = llm.chat(msg, SamplingParams(max_tokens=24), LSAConfig(mode="recency"))[0]
    assert "4817302" not in rec.text  # the needle is outside sink + tail: selection matters
