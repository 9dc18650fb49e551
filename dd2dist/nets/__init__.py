"""Student networks: the AdaLN MLP velocity head and the teacher-backbone + head student (method.md §4)."""

from dd2dist.nets.head import MLPHead, timestep_embedding
from dd2dist.nets.student import StudentNet, params_to_buffers, student_backbone

__all__ = ["MLPHead", "StudentNet", "params_to_buffers", "student_backbone", "timestep_embedding"]
