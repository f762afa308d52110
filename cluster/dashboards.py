"""Grafana dashboards (serving, LSA, workers) over the metrics of ``cluster.metrics``, written as
JSON with their provisioning files and the Kubernetes ConfigMap that carries them.

``flashmemory dashboards --out k8s`` regenerates the committed files; tests check the committed
files match this module and evaluate every PromQL expression against a real Prometheus.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PREFIX = "ray_"  # Ray's metrics agent prefixes application metrics
RATE = "$__rate_interval"
WORKER = 'worker=~"$worker"'


def m(name: str) -> str:
    """The exported series name of one of our metrics (``cluster.metrics.SPECS`` key)."""
    return PREFIX + name


def quantiles(hist: str, by: str = "", match: str = "") -> list[tuple[str, str]]:
    """p50/p90/p99 targets of a histogram, optionally split by labels."""
    group = f"le{', ' + by if by else ''}"
    sel = f"{{{match}}}" if match else ""
    label = "".join(f"{{{{{k.strip()}}}}} " for k in by.split(",") if k.strip())
    return [(f"{label}p{q}",
             f"histogram_quantile(0.{q}, sum by ({group}) "
             f"(rate({m(hist)}_bucket{sel}[{RATE}])))")
            for q in ("50", "90", "99")]


def mean(hist: str, by: str = "", match: str = "") -> str:
    """Mean of a histogram's observations over the rate window."""
    agg = f"sum by ({by})" if by else "sum"
    sel = f"{{{match}}}" if match else ""
    return (f"{agg} (rate({m(hist)}_sum{sel}[{RATE}])) / "
            f"{agg} (rate({m(hist)}_count{sel}[{RATE}]))")


@dataclass(frozen=True)
class Panel:
    title: str
    targets: list[tuple[str, str]]  # (legend, PromQL)
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: list[Panel]
    variables: list[dict[str, Any]] = field(default_factory=list)


SERVING = Dashboard("flashmemory-serving", "FlashMemory / Serving",
                    "Requests, latency percentiles (vLLM definitions), throughput and errors.", [
    Panel("Request rate by finish reason",
          [("{{finish_reason}}", f"sum by (finish_reason) "
            f"(rate({m('flashmemory_request_success_total')}[{RATE}]))")], "reqps"),
    Panel("Errors by type",
          [("{{error_type}}", f"sum by (error_type) "
            f"(rate({m('flashmemory_request_errors_total')}[{RATE}]))")], "reqps"),
    Panel("Time to first token", quantiles("flashmemory_time_to_first_token_seconds"), "s"),
    Panel("Inter-token latency", quantiles("flashmemory_inter_token_latency_seconds"), "s"),
    Panel("End-to-end request latency",
          quantiles("flashmemory_e2e_request_latency_seconds"), "s"),
    Panel("Tokens per second", [
        ("prompt", f"sum(rate({m('flashmemory_prompt_tokens_total')}[{RATE}]))"),
        ("generation", f"sum(rate({m('flashmemory_generation_tokens_total')}[{RATE}]))")],
        "short"),
    Panel("Running and waiting requests", [
        ("running {{worker}}", f"sum by (worker) "
         f"({m('flashmemory_num_requests_running')}{{{WORKER}}})"),
        ("waiting", f"sum({m('flashmemory_num_requests_waiting')})")], "short"),
], [])

