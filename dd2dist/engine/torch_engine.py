"""``TorchEngine``: the Engine interface in plain torch, one process (unit tests, single-process runs)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from dd2dist.engine.base import Engine, StepStats
from dd2dist.engine.optim import OptimSpec, param_groups


class TorchEngine(Engine):
    """A module, and with ``optim`` an AdamW optimizer whose LR follows ``optim.lr_at(own step count)``.

    Without ``optim`` the engine is frozen for good (the teacher): ``set_trainable(True)`` is refused.
    """

    def __init__(self, name: str, module: nn.Module, optim: OptimSpec | None, device: torch.device | str = "cpu"):
        self.name = name
        self.module = module.to(device)
        self._params = list(self.module.parameters())  # fixed order; walking the module tree per step costs ~3%
        self.optim = optim
        self._steps = 0
        self.optimizer: torch.optim.Optimizer | None = None
        if optim is not None:
            self.optimizer = self._new_optimizer(optim)
        self.set_trainable(False)

    def _new_optimizer(self, optim: OptimSpec) -> torch.optim.Optimizer:
        # foreach=False keeps the update order-independent of tensor grouping: bit-exact resume across runs
        return torch.optim.AdamW(param_groups(self.module, optim), **optim.adamw_kwargs(), foreach=False)

    # ---- mode -----------------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        return self.optimizer is not None and self.module.training

    def set_trainable(self, flag: bool) -> None:
        if flag and self.optimizer is None:
            raise ValueError(f"engine {self.name!r} has no optimizer and cannot be made trainable")
        self.module.train(flag)
        for p in self._params:
            p.requires_grad_(flag)

    # ---- optimisation ---------------------------------------------------------------------------------
    def _need_optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            raise RuntimeError(f"engine {self.name!r} is frozen (no optimizer)")
        return self.optimizer

    def backward(self, loss: Tensor) -> None:
        self._need_optimizer()
        (loss / self.optim.grad_accum).backward()

    def _params_with_grad(self) -> list[Tensor]:
        return [p for p in self._params if p.grad is not None]

    def step(self) -> StepStats:
        opt = self._need_optimizer()
        params = self._params_with_grad()
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
        if not math.isfinite(norm):
            return self.skip_step()
        lr = self.optim.lr_at(self._steps)
        for group in opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._steps += 1
        return StepStats(grad_norm=norm, lr=lr)

    def skip_step(self) -> StepStats:
        opt = self._need_optimizer()
        opt.zero_grad(set_to_none=True)
        return StepStats(grad_norm=math.nan, lr=self.optim.lr_at(self._steps), skipped=True)

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    @property
    def lr(self) -> float:
        return self.optim.lr_at(self._steps) if self.optim is not None else 0.0

    def reset_optimizer(self, lr_schedule: OptimSpec | None = None) -> None:
        """Fresh AdamW moments and step counter (optionally with a new spec)."""
        self._need_optimizer()
        self.optim = lr_schedule or self.optim
        self.optimizer = self._new_optimizer(self.optim)
        self._steps = 0

    # ---- weights and state ----------------------------------------------------------------------------
    def local_param_tensors(self) -> list[Tensor]:
        return [p.data for p in self._params]

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> None:
        self.module.load_state_dict(state)

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.module.state_dict(), directory / "module.pt")
        if self.optimizer is not None:
            torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        (directory / "engine.json").write_text(json.dumps({"name": self.name, "optimizer_steps": self._steps}))

    def load(self, directory: Path) -> None:
        directory = Path(directory)
        meta_path = directory / "engine.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"engine {self.name!r}: no checkpoint at {meta_path}")
        meta = json.loads(meta_path.read_text())
        if meta.get("name") != self.name:
            raise ValueError(f"engine checkpoint {directory} belongs to {meta.get('name')!r}, not {self.name!r}")
        self.module.load_state_dict(torch.load(directory / "module.pt", map_location="cpu", weights_only=True))
        if self.optimizer is not None:
            opt_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(opt_state)
        self._steps = int(meta["optimizer_steps"])
