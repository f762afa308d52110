"""OpenAI-compatible request/response schemas (pydantic) with FlashMemory's LSA extensions.

Used by the Serve ingress (``cluster.serve_app``). Unknown fields are accepted and ignored, as
OpenAI-compatible servers usually do; values out of range are 400s with OpenAI-style bodies.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class _Common(_Lenient):
    model: str
    max_tokens: int | None = Field(default=None, description="default: 256")
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: int = 1
    stream: bool = False
    ignore_eos: bool = False
    # LSA extensions
    kv_budget: float | None = Field(default=None, gt=0, le=1,
                                    description="fraction of prompt chunks kept, in (0, 1]")
    lsa_mode: Literal["full", "lsa", "recency", "random"] | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str


def openapi_request(model: type[BaseModel]) -> dict[str, Any]:
    """An ``openapi_extra`` documenting ``model`` as a route's JSON body. The routes read the body
    themselves (size and time limits come first), so FastAPI would not list it; nested models
    are inlined, so the schema stands alone (schema-driven fuzzing reads it)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return inline(defs[ref.rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline(schema)}}}}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(stats: Any) -> dict[str, Any]:
    """OpenAI usage plus the LSA measures."""
    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "kv_footprint_mean": stats.kv_footprint_mean,
        "kv_footprint_peak": stats.kv_footprint_peak,
        "kv_bytes_transferred": stats.kv_bytes_transferred,
        "transfer_ratio": stats.transfer_ratio,
        "chunks_selected": stats.chunks_selected,
        "prefill_s": stats.prefill_s,
        "selection_s": stats.selection_s,
        "transfer_s": stats.transfer_s,
        "admission_s": stats.admission_s,
        "transfers": stats.transfers,
    }


def now() -> int:
    return int(time.time())
