"""Evaluation reports from known rows: per-group and paper-layout tables by hand, plots written
as PNG files, ``flashmemory report`` over run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashmemory.evaluation.report import accuracy, paper_table, plot, tag_table, write_report


def row(suite: str, mode: str, score: float, fp: float, task: str = "t",
        tags: tuple[str, ...] = (), length: int = 4096) -> dict[str, Any]:
    return {"suite": suite, "length": length, "mode": mode, "score": score, "task": task,
            "tags": list(tags), "kv_footprint_mean": fp, "kv_footprint_peak": fp,
            "transfer_ratio": fp, "ttft": 1.0, "tpot": 0.01}


def test_tag_table_by_hand() -> None:
    rows = [row("longbench-v2", "full", 1, 1, tags=("easy", "short")),
            row("longbench-v2", "full", 0, 1, tags=("hard", "long")),
            row("longbench-v2", "full", 1, 1, tags=("hard", "short")),
            row("longbench-v2", "lsa", 1, .1, tags=("easy", "short")),
            row("longbench-v2", "lsa", 0, .1, tags=("hard", "long")),
            row("longbench-v2", "lsa", 0, .1, tags=("hard", "short"))]
    lines = tag_table(rows).splitlines()
    assert lines[0] == "| length | group | n | full | lsa |"
    assert lines[2:] == ["| 4096 | overall | 3 | 66.7 | 33.3 |",
                         "| 4096 | easy | 1 | 100.0 | 100.0 |",
                         "| 4096 | hard | 2 | 50.0 | 0.0 |",
                         "| 4096 | short | 2 | 100.0 | 50.0 |",
                         "| 4096 | long | 1 | 0.0 | 0.0 |"]  # benchmark order, not first-seen


def test_paper_table_averages_ruler_over_tasks() -> None:
    # RULER: task a 2/2, task b 0/1 -> (100 + 0) / 2 = 50, not 2/3 of the samples
    ruler = [row("ruler", "full", 1, 1, "a"), row("ruler", "full", 1, 1, "a"),
             row("ruler", "full", 0, 1, "b"), row("ruler", "lsa", 1, .12, "a"),
             row("ruler", "lsa", 0, .14, "a"), row("ruler", "lsa", 1, .13, "b")]
    assert accuracy([r for r in ruler if r["mode"] == "full"], "ruler") == pytest.approx(50.0)
    assert accuracy([r for r in ruler if r["mode"] == "lsa"], "ruler") == pytest.approx(75.0)
    lb = [row("longbench-v2", "full", 1, 1), row("longbench-v2", "full", 0, 1),
          row("longbench-v2", "full", 0, 1), row("longbench-v2", "lsa", 1, .2)]
    lines = paper_table(ruler + lb).splitlines()
    assert lines[2] == "| ruler @ 4K | 50.0 (100.0%) | 75.0 (13.0%) |"
    assert lines[3] == "| longbench-v2 @ 4K | 33.3 (100.0%) | 100.0 (20.0%) |"


def test_plots_and_report_over_runs(tmp_path: Path) -> None:
    from flashmemory.evaluation.runner import SCHEMA

    full = {n: None for n in SCHEMA.names}
    for i, suite in enumerate(("ruler", "longbench-v2")):
        rows = [{**full, **row(suite, m, s, fp, length=4096 * (i + 1))}
                for m, s, fp in (("full", 1.0, 1.0), ("lsa", 1.0, 0.12), ("recency", 0.0, 0.05))]
        (tmp_path / suite).mkdir()
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA),
                       tmp_path / suite / "results.parquet")
    files = plot([r for r in pq.read_table(tmp_path / "ruler" / "results.parquet").to_pylist()],
                 tmp_path / "plots")
    assert [f.name for f in files] == ["accuracy_vs_footprint.png", "footprint_vs_length.png"]
    assert all(f.read_bytes()[:4] == b"\x89PNG" for f in files)
    path = write_report([tmp_path / "ruler", tmp_path / "longbench-v2"], tmp_path / "rep",
                        command="flashmemory report ...")
    text = path.read_text()
    assert "| ruler @ 4K | 100.0 (100.0%) | 100.0 (12.0%) | 0.0 (5.0%) |" in text
    assert "| longbench-v2 @ 8K |" in text and "![footprint_vs_length]" in text
    with pytest.raises(FileNotFoundError, match="no results"):
        write_report([tmp_path / "missing"], tmp_path / "rep2")
