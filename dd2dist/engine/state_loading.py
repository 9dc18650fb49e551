"""Reading a state-dict file lazily and copying a state dict into a (possibly ZeRO-3-partitioned) module one
sub-module at a time, so that no rank ever holds the whole model."""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from dd2dist.engine.zero3_calls import is_partitioned


class LazyStateDict(Mapping):
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
