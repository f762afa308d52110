"""The k8s/ manifests, checked offline (no Kubernetes, no Ray cluster): ray.io/v1 kinds against
KubeRay's CRD schemas in k8s/crds/ (strict: unknown fields rejected), built-in kinds with
kubernetes-validate (strict), the PodMonitor structurally (its CRD is not in the repo), the Serve
config against Ray Serve's schema and the project's own parser, and the cross-file invariants
(placement, token auth, nothing exposed, the eval job's command line)."""

from __future__ import annotations

import copy
import re
import shlex
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from flashmemory.cluster.config_io import cluster_config_from_dict

K8S = Path(__file__).resolve().parents[2] / "k8s"
K8S_VERSION = "1.33.0"  # schemas shipped with kubernetes-validate; a release GPU clouds run
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
APPLIED_SEPARATELY = {"podmonitor.yaml", "rayjob-eval.yaml"}  # not in kustomization.yaml
EXPOSED = {"LoadBalancer", "NodePort"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 3 MB

# PodMonitor (monitoring.coreos.com/v1): the subset of its fields these manifests may use.
MONITOR_SPEC = {"selector", "namespaceSelector", "podMetricsEndpoints", "jobLabel",
                "podTargetLabels", "sampleLimit"}
MONITOR_ENDPOINT = {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout",
                    "honorLabels", "relabelings", "metricRelabelings"}
RELABELING = {"sourceLabels", "separator", "targetLabel", "regex", "modulus", "replacement",
              "action"}


# -- loading and validation ---------------------------------------------------------------------
def manifest_files() -> list[Path]:
    """Top-level k8s/*.yaml (crds/, grafana/ and prometheus/ hold no manifests to apply)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=Loader) if d is not None]


def find(kind: str, path: str) -> dict[str, Any]:
    (doc,) = [d for d in load(K8S / path) if d["kind"] == kind]
    return doc


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's structural schema as JSON Schema that rejects unknown fields (as the API server
    does with strict field validation) and knows int-or-string and nullable."""
    s = dict(schema)
    if "properties" in s:
        s["properties"] = {k: _strict(v) for k, v in s["properties"].items()}
        if "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = _strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = _strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [_strict(x) for x in s[key]]
    if s.get("x-kubernetes-int-or-string") and "anyOf" not in s:
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.get("nullable") and isinstance(s.get("type"), str):
        s["type"] = [s["type"], "null"]
    return s


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load((K8S / "crds" / CRD_FILES[kind]).read_text(), Loader=Loader)
    assert crd["spec"]["group"] == "ray.io" and crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    # CEL rules (x-kubernetes-validations) are not evaluated; none touch fields used here.
    return jsonschema.Draft7Validator(_strict(v1["schema"]["openAPIV3Schema"]))


def check_monitor(doc: dict[str, Any]) -> None:
    """Structural check of a PodMonitor: required parts present, field names from the subset."""
    def known(d: Any, allowed: set[str], where: str) -> None:
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a mapping")
        if set(d) - allowed:
            raise ValueError(f"{where}: unknown field(s) {sorted(set(d) - allowed)}")

    if doc["kind"] != "PodMonitor" or not doc.get("metadata", {}).get("name"):
        raise ValueError("expected a named PodMonitor")
    spec = doc.get("spec") or {}
    known(spec, MONITOR_SPEC, "spec")
    if not (spec.get("selector", {}).get("matchLabels") or spec.get("selector", {}).get(
            "matchExpressions")):
        raise ValueError("spec.selector selects nothing")
    if not spec.get("podMetricsEndpoints"):
        raise ValueError("spec.podMetricsEndpoints is empty")
    for ep in spec["podMetricsEndpoints"]:
        known(ep, MONITOR_ENDPOINT, "podMetricsEndpoints[]")
        if not isinstance(ep.get("port"), str):
            raise ValueError("an endpoint needs a named port")
        for r in ep.get("relabelings", []) + ep.get("metricRelabelings", []):
            known(r, RELABELING, "relabelings[]")


def validate(doc: dict[str, Any]) -> None:
    """Raise unless ``doc`` is a valid object of its kind; dispatches on apiVersion."""
    api = doc.get("apiVersion", "")
    if api == "ray.io/v1":
        crd_validator(doc["kind"]).validate(doc)
        # The CRD leaves metadata open: check it as the ObjectMeta of a built-in object.
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": doc["metadata"]}, K8S_VERSION, strict=True)
    elif api == "monitoring.coreos.com/v1":
        check_monitor(doc)
    else:  # built-in kinds; an unknown kind raises SchemaNotFoundError
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) of every Ray cluster the manifests create."""
    field = {"RayService": "rayClusterConfig", "RayJob": "rayClusterSpec"}
    return [(f"{path.name}:{d['kind']}", d["spec"][field[d["kind"]]] if d["kind"] in field
             else d["spec"])
            for path in manifest_files() for d in load(path)
            if d["kind"] in {"RayService", "RayJob", "RayCluster"}]


def serve_config() -> dict[str, Any]:
    return yaml.safe_load(find("RayService", "rayservice.yaml")["spec"]["serveConfigV2"])


def pod_templates(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


# -- every manifest is valid --------------------------------------------------------------------
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_manifest_is_valid(path: Path) -> None:
    docs = load(path)
    assert docs, f"{path.name} holds no document"
    for doc in docs:
        validate(doc)


def _typo(doc: dict[str, Any]) -> None:
    cluster = doc["spec"]["rayClusterConfig"]
    cluster["workerGroupSpec"] = cluster.pop("workerGroupSpecs")


def _no_group_name(doc: dict[str, Any]) -> None:
    del doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"]


def _int_resource(doc: dict[str, Any]) -> None:  # KubeRay wants quantities as strings here
    doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["resources"] = {"prefill": 1}


def _bad_auth_mode(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["authOptions"]["mode"] = "tokens"


def _container_typo(doc: dict[str, Any]) -> None:
    doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicyy"] = "Always"


def _metadata_typo(doc: dict[str, Any]) -> None:
    doc["metadata"]["lables"] = doc["metadata"].pop("labels")


@pytest.mark.parametrize("break_it", [_typo, _no_group_name, _int_resource, _bad_auth_mode,
                                      _container_typo, _metadata_typo])
def test_validator_rejects_a_broken_rayservice(break_it: Any) -> None:
    doc = copy.deepcopy(find("RayService", "rayservice.yaml"))
    validate(doc)
    break_it(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def test_validator_rejects_broken_builtin_and_monitor() -> None:
    cm = copy.deepcopy(find("ConfigMap", "rayjob-eval.yaml"))
    cm["datas"] = cm.pop("data")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(cm)
    pm = copy.deepcopy(find("PodMonitor", "podmonitor.yaml"))
    pm["spec"]["podMetricsEndpoints"][0]["prot"] = pm["spec"]["podMetricsEndpoints"][0].pop("port")
    with pytest.raises(ValueError, match="prot"):
        validate(pm)


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    assert all((K8S / r).is_file() for r in listed | APPLIED_SEPARATELY), listed
    assert {p.name for p in manifest_files()} == listed | APPLIED_SEPARATELY
    assert not listed & APPLIED_SEPARATELY


# -- the Serve config ---------------------------------------------------------------------------
def test_serve_config_passes_ray_serve_schema() -> None:
    cfg = serve_config()
    ServeDeploySchema.model_validate(cfg)
    # Ray's models ignore unknown keys; a misspelled key would silently do nothing.
    assert set(cfg) <= set(ServeDeploySchema.model_fields)
    for app in cfg["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields)
    with pytest.raises(ValueError):  # pydantic's ValidationError is a ValueError
        ServeDeploySchema.model_validate({"applications": [{"import_pat": "x:y"}]})


def test_serve_args_are_accepted_by_the_server() -> None:
    (app,) = serve_config()["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert (module, attr) == ("flashmemory.cluster.serve_app", "build")
    cfg = cluster_config_from_dict(app["args"])  # what build() does first
    assert cfg.engine.device == "cuda" and cfg.num_gpus_per_worker >= 1
    assert cfg.resolved_transport() == "torch"  # separate pods: NCCL, not same-host IPC
    with pytest.raises(ValueError, match="num_prefil"):
        cluster_config_from_dict({**app["args"], "num_prefil": 1})


def test_prefill_and_decode_land_on_their_own_gpu_groups() -> None:
    cfg = cluster_config_from_dict(serve_config()["applications"][0]["args"])
    for where, spec in cluster_specs():
        groups = spec["workerGroupSpecs"]
        for role, want, count in (("prefill", cfg.prefill_resources, cfg.num_prefill),
                                  ("decode", cfg.decode_resources, cfg.num_decode)):
            assert want, f"{role}_resources is empty: actors could land anywhere"
            hosts = [g for g in groups if set(want) <= set(g.get("resources", {}))]
            assert len(hosts) == 1, (where, role)
            (g,) = hosts
            limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
            per_pod = min([float(g["resources"][k]) // v for k, v in want.items()]
                          + [float(limits["nvidia.com/gpu"]) // cfg.num_gpus_per_worker])
            assert per_pod * g["replicas"] >= count, (where, role)
        selectors = [tuple(sorted(g["template"]["spec"]["nodeSelector"].items())) for g in groups]
        assert len(set(selectors)) == len(groups), f"{where}: groups share a node selector"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
        assert "nvidia.com/gpu" not in head.get("limits", {})


# -- security: token auth on, nothing exposed ---------------------------------------------------
def test_token_auth_is_on_and_nothing_is_exposed() -> None:
    specs = cluster_specs()
    assert {w.split(":")[1] for w, _ in specs} == {"RayService", "RayJob"}
    for where, spec in specs:
        assert spec.get("authOptions", {}).get("mode") == "token", where
        major, minor, _ = (int(x) for x in spec["rayVersion"].split("."))
        assert (major, minor) >= (2, 52), f"{where}: token auth needs Ray >= 2.52"
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") not in EXPOSED and not head.get(
            "enableIngress"), where
        for t in pod_templates(spec):
            for c in t["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("RAY_AUTH_MODE", "token") == "token", where
    svc = find("RayService", "rayservice.yaml")["spec"].get("serveService", {})
    assert svc.get("spec", {}).get("type", "ClusterIP") not in EXPOSED
    for path in manifest_files():
        for d in load(path):
            assert not (d["kind"] == "Service" and d["spec"].get("type") in EXPOSED), path


# -- the eval RayJob ----------------------------------------------------------------------------
def _eval_parts() -> tuple[str, list[str]]:
    """(deploy command, `flashmemory eval` argv) of the RayJob's entrypoint."""
    entrypoint = find("RayJob", "rayjob-eval.yaml")["spec"]["entrypoint"]
    # KubeRay pastes the entrypoint into a shell line: keep every operator inside one argument.
    assert not re.search(r"[$`\\]", entrypoint)
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3, argv
    deploy, run = argv[2].split(" && ")
    return deploy, shlex.split(run)


