"""The stateful single-process trainer, its callback protocol, checkpoint layout and the metrics-logger interface."""

from dd2dist.train.callbacks import LogMetrics, OnStep, TrainerCallback
from dd2dist.train.metrics import JsonlLogger, MetricsLogger, NullLogger
from dd2dist.train.trainer import Trainer, TrainState

__all__ = ["JsonlLogger", "LogMetrics", "MetricsLogger", "NullLogger", "OnStep", "TrainState", "Trainer",
           "TrainerCallback"]
