"""The torch process group DeepSpeed runs on, and the device of this worker.

Ray Train creates the group (gloo on CPU, NCCL on GPU) and ``deepspeed.init_distributed`` reuses it; a single
test process gets a one-rank gloo group of its own.
"""

from __future__ import annotations

import os

import torch


def ensure_distributed(backend: str | None = None) -> None:
    """Make sure torch.distributed is initialised and DeepSpeed knows about it (reuses an existing group).

    Outside Ray Train / torchrun (a single test process) a one-rank group on 127.0.0.1 is created.
    """
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_device(use_gpu: bool) -> torch.device:
    """This worker's GPU with ``use_gpu`` (Ray Train has already selected it), else the CPU."""
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("launch.use_gpu is true but no CUDA device is visible to this worker")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
