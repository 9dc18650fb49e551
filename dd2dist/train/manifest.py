"""Checkpoint manifests: every file of a checkpoint directory with its size and SHA-256, written last.

    <step dir>/manifest.json
        {"format": "dd2dist-checkpoint", "version": 1, "algorithm": "sha256", "iteration": 120,
         "files": {"state.json": {"size": 812, "sha256": "9f2c..."}, "engines/generator/...": {...}, ...}}

The trainer writes it into ``step_XXXXXXXX.tmp`` after every rank has written its files and before the rename
that makes the checkpoint complete, so the hashes describe the files exactly as they were written. Verification
re-reads every listed file: a missing file, another size or another checksum fails the checkpoint and the
message names the file. Files that are not listed are ignored (``tracking.json`` is added by the Ray layer after
the checkpoint is complete). A directory without a manifest does not verify: it was written by an older dd2dist
or by hand; ``python jobs/checkpoint_manifest.py write DIR`` adds one after a person has checked it.

Ranks share the work (SHA-256 runs at ~1.7 GB/s per core): each rank lists the files it can see, the lists are
gathered, and each file is hashed by one of the ranks that see it. On the shared file system of the cluster
recipes every rank sees every file; on node-local disks each node's files are hashed on that node. By hand:
``python jobs/checkpoint_manifest.py verify DIR [DIR ...]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from dd2dist.train.collective import gather_objects, group_rank

MANIFEST = "manifest.json"
FORMAT = "dd2dist-checkpoint"
VERSION = 1
ALGORITHM = "sha256"


class UnverifiedCheckpoint(RuntimeError):
    """A checkpoint directory that does not match its manifest (or has none); ``problems`` name the files."""

    def __init__(self, directory: str | os.PathLike, problems: list[str]):
        self.directory = Path(directory)
        self.problems = list(problems)
        super().__init__(f"checkpoint {self.directory} does not verify: {'; '.join(self.problems)}")


_CHUNK = 1 << 22  # 4 MiB reads: large enough for full-speed hashing, small enough to stay out of the way


def file_digest(path: str | os.PathLike) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file (chunked: hashlib.file_digest needs Python 3.11)."""
    h, size = hashlib.new(ALGORITHM), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, ALGORITHM: h.hexdigest()}


def _files(directory: Path) -> list[str]:
    """Regular files under ``directory`` (POSIX paths relative to it), the manifest itself excluded."""
    out = []
    for path in directory.rglob("*"):
        if path.is_file() and not path.is_symlink():
            rel = path.relative_to(directory).as_posix()
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def _owners(visible: list[list[str]]) -> dict[str, int]:
    """Which rank hashes each file: the files seen by any rank, in name order, dealt round-robin over the ranks
    that see each one (the same answer on every rank, since every rank gets the same lists)."""
    seen = [set(v) for v in visible]
    owner = {}
    for i, name in enumerate(sorted(set().union(*seen))):
        ranks = [r for r, s in enumerate(seen) if name in s]
        owner[name] = ranks[i % len(ranks)]
    return owner


def _collectives(collective: bool):
    """(gather, rank): the process group's, or this process alone (a tool run on one rank of a group)."""
    return (gather_objects, group_rank()) if collective else ((lambda obj: [obj]), 0)


def build_manifest(directory: str | os.PathLike, iteration: int | None = None, *, collective: bool = True) -> dict:
    """The manifest of ``directory`` as it is now. ``collective``: every rank of the process group calls it and
    hashes a share of the files (without a group, or with False, this process hashes them all)."""
    directory = Path(directory)
    gather, rank = _collectives(collective)
    owner = _owners(gather(_files(directory)))
    mine = {name: file_digest(directory / name) for name, r in owner.items() if r == rank}
    files = {}
    for part in gather(mine):
        files.update(part)
    return {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM, "iteration": iteration,
            "created": time.time(), "files": dict(sorted(files.items()))}


def write_manifest(directory: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest`` into ``directory`` atomically (a crash leaves the old file or none)."""
    path = Path(directory) / MANIFEST
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return path


def read_manifest(directory: str | os.PathLike) -> dict:
    """The manifest of ``directory``; :class:`UnverifiedCheckpoint` when it is missing or unreadable."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise UnverifiedCheckpoint(directory, [f"no {MANIFEST} (written by an older dd2dist, by hand, or not "
                                               "finished)"])
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnverifiedCheckpoint(directory, [f"{MANIFEST} unreadable: {err}"]) from None
    ours = isinstance(manifest, dict) and manifest.get("format") == FORMAT
    if not (ours and isinstance(manifest.get("files"), dict)):
        raise UnverifiedCheckpoint(directory, [f"{MANIFEST} is not a {FORMAT} manifest"])
    if manifest.get("version") != VERSION or manifest.get("algorithm") != ALGORITHM:
        raise UnverifiedCheckpoint(directory, [f"{MANIFEST}: version {manifest.get('version')} / algorithm "
                                               f"{manifest.get('algorithm')}, this dd2dist reads {VERSION} / "
                                               f"{ALGORITHM}"])
    return manifest


def _check_size(directory: Path, name: str, entry: dict) -> str | None:
    try:
        size = (directory / name).stat().st_size
    except FileNotFoundError:
        return f"{name}: missing"
    if size != entry.get("size"):
        return f"{name}: {size} bytes, the manifest lists {entry.get('size')}"
    return None


def _check_file(directory: Path, name: str, entry: dict) -> str | None:
    problem = _check_size(directory, name, entry)
    if problem is None and file_digest(directory / name)[ALGORITHM] != entry.get(ALGORITHM):
        problem = f"{name}: {ALGORITHM} differs from the manifest (changed after the checkpoint was written)"
    return problem


def verify(directory: str | os.PathLike, *, collective: bool = True) -> list[str]:
    """Problems of ``directory`` against its manifest, [] when it verifies. ``collective``: every rank of the
    process group calls it, each listed file is re-hashed by one rank that sees it, and every rank gets the same
    list (False: this process checks everything alone)."""
    directory = Path(directory)
    gather, rank = _collectives(collective)
    try:
        files, problem = read_manifest(directory)["files"], None
    except UnverifiedCheckpoint as err:
        files, problem = {}, err.problems[0]
    # the same collectives on every rank whatever it found, so that a rank's bad read cannot hang the others
    gathered = gather((problem, [n for n in sorted(files) if (directory / n).is_file()]))
    problems = sorted({p for p, _ in gathered if p})
    if problems:
        return problems
    owner = _owners([v for _, v in gathered])
    local = [p for n, r in owner.items() if r == rank and (p := _check_file(directory, n, files[n]))]
    found = [f"{n}: missing" for n in sorted(set(files) - set(owner))]
    for part in gather(local):
        found.extend(part)
    return sorted(found)


def quick_check(directory: str | os.PathLike) -> str | None:
    """A cheap local check (manifest readable, every listed file present with its size; no hashing): None when
    it passes, else the first problem. Used where re-hashing every kept checkpoint would cost too much (pruning)."""
    directory = Path(directory)
    try:
        files = read_manifest(directory)["files"]
    except UnverifiedCheckpoint as err:
        return err.problems[0]
    for name, entry in files.items():
        if problem := _check_size(directory, name, entry):
            return problem
    return None


def require_verified(directory: str | os.PathLike) -> None:
    """Raise :class:`UnverifiedCheckpoint` unless ``directory`` verifies; checked by this process alone (export,
    consolidation: callers that may run on one rank of a group)."""
    problems = verify(directory, collective=False)
    if problems:
        raise UnverifiedCheckpoint(directory, problems)
