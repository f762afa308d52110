"""Our DeepSeek-V4 backbone against transformers' reference (``transformers.models.deepseek_v4``)
on tiny random configs, CPU, fp32 unless a test says otherwise.

The tiny config (tests.helpers.TINY_DSV4) has every layer type (sliding-only, CSA at 4:1, HCA at
32:1) and both MoE routings; 300 tokens give 75 CSA and 9 HCA entries per layer. It uses 8
indexer heads: with 1-2 heads many lightning-indexer scores are exactly 0 (ReLU), top-k ties
then break arbitrarily and the reference's own cached / uncached paths disagree.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

from flashmemory.model.deepseek_v4 import (
    DeepseekV4Config,
    IndexerTrace,
    QuantConfig,
    load_deepseek_v4,
    pages_to_mask,
)
from flashmemory.model.deepseek_v4.loader import _rename
from tests.helpers import TINY_DSV4, quantize_fp4_rows, quantize_fp8_blocks, save_tiny_dsv4

T = 300  # prompt length of the comparisons
ATOL = 1e-4
CSA_LAYERS = (1, 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _run(model, ids: torch.Tensor, cache=None, start: int = 0, **kw) -> torch.Tensor:
    cache = model.new_cache() if cache is None else cache
    pos = torch.arange(start, start + ids.shape[0])
    return model.logits(model(ids, pos, cache, **kw))


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, **extra: object):
    path = tmp_path_factory.mktemp(name)
    hf = save_tiny_dsv4(path, **extra)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY_DSV4["vocab_size"], (T,), generator=gen)
    picks: dict[int, torch.Tensor] = {}
    for i in CSA_LAYERS:  # record the reference indexer's top-k in the uncached forward
        indexer = hf.model.layers[i].self_attn.compressor.indexer
        indexer.register_forward_hook(lambda _m, _a, out, i=i: picks.__setitem__(i, out[0]))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    return path, hf, load_deepseek_v4(path), ids, ref, picks


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """index_topk 8 < 75 entries: the indexer really selects."""
    return _make(tmp_path_factory, "dsv4-sparse")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """index_topk >= entries, where the reference's uncached forward equals its cached decode."""
    return _make(tmp_path_factory, "dsv4-dense", index_topk=128)


def test_full_forward_matches_reference(sparse):
    _, _, ours, ids, ref, hf_picks = sparse
    trace = IndexerTrace()
    logits = _run(ours, ids, trace=trace)
    assert (logits - ref).abs().max().item() <= ATOL
    for layer in CSA_LAYERS:  # same entries picked (order aside), -1 where nothing is visible
        ours_sorted = trace.topk[layer].sort(dim=-1).values
        assert torch.equal(ours_sorted, hf_picks[layer].sort(dim=-1).values)
        assert (trace.topk[layer] >= 0).sum(-1).max() == 8  # top-k < entries for late queries


def test_prefill_in_pieces_matches_reference(sparse):
    _, _, ours, ids, ref, _ = sparse
    cache, outs, start = ours.new_cache(), [], 0
    for n in (1, 6, 37, 3, 129, 124):  # crosses window, CSA and HCA boundaries mid-piece
        outs.append(_run(ours, ids[start:start + n], cache, start))
        start += n
    assert (torch.cat(outs) - ref).abs().max().item() <= ATOL
    assert cache.length == T and [cache.num_entries(i) for i in range(4)] == [0, 75, 9, 75]


def test_decode_matches_uncached_reference(dense):
    """Prefill 250 tokens, then decode 50 one by one; step t must give the reference's full
    forward logits at t (index_topk >= entries, so that is what the reference's decode gives)."""
    _, _, ours, ids, ref, _ = dense
    cache = ours.new_cache()
    worst = (_run(ours, ids[:250], cache) - ref[:250]).abs().max().item()
    for t in range(250, T):
        worst = max(worst, (_run(ours, ids[t:t + 1], cache, t)[0] - ref[t]).abs().max().item())
    assert worst <= ATOL


