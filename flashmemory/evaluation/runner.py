"""Evaluation runner: benchmark prompts through ``LLM.run_modes`` (one prefill, every mode), scored
rows written incrementally to ``results.parquet`` and a per length × mode ``summary.md``.
Suites: ``ruler-niah`` (the project's NIAH), ``ruler`` (RULER's 13 tasks,
``flashmemory.evaluation.ruler``), ``corpus`` (documents of a corpus Parquet).

Called by ``flashmemory eval`` (``flashmemory.cli``) and the integration tests.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from flashmemory.config import MODES, LSAConfig, SamplingParams
from flashmemory.evaluation.niah import (
    VALUE_KINDS,
    NiahSample,
    generate_niah,
    render_prompt,
    score_string_match_all,
)
from flashmemory.evaluation.ruler import TASKS as RULER_TASKS
from flashmemory.evaluation.ruler import (
    QaDataMissing,
    RulerSources,
    generate_ruler,
)
from flashmemory.evaluation.ruler import score as ruler_score
from flashmemory.types import Prompt, PromptTooLongError, RequestOutput

if TYPE_CHECKING:
    from flashmemory.engine import LLM

logger = logging.getLogger(__name__)

SUITES: tuple[str, ...] = ("ruler-niah", "ruler", "corpus")
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.md"
QUERY_CHARS = 400  # the question sits at the end of the user turn

SCHEMA = pa.schema([
    ("suite", pa.string()),
    ("length", pa.int64()),
    ("sample_id", pa.string()),
    ("depth", pa.float64()),
    ("value_kind", pa.string()),
    ("task", pa.string()),  # RULER task; the value kind for ruler-niah; the family for corpus
    ("mode", pa.string()),
    ("budget", pa.float64()),  # fraction of prompt chunks; null for full or a token budget
    ("budget_tokens", pa.int64()),
    ("score", pa.float64()),
    ("prediction", pa.string()),
    ("answers", pa.list_(pa.string())),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("kv_footprint_mean", pa.float64()),
    ("kv_footprint_peak", pa.float64()),
    ("transfer_ratio", pa.float64()),
    ("kv_bytes_transferred", pa.int64()),
    ("chunks_selected", pa.float64()),
    ("ttft", pa.float64()),
    ("tpot", pa.float64()),
    ("e2e", pa.float64()),
])


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which prompts (suite, lengths, samples) and which LSA modes decode them."""

    out_dir: Path
    suite: str = "ruler-niah"
    lengths: tuple[int, ...] = (4096, 8192)
    modes: tuple[str, ...] = MODES
    samples: int = 5
    seed: int = 0
    lsa: LSAConfig = field(default_factory=LSAConfig)  # base settings; mode is set per run
    # tokens to generate; None: 64 (a UUID answer alone is ~37 SmolLM2 tokens), or for the
    # ruler suite each task's own count (niah 128, vt 30, cwe 120, fwe 50, qa 32)
    max_tokens: int | None = None
    value_kinds: tuple[str, ...] = VALUE_KINDS
    distractors: int = 3
    command: str = ""  # the invocation, recorded in summary.md
    corpus: Path | None = None  # suite "corpus": a corpus Parquet (flashmemory.indexer.corpus)
    split: str | None = "eval"  # ... and which of its splits to run
    tasks: tuple[str, ...] = ()  # suite ruler: which tasks (empty: all 13)
    ruler: RulerSources = field(default_factory=RulerSources)  # haystack text, QA datasets

    def __post_init__(self) -> None:
        for name in ("lengths", "modes", "value_kinds", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; choose one of {', '.join(SUITES)}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {list(self.lengths)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct names from {', '.join(MODES)}; "
                             f"got {','.join(self.modes)}")
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(RULER_TASKS)}")
        for name, path in (("haystack", self.ruler.haystack), ("squad", self.ruler.squad),
                           ("hotpotqa", self.ruler.hotpotqa)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name} {path}: no such file")
        kinds = [k for k in self.value_kinds if k not in VALUE_KINDS]
        if kinds or not self.value_kinds:
            raise ValueError(f"value kinds must be some of {', '.join(VALUE_KINDS)}; "
                             f"got {','.join(self.value_kinds)}")
        if self.suite == "corpus" and (self.corpus is None or not Path(self.corpus).exists()):
            raise ValueError(f"suite 'corpus' needs --corpus pointing at a corpus Parquet file, "
                             f"got {self.corpus}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")

    @property
    def new_tokens(self) -> int:
        """Tokens to generate for the ruler-niah and corpus suites."""
        return 64 if self.max_tokens is None else self.max_tokens

    def tokens_for(self, sample: NiahSample) -> int:
        if self.suite == "ruler" and self.max_tokens is None:
            return RULER_TASKS[sample.key].tokens_to_generate
        return self.new_tokens

    def score(self, sample: NiahSample, prediction: str) -> float:
        if self.suite == "ruler":
            return ruler_score(sample.key, prediction, sample.answers)
        return score_string_match_all(prediction, sample.answers)

    def mode_configs(self) -> list[LSAConfig]:
        return [replace(self.lsa, mode=m) for m in self.modes]  # type: ignore[arg-type]


