"""Cluster definitions validate offline: launcher files against the schema inside the ray package,
KubeRay manifests for their API, kinds and fields (and against the CRDs in ../shared/kuberay/ when
that folder exists), entrypoints that exist and parse. A broken copy fails naming the field."""

from __future__ import annotations

import shlex
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from cluster.validate import CRD_DIR, definition_files, entrypoint_problem, problems
from tests.conftest import ROOT

CLUSTER = ROOT / "cluster"
FILES = definition_files(CLUSTER)
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def _load(path):
    return yaml.safe_load(path.read_text())


def _entrypoints() -> list[str]:
    return [d["spec"]["entrypoint"] for d in map(_load, KUBERAY) if d.get("kind") == "RayJob"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_validates(path):
    assert problems(path) == []


@pytest.mark.timeout(30)
def test_every_definition_is_covered():
    names = {str(p.relative_to(CLUSTER)) for p in FILES}
    assert {"aws.yaml", "gcp.yaml", "Dockerfile", "kuberay/raycluster.yaml"} <= names
    assert {"kuberay/rayjob-train.yaml", "kuberay/rayjob-tune.yaml", "kuberay/rayservice.yaml"} <= names


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_files_have_a_cpu_head_and_gpu_workers_that_install_deepfleet(path):
    c = _load(path)
    types = c["available_node_types"]
    head = types[c["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] == 0
    gpus = {name: t["resources"].get("GPU", 0) for name, t in types.items() if name != c["head_node_type"]}
    assert 8 in gpus.values() and any(0 < g < 8 for g in gpus.values()), gpus  # training and serving
    for name in gpus:
        assert 0 == types[name]["min_workers"] < types[name]["max_workers"] <= c["max_workers"]
    assert (
        c["docker"]["image"].startswith(f"rayproject/ray:{version('ray')}-") and "gpu" in c["docker"]["image"]
    )
    assert c["file_mounts"]["/home/ray/deepfleet"] == "."
    assert any("pip install" in cmd and "/home/ray/deepfleet" in cmd for cmd in c["setup_commands"])


@pytest.mark.timeout(30)
def test_rayjobs_run_deepfleet_on_the_raycluster_spec_and_shut_it_down():
    cluster = _load(CLUSTER / "kuberay" / "raycluster.yaml")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    gpus = {
        n: g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
        for n, g in groups.items()
    }
    assert gpus == {"gpu-train": "8", "gpu-serve": "1"}
    assert cluster["spec"]["rayVersion"] == version("ray")
    jobs = {d["metadata"]["name"]: d for d in map(_load, KUBERAY) if d["kind"] == "RayJob"}
    assert set(jobs) == {"deepfleet-train", "deepfleet-tune"}
    for name, job in jobs.items():
        assert job["spec"]["shutdownAfterJobFinishes"] is True
        assert job["spec"]["rayClusterSpec"] == cluster["spec"], f"{name} drifted from raycluster.yaml"
        assert shlex.split(job["spec"]["entrypoint"])[:3] == ["python", "-m", f"jobs.{name.split('-')[1]}"]


@pytest.mark.timeout(60)
def test_rayservice_serves_the_shipped_serve_config_on_the_serving_nodes():
    cluster = _load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    service = _load(CLUSTER / "kuberay" / "rayservice.yaml")
    shipped = yaml.safe_load((ROOT / "configs" / "serve" / "deepfleet.yaml").read_text())
    assert yaml.safe_load(service["spec"]["serveConfigV2"]) == shipped, (
        "rayservice.yaml drifted from the file"
    )
    spec = service["spec"]["rayClusterConfig"]
    # raycluster.yaml's head, plus Serve's HTTP port; its serving group only
    head, theirs = spec["headGroupSpec"], cluster["headGroupSpec"]
    ports = head["template"]["spec"]["containers"][0].pop("ports")
    theirs["template"]["spec"]["containers"][0].pop("ports")
    assert head == theirs and {"containerPort": 8000, "name": "serve"} in ports
    serving = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu-serve"]
    assert spec["workerGroupSpecs"] == serving
    assert spec["rayVersion"] == version("ray") and spec["authOptions"] == {"mode": "token"}


@pytest.mark.timeout(30)
def test_every_node_runs_serve_with_the_embedded_clusters_settings():
    from cluster.local import SERVE_ENV

    for path in LAUNCHERS:
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            start = [c for c in _load(path)[key] if "ray start" in c]
            assert start and all(f"{k}={v}" in c for c in start for k, v in SERVE_ENV.items()), (path, key)
    for path in KUBERAY:
        doc = _load(path)
        if doc["kind"] not in ("RayCluster", "RayJob", "RayService"):
            continue
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig") or doc["spec"]
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        for group in groups:
            for container in group["template"]["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in container.get("env", [])}
                assert all(env.get(k) == v for k, v in SERVE_ENV.items()), (path.name, container["name"])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("entrypoint", _entrypoints(), ids=lambda e: shlex.split(e)[2])
def test_every_entrypoint_exists_and_parses_its_arguments(entrypoint):
    assert entrypoint_problem(entrypoint) is None
    # and the module runs as the entrypoint names it
    module = shlex.split(entrypoint)[2]
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0 and "--profile" in proc.stdout, proc.stdout + proc.stderr


BROKEN = {
    # file: (text to replace, replacement, the field the message must name)
    "aws.yaml": (
        "resources: {CPU: 96, GPU: 8}",
        "resources: {CPU: 96, GPU: eight}",
        "available_node_types.gpu-train.resources.GPU",
    ),
    "gcp.yaml": ("max_workers: 8", "max_worker: 8", "max_worker: unknown field"),
    "kuberay/raycluster.yaml": (
        "      maxReplicas: 4\n",
        "",
        "spec.workerGroupSpecs[0].maxReplicas: required",
    ),
    "kuberay/rayjob-tune.yaml": (
        "--profile full",
        "--profil full",
        "spec.entrypoint: tune: No such option: --profil",
    ),
    "kuberay/rayjob-train.yaml": (
        "apiVersion: ray.io/v1",
        "apiVersion: ray.io/v1alpha1",
        "apiVersion: 'ray.io/v1alpha1'",
    ),
    "kuberay/shared-storage.yaml": (
        "accessModes: [ReadWriteMany]",
        "accesModes: [ReadWriteMany]",
        "spec.accessModes: required",
    ),
    "kuberay/rayservice.yaml": (
        "      batching: {max_batch_size: 16,",
        "      batching: {max_batch_sise: 16,",
        "spec.serveConfigV2: applications[0] (retinopathy).args.batching.max_batch_sise",
    ),
    "Dockerfile": ("FROM rayproject/ray:", "FROM python:3.11 AS x\n# ", "FROM: python:3.11"),
}


@pytest.mark.timeout(120)
def test_a_broken_copy_fails_naming_the_field(tmp_path):
    copies = []
    for rel, (old, new, _) in BROKEN.items():
        text = (CLUSTER / rel).read_text()
        assert old in text, rel
        copy = tmp_path / rel.replace("/", "-")
        copy.write_text(text.replace(old, new, 1))
        copies.append(str(copy))
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.validate", *copies],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    for copy, (rel, (_, _, named)) in zip(copies, BROKEN.items(), strict=True):
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(copy + ":")]
        assert any(named in ln for ln in lines), (rel, lines)


@pytest.mark.timeout(60)
@pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"no KubeRay CRDs at {CRD_DIR}")
def test_the_crd_schemas_catch_what_the_field_checks_do_not(tmp_path):
    text = (CLUSTER / "kuberay" / "rayjob-train.yaml").read_text()
    copy = tmp_path / "rayjob.yaml"
    copy.write_text(
        text.replace("shutdownAfterJobFinishes", "shutdownAfterJobFinish").replace(
            'cpu: "90"', "cpu: [90]", 1
        )
    )
    found = "\n".join(problems(copy))
    assert "spec.shutdownAfterJobFinish: unknown field (KubeRay CRD)" in found, found
    assert (
        "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.requests.cpu" in found
    ), found
