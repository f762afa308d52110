"""A load run with the operator's view: serve the model on a local Ray cluster, scrape it with a
Prometheus server, drive it with ``flashmemory loadtest`` (Locust), and record what the Grafana
dashboards' expressions showed halfway through the run and after it.

CPU:  python benchmarks/load_run.py --out runs/cpu
H200: python benchmarks/load_run.py --gpu-shape smollm2 --tokenizer .gpu/tok --out runs/h200 \
          --context-tokens 8192,32768 --users 8
Soak: python benchmarks/load_run.py --out runs/soak --soak --run-time 600 \
          --context-tokens 512,2048,4096 --num-prompts 4 --users 4
Writes OUT/{summary.md,summary.json,dashboards-during.md,dashboards-after.md,locust_*.csv}; with
--soak also OUT/soak.md: each worker's memory and held state when idle after a warm-up, and when
idle again after the run (a soak passes with zero errors and nothing held afterwards).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prometheus_binary(path: str) -> str:
    if path.endswith(".xz"):  # carried compressed to the GPU machine
        out = Path("/tmp/prometheus-bin")
        out.write_bytes(lzma.decompress(Path(path).read_bytes()))
        out.chmod(0o755)
        return str(out)
    found = shutil.which(path)
    if found is None:
        raise SystemExit(f"prometheus binary {path!r} not found (apt-get install prometheus)")
    return found


def snapshot(prom: str, path: Path, window: str) -> str:
    """The dashboards' values now and their peaks since the run began."""
    from flashmemory.cluster.dashboards import format_snapshot
    from flashmemory.cluster.dashboards import snapshot as snap

    text = format_snapshot(snap(prom, rate=window, range_=window))
    path.write_text(text)
    return text


def worker_state(handles) -> dict[str, dict]:
    """Each worker's held state and memory (``stats`` of every actor)."""
    import ray

    state = {f"prefill-{i}": ray.get(w.stats.remote()) for i, w in enumerate(handles.prefills)}
    state.update({f"decode-{j}": ray.get(w.stats.remote())
                  for j, w in enumerate(handles.decodes)})
    state["indexer"] = ray.get(handles.indexer.stats.remote())
    return state


HELD = {"prefill": ("requests", "store_bytes", "staged"),
        "decode": ("active", "pages_in_use", "tables"), "indexer": ("requests_held",)}


def soak_report(before: dict, after: dict, summary: dict, warmup_s: int) -> tuple[str, bool]:
    """Markdown: memory and held state per worker, idle before and after; and the verdict."""
    rows, clean = [], summary.get("failed", 1) == 0 and summary.get("completed", 0) > 0
    for name in after:
        b, a = before[name], after[name]
        held = {k: a[k] for k in HELD[name.split("-")[0]]}
        if "load" in a:  # the indexer's routed-request count
            held["load"] = sum(a["load"])
        clean &= not any(held.values())
        pages = f"{b['pages_total']} -> {a['pages_total']}" if "pages_total" in a else ""
        rows.append(f"| {name} | {b['rss_bytes'] / 2**20:.0f} | {a['rss_bytes'] / 2**20:.0f} | "
                    f"{(a['rss_bytes'] - b['rss_bytes']) / 2**20:+.0f} | {pages} | "
                    + ", ".join(f"{k}={v}" for k, v in held.items()) + " |")
    head = (f"Soak: {summary.get('completed')} requests completed, {summary.get('failed')} "
            f"failed over {summary.get('duration_s', 0):.0f} s (after a {warmup_s} s warm-up).\n\n"
            "| worker | RSS idle before (MiB) | RSS idle after (MiB) | change | pool pages "
            "allocated | held after the run |\n|---|---|---|---|---|---|\n")
    verdict = "PASS: zero errors, nothing held" if clean else "FAIL"
    return head + "\n".join(rows) + f"\n\n{verdict}\n", clean


