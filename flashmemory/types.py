"""Request-level messages shared by the engine, the decode loop and (later) the Ray actors."""

from __future__ import annotations

from dataclasses import dataclass

Messages = list[dict[str, str]]


class PromptTooLongError(ValueError):
    """The prompt does not fit the model's context."""


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt with each token's character span and the indexer's query text."""

    token_ids: list[int]
    offsets: list[tuple[int, int]]
    text: str
    query: str  # the final user turn's tail (or the raw prompt's tail)


@dataclass
class RequestStats:
    """Per-request measures (definitions in docs/ARCHITECTURE.md and DESIGN section 4)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    num_prompt_chunks: int = 0
    kv_footprint_mean: float = 0.0  # resident KV / full KV, mean over decode steps
    kv_footprint_peak: float = 0.0
    kv_bytes_transferred: int = 0  # chunk bytes moved store -> decode pool
    transfer_ratio: float = 0.0  # kv_bytes_transferred / bytes of all prompt chunks
    chunks_selected: float = 0.0  # selected chunks per re-prediction (mean; excl. sink/tail)
    repredictions: int = 0
    ttft: float = 0.0  # seconds
    tpot: float = 0.0  # seconds per output token after the first
    e2e: float = 0.0


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    mode: str
    stats: RequestStats
