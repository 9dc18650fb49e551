"""Run a function on N local gloo ranks without a launcher (engine tests, micro-benchmarks).

Each rank is a spawned process with its own torch.distributed process group on 127.0.0.1; the function's
return value comes back through a queue. Ray Train is what production uses (:mod:`dd2dist.launch.ray_train`);
this is the lightweight equivalent for checks that do not need Ray.
"""

from __future__ import annotations

import io
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, fn: Callable, args: tuple, queue, threads: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"),
    )
    code = 0
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        dist.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        # Tensors are sent as bytes: a tensor put on a torch queue is shared through this process's memory,
        # which is gone once we _exit.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        queue.put((rank, "ok", buffer.getvalue()))
        dist.barrier()
    except BaseException:  # report every failure to the parent, which raises it
        queue.put((rank, "error", traceback.format_exc()))
        code = 1
    queue.close()
    queue.join_thread()  # flush the queue's feeder thread before leaving
    # ZeRO-3 with 2 ranks can abort at interpreter exit (docs/environment.md §3): leave without running finalisers.
    os._exit(code)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1, timeout: float = 300) -> list:
    """``[fn(rank, world_size, *args) for each rank]``, run in ``world_size`` spawned gloo processes.

    ``fn`` must be importable (a module-level function). Raises RuntimeError with the failing rank's
    traceback when any rank fails, and TimeoutError when the ranks do not finish within ``timeout`` seconds.
    """
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue, threads), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank} failed:\n{value}")
                break
            results[rank] = value
    except Exception as err:  # queue.Empty on timeout
        errors.append(f"ranks did not finish within {timeout} s ({type(err).__name__})")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    import torch

    return [torch.load(io.BytesIO(results[r]), weights_only=False) for r in range(world_size)]
