"""Stop requests: how a signal handler, a poller or an operator asks the training loop to stop between steps.

The trainer only sees a callable returning a :class:`StopRequest` or None (``Trainer(stop_source=...)``); it asks
every iteration, agrees with the other ranks and stops them all after the same iteration (with a checkpoint
unless the request says otherwise). Where requests come from (SIGTERM, Ctrl-C, the driver) is
:mod:`dd2dist.launch.preemption`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopRequest:
    """Why to stop, and whether to write a checkpoint first (False only when the run must not write any more,
    e.g. it lost the ownership of its output directory)."""

    reason: str
    checkpoint: bool = True


class StopFlag:
    """One pending stop request, shared by signal handlers, pollers and the training thread.

    No lock on purpose: a signal handler runs on the main thread between bytecodes and must never wait for a lock
    the thread it interrupted may hold; a single attribute assignment is atomic in CPython.
    """

    def __init__(self) -> None:
        self._request: StopRequest | None = None

    def request(self, reason: str, checkpoint: bool = True) -> None:
        """Record a stop request; the first reason is kept, and a request without checkpoint overrides one with."""
        current = self._request
        if current is None or (current.checkpoint and not checkpoint):
            self._request = StopRequest(reason, checkpoint)

    def get(self) -> StopRequest | None:
        """The pending request, if any (it stays pending: every later call sees it too)."""
        return self._request

    def clear(self) -> None:
        self._request = None
