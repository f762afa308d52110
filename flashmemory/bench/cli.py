"""``flashmemory bench kernel|decode|indexer|dsv4``: parse, run the cases, print a Markdown
table (and JSON)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_parser(sub: Any, lengths: Any, csv: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the main parser; ``lengths``/``csv`` are its argument types."""
    p = sub.add_parser("bench", help="GPU benchmarks: the LSA kernel and whole-model decode")
    kinds = p.add_subparsers(dest="bench", required=True,
                             metavar="{kernel,decode,indexer,dsv4}")

    k = kinds.add_parser("kernel", help="LSA decode kernel vs SDPA (full and contiguous subset)")
    k.add_argument("--shapes", type=csv, default=["llama3-8b", "smollm2"])
    k.add_argument("--contexts", type=lengths, default=(32768, 131072, 524288, 1048576),
                   help="tokens of context, e.g. 32k,512k (default: 32k,128k,512k,1024k)")
    k.add_argument("--budgets", type=csv, default=["0.05", "0.1", "0.2"])
    k.add_argument("--batches", type=csv, default=["1", "8", "64"])
    k.add_argument("--chunk-size", type=int, default=64)
    k.add_argument("--sweep", action="store_true",
                   help="also time launch configurations (warps, stages, block) per case")
    d = kinds.add_parser("decode", help="whole-model decode step: full KV vs an LSA budget")
    d.add_argument("--shape", default="llama3-8b")
    d.add_argument("--contexts", type=lengths, default=(131072, 524288))
    d.add_argument("--budget", type=float, default=0.1, help="LSA budget (fraction of chunks)")
    d.add_argument("--full", action="store_true", help="only the full-KV rows")
    d.add_argument("--lsa-only", action="store_true", help="only the LSA rows")
    d.add_argument("--batches", type=csv, default=["1", "8"])
    d.add_argument("--steps", type=int, default=32, help="timed decode steps per row")
    i = kinds.add_parser("indexer", help="chunk embedding vs prefill throughput; re-prediction")
    i.add_argument("--indexer", default="minilm", help="minilm or a sentence-transformers dir")
    i.add_argument("--device", default="cuda")
    i.add_argument("--chunks", type=int, default=4096)
    i.add_argument("--shapes", type=csv, default=["smollm2", "llama3-8b"],
                   help="prefill shapes to compare with ('' for none)")
    i.add_argument("--prefill-tokens", type=int, default=16384)
    v = kinds.add_parser("dsv4", help="DeepSeek-V4-Flash decode attention: full CSA vs LSA pages")
    v.add_argument("--contexts", type=lengths, default=(131072, 524288, 1048576))
    v.add_argument("--batches", type=csv, default=["1", "8"])
    v.add_argument("--modes", type=csv, default=["full", "lsa"])
    v.add_argument("--layers", type=int, default=2, help="layers of each type timed")
    v.add_argument("--budget", type=float, default=0.1,
                   help="KMAX as a fraction of the closed CSA pages")
    v.add_argument("--recent-tokens", type=int, default=8192, help="recency tail (tokens)")
    v.add_argument("--seed", type=int, default=0)
    for q in (k, d, i, v):
        q.add_argument("--json", type=Path, help="also write the rows to this JSON file")
        q.add_argument("-v", "--verbose", action="store_true")
        q.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)
    return p


def _floats(values: list[str], name: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name} takes numbers, got {','.join(values)}") from None


def _ints(values: list[str], name: str) -> list[int]:
    out = [int(float(v)) for v in _floats(values, name)]
    if any(v < 1 for v in out):
        raise ValueError(f"--{name} must be >= 1")
    return out


