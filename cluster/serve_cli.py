"""``flashmemory serve``: start a local Ray cluster (or join one) and run the OpenAI-compatible app.

With no arguments: the embedded default model on 127.0.0.1:8000. ``--config FILE.yaml`` takes a
Ray Serve config file (``applications[].import_path/args``, ``http_options``), the same file that
``serve run FILE.yaml`` and KubeRay's ``serveConfigV2`` use.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
DEFAULT_IMPORT_PATH = "flashmemory.cluster.serve_app:build"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API on a Ray cluster")
    p.add_argument("--config", type=Path, help="Ray Serve config YAML (applications + http)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default loopback only; 0.0.0.0 exposes the API)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (or set "
                        "FLASHMEMORY_API_KEY)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default=None, help="model (default smollm2-135m-instruct)")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--device", default=None, help="cpu or cuda")
    p.add_argument("--budget", type=float, default=None, help="default kv budget (fraction)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start one)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def applications(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(applications, http_options) from --config, or from the flags."""
    if args.config is not None:
        import yaml

        if not args.config.exists():
            raise FileNotFoundError(f"config file '{args.config}' not found")
        doc = yaml.safe_load(args.config.read_text()) or {}
        apps = doc.get("applications") or []
        if not apps:
            raise ValueError(f"{args.config}: no 'applications' in the Serve config")
        http = dict(doc.get("http_options") or {})
        http.setdefault("host", args.host)
        http.setdefault("port", args.port)
        return apps, http
    app_args: dict[str, Any] = {"num_prefill": args.num_prefill, "num_decode": args.num_decode}
    engine: dict[str, Any] = {}
    if args.model:
        engine["model"] = args.model
    if args.device:
        engine["device"] = args.device
    if engine:
        app_args["engine"] = engine
    if args.budget is not None:
        app_args["lsa"] = {"budget": args.budget}
    app = {"name": "flashmemory", "route_prefix": "/", "import_path": DEFAULT_IMPORT_PATH,
           "args": app_args}
    return [app], {"host": args.host, "port": args.port}


def _builder(import_path: str) -> Any:
    module, _, attr = import_path.partition(":")
    return getattr(importlib.import_module(module), attr)


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """Deploy and block until interrupted."""
    import ray
    from ray import serve

    apps, http = applications(args)
    for a in apps:  # validate the config before starting anything
        from flashmemory.cluster.config_io import cluster_config_from_dict
        from flashmemory.cluster.launch import check_backbone

        if a.get("import_path", DEFAULT_IMPORT_PATH) == DEFAULT_IMPORT_PATH:
            check_backbone(cluster_config_from_dict(dict(a.get("args") or {})))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.api_key:  # the Serve replicas of this local cluster inherit the environment
        from flashmemory.cluster.serve_app import API_KEY_ENV

        os.environ[API_KEY_ENV] = args.api_key
    # Jobs submitted to this local cluster (`ray job submit -- flashmemory eval ...`) run in a
    # shell that inherits this environment: put this interpreter's bin/ first on PATH so the
    # `flashmemory` and `python` there are ours even when the venv was never activated.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
    ray.init(address=args.address, include_dashboard=True, logging_level="WARNING")
    serve.start(http_options={"host": http["host"], "port": int(http["port"])})
    for a in apps:
        builder = _builder(a.get("import_path", DEFAULT_IMPORT_PATH))
        serve.run(builder(dict(a.get("args") or {})), name=a.get("name", "flashmemory"),
                  route_prefix=a.get("route_prefix", "/"))
    print(f"FlashMemory serving on http://{http['host']}:{http['port']}/v1 (Ctrl-C stops)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0
