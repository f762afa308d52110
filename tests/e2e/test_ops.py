"""Operations against the real thing: a local Ray cluster serving SmolLM2 on CPU, a Locust load
run through ``flashmemory loadtest``, and Debian's Prometheus scraping the cluster while every
PromQL expression of the committed Grafana dashboards is evaluated through its HTTP API.
One cluster and one Prometheus for the module."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flashmemory.cluster.dashboards import concrete, expressions
from flashmemory.loadtest.prometheus import start_prometheus
from tests.helpers import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
MODEL = "smollm2-135m-instruct"
# re-predict often so that later selections miss resident chunks and fetch them
ARGS = {"num_prefill": 1, "num_decode": 1, "lsa": {"budget": 0.1, "repredict_every": 4}}
DASHBOARDS = sorted(Path("k8s/grafana/dashboards").glob("*.json"))
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if PROMETHEUS is None:
        pytest.fail("the prometheus server is missing: apt-get install prometheus (.ci/run does)")
    import ray
    from ray import serve

    from flashmemory.cluster.serve_app import build

    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING",
             _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(dict(ARGS)), name="flashmemory", route_prefix="/")
    prom, prom_url = start_prometheus(PROMETHEUS, f"127.0.0.1:{metrics_port}",
                                      tmp_path_factory.mktemp("prom"))
    yield f"http://127.0.0.1:{port}", prom_url
    prom.terminate()
    prom.wait(timeout=30)
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def load_run(stack, tmp_path_factory):
    """A short headless Locust run through the CLI, plus one 4K-token request whose later
    selections fetch chunks that were not resident (a miss series) and one client that walks away
    mid-stream (an error series)."""
    out = tmp_path_factory.mktemp("load")
    needle = Path("examples/needle.txt").read_text()
    r = httpx.post(f"{stack[0]}/v1/chat/completions", timeout=300, json={
        "model": MODEL, "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "user", "content": needle}]})
    assert r.status_code == 200, r.text
    with httpx.Client(timeout=300) as c, c.stream(
            "POST", f"{stack[0]}/v1/chat/completions",
            json={"model": MODEL, "stream": True, "max_tokens": 64, "temperature": 0,
                  "messages": [{"role": "user", "content": "Count from one to fifty."}]}) as r:
        next(r.iter_lines())  # first event, then drop the connection
    cmd = [sys.executable, "-m", "flashmemory", "loadtest", "--host", stack[0],
           "--context-tokens", "1024", "--num-prompts", "3", "--users", "2", "--spawn-rate", "2",
           "--run-time", "25s", "--max-tokens", "24", "--goodput", "ttft:60000", "tpot:5000",
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc, out


def test_loadtest_runs_clean_and_reports_vllm_metrics(load_run) -> None:
    proc, out = load_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == 0 and summary["completed"] >= 2, summary
    assert summary["error_rate"] == 0.0
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        st = summary[key]
        assert st["mean"] is not None and 0 < st["p50"] <= st["p99"], (key, st)
    assert summary["ttft_ms"]["p50"] < summary["e2el_ms"]["p50"]
    assert summary["output_token_throughput"] > 0
    assert 0 < summary["goodput"] <= summary["request_throughput"] + 1e-9
    assert 0 < summary["kv_footprint_mean"] < 1  # LSA kept a fraction of the KV
    assert "| TTFT |" in proc.stdout
    # TTFT and ITL are Locust entries of their own, next to the request entry
    with (out / "locust_stats.csv").open() as f:
        rows = list(csv.DictReader(f))
    types = {r["Type"]: r for r in rows}
    assert {"TTFT", "ITL", "POST"} <= set(types), sorted(types)
    assert int(types["POST"]["Failure Count"]) == 0
    assert int(types["ITL"]["Request Count"]) > int(types["TTFT"]["Request Count"]) > 0


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def _missing(prom: str, exprs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(title, e) for title, e in exprs if not _has_data(_query(prom, concrete(e)))]


def test_every_dashboard_expression_returns_data_from_prometheus(stack, load_run) -> None:
    prom = stack[1]
    exprs = [te for path in DASHBOARDS for te in expressions(json.loads(path.read_text()))]
    assert len(DASHBOARDS) == 3 and len(exprs) >= 30
    deadline = time.time() + 120  # Ray's metrics agent exports every few seconds
    missing = _missing(prom, exprs)
    while missing and time.time() < deadline:
        time.sleep(3)
        missing = _missing(prom, exprs)
    assert not missing, missing
    # the dashboards' worker variable (label_values) lists every worker
    for path in DASHBOARDS:
        for var in json.loads(path.read_text())["templating"]["list"]:
            if var["type"] != "query":
                continue
            metric = var["definition"].removeprefix("label_values(").split(",")[0]
            r = httpx.get(f"{prom}/api/v1/label/worker/values", params={"match[]": metric})
            assert {"prefill-0", "decode-0", "indexer"} <= set(r.json()["data"]), r.json()


def test_a_renamed_metric_fails_the_check(stack, load_run) -> None:
    """What the dashboard test catches: an expression naming a metric the code does not export
    (here a dashboard left behind by a rename) returns no data."""
    renamed = [("resident", "sum by (worker) (ray_flashmemory_kv_resident_byte)")]
    assert _missing(stack[1], renamed) == renamed
    assert not _missing(stack[1], [("resident", "sum by (worker) "
                                                "(ray_flashmemory_kv_resident_bytes)")])