def test_eval_job_serves_the_same_app_and_runs_a_valid_eval() -> None:
    from flashmemory.cli import build_parser

    cm = find("ConfigMap", "rayjob-eval.yaml")
    assert yaml.safe_load(cm["data"]["serve.yaml"]) == serve_config()
    deploy, argv = _eval_parts()
    spec = find("RayJob", "rayjob-eval.yaml")["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in head["containers"][0]["volumeMounts"]}
    assert mounts["/etc/flashmemory"]["configMap"]["name"] == cm["metadata"]["name"]
    assert shlex.split(deploy) == ["python", "/etc/flashmemory/deploy.py",
                                   "/etc/flashmemory/serve.yaml"]
    assert argv[:2] == ["flashmemory", "eval"]
    args = build_parser().parse_args(argv[1:])
    app = serve_config()["applications"][0]["args"]
    assert args.cluster == "auto" and "oracle" not in args.modes
    assert args.model == app["engine"]["model"] and args.chunk_size == app["lsa"]["chunk_size"]
    assert any(str(args.out).startswith(m) for m in mounts)


def test_eval_job_deploy_script_runs_the_app_builder(monkeypatch, tmp_path) -> None:
    from ray import serve

    cm = find("ConfigMap", "rayjob-eval.yaml")
    (tmp_path / "serve.yaml").write_text(cm["data"]["serve.yaml"])
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(serve, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    monkeypatch.setattr(sys, "argv", ["deploy.py", str(tmp_path / "serve.yaml")])
    exec(compile(cm["data"]["deploy.py"], "deploy.py", "exec"), {"__name__": "__main__"})
    assert [(c["name"], c["route_prefix"]) for c in calls] == [("flashmemory", "/")]


def test_eval_job_cluster_matches_the_service() -> None:
    service = find("RayService", "rayservice.yaml")["spec"]["rayClusterConfig"]
    job = find("RayJob", "rayjob-eval.yaml")["spec"]["rayClusterSpec"]
    assert job["workerGroupSpecs"] == service["workerGroupSpecs"]
    for key in ("rayVersion", "authOptions"):
        assert job[key] == service[key]


def test_one_image_and_ray_version_everywhere() -> None:
    m = re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)-", (K8S / "Dockerfile").read_text(),
                  re.M)
    assert m, "k8s/Dockerfile must build on a rayproject/ray image"
    images = set()
    for where, spec in cluster_specs():
        assert spec["rayVersion"] == m.group(1), where
        images |= {c["image"] for t in pod_templates(spec) for c in t["spec"]["containers"]}
    assert len(images) == 1, images


