"""Load a DeepSeek-V4 checkpoint directory (config.json + *.safetensors) into our model.

Called by users and tests (``load_deepseek_v4``). Accepts upstream DeepSeek tensor names (what
the hub checkpoints and transformers' ``save_pretrained`` write, with or without a ``model.``
prefix, experts one tensor per expert) and transformers' in-memory names (stacked experts).
Quantized weights (see ``quant``) are dequantized to fp32, then cast to the compute dtype.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from flashmemory.model.deepseek_v4.config import DeepseekV4Config
from flashmemory.model.deepseek_v4.model import DeepseekV4ForCausalLM
from flashmemory.model.deepseek_v4.quant import QuantConfig, dequantize, is_quantized
from flashmemory.model.loader import read_safetensors

logger = logging.getLogger(__name__)

# Tensor names -> our module names, applied in order after stripping a leading "model.".
_RENAMES: tuple[tuple[str, str], ...] = (
    # transformers' in-memory names
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head.\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
    (r"\.attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
    (r"\.attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
    (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
    (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.compressor\.position_bias$", ".compressor.ape"),
    (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
    (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
    (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
    (r"\.attn\.kv_proj\.", ".attn.wkv."),
    (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
    (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
    (r"\.attn\.sinks$", ".attn.sink"),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.experts\.gate_up_proj$", ".experts.w13"),
    (r"\.experts\.down_proj$", ".experts.w2"),
    # upstream DeepSeek names
    (r"^hc_head_(fn|base|scale)$", r"hc_head.\1"),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn\.norm\.", ".attn.kv_norm."),
    (r"\.attn_sink$", ".sink"),
)
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_SCALE_SUFFIXES = (("_scale_inv", ""), (".scale", ".weight"))  # x.weight_scale_inv, x.scale


def load_deepseek_v4(path: str | Path, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu") -> DeepseekV4ForCausalLM:
    """Build the model from a checkpoint directory; weights in ``dtype`` on ``device``."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    if hf.get("model_type", "deepseek_v4") != "deepseek_v4":
        raise ValueError(f"{path} holds a {hf['model_type']!r} model, not deepseek_v4")
    cfg = DeepseekV4Config.from_hf_dict(hf)
    quant = QuantConfig.from_hf_dict(hf)
    state = checkpoint_state(read_safetensors(path), cfg, quant)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.setdefault("head.weight", state["embed.weight"])
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the config: missing "
                         f"{sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}")
    model.cast(dtype).build_rotary()  # the RoPE tables were built on meta: rebuild them (fp32)
    return model.to(device).eval()


def checkpoint_state(raw: dict[str, torch.Tensor], cfg: DeepseekV4Config,
                     quant: QuantConfig | None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict: dequantize, rename, stack experts, drop MTP."""
    block = quant.weight_block_size if quant is not None else None
    plain = _dequantized(raw, block)
    state: dict[str, torch.Tensor] = {}
    experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for key, tensor in plain.items():
        name = _rename(key)
        if name is None:
            continue
        match = _EXPERT.match(name)
        if match:
            experts.setdefault((match[1], match[3]), {})[int(match[2])] = tensor
        else:
            state[name] = tensor
    state.update(_stack_experts(experts, cfg.n_routed_experts))
    return state


def _dequantized(raw: dict[str, torch.Tensor],
                 block: tuple[int, int] | None) -> dict[str, torch.Tensor]:
    """Fold every (quantized weight, scale) pair into one fp32 tensor under the weight's name."""
    out = dict(raw)
    for key in raw:
        for suffix, weight_suffix in _SCALE_SUFFIXES:
            if not key.endswith(suffix):
                continue
            weight_key = key[: -len(suffix)] + weight_suffix
            if weight_key in raw and is_quantized(raw[weight_key]):
                out[weight_key] = dequantize(raw[weight_key], raw[key], block)
                del out[key]
            break
    leftover = [k for k, v in out.items() if is_quantized(v) and not k.endswith("tid2eid")]
    if leftover:
        raise ValueError(f"quantized tensors without scales: {leftover[:6]}")
    return {k: v if not v.is_floating_point() else v.float() for k, v in out.items()}


def _rename(key: str) -> str | None:
    """Our module name for a checkpoint tensor, or None for tensors we do not use (MTP)."""
    key = key.removeprefix("model.")
    if key.startswith("mtp."):
        return None
    for pattern, repl in _RENAMES:
        key = re.sub(pattern, repl, key)
    return key


def _stack_experts(experts: dict[tuple[str, str], dict[int, torch.Tensor]],
                   num: int) -> dict[str, torch.Tensor]:
    """Per-expert w1 / w3 (I, H) and w2 (H, I) -> w13 (E, 2I, H) = [w1; w3] and w2 (E, H, I)."""
    out: dict[str, torch.Tensor] = {}
    prefixes = sorted({prefix for prefix, _ in experts})
    for prefix in prefixes:
        mats = {w: experts.get((prefix, w), {}) for w in ("w1", "w2", "w3")}
        for w, found in mats.items():
            if sorted(found) != list(range(num)):
                raise ValueError(f"{prefix}: expected {num} experts' {w}, found {len(found)}")
        w13 = [torch.cat([mats["w1"][e], mats["w3"][e]]) for e in range(num)]
        out[f"{prefix}.w13"] = torch.stack(w13)
        out[f"{prefix}.w2"] = torch.stack([mats["w2"][e] for e in range(num)])
    return out
