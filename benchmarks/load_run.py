"""A load run with the operator's view: serve the model on a local Ray cluster, scrape it with a
Prometheus server, drive it with ``flashmemory loadtest`` (Locust), and record what the Grafana
dashboards' expressions showed halfway through the run and after it.

CPU:  python benchmarks/load_run.py --out runs/cpu
H200: python benchmarks/load_run.py --gpu-shape smollm2 --tokenizer .gpu/tok --out runs/h200 \
          --context-tokens 8192,32768 --users 8
Writes OUT/{summary.md,summary.json,dashboards-during.md,dashboards-after.md,locust_*.csv}.
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
    ap.add_argument("--serve-args", type=json.loads, default={},
                    help='extra Serve app args (ClusterConfig fields) as JSON, e.g. '
                         '\'{"kv_capacity_gb": 0.05, "admission_timeout_s": 5}\'')
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

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
    cmd = [sys.executable, "-m", "flashmemory", "loadtest", "--host", f"http://127.0.0.1:{port}",
           "--model", serve_args.get("served_model_name", args.model), "--tokenizer", tokenizer,
           "--context-tokens", args.context_tokens, "--num-prompts", str(args.num_prompts),
           "--users", str(args.users), "--spawn-rate", str(args.users),
           "--run-time", f"{args.run_time}s", "--max-tokens", str(args.max_tokens),
           "--goodput", *args.goodput, "--out", str(args.out)]
    during: dict[str, str] = {}
    timer = threading.Timer(30 + args.run_time / 2, lambda: during.setdefault(
        "text", snapshot(prom_url, args.out / "dashboards-during.md", window)))
    timer.start()  # prompt building takes a while before Locust starts
    try:
        proc = subprocess.run(cmd, check=False)
        time.sleep(15)  # two export intervals: the last observations reach Prometheus
        after = snapshot(prom_url, args.out / "dashboards-after.md", window)
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
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
