"""A Prometheus server for a local run: scrapes one target (a Ray node's metrics port) into a
fresh data directory. Used by tests/e2e/test_ops.py and benchmarks/load_run.py."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import httpx


def start_prometheus(binary: str, target: str, workdir: Path,
                     scrape_interval_s: float = 1.0) -> tuple[subprocess.Popen, str]:
    """Start ``binary`` scraping ``target`` (host:port); returns the process and its URL once it
    is ready. Its log goes to ``workdir/prometheus.log``."""
    workdir.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = workdir / "prometheus.yml"
    cfg.write_text(
        f"global:\n  scrape_interval: {scrape_interval_s:g}s\n"
        f"  evaluation_interval: {scrape_interval_s:g}s\n"
        "scrape_configs:\n  - job_name: ray\n    static_configs:\n"
        f"      - targets: ['{target}']\n")
    log = workdir / "prometheus.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [binary, f"--config.file={cfg}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=err)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"prometheus did not start: {log.read_text()}")
