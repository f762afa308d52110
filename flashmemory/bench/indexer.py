"""Indexer cost benchmark: chunk-embedding throughput against prefill throughput on the same
device, and the latency of one re-prediction (embed the lookahead query, score every chunk
window, take the top-k) over N chunks."""

from __future__ import annotations

import random
import statistics
import time
from typing import Any

import torch

from flashmemory.bench.common import command, model_config, random_model
from flashmemory.evaluation.niah import prose_sentences
from flashmemory.indexer.base import SelectionRequest, pick


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def chunk_texts(num: int, chars: int = 280, seed: int = 0) -> list[str]:
    """Prose cut into ``num`` chunks of about ``chars`` characters (~64 tokens)."""
    text = " ".join(prose_sentences(random.Random(seed), num * chars // 60 + 10))
    return [text[i * chars:(i + 1) * chars] for i in range(num)]


def embedding_row(encoder: str, device: str, num_chunks: int) -> tuple[dict[str, Any], Any]:
    from flashmemory.indexer.neural import NeuralIndexer

    idx = NeuralIndexer(encoder, device=device)
    texts = chunk_texts(num_chunks)
    idx.encode_chunks(texts[:64])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    emb, owner = idx.encode_chunks(texts)
    _sync(device)
    dt = time.perf_counter() - t0
    tokens = sum(len(idx.encoder.tokenizer(t, add_special_tokens=False)["input_ids"])
                 for t in texts)
    idx.add_embeddings("bench", emb, owner)
    return dict(what=f"embed {num_chunks} chunks ({encoder})", seconds=dt,
                tokens_per_s=tokens / dt), idx


def repredict_row(idx: Any, device: str, num_chunks: int, reps: int = 30) -> dict[str, Any]:
    """One re-prediction as decode runs it: score all chunks for a new query, pick the top 10%."""
    cands = list(range(num_chunks))
    times = []
    for r in range(reps + 3):
        query = f"What did the report say about item {r}? {chunk_texts(1, seed=r)[0][:200]}"
        _sync(device)
        t0 = time.perf_counter()
        scores = idx.chunk_scores("bench", query)
        req = SelectionRequest("bench", num_chunks, cands, num_chunks // 10, r, query)
        pick(scores, req, None)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times[3:]) * 1e3
    return dict(what=f"re-predict over {num_chunks} chunks (median of {reps})", ms=ms)


def prefill_row(shape: str, tokens: int, device: str) -> dict[str, Any]:
    from flashmemory.prefill.chunk_store import ChunkStore
    from flashmemory.prefill.runner import prefill

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_model(model_config(shape, tokens + 16), device, dtype)
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (tokens,)).tolist()
    offsets = [(i, i + 1) for i in range(tokens)]
    times = []
    for r in range(2):
        store = ChunkStore(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, dtype, device)
        _sync(device)
        t0 = time.perf_counter()
        prefill(model, store, f"r{r}", ids, offsets, "x" * tokens)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return dict(what=f"prefill {tokens} tokens ({shape} shape, random weights)",
                seconds=times[-1], tokens_per_s=tokens / times[-1])


def run(encoder: str, device: str, num_chunks: int, shapes: list[str],
        prefill_tokens: int, argv: list[str]) -> list[dict[str, Any]]:
    emb, idx = embedding_row(encoder, device, num_chunks)
    rows = [emb, repredict_row(idx, device, num_chunks)]
    rows += [prefill_row(s, prefill_tokens, device) for s in shapes]
    for r in rows:
        r["command"] = command(argv)
    return rows


COLUMNS = ["what", "seconds", "tokens_per_s", "ms", "command"]