def test_decode_matches_reference_cached_path(sparse):
    """With a real top-k (8 of up to 75 entries), compare decode steps with the reference's own
    cached decode (DynamicCache with its CSA / HCA cache layers)."""
    from transformers.cache_utils import DynamicCache

    _, hf, ours, ids, _, _ = sparse
    cache, hf_cache = ours.new_cache(), DynamicCache(config=hf.config)
    with torch.no_grad():
        theirs = hf(ids[None, :260], past_key_values=hf_cache, use_cache=True).logits[0]
        worst = (_run(ours, ids[:260], cache) - theirs).abs().max().item()
        for t in range(260, T):
            step = hf(ids[None, t:t + 1], past_key_values=hf_cache, use_cache=True).logits[0, -1]
            worst = max(worst, (_run(ours, ids[t:t + 1], cache, t)[0] - step).abs().max().item())
    assert worst <= ATOL


def test_resident_entries_mask_the_indexer(sparse):
    _, _, ours, ids, _, _ = sparse
    base = ours.new_cache()
    _run(ours, ids[:256], base)  # 64 CSA entries per CSA layer
    all_cache, full_cache, part_cache, list_cache = (copy.deepcopy(base) for _ in range(4))
    pages = [0, 2]  # tiny pages of 16 entries: entries 0-15 and 32-47 stay resident
    leaked = 0
    for t in range(256, 272):
        tok = ids[t:t + 1]
        n = {i: all_cache.num_entries(i) for i in CSA_LAYERS}
        every = {i: torch.ones(n[i], dtype=torch.bool) for i in CSA_LAYERS}
        part = {i: pages_to_mask(pages, n[i], page_entries=16) for i in CSA_LAYERS}
        traces = [IndexerTrace() for _ in range(4)]
        a = _run(ours, tok, all_cache, t, trace=traces[0])
        b = _run(ours, tok, full_cache, t, resident=every, trace=traces[1])
        c = _run(ours, tok, part_cache, t, resident=part, trace=traces[2])
        d = _run(ours, tok, list_cache, t, trace=traces[3],
                 resident={i: m.nonzero().flatten().tolist() for i, m in part.items()})
        assert torch.equal(a, b) and torch.equal(c, d)
        for i in CSA_LAYERS:
            assert torch.equal(traces[0].topk[i], traces[1].topk[i])
            # entries emitted by this very step are resident (they were just computed here)
            keep = torch.ones(part_cache.num_entries(i), dtype=torch.bool)
            keep[: n[i]] = part[i]
            picked = traces[2].topk[i][traces[2].topk[i] >= 0]
            assert picked.numel() == 8 and keep[picked].all()  # only resident entries
            leaked += int((~keep[traces[0].topk[i][0]]).sum())
    assert leaked > 0  # without the mask the indexer did pick the entries we hid


def test_bf16_error_within_twice_reference(sparse):
    """bf16 against the fp32 reference: our error at most 2x the reference's own bf16 error
    (transformers in bf16 keeps norms / mHC / sinks / biases fp32; so do we)."""
    from transformers import DeepseekV4ForCausalLM

    path, _, _, ids, ref, _ = sparse
    hf16 = DeepseekV4ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        their_err = (hf16(ids[None]).logits[0].float() - ref).abs().max().item()
    ours = load_deepseek_v4(path, dtype=torch.bfloat16)
    assert ours.layers[1].attn.wq_a.weight.dtype == torch.bfloat16
    assert ours.layers[1].attn.kv_norm.weight.dtype == torch.float32
    cache = ours.new_cache()
    err = (_run(ours, ids[:280], cache) - ref[:280]).abs().max().item()
    for t in range(280, T):  # the cached decode path in bf16 too
        err = max(err, (_run(ours, ids[t:t + 1], cache, t)[0] - ref[t]).abs().max().item())
    assert err <= 2 * their_err, (err, their_err)


def test_transformers_in_memory_names_load_the_same(sparse, tmp_path):
    from safetensors.torch import save_file

    path, hf, ours, _, _, _ = sparse
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    other = load_deepseek_v4(tmp_path).state_dict()
    assert other.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, other[k]) for k, v in ours.state_dict().items())


_FP8 = re.compile(r"(\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|\.indexer\.wq_b|\.shared_experts\.w[123])"
                  r"\.weight$")
