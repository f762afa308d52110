"""Integration tests of the evaluation runner against the real SmolLM2 engine (CPU, ~1 min).

One LLM and one small NIAH run (1024 tokens, 2 samples, full/lsa/recency) shared by the module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyarrow.parquet as pq

from flashmemory.config import LSAConfig
from flashmemory.engine import LLM
from flashmemory.evaluation.niah import generate_niah
from flashmemory.evaluation.report import format_table, summarize
from flashmemory.evaluation.runner import SCHEMA, EvalConfig, EvalResult, run_eval
from flashmemory.evaluation.suites import build_plan, check_lengths, tokenize_sample
from flashmemory.types import PromptTooLongError

MODES = ("full", "lsa", "recency")


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model="smollm2-135m-instruct")


@pytest.fixture(scope="module")
def result(llm: LLM, tmp_path_factory: pytest.TempPathFactory) -> EvalResult:
    cfg = EvalConfig(out_dir=tmp_path_factory.mktemp("eval"), lengths=(1024,), modes=MODES,
                     samples=2, max_tokens=16, value_kinds=("numbers",),
                     lsa=LSAConfig(budget=0.1, chunk_size=64),
                     command="pytest")
    return run_eval(llm, cfg, progress=False)


def test_parquet_rows_and_schema(result: EvalResult) -> None:
    table = pq.read_table(result.results_path)
    assert table.num_rows == 2 * len(MODES) == len(result.rows)
    assert table.schema.names == SCHEMA.names
    rows = table.to_pylist()
    assert sorted({r["mode"] for r in rows}) == sorted(MODES)
    assert len({r["sample_id"] for r in rows}) == 2
    assert not list(result.results_path.parent.glob("*.tmp"))
    for r in rows:
        assert r["length"] == 1024 and r["suite"] == "ruler-niah"
        assert 0.0 <= r["score"] <= 1.0 and r["answers"]
        assert 0 < r["prompt_tokens"] <= 1024 - 16
        assert 1 <= r["completion_tokens"] <= 16
        assert r["ttft"] > 0 and r["tpot"] >= 0
        assert (r["budget"] is None) == (r["mode"] == "full")


def test_modes_share_one_prompt(result: EvalResult) -> None:
    by_sample: dict[str, set[int]] = {}
    for r in result.rows:
        by_sample.setdefault(r["sample_id"], set()).add(r["prompt_tokens"])
    assert all(len(v) == 1 for v in by_sample.values())


def test_footprints(result: EvalResult) -> None:
    def mean(mode: str, key: str) -> float:
        vals = [r[key] for r in result.rows if r["mode"] == mode]
        return sum(vals) / len(vals)

    assert mean("full", "kv_footprint_mean") == pytest.approx(1.0)
    assert mean("full", "transfer_ratio") == pytest.approx(1.0)
    for mode in ("lsa", "recency"):
        assert 0.0 < mean(mode, "kv_footprint_mean") < mean("full", "kv_footprint_mean")
        assert mean(mode, "kv_footprint_peak") < 1.0
        assert 0.0 < mean(mode, "transfer_ratio") < 1.0


def test_summary(result: EvalResult) -> None:
    text = result.summary_path.read_text()
    assert result.table in text and "Δ vs full" in text and "- command: `pytest`" in text
    table_rows = result.table.split("\n\n")[0].splitlines()[2:]
    assert len(table_rows) == len(MODES)
    for mode, line in zip(MODES, table_rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == ["1024", mode, "2"]
        assert cells[4] == "—" if mode == "full" else cells[4][0] in "+-"


def test_prompt_has_no_duplicated_special_tokens(llm: LLM) -> None:
    sample = generate_niah(llm.tokenizer, length=512, num_samples=1, tokens_to_generate=16)[0]
    prompt = tokenize_sample(llm, sample, chat=True)
    assert len(prompt.token_ids) == sample.num_tokens
    assert prompt.text.endswith(sample.answer_prefix)
    start = llm.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert prompt.token_ids[0] == start and prompt.token_ids[1] != start
    assert "What is the special magic" in prompt.query and len(prompt.query) <= 400
    assert len(prompt.offsets) == len(prompt.token_ids)


def test_warns_when_answers_cannot_fit(llm: LLM, tmp_path: Path,
                                       caplog: pytest.LogCaptureFixture) -> None:
    cfg = EvalConfig(out_dir=tmp_path, lengths=(512,), samples=2, max_tokens=16)
    with caplog.at_level(logging.WARNING, logger="flashmemory.evaluation.suites"):
        plan = build_plan(llm, cfg)
    assert len(plan) == 2 and "raise --max-tokens" in caplog.text
    assert not list(tmp_path.iterdir())


def test_too_long_length_fails_before_work(llm: LLM, tmp_path: Path) -> None:
    cfg = EvalConfig(out_dir=tmp_path / "out", lengths=(1024, 2 * llm.max_model_len), samples=1)
    with pytest.raises(PromptTooLongError, match="exceeds the model's context"):
        run_eval(llm, cfg, progress=False)
    assert not (tmp_path / "out").exists()
    check_lengths(EvalConfig(out_dir=tmp_path, lengths=(llm.max_model_len,)), llm.max_model_len)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"suite": "mmlu"}, "unknown suite"),
    ({"modes": ("full", "fast")}, "unknown mode 'fast'"),
    ({"modes": ("full", "lsa:budget=x")}, "bad value 'x' for budget"),
    ({"modes": ("lsa:speed=2",)}, "bad mode option"),
    ({"modes": ("recency:indexer=x",)}, "only mode lsa takes an indexer"),
    ({"suite": "longbench-v2"}, "needs --data"),
    ({"suite": "longmemeval", "data": "/nonexistent.json"}, "no such file"),
    ({"concurrency": 0}, "concurrency must be"),
    ({"modes": ("full", "full")}, "modes must be"),
    ({"samples": 0}, "samples must be"),
    ({"lengths": ()}, "lengths must be"),
    ({"value_kinds": ("words",)}, "value kinds"),
])
def test_config_validation(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EvalConfig(out_dir=tmp_path, **kwargs)


def test_summary_math_without_model() -> None:
    def row(length: int, mode: str, score: float, fp: float) -> dict[str, Any]:
        return {"length": length, "mode": mode, "score": score, "kv_footprint_mean": fp,
                "kv_footprint_peak": fp, "transfer_ratio": fp, "ttft": 1.0, "tpot": 0.02}

    rows = [row(1024, "full", 1.0, 1.0), row(1024, "lsa", 0.0, 0.2), row(1024, "full", 1.0, 1.0),
            row(1024, "lsa", 1.0, 0.3), row(2048, "full", 0.0, 1.0), row(2048, "lsa", 1.0, 0.1)]
    aggs = {(a["length"], a["mode"]): a for a in summarize(rows)}
    assert aggs[("1024", "lsa")]["accuracy"] == pytest.approx(50.0)
    assert aggs[("1024", "lsa")]["delta"] == pytest.approx(-50.0)
    assert aggs[("2048", "lsa")]["delta"] == pytest.approx(100.0)
    assert aggs[("all", "lsa")]["n"] == 3
    assert aggs[("1024", "lsa")]["kv_mean"] == pytest.approx(25.0)
    table = format_table(summarize(rows))
    assert "| 1024 | lsa | 2 | 50.0 | -50.0 | 25.0 |" in table
    no_full = format_table(summarize([r for r in rows if r["mode"] == "lsa"]))
    assert "Δ vs full" not in no_full


def test_corpus_suite_scores_documents_of_one_split(llm: LLM, tmp_path: Path) -> None:
    from flashmemory.indexer import corpus

    docs = list(corpus.synthetic(["retrieve", "multihop"], 2, 1500, seed=4))
    path = corpus.write_corpus(docs, tmp_path / "c.parquet")
    cfg = EvalConfig(out_dir=tmp_path / "out", suite="corpus", corpus=path, split="eval",
                     lengths=(512,), modes=("full", "recency"), samples=5, max_tokens=16,
                     lsa=LSAConfig(budget=0.2, chunk_size=32, recent_tokens=32))
    result = run_eval(llm, cfg, progress=False)
    assert {r["sample_id"] for r in result.rows} == {d.doc_id for d in docs if d.split == "eval"}
    assert len(result.rows) == 4 and all(0.0 <= r["score"] <= 1.0 for r in result.rows)
    assert all(r["prompt_tokens"] <= 512 - 16 and r["value_kind"] == "multihop"
               for r in result.rows)
    with pytest.raises(ValueError, match="corpus"):
        EvalConfig(out_dir=tmp_path, suite="corpus")


def test_ruler_suite_runs_tasks_with_their_own_token_counts(llm: LLM, tmp_path: Path,
                                                           caplog) -> None:
    """Suite ruler through the real engine: two synthetic tasks and qa_1 from a SQuAD file in
    the official layout; qa_2 without its file is skipped with a warning; each task generates at
    most its own token count; the summary has RULER's per-task table and average."""
    from flashmemory.evaluation.ruler import RulerSources
    from tests.helpers import write_squad

    squad = write_squad(tmp_path / "squad.json")
    cfg = EvalConfig(out_dir=tmp_path / "out", suite="ruler", lengths=(1024,),
                     modes=("full", "lsa"), samples=1, seed=1,
                     tasks=("niah_single_1", "vt", "qa_1", "qa_2"),
                     ruler=RulerSources(squad=squad), lsa=LSAConfig(budget=0.25, chunk_size=64))
    with caplog.at_level(logging.WARNING):
        res = run_eval(llm, cfg, progress=False)
    assert "qa_2 skipped" in caplog.text
    rows = pq.read_table(res.results_path).to_pylist()
    assert sorted({r["task"] for r in rows}) == ["niah_single_1", "qa_1", "vt"]
    assert len(rows) == 3 * 2
    limit = {"niah_single_1": 128, "vt": 30, "qa_1": 32}
    for r in rows:
        assert 0 < r["completion_tokens"] <= limit[r["task"]]
        assert 0.0 <= r["score"] <= 1.0 and r["prompt_tokens"] <= 1024 - limit[r["task"]]
    full = {r["task"]: r["score"] for r in rows if r["mode"] == "full"}
    assert full["niah_single_1"] == 1.0  # SmolLM2 finds a single needle at 1K
    summary = res.summary_path.read_text()
    assert "| 1024 | vt | 1 |" in summary and "**average**" in summary


