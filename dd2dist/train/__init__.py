"""The stateful single-process trainer, its checkpoint layout and the metrics-logger interface."""

from dd2dist.train.metrics import JsonlLogger, MetricsLogger, NullLogger
from dd2dist.train.trainer import CheckpointHook, StepCallback, Trainer, TrainState

__all__ = ["CheckpointHook", "StepCallback", "JsonlLogger", "MetricsLogger", "NullLogger", "TrainState", "Trainer"]
