"""Graceful preemption: SIGTERM or Ctrl-C on the driver or on any worker stops every rank after the same step,
with a checkpoint at that iteration, and the job exits with :data:`PREEMPTED_EXIT`.

SIGTERM is what a Kubernetes eviction, a spot reclaim and ``ray job stop`` send before they kill. The pieces:

* driver (:class:`DriverStop`, around ``TorchTrainer.fit`` in :func:`dd2dist.launch.ray_train.launch`): handlers
  for SIGTERM and SIGINT (installed after ``ray.init``, which sets its own) record the request; a thread forwards
  it to a small named actor, the *stop board*, which the workers poll. A second signal falls through to the
  previous handler (stop at once).
* workers: Ray runs the training function in a thread, and only a process's main thread can install signal
  handlers, so the Torch backend installs them on each worker's main thread when the worker group starts
  (:class:`StopAwareTorchConfig`). They record the request in this process's :data:`WORKER_STOP` while a
  training function runs; otherwise, and on a second signal, Ray's own handler runs (the worker exits).
* the trainer asks :func:`worker_stop_source`'s callable after every iteration (it also polls the board, without
  blocking, at most once a second) and the ranks agree with one all-reduce (:class:`dd2dist.train.Trainer`).

The run's directory records the stop in ``workers/stop.json`` (iteration, reason, checkpoint); rerunning the
same command resumes from that checkpoint exactly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend  # subclassed the way Ray's own TorchftConfig does

from dd2dist.train.stop import StopFlag, StopRequest

log = logging.getLogger("dd2dist.launch")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request with a checkpoint; rerun the same command to resume
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_RECORD = "stop.json"  # under <output>/workers/
BOARD_NAMESPACE = "dd2dist"
POLL_S = 0.5

WORKER_STOP = StopFlag()  # this worker process's request (set by its signal handlers)
_TRAINING = threading.Event()  # a training function runs in this process: a signal then means "stop gracefully"


def _call_previous(previous, signum: int, frame) -> None:
    """Run the handler that was installed before ours (Ray's exit, KeyboardInterrupt, or the default action)."""
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _handler(on_first: Callable[[str], bool], previous: dict) -> Callable:
    """A signal handler: the first signal goes to ``on_first(signal name)`` (which returns False when it cannot
    stop gracefully); later ones, or an unhandled first one, to the previous handler."""

    def handle(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if on_first(name):
            return
        _call_previous(previous.get(signum), signum, frame)

    return handle


# ---- workers ------------------------------------------------------------------------------------------------


def install_worker_handlers() -> bool:
    """Install the SIGTERM / SIGINT handlers of a Ray Train worker (run on its main thread by the backend).
    Returns False where that is impossible (not the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        log.warning("preemption: not on the worker's main thread, SIGTERM will not stop gracefully")
        return False
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    where = f"worker pid {os.getpid()} on {socket.gethostname()}"

    def first(name: str) -> bool:
        if not _TRAINING.is_set() or WORKER_STOP.get() is not None:
            return False
        WORKER_STOP.request(f"{name} on {where}")
        sys.stderr.write(f"dd2dist: {name} on {where}: every rank finishes its step and checkpoints "
                         f"(send it again to stop at once)\n")
        return True

    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler(first, previous))
    return True


class _StopAwareTorchBackend(_TorchBackend):
    def on_training_start(self, worker_group, backend_config) -> None:
        super().on_training_start(worker_group, backend_config)
        worker_group.execute(install_worker_handlers)


@dataclass
class StopAwareTorchConfig(TorchConfig):
    """``TorchConfig`` whose backend also installs :func:`install_worker_handlers` in every worker it starts."""

    @property
    def backend_cls(self):
        return _StopAwareTorchBackend


@contextmanager
def worker_stop_source(board_name: str | None) -> Iterator[Callable[[], StopRequest | None]]:
    """The trainer's ``stop_source`` inside one training function: this process's signal requests, and the
    driver's requests from the stop board (polled without blocking, at most every ``POLL_S``)."""
    import ray

    WORKER_STOP.clear()
    board = None
    if board_name:
        try:
            board = ray.get_actor(board_name, namespace=BOARD_NAMESPACE)
        except ValueError:
            log.warning("preemption: stop board %s not found; driver signals will not reach this worker", board_name)
    pending: dict = {"ref": None, "at": 0.0}

    def poll() -> None:
        ref = pending["ref"]
        if ref is not None:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return
            pending["ref"] = None
            try:
                request = ray.get(ready[0])
            except Exception:  # the driver (and its board) is gone: the job is ending anyway
                return
            if request is not None:
                WORKER_STOP.request(*request)
        if pending["ref"] is None and time.monotonic() - pending["at"] >= POLL_S:
            pending["ref"], pending["at"] = board.get.remote(), time.monotonic()

    def source() -> StopRequest | None:
        if board is not None and WORKER_STOP.get() is None:
            poll()
        return WORKER_STOP.get()

    _TRAINING.set()
    try:
        yield source
    finally:
        _TRAINING.clear()


def write_stop_record(output_dir: str | os.PathLike, iteration: int, request: StopRequest,
                      checkpoint: str | None) -> Path:
    """``<output>/workers/stop.json``: where and why the run stopped (rank 0, after the checkpoint)."""
    path = Path(output_dir) / "workers" / STOP_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"iteration": iteration, "reason": request.reason, "checkpoint": checkpoint, "time": time.time()}
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def read_stop_record(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / "workers" / STOP_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def clear_stop_record(output_dir: str | os.PathLike) -> None:
    (Path(output_dir) / "workers" / STOP_RECORD).unlink(missing_ok=True)


# ---- driver -------------------------------------------------------------------------------------------------


class StopBoard:
    """The driver's stop request, read by the workers (a Ray actor with no CPU)."""

    def __init__(self) -> None:
        self.request: tuple[str, bool] | None = None

    def ask(self, reason: str, checkpoint: bool = True) -> None:
        if self.request is None or (self.request[1] and not checkpoint):
            self.request = (reason, checkpoint)

    def get(self) -> tuple[str, bool] | None:
        return self.request


class DriverStop:
    """Signal handling of the driver around ``TorchTrainer.fit`` (see the module docstring); also the channel
    the run lock uses to stop a run that lost its directory (:meth:`request`)."""

    def __init__(self) -> None:
        import ray

        self.board_name = f"dd2dist-stop-{uuid.uuid4().hex[:12]}"
        self._board = ray.remote(num_cpus=0)(StopBoard).options(
            name=self.board_name, namespace=BOARD_NAMESPACE).remote()
        self.flag = StopFlag()
        self._wake = threading.Event()
        self._closed = False
        self._previous: dict = {}
        self._thread = threading.Thread(target=self._forward, name="dd2dist-stop-forward", daemon=True)

    def request(self, reason: str, checkpoint: bool = True) -> None:
        """Ask every worker to stop after its current step (safe to call from a signal handler or any thread)."""
        self.flag.request(reason, checkpoint)
        self._wake.set()

    def _forward(self) -> None:
        sent = None
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            current = self.flag.get()
            if current is not None and current != sent:
                self._board.ask.remote(current.reason, current.checkpoint)
                sent = current

    def __enter__(self) -> DriverStop:
        self._thread.start()
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption: launch() runs outside the main thread; driver signals are not handled")
            return self
        self._previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

        def first(name: str) -> bool:
            if self.flag.get() is not None:
                return False
            self.request(f"{name} on the driver (pid {os.getpid()} on {socket.gethostname()})")
            sys.stderr.write(f"dd2dist: {name}: every rank finishes its step and checkpoints, then the job exits "
                             f"with status {PREEMPTED_EXIT} (send it again to stop at once)\n")
            return True

        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler(first, self._previous))
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)
        import ray

        try:
            ray.kill(self._board)
        except Exception:  # already gone with a shut-down Ray
            pass
