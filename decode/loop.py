"""The decode loop: batched LSA decode of many sequences with periodic re-prediction.

Each step: re-select chunks for sequences due (fetch new ones from the chunk store, evict dropped
ones), run one batched decode step, sample, and retire finished sequences. Used by the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.runner import DecodeRunner
from flashmemory.decode.step import AttentionRecorder
from flashmemory.indexer.backbone import QueryTap
from flashmemory.indexer.base import ResidencyState, Selector, plan_resident
from flashmemory.model.llama import CausalLM
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.sampling import find_stop, sample
from flashmemory.types import Prompt, RequestOutput, RequestStats

logger = logging.getLogger(__name__)


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
    error: str | None = None
    tap: QueryTap | None = None  # mode quest: the decode step keeps this sequence's queries
    prefill_s: float = 0.0  # set by whoever ran the prefill (RequestStats' split)
    selection_s: float = 0.0
    transfer_s: float = 0.0
    admission_s: float = 0.0
    transfers: int = 0

    @property
    def last_token(self) -> int:
        return self.out[-1]


# (seq, chunk ids, pool view to fill or None) -> the filled view, or a payload to scatter
Fetch = Callable[[Sequence, list[int], torch.Tensor | None], torch.Tensor]
Select = Callable[[Sequence, ResidencyState], tuple[set[int], int]]


class DecodeLoop:
    """Continuous batching over a chunk pool: ``add`` sequences at any time, ``step`` them all.

    Where chunks come from and who selects them is injected: the engine reads its own chunk store
    and runs the selector in-process; a cluster decode worker asks the indexer actor and receives
    chunks over the transport.
    """

    def __init__(self, model: CausalLM, pool: ChunkPool, tokenizer: Any, eos_ids: set[int],
                 max_model_len: int, fetch: Fetch, select: Select | None = None,
                 runner: DecodeRunner | None = None) -> None:
        self.model, self.pool, self.tokenizer = model, pool, tokenizer
        self.runner = runner or DecodeRunner(model, pool)
        self.eos_ids, self.max_model_len = eos_ids, max_model_len
        self.fetch = fetch
        self.select: Select = select or (
            lambda s, st: plan_resident(s.lsa, s.selector, st, self.pool.chunk_size))
        self.active: list[Sequence] = []

    @classmethod
    def local(cls, model: CausalLM, store: ChunkStore, pool: ChunkPool, tokenizer: Any,
              eos_ids: set[int], max_model_len: int,
              runner: DecodeRunner | None = None) -> DecodeLoop:
        """A loop whose chunks come straight from an in-process chunk store."""
        return cls(model, pool, tokenizer, eos_ids, max_model_len,
                   lambda s, ids, out: store.read(s.store_id, ids, out), runner=runner)

    def run(self, seqs: list[Sequence], first_logits: dict[str, torch.Tensor],
            recorder: AttentionRecorder | None = None) -> list[RequestOutput]:
        """Decode every sequence until it stops; frees each one's pages whatever happens."""
        try:
            for s in seqs:
                self.add(s, first_logits[s.store_id])
            while self.active:
                self.step(recorder)
            return [self.output(s) for s in seqs]
        finally:
            for s in seqs:
                self.abort(s)

    def add(self, s: Sequence, first: torch.Tensor | int) -> None:
        """Admit a prefilled sequence with its first token (or the logits to sample it from)."""
        self.pool.open(s.rid, len(s.prompt.token_ids))
        self._emit(s, first if isinstance(first, int) else sample(first, s.params, s.gen))
        s.first_token_at = time.perf_counter()
        if s.finish is None:
            self.active.append(s)
        else:
            self.pool.close(s.rid)

    def abort(self, s: Sequence) -> None:
        """Drop a sequence (finished, failed or cancelled) and free its pages."""
        if s in self.active:
            self.active.remove(s)
        self.pool.close(s.rid)

    def step(self, recorder: AttentionRecorder | None = None) -> list[Sequence]:
        """One decode step for every active sequence; returns those that finished (closed)."""
        # 1. re-predict the resident set of sequences that are due; a failure fails that one
        done = []
        for s in list(self.active):
            if s.steps % s.lsa.repredict_every == 0:
                try:
                    self.repredict(s)
                except Exception as e:  # transfer/selection failure: fail this request only
                    logger.warning("request %s failed at re-prediction: %s", s.rid, e)
                    s.finish, s.error = "error", f"{type(e).__name__}: {e}"
                    done.append(s)
                    self.abort(s)
        if not self.active:
            return done
        # 2. one batched forward over resident chunks only
        batch = [(s.rid, s.last_token) for s in self.active]
        taps = {s.rid: s.tap for s in self.active if s.tap is not None}
        logits = self.runner.step(batch, recorder, taps)
        # 3. sample, measure, retire
        for s, lg in zip(list(self.active), logits, strict=True):
            s.steps += 1
            table = self.pool.tables[s.rid]
            s.footprints.append(self.pool.resident_tokens(s.rid) / table.num_tokens)
            self._emit(s, sample(lg, s.params, s.gen))
            if s.finish is not None:
                done.append(s)
                self.abort(s)
        return done

    def repredict(self, s: Sequence) -> None:
        """Choose the resident set, then evict dropped chunks and fetch new ones."""
        table = self.pool.tables[s.rid]
        n = table.num_prompt_chunks
        state = ResidencyState(s.store_id, n, table.num_tokens + 1, frozenset(table.pinned),
                               s.steps, lookahead_query(s))
        t0 = time.perf_counter()
        target, chosen = self.select(s, state)
        t1 = time.perf_counter()
        s.selected.append(chosen)
        # move the delta: evict first (frees pages), then one batched fetch
        resident = {i for i in table.pages if i < n}
        self.pool.evict(s.rid, sorted(resident - target - table.pinned))
        fetch = sorted(target - resident)
        if fetch:  # into consecutive pages when free: the transport writes into the pool
            pages, view = self.pool.reserve(s.rid, fetch)
            try:
                payload = self.fetch(s, fetch, view)
            except BaseException:
                self.pool.release(pages)
                raise
            self.pool.commit(s.rid, fetch, pages, None if payload is view else payload)
            s.bytes_moved += payload.numel() * payload.element_size()
            s.transfers += 1
            if payload.is_cuda:  # copies and receives run on the stream: time them whole
                torch.cuda.current_stream(payload.device).synchronize()
        t2 = time.perf_counter()
        s.selection_s += t1 - t0
        s.transfer_s += t2 - t1
        if s.steps == 0:
            s.admission_s = t2 - t0

    def _emit(self, s: Sequence, token: int) -> None:
        emit(s, token, self.tokenizer, self.eos_ids, self.max_model_len)

    def output(self, s: Sequence) -> RequestOutput:
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
            **timing(s, end), **split(s),
        )
        return RequestOutput(s.store_id, s.text, list(s.out), s.finish or "length", s.lsa.mode,
                             stats)


