"""Starting or joining Ray with the settings measured to work on CPU machines (docs/environment.md §2)."""

from __future__ import annotations

import logging
import os

RAY_ENV_DEFAULTS = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TMPDIR": "/tmp/dd2ray",  # socket paths are capped at 107 bytes: keep this short
}
# Only for an embedded single-machine Ray: bind every Ray server to 127.0.0.1. On a multi-node cluster this
# setting would stop workers from joining, so it is never applied when joining an existing cluster.
EMBEDDED_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


# Every process of an embedded Ray applies the warnings filters and logger levels of dd2dist.launch.quiet.
WORKER_SETUP_HOOK = "dd2dist.launch.quiet.quiet_process"


def apply_ray_env(embedded: bool = True) -> None:
    """Set the Ray environment defaults (an explicit environment variable always wins)."""
    for key, value in {**RAY_ENV_DEFAULTS, **(EMBEDDED_RAY_ENV if embedded else {})}.items():
        os.environ.setdefault(key, value)
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)


def init_local_ray(num_cpus: int | None = None, object_store_mb: int = 256, address: str | None = None):
    """Join the cluster named by ``address`` / ``RAY_ADDRESS``, or start an embedded local Ray.

    Returns True when an embedded Ray was started by this call (the caller then owns its shutdown).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    apply_ray_env(embedded=not address)
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    from dd2dist.launch.quiet import EMBEDDED_WORKER_ENV, quiet_loggers

    quiet_loggers(embedded=True)  # before ray.init, which logs the token-authentication notice
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_mb * 1024 * 1024,
        log_to_driver=True,
        logging_level=logging.WARNING,  # not "Started a local Ray instance": ray_train prints where its logs are
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK,
                     "env_vars": {k: os.environ.get(k, v) for k, v in EMBEDDED_WORKER_ENV.items()}},
    )
    return True
