"""One owner per output directory: a lock file taken before any work and kept fresh while the run lives.

    <output>/run.lock   {"host", "boot_id", "pid", "pid_start", "ray_job_id", "submission_id", "started",
                         "command", "output_dir", "token"}

Taking it: the holder's record is written to a private file, then hard-linked to ``run.lock``: the link either
creates the whole file or fails because one exists (atomic on local disks, NFS, CephFS, Lustre; where hard links
are not supported, ``O_CREAT | O_EXCL`` creation is used instead). When one exists, its holder is judged:

* same host (hostname and kernel boot id) and its pid still runs with the recorded start time: alive, refuse;
* same host and that process is gone (or the pid now belongs to another process): gone, take over with a warning;
* another host: alive while the file was touched less than ``launch.lock_stale_s`` ago (the holder touches it
  every ``min(30 s, stale / 5)``), else gone. A pid on another machine cannot be checked, hence the heartbeat.

A takeover renames the stale file to a name of its own (of several runs taking over at once, one rename wins),
checks that what it moved is the record it judged stale (else puts it back), deletes it and competes for the
lock again. The owner releases the lock when the run ends, whatever the outcome; a run killed with SIGKILL
leaves it behind, and the next run takes it over by the rules above. If the heartbeat finds another run's record
in the file (this run was judged stale, e.g. its file system hung for longer than the staleness), it stops
touching it and calls ``on_lost``: the launcher then stops the run without writing. A lock file deleted by hand
while its run lives is written again at the next heartbeat; an unreadable one is judged at the next.

Only file systems can be locked: a ``launch.storage_path`` that is a URI (``s3://...``) gets no lock of its own
(object stores have no atomic create-if-absent through the interfaces Ray uses); it is then protected only
through the output directory, so every run that uses such a storage path must use the same ``--output`` (see
docs/run_safety.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("dd2dist.launch")

LOCK_FILE = "run.lock"
HEARTBEAT_MAX_S = 30.0


class RunLocked(RuntimeError):
    """The directory is owned by another live run; the message names the holder."""

    def __init__(self, path: Path, holder: dict, why: str):
        self.path, self.holder = path, holder
        who = (f"host {holder.get('host')}, pid {holder.get('pid')}, Ray job {holder.get('ray_job_id') or '-'}"
               f"{', submission ' + holder['submission_id'] if holder.get('submission_id') else ''}, started "
               f"{holder.get('started_at', '?')}")
        super().__init__(
            f"{path.parent} is in use by another run ({who}; {why}; lock file {path}). Wait for it to end, stop it, "
            "or use another --output. A lock whose run is gone is taken over automatically: at once on the same "
            "host, after launch.lock_stale_s without heartbeat from another host.")


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name in parentheses may hold spaces


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def holder_status(record: dict, age_s: float, stale_s: float) -> tuple[bool, str]:
    """(alive, why) for the run that wrote ``record`` into a lock file last touched ``age_s`` seconds ago."""
    same_host = record.get("host") == socket.gethostname() and record.get("boot_id") == _boot_id()
    if same_host and isinstance(record.get("pid"), int):
        pid = record["pid"]
        if not _pid_running(pid):
            return False, f"its process {pid} on this host has exited"
        if record.get("pid_start") and _pid_start(pid) not in (None, record["pid_start"]):
            return False, f"pid {pid} on this host now belongs to another process"
        return True, f"its process {pid} is running on this host"
    if age_s > stale_s:
        return False, f"no heartbeat for {age_s:.0f} s (launch.lock_stale_s={stale_s:g})"
    return True, f"last heartbeat {age_s:.0f} s ago"


def _submission_id() -> str | None:
    """The ``ray job submit`` id when this driver was started by one (the job supervisor passes it in the env)."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("metadata", {}).get(
            "job_submission_id")
    except (ValueError, AttributeError):
        return None