LSA = Dashboard("flashmemory-lsa", "FlashMemory / Lookahead Sparse Attention",
                "KV footprint, residency, selection and chunk transfers per decode worker.", [
    Panel("KV footprint per request (resident / full KV)", [
        ("mean", mean("flashmemory_kv_footprint_ratio", match=WORKER)),
        ("peak (mean over requests)", mean("flashmemory_kv_footprint_peak_ratio", match=WORKER)),
        ("peak p99", f"histogram_quantile(0.99, sum by (le) (rate("
         f"{m('flashmemory_kv_footprint_peak_ratio')}_bucket{{{WORKER}}}[{RATE}])))")],
        "percentunit", "Per finished request: mean and peak share of its KV that was resident."),
    Panel("Resident vs full KV bytes per decode worker", [
        ("resident {{worker}}", f"sum by (worker) "
         f"({m('flashmemory_kv_resident_bytes')}{{{WORKER}}})"),
        ("full {{worker}}", f"sum by (worker) ({m('flashmemory_kv_full_bytes')}{{{WORKER}}})")],
        "bytes", "What the running requests hold, and what full attention would hold."),
    Panel("Chunks selected per re-prediction", [
        ("mean", f"sum (rate({m('flashmemory_chunks_selected_total')}{{{WORKER}}}[{RATE}])) / "
                 f"sum (rate({m('flashmemory_repredictions_total')}{{{WORKER}}}[{RATE}]))"),
        *quantiles("flashmemory_chunks_selected", match=WORKER)[1:]], "short"),
    Panel("Re-prediction rate", [
        ("{{worker}}", f"sum by (worker) "
         f"(rate({m('flashmemory_repredictions_total')}{{{WORKER}}}[{RATE}]))")], "ops"),
    Panel("Chunk fetch misses", [
        ("misses {{worker}}", f"sum by (worker) (rate({m('flashmemory_chunks_fetched_total')}"
         f'{{reason="reprediction", {WORKER}}}[{RATE}]))'),
        ("admission loads {{worker}}", f"sum by (worker) (rate("
         f"{m('flashmemory_chunks_fetched_total')}"
         f'{{reason="admission", {WORKER}}}[{RATE}]))')],
        "ops", "Chunks the indexer asked for at a re-prediction that were not resident."),
    Panel("Transfer bytes per route", [
        ("{{src}} -> {{dst}}", f"sum by (src, dst) "
         f"(rate({m('flashmemory_transfer_bytes_total')}[{RATE}]))")], "Bps"),
    Panel("Transfer latency per route", quantiles("flashmemory_transfer_seconds", "src, dst"),
          "s"),
    Panel("Prefill and selection latency", [
        *(("prefill " + t, e) for t, e in quantiles("flashmemory_prefill_seconds", match=WORKER)),
        *(("selection " + t, e)
          for t, e in quantiles("flashmemory_selection_seconds", match=WORKER))],
        "s", "Prefill worker seconds per request (inside TTFT) and the time to plan one "
        "re-prediction (the first one, with the transfer, is what the second token waits for)."),
], [])

WORKERS = Dashboard("flashmemory-workers", "FlashMemory / Workers",
                    "Memory, chunk pools and stores, restarts of the Ray actors.", [
    Panel("Device memory per worker", [
        ("{{worker}} {{device}}", f"max by (worker, device) "
         f"({m('flashmemory_device_memory_bytes')}{{{WORKER}}})")],
        "bytes", "CUDA memory reserved by torch on GPU workers; resident set size on CPU."),
    Panel("Chunk pool occupancy", [
        ("{{worker}}", f"sum by (worker) ({m('flashmemory_chunk_pool_pages_used')}{{{WORKER}}})"
         f" / sum by (worker) ({m('flashmemory_chunk_pool_pages_total')}{{{WORKER}}})")],
        "percentunit", "Pages in use over pages allocated in each decode worker's pool."),
    Panel("Chunk pool pages", [
        ("used {{worker}}", f"sum by (worker) ({m('flashmemory_chunk_pool_pages_used')}"
         f"{{{WORKER}}})"),
        ("allocated {{worker}}", f"sum by (worker) ({m('flashmemory_chunk_pool_pages_total')}"
         f"{{{WORKER}}})")], "short"),
    Panel("Chunk store bytes (prefill)", [
        ("{{worker}}", f"sum by (worker) ({m('flashmemory_chunk_store_bytes')}{{{WORKER}}})")],
        "bytes"),
    Panel("Actor restarts in range", [
        ("{{worker}}", f"changes((max by (worker) ({m('flashmemory_worker_start_time_seconds')}"
         f"{{{WORKER}}}))[$__range:])")],
        "short", "Times each worker's process start time changed (Ray restarted the actor).",
        "stat"),
], [])

DASHBOARDS = (SERVING, LSA, WORKERS)


def _variables() -> list[dict[str, Any]]:
    return [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {}, "hide": 0},
        {"name": "worker", "type": "query", "label": "worker",
         "datasource": {"type": "prometheus", "uid": "${datasource}"},
         "query": {"query": f"label_values({m('flashmemory_worker_start_time_seconds')}, worker)",
                   "refId": "worker"},
         "definition": f"label_values({m('flashmemory_worker_start_time_seconds')}, worker)",
         "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2,
         "current": {"text": "All", "value": "$__all"}, "hide": 0},
    ]


