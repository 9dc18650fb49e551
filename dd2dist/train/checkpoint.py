"""Checkpoint directory layout shared by training, resume and export.

    <root>/step_00000120/
        state.json                 trainer counters, phase, schedule fingerprint (rank 0 writes it)
        engines/<name>/...         each engine's own save() (its shard on every rank)
        ema/rank<r>.pt             this rank's EMA tensors and update count
        ema/rank<r>.compare.pt     the stage2.ema_compare EMAs, {cap: state} (only when configured)
        rng/rank<r>.pt             torch / numpy / python RNG states of this rank
        data/rank<r>.json          the stage-1 data stream position of this rank (when the stream has one)
        manifest.json              every file above with its size and SHA-256, written last (dd2dist.train.manifest)

A checkpoint is written into ``step_XXXXXXXX.tmp`` and renamed when every rank is done, so a directory without
the ``.tmp`` suffix that holds ``state.json`` is complete. Complete is not the same as intact: resume and export
check the manifest (:mod:`dd2dist.train.manifest`), and pruning never deletes the newest checkpoint that passes
its cheap check.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "state.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"step_{iteration:08d}"


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Every complete checkpoint under ``root``, newest first ([] when there is none)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found, reverse=True)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (None when there is none)."""
    found = complete_checkpoints(root)
    return found[0] if found else None


def prune(root: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (and stale ``.tmp`` ones) under ``root``, always
    keeping the newest one that passes :func:`dd2dist.train.manifest.quick_check`: when the newest ones are
    damaged, the checkpoint a resume falls back to is still there."""
    from dd2dist.train.manifest import quick_check

    root = Path(root)
    done = sorted(int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)))
    keep = set(done[-keep_last:]) if keep_last > 0 else set(done)
    for step in reversed(done):
        if quick_check(step_dir(root, step)) is None:
            keep.add(step)
            break
    for step in done:
        if step not in keep:
            shutil.rmtree(step_dir(root, step), ignore_errors=True)
    latest = done[-1] if done else -1
    for p in root.glob("step_*.tmp"):
        m = re.match(r"^step_(\d{8})\.tmp$", p.name)
        if m and int(m.group(1)) < latest:
            shutil.rmtree(p, ignore_errors=True)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file missing: {path}")
    return json.loads(path.read_text())


def rng_state() -> dict:
    """Global RNG states (the trainer draws from its own generators; these cover anything else)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finalize(tmp: Path, final: Path) -> None:
    """Move a finished ``.tmp`` checkpoint into place (rank 0, after the barrier)."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def finalize_local(tmp: Path, final: Path) -> None:
    """Like :func:`finalize` for a rank > 0 whose ``.tmp`` directory is on a disk rank 0 does not see; ranks of
    one node race for the same directory, and the losers find it already moved."""
    try:
        if final.exists():
            for item in tmp.rglob("*"):
                if item.is_file():
                    dest = final / item.relative_to(tmp)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(item, dest)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except FileNotFoundError:
        pass
