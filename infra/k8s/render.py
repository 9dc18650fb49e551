"""Render a kustomize directory into a list of manifests, with the kustomize that this machine has.

`kustomize build` when the standalone binary is on PATH, else `kubectl kustomize` (kubectl has embedded
kustomize since 1.14). Usage: ``python infra/k8s/render.py infra/k8s/overlays/gpu-8x``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml


def kustomize_command(directory: str | Path) -> list[str]:
    """The command that builds ``directory``; raises RuntimeError naming both tools when neither is installed."""
    if shutil.which("kustomize"):
        return ["kustomize", "build", str(directory)]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", str(directory)]
    raise RuntimeError("neither `kustomize` nor `kubectl` is on PATH: install one to render infra/k8s")


def render_text(directory: str | Path) -> str:
    """The rendered multi-document YAML of a kustomization directory."""
    directory = Path(directory)
    if not (directory / "kustomization.yaml").is_file():
        raise FileNotFoundError(f"{directory}: no kustomization.yaml")
    result = subprocess.run(kustomize_command(directory), capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed on {directory}:\n{result.stderr.strip()}")
    return result.stdout


def render(directory: str | Path) -> list[dict[str, Any]]:
    """The rendered manifests of a kustomization directory, one dict per document."""
    return [doc for doc in yaml.safe_load_all(render_text(directory)) if doc]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: render.py KUSTOMIZATION_DIR")
    sys.stdout.write(render_text(sys.argv[1]))
