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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    """One embedded local Ray for the whole test session (starting Ray costs seconds)."""
    import ray

    from dd2dist.launch.ray_env import init_local_ray

    if not ray.is_initialized():
        init_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()
