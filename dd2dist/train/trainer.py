"""The stateful trainer: runs a method's phases for one rank, checkpoints them, and resumes them exactly.

One ``Trainer`` per process (rank). It owns no parallelism: engines come from an ``EngineFactory`` (plain torch or
DeepSpeed). What trains when, with which loss and optimizer, and what happens on entering a phase is the method's
(:class:`dd2dist.method.phases.DD2Phases`): the trainer builds the engines a group lists, runs the loss a role is
given and carries out the entry actions. Everything else hears about the run through one list of
:class:`~dd2dist.train.callbacks.TrainerCallback` (metrics, checkpoints, exports, phases, steps). Everything it
needs to continue exactly is in its checkpoint (see :mod:`dd2dist.train.checkpoint`): every engine, the EMAs,
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
from dd2dist.engine.factory import EngineFactory
from dd2dist.method.ema import EMA
from dd2dist.method.phases import DD2Phases, EngineGroup, Export, LoadEMA, ResetOptimizer
from dd2dist.method.schedule import Phase, Role, Schedule
from dd2dist.method.steps import StepContext
from dd2dist.nets.student import StudentNet
from dd2dist.teachers.base import ARTeacher
from dd2dist.train import checkpoint as ckpt
from dd2dist.train import manifest
from dd2dist.train.batches import BatchSource
from dd2dist.train.callbacks import TrainerCallback, check_callbacks
from dd2dist.train.collective import any_rank, gather_objects
from dd2dist.train.condition_source import ConditionSource
from dd2dist.train.stop import StopRequest

log = logging.getLogger("dd2dist.train")

CHECKPOINT_VERSION = 1
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
        rank, world_size: this process's place in the process group (the factory owns the group).
        data: stage-1 source when ``cfg.data.source == "shards"``: any iterable of batches, each a
            ``dd2dist.data.TokenBatch`` (``.tokens`` ids (B, N), ``.cond()``) or a ``(tokens, labels)`` pair.
            If it has ``state_dict()`` / ``load_state_dict()`` its position is checkpointed; if it has
            ``metrics()`` its counters travel with the logged metrics. ``None``: the teacher is sampled online
            (seeded per step) with the distillation-target sampling.
        callbacks: :class:`~dd2dist.train.callbacks.TrainerCallback` objects, told in order about phases, logged
            metrics, steps, checkpoints and exports (see that module for the order of events). Give every rank
            the callbacks whose events are collective for it (an export's weights are consolidated on every
            rank either way).
        student_template: the initial student (teacher backbone + fresh head) when ``teacher`` is already
            partitioned (ZeRO-3 built by ``build_partitioned_teacher``), e.g. from
            ``dd2dist.launch.partitioned_models.student_from_teacher_checkpoint``; None copies it from ``teacher``.
        init_student: weights of a trained stage-1 student (``Trainer.student_state_dict()`` of an earlier run)
            for the first engines this run builds (not when they come from a checkpoint): a stage-2-only run
            starts from it (without it, from the teacher backbone + a zero head); a stage-1 run continues it.
        stop_source: asked on every rank after every iteration (then one small all-reduce agrees on the answer);
            a request on any rank makes every rank write a checkpoint at that iteration (when ``fit`` has a
            ``checkpoint_dir`` and the request asks for one) and return from ``fit`` with ``preempted`` set. Give
            it to every rank or to none (it adds a collective).
        method: the phase rules; default :class:`~dd2dist.method.phases.DD2Phases` of ``cfg``.
        conditions: the conditions of the draws not read from data (stage 2, PF-ODE pairs, online stage 1), a
            :class:`~dd2dist.train.condition_source.ConditionSource`; None builds them from ``cfg``: class labels,
            or for a text-conditional teacher this rank's caption bank from ``data.captions`` / ``data.shards``.
    """

    def __init__(
        self,
        cfg,
        teacher: ARTeacher,
        engine_factory: EngineFactory,
        rank: int = 0,
        world_size: int = 1,
        data: Iterable | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        init_student: dict[str, Tensor] | None = None,
        student_template: StudentNet | None = None,
        stop_source: StopSource | None = None,
        method: DD2Phases | None = None,
        conditions: ConditionSource | None = None,
    ):
        self.cfg = cfg
        self.rank, self.world_size = int(rank), int(world_size)
        self.factory = engine_factory
        self.device = torch.device(getattr(engine_factory, "device", "cpu"))
        self.callbacks: list[TrainerCallback] = check_callbacks(callbacks)
        self.stop = False  # a callback may set it: fit() returns after the current iteration
        self.stop_source = stop_source
        self.preempted: StopRequest | None = None  # set when fit() returned on a stop request
        self.resume_skipped: list[tuple[Path, list[str]]] = []  # checkpoints resume() skipped, and why
        self.last_save_timing: dict[str, float] = {}
        self._init_student = init_student
        self._last_logged = -1
        self._checked_phase = -1
        self._active_role: Role | None = None
        self.method = method or DD2Phases(cfg)
        self.schedule: Schedule = self.method.schedule
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
                                   self.codebook, self.data, conditions)
        self.teacher_engine.set_trainable(False)
        self.state = TrainState()
        self.engines: dict[str, Engine] = {}
        self.engine_group: str | None = None
        self._group: EngineGroup | None = None
        self._whole_nets: dict[str, StudentNet] = {}  # head-only roles: the whole net their loss runs
        self.student_backbone = None  # the frozen backbone of the head-only phase
        self.ema: EMA | None = None
        self.ema_compare: dict[float, EMA] = {}  # stage2.ema_compare: other decay caps, same trajectory
        self.last_metrics: dict[str, float] = {}
        # JSON-serialisable values other layers keep in the checkpoint (e.g. the MLflow run id); saved by rank 0
        # in state.json and restored by load()
        self.extra_state: dict = {}

    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    # ------------------------------------------------------------------------------------------------------
    # engines per phase group
    # ------------------------------------------------------------------------------------------------------
    def _new_student(self, state: dict[str, Tensor] | None = None) -> StudentNet:
        net = copy.deepcopy(self._template)
        if state is not None:
            net.load_state_dict(state)
        return net

    def student_state_dict(self) -> dict[str, Tensor] | None:
        """Consolidated weights of the net the current group hands over (the stage-1 student; None when the
        group hands over nothing, e.g. in stage 2); collective."""
        role = self._group.hands_over if self._group is not None else None
        if role is None or role not in self.engines:
            return None
        if role in self._whole_nets:
            state = {k: v.clone() for k, v in self._template.state_dict().items()}
            for k, v in self.engines[role].full_state_dict().items():
                state[f"head.{k}"] = v
            return state
        return self.engines[role].full_state_dict()

    def _build_engines(self, name: str, from_previous: bool, loading: bool = False) -> None:
        """Create the engines of group ``name``; with ``from_previous`` initialise from the engines being replaced
        (``loading``: a checkpoint is about to overwrite the weights, so the initial values do not matter)."""
        group = self.method.group(name, self.phase)
        init = self.student_state_dict() if from_previous else None
        if group.export_incoming is not None and init is not None:
            self._emit("on_export", group.export_incoming, init)
        if init is None and self._init_student is not None and not from_previous and not loading:
            init = self._init_student
        if group.fresh_start_warning is not None and init is None and not loading:
            log.warning(group.fresh_start_warning)
        self.engines = {}
        self._whole_nets = {}
        self.ema = None
        self.ema_compare = {}
        self.student_backbone = None
        for spec in group.nets:
            if spec.head_only:
                net = self._new_student(init).to(self.device)
                self.student_backbone = net.backbone
                self.student_backbone.eval().requires_grad_(False)
                self.engines[spec.role] = self.factory.trainable(spec.role, net.head, spec.optim)
                self._whole_nets[spec.role] = net
            else:
                net = self._new_student(init)
                if spec.zero_head_output and not loading:
                    net.zero_head_output()
                self.engines[spec.role] = self.factory.trainable(spec.role, net, spec.optim)
        if group.ema is not None:
            e = group.ema
            tensors = self.engines[e.role].local_param_tensors()
            self.ema = EMA(tensors, e.ema_max, e.warmup, e.rampup)
            self.ema_compare = {cap: EMA(tensors, cap, e.warmup, e.rampup) for cap in e.compare}
        for engine in self.engines.values():
            engine.set_trainable(False)
        self.engine_group = name
        self._group = group
        self._checked_phase = -1  # new engines: the next phase entry checks their modes again
        self._active_role = None

    def _ensure_engines(self, phase: Phase) -> None:
        name = self.method.group_name(phase)
        if name != self.engine_group:
            self._build_engines(name, from_previous=self.engine_group is not None)

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
    def _net(self, role: str):
        whole = self._whole_nets.get(role)
        return whole if whole is not None else self.engines[role].callable_module()

    def _loss(self, role: Role, micro: int, phase: Phase) -> tuple[Tensor, dict[str, Tensor], int]:
        ctx = StepContext(cfg=self.cfg, phase=phase, iteration=self.state.iteration, phase_iter=self.state.phase_iter,
                          micro=micro, teacher=self.teacher_engine.module, codebook=self.codebook,
                          batches=self.batches, net=self._net)
        return self.method.loss(phase, role)(ctx)

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
                loss, m, b = self._loss(role, micro, phase)
            batch += b
            extras = m  # logged even when non-finite (the skipped step's loss says what went wrong)
            if not all_finite(loss):
                finite = False
                break
            engine.backward(loss)
        stats = engine.step() if finite else engine.skip_step()
        if stats.skipped:
            self.state.skipped[role] = self.state.skipped.get(role, 0) + 1
        elif self.ema is not None and role == self._group.ema.role:
            tensors = engine.local_param_tensors()
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
        metrics.update(self.method.step_metrics(phase))
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
            for action in self.method.entry_actions(self.state.phase_index):
                self._run_entry_action(action)
            self.state.phase_entered = True
            self._emit("on_phase", phase)
        if self._checked_phase != self.state.phase_index:
            # phase switch (or resume): every role of the phase can be made trainable alone, then all are frozen
            for role in phase.roles:
                self._set_role(role)
            self._set_role(None)
            self._checked_phase = self.state.phase_index

    def _run_entry_action(self, action) -> None:
        engine = self.engines[action.role]
        if isinstance(action, LoadEMA):
            # loaded as a state dict (collective under ZeRO-3) so the engine also refreshes DeepSpeed's fp32 master
            # copy: in bf16 a write into the module weights alone would be overwritten from the old master at the
            # next step
            engine.load_full_state_dict(self._ema_state_dict(action.role))
        elif isinstance(action, Export):
            self._emit("on_export", action.name, engine.full_state_dict())
        elif isinstance(action, ResetOptimizer):
            engine.reset_optimizer(action.optim)
        else:
            raise TypeError(f"unknown phase entry action {action!r}")

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
        ``launch.num_to_keep``) are kept under ``checkpoint_dir`` (see :meth:`_checkpoint`).
        ``max_iterations`` stops at that global iteration (tests, time budgets). Returns the last metrics.
        """
        every = checkpoint_every or self.cfg.launch.checkpoint_every
        keep_last = keep_last or self.cfg.launch.num_to_keep
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
                self._checkpoint(checkpoint_dir, keep_last)
            self._emit("on_step", metrics)
            if request is not None:
                break
            if self.stop:
                self.stop = False
                break
        if checkpoint_dir is not None and (self.preempted is None or self.preempted.checkpoint):
            here = ckpt.step_dir(checkpoint_dir, self.state.iteration)
            if not (here / ckpt.STATE_FILE).is_file() or manifest.quick_check(here) is not None:
                self._checkpoint(checkpoint_dir, keep_last)
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
            self._emit("on_log", metrics, self.state.iteration)
            self._last_logged = self.state.iteration

    # ------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------
    def _checkpoint(self, root: str | Path, keep_last: int) -> Path:
        """Save, then prune ``root`` to the newest ``keep_last`` checkpoints.

        Pruning lives here and nowhere else because this is the one place that knows both that the new checkpoint
        is complete and that every callback has seen it (the Ray layer copies it in ``on_checkpoint``), and it runs
        for every caller of ``fit``, Ray or not. :func:`dd2dist.train.checkpoint.prune` keeps the newest checkpoint
        that passes the manifest's cheap check whatever ``keep_last`` says, so the one a resume falls back to stays.
        """
        final = self.save(root)
        if self.rank == 0:
            ckpt.prune(root, keep_last)
        return final

    def save(self, root: str | Path) -> Path:
        """Write a complete checkpoint of this run under ``root/step_XXXXXXXX`` (every rank calls this), its
        manifest last; the write and manifest times go to ``on_log`` as ``checkpoint/*``, then ``on_checkpoint``
        gets the directory. Prunes nothing (``fit`` does)."""
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
        self._emit("on_log", self.last_save_timing, self.state.iteration)
        metrics = {**self.last_metrics, **self.last_save_timing}
        if self.preempted is not None:
            metrics["preempted"] = 1.0
        self._emit("on_checkpoint", final, metrics)
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
        self._group = None
        self.engines = {}
        self._whole_nets = {}
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
        """Consolidated weights of the net the method keeps an EMA of (the generator), by default the EMA ones
        (collective under ZeRO-3: every rank calls); ``ema_cap`` picks one of the ``stage2.ema_compare`` EMAs
        instead of the main one."""
        if self.ema is None:
            raise RuntimeError("no generator yet: stage 2 has not started")
        role = self._group.ema.role
        if not use_ema:
            return self.engines[role].full_state_dict()
        return self._ema_state_dict(role, ema_cap)

    def _ema_state_dict(self, role: str, ema_cap: float | None = None) -> dict[str, Tensor]:
        if ema_cap is not None and ema_cap not in self.ema_compare:
            raise KeyError(f"no comparison EMA with cap {ema_cap}; stage2.ema_compare is {sorted(self.ema_compare)}")
        engine = self.engines[role]
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