@dataclass(frozen=True)
class EvalResult:
    rows: list[dict[str, Any]]
    results_path: Path
    summary_path: Path
    table: str  # the Markdown summary table


def check_lengths(cfg: EvalConfig, max_model_len: int) -> None:
    """Every requested length must fit the model's context (prompt + generated tokens)."""
    over = [n for n in cfg.lengths if n > max_model_len]
    if over:
        raise PromptTooLongError(f"length {over[0]} exceeds the model's context of "
                                 f"{max_model_len} tokens")


def run_eval(llm: LLM, cfg: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Run every sample of every length in all modes; rewrite results.parquet after each sample."""
    check_lengths(cfg, llm.max_model_len)
    plan = _plan(llm, cfg)  # all prompts first: bad lengths fail before any decoding
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = cfg.out_dir / RESULTS_FILE
    configs = cfg.mode_configs()
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(plan), desc=f"{cfg.suite}", unit="sample", file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    try:
        for sample, prompt in plan:
            sampling = SamplingParams(max_tokens=cfg.tokens_for(sample))
            outputs = llm.run_modes(prompt, sampling, configs)
            new = [_row(cfg, sample, lsa, out) for lsa, out in zip(configs, outputs, strict=True)]
            rows.extend(new)
            _write_rows(rows, results_path)
            scores = " ".join(f"{r['mode']}={r['score']:.2f}" for r in new)
            logger.info("%s (%d tokens): %s", sample.sample_id, len(prompt.token_ids), scores)
            bar.update(1)
    finally:
        bar.close()
    summary_path = cfg.out_dir / SUMMARY_FILE
    table = write_summary(rows, cfg, summary_path, model=llm.config.model)
    logger.info("wrote %s and %s", results_path, summary_path)
    return EvalResult(rows, results_path, summary_path, table)


def _plan(llm: LLM, cfg: EvalConfig) -> list[tuple[NiahSample, Prompt]]:
    chat = bool(getattr(llm.tokenizer, "chat_template", None))
    if cfg.suite == "corpus":
        return _corpus_plan(llm, cfg, chat)
    if cfg.suite == "ruler":
        return _ruler_plan(llm, cfg, chat)
    plan = []
    for length in cfg.lengths:
        samples = generate_niah(llm.tokenizer, length=length, num_samples=cfg.samples,
                                seed=cfg.seed, value_kinds=cfg.value_kinds,
                                num_distractors=cfg.distractors,
                                tokens_to_generate=cfg.new_tokens, use_chat_template=chat)
        plan.extend((s, tokenize_sample(llm, s, chat)) for s in samples)
    need = max(len(llm.tokenizer.encode(" " + a, add_special_tokens=False))
               for s, _ in plan for a in s.answers)
    if need >= cfg.new_tokens:
        logger.warning("answers need up to %d tokens but max_tokens is %d: some samples cannot "
                       "score (raise --max-tokens)", need, cfg.new_tokens)
    return plan


def _ruler_plan(llm: LLM, cfg: EvalConfig, chat: bool) -> list[tuple[NiahSample, Prompt]]:
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


def _corpus_plan(llm: LLM, cfg: EvalConfig, chat: bool) -> list[tuple[NiahSample, Prompt]]:
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
        msgs = fit_prompt(llm, doc, max(cfg.lengths) - cfg.new_tokens)
        sample = NiahSample(doc.doc_id, msgs[0]["content"], "", tuple(doc.answer.split("; ")),
                            doc.family, 0.0, doc.family, max(cfg.lengths), 0, (0, 0))
        prompt = tokenize_sample(llm, sample, chat)
        plan.append((replace(sample, num_tokens=len(prompt.token_ids)), prompt))
    return plan


def tokenize_sample(llm: LLM, sample: NiahSample, chat: bool) -> Prompt:
    """Rendered NIAH prompt -> Prompt; chat-template text already holds its special tokens."""
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


def _row(cfg: EvalConfig, sample: NiahSample, lsa: LSAConfig,
         out: RequestOutput) -> dict[str, Any]:
    st = out.stats
    sparse = lsa.mode != "full"
    return {
        "suite": cfg.suite, "length": sample.length, "sample_id": sample.sample_id,
        "depth": sample.depth, "value_kind": sample.value_kind,
        "task": sample.key if cfg.suite == "ruler" else sample.value_kind, "mode": lsa.mode,
        "budget": lsa.budget if sparse and lsa.budget_tokens is None else None,
        "budget_tokens": lsa.budget_tokens if sparse else None,
        "score": cfg.score(sample, out.text),
        "prediction": out.text, "answers": list(sample.answers),
        "finish_reason": out.finish_reason,
        "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
        "kv_footprint_mean": st.kv_footprint_mean, "kv_footprint_peak": st.kv_footprint_peak,
        "transfer_ratio": st.transfer_ratio, "kv_bytes_transferred": st.kv_bytes_transferred,
        "chunks_selected": st.chunks_selected, "ttft": st.ttft, "tpot": st.tpot, "e2e": st.e2e,
    }


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """Atomically replace the Parquet file with all rows so far (a crash loses one sample)."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)


# -- summary ------------------------------------------------------------------------------------
_COLUMNS = ("length", "mode", "n", "accuracy (%)", "Δ vs full", "KV mean (%)", "KV peak (%)",
            "transfer (%)", "TTFT (s)", "TPOT (ms)")


def _mean(rows: Sequence[dict[str, Any]], key: str) -> float:
    return sum(float(r[key]) for r in rows) / len(rows)


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One aggregate per (length, mode), in first-seen order; plus 'all' when several lengths."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["length"]), r["mode"]), []).append(r)
    if len({r["length"] for r in rows}) > 1:
        for r in rows:
            groups.setdefault(("all", r["mode"]), []).append(r)
    aggs = [{"length": length, "mode": mode, "n": len(g), "accuracy": 100 * _mean(g, "score"),
             "kv_mean": 100 * _mean(g, "kv_footprint_mean"),
             "kv_peak": 100 * _mean(g, "kv_footprint_peak"),
             "transfer": 100 * _mean(g, "transfer_ratio"),
             "ttft": _mean(g, "ttft"), "tpot": 1000 * _mean(g, "tpot")}
            for (length, mode), g in groups.items()]
    full = {a["length"]: a["accuracy"] for a in aggs if a["mode"] == "full"}
    for a in aggs:
        a["delta"] = a["accuracy"] - full[a["length"]] if a["length"] in full else None
    return aggs


def format_table(aggs: Sequence[dict[str, Any]]) -> str:
    """Markdown table of ``summarize`` output; the Δ column only when full was run."""
    with_delta = any(a["delta"] is not None for a in aggs)
    cols = [c for c in _COLUMNS if with_delta or c != "Δ vs full"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" for _ in cols) + "|"]
    for a in aggs:
        cells = [a["length"], a["mode"], str(a["n"]), f"{a['accuracy']:.1f}"]
        if with_delta:
            cells.append("—" if a["delta"] is None or a["mode"] == "full"
                         else f"{a['delta']:+.1f}")
        cells += [f"{a['kv_mean']:.1f}", f"{a['kv_peak']:.1f}", f"{a['transfer']:.1f}",
                  f"{a['ttft']:.2f}", f"{a['tpot']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(rows: Sequence[dict[str, Any]]) -> str:
    """RULER's view: accuracy (mean score x 100) per (length, task) and mode, plus each length's
    average over tasks (RULER's headline number)."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    cells: dict[tuple[str, str], dict[str, list[float]]] = {}
    for r in rows:
        cells.setdefault((str(r["length"]), r["task"]), {}).setdefault(r["mode"], []).append(
            float(r["score"]))
    lines = ["| length | task | n | " + " | ".join(modes) + " |",
             "|---:|---|---:|" + "|".join("---:" for _ in modes) + "|"]
    per_length: dict[str, dict[str, list[float]]] = {}
    for (length, task), by_mode in cells.items():
        accs = {m: 100 * sum(v) / len(v) for m, v in by_mode.items()}
        for m, a in accs.items():
            per_length.setdefault(length, {}).setdefault(m, []).append(a)
        n = len(next(iter(by_mode.values())))
        lines.append(f"| {length} | {task} | {n} | "
                     + " | ".join(f"{accs[m]:.1f}" if m in accs else "—" for m in modes) + " |")
    for length, by_mode in per_length.items():
        lines.append(f"| {length} | **average** | {len(next(iter(by_mode.values())))} tasks | "
                     + " | ".join(f"**{sum(by_mode[m]) / len(by_mode[m]):.1f}**"
                                  if m in by_mode else "—" for m in modes) + " |")
    return "\n".join(lines)


def write_summary(rows: Sequence[dict[str, Any]], cfg: EvalConfig, path: Path, *,
                  model: str) -> str:
    """Write summary.md (table, command, config, date); returns the Markdown table."""
    table = format_table(summarize(rows))
    if cfg.suite == "ruler":
        table += "\n\nPer task (RULER: string_match_all, qa string_match_part; × 100):\n\n"
        table += task_table(rows)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("command", "out_dir")}
    lines = [
        f"# {cfg.suite} — {model}",
        "",
        table,
        "",
        "Accuracy: mean score × 100 (string_match_all; RULER's qa tasks: string_match_part). "
        "KV: resident / full KV over decode steps. "
        "Transfer: bytes moved store → pool / bytes of all prompt chunks. "
        "TTFT/TPOT are measured inside one shared prefill and one batched decode of all modes.",
        "",
        f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"- model: `{model}`",
    ]
    if cfg.command:
        lines.append(f"- command: `{cfg.command}`")
    lines += [f"- config: `{json.dumps(config, default=str)}`", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return table
