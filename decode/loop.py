"""The decode loop: batched LSA decode of many sequences with periodic re-prediction.

Each step: re-select chunks for sequences due (fetch new ones from the chunk store, evict dropped
ones), run one batched decode step, sample, and retire finished sequences. Used by the engine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.step import AttentionRecorder, decode_step
from flashmemory.indexer.base import Budget, SelectionRequest, Selector, fixed_chunks, pick
from flashmemory.model.llama import CausalLM
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.sampling import find_stop, sample
from flashmemory.types import Prompt, RequestOutput, RequestStats


@dataclass
class Sequence:
    """Decode-side state of one request in one LSA configuration."""

    rid: str
    store_id: str
    prompt: Prompt
    params: SamplingParams
    lsa: LSAConfig
    selector: Selector
    start: float  # arrival time (perf_counter)
    gen: torch.Generator | None = None
    out: list[int] = field(default_factory=list)
    text: str = ""
    finish: str | None = None
    footprints: list[float] = field(default_factory=list)
    selected: list[int] = field(default_factory=list)
    bytes_moved: int = 0
    first_token_at: float = 0.0
    steps: int = 0

    @property
    def last_token(self) -> int:
        return self.out[-1]


class DecodeLoop:
    """Runs sequences to completion over a chunk pool fed from a chunk store."""

    def __init__(self, model: CausalLM, store: ChunkStore, pool: ChunkPool, tokenizer: Any,
                 eos_ids: set[int], max_model_len: int) -> None:
        self.model, self.store, self.pool, self.tokenizer = model, store, pool, tokenizer
        self.eos_ids, self.max_model_len = eos_ids, max_model_len

    def run(self, seqs: list[Sequence], first_logits: dict[str, torch.Tensor],
            recorder: AttentionRecorder | None = None) -> list[RequestOutput]:
        """Decode every sequence until it stops; frees each one's pages whatever happens."""
        try:
            for s in seqs:
                self.pool.open(s.rid, len(s.prompt.token_ids))
                self._emit(s, sample(first_logits[s.store_id], s.params, s.gen))
                s.first_token_at = time.perf_counter()
            active = [s for s in seqs if s.finish is None]
            while active:
                for s in active:
                    if s.steps % s.lsa.repredict_every == 0:
                        self.repredict(s)
                batch = [(s.rid, s.last_token) for s in active]
                logits = decode_step(self.model, self.pool, batch, recorder)
                for s, lg in zip(active, logits, strict=True):
                    s.steps += 1
                    table = self.pool.tables[s.rid]
                    s.footprints.append(self.pool.resident_tokens(s.rid) / table.num_tokens)
                    self._emit(s, sample(lg, s.params, s.gen))
                active = [s for s in active if s.finish is None]
            return [self._output(s) for s in seqs]
        finally:
            for s in seqs:
                self.pool.close(s.rid)

    def repredict(self, s: Sequence) -> None:
        """Choose the resident set, then evict dropped chunks and fetch new ones."""
        lsa, table, c = s.lsa, self.pool.tables[s.rid], self.pool.chunk_size
        n = table.num_prompt_chunks
        # 1. fixed part: sink, recency tail (incl. the token about to be written), pinned chunks
        fixed = fixed_chunks(n, table.num_tokens + 1, c, lsa.sink_chunks, lsa.recent_tokens)
        fixed |= {i for i in table.pinned if i < n}
        # 2. selected part: the selector ranks the other prompt chunks under the budget
        budget = Budget(None if lsa.budget_tokens is not None else lsa.budget, lsa.budget_tokens,
                        lsa.threshold)
        cands = [i for i in range(n) if i not in fixed]
        req = SelectionRequest(s.store_id, n, cands, budget.num_chunks(n, c), s.steps,
                               self._query(s))
        chosen = pick(s.selector.scores(req), req, lsa.threshold) if cands else []
        s.selected.append(len(chosen))
        # 3. move the delta: evict first (frees pages), then one batched fetch
        target = fixed | set(chosen)
        resident = {i for i in table.pages if i < n}
        self.pool.evict(s.rid, sorted(resident - target - table.pinned))
        fetch = sorted(target - resident)
        if fetch:
            payload = self.store.read(s.store_id, fetch)
            self.pool.load(s.rid, fetch, payload)
            s.bytes_moved += payload.numel() * payload.element_size()

    def _query(self, s: Sequence) -> str:
        """Lookahead query: the question (final user turn's tail) plus recently generated text."""
        recent = s.text[-400:]
        return f"{s.prompt.query} {recent}" if recent else s.prompt.query

    def _emit(self, s: Sequence, token: int) -> None:
        if token in self.eos_ids and not s.params.ignore_eos:
            s.finish = "stop"
            return
        s.out.append(token)
        before = len(s.text)
        s.text = self.tokenizer.decode(s.out, skip_special_tokens=True)
        cut = find_stop(s.text, s.params.stop, before) if s.params.stop else None
        if cut is not None:
            s.text, s.finish = s.text[:cut], "stop"
        elif (len(s.out) >= s.params.max_tokens
              or len(s.prompt.token_ids) + len(s.out) >= self.max_model_len):
            s.finish = "length"

    def _output(self, s: Sequence) -> RequestOutput:
        end = time.perf_counter()
        n_chunks = -(-len(s.prompt.token_ids) // self.pool.chunk_size)
        full_bytes = n_chunks * self.pool.page_bytes
        fp = s.footprints or [0.0]
        stats = RequestStats(
            prompt_tokens=len(s.prompt.token_ids),
            completion_tokens=len(s.out),
            num_prompt_chunks=n_chunks,
            kv_footprint_mean=sum(fp) / len(fp),
            kv_footprint_peak=max(fp),
            kv_bytes_transferred=s.bytes_moved,
            transfer_ratio=s.bytes_moved / full_bytes,
            chunks_selected=sum(s.selected) / len(s.selected) if s.selected else 0.0,
            repredictions=len(s.selected),
            ttft=s.first_token_at - s.start,
            tpot=(end - s.first_token_at) / (len(s.out) - 1) if len(s.out) > 1 else 0.0,
            e2e=end - s.start,
        )
        return RequestOutput(s.store_id, s.text, list(s.out), s.finish or "length", s.lsa.mode,
                             stats)
