"""Evaluation runner: a suite's prompts through ``run_modes`` (one prefill, every mode), each
sample's scored rows appended as one Parquet part (so a run resumes where it stopped), then
``results.parquet``, ``summary.md`` and plots. Suites: ``flashmemory.evaluation.suites``.

Called by ``flashmemory eval`` (``flashmemory.cli``), locally or through a running cluster
(``cluster.eval_backend``), and by the integration tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from flashmemory.config import MODES, LSAConfig, SamplingParams, mode_variant
from flashmemory.evaluation import report, suites
from flashmemory.evaluation.niah import VALUE_KINDS, NiahSample
from flashmemory.evaluation.ruler import TASKS as RULER_TASKS
from flashmemory.evaluation.ruler import RulerSources
from flashmemory.evaluation.suites import SUITES
from flashmemory.types import Prompt, RequestOutput

if TYPE_CHECKING:
    from flashmemory.engine import LLM

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.md"
PARTS_DIR = "parts"  # one Parquet file per finished sample (all its modes)
RUN_FILE = "run.json"  # what the parts were computed with; a resume must match it
PLOTS_DIR = "plots"

SCHEMA = pa.schema([
    ("suite", pa.string()),
    ("length", pa.int64()),
    ("sample_id", pa.string()),
    ("depth", pa.float64()),
    ("value_kind", pa.string()),
    ("task", pa.string()),  # RULER task; the value kind for ruler-niah; domain / question type
    ("tags", pa.list_(pa.string())),  # groups: LongBench-v2 difficulty + length, ...
    ("mode", pa.string()),  # the row label: a mode or a variant, e.g. "lsa:budget=0.05"
    ("method", pa.string()),  # the selector: full, lsa, recency, random, oracle, snapkv, quest
    ("indexer", pa.string()),  # mode lsa: the encoder (null: the engine's)
    ("budget", pa.float64()),  # fraction of prompt chunks; null for full or a token budget
    ("budget_tokens", pa.int64()),
    ("threshold", pa.float64()),  # score threshold (adaptive budget); null: fixed budget
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
class JudgeConfig:
    """LongMemEval's judge: an OpenAI-compatible endpoint, or the local fallback when unset."""

    url: str | None = None  # e.g. https://api.openai.com/v1
    model: str = "gpt-4o-2024-08-06"  # the judge of LongMemEval's official protocol
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this variable, never stored

    def build(self) -> Any:
        from flashmemory.evaluation import longmemeval

        if self.url is None:
            return longmemeval.LocalJudge()
        return longmemeval.OpenAIJudge(self.url, self.model, os.environ.get(self.api_key_env))


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation: which prompts (suite, lengths, samples) and which modes decode them."""

    out_dir: Path
    suite: str = "ruler-niah"
    lengths: tuple[int, ...] = (4096, 8192)
    # mode names, or variants MODE[:key=value]... (flashmemory.config.mode_variant); each is
    # one row label ("mode" in results.parquet)
    modes: tuple[str, ...] = ("full", "lsa", "recency", "random", "oracle")
    samples: int = 5  # per length (and RULER task); file suites: the first N items, 0 = all
    seed: int = 0
    lsa: LSAConfig = field(default_factory=LSAConfig)  # base settings of every mode
    max_tokens: int | None = None  # None: each benchmark's own count (suites.tokens_for)
    value_kinds: tuple[str, ...] = VALUE_KINDS
    distractors: int = 3
    command: str = ""  # the invocation, recorded in summary.md
    corpus: Path | None = None  # suite "corpus": a corpus Parquet (flashmemory.indexer.corpus)
    split: str | None = "eval"  # ... and which of its splits to run
    tasks: tuple[str, ...] = ()  # suite ruler: which tasks (empty: all 13)
    ruler: RulerSources = field(default_factory=RulerSources)  # haystack text, QA datasets
    data: Path | None = None  # suites longbench-v2 / longmemeval: the official JSON file
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # suite longmemeval
    concurrency: int = 1  # samples in flight (a cluster spreads them over decode workers)
    resume: bool = False  # keep the finished samples' parts in out_dir and run the rest

    def __post_init__(self) -> None:
        for name in ("lengths", "modes", "value_kinds", "tasks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.suite not in SUITES:
            raise ValueError(f"unknown suite {self.suite!r}; choose one of {', '.join(SUITES)}")
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise ValueError(f"lengths must be positive token counts, got {list(self.lengths)}")
        if not self.modes or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct names from {', '.join(MODES)} (or "
                             f"variants MODE:key=value); got {','.join(self.modes)}")
        self.mode_configs()  # every variant parses
        files = self.suite in suites.FILE_SUITES
        if self.samples < (0 if files else 1):
            raise ValueError(f"samples must be >= {0 if files else 1}, got {self.samples}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        unknown = [t for t in self.tasks if t not in RULER_TASKS]
        if unknown:
            raise ValueError(f"unknown RULER task(s) {', '.join(unknown)}; choose from "
                             f"{', '.join(RULER_TASKS)}")
        if self.ruler.haystack is not None and not Path(self.ruler.haystack).exists():
            raise ValueError(f"--haystack {self.ruler.haystack}: no such file or directory")
        for name, path in (("squad", self.ruler.squad), ("hotpotqa", self.ruler.hotpotqa),
                           ("data", self.data)):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"--{name} {path}: no such file")
        if files and self.data is None:
            raise ValueError(f"suite {self.suite!r} needs --data pointing at its official JSON "
                             "file (see docs/EVALUATION.md)")
        kinds = [k for k in self.value_kinds if k not in VALUE_KINDS]
        if kinds or not self.value_kinds:
            raise ValueError(f"value kinds must be some of {', '.join(VALUE_KINDS)}; "
                             f"got {','.join(self.value_kinds)}")
        if self.suite == "corpus" and (self.corpus is None or not Path(self.corpus).exists()):
            raise ValueError(f"suite 'corpus' needs --corpus pointing at a corpus Parquet file, "
                             f"got {self.corpus}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")

    def mode_configs(self) -> list[LSAConfig]:
        return [mode_variant(m, self.lsa) for m in self.modes]

    def identity(self) -> dict[str, Any]:
        """What finished samples depend on (a resumed run must match; samples may grow)."""
        skip = ("out_dir", "command", "samples", "concurrency", "resume")
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in skip},
                                     default=str))


@dataclass(frozen=True)
class EvalResult:
    rows: list[dict[str, Any]]
    results_path: Path
    summary_path: Path
    table: str  # the Markdown summary tables


def run_eval(llm: LLM | Any, cfg: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Run every sample in all modes, a part file per sample; then results, summary and plots.

    ``llm`` is the engine or anything with its ``tokenizer``, ``max_model_len``, ``config`` and
    ``run_modes``; with ``run_batch`` too (the cluster backend) ``cfg.concurrency`` samples run
    at once.
    """
    suites.check_lengths(cfg, llm.max_model_len)
    configs = cfg.mode_configs()
    if hasattr(llm, "check"):  # the cluster refuses modes it cannot run, before any work
        llm.check(configs)
    plan = suites.build_plan(llm, cfg)  # all prompts first: bad inputs fail before decoding
    parts = _open_parts(cfg, llm.config.model)
    todo = [(s, p) for s, p in plan if not (parts / _part_name(s)).exists()]
    if len(todo) < len(plan):
        logger.info("resuming: %d of %d samples already done", len(plan) - len(todo), len(plan))
    judge = cfg.judge.build() if cfg.suite == "longmemeval" else None
    width = cfg.concurrency if hasattr(llm, "run_batch") else 1
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=cfg.suite, unit="sample",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)
    try:
        for i in range(0, len(todo), width):
            batch = todo[i:i + width]
            for (sample, _), outputs in zip(batch, _decode(llm, cfg, batch, configs), strict=True):
                rows = [_row(cfg, judge, sample, label, lsa, out) for label, lsa, out
                        in zip(cfg.modes, configs, outputs, strict=True)]
                _write(rows, parts / _part_name(sample))
                logger.info("%s: %s", sample.sample_id,
                            " ".join(f"{r['mode']}={r['score']:.2f}" for r in rows))
                bar.update(1)
    finally:
        bar.close()
    return finish(cfg, [s for s, _ in plan], model=llm.config.model)


