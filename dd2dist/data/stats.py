"""Counters of what the data path read, skipped and refused, exposed as a flat dict for metrics."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("dd2dist.data")


class DataStats:
    """Counts samples yielded, samples skipped by reason, corrupt and refused shards.

    Every skip is also logged (``dd2dist.data`` logger, WARNING) with the shard and key, so that a metric
    spike can be traced back to the file. ``as_dict()`` gives ``data/<counter>`` keys for the metrics logger.
    """

    def __init__(self, keep_events: int = 0):
        self.counts: Counter[str] = Counter()
        self.keep_events = keep_events  # how many skip/corrupt/refuse events to keep for reports (validate)
        self.events: list[dict] = []

    def _event(self, **event) -> None:
        if len(self.events) < self.keep_events:
            self.events.append(event)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def skip_sample(self, shard: str, key: str, kind: str, message: str) -> None:
        """A sample was dropped (missing/mis-shaped component, bad meta, ...): count under ``skipped_<kind>``."""
        self.counts["samples_skipped"] += 1
        self.counts[f"skipped_{kind}"] += 1
        log.warning("data: skipped sample %s in shard %s (%s): %s", key, shard, kind, message)
        self._event(shard=shard, key=key, kind=kind, message=message)

    def corrupt_shard(self, shard: str, after_samples: int, error: BaseException) -> None:
        """A tar could not be read to its end; what follows the damage in that shard is lost."""
        self.counts["shards_corrupt"] += 1
        log.warning("data: corrupt shard %s after %d samples, rest of shard skipped: %r", shard, after_samples, error)
        self._event(shard=shard, key=None, kind="corrupt_shard", message=f"after {after_samples} samples: {error!r}")

    def refuse_shard(self, shard: str, key: str, message: str) -> None:
        """A shard from another teacher (or with another token layout) is refused as a whole."""
        self.counts["shards_refused"] += 1
        log.warning("data: refused shard %s (first sample %s): %s", shard, key, message)
        self._event(shard=shard, key=key, kind="refused_shard", message=message)

    def merge(self, other: dict[str, int]) -> None:
        """Add counters from a snapshot (e.g. one taken in a loader worker process)."""
        self.counts.update(other)

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        base = {"samples": 0, "samples_skipped": 0, "shards_read": 0, "shards_corrupt": 0, "shards_refused": 0}
        base.update(self.counts)
        return {f"{prefix}{k}": int(v) for k, v in sorted(base.items())}

    def __getitem__(self, name: str) -> int:
        return int(self.counts.get(name, 0))