class _Counting:
    """The real engine, counting the samples it decodes (to see what a resume skips)."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.calls = llm, 0
        self.tokenizer, self.max_model_len, self.config = llm.tokenizer, llm.max_model_len, \
            llm.config

    def run_modes(self, *args: Any) -> Any:
        self.calls += 1
        return self.llm.run_modes(*args)


def test_baselines_and_variants_in_one_run(llm: LLM, tmp_path: Path) -> None:
    """One prefill, every kind of row: full, neural LSA at two budgets and with an explicitly
    named indexer, an adaptive (threshold) variant, and the backbone baselines SnapKV and Quest."""
    from flashmemory.indexer.neural import resolve_indexer

    other = f"lsa:indexer={resolve_indexer('minilm')}"  # a second encoder, loaded from its path
    modes = ("full", "lsa", "lsa:budget=0.3", other, "lsa:threshold=0.2:min_budget=0.05",
             "snapkv", "quest")
    cfg = EvalConfig(out_dir=tmp_path, lengths=(1024,), modes=modes, samples=1, max_tokens=8,
                     value_kinds=("numbers",), lsa=LSAConfig(budget=0.1, chunk_size=64))
    rows = run_eval(llm, cfg, progress=False).rows
    by = {r["mode"]: r for r in rows}
    assert list(by) == list(modes)
    assert [by[m]["method"] for m in modes] == ["full", "lsa", "lsa", "lsa", "lsa", "snapkv",
                                                "quest"]
    assert by["lsa:budget=0.3"]["budget"] == 0.3 and by["lsa"]["budget"] == 0.1
    assert by[other]["indexer"] == str(resolve_indexer("minilm")) and by["lsa"]["indexer"] is None
    assert by["lsa:threshold=0.2:min_budget=0.05"]["threshold"] == 0.2
    # the same weights at the same budget select what the default encoder does
    assert len(llm._indexers) == 2
    assert by[other]["chunks_selected"] == by["lsa"]["chunks_selected"]
    assert by["lsa:budget=0.3"]["chunks_selected"] > by["lsa"]["chunks_selected"] > 0
    for m in ("snapkv", "quest"):  # backbone baselines keep the same budget as lsa
        assert by[m]["chunks_selected"] == by["lsa"]["chunks_selected"]
        assert 0 < by[m]["kv_footprint_mean"] < 1.0
    assert not llm._keys and all(not i._chunks for i in llm._indexers.values())


def test_resume_skips_finished_samples(llm: LLM, tmp_path: Path) -> None:
    base = dict(out_dir=tmp_path, lengths=(1024,), modes=("full", "recency"), max_tokens=8,
                value_kinds=("numbers",), lsa=LSAConfig(budget=0.1, chunk_size=64))
    first = run_eval(llm, EvalConfig(samples=1, **base), progress=False)
    counting = _Counting(llm)
    second = run_eval(counting, EvalConfig(samples=3, resume=True, **base), progress=False)
    assert counting.calls == 2  # samples 2 and 3 only
    assert len(second.rows) == 6 and second.rows[:2] == first.rows
    assert len(list((tmp_path / "parts").glob("part-*.parquet"))) == 3
    again = _Counting(llm)
    run_eval(again, EvalConfig(samples=3, resume=True, **base), progress=False)
    assert again.calls == 0
    with pytest.raises(ValueError, match=r"cannot resume .* different modes"):
        run_eval(llm, EvalConfig(samples=3, resume=True, **{**base, "modes": ("full",)}),
                 progress=False)
    fresh = _Counting(llm)  # no resume: the parts are cleared and everything runs again
    run_eval(fresh, EvalConfig(samples=1, **base), progress=False)
    assert fresh.calls == 1 and len(list((tmp_path / "parts").iterdir())) == 1


def test_longbench_and_longmemeval_suites_with_reports(llm: LLM, tmp_path: Path) -> None:
    """Both file suites on fixtures in the official layouts through the real engine: rows carry
    the groups, the summaries have the per-group and paper tables, plots are real PNGs; then
    `flashmemory report` joins the two runs."""
    from flashmemory.cli import main
    from tests.helpers import write_longbench, write_longmemeval

    runs = {"longbench-v2": write_longbench(tmp_path / "data.json"),
            "longmemeval": write_longmemeval(tmp_path / "longmemeval_s.json")}
    for suite, data in runs.items():
        cfg = EvalConfig(out_dir=tmp_path / suite, suite=suite, data=data, lengths=(1024,),
                         modes=("full", "lsa"), samples=2, max_tokens=12,
                         lsa=LSAConfig(budget=0.2, chunk_size=64))
        res = run_eval(llm, cfg, progress=False)
        assert len(res.rows) == 4 and all(r["prompt_tokens"] <= 1024 - 12 for r in res.rows)
        assert all(r["tags"] and r["score"] in (0.0, 1.0) for r in res.rows)
        summary = res.summary_path.read_text()
        assert "| 1024 | overall | 2 |" in summary and f"| {suite} @ 1K |" in summary
        for png in ("accuracy_vs_footprint.png", "footprint_vs_length.png"):
            assert (tmp_path / suite / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lb = pq.read_table(tmp_path / "longbench-v2" / "results.parquet").to_pylist()
    assert {t for r in lb for t in r["tags"]} <= {"easy", "hard", "short", "medium", "long"}
    assert main(["report", str(tmp_path / "longbench-v2"), str(tmp_path / "longmemeval"),
                 "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| longbench-v2 @ 1K |" in text and "| longmemeval @ 1K |" in text
    assert main(["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 1