def _decode(llm: Any, cfg: EvalConfig, batch: list[tuple[NiahSample, Prompt]],
            configs: list[LSAConfig]) -> list[list[RequestOutput]]:
    items = [(p, SamplingParams(max_tokens=suites.tokens_for(cfg, s)), configs) for s, p in batch]
    if len(items) > 1:
        return llm.run_batch(items)
    return [llm.run_modes(*items[0])]


def finish(cfg: EvalConfig, samples: Sequence[NiahSample], *, model: str) -> EvalResult:
    """Gather the parts of ``samples`` (in plan order) into results.parquet, summary and plots."""
    parts = cfg.out_dir / PARTS_DIR
    rows = [r for s in samples for r in pq.read_table(parts / _part_name(s)).to_pylist()]
    results_path = cfg.out_dir / RESULTS_FILE
    _write(rows, results_path)
    summary_path = cfg.out_dir / SUMMARY_FILE
    table = report.write_summary(rows, cfg, summary_path, model=model)
    report.plot(rows, cfg.out_dir / PLOTS_DIR)
    logger.info("wrote %s, %s and %s/", results_path, summary_path, cfg.out_dir / PLOTS_DIR)
    return EvalResult(rows, results_path, summary_path, table)


def _open_parts(cfg: EvalConfig, model: str) -> Path:
    """The parts directory: checked against run.json when resuming, emptied otherwise."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    parts, run_file = cfg.out_dir / PARTS_DIR, cfg.out_dir / RUN_FILE
    now = {**cfg.identity(), "model": model}
    if cfg.resume and run_file.exists():
        before = json.loads(run_file.read_text())
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise ValueError(f"cannot resume {cfg.out_dir}: it was run with different "
                             f"{', '.join(diff)} (start a new --out, or --overwrite)")
    elif parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(exist_ok=True)
    run_file.write_text(json.dumps(now, indent=1))
    return parts


def _part_name(sample: NiahSample) -> str:
    key = f"{sample.length}\0{sample.sample_id}".encode()
    return f"part-{hashlib.sha1(key).hexdigest()[:20]}.parquet"


def _row(cfg: EvalConfig, judge: Any, sample: NiahSample, label: str, lsa: LSAConfig,
         out: RequestOutput) -> dict[str, Any]:
    st = out.stats
    sparse = lsa.mode != "full"
    return {
        "suite": cfg.suite, "length": sample.length, "sample_id": sample.sample_id,
        "depth": sample.depth, "value_kind": sample.value_kind,
        "task": sample.value_kind if cfg.suite == "ruler-niah" else sample.key,
        "tags": list(sample.tags), "mode": label, "method": lsa.mode,
        "indexer": lsa.indexer if lsa.mode == "lsa" else None,
        "budget": lsa.budget if sparse and lsa.budget_tokens is None else None,
        "budget_tokens": lsa.budget_tokens if sparse else None,
        "threshold": lsa.threshold if sparse else None,
        "score": suites.score(cfg, judge, sample, out.text),
        "prediction": out.text, "answers": list(sample.answers),
        "finish_reason": out.finish_reason,
        "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
        "kv_footprint_mean": st.kv_footprint_mean, "kv_footprint_peak": st.kv_footprint_peak,
        "transfer_ratio": st.transfer_ratio, "kv_bytes_transferred": st.kv_bytes_transferred,
        "chunks_selected": st.chunks_selected, "ttft": st.ttft, "tpot": st.tpot, "e2e": st.e2e,
    }


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    """Atomically write ``rows`` as one Parquet file (a crash leaves no half-written part)."""
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
    os.replace(tmp, path)
