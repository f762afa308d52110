"""Shared test helpers: tiny random HF checkpoints, a dense reference path through our model, a
free port, and tiny QA files in the SQuAD / HotpotQA layouts."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch

from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.step import decode_step
from flashmemory.model.llama import CausalLM
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill

TINY = dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=512, tie_word_embeddings=False)


def save_tiny(kind: str, path: Path, **extra: object) -> Path:
    """Save a tiny random transformers model of ``kind`` to ``path``; return the directory."""
    import transformers as tf

    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
           "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[kind]
    torch.manual_seed(0)
    cfg = cls[0](**{**TINY, **extra})
    model = cls[1](cfg).eval()
    model.save_pretrained(path)
    return path


def store_and_pool(model: CausalLM, chunk_size: int) -> tuple[ChunkStore, ChunkPool]:
    c = model.config
    store = ChunkStore(c.num_layers, c.num_kv_heads, c.head_dim, chunk_size, model.dtype)
    return store, ChunkPool(store.shape, model.dtype, initial_pages=2)


def full_decode_logits(model: CausalLM, ids: list[int], num_prompt: int,
                       chunk_size: int) -> torch.Tensor:
    """Prefill ids[:num_prompt], then teacher-force the rest with every chunk resident.

    Returns (len(ids) - num_prompt + 1, vocab) logits: prefill's last, then each decode step's.
    """
    store, pool = store_and_pool(model, chunk_size)
    offsets = [(i, i + 1) for i in range(num_prompt)]
    res = prefill(model, store, "r", ids[:num_prompt], offsets, "x" * num_prompt)
    pool.open("r", num_prompt)
    n = len(res.metas)
    pool.load("r", list(range(n)), store.read("r", list(range(n))))
    out = [res.logits]
    for tok in ids[num_prompt:]:
        out.append(decode_step(model, pool, [("r", tok)])[0])
    return torch.stack(out)


def free_port() -> int:
    """A free TCP port on the loopback interface (for Serve, Prometheus, Ray's metrics)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_squad(path: Path) -> Path:
    """SQuAD v2 layout: data[].paragraphs[].{context, qas[].{question, answers[].text,
    is_impossible}}."""
    articles = []
    for a in range(3):
        paragraphs = [{"context": f"Article {a} paragraph {p}: the river Avon{a}{p} flows past "
                                  f"the mill of Oswin{a}{p}.",
                       "qas": [{"question": f"Whose mill does the Avon{a}{p} pass?",
                                "answers": [{"text": f"Oswin{a}{p}"}], "is_impossible": False},
                               {"question": "Unanswerable?", "answers": [],
                                "is_impossible": True}]}
                      for p in range(4)]
        articles.append({"title": f"A{a}", "paragraphs": paragraphs})
    path.write_text(json.dumps({"version": "v2.0", "data": articles}))
    return path


def write_hotpotqa(path: Path) -> Path:
    """HotpotQA layout: [{question, answer, context: [[title, [sentences]]]}]."""
    rows = [{"_id": str(i), "question": f"Where was Person{i} born?", "answer": f"Town{i}",
             "context": [[f"Person{i}", [f"Person{i} is a painter. ", f"Born in Town{i}."]],
                         [f"Other{i}", [f"Other{i} is a river."]]]} for i in range(6)]
    path.write_text(json.dumps(rows))
    return path
