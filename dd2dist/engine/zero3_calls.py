"""ZeRO-3 for trainable nets whose API is several methods (``features`` / ``velocity`` / ``generate``).

ZeRO-3 keeps 1/world of every parameter on each rank and gathers a module's own parameters in DeepSpeed's
forward hooks. A student's method call is not a module forward: a parameter read outside the forward of the
module that owns it (an embedding table indexed, a weight passed to ``F.linear``) would be an empty partition,
and DeepSpeed's discovery of such "external" parameters only runs while the engine's root module is inside its
forward. The LlamaGen student does this (its ``soft`` input rule multiplies by ``tok_embeddings.weight`` outside
that embedding's forward); the VAR student reads every parameter inside its owner's forward apart from dtype
reads. The routing below makes any such read correct (tests/test_engine_zero3.py: LlamaGen and a net built to
read parameters directly both fail without it).

The nets stay DeepSpeed-free:

* :func:`route_calls_through_forward` gives the DeepSpeed root module (the net itself, so parameter names and
  checkpoint keys stay exactly those of the net) an instance ``forward`` that dispatches on a keyword to one of
  its API methods. Every API call then runs inside the root forward: DeepSpeed's prologue switches on external
  parameter discovery (a parameter read while partitioned is gathered and registered on the module whose forward
  is running), the root's pre-/post-backward hooks re-gather those parameters for the backward pass and release
  them after it, and the root's pre-forward hook restarts DeepSpeed's fetch trace per call.
* :class:`ForwardRoutedModule` is what method code receives instead of the module: the same API methods, each
  calling ``module(*args, _dd2_call=name)``; every other attribute is the module's own.

Gradients of directly-read parameters then flow into ZeRO-3's per-parameter reduce hooks like any other; the
two-rank tests prove them equal to ZeRO-0 (tests/test_engine_zero3*.py).

:func:`consolidated_state_dict` gathers a ZeRO-3 module one sub-module at a time (collective), for export and
``full_state_dict``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

# The student's API (dd2dist.nets.student.StudentNet); method code calls only these on a trainable net.
STUDENT_API_METHODS = ("features", "code_log_probs", "velocity", "correction", "generate", "generator_log_probs",
                       "generator_outputs")
CALL_KEYWORD = "_dd2_call"  # the forward keyword that selects the API method


def route_calls_through_forward(module: nn.Module, methods: Iterable[str] = STUDENT_API_METHODS) -> tuple[str, ...]:
    """Give ``module`` an instance ``forward`` that dispatches ``module(*a, _dd2_call=name)`` to ``name``.

    Without the keyword it runs the class's own ``forward`` (``StudentNet.forward`` is ``generate``). The
    methods are looked up on the class so that an instance attribute never shadows them. Returns the routed
    method names (those of ``methods`` the module's class defines).
    """
    cls = type(module)
    routed = tuple(name for name in methods if callable(getattr(cls, name, None)))
    unbound_forward = cls.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        name = kwargs.pop(CALL_KEYWORD, None)
        if name is None:
            return unbound_forward(module, *args, **kwargs)
        if name not in routed:
            raise AttributeError(f"{cls.__name__}: {name!r} is not a routed API method (routed: {routed})")
        return getattr(cls, name)(module, *args, **kwargs)

    # nn.Module.__call__ looks up self.forward: an instance attribute takes precedence over the class method.
    object.__setattr__(module, "forward", forward)
    return routed


class ForwardRoutedModule:
    """Stands in for a routed module in method code: API methods go through ``module.__call__`` (and so through
    DeepSpeed's hooks); other attributes (``num_tokens``, ``training``, ``parameters`` ...) are the module's."""

    def __init__(self, module: nn.Module, routed: Iterable[str]):
        self._module = module
        self._routed = frozenset(routed)

    @property
    def module(self) -> nn.Module:
        """The routed module itself."""
        return self._module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # only reached for names not found on the proxy itself
        if name in self._routed:
            return functools.partial(self._module, **{CALL_KEYWORD: name})
        return getattr(self._module, name)

    def __repr__(self) -> str:
        return f"ForwardRoutedModule({type(self._module).__name__}, routed={sorted(self._routed)})"


def is_partitioned(param: Tensor) -> bool:
    """True for a ZeRO-3 parameter (it carries DeepSpeed's ``ds_*`` attributes)."""
    return hasattr(param, "ds_id")


def local_partitions(module: nn.Module) -> list[Tensor]:
    """This rank's share of every parameter, in ``module.parameters()`` order: the flat ZeRO-3 partition (a view
    into the optimizer's bit16 buffer, so in-place writes reach the module) or the full tensor."""
    return [p.ds_tensor.data if is_partitioned(p) else p.data for p in module.parameters()]


def consolidated_state_dict(module: nn.Module, to_float: bool = False) -> dict[str, Tensor]:
    """The full state dict of a (possibly ZeRO-3-partitioned) module on CPU, gathered one sub-module at a time.

    Collective when partitioned: every rank must call it. Non-persistent buffers are left out, as in
    ``state_dict()``. ``to_float`` casts floating tensors to fp32.
    """
    import deepspeed

    def cpu(t: Tensor) -> Tensor:
        t = t.detach()
        return (t.float() if to_float and t.is_floating_point() else t).cpu().clone()

    out: dict[str, Tensor] = {}
    for prefix, sub in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        own = [p for p in sub._parameters.values() if p is not None]
        partitioned = [p for p in own if is_partitioned(p)]
        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None, enabled=bool(partitioned)):
            for name, p in sub._parameters.items():
                if p is not None:
                    out[dot + name] = cpu(p.data)
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[dot + name] = cpu(buf)
    return out