def emit(s: Sequence, token: int, tokenizer: Any, eos_ids: set[int], max_model_len: int) -> None:
    """Append a sampled token to ``s``: finish at EOS (unless ignored), cut at a stop string,
    or finish at ``max_tokens`` / the end of the context (also used by the DS-V4 engine)."""
    if token in eos_ids and not s.params.ignore_eos:
        s.finish = "stop"
        return
    s.out.append(token)
    before = len(s.text)
    s.text = tokenizer.decode(s.out, skip_special_tokens=True)
    cut = find_stop(s.text, s.params.stop, before) if s.params.stop else None
    if cut is not None:
        s.text, s.finish = s.text[:cut], "stop"
    elif (len(s.out) >= s.params.max_tokens
          or len(s.prompt.token_ids) + len(s.out) >= max_model_len):
        s.finish = "length"


def timing(s: Sequence, end: float) -> dict[str, float]:
    """TTFT, TPOT and end-to-end seconds of a finished sequence (RequestStats' fields)."""
    n = len(s.out)
    return {"ttft": s.first_token_at - s.start,
            "tpot": (end - s.first_token_at) / (n - 1) if n > 1 else 0.0,
            "e2e": end - s.start}


def split(s: Sequence) -> dict[str, float]:
    """Prefill / selection / transfer seconds of a sequence and its number of transfers
    (RequestStats' fields)."""
    return {"prefill_s": s.prefill_s, "selection_s": s.selection_s,
            "transfer_s": s.transfer_s, "admission_s": s.admission_s,
            "transfers": s.transfers}


def lookahead_query(s: Sequence) -> str:
    """Lookahead query: the question (final user turn's tail) plus recently generated text."""
    recent = s.text[-400:]
    return f"{s.prompt.query} {recent}" if recent else s.prompt.query
