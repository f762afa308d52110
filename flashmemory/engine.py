"""Single-process LSA engine: ``LLM(...).generate(prompts, SamplingParams)`` and ``LLM.chat``;
``load_engine`` picks it or the DeepSeek-V4 engine (``dsv4_engine``) for a checkpoint.

Prefill runs each prompt densely into the chunk store; decode keeps only each request's resident
chunks (sink + selected + recency tail) in the chunk pool and re-selects every N steps.
"""

from __future__ import annotations

import itertools
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.decode.chunk_pool import ChunkPool
from flashmemory.decode.loop import DecodeLoop, Sequence
from flashmemory.decode.runner import DecodeRunner
from flashmemory.decode.step import AttentionRecorder
from flashmemory.indexer.backbone import (
    SNAPKV_WINDOW,
    PromptKeys,
    QueryTap,
    QuestSelector,
    SnapKVSelector,
)
from flashmemory.indexer.backbone import observe as observe_prompt
from flashmemory.indexer.base import Selector
from flashmemory.indexer.selectors import baseline_selector
from flashmemory.model.loader import load_backbone, model_type, resolve
from flashmemory.prefill.chunk_store import ChunkStore
from flashmemory.prefill.runner import prefill
from flashmemory.sampling import make_generator
from flashmemory.types import Messages, Prompt, RequestOutput, tokenize_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trace:
    """A full-attention decode with its attention record (``LLM.trace``)."""

    output: RequestOutput
    steps: list[torch.Tensor]  # per decode step: (num_chunks_seen,) peak attention mass
    chunk_texts: list[str]  # the prompt's chunks
    quest: dict[int, torch.Tensor]  # step -> (num_chunks_seen,) Quest-style scores
    mean_steps: list[torch.Tensor] = field(default_factory=list)  # per step: mean over heads
    # per step: (layers, query heads, num_chunks_seen), every head's own mass
    head_steps: list[torch.Tensor] = field(default_factory=list)


class Engine(ABC):
    """What the two single-process engines share (``LLM`` here, ``dsv4_engine.DSV4LLM`` for
    DeepSeek-V4): prompts in, raw or through the chat template, one ``RequestOutput`` each.
    Subclasses set ``config``, ``tokenizer``, ``eos_ids`` and ``max_model_len`` and implement
    ``run_modes`` (one prefill, a decode per LSA config) and ``_run`` (a batch, one config)."""

    config: EngineConfig
    tokenizer: Any
    eos_ids: set[int]
    max_model_len: int
    _indexers: dict[str, Any]  # text encoder name -> NeuralIndexer (loaded on use)

    def indexer_for(self, name: str) -> Any:
        """The text indexer ``name`` (``NeuralIndexer``), loaded once."""
        if name not in self._indexers:
            from flashmemory.indexer.neural import NeuralIndexer

            self._indexers[name] = NeuralIndexer(name, device=self.config.device)
        return self._indexers[name]

    def tokenize(self, prompt: str | Messages, chat: bool, query_chars: int = 400) -> Prompt:
        """Apply the chat template (chat=True) and tokenize with character offsets."""
        return tokenize_prompt(self.tokenizer, prompt, chat, self.max_model_len, query_chars)

    def generate(self, prompts: str | list[str], sampling: SamplingParams | None = None,
                 lsa: LSAConfig | None = None) -> list[RequestOutput]:
        """Raw-text prompts (no chat template), one output each, in order."""
        plist = [prompts] if isinstance(prompts, str) else prompts
        return self._run([self.tokenize(p, chat=False) for p in plist], sampling, lsa)

    def chat(self, conversations: Messages | list[Messages] | str | list[str],
             sampling: SamplingParams | None = None,
             lsa: LSAConfig | None = None) -> list[RequestOutput]:
        """Chat prompts through the model's chat template."""
        convs = [conversations] if isinstance(conversations, str) or (
            conversations and isinstance(conversations[0], dict)) else conversations
        return self._run([self.tokenize(c, chat=True) for c in convs], sampling, lsa)  # type: ignore[arg-type]

    @abstractmethod
    def run_modes(self, prompt: Prompt, sampling: SamplingParams,
                  configs: list[LSAConfig]) -> list[RequestOutput]: ...

    @abstractmethod
    def _run(self, prompts: list[Prompt], sampling: SamplingParams | None,
             lsa: LSAConfig | None) -> list[RequestOutput]: ...


