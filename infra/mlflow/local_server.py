"""Start the MLflow tracking server on this machine: loopback only, SQLite store, artefacts in a folder.

The single-machine counterpart of infra/mlflow/k8s (same server flags, SQLite instead of PostgreSQL, a folder
instead of S3). `make mlflow-server` runs it; then point runs at it with
``MLFLOW_TRACKING_URI=http://127.0.0.1:5000``.

    python infra/mlflow/local_server.py [--root runs/mlflow] [--port 5000] [--workers 1]

Measured on a 2-core CPU machine (docs/environment.md §5): ~4 s to ready and ~500 MB with one worker and the job
runner off; the defaults (4 workers + job runner) take 3.2 GB.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (127.0.0.0/8, ::1 or localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(root: str | Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 1,
                   allowed_hosts: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The ``mlflow server`` argv and environment for a local server whose store lives under ``root``.

    ``root/mlflow.db`` is the SQLite backend store and ``root/artifacts`` the proxied artefact folder (clients
    upload through the server, so they need no access to that folder). Raises ValueError for a host that is
    not loopback or a port/worker count out of range.
    """
    if not is_loopback(host):
        raise ValueError(f"host {host!r} is not a loopback address: the local server is for this machine only "
                         "(use infra/mlflow/k8s for a shared server)")
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(root).expanduser().resolve()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    program = [str(mlflow_bin)] if mlflow_bin.exists() else [sys.executable, "-m", "mlflow"]
    argv = program + [
        "server",
        "--host", host,
        "--port", str(port),
        "--workers", str(workers),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]
    if allowed_hosts:
        argv += ["--allowed-hosts", allowed_hosts]
    env = dict(os.environ)
    # The job runner is a second server process (~2.7 GB more); dd2dist never submits MLflow jobs.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return argv, env


def wait_ready(url: str, timeout_s: float = 60.0, process=None) -> float:
    """Poll ``url``/health until it answers 200; returns the seconds waited.

    Raises RuntimeError when ``process`` (a Popen) exits first, TimeoutError after ``timeout_s``.
    """
    start = time.monotonic()
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"mlflow server at {url} not ready after {timeout_s:.0f} s")
        time.sleep(0.25)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/mlflow", help="folder for mlflow.db and artifacts/")
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        command, env = server_command(args.root, args.host, args.port, args.workers)
    except ValueError as err:
        parser.error(str(err))
    Path(args.root).mkdir(parents=True, exist_ok=True)
    print(f"MLflow at http://{args.host}:{args.port}  (store: {Path(args.root).resolve()})", flush=True)
    # Replace this process so that Ctrl-C and `kill` reach the server directly.
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main()