def run(args: argparse.Namespace, argv: list[str]) -> int:
    from flashmemory.bench.common import gpu_name, markdown, require_gpu

    if args.bench == "indexer":
        from flashmemory.bench import indexer

        rows = indexer.run(args.indexer, args.device, args.chunks,
                           [s for s in args.shapes if s], args.prefill_tokens, argv)
        print(f"\n## Indexer cost ({gpu_name() if args.device.startswith('cuda') else 'CPU'})\n")
        print(markdown(rows, indexer.COLUMNS))
        return 0
    require_gpu()
    if args.bench == "dsv4":
        rows, columns, title = _dsv4(args, argv)
    else:
        rows, columns, title = (_kernel if args.bench == "kernel" else _decode)(args)
    print(f"\n## {title} ({gpu_name()})\n")
    print(markdown(rows, columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def _kernel(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str], str]:
    from flashmemory.bench import kernel
    from flashmemory.bench.common import hbm_read_bandwidth

    budgets = _floats(args.budgets, "budgets")
    if any(not 0 < b <= 1 for b in budgets):
        raise ValueError("--budgets must be fractions in (0, 1]")
    bw = hbm_read_bandwidth()
    print(f"measured HBM bandwidth: read-only {bw['read'] / 1e12:.2f} TB/s (pct_hbm is against "
          f"this); a device copy in a graph (copy engine) {bw['copy'] / 1e12:.2f} TB/s; "
          f"pct_read is against read_us, a streaming read of the row's resident bytes")
    rows = []
    for case in kernel.cases(args.shapes, list(args.contexts), budgets,
                             _ints(args.batches, "batches"), args.chunk_size):
        if args.sweep:
            best = kernel.sweep(case, bw["read"])
            print(kernel_sweep_line(case, best))
        rows.append(kernel.run_case(case, bw["read"]))
        logger.info("%s", rows[-1])
    return rows, kernel.COLUMNS, "LSA decode kernel vs SDPA, one layer, bf16"


def kernel_sweep_line(case: Any, best: list[dict[str, Any]]) -> str:
    top = ", ".join(f"{r['config']}: {r['lsa_us']:.1f} us" for r in best[:3])
    return f"sweep {case.shape} ctx={case.context} b={case.budget} B={case.batch}: {top}"


def _decode(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str], str]:
    from flashmemory.bench import decode

    if not 0 < args.budget <= 1:
        raise ValueError("--budget must be a fraction in (0, 1]")
    if args.full and args.lsa_only:
        raise ValueError("--full and --lsa-only exclude each other")
    budgets: list[float | None] = [] if args.full else [args.budget]
    if not args.lsa_only:
        budgets.insert(0, None)
    model = decode.bench_model(args.shape, max(args.contexts) + args.steps + 256)
    weights = sum(p.nbytes for p in model.parameters())
    rows = []
    for ctx in args.contexts:
        for n in _ints(args.batches, "batches"):
            for b in budgets:
                rows.append(decode.run_case(decode.DecodeCase(args.shape, ctx, b, n,
                                                              args.steps), model))
                logger.info("%s", rows[-1])
    decode.summarize(rows, weights)
    return rows, decode.COLUMNS, (f"Decode step, {args.shape} shape, random weights "
                                  f"({weights / 2**30:.1f} GiB), CUDA graphs")


def _dsv4(args: argparse.Namespace,
          argv: list[str]) -> tuple[list[dict[str, Any]], list[str], str]:
    from flashmemory.bench import dsv4

    if not 0 < args.budget <= 1:
        raise ValueError("--budget must be a fraction in (0, 1]")
    if args.layers < 1 or args.recent_tokens < 0:
        raise ValueError("--layers must be >= 1 and --recent-tokens >= 0")
    bad = set(args.modes) - {"full", "lsa"}
    if bad or not args.modes:
        raise ValueError(f"--modes takes full and/or lsa, got {','.join(args.modes)}")
    rows = dsv4.run(list(args.contexts), _ints(args.batches, "batches"), args.modes, args, argv)
    return rows, dsv4.COLUMNS, ("DeepSeek-V4-Flash decode attention per token at 43 layers, "
                                "random bf16 weights, CUDA graphs")
