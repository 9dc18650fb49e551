"""Caption text -> the per-slot features a text-conditional teacher reads (``Cond.text`` / ``Cond.text_mask``)."""

from dd2dist.text.encoders import HashedNgramEncoder, TextEncoder, build_text_encoder, left_pad, text_encoder_geometry

__all__ = ["HashedNgramEncoder", "TextEncoder", "build_text_encoder", "left_pad", "text_encoder_geometry"]
