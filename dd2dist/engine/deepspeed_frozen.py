"""``DeepSpeedFrozenEngine``: the teacher under ZeRO-3 (forward only, no optimizer, eval mode).

Its parameters are partitioned across ranks (each rank keeps 1/world of every tensor at rest); blocks called
through ``forward`` are gathered layer by layer by DeepSpeed's hooks, and the few tensors the teacher reads
directly are gathered for the duration of each teacher API call (:mod:`dd2dist.engine.loose_params`). The frozen
teacher has no backward, so gathering around each call is enough (trainable engines route calls through the
root forward instead: :mod:`dd2dist.engine.zero3_calls`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dd2dist.engine.base import Engine, StepStats
from dd2dist.engine.ds_config import frozen_ds_config, precision_dtype
from dd2dist.engine.loose_params import LooseParamGatherer, block_param_ids
from dd2dist.engine.param_bytes import local_param_bytes
from dd2dist.engine.process_group import ensure_distributed, worker_device
from dd2dist.engine.state_loading import load_state_module_by_module
from dd2dist.engine.zero3_calls import consolidated_state_dict, is_partitioned

# Teacher API methods run with the directly-read (non-block) parameters gathered.
TEACHER_API_METHODS = (
    "codebook", "embed", "quantize", "features", "head_logits", "log_probs", "sample", "decode", "encode",
)
# Methods that run the teacher many times per call (one forward per AR step): the whole teacher is gathered once.
WHOLE_TEACHER_METHODS = ("sample",)


class DeepSpeedFrozenEngine(Engine):
    """The frozen teacher under DeepSpeed ZeRO-3 (forward only; no optimizer; eval mode).

    Args:
        name: "teacher".
        module: the teacher; either already partitioned
            (:func:`dd2dist.launch.partitioned_models.build_partitioned_teacher`) or a plain module, which is
            partitioned in place here (it then existed in full on this rank before this call).
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
        self.device = worker_device(use_gpu)
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
            module = module.to(device=self.device, dtype=precision_dtype(precision))  # floating tensors only
            deepspeed.zero.Init(module=module, config_dict_or_path=config, remote_device=None)
        self._ds, _, _, _ = deepspeed.initialize(model=module, config=config)
        self.module = self._ds.module
        self.module.eval()
        self._wrap_api()

    def _wrap_api(self) -> None:
        blocks = block_param_ids(self.module)
        loose = [p for p in self.module.parameters() if id(p) not in blocks]
        offload = getattr(self._ds, "optimizer", None)
        coordinator = getattr(offload, "get_param_coordinator", None)
        reset = (lambda: coordinator().reset_step()) if callable(coordinator) else None
        self._gatherer = LooseParamGatherer(loose, reset, whole=list(self.module.parameters()))

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
