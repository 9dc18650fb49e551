"""Where the trainer's batches come from: stage-1 teacher sequences (online or from a stream), stage-2 noise and
conditions (class labels or captions, :mod:`dd2dist.train.condition_source`). Every draw is seeded by
(seed, rank, iteration, purpose), so batches are a pure function of the step.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from dd2dist.conditions import Cond
from dd2dist.engine.base import Engine
from dd2dist.method.ode_init import teacher_ode_agreement, teacher_ode_tokens
from dd2dist.method.seeding import make_generator
from dd2dist.teachers.base import ARTeacher
from dd2dist.train.condition_source import ConditionSource, conditions_from_config

log = logging.getLogger("dd2dist.train")
ODE_AGREEMENT_WARN = 0.95  # below this share of converged tokens the regression pairs are called noisy


class BatchSource:
    """Builds the batches of one rank.

    Args:
        cfg: the :class:`ExperimentConfig` (seed, data.label_mode, stage batch sizes, engine.grad_accum).
        teacher: the teacher (its sizes; not kept); ``teacher_engine`` is used for online sampling.
        codebook: (V, Ce) fp32 code vectors on ``device``.
        data: a stage-1 stream (see :class:`dd2dist.train.Trainer`), or None for online teacher sampling.
        conditions: the conditions of the draws not read from data; None builds them from ``cfg``
            (:func:`~dd2dist.train.condition_source.conditions_from_config`: labels, or a caption bank read now).
    """

    def __init__(self, cfg, rank: int, world_size: int, device: torch.device, teacher: ARTeacher,
                 teacher_engine: Engine, codebook: Tensor, data: Iterable | None = None,
                 conditions: ConditionSource | None = None):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.teacher_engine, self.codebook, self.data = teacher_engine, codebook, data
        self.num_classes = int(teacher.num_classes)
        self.num_tokens, self.embed_dim = teacher.num_tokens, teacher.embed_dim
        self.sampler_returns_log_probs = bool(teacher.sample_returns_log_probs)
        self._data_iter = None
        self._ode_block = None  # (key, eps, cond, ids) of the current block of regression pairs
        self.ode_map_agreement: float | None = None  # set by the first block (_check_ode_map)
        if conditions is None:
            conditions = conditions_from_config(cfg, self.num_classes, rank, world_size, device)
        self.conditions = conditions

    def generator(self, iteration: int, purpose: str) -> torch.Generator:
        """The generator for one purpose of one iteration of this rank."""
        return make_generator(self.cfg.seed, self.rank, iteration, purpose, self.device)

    def conditions_for(self, batch: int, iteration: int, micro: int, purpose: str) -> Cond:
        """The condition of ``batch`` rows: class labels (balanced cycles or uniform draws) or captions drawn
        from the bank, from the generator of (seed, rank, iteration, ``purpose``). The purposes end in ``/labels``
        for captions too: they are seeds, and renaming them would change the draws of class-conditional runs."""
        return self.conditions.draw(batch, iteration, micro, purpose)

    def stage1(self, iteration: int, micro: int) -> tuple[Tensor, Cond, Tensor | None]:
        """Clean teacher sequences (B, N, Ce), their condition, and (online sampling) the teacher's log-probs
        each token was drawn from: exactly the teacher-forced target distribution, so GTS needs no extra pass."""
        lp = None
        if self.data is None:
            B = self.cfg.stage1.batch_size
            cond = self.conditions_for(B, iteration, micro, f"s1/{micro}/labels")
            gen = self.generator(iteration, f"s1/{micro}/sample")
            sample = self.teacher_engine.module.sample
            sampling = self.cfg.teacher.sampling
            if self.sampler_returns_log_probs:
                ids, lp = sample(cond, sampling, generator=gen, return_log_probs=True)
                lp = lp.clone()  # leave inference mode's tensor type behind
            else:
                ids = sample(cond, sampling, generator=gen)
            ids = ids.clone()
        else:
            if self._data_iter is None:
                self._data_iter = iter(self.data)
            try:
                batch = next(self._data_iter)
            except StopIteration as exc:
                raise RuntimeError("the stage-1 data iterable ran out; pass an endless (resampled) stream") from exc
            if hasattr(batch, "tokens"):
                ids, cond = batch.tokens, batch.cond()
            else:
                ids, labels = batch
                cond = Cond(labels=torch.as_tensor(labels))
            ids, cond = ids.to(self.device).long(), cond.to(self.device)
        if ids.shape[1:] != (self.num_tokens,):
            raise ValueError(f"stage-1 batch tokens have shape {tuple(ids.shape)}, expected (B, {self.num_tokens})")
        return self.codebook[ids], cond, lp

    def stage2(self, iteration: int, micro: int, purpose: str) -> tuple[Tensor, Cond]:
        """Generator input noise (B, N, Ce) and its condition for a stage-2 step."""
        B = self.cfg.stage2.batch_size
        cond = self.conditions_for(B, iteration, micro, f"{purpose}/{micro}/labels")
        eps = torch.randn((B, self.num_tokens, self.embed_dim), generator=self.generator(iteration,
                          f"{purpose}/{micro}/eps"), device=self.device)
        return eps, cond

    def ode_pairs(self, iteration: int, phase_iter: int, micro: int, teacher: ARTeacher,
                  stride: int = 1) -> tuple[Tensor, Cond, Tensor]:
        """Noise (B, N, Ce), condition and the teacher's PF-ODE token ids (B, N) for a step that uses them.

        The phase's consumer steps come every ``stride`` iterations (1 in the regression phase; K + 1 for the
        generator steps of the alternation). One sampler call makes the pairs of ``stage2.ode_pairs_per_call``
        consecutive consumer steps (the AR sampler's cost is mostly per AR step, not per row): the block whose first
        step is iteration ``i0`` is drawn from generators seeded by ``i0``, so a run resumed inside a block
        recomputes exactly the same pairs.
        """
        s2 = self.cfg.stage2
        B, per_call = s2.batch_size, s2.ode_pairs_per_call
        slot = (phase_iter // stride) % per_call  # this step's place in its block
        i0 = iteration - slot * stride
        key = (i0, micro)
        if self._ode_block is None or self._ode_block[0] != key:
            cond = self.conditions_for(B * per_call, i0, micro, f"ode/{micro}/labels")
            eps = torch.randn((B * per_call, self.num_tokens, self.embed_dim), device=self.device,
                              generator=self.generator(i0, f"ode/{micro}/eps"))
            ids = teacher_ode_tokens(teacher, eps, cond, self.cfg.teacher.sampling, self.codebook, s2.ode_steps)
            if self._ode_block is None:
                self._check_ode_map(teacher, eps, cond, ids)
            self._ode_block = (key, eps, cond, ids)
        _, eps, cond, ids = self._ode_block
        own = slice(slot * B, (slot + 1) * B)  # this step's rows of the block
        return eps[own], cond.select(own), ids[own]

    def _check_ode_map(self, teacher: ARTeacher, eps: Tensor, cond: Cond, ids: Tensor, rows: int = 64) -> None:
        """Once per run: how many of the first pairs' tokens 4x the PF-ODE steps reproduce (pairs from an unconverged
        integrator are a noisy target; dd2dist.method.ode_init.teacher_ode_agreement)."""
        n = min(rows, ids.shape[0])
        steps = self.cfg.stage2.ode_steps
        agree = teacher_ode_agreement(teacher, eps[:n], cond.select(slice(0, n)), self.cfg.teacher.sampling,
                                      self.codebook, steps, ids[:n])
        self.ode_map_agreement = agree
        if agree < ODE_AGREEMENT_WARN:
            log.warning("stage2.ode_steps=%d: only %.0f%% of the PF-ODE regression targets' tokens match %d steps; "
                        "the pairs are a noisy map of the noise, raise stage2.ode_steps", steps, 100 * agree, 4 * steps)
        else:
            log.info("stage2.ode_steps=%d: %.1f%% of the PF-ODE targets' tokens match %d steps", steps, 100 * agree,
                     4 * steps)

    # ---- stream position ----------------------------------------------------------------------------------
    def state_dict(self) -> dict | None:
        """The stage-1 stream position (None when there is no stream or it cannot report one)."""
        if self.data is not None and hasattr(self.data, "state_dict"):
            return self.data.state_dict()
        return None

    def load_state_dict(self, state: dict | None) -> None:
        """Continue the stream from ``state``; the next batch re-opens the iterator there."""
        if state is not None and self.data is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state)
        self._data_iter = None