_EXPERT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def _quantize_dir(src: Path, dst: Path, flash: bool) -> dict[str, torch.Tensor]:
    """Write src's checkpoint quantized into dst; return the by-hand dequantized tensors.

    flash=False: FP8 everywhere, fp32 ``weight_scale_inv``. flash=True (DeepSeek-V4-Flash):
    FP8 with power-of-two ``scale`` (float8_e8m0fnu), experts FP4 with per-32-column scales.
    Compressor / indexer-key projections, router, embeddings and head stay unquantized, as in
    the V4-Flash checkpoints.
    """
    from safetensors.torch import load_file, save_file

    raw, out, by_hand = load_file(str(src / "model.safetensors")), {}, {}
    suffix = ".scale" if flash else ".weight_scale_inv"
    for key, w in raw.items():
        if _FP8.search(key) or (_EXPERT.search(key) and not flash):
            q, s = quantize_fp8_blocks(w, (32, 32), ue8m0=flash)
            grid = s.float().repeat_interleave(32, 0)[: w.shape[0]]
            by_hand[key] = q.float() * grid.repeat_interleave(32, 1)[:, : w.shape[1]]
        elif _EXPERT.search(key):
            q, s = quantize_fp4_rows(w)
            nib = q.view(torch.uint8).long()
            table = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])
            vals = torch.stack([table[nib & 15], table[nib >> 4]], -1).flatten(-2)
            by_hand[key] = vals * s.float().repeat_interleave(32, 1)
        else:
            out[key] = w
            continue
        out[key], out[key.removesuffix(".weight") + suffix] = q, s
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme":
                                  "dynamic", "weight_block_size": [32, 32],
                                  "scale_fmt": "ue8m0" if flash else "float"}
    if flash:
        cfg["expert_dtype"] = "fp4"
    (dst / "config.json").write_text(json.dumps(cfg))
    return by_hand


def test_fp8_block_checkpoint_matches_hand_dequantized(sparse, tmp_path):
    """FP8 e4m3, 32x32 blocks, fp32 weight_scale_inv; q_lora_rank 48 leaves partial blocks.
    Dequantizing is the same fp32 product in the loader and by hand, so the weights agree
    bitwise and the logits as tightly as the unquantized comparison (ATOL)."""
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV4ForCausalLM

    path, _, _, ids, _, _ = sparse
    by_hand = _quantize_dir(path, tmp_path / "fp8", flash=False)
    plain = load_file(str(path / "model.safetensors"))
    assert max((by_hand[k] - plain[k]).abs().max().item() for k in by_hand) > 1e-3  # lossy
    (tmp_path / "deq").mkdir()
    save_file({**plain, **by_hand}, str(tmp_path / "deq" / "model.safetensors"))
    (tmp_path / "deq" / "config.json").write_text((path / "config.json").read_text())
    ref_model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0]
    ours = load_deepseek_v4(tmp_path / "fp8")
    hand = load_deepseek_v4(tmp_path / "deq").state_dict()
    assert all(torch.equal(v, hand[k]) for k, v in ours.state_dict().items())
    assert (_run(ours, ids) - ref).abs().max().item() <= ATOL


