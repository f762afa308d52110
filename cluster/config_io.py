"""Map plain dicts (Serve YAML ``args``, CLI) onto ClusterConfig / EngineConfig / LSAConfig."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from flashmemory.cluster.config import ClusterConfig
from flashmemory.config import EngineConfig, LSAConfig


def _pick(cls: type, d: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {where} field(s) {unknown}; allowed: {sorted(names)}")
    return d


def cluster_config_from_dict(args: dict[str, Any]) -> ClusterConfig:
    """``{"num_decode": 2, "engine": {"model": ...}, "lsa": {"budget": 0.1}}`` -> ClusterConfig.

    ``served_model_name`` is accepted and ignored here (the ingress reads it).
    """
    args = dict(args)
    args.pop("served_model_name", None)
    lsa = LSAConfig(**_pick(LSAConfig, args.pop("lsa", {}) or {}, "lsa"))
    engine = dict(args.pop("engine", {}) or {})
    engine.pop("lsa", None)
    eng = EngineConfig(**_pick(EngineConfig, engine, "engine"), lsa=lsa)
    return ClusterConfig(engine=eng, **_pick(ClusterConfig, args, "cluster"))
