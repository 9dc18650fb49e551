"""Student networks: the AdaLN MLP velocity head and the teacher-backbone + head student (docs/method.md §5)."""

from dd2dist.nets.head import FixedTimeHead, MLPHead, timestep_embedding
from dd2dist.nets.student import OneStepSampler, StudentNet, params_to_buffers, student_backbone

__all__ = [
    "FixedTimeHead", "MLPHead", "OneStepSampler", "StudentNet", "params_to_buffers", "student_backbone",
    "timestep_embedding",
]
