"""The stateful DD2 trainer: stage 1 (GTS), stage 2 (FCS/CSD alternation), performance alignment.

One ``Trainer`` per process (rank). It owns no parallelism: engines come from an ``EngineFactory`` (plain torch or
DeepSpeed), metrics go to a ``MetricsLogger``, and the Ray layer hears about checkpoints through
``checkpoint_hook(dir, step, metrics)``. Everything it needs to continue exactly is in its checkpoint (see
:mod:`dd2dist.train.checkpoint`): every engine, the EMA (and the ``stage2.ema_compare`` ones),
counters and phase, RNG and data-stream state.

Iteration = one optimizer step of one engine, as the :class:`~dd2dist.method.schedule.Schedule` says. At every
role switch the trainer sets each engine trainable or frozen and asserts it (``Engine.assert_mode``). Random draws
come from generators seeded by (seed, rank, iteration, purpose). A non-finite loss on any rank makes every rank
skip that step (``all_finite`` is collective); skips are counted and logged.

Run safety: every checkpoint carries a manifest (:mod:`dd2dist.train.manifest`) written before it is renamed into
place; :meth:`Trainer.resume` loads the newest candidate that verifies and records the ones it skipped. With a
``stop_source`` (:mod:`dd2dist.train.stop`) the ranks agree after every iteration whether any of them was asked to
stop (SIGTERM, Ctrl-C, the driver); they then all write a checkpoint at that iteration and return
(``trainer.preempted``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dd2dist.engine.base import Engine, all_finite
from dd2dist.engine.factory import EngineFactory, OptimSpec
from dd2dist.method.ema import EMA
from dd2dist.method.losses import csd_loss, fcs_loss, gts_loss, snap_to_codes
from dd2dist.method.ode_init import regression_loss
from dd2dist.method.schedule import Phase, PhaseKind, Role, Schedule, build_schedule, generator_warmup_steps
from dd2dist.nets.student import StudentNet
from dd2dist.teachers.base import ARTeacher
from dd2dist.train import checkpoint as ckpt
from dd2dist.train import manifest
from dd2dist.train.batches import BatchSource
from dd2dist.train.collective import any_rank, gather_objects
from dd2dist.train.metrics import MetricsLogger, NullLogger
from dd2dist.train.stop import StopRequest

log = logging.getLogger("dd2dist.train")

CHECKPOINT_VERSION = 1
CheckpointHook = Callable[[Path, int, dict], None]
StepCallback = Callable[["Trainer", dict], None]
StopSource = Callable[[], StopRequest | None]


class NoVerifiedCheckpoint(RuntimeError):
    """Checkpoints exist but none verifies: starting over would silently throw the run away."""


@dataclass
class TrainState:
    """The trainer's counters (all of them go to ``state.json``)."""

    iteration: int = 0  # iterations done over the whole run (skipped ones included)
    phase_index: int = 0
    phase_iter: int = 0  # iterations done in the current phase
    phase_entered: bool = False  # the current phase's entry actions ran
    skipped: dict[str, int] = field(default_factory=dict)  # non-finite steps skipped, per role
    samples: int = 0  # sequences consumed over all ranks and roles


def _group_of(phase: Phase) -> str:
    """Phases sharing engines: stage 2, alignment and after-alignment use one generator/guidance pair."""
    return {"gts_head": "stage1_head", "gts": "stage1"}.get(phase.kind, "stage2")


def ema_export_name(cap: float) -> str:
    """File name of the generator exported from the ``stage2.ema_compare`` EMA with decay cap ``cap``."""
    return f"generator_ema{cap:g}.safetensors"


