"""CLI tests: every error path is one ``flashmemory: error:`` line, and ``generate --json`` works.

Runs ``python -m flashmemory.cli`` in subprocesses; the model loads only where unavoidable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from flashmemory.cli import _lengths, build_parser, generate_json, main
from flashmemory.types import RequestOutput, RequestStats


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flashmemory.cli", *args], capture_output=True,
                          text=True, timeout=600, env=env, cwd=cwd)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int,
                           contains: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flashmemory: error: ")
    assert contains in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("args", "contains"), [
    (["generate", "--prompt-file", "missing.txt"], "prompt file 'missing.txt' not found"),
    (["generate", "--prompt", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["generate", "--prompt", "hi", "--budget", "1.5"], "budget must be a fraction in [0, 1]"),
    (["generate", "--prompt", "hi", "--budget", "-0.1"], "budget must be a fraction in [0, 1]"),
    (["generate", "--prompt", "hi", "--mode", "bogus"], "invalid choice: 'bogus'"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "   "], "the prompt is empty"),
    (["generate"], "--prompt-file --prompt is required"),
    (["eval", "--out", "o", "--suite", "mmlu"], "unknown suite 'mmlu'"),
    (["eval", "--out", "o", "--modes", "full,sparse"], "unknown mode 'sparse'"),
    (["eval", "--out", "o", "--samples", "0"], "samples must be >= 1"),
    (["eval", "--out", "o", "--suite", "ruler", "--tasks", "niah_single_9"],
     "unknown RULER task(s) niah_single_9"),
    (["eval", "--out", "o", "--suite", "ruler", "--squad", "nope.json"],
     "--squad nope.json: no such file"),
    # the label dump decodes with full attention: selection flags would do nothing there
    (["indexer", "dump", "--corpus", "c.parquet", "--out", "o", "--indexer", "x"],
     "unrecognized arguments: --indexer x"),
    (["indexer", "fit-head", "--labels", "nope", "--out", "o", "--hidden", "-1"],
     "--hidden must be >= 0"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], contains: str) -> None:
    _assert_one_line_error(_cli(*args, cwd=tmp_path), 2, contains)
    assert not (tmp_path / "o").exists()


def test_prompt_too_long_is_one_line(tmp_path: Path) -> None:
    prompt = tmp_path / "long.txt"
    prompt.write_text(" ".join(f"word{i % 97}" for i in range(10_000)))
    proc = _cli("generate", "--prompt-file", str(prompt), "--mode", "full")
    _assert_one_line_error(proc, 1, "but the model's context is 8192 tokens")


def test_generate_json(tmp_path: Path) -> None:
    prompt = tmp_path / "q.txt"
    prompt.write_text("What is the capital of France? Answer in one word.")
    proc = _cli("generate", "--prompt-file", str(prompt), "--max-tokens", "8", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # library logging and progress bars are silenced
    out = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert out["mode"] == "lsa"
    assert out["finish_reason"] in ("stop", "length")
    assert isinstance(out["text"], str) and out["text"].strip()
    usage, timing = out["usage"], out["timing"]
    assert usage["prompt_tokens"] > 10
    assert 1 <= usage["completion_tokens"] <= 8
    for key in ("kv_footprint_mean", "kv_footprint_peak", "transfer_ratio"):
        assert 0.0 < usage[key] <= 1.0, key
    assert usage["kv_footprint_mean"] <= usage["kv_footprint_peak"]
    assert usage["kv_bytes_transferred"] > 0 and usage["chunks_selected"] >= 0
    assert 0.0 < timing["ttft"] <= timing["e2e"] and timing["tpot"] >= 0.0
    # the split: the prefill (with the chunks' embedding) sits inside TTFT; the first working
    # set's selection and transfer are part of the totals and come after the first token
    assert 0.0 < timing["prefill_s"] < timing["ttft"]
    assert timing["selection_s"] > 0.0 and timing["transfer_s"] > 0.0
    assert 0.0 < timing["admission_s"] <= timing["selection_s"] + timing["transfer_s"] + 1e-9


def test_runtime_input_errors_are_one_line(tmp_path: Path) -> None:
    _assert_one_line_error(_cli("indexer", "fit-head", "--labels", "nope", "--out", "o",
                                cwd=tmp_path), 1, "no label dump at nope")


def test_main_in_process_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--prompt", "x", "--top-k", "0"]) == 2
    assert main(["eval", "--out", "o", "--lengths", "4k,abc"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["flashmemory: error: top_k must be -1 (off) or >= 1, got 0",
                   "flashmemory: error: argument --lengths: invalid length 'abc'"]


def test_eval_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "results.parquet").write_bytes(b"")
    assert main(["eval", "--out", str(tmp_path), "--lengths", "1024", "--samples", "1"]) == 2
    assert "pass --resume to continue that run or --overwrite" in capsys.readouterr().err


def test_parser_defaults_and_lengths() -> None:
    args = build_parser().parse_args(["eval", "--out", "d", "--modes", "full,lsa"])
    assert args.modes == ("full", "lsa") and args.lengths == (4096, 8192)
    # max_tokens: None = the suite's default (64, or each RULER task's own count)
    assert args.max_tokens is None and args.budget == 0.1 and args.model == "smollm2-135m-instruct"
    assert _lengths("4k, 8192") == (4096, 8192)
    gen = build_parser().parse_args(["generate", "--prompt", "p", "--stop", "a", "--stop", "b"])
    assert gen.stop == ["a", "b"] and gen.max_tokens == 128 and gen.mode == "lsa"


def test_generate_json_shape() -> None:
    stats = RequestStats(prompt_tokens=5, completion_tokens=2, ttft=0.5, tpot=0.1, e2e=0.6)
    out = generate_json(RequestOutput("r", "hi", [1, 2], "length", "full", stats), "m")
    assert set(out) == {"text", "finish_reason", "mode", "model", "usage", "timing"}
    assert out["timing"] == {"ttft": 0.5, "tpot": 0.1, "e2e": 0.6, "prefill_s": 0.0,
                             "selection_s": 0.0, "transfer_s": 0.0, "admission_s": 0.0}
    assert "ttft" not in out["usage"] and out["usage"]["prompt_tokens"] == 5
