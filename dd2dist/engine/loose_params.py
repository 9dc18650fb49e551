"""Gathering what a frozen ZeRO-3 module reads outside its blocks' forwards, for the duration of one API call.

DeepSpeed's hooks gather a parameter only inside the forward of the module that owns it. A teacher also reads
some tensors directly (positional embeddings, the codebook, the tokenizer's outer layers); those must be
gathered around each teacher API call instead.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn

# Sub-trees entered only through their own forward, whose code never reads a child's parameter without calling
# that child: DeepSpeed's hooks gather them module by module (the tokenizers' encoder / decoder).
SEALED_SUBMODULES = ("encoder", "decoder")


def block_param_ids(module: nn.Module) -> set[int]:
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


class LooseParamGatherer:
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
