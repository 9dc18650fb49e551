"""Shape-table builders shared by the official key tables of both tokenizers (taming-style conv blocks)."""

from __future__ import annotations

from collections import OrderedDict


def conv(out: OrderedDict, name: str, c_out: int, c_in: int, k: int) -> None:
    """A k x k conv with bias."""
    out[f"{name}.weight"] = (c_out, c_in, k, k)
    out[f"{name}.bias"] = (c_out,)


def norm(out: OrderedDict, name: str, c: int) -> None:
    """An affine GroupNorm."""
    out[f"{name}.weight"] = (c,)
    out[f"{name}.bias"] = (c,)


def resnet(out: OrderedDict, name: str, c_in: int, c_out: int) -> None:
    """GN -> conv3x3 -> GN -> conv3x3, plus a 1x1 ``nin_shortcut`` where the channel count changes."""
    norm(out, f"{name}.norm1", c_in)
    conv(out, f"{name}.conv1", c_out, c_in, 3)
    norm(out, f"{name}.norm2", c_out)
    conv(out, f"{name}.conv2", c_out, c_out, 3)
    if c_in != c_out:
        conv(out, f"{name}.nin_shortcut", c_out, c_in, 1)


def _names(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def require_layout(state: dict, layout: dict[str, tuple[int, ...]], source: str, what: str = "official") -> None:
    """Raise one ValueError naming every missing, unexpected and mis-shaped key of ``state`` against ``layout``."""
    missing = [k for k in layout if k not in state]
    unexpected = [k for k in state if k not in layout]
    misshaped = [
        f"{k}: file {tuple(state[k].shape)} vs expected {layout[k]}"
        for k in layout
        if k in state and tuple(state[k].shape) != layout[k]
    ]
    parts = [f"{label} keys: {_names(keys)}" for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
    if parts:
        raise ValueError(f"{source} does not match the {what} layout; " + "; ".join(parts))
