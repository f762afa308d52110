"""FlashMemory: Lookahead Sparse Attention serving for ultra-long-context LLM inference."""

from __future__ import annotations

from flashmemory.config import EngineConfig, LSAConfig, SamplingParams
from flashmemory.engine import LLM
from flashmemory.types import RequestOutput, RequestStats

__all__ = ["LLM", "EngineConfig", "LSAConfig", "RequestOutput", "RequestStats", "SamplingParams"]