class RunLock:
    """The lock of one directory, owned by this process (see the module docstring). Use :meth:`acquire`."""

    def __init__(self, directory: str | os.PathLike, stale_s: float, record: dict):
        self.path = Path(directory) / LOCK_FILE
        self.stale_s = float(stale_s)
        self.record = record
        self.on_lost: Callable[[dict], None] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    # ---- taking it -------------------------------------------------------------------------------------------
    @classmethod
    def acquire(cls, directory: str | os.PathLike, stale_s: float, **info) -> RunLock:
        """Take the lock of ``directory`` (created if needed) or raise :class:`RunLocked`; starts the heartbeat.
        ``info`` adds fields to the record (e.g. ``ray_job_id``)."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        now = time.time()
        record = {
            "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
            "pid_start": _pid_start(os.getpid()),
            "ray_job_id": None, "submission_id": _submission_id(), "started": now,
            "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(now)),
            "command": " ".join(sys.argv)[:500], "output_dir": str(directory), "token": uuid.uuid4().hex, **info,
        }
        lock = cls(directory, stale_s, record)
        for _ in range(8):  # a few rounds: takeovers by several runs at once settle within two
            if lock._create():
                lock._start_heartbeat()
                return lock
            held = lock._read_existing()
            if held is None:
                continue  # vanished between our attempt and the read: try again
            current, age = held
            alive, why = holder_status(current, age, lock.stale_s)
            if alive:
                raise RunLocked(lock.path, current, why)
            lock._take_over(current, why)
        held = lock._read_existing()
        raise RunLocked(lock.path, held[0] if held else {}, "it kept changing hands while this run tried to take it")

    def _create(self) -> bool:
        """Create the lock file holding our record; False when one exists."""
        data = json.dumps(self.record, indent=1, sort_keys=True).encode()
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.record['token']}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            # NFS: a retransmitted link whose first reply was lost reports EEXIST although it worked
            return tmp.stat().st_nlink == 2
        except OSError:  # no hard links on this file system: exclusive create
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _read_existing(self) -> tuple[dict, float] | None:
        """(record, age in s) of the lock file, None when there is none. An unreadable record (being written, or
        damaged) reads as {} and ages like any other."""
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            record = json.loads(text)
        except ValueError:
            record = {}
        return (record if isinstance(record, dict) else {}), max(0.0, time.time() - st.st_mtime)

    def _take_over(self, judged: dict, why: str) -> None:
        moved = self.path.with_name(f"{LOCK_FILE}.stale-{self.record['token']}")
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return  # another run moved it first
        try:
            record = json.loads(moved.read_text())
        except ValueError:
            record = {}
        if record.get("token") != judged.get("token"):
            # between our judgement and the rename a new owner took the lock: give it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
            moved.unlink(missing_ok=True)
            return
        moved.unlink(missing_ok=True)
        log.warning("run lock %s taken over from host %s pid %s (started %s): %s", self.path, judged.get("host"),
                    judged.get("pid"), judged.get("started_at"), why)

    # ---- holding it -----------------------------------------------------------------------------------------
    def owned(self) -> bool:
        """Whether the lock file still holds this run's record."""
        held = self._read_existing()
        return held is not None and held[0].get("token") == self.record["token"]

    def update(self, **info) -> None:
        """Add fields to the record (e.g. the Ray job id once Ray is up); atomic replace, only while owned."""
        if not self.owned():
            return
        self.record.update(info)
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
        os.replace(tmp, self.path)

    def heartbeat_s(self) -> float:
        return min(HEARTBEAT_MAX_S, self.stale_s / 5)

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dd2dist-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s()):
            try:
                held = self._read_existing()
                if held is None and self._create():  # deleted by hand while the run lives: take it back
                    log.warning("run lock %s was deleted while this run holds the directory; written again",
                                self.path)
                    continue
                if held is not None and not held[0]:
                    continue  # unreadable (being written): judge at the next beat
                if held is None or held[0].get("token") != self.record["token"]:
                    self.lost = True
                    holder = held[0] if held else {}
                    log.error("run lock %s is no longer ours (now host %s pid %s): this run stops", self.path,
                              holder.get("host"), holder.get("pid"))
                    if self.on_lost is not None:
                        self.on_lost(holder)
                    return
                os.utime(self.path)
            except OSError as err:  # a file-system hiccup: try again at the next beat
                log.warning("run lock heartbeat failed: %r", err)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it still holds our record."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.owned():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_uri(path: str) -> bool:
    return "://" in path


def acquire_run_locks(cfg) -> list[RunLock]:
    """The locks a run of ``cfg`` takes before any work: its output directory, and its Ray storage run folder
    (``<storage_path>/<name>``) when that is a file-system path outside the output directory (two runs with
    different outputs but one storage path and name would otherwise share Ray's checkpoint bookkeeping). A URI
    storage path gets no lock of its own (module docstring). Raises :class:`RunLocked` naming the holder."""
    output = Path(cfg.output_dir)
    storage = cfg.launch.storage_path
    folders = [output]
    if storage and is_uri(storage):
        log.warning("launch.storage_path %s is not a file system: only the output directory %s is locked, so "
                    "every run that uses this storage path and name must use this output directory", storage, output)
    elif storage:
        run_folder = Path(storage) / cfg.name
        if output != run_folder and output not in run_folder.parents:
            folders.append(run_folder)
    locks: list[RunLock] = []
    try:
        for folder in folders:
            locks.append(RunLock.acquire(folder, cfg.launch.lock_stale_s, run_name=cfg.name))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks
