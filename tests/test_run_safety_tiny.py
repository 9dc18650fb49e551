"""A damaged newest checkpoint of the tiny recipe, one part at a time: resume skips it, names the file, falls back
to the previous checkpoint and ends exactly where an uninterrupted run does.

The smoke_var_deepspeed recipe (stages, model sizes, schedule) with its stage 1 read from real teacher-token shards
(so the checkpoint holds a data-stream position), run in this process on the plain-torch engine; the same checks on
DeepSpeed checkpoints written by Ray Train workers are in tests/test_run_safety_ray.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dd2dist.config import load_config
from dd2dist.data import stream_from_config
from dd2dist.engine.factory import TorchEngineFactory
from dd2dist.teachers import build_teacher
from dd2dist.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml")
TOTAL = 32
# one file of each part of a stage-2 checkpoint
PARTS = {"engine state": "engines/generator/module.pt", "EMA": "ema/rank0.pt", "RNG": "rng/rank0.pt",
         "data position": "data/rank0.json"}


def _trainer(shards: Path) -> Trainer:
    cfg = load_config(TINY, ["engine.kind=torch", "launch.num_workers=1", "data.source=shards",
                             f"data.shards={shards}", "data.batch_size=4"])
    torch.manual_seed(cfg.seed)  # the random-init teacher, as every Ray worker builds it
    teacher = build_teacher(cfg.teacher)
    return Trainer(cfg, teacher, TorchEngineFactory(), data=stream_from_config(cfg, 0, 1, teacher.num_tokens))


def _state(tr: Trainer) -> dict:
    out = {f"{n}/{k}": v for n, e in tr.engines.items() for k, v in e.full_state_dict().items()}
    out.update({f"ema/{i}": t.clone() for i, t in enumerate(tr.ema.shadow)})
    out["iteration"] = torch.tensor(tr.state.iteration)
    out["data_step"] = torch.tensor(tr.data.state.step)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards):
    shards = tiny_shards["smoke_var_deepspeed"]
    reference = _trainer(shards)
    reference.fit()
    assert reference.done and reference.state.iteration == TOTAL
    root = tmp_path_factory.mktemp("tiny") / "checkpoints"
    _trainer(shards).fit(checkpoint_dir=root, checkpoint_every=8, max_iterations=16)  # step 8 and 16: stage 2
    return shards, _state(reference), root


@pytest.mark.parametrize("part", sorted(PARTS))
def test_damaged_part_of_the_newest_checkpoint_falls_back(tmp_path, runs, part):
    shards, reference, root = runs
    shutil.copytree(root, tmp_path / "checkpoints")
    damaged = tmp_path / "checkpoints" / "step_00000016" / PARTS[part]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the checksum sees it
    damaged.write_bytes(bytes(data))

    tr = _trainer(shards)
    loaded = tr.resume_latest(tmp_path / "checkpoints")
    assert loaded.name == "step_00000008"
    assert [(p.name, why) for p, why in tr.resume_skipped] == [
        ("step_00000016", [f"{PARTS[part]}: sha256 differs from the manifest (changed after the checkpoint was "
                           "written)"])]
    tr.fit(checkpoint_dir=tmp_path / "checkpoints")
    got = _state(tr)
    assert set(got) == set(reference)
    for key, value in reference.items():
        assert torch.equal(got[key], value), key
    # the damaged checkpoint was rewritten on the way (iteration 16 again), then pruned like any other
    from dd2dist.train.manifest import verify

    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step_00000024", "step_00000032"]
    assert all(verify(tmp_path / "checkpoints" / name) == [] for name in kept)
