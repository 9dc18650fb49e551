"""Evaluation: sampling, FID / IS / precision-recall through torch-fidelity, class consistency, speed.

Sampling entry points (importing them here keeps ``dd2dist.eval`` light: no metric backends are loaded):
``one_step``, ``teacher_refined``, ``load_generator`` from :mod:`dd2dist.eval.sampling`.
"""

from dd2dist.eval.sampling import load_generator, one_step, teacher_refined

__all__ = ["load_generator", "one_step", "teacher_refined"]
