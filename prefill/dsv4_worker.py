"""PrefillWorker for a DeepSeek-V4 checkpoint (created by ``cluster.launch`` when the model's
config says ``deepseek_v4``). A chunk is a CSA page: the prefill's pages stay here in a
``PageStore`` and leave only as selected pages, packed one uint8 row per page
(``pack_pages``) so they move through the same transport as Llama chunks. What the decode side
keeps resident anyway (sliding windows, compressor buffers, HCA entries, the open last page),
the prefill's last logits and CSA hidden states, and for the latent indexer every page's
indexer keys go once, at admission, as a ``DSV4State`` in Ray's object store."""

from __future__ import annotations

import time
from typing import Any

import torch

from flashmemory.cluster.messages import DSV4State, PrefillReply, PrefillTask
from flashmemory.cluster.transport import TransferPlan
from flashmemory.dsv4_engine import check_lsa, is_latent, page_texts, page_tokens
from flashmemory.model.deepseek_v4 import (
    PageStore,
    Prefilled,
    load_deepseek_v4,
    open_resident,
    pack_pages,
    prefill_request,
)
from flashmemory.model.loader import resolve
from flashmemory.prefill.worker import PrefillWorker
from flashmemory.sampling import make_generator, sample


class DSV4PrefillWorker(PrefillWorker):
    def _load_model(self) -> None:
        e = self.cfg.engine
        self.model = load_deepseek_v4(resolve(e.model).path, e.torch_dtype, e.device)
        mc = self.model.config
        self.store = PageStore(mc, self.model.dtype)
        self.page_tokens = page_tokens(mc, self.store.page_entries)
        self._max_len = e.max_model_len or mc.max_position_embeddings
        self._latent: dict[str, bool] = {}
        check_lsa(e.lsa, self.page_tokens)

    def max_model_len(self) -> int:
        return self._max_len

    def _prefill(self, task: PrefillTask) -> PrefillReply:
        """Prefill into the page store, embed page texts for a text indexer, sample the first
        token, and put the request's resident state in the object store for the decode side."""
        import ray

        check_lsa(task.lsa, self.page_tokens)
        self.faults.hit("prefill")
        t0 = time.perf_counter()
        rid, p = task.request_id, task.prompt
        ids = torch.tensor(p.token_ids, device=self.model.embed.weight.device)
        pre = prefill_request(self.model, rid, ids, self.store,
                              self.cfg.engine.prefill_piece_tokens)
        try:
            n = self.store.num_pages(rid)
            latent = task.lsa.mode == "lsa" and self.is_latent(task.lsa)
            if task.lsa.mode == "lsa" and not latent:
                emb, owner = self.encoder.encode_chunks(page_texts(p, self.page_tokens, n))
                self._register(rid, emb, owner)
            first = sample(pre.logits, task.sampling, make_generator(task.sampling))
            base = Prefilled(rid, open_resident(pre.cache, self.store.page_entries), pre.logits,
                             pre.hidden)
            keys = self.store.index_keys(rid) if latent else None
            state = ray.put(DSV4State(base, n, self.store.num_closed(rid), keys))
        except Exception:
            self.store.free(rid)
            raise
        self.metrics.set("flashmemory_chunk_store_bytes", self.store.nbytes())
        seconds = time.perf_counter() - t0
        self.metrics.observe("flashmemory_prefill_seconds", seconds)
        return PrefillReply(rid, self.rank, first, n, self.store.page_bytes, seconds, state)

    def is_latent(self, lsa: Any) -> bool:
        name = lsa.indexer or self.cfg.engine.indexer
        if name not in self._latent:
            self._latent[name] = is_latent(name)
        return self._latent[name]

    def _payload(self, plan: TransferPlan) -> torch.Tensor:
        payload = self.store.read(plan.request_id, list(plan.chunk_ids))
        return pack_pages(payload, self.store.layout).to(self.cfg.engine.device)
