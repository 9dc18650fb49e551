"""Teacher-token precompute on Ray: same output for 1 and 2 workers, resume after an interruption, manifest."""

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dd2dist.conditions import Cond
from dd2dist.config import ExperimentConfig
from dd2dist.data.identity import teacher_id
from dd2dist.data.stats import DataStats
from dd2dist.data.tario import iter_shard_samples
from dd2dist.data.validation import validate_dir
from dd2dist.pipelines.teacher_tokens import (
    block_seed,
    load_label_file,
    precompute_teacher_tokens,
    seeded_balanced_labels,
)
from dd2dist.teachers import build_seeded_teacher

pytestmark = pytest.mark.integration

N, BATCH = 37, 8  # the last block is partial


def _content(directory):
    out = {}
    for tar in sorted(Path(directory).glob("*.tar")):
        for s in iter_shard_samples(str(tar), DataStats()):
            assert s.key not in out
            out[s.key] = (s.tokens.tolist(), s.label, s.seed, s.index)
    return out


@pytest.fixture(scope="module")
def label_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    rng = np.random.default_rng(5)
    path.write_text("# one class id per line\n" + "\n".join(str(y) for y in rng.integers(0, 10, N + 3)) + "\n")
    return path


@pytest.fixture(scope="module")
def one_worker(ray_session, tmp_path_factory, label_file):
    out = tmp_path_factory.mktemp("pc1")
    manifest = precompute_teacher_tokens(ExperimentConfig(), N, out, workers=1, batch_size=BATCH, shard_size=10,
                                         label_file=str(label_file))
    return out, manifest


@pytest.mark.slow  # ~10-25 s with the Ray actors
def test_two_workers_give_the_same_samples(one_worker, tmp_path, label_file):
    out1, manifest1 = one_worker
    out2 = tmp_path / "pc2"
    manifest2 = precompute_teacher_tokens(ExperimentConfig(), N, out2, workers=2, batch_size=BATCH, shard_size=10,
                                          label_file=str(label_file))
    c1, c2 = _content(out1), _content(out2)
    assert sorted(c1) == [f"s{i:09d}" for i in range(N)]
    assert c1 == c2
    # One shard set per worker.
    assert {p.name.split("-")[1] for p in out2.glob("*.tar")} == {"w000", "w001"}
    assert len({p.name.split("-")[1] for p in out1.glob("*.tar")}) == 1
    # Labels follow the file; the tokens are the teacher's own samples for the block seed.
    labels = load_label_file(str(label_file), N, 10)
    assert [c1[f"s{i:09d}"][1] for i in range(N)] == labels.tolist()
    cfg = ExperimentConfig()
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed)
    gen = torch.Generator().manual_seed(block_seed(cfg.seed, 1))
    ids = teacher.sample(Cond(labels=torch.as_tensor(labels[8:16])), cfg.teacher.sampling, gen)
    assert [c1[f"s{i:09d}"][0] for i in range(8, 16)] == ids.tolist()
    assert c1["s000000009"][2] == block_seed(cfg.seed, 1) and c1["s000000009"][3] == 9
    for m in (manifest1, manifest2):
        assert m["complete"] and m["num_samples"] == N and m["teacher_id"] == teacher_id(cfg.teacher, cfg.seed)
        assert sum(m["label_histogram"].values()) == N
        assert m["label_histogram"] == {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    on_disk = json.loads((out2 / "manifest.json").read_text())
    assert on_disk["this_run"]["written"] == N and len(on_disk["this_run"]["workers"]) == 2
    report = validate_dir(out2)
    assert report["ok"] and report["samples"] == N and report["label_histogram"] == manifest2["label_histogram"]


@pytest.mark.slow
def test_resume_after_interruption(one_worker, tmp_path, label_file):
    out1, _ = one_worker
    out = tmp_path / "resumed"
    shutil.copytree(out1, out)
    # The state a crash leaves: a shard lost before its rename (only its .tmp), the manifest still incomplete.
    victim = sorted(out.glob("*.tar"))[1]
    lost = len(_content(out)) - 10
    victim.rename(victim.with_name(victim.name + ".tmp"))
    victim.with_suffix(".idx").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    m = precompute_teacher_tokens(ExperimentConfig(), N, out, workers=2, batch_size=BATCH, shard_size=10,
                                  label_file=str(label_file))
    assert m["complete"] and m["this_run"]["written"] == 10 and lost == N - 10
    assert _content(out) == _content(out1)  # no duplicate, no missing, same tokens
    assert not list(out.glob("*.tmp"))
    # Nothing left to do: a second rerun writes nothing.
    assert precompute_teacher_tokens(ExperimentConfig(), N, out, workers=2, batch_size=BATCH, shard_size=10,
                                     label_file=str(label_file))["this_run"]["written"] == 0
    # Other settings into the same output are refused, naming the setting.
    with pytest.raises(ValueError, match="batch_size"):
        precompute_teacher_tokens(ExperimentConfig(), N, out, workers=1, batch_size=4, label_file=str(label_file))


def test_balanced_labels_and_label_file_errors(tmp_path):
    y = seeded_balanced_labels(seed=3, num_classes=7, num_samples=40)
    counts = np.bincount(y, minlength=7)
    assert counts.max() - counts.min() <= 1
    assert y[:14].tolist() != list(range(7)) * 2  # permuted, not cyclic
    assert np.array_equal(seeded_balanced_labels(3, 7, 25), y[:25])  # independent of the total count
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n12\n")
    with pytest.raises(ValueError, match="bad.txt:2"):
        load_label_file(str(bad), 2, 10)
    with pytest.raises(ValueError, match="fewer"):
        load_label_file(str(bad), 3, 100)


def test_training_stream_reads_precomputed_shards(one_worker):
    import dataclasses

    from dd2dist.data.stream import stream_from_config

    out, _ = one_worker
    cfg = ExperimentConfig()
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source="shards", shards=str(out), batch_size=5))
    stream = stream_from_config(cfg, rank=0, world_size=1, num_tokens=21)
    it = iter(stream)
    batch = next(it)
    assert batch.tokens.shape == (5, 21) and stream.metrics()["data/shards_refused"] == 0
    # A config whose teacher differs (here: another init seed for the random tiny teacher) refuses every shard.
    other = stream_from_config(dataclasses.replace(cfg, seed=1))
    with pytest.raises(RuntimeError, match="no usable sample") as e:
        next(iter(other))
    assert "'data/shards_refused': 16" in str(e.value)  # the counters of the failing chunk are in the message


def test_precompute_job_command_line(ray_session, tmp_path, capsys):
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("precompute_job", repo / "jobs/precompute_teacher_tokens.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    argv = ["--num-samples", "12", "--output", str(tmp_path), "--workers", "3", "--batch-size", "4",
            "--set", "teacher.family=llamagen", "--set", "teacher.sampling.top_k=8"]
    with pytest.raises(SystemExit) as info:  # shards of a teacher without its weights: refused before any actor
        job.main(argv)
    assert info.value.code == 2 and "teacher.checkpoint" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    # 3 actors on the 2-CPU test Ray: the third waits for a finished one to be released.
    assert job.main([*argv, "--set", "teacher.random_init=true"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 12 and summary["settings"]["sampling"]["top_k"] == 8
    assert summary["teacher_id"].startswith("llamagen-own-")
    report = validate_dir(tmp_path)
    assert report["ok"] and report["samples"] == 12
    assert {p.name.split("-")[1] for p in tmp_path.glob("*.tar")} == {"w000", "w001", "w002"}