def test_image_copies_every_package_folder() -> None:
    """pip install . inside the image needs every folder pyproject maps a package onto."""
    import tomllib

    dirs = set(tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]
               ["package-dir"].values())
    copied = set(re.findall(r"^COPY \S+ (\S+) \1$", (K8S / "Dockerfile").read_text(), re.M))
    assert dirs <= copied, sorted(dirs - copied)


# -- Prometheus ---------------------------------------------------------------------------------
def test_podmonitor_and_scrape_config_find_every_ray_pod() -> None:
    pm = find("PodMonitor", "podmonitor.yaml")["spec"]
    (ep,) = pm["podMetricsEndpoints"]
    ours = {k: v for k, v in pm["selector"]["matchLabels"].items() if not k.startswith("ray.io/")}
    for where, spec in cluster_specs():
        for t in pod_templates(spec):
            assert ours.items() <= t["metadata"]["labels"].items(), where
            ports = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
            assert ports.get(ep["port"]) == 8080, where  # KubeRay's metrics export port
    (job,) = yaml.safe_load((K8S / "prometheus/scrape-config.yaml").read_text())["scrape_configs"]
    assert job["job_name"] and job["kubernetes_sd_configs"] == [{"role": "pod"}]
    keep = {r["source_labels"][0]: r["regex"] for r in job["relabel_configs"]
            if r.get("action") == "keep"}
    want = {f"__meta_kubernetes_pod_label_{re.sub('[^a-z0-9]', '_', k)}": v
            for k, v in pm["selector"]["matchLabels"].items()}
    assert keep == {**want, "__meta_kubernetes_pod_container_port_name": ep["port"]}