def app_args(args: argparse.Namespace) -> tuple[dict, str]:
    """Serve app args and the tokenizer source for the prompt set."""
    lsa = {"mode": args.mode, "budget": args.budget}
    if args.gpu_shape is None:
        return {"num_prefill": 1, "num_decode": args.num_decode, "lsa": lsa}, args.model
    from serve_gpu import make_checkpoint

    lengths = [int(x) for x in args.context_tokens.split(",")]
    ckpt = make_checkpoint(args.gpu_shape, Path(args.tokenizer), Path("/tmp/fm-load-ckpt"),
                           max(lengths) + 2 * args.max_tokens)
    share = 1.0 / (1 + args.num_decode + 1)  # prefill + decodes share the GPU (IPC transport)
    return ({"served_model_name": args.model, "num_prefill": 1, "num_decode": args.num_decode,
             "num_gpus_per_worker": share, "num_cpus_per_worker": 1, "torch_threads": 4,
             "engine": {"model": str(ckpt), "device": "cuda", "dtype": "bfloat16"},
             "lsa": lsa}, str(ckpt))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--gpu-shape", help="serve random weights of this shape on the GPU")
    ap.add_argument("--tokenizer", help="with --gpu-shape: tokenizer directory")
    ap.add_argument("--mode", default="lsa", help="server's LSA mode (lsa, recency, random)")
    ap.add_argument("--budget", type=float, default=0.1)
    ap.add_argument("--num-decode", type=int, default=1)
    ap.add_argument("--context-tokens", default="2048")
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--run-time", type=int, default=120, help="seconds")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prometheus", default="prometheus", help="binary (or .xz of it)")
    ap.add_argument("--goodput", nargs="*", default=["ttft:10000", "tpot:500"])
    ap.add_argument("--soak", action="store_true",
                    help="record worker memory and held state idle before / after (soak.md)")
    ap.add_argument("--warmup", type=int, default=60,
                    help="with --soak: seconds of the same load before the idle baseline")
    ap.add_argument("--serve-args", type=json.loads, default={},
                    help='extra Serve app args (ClusterConfig fields) as JSON, e.g. '
                         '\'{"kv_capacity_gb": 0.05, "admission_timeout_s": 5}\'')
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    from flashmemory.cluster.config_io import cluster_config_from_dict
    from flashmemory.cluster.launch import connect_workers
    from flashmemory.cluster.serve_app import build
    from flashmemory.loadtest.prometheus import start_prometheus

    args.out.mkdir(parents=True, exist_ok=True)
    binary = _prometheus_binary(args.prometheus)
    serve_args, tokenizer = app_args(args)
    serve_args.update(args.serve_args)
    metrics_port, port = _port(), _port()
    ray.init(logging_level="WARNING", include_dashboard=False, _metrics_export_port=metrics_port,
             **({"num_gpus": 1} if args.gpu_shape else {}))
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build(serve_args), name="flashmemory", route_prefix="/")
    prom, prom_url = start_prometheus(binary, f"127.0.0.1:{metrics_port}",
                                      Path(tempfile.mkdtemp(prefix="fm-prom-")),  # fresh TSDB
                                      scrape_interval_s=2.0)
    window = f"{args.run_time + 60}s"  # the rate window covers the whole run
    handles = connect_workers(cluster_config_from_dict(serve_args))

    def locust(run_time: int, out: Path) -> list[str]:
        return [sys.executable, "-m", "flashmemory", "loadtest",
                "--host", f"http://127.0.0.1:{port}",
                "--model", serve_args.get("served_model_name", args.model),
                "--tokenizer", tokenizer, "--context-tokens", args.context_tokens,
                "--num-prompts", str(args.num_prompts), "--users", str(args.users),
                "--spawn-rate", str(args.users), "--run-time", f"{run_time}s",
                "--max-tokens", str(args.max_tokens), "--goodput", *args.goodput,
                "--out", str(out)]

    before: dict = {}
    if args.soak:  # warm up (pools grow, prompts cached), then the idle baseline
        subprocess.run(locust(args.warmup, args.out / "warmup"), check=False)
        time.sleep(15)
        before = worker_state(handles)
    cmd = locust(args.run_time, args.out)
    during: dict[str, str] = {}
    timer = threading.Timer(30 + args.run_time / 2, lambda: during.setdefault(
        "text", snapshot(prom_url, args.out / "dashboards-during.md", window)))
    timer.start()  # prompt building takes a while before Locust starts
    try:
        proc = subprocess.run(cmd, check=False)
        time.sleep(15)  # two export intervals: the last observations reach Prometheus
        after = snapshot(prom_url, args.out / "dashboards-after.md", window)
        idle_after = worker_state(handles) if args.soak else {}
    finally:
        timer.cancel()
        prom.terminate()
        serve.shutdown()
        ray.shutdown()
    summary = json.loads((args.out / "summary.json").read_text())
    summary["load_run_command"] = " ".join(sys.argv)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n## dashboards, halfway\n" + during.get("text", "(no snapshot)"))
    print("\n## dashboards, after the run\n" + after)
    print((args.out / "summary.md").read_text())
    if args.soak:
        report, clean = soak_report(before, idle_after, summary, args.warmup)
        (args.out / "soak.md").write_text(report)
        (args.out / "soak.json").write_text(json.dumps({"before": before, "after": idle_after},
                                                       indent=2) + "\n")
        print("\n## soak\n" + report)
        sys.exit(proc.returncode or (0 if clean else 1))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