def test_v4_flash_format_matches_transformers_loader(tmp_path):
    """ue8m0 ``scale`` tensors and FP4 experts (expert_dtype fp4) against transformers' own FP8
    loader with dequantize=True. That loader derives blocks from the scale grid, which is only
    right when blocks tile the weight, hence q_lora_rank 64 here (V4's real dims all tile)."""
    from transformers import DeepseekV4ForCausalLM, FineGrainedFP8Config

    save_tiny_dsv4(tmp_path / "src", q_lora_rank=64)
    by_hand = _quantize_dir(tmp_path / "src", tmp_path / "flash", flash=True)
    qc = FineGrainedFP8Config(dequantize=True, weight_block_size=(32, 32), scale_fmt="ue8m0",
                              expert_dtype="fp4")
    theirs = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "flash", quantization_config=qc,
                                                   dtype=torch.float32).eval()
    ours = load_deepseek_v4(tmp_path / "flash")
    mine = ours.state_dict()
    for name, p in theirs.state_dict().items():
        assert torch.equal(mine[_rename(name)], p), name
    fp4 = by_hand["model.layers.0.ffn.experts.1.w2.weight"]
    assert torch.equal(mine["layers.0.ffn.experts.w2"][1], fp4)
    ids = torch.randint(0, 128, (160,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = theirs(ids[None]).logits[0]
    assert (_run(ours, ids) - ref).abs().max().item() <= ATOL


def test_upstream_config_layout_and_rope_match_reference():
    """An upstream-style config.json (compress_ratios with an MTP entry, num_hash_layers, flat
    YaRN rope_scaling) folds like transformers' config, and our RoPE tables equal its buffers."""
    from transformers import DeepseekV4Config as HFConfig
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

    from flashmemory.model.deepseek_v4.layers import Rotary

    hf = {**{k: v for k, v in TINY_DSV4.items() if k not in
             ("layer_types", "mlp_layer_types", "rope_parameters", "partial_rotary_factor")},
          "num_hidden_layers": 5, "compress_ratios": [0, 4, 128, 4, 0, 4], "num_hash_layers": 2,
          "qk_rope_head_dim": 8, "rope_theta": 10000.0, "compress_rope_theta": 160000.0,
          "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 64,
                           "beta_fast": 32, "beta_slow": 1}}
    ours, theirs = DeepseekV4Config.from_hf_dict(hf), HFConfig.from_dict(copy.deepcopy(hf))
    assert list(ours.layer_types) == theirs.layer_types
    assert list(ours.mlp_layer_types) == theirs.mlp_layer_types
    assert ours.qk_rope_head_dim == theirs.qk_rope_head_dim == 8
    rot = DeepseekV4RotaryEmbedding(theirs)
    for kind, rope in (("main", ours.main_rope), ("compress", ours.compress_rope)):
        mine = Rotary(rope, ours.qk_rope_head_dim)
        assert torch.allclose(mine.inv_freq, getattr(rot, f"{kind}_inv_freq"), rtol=1e-6)
        assert mine.scale == getattr(rot, f"{kind}_attention_scaling")
    assert ours.compress_rope.rope_type == "yarn" and ours.main_rope.rope_type == "default"


def _tiny_hf_dict() -> dict:
    from transformers import DeepseekV4Config as HFConfig

    return HFConfig(**TINY_DSV4).to_dict()


@pytest.mark.parametrize(("override", "field"), [
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention"] * 2}, "layer_types"),
    ({"mlp_layer_types": ["moe", "dense", "moe", "moe"]}, "mlp_layer_types"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"num_key_value_heads": 4}, "num_key_value_heads"),
    ({"partial_rotary_factor": 0.3}, "qk_rope_head_dim"),
    ({"index_head_dim": 4}, "index_head_dim"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"n_shared_experts": 2}, "n_shared_experts"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"rope_parameters": {"main": {"rope_theta": 1e4, "partial_rotary_factor": 0.5},
                          "compress": {"rope_theta": 1e5}}}, "partial_rotary_factor"),
    ({"layer_types": None, "compress_ratios": [0, 8, 4, 4]}, "compress_ratios"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_emb"),
])
def test_config_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=field):
        DeepseekV4Config.from_hf_dict({**_tiny_hf_dict(), **override})


@pytest.mark.parametrize(("qc", "field"), [
    ({"quant_method": "gptq"}, "quant_method"),
    ({"quant_method": "fp8", "scale_fmt": "e5m2"}, "scale_fmt"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "expert_dtype": "int4"}, "expert_dtype"),
])
def test_quant_config_validation_names_the_field(qc, field):
    with pytest.raises(ValueError, match=field):
        QuantConfig.from_hf_dict({"quantization_config": qc})


def test_forward_rejects_bad_positions_and_residency(sparse):
    _, _, ours, ids, _, _ = sparse
    cache = ours.new_cache()
    _run(ours, ids[:8], cache)
    with pytest.raises(ValueError, match="positions"):
        ours(ids[8:9], torch.tensor([9]), cache)
    with pytest.raises(ValueError, match="not a compressed_sparse_attention"):
        ours(ids[8:9], torch.tensor([8]), cache, resident={2: torch.ones(0, dtype=torch.bool)})
    with pytest.raises(ValueError, match="resident mask"):
        ours(ids[8:9], torch.tensor([8]), cache, resident={1: torch.ones(5, dtype=torch.bool)})
