"""What a run prints: its progress, our own warnings and every error; the rest goes to the logs only.

Applied in the driver (:func:`quiet_driver`, first thing in ``jobs/distill.py`` and ``jobs/demo.py``), in every
process of an embedded Ray (:func:`quiet_process`, its worker setup hook) and in each Ray Train worker
(:func:`rank_logs`: ``<output>/logs/rank<N>.log`` holds that rank's whole log, the console gets the progress lines
and warnings). Each entry below names one message measured on a CPU run and why it says nothing about this run; a
message that is not listed is printed as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

# Read by Ray when it is imported, so they are set before the driver's first `import ray`.
DRIVER_ENV = {
    # every line a worker forwards is a progress line or a rank-tagged warning (rank_logs), so identical lines do not
    # occur; the deduplicator would still hold each line for its 5 s window and print a notice about itself
    "RAY_DEDUP_LOGS": "0",
    # the progress and warning lines carry what the "(RayTrainWorker pid=..)" prefix would say
    "RAY_DISABLE_WORKER_LOG_PREFIX": "1",
}

# Set for an embedded single-machine Ray only (passed to its workers with the runtime env).
EMBEDDED_WORKER_ENV = {
    # watches for node drains, which a single machine never has; its actor is created with a constructor argument in
    # the object store and max_restarts > 0, which Ray Core reports as an error line (core_worker.cc) in every launch
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}

# (category, message regex): Python warnings raised by pinned dependencies about their own internals.
NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch 2.14 renamed them *_single; DeepSpeed's ZeRO-3 calls the old names (the gather for the partitioned
    # teacher on every run, the reduce-scatter for ZeRO-3 trainables); nothing in dd2dist calls them
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
)

# logger -> the lowest level it still emits, in every process.
QUIET_LOGGERS = {
    # DeepSpeed's op builder imports torch's extension builder, which warns on every CPU machine that has a CUDA
    # toolkit installed ("No CUDA runtime is found, using CUDA_HOME=...")
    "torch.utils.cpp_extension": logging.ERROR,
    # "Creating initial MLflow database tables..." when a run opens a fresh local store
    "mlflow.store.db.utils": logging.WARNING,
}

# logger -> level, in the processes of an embedded Ray only (on a real cluster these report something).
QUIET_EMBEDDED_LOGGERS = {
    # Ray Train's placement-group cleaner polls the state API, which an embedded Ray without a dashboard does not
    # serve: one warning a second for the whole run (766 lines in a 17-minute demo) while everything works
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    # resource requests to an autoscaler that a single machine does not run: a warning with a traceback whenever the
    # machine is too loaded to answer within its timeout
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client": logging.ERROR,
    # "Token authentication is enabled for this Ray cluster": the embedded Ray binds to 127.0.0.1 only
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
}

# Ray Train's own INFO lines (worker group start, process group, "Checkpoint successfully created") go to Ray's
# own log files only: ray.train.RunConfig(logging_config=...) of every launch.
RAY_TRAIN_LOG_LEVEL = "WARNING"

PROGRESS_LOGGER = "dd2dist.progress"
LOG_DIR = "logs"  # <output>/logs/rank<N>.log
RANK_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_warnings() -> None:
    for category, message in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_loggers(embedded: bool = True) -> None:
    for name, level in {**QUIET_LOGGERS, **(QUIET_EMBEDDED_LOGGERS if embedded else {})}.items():
        logging.getLogger(name).setLevel(level)


def quiet_process() -> None:
    """Warnings filters and logger levels of this process (the embedded Ray's worker setup hook)."""
    quiet_warnings()
    quiet_loggers(embedded=True)


def quiet_driver(embedded: bool | None = None) -> None:
    """The driver's settings; call it before anything imports Ray (an explicit environment variable wins).

    ``embedded``: whether this driver starts its own Ray (default: no ``RAY_ADDRESS``)."""
    if embedded is None:
        embedded = not os.environ.get("RAY_ADDRESS")
    for key, value in DRIVER_ENV.items():
        os.environ.setdefault(key, value)
    quiet_warnings()
    quiet_loggers(embedded=embedded)


class _LogWriter(io.TextIOBase):
    def __init__(self, logger: logging.Logger):
        self.logger, self._pending = logger, ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        if self._pending.strip():
            self.logger.info(self._pending)
        self._pending = ""


@contextlib.contextmanager
def prints_to_log(name: str) -> Iterator[None]:
    """What the block prints to stdout goes to logger ``name`` at INFO (a rank's log file), not to the console: for
    dependencies that announce routine work with a bare ``print``."""
    writer = _LogWriter(logging.getLogger(name))
    with contextlib.redirect_stdout(writer):
        yield
    writer.flush()


def _progress_only(record: logging.LogRecord) -> bool:
    return record.name == PROGRESS_LOGGER


def _warnings_up(record: logging.LogRecord) -> bool:
    return record.name != PROGRESS_LOGGER and record.levelno >= logging.WARNING


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int):
        super().__init__(f"[rank {rank}] %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).rstrip()  # a captured warning ends in a newline of its own


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to this process's stdout / stderr (Ray's PlainRayHandler looks stderr up at each write)."""
    streams = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return type(handler).__name__ == "PlainRayHandler" or (
        isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
        and handler.stream in streams)


def rank_logs(output_dir: str | os.PathLike, rank: int) -> Path:
    """Route this Ray Train worker's logging: everything from INFO up to ``<output>/logs/rank<N>.log`` (appended
    across restarts); to the console, which Ray forwards to the driver, the progress lines (stdout) and records at
    WARNING or above, tagged with the rank (stderr).

    Ray Train sends ``print`` and its own records (e.g. each ``TrainingReport``) to the root and ``ray.train``
    loggers at INFO; their console handlers are replaced here, Ray's own log files are left as they are.
    Python warnings are routed through logging so that they reach the rank's file too."""
    quiet_warnings()
    quiet_loggers(embedded=False)
    path = Path(output_dir) / LOG_DIR / f"rank{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(path)
    to_file.setLevel(logging.INFO)
    to_file.setFormatter(logging.Formatter(RANK_LOG_FORMAT))
    progress = logging.StreamHandler(sys.stdout)  # the run's output, like the driver's
    progress.addFilter(_progress_only)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_warnings_up)
    console.setFormatter(_RankFormatter(rank))
    ours = (to_file, progress, console)
    for handler in ours:
        handler.dd2dist_rank_log = True  # a second call replaces, never doubles, them
    root = logging.getLogger()
    for logger in (root, logging.getLogger("ray.train")):
        for handler in [h for h in logger.handlers if _is_console(h) or getattr(h, "dd2dist_rank_log", False)]:
            logger.removeHandler(handler)
            if getattr(handler, "dd2dist_rank_log", False):
                handler.close()
        if logger is root or not logger.propagate:
            for handler in ours:
                logger.addHandler(handler)
    root.setLevel(min(root.level or logging.INFO, logging.INFO))
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.INFO)
    logging.captureWarnings(True)
    logging.getLogger("dd2dist").info("rank %d (pid %d) logging to %s", rank, os.getpid(), path)
    return path


def ray_log_dir() -> str | None:
    """Ray's log directory on this machine (controller and raw worker output), None when Ray is not running."""
    try:
        import ray

        node = ray._private.worker._global_node  # no public accessor for Ray's log directory
        return node.get_logs_dir_path() if node is not None else None
    except Exception:  # noqa: BLE001 - only informational
        return None


