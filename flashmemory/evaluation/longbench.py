"""LongBench-v2 (Bai et al., 2024): loader for its data.json, the official 0-shot prompt and middle
truncation, answer extraction and scoring; used by ``flashmemory.evaluation.runner`` (suite
``longbench-v2``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashmemory.evaluation.niah import NiahSample, render_prompt

TOKENS_TO_GENERATE: int = 128  # pred.py's max_new_tokens without chain of thought
GROUPS: tuple[str, ...] = ("easy", "hard", "short", "medium", "long")

_DIFFICULTIES = ("easy", "hard")
_LENGTHS = ("short", "medium", "long")
_LETTERS = ("A", "B", "C", "D")
_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question",
           "choice_A", "choice_B", "choice_C", "choice_D", "answer", "context")

# prompts/0shot.txt of THUDM/LongBench, verbatim (the file has no trailing newline).
_TEMPLATE_0SHOT = (
    "Please read the following text and answer the question below.\n"
    "\n"
    "<text>\n"
    "$DOC$\n"
    "</text>\n"
    "\n"
    "What is the correct answer to this question: $Q$\n"
    "Choices:\n"
    "(A) $C_A$\n"
    "(B) $C_B$\n"
    "(C) $C_C$\n"
    "(D) $C_D$\n"
    "\n"
    'Format your response as follows: "The correct answer is (insert answer here)".'
)

_ANSWER_PAREN = re.compile(r"The correct answer is \(([A-D])\)")
_ANSWER_BARE = re.compile(r"The correct answer is ([A-D])")


@dataclass(frozen=True)
class LongBenchItem:
    """One multiple-choice question of LongBench-v2 (fields of data.json; `id` is `_id`)."""

    id: str
    domain: str
    sub_domain: str
    difficulty: str  # "easy" | "hard"
    length: str  # "short" | "medium" | "long"
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    context: str


def load_longbench_v2(path: Path, limit: int | None = None) -> list[LongBenchItem]:
    """The first `limit` (all if None) items of LongBench-v2's data.json, validated."""
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not path.is_file():
        raise FileNotFoundError(f"LongBench-v2 data file {path} not found (data.json of the "
                                "THUDM/LongBench-v2 dataset)")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of items, got {type(rows).__name__}")
    return [_parse_item(path, i, row) for i, row in enumerate(rows[:limit])]


def _parse_item(path: Path, index: int, row: Any) -> LongBenchItem:
    where = f"{path}: item {index}"
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not an object")
    for name in _FIELDS:
        if name not in row:
            raise ValueError(f"{where} lacks field {name!r}")
        if not isinstance(row[name], str):
            raise ValueError(f"{where}: field {name!r} is not a string")
    checks = (("answer", _LETTERS), ("difficulty", _DIFFICULTIES), ("length", _LENGTHS))
    for name, allowed in checks:
        if row[name] not in allowed:
            raise ValueError(f"{where}: field {name!r} is {row[name]!r}, expected one of "
                             f"{', '.join(allowed)}")
    return LongBenchItem(
        id=row["_id"], domain=row["domain"], sub_domain=row["sub_domain"],
        difficulty=row["difficulty"], length=row["length"], question=row["question"],
        choices=(row["choice_A"], row["choice_B"], row["choice_C"], row["choice_D"]),
        answer=row["answer"], context=row["context"],
    )


def build_prompt(item: LongBenchItem) -> str:
    """The official 0-shot user message (before truncation and chat template)."""
    # Chained replacements in pred.py's order, so that text holding a placeholder renders as the
    # reference renders it.
    prompt = _TEMPLATE_0SHOT.replace("$DOC$", item.context.strip())
    prompt = prompt.replace("$Q$", item.question.strip())
    for letter, choice in zip(_LETTERS, item.choices, strict=True):
        prompt = prompt.replace(f"$C_{letter}$", choice.strip())
    return prompt


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> str:
    """`text` unchanged if it has at most `max_tokens` tokens, else its first max_tokens//2 and
    last tokens (max_tokens in all) decoded back to text, as pred.py's query_llm does."""
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    head = max_tokens // 2
    # pred.py slices ids[-max_len//2:], i.e. (-max_len)//2: the tail takes the odd token.
    tail = max_tokens - head
    kept = ids[:head] + (ids[len(ids) - tail:] if tail else [])
    return tokenizer.decode(kept, skip_special_tokens=True)


def make_samples(
    tokenizer: Any, items: Iterable[LongBenchItem], length: int, *, use_chat_template: bool = True
) -> list[NiahSample]:
    """Items as prompts whose exact rendered token count plus TOKENS_TO_GENERATE fits `length`."""
    budget = length - TOKENS_TO_GENERATE
    overhead = _count(tokenizer, "", use_chat_template)
    if budget - overhead <= 0:
        raise ValueError(f"length {length} leaves no room for a prompt: {TOKENS_TO_GENERATE} "
                         f"tokens to generate and {overhead} of template")
    return [_fit_item(tokenizer, item, length, budget - overhead, use_chat_template)
            for item in items]


def _count(tokenizer: Any, message: str, use_chat_template: bool) -> int:
    text = render_prompt(tokenizer, message, "", use_chat_template=use_chat_template)
    # Chat templates render their own special tokens; plain prompts get the tokenizer's BOS etc.
    return len(tokenizer.encode(text, add_special_tokens=not use_chat_template))


def _fit_item(
    tokenizer: Any, item: LongBenchItem, length: int, room: int, use_chat_template: bool
) -> NiahSample:
    budget = length - TOKENS_TO_GENERATE
    prompt = build_prompt(item)
    limit = room
    while limit > 0:
        message = truncate_middle(tokenizer, prompt, limit)
        tokens = _count(tokenizer, message, use_chat_template)
        if tokens <= budget:
            return NiahSample(
                sample_id=item.id, context=message, answer_prefix="", answers=(item.answer,),
                key=item.domain, depth=0.0, value_kind=item.sub_domain, length=length,
                num_tokens=tokens, needle_char_span=(0, 0), tags=(item.difficulty, item.length),
                question=item.question,
            )
        # Decoding a cut can merge tokens differently on re-encoding, and the template's count
        # is not additive at the seam; shrink by the overshoot and measure again.
        limit -= tokens - budget
    raise ValueError(f"item {item.id}: no truncation fits length {length}")


def extract_answer(response: str) -> str | None:
    """The chosen letter as pred.py reads it: markdown `*` removed, `(X)` form first, then bare."""
    response = response.replace("*", "")
    for pattern in (_ANSWER_PAREN, _ANSWER_BARE):
        match = pattern.search(response)
        if match:
            return match.group(1)
    return None


def score(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the extracted letter is the gold letter (`answers`, normally one), else 0.0;
    LongBench-v2 reports the mean x 100 overall and per group of GROUPS."""
    if isinstance(answers, str) or not answers:
        raise ValueError("answers must be a non-empty sequence of letters")
    return float(extract_answer(prediction) in answers)
