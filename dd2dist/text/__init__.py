"""Caption text -> the per-slot features a text-conditional teacher reads (``Cond.text`` / ``Cond.text_mask``)."""

from dd2dist.text.encoders import (
    HashedNgramEncoder,
    TextEncoder,
    build_text_encoder,
    left_pad,
    parse_text_encoder_spec,
    text_encoder_geometry,
    text_encoder_identity,
)

__all__ = ["HashedNgramEncoder", "TextEncoder", "build_text_encoder", "left_pad", "parse_text_encoder_spec",
           "text_encoder_geometry", "text_encoder_identity"]
