"""Summary of a load run from the locustfile's per-request records, in vLLM's benchmark
definitions: TTFT, TPOT = (E2E - TTFT) / (output tokens - 1), ITL (every gap between streamed
chunks), E2E; output tokens/s and requests/s over the run; goodput = requests/s meeting every
given SLO."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
SLO_KEYS = ("ttft", "tpot", "e2el")  # vLLM's --goodput keys, values in milliseconds


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:2000", "tpot:200"]`` -> {"ttft": 2.0, "tpot": 0.2} (seconds)."""
    slos = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"goodput SLO {item!r}: expected KEY:MILLISECONDS with KEY one of "
                             f"{', '.join(SLO_KEYS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number") from None
        if ms <= 0:
            raise ValueError(f"goodput SLO {item!r}: must be > 0 ms")
        slos[key] = ms / 1000.0
    return slos


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tpot(r: Mapping[str, Any]) -> float | None:
    n = r.get("output_tokens") or 0
    return (r["e2e"] - r["ttft"]) / (n - 1) if n > 1 and "ttft" in r else None


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1000.0  # ms
    return {"mean": float(arr.mean()),
            **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def _meets(r: Mapping[str, Any], slos: Mapping[str, float]) -> bool:
    # one output token has no TPOT: vLLM counts it as 0
    got = {"ttft": r.get("ttft"), "tpot": _tpot(r) or 0.0, "e2el": r.get("e2e")}
    return all(got[k] is not None and got[k] <= v for k, v in slos.items())


def summarize(records: Sequence[Mapping[str, Any]], duration_s: float,
              slos: Mapping[str, float]) -> dict[str, Any]:
    """Latency percentiles (ms), throughput and goodput of one run."""
    ok = [r for r in records if not r.get("error")]
    itl = [g for r in ok for g in r.get("itl", [])]
    tpots = [t for t in (_tpot(r) for r in ok) if t is not None]
    out_tokens = sum(int(r.get("output_tokens") or 0) for r in ok)
    footprints = [r["kv_footprint_mean"] for r in ok if r.get("kv_footprint_mean") is not None]
    rejected = sum(r.get("status") == 429 for r in records)  # refused by admission control
    return {
        "requests": len(records), "completed": len(ok), "failed": len(records) - len(ok),
        "error_rate": (len(records) - len(ok)) / len(records) if records else 0.0,
        "rejected_429": rejected,
        "other_errors": len(records) - len(ok) - rejected,
        "duration_s": duration_s,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,
        "output_token_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,
        "goodput": (sum(_meets(r, slos) for r in ok) / duration_s
                    if duration_s > 0 and slos else None),
        "slos_ms": {k: v * 1000.0 for k, v in slos.items()},
        "ttft_ms": _stats([r["ttft"] for r in ok if "ttft" in r]),
        "tpot_ms": _stats(tpots), "itl_ms": _stats(itl),
        "e2el_ms": _stats([r["e2e"] for r in ok]),
        "kv_footprint_mean": float(np.mean(footprints)) if footprints else None,
        "errors": sorted({str(r["error"]) for r in records if r.get("error")})[:10],
    }


def format_summary(s: Mapping[str, Any]) -> str:
    """A Markdown report: run totals, then one row per latency metric."""
    def num(v: float | None, fmt: str = ".1f") -> str:
        return "—" if v is None else format(v, fmt)

    lines = [
        f"requests {s['requests']} (completed {s['completed']}, failed {s['failed']} of which "
        f"{s.get('rejected_429', 0)} were 429, error rate {s['error_rate']:.1%}) in "
        f"{s['duration_s']:.1f} s",
        f"request throughput {s['request_throughput']:.3f} req/s, output "
        f"{s['output_token_throughput']:.2f} tok/s, goodput {num(s['goodput'], '.3f')} req/s "
        f"(SLOs ms: {s['slos_ms'] or 'none'}), mean KV footprint "
        f"{num(s['kv_footprint_mean'], '.3f')}",
        "",
        "| metric (ms) | mean | " + " | ".join(f"p{p}" for p in PERCENTILES) + " |",
        "|---|---:|" + "---:|" * len(PERCENTILES),
    ]
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        st = s[key]
        lines.append(f"| {key[:-3].upper()} | {num(st['mean'])} | "
                     + " | ".join(num(st[f"p{p}"]) for p in PERCENTILES) + " |")
    return "\n".join(lines) + "\n"