class Trainer:
    """Runs ``cfg.stages`` for one rank.

    Args:
        cfg: an :class:`dd2dist.config.ExperimentConfig`.
        teacher: the frozen teacher, *not yet partitioned*: student nets are copied from it here, before it is
            handed to ``engine_factory.teacher``; its codebook is copied once (the closed form needs it whole).
        engine_factory: builds the engines (``TorchEngineFactory`` in one process).
        logger: metrics sink (rank 0 gets a real one; pass ``NullLogger`` elsewhere). Default: NullLogger.
        rank, world_size: this process's place in the process group (the factory owns the group).
        data: stage-1 source when ``cfg.data.source == "shards"``: any iterable of batches, each a
            ``dd2dist.data.TokenBatch`` (``.tokens`` ids (B, N), ``.cond()``) or a ``(tokens, labels)`` pair.
            If it has ``state_dict()`` / ``load_state_dict()`` its position is checkpointed. ``None``: the teacher
            is sampled online (seeded per step) with the distillation-target sampling.
        checkpoint_hook: called on every rank after each checkpoint is complete.
        callbacks: ``cb(trainer, metrics)`` called on every rank after every iteration (evaluation during
            training, progress bars, early stops via ``trainer.stop = True``); they must not draw from the global
            RNG or touch the engines' weights if exact resume matters.
        student_template: the initial student (teacher backbone + fresh head) when ``teacher`` is already
            partitioned (ZeRO-3 built by ``build_partitioned_teacher``), e.g. from
            ``dd2dist.engine.deepspeed_engine.student_from_teacher_checkpoint``; None copies it from ``teacher``.
        init_student: weights of a trained stage-1 student (``Trainer.student_state_dict()`` of an earlier run)
            for the first engines this run builds (not when they come from a checkpoint): a stage-2-only run
            starts from it (without it, from the teacher backbone + a zero head); a stage-1 run continues it.
        export_hook: ``hook(name, state)`` called on every rank with consolidated weights at the two hand-overs whose
            model is evaluated later: ``"stage1_student"`` when stage 2 takes over from stage 1 in this run, and
            ``"generator_regression"`` (the generator as the PF-ODE regression left it, the DD1-style baseline) when
            CSD takes over from the regression. Each call comes before the next phase's first step, so a checkpoint
            after it implies the hook ran; the Ray layer writes the weights to the run's export folder.
        stop_source: asked on every rank after every iteration (then one small all-reduce agrees on the answer);
            a request on any rank makes every rank write a checkpoint at that iteration (when ``fit`` has a
            ``checkpoint_dir`` and the request asks for one) and return from ``fit`` with ``preempted`` set. Give
            it to every rank or to none (it adds a collective).
    """

    def __init__(
        self,
        cfg,
        teacher: ARTeacher,
        engine_factory: EngineFactory,
        logger: MetricsLogger | None = None,
        rank: int = 0,
        world_size: int = 1,
        data: Iterable | None = None,
        checkpoint_hook: CheckpointHook | None = None,
        callbacks: list[StepCallback] | tuple[StepCallback, ...] = (),
        init_student: dict[str, Tensor] | None = None,
        student_template: StudentNet | None = None,
        export_hook: Callable[[str, dict[str, Tensor]], None] | None = None,
        stop_source: StopSource | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.factory = engine_factory
        self.device = torch.device(getattr(engine_factory, "device", "cpu"))
        self.logger = logger or NullLogger()
        self.checkpoint_hook = checkpoint_hook
        self.callbacks = list(callbacks)
        self.stop = False  # a callback may set it: fit() returns after the current iteration
        self.stop_source = stop_source
        self.preempted: StopRequest | None = None  # set when fit() returned on a stop request
        self.resume_skipped: list[tuple[Path, list[str]]] = []  # checkpoints resume() skipped, and why
        self.last_save_timing: dict[str, float] = {}
        self._init_student = init_student
        self.export_hook = export_hook
        self._last_logged = -1
        self._checked_phase = -1
        self._active_role: Role | None = None
        self.schedule: Schedule = build_schedule(cfg)
        self.sampling = cfg.teacher.sampling
        if cfg.data.source == "shards" and data is None and "stage1" in cfg.stages:
            raise ValueError("data.source is 'shards' but no data iterable was given to the Trainer")
        self.data = data if cfg.data.source == "shards" else None
        if teacher.family != cfg.teacher.family:
            raise ValueError(f"teacher.family is {cfg.teacher.family!r} in the config but the teacher given is a "
                             f"{teacher.family!r} model")
        teacher.freeze()
        self.num_classes = int(teacher.num_classes)  # public: samplers and sample grids read these
        self.num_tokens, self.embed_dim = teacher.num_tokens, teacher.embed_dim
        if student_template is None:
            self.codebook = teacher.codebook().detach().float().clone().to(self.device)
            # fp32 master weights whatever the teacher's dtype (bf16 runs autocast, or let DeepSpeed cast)
            self._template = StudentNet(teacher, cfg.student).cpu().float()
        else:  # the teacher is already partitioned: its codebook is read from the student's (frozen) copy
            self._template = student_template.cpu().float()
            self.codebook = self._template.backbone.codebook().detach().float().clone().to(self.device)
        self.teacher_engine = engine_factory.teacher(teacher)
        self.batches = BatchSource(cfg, self.rank, self.world_size, self.device, teacher, self.teacher_engine,
                                   self.codebook, self.data)
        self.teacher_engine.set_trainable(False)
        self.state = TrainState()
        self.engines: dict[str, Engine] = {}
        self.engine_group: str | None = None
        self.student_backbone = None  # the frozen backbone of the head-only phase
        self.ema: EMA | None = None
        self.ema_compare: dict[float, EMA] = {}  # stage2.ema_compare: other decay caps, same trajectory
        self.last_metrics: dict[str, float] = {}
        # JSON-serialisable values other layers keep in the checkpoint (e.g. the MLflow run id); saved by rank 0
        # in state.json and restored by load()
        self.extra_state: dict = {}

    # ------------------------------------------------------------------------------------------------------
    # engines per phase group
    # ------------------------------------------------------------------------------------------------------
    def _new_student(self, state: dict[str, Tensor] | None = None) -> StudentNet:
        net = copy.deepcopy(self._template)
        if state is not None:
            net.load_state_dict(state)
        return net

    def _stage1_spec(self) -> OptimSpec:
        s1 = self.cfg.stage1
        return OptimSpec(lr=s1.lr, betas=tuple(s1.betas), weight_decay=s1.weight_decay, grad_clip=s1.grad_clip,
                         lr_start=0.0, warmup_steps=s1.warmup_steps, grad_accum=self.cfg.engine.grad_accum)

    def _stage2_common(self) -> dict:
        """The optimizer settings every stage-2 network and phase shares (all but the LR and its warm-up)."""
        s2 = self.cfg.stage2
        return dict(betas=tuple(s2.betas), weight_decay=s2.weight_decay, grad_clip=s2.grad_clip,
                    lr_start=s2.lr_start, grad_accum=self.cfg.engine.grad_accum)

    def _stage2_specs(self) -> tuple[OptimSpec, OptimSpec]:
        s2 = self.cfg.stage2
        common = self._stage2_common()
        gen = OptimSpec(lr=s2.generator_lr, warmup_steps=generator_warmup_steps(
            s2.warmup_guidance_steps, s2.guidance_per_generator), **common)
        # The paper gives the guidance net the same 1e-6 -> lr ramp; its length is not stated: we use the
        # generator's length measured in guidance steps (warmup_guidance_steps).
        gui = OptimSpec(lr=s2.guidance_lr, warmup_steps=s2.warmup_guidance_steps, **common)
        return gen, gui

    def _regression_spec(self) -> OptimSpec:
        """The generator's optimizer during the PF-ODE regression phase (its own LR and warm-up)."""
        s2 = self.cfg.stage2
        return OptimSpec(lr=s2.ode_init_lr, warmup_steps=s2.ode_init_warmup_steps, **self._stage2_common())

    def student_state_dict(self) -> dict[str, Tensor] | None:
        """Consolidated weights of the stage-1 student as it stands (None outside stage 1); collective."""
        return self._current_student_state()

    def _current_student_state(self) -> dict[str, Tensor] | None:
        if "student" in self.engines:
            return self.engines["student"].full_state_dict()
        if "student_head" in self.engines:
            state = {k: v.clone() for k, v in self._template.state_dict().items()}
            for k, v in self.engines["student_head"].full_state_dict().items():
                state[f"head.{k}"] = v
            return state
        return None

    def _build_engines(self, group: str, from_previous: bool, loading: bool = False) -> None:
        """Create the engines of ``group``; with ``from_previous`` initialise from the engines being replaced
        (``loading``: a checkpoint is about to overwrite the weights, so the initial values do not matter)."""
        init = self._current_student_state() if from_previous else None
        if group == "stage2" and init is not None and self.export_hook is not None:
            self.export_hook("stage1_student", init)
        if init is None and self._init_student is not None and not from_previous and not loading:
            init = self._init_student
        if group == "stage2" and init is None and not loading:
            log.warning("stage 2 starts without a stage-1 model in this run: generator and guidance are the "
                        "teacher backbone + a zero head (docs/method.md §13.1, Tab.4: expect a much worse start)")
        self.engines = {}
        self.ema = None
        self.ema_compare = {}
        self.student_backbone = None
        if group == "stage1_head":
            net = self._new_student(init).to(self.device)
            self.student_backbone = net.backbone
            self.student_backbone.eval().requires_grad_(False)
            self.engines["student_head"] = self.factory.trainable("student_head", net.head, self._stage1_spec())
            self._head_net = net
        elif group == "stage1":
            self.engines["student"] = self.factory.trainable("student", self._new_student(init), self._stage1_spec())
        else:
            gen_spec, gui_spec = self._stage2_specs()
            if self.phase is not None and self.phase.kind == "regress":
                gen_spec = self._regression_spec()  # _enter_phase restarts it with the CSD spec afterwards
            self.engines["generator"] = self.factory.trainable("generator", self._new_student(init), gen_spec)
            self.engines["guidance"] = self.factory.trainable("guidance", self._new_student(init), gui_spec)
            s2 = self.cfg.stage2
            tensors = self.engines["generator"].local_param_tensors()
            self.ema = EMA(tensors, s2.ema_max, s2.ema_warmup, s2.ema_rampup)
            self.ema_compare = {cap: EMA(tensors, cap, s2.ema_warmup, s2.ema_rampup) for cap in s2.ema_compare}
        for engine in self.engines.values():
            engine.set_trainable(False)
        self.engine_group = group
        self._checked_phase = -1  # new engines: the next phase entry checks their modes again
        self._active_role = None

    def _ensure_engines(self, phase: Phase) -> None:
        group = _group_of(phase)
        if group != self.engine_group:
            self._build_engines(group, from_previous=self.engine_group is not None)

    # ------------------------------------------------------------------------------------------------------
    # modes
    # ------------------------------------------------------------------------------------------------------
    def _set_role(self, role: Role | None) -> None:
        """Make exactly ``role``'s engine trainable (None: none), freeze the rest, and assert every net's mode."""
        for name, engine in self.engines.items():
            engine.set_trainable(name == role)
        self.assert_modes(role)
        self._active_role = role

    def assert_modes(self, role: Role | None) -> None:
        """Phase-switch check: ``role`` trains, every other net (teacher included) is eval + frozen."""
        self.teacher_engine.assert_mode(False)
        for name, engine in self.engines.items():
            engine.assert_mode(name == role)
        if self.student_backbone is not None:
            flags = {p.requires_grad for p in self.student_backbone.parameters()}
            if self.student_backbone.training or flags - {False}:
                raise AssertionError("student backbone must be frozen (eval, no grad) during the head-only phase")

    # ------------------------------------------------------------------------------------------------------
    # one iteration
    # ------------------------------------------------------------------------------------------------------
    def _gen(self, purpose: str) -> torch.Generator:
        return self.batches.generator(self.state.iteration, purpose)

    def _loss(self, role: Role, micro: int, kind: PhaseKind) -> tuple[Tensor, dict[str, Tensor], int]:
        cfg, s2 = self.cfg, self.cfg.stage2
        teacher = self.teacher_engine.module
        if role in ("student_head", "student"):
            x0, cond, lp = self.batches.stage1(self.state.iteration, micro)
            net = self._head_net if role == "student_head" else self.engines["student"].callable_module()
            loss, m = gts_loss(net, teacher, self.codebook, x0, cond, self.sampling, self._gen(f"gts/{micro}"),
                               t_min=cfg.stage1.t_min, teacher_log_probs=lp)
            return loss, m, x0.shape[0]
        generator = self.engines["generator"].callable_module()  # ZeRO-3: calls routed through forward
        guidance = self.engines["guidance"].callable_module()
        if kind == "regress":  # the generator's PF-ODE regression start (dd2dist.method.ode_init)
            eps, cond, ids = self.batches.ode_pairs(self.state.iteration, self.state.phase_iter, micro, teacher)
            loss, m = regression_loss(generator, eps, cond, self.codebook[ids])
            return loss, m, eps.shape[0]
        anchor = role == "generator" and s2.regression_weight > 0
        if anchor:  # CSD on the noise of PF-ODE pairs, whose teacher tokens anchor the generator's map
            eps, cond, ids = self.batches.ode_pairs(self.state.iteration, self.state.phase_iter, micro, teacher,
                                                    stride=self.phase.guidance_per_generator + 1)
        else:
            eps, cond = self.batches.stage2(self.state.iteration, micro, role)
        if role == "guidance":
            with torch.no_grad():
                q = generator.generate(eps, cond)
            prefix = snap_to_codes(q, self.codebook, teacher.family) if s2.guidance_prefix == "snap" else None
            loss, m = fcs_loss(guidance, q, cond, self._gen(f"fcs/{micro}"), num_samples=s2.fcs_samples,
                               t_min=s2.fcs_t_min, prefix=prefix)
            return loss, m, eps.shape[0]
        q = generator.generate(eps, cond)
        loss, m = csd_loss(q, teacher, guidance, self.codebook, cond, self.sampling, self._gen(f"csd/{micro}"),
                           kind=s2.csd_loss, alpha=s2.csd_alpha, t_min=s2.csd_t_min, t_max=s2.csd_t_max,
                           teacher_prefix=s2.teacher_prefix, guidance_prefix=s2.guidance_prefix)
        if anchor:
            reg = (q.float() - self.codebook[ids]).pow(2).sum(-1).mean()
            loss = loss + s2.regression_weight * reg
            m = {**m, "regression_loss": reg.detach()}
        return loss, m, eps.shape[0]

    def _autocast(self):
        """bf16 autocast for plain-torch engines with ``engine.precision: bf16`` (DeepSpeed engines hold bf16
        weights themselves); the closed form and the reductions stay fp32 either way (see method.losses)."""
        if self.cfg.engine.kind == "torch" and self.cfg.engine.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _iteration(self, phase: Phase) -> dict[str, float]:
        role = phase.role_at(self.state.phase_iter)
        if role != self._active_role:  # a role switch: set and assert every net's mode
            self._set_role(role)
        engine = self.engines[role]
        t0 = time.perf_counter()
        finite, batch, extras = True, 0, {}
        for micro in range(self.cfg.engine.grad_accum):
            with self._autocast():
                loss, m, b = self._loss(role, micro, phase.kind)
            batch += b
            extras = m  # logged even when non-finite (the skipped step's loss says what went wrong)
            if not all_finite(loss):
                finite = False
                break
            engine.backward(loss)
        stats = engine.step() if finite else engine.skip_step()
        if stats.skipped:
            self.state.skipped[role] = self.state.skipped.get(role, 0) + 1
        elif role == "generator":
            tensors = self.engines["generator"].local_param_tensors()
            for ema in (self.ema, *self.ema_compare.values()):
                ema.update(tensors)
        dt = time.perf_counter() - t0
        self.state.samples += batch * self.world_size
        metrics = {f"{role}/{k}": float(v) for k, v in extras.items()}
        metrics.update({
            f"{role}/grad_norm": stats.grad_norm, f"{role}/lr": stats.lr, f"{role}/skipped": float(stats.skipped),
            f"{role}/optimizer_steps": float(engine.optimizer_steps), "step_time_s": dt,
            "samples_per_s": batch * self.world_size / max(dt, 1e-9), "phase_index": float(self.state.phase_index),
            "skipped_total": float(sum(self.state.skipped.values())),
        })
        if phase.kind == "alternate":
            metrics["K"] = float(phase.guidance_per_generator)
        if self.ema is not None:
            metrics["ema/updates"] = float(self.ema.updates)
        return metrics

    # ------------------------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------------------------
    @property
    def phase(self) -> Phase | None:
        i = self.state.phase_index
        return self.schedule.phases[i] if i < len(self.schedule.phases) else None

    @property
    def done(self) -> bool:
        return self.phase is None

    def _enter_phase(self, phase: Phase) -> None:
        self._ensure_engines(phase)
        if not self.state.phase_entered:
            if phase.ema_to_generator_on_entry:
                # performance alignment (i): the generator continues from its EMA weights. Loaded as a state dict
                # (collective under ZeRO-3) so the engine also refreshes DeepSpeed's fp32 master copy: in bf16 a
                # write into the module weights alone would be overwritten from the old master at the next step.
                self.engines["generator"].load_full_state_dict(self.generator_state_dict(use_ema=True))
            if phase.kind == "alternate" and self._follows_regression():
                if self.export_hook is not None:
                    self.export_hook("generator_regression", self.generator_state_dict(use_ema=False))
                # CSD after the regression start: fresh AdamW moments and the CSD warm-up from lr_start (the
                # regression's second moments are of another loss's scale)
                self.engines["generator"].reset_optimizer(self._stage2_specs()[0])
            self.state.phase_entered = True
            self.logger.set_tags({"phase": phase.name, "stage": phase.stage})
        if self._checked_phase != self.state.phase_index:
            # phase switch (or resume): every role of the phase can be made trainable alone, then all are frozen
            for role in phase.roles:
                self._set_role(role)
            self._set_role(None)
            self._checked_phase = self.state.phase_index

    def _follows_regression(self) -> bool:
        i = self.state.phase_index
        return i > 0 and self.schedule.phases[i - 1].kind == "regress"

    def fit(
        self,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        max_iterations: int | None = None,
        keep_last: int | None = None,
    ) -> dict[str, float]:
        """Run (or continue) the schedule.

        With ``checkpoint_dir``: a checkpoint every ``checkpoint_every`` iterations (default
        ``launch.checkpoint_every``) and one where fit() returns; only the newest ``keep_last`` (default
        ``launch.num_to_keep``) are kept under ``checkpoint_dir``, older ones are deleted after the hook ran.
        ``max_iterations`` stops at that global iteration (tests, time budgets). Returns the last metrics.
        """
        every = checkpoint_every or self.cfg.launch.checkpoint_every
        self._keep_last = keep_last or self.cfg.launch.num_to_keep
        self.preempted = None
        log_every = self.cfg.tracking.log_every
        while not self.done:
            phase = self.phase
            if max_iterations is not None and self.state.iteration >= max_iterations:
                break
            self._enter_phase(phase)
            if self.state.phase_iter >= phase.iterations:
                self.state.phase_index += 1
                self.state.phase_iter = 0
                self.state.phase_entered = False
                continue
            metrics = self._iteration(phase)
            self.state.iteration += 1
            self.state.phase_iter += 1
            self.last_metrics = metrics
            if self.state.iteration % log_every == 0:
                self._log(metrics)
            request = self._agreed_stop()
            if request is not None:
                log.warning("rank %d: stopping after iteration %d (%s)%s", self.rank, self.state.iteration,
                            request.reason, ", writing a checkpoint" if request.checkpoint else ", no checkpoint")
                self.preempted = request
            if checkpoint_dir is not None and (self.state.iteration % every == 0
                                               or (request is not None and request.checkpoint)):
                self.save(checkpoint_dir)
            for cb in self.callbacks:
                cb(self, metrics)
            if request is not None:
                break
            if self.stop:
                self.stop = False
                break
        if checkpoint_dir is not None and (self.preempted is None or self.preempted.checkpoint):
            here = ckpt.step_dir(checkpoint_dir, self.state.iteration)
            if not (here / ckpt.STATE_FILE).is_file() or manifest.quick_check(here) is not None:
                self.save(checkpoint_dir)
        if self.last_metrics:
            self._log(self.last_metrics)
        return self.last_metrics

    def _agreed_stop(self) -> StopRequest | None:
        """The stop request of any rank, the same on every rank (None without a ``stop_source``). A request that
        arrives with the last iteration is ignored: the run is complete and finishes normally."""
        if self.stop_source is None:
            return None
        local = self.stop_source()
        stop, no_checkpoint = any_rank([local is not None, local is not None and not local.checkpoint])
        if not stop:
            return None
        reasons = sorted({r for r in gather_objects(local.reason if local is not None else None) if r})
        if self.state.iteration >= self.schedule.total_iterations:
            return None
        return StopRequest("; ".join(reasons), checkpoint=not no_checkpoint)

    def _log(self, metrics: dict[str, float]) -> None:
        """Log once per iteration (the end-of-fit flush must not repeat a step already logged)."""
        if self.state.iteration != self._last_logged:
            if self.data is not None and hasattr(self.data, "metrics"):
                # bad-data counters (skipped samples, corrupt shards) travel with the losses
                metrics = {**metrics, **{k: float(v) for k, v in self.data.metrics().items()}}
            self.logger.log_metrics(metrics, self.state.iteration)
            self._last_logged = self.state.iteration

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------
    def save(self, root: str | Path) -> Path:
        """Write a complete checkpoint of this run under ``root/step_XXXXXXXX`` (every rank calls this), its
        manifest last; the write and manifest times go to the logger as ``checkpoint/*``."""
        t_start = time.perf_counter()
        final = ckpt.step_dir(root, self.state.iteration)
        tmp = final.with_name(final.name + ".tmp")
        for name, engine in self.engines.items():
            engine.save(tmp / "engines" / name)
        if self.ema is not None:
            (tmp / "ema").mkdir(parents=True, exist_ok=True)
            torch.save(self.ema.state_dict(), tmp / "ema" / f"rank{self.rank}.pt")
            if self.ema_compare:
                torch.save({cap: ema.state_dict() for cap, ema in self.ema_compare.items()},
                           tmp / "ema" / f"rank{self.rank}.compare.pt")
        (tmp / "rng").mkdir(parents=True, exist_ok=True)
        torch.save(ckpt.rng_state(), tmp / "rng" / f"rank{self.rank}.pt")
        data_state = self.batches.state_dict()
        if data_state is not None:
            ckpt.write_json(tmp / "data" / f"rank{self.rank}.json", data_state)
        if self.rank == 0:
            ckpt.write_json(tmp / ckpt.STATE_FILE, {
                "version": CHECKPOINT_VERSION, **asdict(self.state), "engine_group": self.engine_group,
                "engines": sorted(self.engines), "phase": self.phase.name if self.phase else None,
                "phases": [p.name for p in self.schedule.phases], "world_size": self.world_size,
                "seed": self.cfg.seed, "extra": self.extra_state,
            })
        self.factory.barrier()
        t_manifest = time.perf_counter()
        built = manifest.build_manifest(tmp, self.state.iteration)  # every rank hashes a share of the files
        if self.rank == 0:
            manifest.write_manifest(tmp, built)
        manifest_s = time.perf_counter() - t_manifest
        if self.rank == 0:
            ckpt.finalize(tmp, final)
        self.factory.barrier()
        if self.rank != 0 and tmp.exists():
            # node-local disks (no shared file system): this node's ranks finalise their own share; the Ray layer
            # merges the workers' directories into one checkpoint
            ckpt.finalize_local(tmp, final)
        self.last_save_timing = {
            "checkpoint/write_s": time.perf_counter() - t_start, "checkpoint/manifest_s": manifest_s,
            "checkpoint/files": float(len(built["files"])),
            "checkpoint/bytes": float(sum(e["size"] for e in built["files"].values())),
        }
        self.logger.log_metrics(self.last_save_timing, self.state.iteration)
        if self.checkpoint_hook is not None:
            metrics = {**self.last_metrics, **self.last_save_timing}
            if self.preempted is not None:
                metrics["preempted"] = 1.0
            self.checkpoint_hook(final, self.state.iteration, metrics)
        if self.rank == 0 and getattr(self, "_keep_last", None):
            ckpt.prune(root, self._keep_last)
        return final

    def load(self, directory: str | Path) -> None:
        """Restore everything :meth:`save` wrote (same world size, same schedule)."""
        directory = Path(directory)
        meta = ckpt.read_json(directory / ckpt.STATE_FILE)
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"{directory}: checkpoint version {meta.get('version')} != {CHECKPOINT_VERSION}")
        if meta["world_size"] != self.world_size:
            raise ValueError(f"{directory}: saved with world_size {meta['world_size']}, running {self.world_size}")
        phases = [p.name for p in self.schedule.phases]
        if meta["phases"] != phases:
            raise ValueError(f"{directory}: saved for phases {meta['phases']}, this config has {phases}")
        self.state = TrainState(**{k: meta[k] for k in asdict(TrainState()).keys()})
        self.extra_state = dict(meta.get("extra", {}))
        self.engine_group = None
        self.engines = {}
        self._checked_phase = -1
        self._active_role = None
        if meta["engine_group"] is not None:
            self._build_engines(meta["engine_group"], from_previous=False, loading=True)
            for name, engine in self.engines.items():
                engine.load(directory / "engines" / name)
            if self.ema is not None:
                self.ema.load_state_dict(torch.load(directory / "ema" / f"rank{self.rank}.pt",
                                                    map_location="cpu", weights_only=False))
                self._load_ema_compare(directory / "ema" / f"rank{self.rank}.compare.pt")
        ckpt.set_rng_state(torch.load(directory / "rng" / f"rank{self.rank}.pt", weights_only=False))
        data_state = directory / "data" / f"rank{self.rank}.json"
        self.batches.load_state_dict(ckpt.read_json(data_state) if data_state.is_file() else None)

    def _load_ema_compare(self, path: Path) -> None:
        saved = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {}
        if set(saved) != set(self.ema_compare):
            raise ValueError(f"{path.parent.parent}: checkpoint has comparison EMAs {sorted(saved)}, this config's "
                             f"stage2.ema_compare is {sorted(self.ema_compare)}")
        for cap, ema in self.ema_compare.items():
            ema.load_state_dict(saved[cap])

    def resume_latest(self, root: str | Path) -> Path | None:
        """Load the newest checkpoint under ``root`` that verifies (see :meth:`resume`); None when there is none."""
        return self.resume(ckpt.complete_checkpoints(root))

    def resume(self, candidates: Sequence[str | Path]) -> Path | None:
        """Load the first of ``candidates`` (newest first) that verifies against its manifest; returns it.

        Collective: every rank re-hashes a share of each candidate's files, and all ranks follow rank 0's order,
        so they load the same checkpoint. Skipped ones are logged with the reason and kept in
        ``resume_skipped``. None when there is no candidate; :class:`NoVerifiedCheckpoint` when there are some but
        none verifies (starting over would silently throw the run away).
        """
        mine = [Path(p) for p in candidates]
        lists = gather_objects([str(p) for p in mine])
        # every rank follows rank 0's order; a rank keeps its own paths when they name the same checkpoints (a
        # copy downloaded from remote storage lives in a different local folder on each node)
        same = all([Path(x).name for x in other] == [p.name for p in mine] for other in lists)
        ordered = mine if same else [Path(p) for p in lists[0]]
        self.resume_skipped = []
        for path in ordered:
            problems = manifest.verify(path)
            if not problems:
                if self.resume_skipped and self.rank == 0:
                    log.warning("resuming from %s, the newest checkpoint that verifies", path)
                self.load(path)
                return path
            self.resume_skipped.append((path, problems))
            if self.rank == 0:
                log.warning("checkpoint %s skipped: %s", path, "; ".join(problems))
        if ordered:
            detail = " | ".join(f"{p}: {'; '.join(why)}" for p, why in self.resume_skipped)
            raise NoVerifiedCheckpoint(
                f"no checkpoint verifies ({detail}); repair or move them away to start over "
                "(python jobs/checkpoint_manifest.py verify DIR)")
        return None

    # ------------------------------------------------------------------------------------------------------
    # export
    # ------------------------------------------------------------------------------------------------------
    def generator_state_dict(self, use_ema: bool = True, ema_cap: float | None = None) -> dict[str, Tensor]:
        """Consolidated generator weights, by default the EMA ones (collective under ZeRO-3: every rank calls);
        ``ema_cap`` picks one of the ``stage2.ema_compare`` EMAs instead of the main one."""
        engine = self.engines.get("generator")
        if engine is None:
            raise RuntimeError("no generator yet: stage 2 has not started")
        if not use_ema:
            return engine.full_state_dict()
        if ema_cap is not None and ema_cap not in self.ema_compare:
            raise KeyError(f"no comparison EMA with cap {ema_cap}; stage2.ema_compare is {sorted(self.ema_compare)}")
        ema = self.ema if ema_cap is None else self.ema_compare[ema_cap]
        with ema.swapped_into(engine.local_param_tensors()):
            return engine.full_state_dict()

    def export_generator(self, directory: str | Path, use_ema: bool = True) -> Path:
        """Write ``generator.safetensors`` (EMA weights) + ``config.yaml`` for :func:`dd2dist.eval.load_generator`,
        and with ``use_ema`` one :func:`ema_export_name` file per ``stage2.ema_compare`` cap beside it.

        Collective (every rank calls); rank 0 writes. Returns the path of ``generator.safetensors``.
        """
        from safetensors.torch import save_file

        from dd2dist.config import dump_yaml

        directory = Path(directory)
        files = {"generator.safetensors": None}
        if use_ema:
            files.update({ema_export_name(cap): cap for cap in self.ema_compare})
        for name, cap in files.items():
            state = self.generator_state_dict(use_ema, ema_cap=cap)
            if self.rank == 0:
                directory.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in state.items()}, str(directory / name))
        if self.rank == 0:
            dump_yaml(self.cfg, directory / "config.yaml")
        self.factory.barrier()
        return directory / "generator.safetensors"

    def progress(self) -> dict[str, float]:
        """Counters for progress bars: iteration, total iterations, phase."""
        return {"iteration": self.state.iteration, "total": self.schedule.total_iterations,
                "phase_index": self.state.phase_index,
                "fraction": self.state.iteration / max(1, self.schedule.total_iterations)}
