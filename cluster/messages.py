"""Typed messages that cross Ray actors (client -> prefill -> indexer -> decode -> client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashmemory.config import LSAConfig, SamplingParams
from flashmemory.types import Prompt, RequestStats


@dataclass(frozen=True)
class PrefillTask:
    """Client -> PrefillWorker: run this prompt and keep its chunks."""

    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    lsa: LSAConfig


@dataclass(frozen=True)
class PrefillReply:
    """PrefillWorker -> client."""

    request_id: str
    prefill_rank: int  # transport rank of the worker holding the chunks
    first_token: int
    num_prompt_chunks: int
    chunk_bytes: int  # bytes of one chunk payload
    prefill_s: float
    state: Any = None  # DeepSeek-V4: an ObjectRef to the request's DSV4State (Ray object store)


@dataclass(frozen=True)
class DecodeTask:
    """Client -> DecodeWorker: decode this prefilled request."""

    request_id: str
    prompt: Prompt
    sampling: SamplingParams
    lsa: LSAConfig
    prefill_rank: int
    first_token: int
    arrival: float  # client wall-clock time (time.time()) of arrival, for TTFT
    prefill_s: float = 0.0  # the prefill worker's seconds (RequestStats.prefill_s)
    state: Any = None  # DeepSeek-V4: PrefillReply.state, passed on by reference


@dataclass(frozen=True)
class DSV4State:
    """PrefillWorker -> DecodeWorker through Ray's object store, at admission, for a DeepSeek-V4
    request: what stays resident on the decode side and the directory of the pages it may
    fetch. CSA pages themselves move through the chunk transport."""

    prefilled: Any  # model.deepseek_v4.Prefilled: base cache (no CSA entry), logits, CSA hiddens
    num_pages: int
    num_closed: int
    index_keys: Any = None  # (P, Lc, E, Di) every page's indexer keys: the latent indexer's


@dataclass(frozen=True)
class TokenEvent:
    """DecodeWorker -> client, streamed: new text since the last event, or the end."""

    request_id: str
    text_delta: str
    token_ids: list[int] = field(default_factory=list)  # the new tokens behind text_delta
    finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled"
    stats: RequestStats | None = None  # with the final event
    error: str | None = None
