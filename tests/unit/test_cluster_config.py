"""Cluster configuration: dict / Serve-YAML mapping, validation, transport choice."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from flashmemory.cluster.config import ClusterConfig
from flashmemory.cluster.config_io import cluster_config_from_dict
from flashmemory.cluster.serve_cli import applications
from flashmemory.cluster.transport import TransferPlan
from flashmemory.config import EngineConfig, LSAConfig


def test_example_serve_yaml_maps_onto_configs() -> None:
    ns = argparse.Namespace(config=Path("examples/serve.yaml"), host="0.0.0.0", port=1)
    apps, http = applications(ns)
    assert http == {"host": "127.0.0.1", "port": 8000}
    cfg = cluster_config_from_dict(apps[0]["args"])
    assert cfg.engine.model == "smollm2-135m-instruct" and cfg.engine.lsa.budget == 0.1
    assert cfg.num_decode == 1 and cfg.resolved_transport() == "torch" and cfg.backend == "gloo"


def test_unknown_keys_name_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown lsa field.*budgett.*allowed"):
        cluster_config_from_dict({"lsa": {"budgett": 0.1}})
    with pytest.raises(ValueError, match="unknown cluster field"):
        cluster_config_from_dict({"num_decoders": 2})
    with pytest.raises(ValueError, match="unknown transport"):
        cluster_config_from_dict({"transport": "carrier-pigeon"})


def test_shared_gpu_uses_ipc_and_oracle_is_refused() -> None:
    gpu = ClusterConfig(engine=EngineConfig(device="cuda"), num_gpus_per_worker=0.5)
    assert gpu.resolved_transport() == "ipc" and gpu.backend == "nccl"
    assert ClusterConfig(engine=EngineConfig(device="cuda"),
                         num_gpus_per_worker=1).resolved_transport() == "torch"
    with pytest.raises(ValueError, match="oracle"):
        ClusterConfig(engine=EngineConfig(lsa=LSAConfig(mode="oracle")))


def test_transfer_plan_bytes() -> None:
    plan = TransferPlan(1, "r", (0, 3, 7), 0, 1, (30, 2, 3, 64, 64), "float32")
    assert plan.shape == (3, 30, 2, 3, 64, 64)
    assert plan.nbytes == torch.zeros(plan.shape).nbytes


@pytest.mark.parametrize("bad", [{"max_restarts": -2}, {"restart_wait_s": -1},
                                 {"indexer_timeout_s": 0}])
def test_fault_settings_are_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        cluster_config_from_dict(bad)


def test_transfer_ids_are_unique_per_rank_and_restart_and_fit_a_gloo_tag() -> None:
    from itertools import islice

    from flashmemory.cluster.transport import transfer_ids

    runs = [list(islice(transfer_ids(rank), 1000)) for rank in (1, 1, 2)]  # rank 1 restarted
    assert len({i for run in runs for i in run}) == 3000
    plan = TransferPlan(runs[2][-1], "r", (0,), 0, 2, (1, 2, 1, 4, 4), "float32")
    assert 0 <= plan.tag < 2**31
