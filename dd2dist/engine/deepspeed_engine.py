"""DeepSpeed ZeRO engines behind the :class:`~dd2dist.engine.base.Engine` interface (inside Ray Train workers).

* :class:`DeepSpeedEngine`: a trainable network (generator, guidance, stage-1 student) with its own
  ``torch.optim.AdamW`` (passed to DeepSpeed with ``zero_allow_untested_optimizer``), ZeRO stage 0/1/2/3 from the
  config, DeepSpeed's gradient clipping, and an LR schedule evaluated on the engine's *own* optimizer-step counter
  (DeepSpeed gets no scheduler, so the schedule never ticks on a skipped step).
* :class:`DeepSpeedFrozenEngine`: the teacher. ZeRO-3, no optimizer, eval mode, forward only. Its parameters are
  partitioned across ranks (each rank keeps 1/world of every tensor at rest); blocks called through ``forward``
  are gathered layer by layer by DeepSpeed's hooks, and the few tensors the teacher reads directly (positional
  embeddings, the codebook, the tokenizer's outer layers) are gathered for the duration of each teacher API call.
* :func:`build_partitioned_teacher`: builds the teacher inside ``deepspeed.zero.Init`` (each sub-module is
  partitioned as soon as it is constructed) and loads a state-dict file module by module, so no rank ever holds
  the full teacher.
* :class:`DeepSpeedEngineFactory`: the ``EngineFactory`` the trainer uses (``teacher``, ``trainable``,
  ``barrier``) when ``engine.kind=deepspeed``.

Trainable engines at ZeRO-3: the student's API (``features``, ``velocity``, ``generate``) is made of method
calls, not one ``forward``, and ZeRO-3 only gathers parameters inside module forwards. So at stage 3 every API call
is routed through the root module's forward (:mod:`dd2dist.engine.zero3_calls`): DeepSpeed's hooks then gather
block parameters per sub-module, discover the directly-read ones, and re-gather both for the backward pass. Method
code must call the nets through :meth:`DeepSpeedEngine.callable_module` (a proxy with the same API), never
``engine.module.features(...)``. The frozen teacher has no backward, so it gathers its directly-read tensors
around each call instead.

The torch process group is created by Ray Train (gloo on CPU, NCCL on GPU); ``deepspeed.init_distributed``
reuses it. Single-process use (tests) sets up a one-rank gloo group first (:func:`ensure_distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dd2dist.engine.base import Engine, StepStats
from dd2dist.engine.zero3_calls import (
    STUDENT_API_METHODS,
    ForwardRoutedModule,
    consolidated_state_dict,
    is_partitioned,
    local_partitions,
    route_calls_through_forward,
)

# Teacher API methods run with the directly-read (non-block) parameters gathered.
TEACHER_API_METHODS = (
    "codebook", "embed", "quantize", "features", "head_logits", "log_probs", "sample", "decode", "encode",
)
# Methods that run the teacher many times per call (one forward per AR step): the whole teacher is gathered once.
WHOLE_TEACHER_METHODS = ("sample",)
PRECISIONS = ("fp32", "bf16")


# ---- process group ------------------------------------------------------------------------------------------


def ensure_distributed(backend: str | None = None) -> None:
    """Make sure torch.distributed is initialised and DeepSpeed knows about it (reuses an existing group).

    Outside Ray Train / torchrun (a single test process) a one-rank group on 127.0.0.1 is created.
    """
    import deepspeed
    import torch.distributed as dist

    from dd2dist.launch.quiet import prints_to_log

    # DeepSpeed prints "DeepSpeed ...shm_comm_op built successfully" when it loads its CPU collectives
    with prints_to_log("deepspeed"):
        _init_distributed(deepspeed, dist, backend)


def _init_distributed(deepspeed, dist, backend: str | None) -> None:
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    else:
        deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(use_gpu: bool) -> torch.device:
    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("launch.use_gpu is true but no CUDA device is visible to this worker")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ---- DeepSpeed configs --------------------------------------------------------------------------------------


def trainable_ds_config(
    *, zero_stage: int, precision: str, grad_clip: float, micro_batch: int = 1, grad_accum: int = 1
) -> dict[str, Any]:
    """The DeepSpeed config of a trainable engine (optimizer passed in; no scheduler: we own the LR).

    ZeRO-3 partitions every parameter (no persistent small ones, so a rank holds exactly 1/world at rest) and
    does not prefetch: the call pattern changes between phases (generate / features / velocity), so a recorded
    trace would keep being invalidated.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"engine.zero_stage_<trainable>={zero_stage}: trainable engines take ZeRO 0, 1, 2 or 3")
    if precision not in PRECISIONS:
        raise ValueError(f"engine.precision must be one of {PRECISIONS}, got {precision!r}")
    zero: dict[str, Any] = {"stage": int(zero_stage)}
    if zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=0,
            stage3_model_persistence_threshold=0,
            stage3_prefetch_bucket_size=0,
            stage3_max_reuse_distance=0,
            # DeepSpeed would otherwise replace torch.nn.functional.linear process-wide (for every module, ZeRO or
            # not) with its own autograd function: other engines' arithmetic would depend on whether a ZeRO-3
            # engine was built first. Module hooks already re-gather weights for backward.
            memory_efficient_linear=False,
        )
    return {
        "train_micro_batch_size_per_gpu": int(micro_batch),
        "gradient_accumulation_steps": int(grad_accum),
        "gradient_clipping": float(grad_clip),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def frozen_ds_config(*, zero_stage: int = 3, precision: str = "fp32") -> dict[str, Any]:
    """The DeepSpeed config of the frozen teacher: ZeRO-3 partitioning only, no optimizer, no prefetching.

    Prefetching is off because the teacher's call pattern changes between phases (teacher-forced passes,
    KV-cached sampling) and a recorded trace would be invalidated anyway. Persistence is off so that every
    parameter is partitioned (small ones too): memory at rest is exactly 1/world of the teacher.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"teacher precision must be one of {PRECISIONS}, got {precision!r}")
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": int(zero_stage),
            "stage3_param_persistence_threshold": 0,
            "stage3_model_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 0,
            "stage3_max_live_parameters": 1 << 40,
            "stage3_max_reuse_distance": 0,
            # no backward through the teacher, and DeepSpeed's version would replace F.linear process-wide (the
            # students' arithmetic would depend on whether a teacher engine was built)
            "memory_efficient_linear": False,
        },
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 1 << 30,
    }


# ---- the LR of one step ---------------------------------------------------------------------------------------


def lr_at(optim: Any, step: int) -> float:
    """The LR for optimizer step ``step`` (0-based) of an optimiser spec.

    Accepts the method's ``OptimSpec``: ``lr_at(step)``, or ``lr`` times an optional ``schedule(step)``
    multiplier, or ``lr_schedule(step)`` returning the LR itself.
    """
    if hasattr(optim, "lr_at") and callable(optim.lr_at):
        return float(optim.lr_at(step))
    schedule = getattr(optim, "lr_schedule", None)
    if callable(schedule):
        return float(schedule(step))
    multiplier = getattr(optim, "schedule", None)
    return float(optim.lr) * (float(multiplier(step)) if callable(multiplier) else 1.0)


def _optim_field(optim: Any, name: str, default: Any) -> Any:
    value = getattr(optim, name, default)
    return default if value is None else value


# ---- trainable engine -------------------------------------------------------------------------------------


class DeepSpeedEngine(Engine):
    """A trainable network under DeepSpeed (ZeRO 0/1/2/3), with its own AdamW and LR schedule.

    Args:
        name: "generator" | "guidance" | "student".
        module: the network (moved to the worker's device here).
        optim: the optimiser spec (``lr``, ``betas``, ``weight_decay``, ``grad_clip`` and a schedule; see
            :func:`lr_at`).
        zero_stage: 0, 1, 2 or 3. At 3 the module's API methods (``features``/``velocity``/``generate``) are
            routed through its forward; call them through :meth:`callable_module`.
        precision: "fp32" or "bf16" (DeepSpeed keeps fp32 master weights for bf16).
        use_gpu: put the module on this worker's GPU.
        grad_accum: micro-steps (``backward`` calls) per optimizer step, default ``optim.grad_accum``;
            DeepSpeed divides each micro-step loss by it (as ``TorchEngine`` does).

    Like ``TorchEngine`` it starts frozen: the trainer calls ``set_trainable(True)`` for the phase that trains it.
    """

    def __init__(
        self,
        name: str,
        module: nn.Module,
        optim: Any,
        *,
        zero_stage: int = 0,
        precision: str = "fp32",
        use_gpu: bool = False,
        grad_accum: int | None = None,
    ):
        import deepspeed

        ensure_distributed()
        self.name = name
        self.optim_spec = optim
        self.zero_stage = int(zero_stage)
        self.grad_accum = int(grad_accum if grad_accum is not None else _optim_field(optim, "grad_accum", 1))
        self.precision = precision
        self.device = _device(use_gpu)
        module = module.to(self.device)
        module.requires_grad_(True)  # ZeRO registers its reduce hooks on parameters that require grad now
        module.train()
        # ZeRO-3: API calls must run inside the root forward (see the module docstring); names are unchanged
        self._routed = route_calls_through_forward(module, STUDENT_API_METHODS) if self.zero_stage == 3 else None
        self._ds_config = trainable_ds_config(
            zero_stage=zero_stage,
            precision=precision,
            grad_clip=float(_optim_field(optim, "grad_clip", 0.0)),
            grad_accum=self.grad_accum,
        )
        optimizer = torch.optim.AdamW(
            [p for p in module.parameters()],
            lr=lr_at(optim, 0),
            betas=tuple(_optim_field(optim, "betas", (0.9, 0.999))),
            weight_decay=float(_optim_field(optim, "weight_decay", 0.0)),
            eps=float(_optim_field(optim, "eps", 1e-8)),
            foreach=False,  # same update order as TorchEngine
        )
        self._ds, self._optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self._ds_config
        )
        self.module = self._ds.module
        self._callable = ForwardRoutedModule(self.module, self._routed) if self._routed is not None else self.module
        self._steps = 0
        self._micro = 0
        self._set_lr(lr_at(optim, 0))
        self.set_trainable(False)

    def callable_module(self):
        """What method code calls: the module (ZeRO 0-2), or at ZeRO-3 a proxy whose ``features`` / ``velocity``
        / ``generate`` run through the module's forward so that DeepSpeed gathers what they read."""
        return self._callable

    # ---- mode -----------------------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        return self._trainable

    def set_trainable(self, flag: bool) -> None:
        self.module.train(flag)
        self.module.requires_grad_(flag)
        self._trainable = bool(flag)

    # ---- optimisation -----------------------------------------------------------------------------------------
    def backward(self, loss: Tensor) -> None:
        if not self._trainable:
            raise AssertionError(f"{self.name}: backward() on a frozen engine (call set_trainable(True) first)")
        from deepspeed.runtime.base_optimizer import ZeROOptimizer

        if isinstance(self._ds.optimizer, ZeROOptimizer):
            # DeepSpeed's own engine forward starts each micro-step this way; our forwards go through the module,
            # never the DeepSpeed engine. ZeRO-3 advances its micro-step id here (overwrite vs accumulate into the
            # gradient partitions): without it, only the last micro-batch of a grad_accum step would count.
            self._ds.optimizer.clear_backward_seen_flag()
        self._ds.backward(loss)
        self._micro += 1
        if self._micro % self.grad_accum:
            self._ds.step()  # not a boundary: DeepSpeed only advances its micro-step counter

    def step(self) -> StepStats:
        if self._micro == 0 or self._micro % self.grad_accum:
            raise AssertionError(
                f"{self.name}: step() after {self._micro} backward() calls; expected a multiple of "
                f"grad_accum={self.grad_accum} (> 0)"
            )
        lr = self.lr
        refresh = getattr(self._optimizer, "refresh_fp32_params", None)
        if self.precision == "fp32" and callable(refresh):
            # ZeRO-1/2/3 keep a separate fp32 master partition; in fp32 it equals the module weights exactly, so
            # refreshing it is lossless and picks up writes into local_param_tensors() (EMA -> generator).
            refresh()
        norm = None if self.zero_stage or self.precision != "fp32" else self._grad_norm()
        self._ds.step()
        self._micro = 0
        if norm is None:
            norm = self._ds.get_global_grad_norm()
        self._steps += 1
        self._set_lr(lr_at(self.optim_spec, self._steps))
        return StepStats(grad_norm=float("nan") if norm is None else float(norm), lr=lr)

    def _grad_norm(self) -> float:
        """Global grad norm before clipping (ZeRO-0: gradients are already all-reduced after backward)."""
        grads = [p.grad.detach().float().norm() for p in self.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def skip_step(self) -> StepStats:
        # Drop whatever gradients exist (the trainer checks the loss before backward, so usually none).
        self._optimizer.zero_grad()
        self._ds.zero_grad()
        if self._micro % self.grad_accum:
            self._ds.set_gradient_accumulation_boundary(True)
        self._micro = 0
        return StepStats(grad_norm=float("nan"), lr=self.lr, skipped=True)

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    @property
    def lr(self) -> float:
        return lr_at(self.optim_spec, self._steps)

    def _set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def reset_optimizer(self, lr_schedule=None) -> None:
        """Fresh AdamW moments and a restarted LR clock (e.g. performance alignment); weights are kept."""
        if lr_schedule is not None:
            self.optim_spec = lr_schedule
        inner = getattr(self._optimizer, "optimizer", self._optimizer)
        inner.state.clear()
        self._steps = 0
        self._set_lr(lr_at(self.optim_spec, 0))

    # ---- weights and state -------------------------------------------------------------------------------------
    def local_param_tensors(self) -> list[Tensor]:
        """Full tensors (ZeRO 0-2) or this rank's flat partitions (ZeRO-3); writes reach the module weights and,
        through the fp32 refresh in :meth:`step`, the master weights."""
        return local_partitions(self.module)

    def local_param_bytes(self) -> int:
        """Parameter bytes this rank holds at rest."""
        return local_param_bytes(self.module)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Consolidated fp32 weights on CPU (collective at ZeRO-3: gathered one sub-module at a time)."""
        return consolidated_state_dict(self.module, to_float=True)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        """Load consolidated weights (collective at ZeRO-3, where rank 0's values are scattered)."""
        if self.zero_stage == 3:
            load_state_module_by_module(self.module, state, source=f"{self.name} state dict", what=self.name)
            self._optimizer.refresh_fp32_params()
            return
        own = self.module.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{self.name}: state dict mismatch: missing {missing[:8]}, unexpected {unexpected[:8]}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(state[key].to(tensor.dtype))
        # Refresh DeepSpeed's fp32 master copies (bf16 / ZeRO keep their own) from the module weights.
        refresh = getattr(self._optimizer, "refresh_fp32_params", None)
        if callable(refresh):
            refresh()

    @contextlib.contextmanager
    def _as_optimized(self):
        """All parameters require grad for the duration (the mode flags are restored after).

        ZeRO-2/3 checkpoints treat a parameter that does not require grad *now* as "not owned by the optimizer":
        save writes it to a separate table, and load expects it there. Our engines toggle requires_grad per phase,
        so a checkpoint saved while trainable and loaded into a freshly built (frozen) engine would miss it.
        Every parameter is owned by the optimizer, so both run as if trainable.
        """
        flags = [p.requires_grad for p in self.module.parameters()]
        self.module.requires_grad_(True)
        try:
            yield
        finally:
            for p, flag in zip(self.module.parameters(), flags):
                p.requires_grad_(flag)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._as_optimized():
            self._ds.save_checkpoint(
                str(directory), tag="engine", client_state={"optimizer_steps": self._steps}, save_latest=False
            )
        (directory / "engine.json").write_text(json.dumps({"name": self.name, "optimizer_steps": self._steps}))

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        if not (directory / "engine").is_dir():
            raise FileNotFoundError(f"{self.name}: no DeepSpeed checkpoint under {directory} (expected engine/)")
        with self._as_optimized():
            _, client = self._ds.load_checkpoint(
                str(directory), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=False
            )
        self._steps = int((client or {}).get("optimizer_steps", 0))
        self._micro = 0
        self._set_lr(lr_at(self.optim_spec, self._steps))


# ---- frozen teacher ---------------------------------------------------------------------------------------


# Sub-trees entered only through their own forward, whose code never reads a child's parameter without calling
# that child: DeepSpeed's hooks gather them module by module (the tokenizers' encoder / decoder).
SEALED_SUBMODULES = ("encoder", "decoder")


def _block_param_ids(module: nn.Module) -> set[int]:
    """ids of the parameters DeepSpeed's forward hooks gather by themselves: everything inside elements of an
    nn.ModuleList (the repeated blocks, always called) and inside the sealed sub-trees (``SEALED_SUBMODULES``)."""
    ids: set[int] = set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.ModuleList):
            for element in sub:
                ids.update(id(p) for p in element.parameters())
        elif name.rsplit(".", 1)[-1] in SEALED_SUBMODULES:
            ids.update(id(p) for p in sub.parameters())
    return ids


def local_param_bytes(module: nn.Module) -> int:
    """Bytes of parameter storage this rank holds for ``module`` at rest (ZeRO-3 partitions count their share)."""
    total = 0
    for p in module.parameters():
        if is_partitioned(p):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def full_param_bytes(module: nn.Module) -> int:
    """Bytes of the full (unpartitioned) parameters of ``module``."""
    return sum((p.ds_numel if is_partitioned(p) else p.numel()) * p.element_size() for p in module.parameters())


class _LooseParamGatherer:
    """Gathers the parameters a teacher reads outside block forwards for the duration of one API call.

    While gathered they are marked persistent, so that DeepSpeed's post-forward release (e.g. after the class
    embedding's own forward) leaves them alone; at the end of the outermost call they are partitioned again.
    A call wrapped with ``whole=True`` (the AR sampler) gathers every parameter of the teacher instead: one
    collective per call rather than one per block per AR step (16 steps x 4 blocks of gloo all-gathers made the
    digits LlamaGen sampler ~10x slower than the replicated one), at the price of holding the whole frozen teacher
    for the duration of the call.
    """

    def __init__(self, params: list[nn.Parameter], coordinator_reset: Callable[[], None] | None,
                 whole: list[nn.Parameter] | None = None):
        self.params = sorted(params, key=lambda p: p.ds_id)  # same order on every rank (collective)
        self.whole = sorted(whole if whole is not None else params, key=lambda p: p.ds_id)
        self.depth = 0
        self.coordinator_reset = coordinator_reset
        self._held: list[nn.Parameter] = []

    @contextlib.contextmanager
    def gathered(self, whole: bool = False):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.depth += 1
        try:
            if self.depth == 1:  # only the outermost call gathers; nested API calls find everything in place
                if self.coordinator_reset is not None:
                    self.coordinator_reset()
                wanted = self.whole if whole else self.params
                self._held = [p for p in wanted if p.ds_status != ZeroParamStatus.AVAILABLE]
                if self._held:
                    self._held[0].all_gather(param_list=self._held)
                for p in self._held:
                    p.ds_persist = True
            yield
        finally:
            self.depth -= 1
            if self.depth == 0 and self._held:
                for p in self._held:
                    p.ds_persist = False
                available = [p for p in self._held if p.ds_status == ZeroParamStatus.AVAILABLE]
                if available:
                    available[0].partition(param_list=available, has_been_updated=False)
                self._held = []

    def wrap(self, method: Callable, storages: Callable[[], set[int]], whole: bool = False) -> Callable:
        @functools.wraps(method)
        def call(*args, **kwargs):
            with self.gathered(whole):
                out = method(*args, **kwargs)
                if torch.is_tensor(out) and out.untyped_storage().data_ptr() in storages():
                    out = out.clone()  # e.g. codebook() returns the weight itself: keep it past re-partitioning
                return out

        return call


class DeepSpeedFrozenEngine(Engine):
    """The frozen teacher under DeepSpeed ZeRO-3 (forward only; no optimizer; eval mode).

    Args:
        name: "teacher".
        module: the teacher; either already partitioned (:func:`build_partitioned_teacher`) or a plain module,
            which is partitioned in place here (it then existed in full on this rank before this call).
        zero_stage: 3 partitions; 0 keeps a full replica on every rank (no DeepSpeed involved).
        precision: "fp32" or "bf16" (the teacher's stored/compute dtype).
        use_gpu: put it on this worker's GPU.
    """

    def __init__(
        self, name: str, module: nn.Module, *, zero_stage: int = 3, precision: str = "fp32", use_gpu: bool = False
    ):
        if zero_stage not in (0, 3):
            raise ValueError(f"engine.zero_stage_teacher must be 0 or 3 (frozen, no optimizer), got {zero_stage}")
        self.name = name
        self.zero_stage = zero_stage
        self.device = _device(use_gpu)
        self._ds = None
        module.eval()
        module.requires_grad_(False)
        if zero_stage == 0:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.module = module.to(device=self.device, dtype=dtype)
            return
        import deepspeed

        ensure_distributed()
        config = frozen_ds_config(zero_stage=3, precision=precision)
        if not all(is_partitioned(p) for p in module.parameters()):
            module = module.to(device=self.device, dtype=_dtype(precision))  # floating tensors only
            deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device=None)
        self._ds, _, _, _ = deepspeed.initialize(model=module, config=config)
        self.module = self._ds.module
        self.module.eval()
        self._wrap_api()

    def _wrap_api(self) -> None:
        blocks = _block_param_ids(self.module)
        loose = [p for p in self.module.parameters() if id(p) not in blocks]
        offload = getattr(self._ds, "optimizer", None)
        coordinator = getattr(offload, "get_param_coordinator", None)
        reset = (lambda: coordinator().reset_step()) if callable(coordinator) else None
        self._gatherer = _LooseParamGatherer(loose, reset, whole=list(self.module.parameters()))

        def storages() -> set[int]:
            return {p.untyped_storage().data_ptr() for p in loose if p.numel()}

        for name in TEACHER_API_METHODS:
            method = getattr(self.module, name, None)
            if callable(method):
                # An instance attribute shadows the class method, so internal self.features(...) calls from
                # log_probs go through the wrapper too (nesting is counted; only the outermost call gathers).
                wrapped = self._gatherer.wrap(method, storages, whole=name in WHOLE_TEACHER_METHODS)
                object.__setattr__(self.module, name, wrapped)

    @property
    def trainable(self) -> bool:
        return False

    def set_trainable(self, flag: bool) -> None:
        if flag:
            raise AssertionError(f"{self.name} is frozen: it has no optimizer and cannot be set trainable")
        self.module.eval()
        self.module.requires_grad_(False)

    def backward(self, loss: Tensor) -> None:
        raise AssertionError(f"{self.name} is frozen: backward() is not allowed")

    def step(self) -> StepStats:
        raise AssertionError(f"{self.name} is frozen: step() is not allowed")

    def skip_step(self) -> StepStats:
        raise AssertionError(f"{self.name} is frozen: skip_step() is not allowed")

    @property
    def optimizer_steps(self) -> int:
        return 0

    @property
    def lr(self) -> float:
        return 0.0

    def local_param_tensors(self) -> list[Tensor]:
        return []

    def local_param_bytes(self) -> int:
        """Parameter bytes this rank holds at rest."""
        return local_param_bytes(self.module)

    def full_state_dict(self) -> dict[str, Tensor]:
        if self._ds is None:
            return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return consolidated_state_dict(self.module)

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        load_state_module_by_module(self.module, state)

    def save(self, directory: Path) -> None:
        """Nothing to save: the teacher is rebuilt from its config and checkpoint."""

    def load(self, directory: Path) -> None:
        """Nothing to restore (see :meth:`save`)."""


# ---- building the teacher partitioned --------------------------------------------------------------------------


class _LazyState(Mapping):
    """A state dict read lazily from a file: safetensors (per-key reads) or a torch file (memory-mapped)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"teacher.checkpoint: file not found: {path}")
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            self._st = safe_open(path, framework="pt")
            self._keys = list(self._st.keys())
            self._torch = None
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if isinstance(loaded, Mapping) and isinstance(loaded.get("teacher"), Mapping):
                loaded = loaded["teacher"]
            self._torch, self._st, self._keys = loaded, None, list(loaded)

    def __getitem__(self, key: str) -> Tensor:
        if self._st is not None:
            return self._st.get_tensor(key)
        return self._torch[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def load_state_module_by_module(
    module: nn.Module, state: Mapping[str, Tensor], source: str = "state dict", what: str = "teacher"
) -> None:
    """Copy ``state`` into ``module`` one sub-module at a time (collective for ZeRO-3-partitioned modules).

    Only one sub-module's own parameters are ever gathered at once. Strict: every persistent key must be
    present and every key of ``state`` used; shapes must match (errors name the key, ``source`` and ``what`` the
    module is: "teacher", "generator", ...).
    """
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    expected: set[str] = set()
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name in sub._buffers:
            if name not in sub._non_persistent_buffers_set and sub._buffers[name] is not None:
                expected.add(dot + name)
        expected.update(dot + name for name, p in sub._parameters.items() if p is not None)
    keys = set(state)
    missing, unexpected = sorted(expected - keys), sorted(keys - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source} does not match the configured {what} architecture: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{'...' if len(unexpected) > 8 else ''}"
        )
    with torch.no_grad():
        for prefix, sub in module.named_modules():
            dot = f"{prefix}." if prefix else ""
            own = [p for p in sub._parameters.values() if p is not None]
            partitioned = [p for p in own if is_partitioned(p)]
            with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0, enabled=bool(partitioned)):
                for name, p in sub._parameters.items():
                    if p is None:
                        continue
                    value = state[dot + name]
                    if tuple(value.shape) != tuple(p.ds_shape if is_partitioned(p) else p.shape):
                        raise ValueError(
                            f"{source}: {dot + name} has shape {tuple(value.shape)}, the configured {what} "
                            f"expects {tuple(p.ds_shape if is_partitioned(p) else p.shape)}"
                        )
                    if rank == 0 or not is_partitioned(p):
                        p.data.copy_(value.to(device=p.device, dtype=p.dtype))
            for name, buf in sub._buffers.items():
                if buf is not None and name not in sub._non_persistent_buffers_set:
                    buf.copy_(state[dot + name].to(device=buf.device, dtype=buf.dtype))


def build_partitioned_teacher(teacher_cfg, state_path: str, *, precision: str = "fp32", use_gpu: bool = False):
    """The teacher of ``teacher_cfg`` built under ``deepspeed.zero.Init`` and loaded from ``state_path``.

    Each sub-module's parameters are partitioned right after its construction, then the weights are copied in
    module by module (:func:`load_state_module_by_module`), so no rank holds the full teacher at any point.
    ``state_path`` is a dd2dist teacher state dict (torch file, ``{"teacher": sd}`` or a raw state dict, or a
    ``.safetensors`` file). Returns the frozen, partitioned module (wrap it with :class:`DeepSpeedFrozenEngine`).
    """
    import deepspeed

    from dd2dist.teachers import build_family

    if teacher_cfg.official:
        raise ValueError(
            "teacher.official: build_partitioned_teacher takes a dd2dist state dict; convert the official "
            "checkpoint first (dd2dist.teachers.load_official + save) or use zero_stage_teacher=0"
        )
    ensure_distributed()
    state = _LazyState(state_path)
    config = frozen_ds_config(zero_stage=3, precision=precision)
    device = _device(use_gpu)
    # The dtype comes from the config's bf16 flag, not from Init's dtype argument: DeepSpeed 0.19.8 ignores that
    # argument wherever the accelerator reports no fp16 support (CPUs without oneDNN fp16, e.g. AMD EPYC) and then
    # builds in bf16, which made an "fp32" teacher a bf16 one on such machines
    with deepspeed.zero.Init(config_dict_or_path=config, remote_device=None):
        teacher = build_family(teacher_cfg.family, var=teacher_cfg.var, llamagen=teacher_cfg.llamagen)
    wrong = sorted({str(p.dtype) for p in teacher.parameters() if p.is_floating_point()} - {str(_dtype(precision))})
    if wrong:
        raise RuntimeError(f"the partitioned teacher was built in {wrong}, expected {_dtype(precision)} "
                           f"(engine.precision={precision!r})")
    teacher.to(device)
    if hasattr(teacher, "init_buffers"):
        teacher.init_buffers(device)
    load_state_module_by_module(teacher, state, source=f"teacher.checkpoint {state_path}")
    return teacher.freeze()


def student_from_teacher_checkpoint(teacher_cfg, student_cfg, state_path: str):
    """The initial student (teacher backbone + a fresh MLP head) without ever materialising the teacher.

    The :class:`~dd2dist.nets.StudentNet` is laid out on the meta device, then allocated on the CPU; its backbone
    tensors are read one at a time from the teacher file (the student keys are the teacher's minus what the
    student drops, under ``backbone.``), its head is freshly initialised (from the current RNG state, so seed every
    rank alike), and its non-persistent buffers are rebuilt. With :func:`build_partitioned_teacher` this is how a
    worker starts without holding the full teacher (``Trainer(student_template=...)``).
    """
    from dd2dist.nets import StudentNet
    from dd2dist.nets.head import MLPHead
    from dd2dist.nets.vector_input import VectorInput
    from dd2dist.teachers import build_family

    state = _LazyState(state_path)
    with torch.device("meta"):
        student = StudentNet(build_family(teacher_cfg.family, var=teacher_cfg.var, llamagen=teacher_cfg.llamagen),
                             student_cfg, init_adapter=False)
    student = student.to_empty(device="cpu")
    head = student.head
    # the student's own modules, freshly initialised in the order StudentNet builds them (same RNG draws)
    fresh: dict[str, Tensor] = {}
    vector_input = getattr(getattr(student.backbone, "gpt", None), "vector_input", None)
    if vector_input is not None:
        fresh.update({f"backbone.gpt.vector_input.{k}": v for k, v in
                      VectorInput(head.token_dim, head.cond_dim).state_dict().items()})
    fresh.update({f"head.{k}": v for k, v in MLPHead(
        token_dim=head.token_dim, cond_dim=head.cond_dim, width=student_cfg.head_width, depth=student_cfg.head_depth,
        time_embed_dim=student_cfg.time_embed_dim).state_dict().items()})
    loaded: dict[str, Tensor] = {}
    names = set(state)
    for key in student.state_dict():
        if key in fresh:
            loaded[key] = fresh[key]
        elif key[len("backbone."):] in names:
            loaded[key] = state[key[len("backbone."):]]
        else:
            raise ValueError(f"teacher.checkpoint {state_path} has no {key[len('backbone.'):]!r} for the student")
    student.load_state_dict(loaded)  # strict; its post-hook re-derives the LlamaGen soft-rule tau
    if hasattr(student.backbone, "init_buffers"):
        student.backbone.init_buffers(torch.device("cpu"))
    return student.float()


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


# ---- factory --------------------------------------------------------------------------------------------------


class DeepSpeedEngineFactory:
    """Builds DeepSpeed engines for the trainer (the ``EngineFactory`` protocol of ``dd2dist.engine.factory``).

    Args:
        engine_cfg: the ``engine`` config section (zero stages, precision, grad_accum).
        use_gpu: ``launch.use_gpu``.
        teacher_precision: the teacher's dtype ("fp32" / "bf16"); default from ``engine_cfg.precision``.
    """

    def __init__(self, engine_cfg, *, use_gpu: bool = False, teacher_precision: str | None = None):
        ensure_distributed()
        self.cfg = engine_cfg
        self.use_gpu = use_gpu
        self.device = _device(use_gpu)
        self.teacher_precision = teacher_precision or engine_cfg.precision

    @property
    def rank(self) -> int:
        return torch.distributed.get_rank()

    @property
    def world_size(self) -> int:
        return torch.distributed.get_world_size()

    def teacher(self, module: nn.Module) -> DeepSpeedFrozenEngine:
        """The frozen teacher engine (ZeRO stage ``engine.zero_stage_teacher``)."""
        return DeepSpeedFrozenEngine(
            "teacher", module, zero_stage=self.cfg.zero_stage_teacher, precision=self.teacher_precision,
            use_gpu=self.use_gpu,
        )

    def trainable(self, name: str, module: nn.Module, optim: Any) -> DeepSpeedEngine:
        """A trainable engine for ``name`` ("generator" | "guidance" | "student")."""
        stage = {
            "generator": self.cfg.zero_stage_generator,
            "guidance": self.cfg.zero_stage_guidance,
        }.get(name, self.cfg.zero_stage_generator)
        return DeepSpeedEngine(
            name, module, optim, zero_stage=stage, precision=self.cfg.precision, use_gpu=self.use_gpu,
        )

    def barrier(self) -> None:
        """All ranks wait here (collective)."""
        torch.distributed.barrier()


def param_bytes_ratio(engine: DeepSpeedFrozenEngine) -> float:
    """This rank's share of the teacher's parameter bytes (1.0 = a full replica)."""
    full = full_param_bytes(engine.module)
    return engine.local_param_bytes() / full if full else math.nan
