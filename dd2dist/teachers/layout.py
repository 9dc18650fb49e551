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
