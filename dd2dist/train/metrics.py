"""The metrics-logger interface, and two local implementations.

The trainer reaches a logger through :class:`dd2dist.train.callbacks.LogMetrics`. The MLflow logger
(``dd2dist.tracking``) implements the same protocol; only rank 0 logs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class MetricsLogger(Protocol):
    """Where per-step metrics, artefacts and tags go."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...


class NullLogger:
    """Drops everything (non-zero ranks, tests)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | os.PathLike) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass


class JsonlLogger:
    """Appends one JSON line per call to ``path``: {"step", metrics...}, {"artifact"}, {"tags"}.

    Non-finite floats are written as strings ("nan", "inf") so every line stays valid JSON. Rank 0 only.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}
        self._write({"step": int(step), **clean})

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._write({"artifact": str(path)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._write({"tags": {k: str(v) for k, v in tags.items()}})

    def read(self) -> list[dict]:
        """All records written so far (for tests and quick inspection)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
