"""The committed Grafana files match their generator, and every series a dashboard reads is one
the code exports (``cluster.metrics.SPECS``); tests/e2e/test_ops.py then runs them for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from flashmemory.cli import main
from flashmemory.cluster import dashboards
from flashmemory.cluster.metrics import SPECS

K8S = Path("k8s")
SERIES = re.compile(r"ray_(flashmemory_[a-z0-9_]+)")


def _exported(series: str) -> bool:
    if series in SPECS:
        return True
    base, _, suffix = series.rpartition("_")
    return suffix in {"bucket", "sum", "count"} and SPECS.get(base, ("",))[0] == "histogram"


def test_committed_files_match_the_generator(capsys) -> None:
    assert main(["dashboards", "--out", str(K8S), "--check"]) == 0, capsys.readouterr().out


def test_check_reports_a_stale_file(tmp_path) -> None:
    dashboards.write(tmp_path)
    (tmp_path / "grafana/dashboards/lsa.json").write_text("{}")
    assert main(["dashboards", "--out", str(tmp_path), "--check"]) == 1


def test_every_series_in_the_dashboards_is_exported() -> None:
    used = set()
    for path in sorted((K8S / "grafana/dashboards").glob("*.json")):
        for _, expr in dashboards.expressions(json.loads(path.read_text())):
            found = SERIES.findall(expr)
            assert found, expr
            used.update(found)
    unknown = sorted(s for s in used if not _exported(s))
    assert not unknown, unknown
    assert not _exported("flashmemory_kv_resident_byte")  # the check can fail


def test_configmap_carries_the_dashboards() -> None:
    cm = yaml.safe_load((K8S / "grafana-dashboards.yaml").read_text())
    files = {p.name: p.read_text() for p in (K8S / "grafana/dashboards").glob("*.json")}
    assert cm["kind"] == "ConfigMap" and cm["data"] == files


def test_issue_panels_are_present() -> None:
    titles = {p.title for d in dashboards.DASHBOARDS for p in d.panels}
    for want in ("Request rate by finish reason", "Time to first token", "Inter-token latency",
                 "End-to-end request latency", "Tokens per second",
                 "Running and waiting requests", "Errors by type",
                 "KV footprint per request (resident / full KV)",
                 "Resident vs full KV bytes per decode worker",
                 "Chunks selected per re-prediction", "Transfer bytes per route",
                 "Transfer latency per route", "Re-prediction rate", "Chunk fetch misses",
                 "Device memory per worker", "Chunk pool occupancy", "Actor restarts in range"):
        assert want in titles, want
