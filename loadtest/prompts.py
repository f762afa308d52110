"""Prompt sets for load tests: needle-in-a-haystack chats of given context lengths (token counts
measured with the served model's tokenizer), written as JSON lines that the locustfile reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flashmemory.evaluation.niah import generate_niah


def build_prompts(tokenizer: Any, lengths: Sequence[int], per_length: int, max_tokens: int,
                  seed: int = 0) -> list[dict[str, Any]]:
    """``per_length`` chats for each context length; each fits ``length`` with ``max_tokens``."""
    rows = []
    for length in lengths:
        for s in generate_niah(tokenizer, length=length, num_samples=per_length, seed=seed,
                               tokens_to_generate=max_tokens):
            rows.append({"id": s.sample_id, "context_tokens": s.num_tokens,
                         "messages": [{"role": "user", "content": s.context}],
                         "answers": list(s.answers)})
    return rows


def write_prompts(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_prompts(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no prompts")
    for i, r in enumerate(rows):
        if not isinstance(r.get("messages"), list) or not r["messages"]:
            raise ValueError(f"{path}: line {i + 1} has no 'messages' list")
    return rows