class LLM(Engine):
    """Loads a backbone and an indexer once; serves batches of prompts with LSA decoding."""

    def __init__(self, model: str | None = None, config: EngineConfig | None = None,
                 **overrides: Any) -> None:
        cfg = config or EngineConfig()
        if model is not None:
            overrides["model"] = model
        self.config = cfg = replace(cfg, **overrides)
        self.source = resolve(cfg.model)
        bb = load_backbone(cfg.model, cfg.torch_dtype, cfg.device, cfg.max_model_len)
        self.model, self.tokenizer = bb.model, bb.tokenizer
        self.eos_ids, self.max_model_len = bb.eos_ids, bb.max_model_len
        self._indexers: dict[str, Any] = {}  # encoder name -> NeuralIndexer (loaded on use)
        self._keys: dict[str, PromptKeys] = {}  # store id -> the snapkv / quest baselines' view
        self._prefill_s: dict[str, float] = {}  # store id -> seconds of its prefill
        self._ids = itertools.count()
        if cfg.lsa.mode == "lsa":
            _ = self.indexer  # load the encoder now, not inside the first request's TTFT

    # -- public API (tokenize, generate, chat: Engine) -----------------------------------------
    def run_modes(self, prompt: Prompt, sampling: SamplingParams,
                  configs: list[LSAConfig]) -> list[RequestOutput]:
        """One prefill, then one decode per LSA config (the evaluation's inner loop)."""
        store_id = f"p{next(self._ids)}"
        start = time.perf_counter()
        try:
            first = self._prefill(store_id, prompt, configs[0].chunk_size, configs)
            traces = None
            if any(c.mode == "oracle" for c in configs):
                traces = self._oracle_traces(store_id, prompt, sampling, configs, first, start)
            seqs = [self._new_seq(store_id, prompt, sampling, c, start, traces) for c in configs]
            return self._decode(seqs, {store_id: first})
        finally:
            self._release(store_id)

    def trace(self, prompt: Prompt, sampling: SamplingParams, lsa: LSAConfig,
              quest_every: int | None = None) -> Trace:
        """Decode with full attention, recording each step's peak attention mass per chunk
        (and Quest-style scores every ``quest_every`` steps): the indexer's label dump."""
        store_id = f"p{next(self._ids)}"
        start = time.perf_counter()
        try:
            first = self._prefill(store_id, prompt, lsa.chunk_size, [replace(lsa, mode="full")])
            texts = self.store.chunk_texts(store_id)
            out, rec, rid = self._record_full(store_id, prompt, sampling, lsa, first, start,
                                              quest_every, keep_heads=True)
            return Trace(out, rec.steps.get(rid, []), texts, rec.quest.get(rid, {}),
                         rec.mean_steps.get(rid, []), rec.head_steps.get(rid, []))
        finally:
            self._release(store_id)

    # -- internals ----------------------------------------------------------------------------
    def _run(self, prompts: list[Prompt], sampling: SamplingParams | None,
             lsa: LSAConfig | None) -> list[RequestOutput]:
        sampling, lsa = sampling or SamplingParams(), lsa or self.config.lsa
        if lsa.mode == "oracle":
            return [self.run_modes(p, sampling, [lsa])[0] for p in prompts]
        start = time.perf_counter()
        store_ids = [f"p{next(self._ids)}" for _ in prompts]
        try:
            firsts, seqs = {}, []
            for sid, p in zip(store_ids, prompts, strict=True):
                firsts[sid] = self._prefill(sid, p, lsa.chunk_size, [lsa])
                seqs.append(self._new_seq(sid, p, sampling, lsa, start, None))
            return self._decode(seqs, firsts)
        finally:
            for sid in store_ids:
                self._release(sid)

    def _ensure_store(self, chunk_size: int) -> None:
        mc = self.model.config
        if getattr(self, "store", None) is None or self.store.chunk_size != chunk_size:
            dt, dev = self.config.torch_dtype, self.config.device
            self.store = ChunkStore(mc.num_layers, mc.num_kv_heads, mc.head_dim, chunk_size, dt,
                                    dev, self.config.store_capacity_bytes)
            self.pool = ChunkPool(self.store.shape, dt, dev)
            self.runner = DecodeRunner(self.model, self.pool, self.config.attention,
                                       self.config.cuda_graphs)  # graphs live with the pool

    def _prefill(self, store_id: str, prompt: Prompt, chunk_size: int,
                 configs: list[LSAConfig]) -> torch.Tensor:
        """Prefill into the store, then what the configs' selectors need: chunk embeddings of
        each neural indexer, the backbone's view for snapkv / quest."""
        self._ensure_store(chunk_size)
        t0 = time.perf_counter()
        observe = any(c.mode in ("snapkv", "quest") for c in configs)
        res = prefill(self.model, self.store, store_id, prompt.token_ids, prompt.offsets,
                      prompt.text, self.config.prefill_piece_tokens,
                      observe_last=SNAPKV_WINDOW if observe else 0)
        for name in dict.fromkeys(c.indexer or self.config.indexer for c in configs
                                  if c.mode == "lsa"):
            self.indexer_for(name).add_request(store_id, self.store.chunk_texts(store_id))
        if res.window_q is not None:
            n = len(res.metas)
            keys = [self.store.layer_kv(store_id, i, res.num_tokens)[0]
                    for i in range(self.model.config.num_layers)]
            self._keys[store_id] = observe_prompt(res.window_q, keys, n, chunk_size)
        if res.logits.is_cuda:
            torch.cuda.synchronize(res.logits.device)
        self._prefill_s[store_id] = time.perf_counter() - t0
        return res.logits

    @property
    def indexer(self) -> Any:
        """The engine's neural indexer (``EngineConfig.indexer``)."""
        return self.indexer_for(self.config.indexer)

    def _selector(self, lsa: LSAConfig, traces: dict[str, list[torch.Tensor]] | None,
                  store_id: str, tap: QueryTap | None) -> Selector:
        if lsa.mode == "oracle":
            traces = traces or {}
        if lsa.mode == "snapkv":
            return SnapKVSelector(self._keys[store_id])
        if lsa.mode == "quest":
            assert tap is not None
            return QuestSelector(self._keys[store_id], tap)
        return baseline_selector(lsa, traces) or self.indexer_for(
            lsa.indexer or self.config.indexer)

    def _new_seq(self, store_id: str, prompt: Prompt, params: SamplingParams, lsa: LSAConfig,
                 start: float, traces: dict[str, list[torch.Tensor]] | None) -> Sequence:
        rid = f"{store_id}-{lsa.mode}-{next(self._ids)}"
        tap = QueryTap() if lsa.mode == "quest" else None
        return Sequence(rid, store_id, prompt, params, lsa,
                        self._selector(lsa, traces, store_id, tap), start,
                        make_generator(params), tap=tap,
                        prefill_s=self._prefill_s.get(store_id, 0.0))

    def _oracle_traces(self, store_id: str, prompt: Prompt, sampling: SamplingParams,
                       configs: list[LSAConfig], first: torch.Tensor,
                       start: float) -> dict[str, list[torch.Tensor]]:
        """Full-attention run recording per-chunk attention mass at every step."""
        oracle = next(c for c in configs if c.mode == "oracle")
        _, rec, rid = self._record_full(store_id, prompt, sampling, oracle, first, start)
        return {store_id: rec.steps.get(rid, [])}

    def _record_full(self, store_id: str, prompt: Prompt, sampling: SamplingParams,
                     lsa: LSAConfig, first: torch.Tensor, start: float,
                     quest_every: int | None = None, keep_heads: bool = False,
                     ) -> tuple[RequestOutput, AttentionRecorder, str]:
        """Decode a prefilled prompt with full attention, recording per-step chunk mass (and
        Quest-style scores every ``quest_every`` steps): the output, the record, its request."""
        seq = self._new_seq(store_id, prompt, sampling, replace(lsa, mode="full"), start, None)
        recorder = AttentionRecorder(self.model.config.num_layers, quest_every, keep_heads)
        out = self._decode([seq], {store_id: first}, recorder)[0]
        return out, recorder, seq.rid

    def _decode(self, seqs: list[Sequence], firsts: dict[str, torch.Tensor],
                recorder: AttentionRecorder | None = None) -> list[RequestOutput]:
        loop = DecodeLoop.local(self.model, self.store, self.pool, self.tokenizer, self.eos_ids,
                                self.max_model_len, self.runner)
        return loop.run(seqs, firsts, recorder)

    def _release(self, store_id: str) -> None:
        if getattr(self, "store", None) is not None:
            self.store.free(store_id)
        for indexer in self._indexers.values():
            indexer.forget(store_id)
        self._keys.pop(store_id, None)
        self._prefill_s.pop(store_id, None)


def load_engine(config: EngineConfig) -> Engine:
    """The engine for ``config.model``: ``DSV4LLM`` for a checkpoint whose config.json says
    ``model_type: deepseek_v4``, else ``LLM`` (the Llama family). Used by the CLI."""
    if model_type(resolve(config.model)) == "deepseek_v4":
        from flashmemory.dsv4_engine import DSV4LLM

        return DSV4LLM(config)
    return LLM(config=config)
