"""``DeepSpeedEngine``: a trainable network (generator, guidance, stage-1 student) under DeepSpeed ZeRO 0/1/2/3.

It has its own ``torch.optim.AdamW`` (passed to DeepSpeed with ``zero_allow_untested_optimizer``), DeepSpeed's
gradient clipping, and an LR schedule evaluated on the engine's *own* optimizer-step counter (DeepSpeed gets no
scheduler, so the schedule never ticks on a skipped step).

At ZeRO-3 the student's API (``features``, ``velocity``, ``generate``) is made of method calls, not one
``forward``, and ZeRO-3 only gathers parameters inside module forwards. So at stage 3 every API call is routed
through the root module's forward (:mod:`dd2dist.engine.zero3_calls`): DeepSpeed's hooks then gather block
parameters per sub-module, discover the directly-read ones, and re-gather both for the backward pass. Method code
must call the nets through :meth:`DeepSpeedEngine.callable_module` (a proxy with the same API), never
``engine.module.features(...)``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from dd2dist.engine.base import Engine, StepStats
from dd2dist.engine.ds_config import trainable_ds_config
from dd2dist.engine.optim import OptimSpec, param_groups
from dd2dist.engine.param_bytes import local_param_bytes
from dd2dist.engine.process_group import ensure_distributed, worker_device
from dd2dist.engine.state_loading import load_state_module_by_module
from dd2dist.engine.zero3_calls import (
    STUDENT_API_METHODS,
    ForwardRoutedModule,
    consolidated_state_dict,
    local_partitions,
    route_calls_through_forward,
)


class DeepSpeedEngine(Engine):
    """A trainable network under DeepSpeed (ZeRO 0/1/2/3), with its own AdamW and LR schedule.

    Args:
        name: "generator" | "guidance" | "student".
        module: the network (moved to the worker's device here).
        optim: the optimiser spec (AdamW settings, gradient clipping and the LR of each step).
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
        optim: OptimSpec,
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
        self.grad_accum = int(grad_accum if grad_accum is not None else optim.grad_accum)
        self.precision = precision
        self.device = worker_device(use_gpu)
        module = module.to(self.device)
        module.requires_grad_(True)  # ZeRO registers its reduce hooks on parameters that require grad now
        module.train()
        # ZeRO-3: API calls must run inside the root forward (see the module docstring); names are unchanged
        self._routed = route_calls_through_forward(module, STUDENT_API_METHODS) if self.zero_stage == 3 else None
        self._ds_config = trainable_ds_config(
            optim, zero_stage=zero_stage, precision=precision, grad_accum=self.grad_accum
        )
        optimizer = torch.optim.AdamW(
            param_groups(module, optim),
            **optim.adamw_kwargs(),
            foreach=False,  # same update order as TorchEngine
        )
        self._ds, self._optimizer, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, config=self._ds_config
        )
        self.module = self._ds.module
        self._callable = ForwardRoutedModule(self.module, self._routed) if self._routed is not None else self.module
        self._steps = 0
        self._micro = 0
        self._set_lr(float(optim.lr_at(0)))
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
        self._set_lr(float(self.optim_spec.lr_at(self._steps)))
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
        return float(self.optim_spec.lr_at(self._steps))

    def _set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]

    def reset_optimizer(self, lr_schedule: OptimSpec | None = None) -> None:
        """Fresh AdamW moments and a restarted LR clock (e.g. performance alignment); weights are kept."""
        if lr_schedule is not None:
            if lr_schedule.lr_scales != self.optim_spec.lr_scales:  # the parameter groups were built from these
                raise ValueError(f"{self.name}: reset_optimizer cannot change lr_scales "
                                 f"({self.optim_spec.lr_scales} -> {lr_schedule.lr_scales})")
            self.optim_spec = lr_schedule
        inner = getattr(self._optimizer, "optimizer", self._optimizer)
        inner.state.clear()
        self._steps = 0
        self._set_lr(float(self.optim_spec.lr_at(0)))

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
        self._set_lr(float(self.optim_spec.lr_at(self._steps)))
