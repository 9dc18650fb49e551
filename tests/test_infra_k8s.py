"""KubeRay manifests: every overlay renders with kustomize and passes our schema; the schema catches breakage."""

from __future__ import annotations

import copy
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.k8s.render import render  # noqa: E402
from infra.k8s.validate import GPU, Checker, parse_quantity, validate  # noqa: E402

OVERLAYS = {name: REPO / "infra/k8s/overlays" / name for name in ("cpu-smoke", "gpu-8x")}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in OVERLAYS.items()}


def ray_version() -> str:
    import ray

    return ray.__version__


def one(manifests: list[dict], kind: str) -> dict:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def project_version() -> str:
    match = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M)
    assert match, "pyproject.toml: no version"
    return match.group(1)


def ray_containers(cluster: dict) -> list[dict]:
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_is_valid(rendered: dict, overlay: str) -> None:
    manifests = rendered[overlay]
    assert {m["kind"] for m in manifests} == {"ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob"}
    assert validate(manifests, ray_version()) == []
    assert all(m["metadata"].get("namespace") == "dd2dist" for m in manifests)


def test_ray_version_is_the_pinned_one(rendered: dict) -> None:
    pinned = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert pinned, "pyproject.toml: ray is not pinned with =="
    for manifests in rendered.values():
        assert one(manifests, "RayCluster")["spec"]["rayVersion"] == pinned.group(1) == ray_version()


