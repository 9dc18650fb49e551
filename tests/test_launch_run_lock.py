"""The run lock on real files and real processes: refuse a live holder, take over a gone or stale one."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dd2dist.launch.run_lock import LOCK_FILE, RunLock, RunLocked

ROOT = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
sys.path.insert(0, {root!r})
from dd2dist.launch.run_lock import RunLock
lock = RunLock.acquire({directory!r}, 300.0, ray_job_id="0a000000")
print("holding", flush=True)
time.sleep(600)
"""


def _foreign(directory: Path, age_s: float, **extra) -> None:
    record = {"host": "another-node", "boot_id": "x", "pid": 4242, "token": "theirs", "started_at": "earlier",
              **extra}
    tmp = directory / "record.tmp"  # replaced in one step, as a real takeover's hard link appears
    tmp.write_text(json.dumps(record))
    os.replace(tmp, directory / LOCK_FILE)
    old = time.time() - age_s
    os.utime(directory / LOCK_FILE, (old, old))


def test_second_owner_in_the_same_process_is_refused(tmp_path):
    with RunLock.acquire(tmp_path, 300.0) as lock:
        assert lock.owned()
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(RunLocked, match=f"pid {os.getpid()}.*running on this host"):
            RunLock.acquire(tmp_path, 300.0)
    assert not (tmp_path / LOCK_FILE).exists()  # released
    RunLock.acquire(tmp_path, 300.0).release()


def test_live_holder_refuses_then_its_dead_lock_is_taken_over(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), directory=str(tmp_path))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with pytest.raises(RunLocked) as err:
            RunLock.acquire(tmp_path, 300.0)
        message = str(err.value)
        assert f"pid {proc.pid}" in message and "Ray job 0a000000" in message and str(tmp_path) in message
        assert err.value.holder["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)  # gone without releasing: the file stays behind
        proc.wait()
    assert (tmp_path / LOCK_FILE).exists()
    with caplog.at_level(logging.WARNING, logger="dd2dist.launch"):
        lock = RunLock.acquire(tmp_path, 300.0)
    assert lock.owned() and f"process {proc.pid} on this host has exited" in caplog.text
    lock.release()


def test_other_host_lock_is_stale_only_without_heartbeat(tmp_path, caplog):
    _foreign(tmp_path, age_s=5)
    with pytest.raises(RunLocked, match="host another-node, pid 4242.*last heartbeat 5 s ago"):
        RunLock.acquire(tmp_path, 300.0)
    _foreign(tmp_path, age_s=400)
    with caplog.at_level(logging.WARNING, logger="dd2dist.launch"):
        lock = RunLock.acquire(tmp_path, 300.0)
    assert "no heartbeat for 400 s (launch.lock_stale_s=300)" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == lock.record["token"]
    lock.release()


def test_reused_pid_on_this_host_is_not_the_holder(tmp_path):
    lock = RunLock.acquire(tmp_path, 300.0)
    record = {**lock.record, "token": "old", "pid_start": "1"}  # our pid, but another process's start time
    lock._stop.set()
    (tmp_path / LOCK_FILE).write_text(json.dumps(record))
    taken = RunLock.acquire(tmp_path, 300.0)
    assert taken.owned()
    taken.release()


def test_unreadable_lock_ages_like_any_other(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{half a reco")
    with pytest.raises(RunLocked):
        RunLock.acquire(tmp_path, 300.0)
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock.acquire(tmp_path, 300.0).release()


def test_heartbeat_touches_the_file_and_notices_a_takeover(tmp_path):
    lock = RunLock.acquire(tmp_path, 0.5)  # heartbeat every 0.1 s
    lost = threading.Event()
    lock.on_lost = lambda holder: lost.set() if holder.get("token") == "theirs" else None
    old = time.time() - 100
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.4)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 1.0
    lock.update(ray_job_id="01000000")
    assert json.loads((tmp_path / LOCK_FILE).read_text())["ray_job_id"] == "01000000"
    (tmp_path / LOCK_FILE).unlink()  # deleted by hand: the heartbeat writes it again
    time.sleep(0.4)
    assert lock.owned() and not lock.lost
    _foreign(tmp_path, age_s=0)  # another run judged us stale and took the directory
    assert lost.wait(5) and lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["token"] == "theirs"  # not ours to delete
