"""Our Llama-family decoder against transformers on tiny random configs (fp32, CPU)."""

from __future__ import annotations

import os

import pytest
import torch

from flashmemory.model.config import ModelConfig, RopeConfig
from flashmemory.model.loader import ModelNotFoundError, load_model, resolve
from flashmemory.model.rope import inv_frequencies
from tests.helpers import full_decode_logits, save_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CASES = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}}),
    "llama-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2-yarn": ("qwen2", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                              "original_max_position_embeddings": 128}}),
    "qwen3": ("qwen3", {"tie_word_embeddings": True}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    kind, extra = CASES[request.param]
    path = save_tiny(kind, tmp_path_factory.mktemp(request.param), **extra)
    ours = load_model(resolve(str(path)))
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs


def test_prefill_and_decode_logits_match_transformers(pair) -> None:
    ours, theirs = pair
    torch.manual_seed(1)
    ids = torch.randint(0, 257, (150,)).tolist()
    with torch.no_grad():
        ref = theirs(torch.tensor([ids])).logits[0, 99:]  # positions 99..149
    got = full_decode_logits(ours, ids, num_prompt=100, chunk_size=16)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-4


def test_config_reads_architecture_features(pair) -> None:
    ours, theirs = pair
    c = ours.config
    assert c.num_layers == 2 and c.num_kv_heads == 2 and c.head_dim == 16
    assert c.qk_norm == (theirs.config.model_type == "qwen3")
    assert c.attention_bias == (theirs.config.model_type == "qwen2")


@pytest.mark.parametrize("params", [
    {"rope_type": "default", "rope_theta": 500000.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
     "rope_theta": 1e6},
    {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4},
])
def test_rope_frequencies_match_transformers(params: dict) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=1024, num_attention_heads=8, head_dim=128,
                     max_position_embeddings=131072, rope_parameters=dict(params))
    rope = RopeConfig.from_hf({"rope_parameters": params})
    ours = inv_frequencies(rope, 128)
    if params["rope_type"] == "default":
        theirs = 1.0 / (params["rope_theta"] ** (torch.arange(0, 128, 2).float() / 128))
        scale = 1.0
    else:
        theirs, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf, "cpu")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    assert rope.yarn_attention_factor() == pytest.approx(scale)


def test_unsupported_rope_and_arch_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unsupported rope_type 'dynamic'"):
        RopeConfig.from_hf({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_unknown_model_names_the_alternatives(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="smollm2-135m-instruct"):
        resolve("no-such-model")
    with pytest.raises(ModelNotFoundError):
        resolve(str(tmp_path))  # a directory without config.json
