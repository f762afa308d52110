"""``flashmemory loadtest``: build a prompt set, run the locustfile headless against a running
server, and write Locust's CSVs plus a vLLM-style summary (summary.json, summary.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from flashmemory.loadtest import locustfile_path
from flashmemory.loadtest.summary import format_summary, parse_slos, read_records, summarize

logger = logging.getLogger(__name__)


def _lengths(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = 1024 if part.endswith("k") else 1
        try:
            n = int(part.removesuffix("k")) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad context length {part!r}") from None
        if n < 256:
            raise argparse.ArgumentTypeError(f"context length {n} is below 256 tokens")
        out.append(n)
    return out


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("loadtest", help="Locust load test of a running server (headless)")
    p.add_argument("--host", default="http://127.0.0.1:8000", help="server base URL")
    p.add_argument("--model", help="served model id (default: the first of /v1/models)")
    p.add_argument("--prompts", type=Path, help="prompt set (JSON lines); default: build one")
    p.add_argument("--context-tokens", type=_lengths, default=[2048],
                   help="context lengths of the built prompt set, e.g. 2048,8k")
    p.add_argument("--num-prompts", type=int, default=8, help="built prompts per length")
    p.add_argument("--tokenizer", help="model whose tokenizer measures prompts (default "
                                       "--model)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kv-budget", type=float, help="kv_budget sent with each request")
    p.add_argument("--users", type=int, default=4, help="concurrent users (closed loop)")
    p.add_argument("--spawn-rate", type=float, default=4.0)
    p.add_argument("--run-time", default="60s", help="e.g. 30s, 10m")
    p.add_argument("--goodput", nargs="*", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, vLLM style: ttft:2000 tpot:200 e2el:10000")
    p.add_argument("--out", type=Path, required=True, help="output directory")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)
    return p


def _served_model(host: str, api_key: str | None) -> str:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{host.rstrip('/')}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return str(r.json()["data"][0]["id"])


def _prompt_file(args: argparse.Namespace, model: str) -> Path:
    if args.prompts is not None:
        if not args.prompts.exists():
            raise FileNotFoundError(f"prompt file '{args.prompts}' not found")
        return args.prompts
    from flashmemory.loadtest.prompts import build_prompts, write_prompts
    from flashmemory.model.loader import load_tokenizer, resolve

    tok = load_tokenizer(resolve(args.tokenizer or model))
    rows = build_prompts(tok, args.context_tokens, args.num_prompts, args.max_tokens)
    path = args.out / "prompts.jsonl"
    write_prompts(rows, path)
    return path


def run(args: argparse.Namespace, argv: list[str]) -> int:
    slos = parse_slos(args.goodput)
    if args.users < 1 or args.spawn_rate <= 0:
        raise ValueError("--users must be >= 1 and --spawn-rate > 0")
    args.out.mkdir(parents=True, exist_ok=True)
    api_key = os.environ.get("FLASHMEMORY_API_KEY")
    model = args.model or _served_model(args.host, api_key)
    prompts = _prompt_file(args, model)
    records = args.out / "requests.jsonl"
    records.unlink(missing_ok=True)
    env = {**os.environ, "FM_PROMPTS": str(prompts), "FM_MODEL": model,
           "FM_MAX_TOKENS": str(args.max_tokens), "FM_RECORDS": str(records)}
    if args.kv_budget is not None:
        env["FM_KV_BUDGET"] = str(args.kv_budget)
    if api_key:
        env["FM_API_KEY"] = api_key
    cmd = [sys.executable, "-m", "locust", "-f", str(locustfile_path()), "--headless",
           "--host", args.host, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
           "--run-time", args.run_time, "--stop-timeout", "300", "--csv",
           str(args.out / "locust"), "--only-summary", "--loglevel", "WARNING"]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, check=False)
    duration = time.time() - t0
    recs = read_records(records)
    if recs:  # the run's span: first request sent to last request done
        duration = max(r["start"] + r["e2e"] for r in recs) - min(r["start"] for r in recs)
    summary = summarize(recs, duration, slos)
    summary.update({"host": args.host, "model": model, "users": args.users,
                    "run_time": args.run_time, "prompts": str(prompts),
                    "locust_exit_code": proc.returncode, "command": " ".join(argv)})
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_summary(summary)
    (args.out / "summary.md").write_text(text)
    print(text, end="")
    if not recs:
        raise RuntimeError(f"locust exited with {proc.returncode} and recorded no request")
    return 0 if summary["failed"] == 0 and proc.returncode == 0 else 1