def render(d: Dashboard) -> dict[str, Any]:
    """The Grafana dashboard JSON model (schemaVersion 39) of one dashboard."""
    ds = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for i, p in enumerate(d.panels):
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description,
            "datasource": ds, "gridPos": {"x": (i % 2) * 12, "y": (i // 2) * 8, "w": 12, "h": 8},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
            "targets": [{"refId": chr(ord("A") + j), "datasource": ds, "expr": expr,
                         "legendFormat": legend, "range": True}
                        for j, (legend, expr) in enumerate(p.targets)],
        })
    return {"uid": d.uid, "title": d.title, "description": d.description,
            "tags": ["flashmemory"], "timezone": "browser", "schemaVersion": 39, "version": 1,
            "editable": True, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": _variables()}, "panels": panels}


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of a dashboard JSON model."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def concrete(expr: str, rate: str = "5m", range_: str = "10m") -> str:
    """A dashboard expression with Grafana's variables replaced, ready for Prometheus."""
    expr = expr.replace("$__rate_interval", rate).replace("$__range", range_)
    return re.sub(r"\$\{?worker\}?", ".*", expr)


def _query(prometheus: str, expr: str) -> dict[str, str]:
    """Legend-free {label set: value} of an instant query."""
    import httpx

    r = httpx.get(f"{prometheus.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=30)
    r.raise_for_status()
    return {json.dumps(s["metric"], sort_keys=True): s["value"][1]
            for s in r.json()["data"]["result"]}


def snapshot(prometheus: str, rate: str = "5m", range_: str = "10m") -> list[dict[str, Any]]:
    """Evaluate every panel target against a Prometheus server: its value now (what Grafana's
    last point shows) and its peak over ``range_`` (the top of the panel's curve). One row per
    returned series: dashboard, panel, legend (labels filled in), value, peak."""
    rows = []
    for d in DASHBOARDS:
        for p in d.panels:
            for legend, expr in p.targets:
                q = concrete(expr, rate, range_)
                now = _query(prometheus, q)
                peak = _query(prometheus, f"max_over_time(({q})[{range_}:5s])")
                for key in sorted(now.keys() | peak.keys()) or ["{}"]:
                    labels = json.loads(key)
                    name = re.sub(r"\{\{(\w+)\}\}", lambda g, lab=labels: lab.get(g.group(1), ""),
                                  legend)
                    rows.append({"dashboard": d.title, "panel": p.title, "legend": name,
                                 "unit": p.unit, "value": now.get(key, "no data"),
                                 "peak": peak.get(key, "no data")})
    return rows


def format_snapshot(rows: list[dict[str, Any]]) -> str:
    def num(v: str) -> str:
        try:
            return f"{float(v):.4g}"
        except ValueError:
            return v

    lines = ["| dashboard | panel | series | now | peak | unit |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {r['dashboard']} | {r['panel']} | {r['legend']} | {num(r['value'])} | "
              f"{num(r['peak'])} | {r['unit']} |" for r in rows]
    return "\n".join(lines) + "\n"


PROVIDER = {"apiVersion": 1, "providers": [{
    "name": "flashmemory", "folder": "FlashMemory", "type": "file", "disableDeletion": False,
    "allowUiUpdates": False, "updateIntervalSeconds": 60,
    "options": {"path": "/var/lib/grafana/dashboards/flashmemory"}}]}
DATASOURCE = {"apiVersion": 1, "datasources": [{
    "name": "Prometheus", "type": "prometheus", "access": "proxy", "isDefault": True,
    "url": "http://prometheus:9090"}]}


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks (readable dashboards inside the ConfigMap)."""


_BlockDumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def files() -> dict[str, str]:
    """Relative path (under k8s/) -> content of every generated file."""
    out: dict[str, str] = {}
    data = {}
    for d in DASHBOARDS:
        text = json.dumps(render(d), indent=2) + "\n"
        name = d.uid.removeprefix("flashmemory-") + ".json"
        out[f"grafana/dashboards/{name}"] = text
        data[name] = text
    out["grafana/provisioning/dashboards/flashmemory.yaml"] = yaml.safe_dump(PROVIDER,
                                                                           sort_keys=False)
    out["grafana/provisioning/datasources/prometheus.yaml"] = yaml.safe_dump(DATASOURCE,
                                                                           sort_keys=False)
    cm = {"apiVersion": "v1", "kind": "ConfigMap",
          "metadata": {"name": "flashmemory-grafana-dashboards",
                       "labels": {"app.kubernetes.io/part-of": "flashmemory",
                                  "grafana_dashboard": "1"}},
          "data": data}
    header = "# Generated by `flashmemory dashboards --out k8s`; do not edit by hand.\n"
    out["grafana-dashboards.yaml"] = header + yaml.dump(cm, Dumper=_BlockDumper, sort_keys=False)
    return out


def write(root: Path) -> list[Path]:
    """Write every generated file under ``root`` (the repo's k8s/ directory)."""
    written = []
    for rel, text in files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