def test_gpu_overlay_shape(rendered: dict) -> None:
    cluster = one(rendered["gpu-8x"], "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert Checker.gpus(head["template"]["spec"]) == 0
    assert head["rayStartParams"]["num-cpus"] == "0", "the head must not take training work"
    (group,) = cluster["spec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert Checker.gpus(pod) == 8
    assert pod["containers"][0]["resources"]["requests"][GPU] == "8"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert parse_quantity(shm["emptyDir"]["sizeLimit"]) >= 8 * 2**30
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.", (REPO / "infra/docker/Dockerfile").read_text())
    for container in ray_containers(cluster):
        assert container["image"] == f"dd2dist:{project_version()}-cuda{cuda.group(1)}"
    job = one(rendered["gpu-8x"], "RayJob")
    assert "--config configs/experiments/" in job["spec"]["entrypoint"]
    assert "smoke_var_deepspeed" not in job["spec"]["entrypoint"]


def test_cpu_overlay_shape(rendered: dict) -> None:
    cluster = one(rendered["cpu-smoke"], "RayCluster")
    for group in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]:
        assert Checker.gpus(group["template"]["spec"]) == 0
    for container in ray_containers(cluster):
        assert container["image"] == f"dd2dist:{project_version()}-cpu"
    job = one(rendered["cpu-smoke"], "RayJob")
    assert job["spec"]["entrypoint"].startswith(
        "python jobs/distill.py --config configs/experiments/smoke_var_deepspeed.yaml --output /mnt/dd2dist/"
    )
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "working_dir: /workspace/dd2dist" in job["spec"]["runtimeEnvYAML"]


def test_tracking_uri_reaches_every_ray_container(rendered: dict) -> None:
    for manifests in rendered.values():
        env = one(manifests, "ConfigMap")
        assert env["data"]["MLFLOW_TRACKING_URI"].startswith("http://")
        assert env["data"]["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
        for container in ray_containers(one(manifests, "RayCluster")):
            assert {"configMapRef": {"name": env["metadata"]["name"]}} in container["envFrom"]


def test_quantities() -> None:
    assert parse_quantity("500m") == Decimal("0.5")
    assert parse_quantity("16Gi") == 16 * 2**30
    assert parse_quantity("2Ti") == 2 * 2**40
    assert parse_quantity("1e3") == 1000
    assert parse_quantity(8) == 8
    assert parse_quantity("1.5G") == Decimal("1.5e9")
    for bad in ("4GB", "", "Gi", "1,5", "-"):
        with pytest.raises(ValueError):
            parse_quantity(bad)


def _breakages():
    """(description, mutation of the gpu-8x manifests, substring the validator must report)."""

    def worker(m):
        return next(x for x in m if x["kind"] == "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]

    def head(m):
        return next(x for x in m if x["kind"] == "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]

    def job(m):
        return next(x for x in m if x["kind"] == "RayJob")["spec"]

    def env(m):
        return next(x for x in m if x["kind"] == "ConfigMap")["data"]

    return [
        ("volume removed", lambda m: worker(m)["volumes"].pop(0), "names volume 'dshm'"),
        ("latest image", lambda m: worker(m)["containers"][0].update(image="dd2dist:latest"), "not pinned"),
        ("untagged image", lambda m: head(m)["containers"][0].update(image="dd2dist"), "has no tag"),
        ("gpu limit != request",
         lambda m: worker(m)["containers"][0]["resources"]["limits"].update({GPU: "4"}), "must be equal"),
        ("no toleration", lambda m: worker(m).pop("tolerations"), "no toleration"),
        ("bad quantity", lambda m: worker(m)["containers"][0]["resources"]["limits"].update(memory="480GB"),
         "not a Kubernetes quantity"),
        ("request > limit", lambda m: worker(m)["containers"][0]["resources"]["requests"].update(cpu="65"),
         "> limit"),
        ("disk-backed shm", lambda m: worker(m)["volumes"][0]["emptyDir"].pop("medium"), "medium: Memory"),
        ("no preStop", lambda m: head(m)["containers"][0].pop("lifecycle"), "ray stop"),
        ("no tracking env", lambda m: env(m).pop("MLFLOW_TRACKING_URI"), "MLFLOW_TRACKING_URI"),
        ("loopback ray", lambda m: env(m).update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"), "loopback"),
        ("head gpu", lambda m: head(m)["containers"][0]["resources"].update(
            requests={GPU: "1"}, limits={GPU: "1"}), "asks for GPUs"),
        ("other entrypoint", lambda m: job(m).update(entrypoint="python train.py --config configs/a.yaml"),
         "jobs/distill.py"),
        ("output off storage", lambda m: job(m).update(
            entrypoint="python jobs/distill.py --config configs/a.yaml --output /tmp/run"), "shared storage"),
        ("unknown cluster", lambda m: job(m).update(clusterSelector={"ray.io/cluster": "nope"}), "'nope'"),
        ("missing pvc", lambda m: [m.remove(x) for x in list(m) if x["kind"] == "PersistentVolumeClaim"],
         "not a rendered PVC"),
        ("storage not on workers", lambda m: worker(m)["containers"][0]["volumeMounts"].pop(1),
         "differ from the head"),
        ("replicas out of range", lambda m: next(x for x in m if x["kind"] == "RayCluster")["spec"]
         ["workerGroupSpecs"][0].update(replicas=3), "minReplicas <= replicas <= maxReplicas"),
        ("numeric ray param", lambda m: next(x for x in m if x["kind"] == "RayCluster")["spec"]
         ["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "must be a string"),
    ]


@pytest.mark.parametrize("description,mutate,expected", _breakages(), ids=[b[0] for b in _breakages()])
def test_schema_catches(rendered: dict, description: str, mutate, expected: str) -> None:
    manifests = copy.deepcopy(rendered["gpu-8x"])
    mutate(manifests)
    problems = validate(manifests, ray_version())
    assert any(expected in p for p in problems), f"{description}: {problems}"


def test_schema_checks_the_ray_version(rendered: dict) -> None:
    problems = validate(rendered["cpu-smoke"], ray_version="0.0.1")
    assert any("differs from the installed ray 0.0.1" in p for p in problems)


def test_render_errors_name_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no kustomization.yaml"):
        render(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    with pytest.raises(RuntimeError, match=f"kustomize failed on {tmp_path}"):
        render(tmp_path)
