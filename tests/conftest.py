"""Shared test set-up: quiet, single-threaded, loopback-only Ray; one Ray instance per pytest session."""

import os

# Set before torch / ray are imported by any test module.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TMPDIR", "/tmp/dd2ray")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from dd2dist.launch.ray_env import init_local_ray

    if not ray.is_initialized():
        init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def precompute_shards(config: str, out: Path, overrides=(), samples: int = 16, shard_size: int = 8) -> Path:
    """Real teacher-token shards of ``config``'s teacher: the precompute job's sampler and manifest, in this
    process (no Ray), ``samples`` samples in blocks of 8."""
    import numpy as np

    from dd2dist.config import load_config
    from dd2dist.data import teacher_id
    from dd2dist.data.schema import sampling_dict
    from dd2dist.pipelines.teacher_tokens import Settings, TokenSampler, finalize_manifest, seeded_balanced_labels

    cfg = load_config(config, list(overrides))
    labels = seeded_balanced_labels(cfg.seed, 10, samples)
    sampler = TokenSampler(cfg, str(out), worker=0, shard_size=shard_size)
    blocks = {b: labels[b * 8:(b + 1) * 8] for b in range(samples // 8)}
    result = sampler.run(list(blocks), blocks, set(), cfg.seed, 8)
    settings = Settings(teacher_id(cfg.teacher, cfg.seed), cfg.seed, 8, sampling_dict(cfg.teacher.sampling), "balanced")
    finalize_manifest(out, settings, samples, np.asarray(labels), [result])
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """Teacher-token shards of the smoke_var_deepspeed recipe's teacher and of the smoke_llamagen_torch recipe's
    (another teacher)."""
    root = tmp_path_factory.mktemp("shards")
    experiments = ROOT / "configs" / "experiments"
    return {name: precompute_shards(str(experiments / f"{name}.yaml"), root / name, **extra)
            for name, extra in (("smoke_var_deepspeed", {"samples": 48}), ("smoke_llamagen_torch", {}))}


TINY = str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml")
TINY_TOTAL = 32  # iterations of the smoke_var_deepspeed schedule


def tiny_config(tmp: Path, name: str, *extra: str):
    """The smoke_var_deepspeed recipe as the Ray tests run it: its own name and output directory under ``tmp``."""
    from dd2dist.config import load_config

    return load_config(TINY, [f"name={name}", f"output_dir={tmp / 'runs' / name}", "tracking.log_every=2", *extra])


@pytest.fixture(scope="session")
def tiny_cfg():
    """:func:`tiny_config`, for test modules (they do not import conftest)."""
    return tiny_config


@pytest.fixture(scope="session")
def tiny_uninterrupted(tmp_path_factory, ray_session):
    """One uninterrupted smoke_var_deepspeed run on Ray Train (2 DeepSpeed workers): the reference of the resume
    tests."""
    from safetensors.torch import load_file

    from dd2dist.launch.ray_train import launch

    cfg = tiny_config(tmp_path_factory.mktemp("ray"), "straight")
    summary = launch(cfg)
    assert summary["iteration"] == TINY_TOTAL and summary["export"] and summary["preempted"] is None
    # the stage-1 student, exported by the workers when stage 2 took over: a StudentNet like the generator
    stage1 = load_file(str(Path(cfg.output_dir) / "export" / "stage1_student.safetensors"))
    assert set(stage1) == set(load_file(summary["export"]))
    return cfg
