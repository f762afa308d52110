"""The evaluation suites' prompts and scorers: each suite turns its inputs into ``(NiahSample,
Prompt)`` pairs fitted to the requested lengths, and scores a prediction. Called by
``flashmemory.evaluation.runner``; the generators and loaders live in one module per benchmark.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flashmemory.evaluation import longbench, longmemeval
from flashmemory.evaluation.niah import (
    NiahSample,
    generate_niah,
    render_prompt,
    score_string_match_all,
)
from flashmemory.evaluation.ruler import TASKS as RULER_TASKS
from flashmemory.evaluation.ruler import QaDataMissing, generate_ruler
from flashmemory.evaluation.ruler import score as ruler_score
from flashmemory.types import Prompt, PromptTooLongError

if TYPE_CHECKING:
    from flashmemory.evaluation.runner import EvalConfig

logger = logging.getLogger(__name__)

SUITES: tuple[str, ...] = ("ruler-niah", "ruler", "corpus", "longbench-v2", "longmemeval")
FILE_SUITES: tuple[str, ...] = ("longbench-v2", "longmemeval")  # read --data
QUERY_CHARS = 400  # the question sits at the end of the user turn
Plan = list[tuple[NiahSample, Prompt]]


def check_lengths(cfg: EvalConfig, max_model_len: int) -> None:
    """Every requested length must fit the model's context (prompt + generated tokens)."""
    over = [n for n in cfg.lengths if n > max_model_len]
    if over:
        raise PromptTooLongError(f"length {over[0]} exceeds the model's context of "
                                 f"{max_model_len} tokens")


def tokens_for(cfg: EvalConfig, sample: NiahSample) -> int:
    """Tokens to generate: --max-tokens, else the benchmark's own count (64 for our NIAH)."""
    if cfg.max_tokens is not None:
        return cfg.max_tokens
    if cfg.suite == "ruler":
        return RULER_TASKS[sample.key].tokens_to_generate
    if cfg.suite == "longbench-v2":
        return longbench.TOKENS_TO_GENERATE
    if cfg.suite == "longmemeval":
        return longmemeval.TOKENS_TO_GENERATE
    return 64  # a UUID answer alone is ~37 SmolLM2 tokens


def score(cfg: EvalConfig, judge: Any, sample: NiahSample, prediction: str) -> float:
    if cfg.suite == "ruler":
        return ruler_score(sample.key, prediction, sample.answers)
    if cfg.suite == "longbench-v2":
        return longbench.score(prediction, sample.answers)
    if cfg.suite == "longmemeval":
        return longmemeval.score(judge, sample, prediction)
    return score_string_match_all(prediction, sample.answers)


def build_plan(llm: Any, cfg: EvalConfig) -> Plan:
    """All prompts of the run, tokenized; bad lengths or files fail here, before any decoding."""
    chat = bool(getattr(llm.tokenizer, "chat_template", None))
    if cfg.suite == "corpus":
        return _corpus_plan(llm, cfg, chat)
    if cfg.suite == "ruler":
        return _ruler_plan(llm, cfg, chat)
    if cfg.suite in FILE_SUITES:
        return _file_plan(llm, cfg, chat)
    plan = []
    for length in cfg.lengths:
        samples = generate_niah(llm.tokenizer, length=length, num_samples=cfg.samples,
                                seed=cfg.seed, value_kinds=cfg.value_kinds,
                                num_distractors=cfg.distractors,
                                tokens_to_generate=cfg.max_tokens or 64, use_chat_template=chat)
        plan.extend((s, tokenize_sample(llm, s, chat)) for s in samples)
    need = max(len(llm.tokenizer.encode(" " + a, add_special_tokens=False))
               for s, _ in plan for a in s.answers)
    if need >= (cfg.max_tokens or 64):
        logger.warning("answers need up to %d tokens but max_tokens is %d: some samples cannot "
                       "score (raise --max-tokens)", need, cfg.max_tokens or 64)
    return plan


def _ruler_plan(llm: Any, cfg: EvalConfig, chat: bool) -> Plan:
    """RULER's tasks at every length; a QA task without its dataset file is skipped with a
    warning (the summary lists it)."""
    plan = []
    for length in cfg.lengths:
        for task in cfg.tasks or tuple(RULER_TASKS):
            try:
                samples = generate_ruler(llm.tokenizer, task, length, cfg.samples,
                                         seed=cfg.seed, sources=cfg.ruler,
                                         use_chat_template=chat)
            except QaDataMissing as e:
                if length == cfg.lengths[0]:
                    logger.warning("RULER %s skipped: %s", task, e)
                continue
            plan.extend((s, tokenize_sample(llm, s, chat)) for s in samples)
    if not plan:
        raise ValueError("no RULER task could run (the QA tasks need --squad / --hotpotqa)")
    return plan


def _file_plan(llm: Any, cfg: EvalConfig, chat: bool) -> Plan:
    """LongBench-v2 / LongMemEval items from ``--data``: the first ``samples`` (0: all), each
    fitted to every length (middle truncation / oldest sessions dropped)."""
    assert cfg.data is not None
    limit = cfg.samples or None
    if cfg.suite == "longbench-v2":
        items: list[Any] = longbench.load_longbench_v2(Path(cfg.data), limit)
        make: Any = longbench.make_samples
    else:
        items, make = longmemeval.load_longmemeval(Path(cfg.data), limit), \
            longmemeval.make_samples
    if not items:
        raise ValueError(f"{cfg.data} holds no items")
    plan = []
    for length in cfg.lengths:
        plan.extend((s, tokenize_sample(llm, s, chat))
                    for s in make(llm.tokenizer, items, length, use_chat_template=chat))
    return plan


def _corpus_plan(llm: Any, cfg: EvalConfig, chat: bool) -> Plan:
    """Corpus documents as samples: context cut to fit max(lengths) minus the answer, scored
    by string_match_all over the answer's "; "-separated parts."""
    from flashmemory.indexer.corpus import read_corpus
    from flashmemory.indexer.labels import fit_prompt

    assert cfg.corpus is not None
    docs = read_corpus(Path(cfg.corpus), cfg.split)[: cfg.samples]
    if not docs:
        raise ValueError(f"{cfg.corpus} has no documents in split {cfg.split!r}")
    plan = []
    for doc in docs:
        msgs = fit_prompt(llm, doc, max(cfg.lengths) - (cfg.max_tokens or 64))
        sample = NiahSample(doc.doc_id, msgs[0]["content"], "", tuple(doc.answer.split("; ")),
                            doc.family, 0.0, doc.family, max(cfg.lengths), 0, (0, 0))
        prompt = tokenize_sample(llm, sample, chat)
        plan.append((replace(sample, num_tokens=len(prompt.token_ids)), prompt))
    return plan


def tokenize_sample(llm: Any, sample: NiahSample, chat: bool) -> Prompt:
    """Rendered prompt -> Prompt; chat-template text already holds its special tokens."""
    text = render_prompt(llm.tokenizer, sample.context, sample.answer_prefix,
                         use_chat_template=chat)
    enc = llm.tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if len(ids) >= llm.max_model_len:
        raise PromptTooLongError(f"{sample.sample_id} has {len(ids)} tokens but the model's "
                                 f"context is {llm.max_model_len} tokens")
    if sample.num_tokens and len(ids) != sample.num_tokens:
        logger.warning("%s: %d prompt tokens, generator counted %d", sample.sample_id, len(ids),
                       sample.num_tokens)
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    return Prompt(ids, offsets, text, sample.context[-QUERY_CHARS:])
