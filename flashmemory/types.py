"""Request-level messages shared by the engine, the decode loop and (later) the Ray actors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
    # where the time before decoding went (seconds; the first token comes from the prefill's
    # logits, so TTFT holds the prefill, and the admission's selection and transfer are what the
    # second token waits for)
    prefill_s: float = 0.0  # the prefill's compute
    selection_s: float = 0.0  # choosing resident sets, summed over re-predictions
    transfer_s: float = 0.0  # moving chunks into the decode pool, summed over re-predictions
    admission_s: float = 0.0  # selection + transfer of the first working set (step 0)
    transfers: int = 0  # batched chunk fetches (one transport message each)


@dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    mode: str
    stats: RequestStats


def tokenize_prompt(tokenizer: Any, prompt: str | Messages, chat: bool, max_model_len: int,
                    query_chars: int = 400) -> Prompt:
    """Apply the chat template (chat=True) and tokenize with character offsets.

    The query base for the indexer is the final user turn's tail (or the raw prompt's tail).
    Raises ValueError for an empty prompt and PromptTooLongError when it does not fit.
    """
    if chat:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        users = [m["content"] for m in messages if m.get("role") == "user"]
        query_src = users[-1] if users else text
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        if not isinstance(prompt, str):
            raise ValueError("raw prompts must be strings; use chat for message lists")
        text, query_src = prompt, prompt
        enc = tokenizer(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise PromptTooLongError(f"the prompt has {len(ids)} tokens but the model's context "
                                 f"is {max_model_len} tokens")
    return Prompt(ids, [tuple(o) for o in enc["offset_mapping"]], text, query_src[-query_chars:])
