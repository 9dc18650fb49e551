"""Image WebDataset shards (``<key>.png|jpg`` + ``label.i64`` + ``cond.cls``) and the PIL reference preprocessing.

``write_image_shards`` turns arrays into shards that the DALI pipeline of :mod:`dd2dist.pipelines.tokenize_images`
reads (the digits demo uses it). ``pil_preprocess`` is the plain-Python twin of that pipeline's decode ->
resize shorter side -> centre crop -> [-1, 1] chain; it is used only to cross-check DALI (tests, benchmark).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np

from dd2dist.data.schema import COND_CLS, LABEL_DTYPE, LABEL_I64
from dd2dist.data.writer import ShardSetWriter

IMAGE_EXTS = ("jpg", "jpeg", "png")


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 (H, W, 3) or (H, W) -> PNG or JPEG bytes."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"image must be uint8 (H, W, 3) or (H, W), got {arr.dtype} {arr.shape}")
    img = Image.fromarray(arr).convert("RGB")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt in ("jpg", "jpeg"):
        img.save(buf, format="JPEG", quality=quality)
    else:
        raise ValueError(f"image format must be png or jpg, got {fmt!r}")
    return buf.getvalue()


def write_image_shards(
    out_dir: str | os.PathLike,
    images: Sequence[np.ndarray] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    fmt: str = "png",
    per_shard: int = 1000,
    prefix: str = "images",
    key_prefix: str = "img",
) -> list[str]:
    """Write uint8 images with class labels as indexed shards; keys ``<key_prefix><i:09d>``. Returns the shards."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    ext = "jpg" if fmt in ("jpg", "jpeg") else "png"
    with ShardSetWriter(out_dir, prefix=prefix, maxcount=per_shard) as w:
        for i, (img, y) in enumerate(zip(images, labels)):
            y = int(y)
            if y < 0:
                raise ValueError(f"label of image {i} is negative ({y})")
            w.write({
                "__key__": f"{key_prefix}{i:09d}",
                ext: encode_image(img, ext),
                LABEL_I64: np.asarray([y], dtype=LABEL_DTYPE).tobytes(),
                COND_CLS: str(y).encode("ascii"),
            })
    return [str(p) for p in w.shards]


def pil_preprocess(data: bytes, size: int) -> np.ndarray:
    """Encoded image -> float32 (3, size, size) in [-1, 1]: resize the shorter side to ``size`` (bilinear with
    antialiasing), centre crop, ``(x - 127.5) / 127.5``. The reference for the DALI pipeline."""
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    # Centre crop; an odd margin is rounded up on the left/top, as DALI's crop_pos=0.5 does.
    left, top = (nw - size + 1) // 2, (nh - size + 1) // 2
    img = img.crop((left, top, left + size, top + size))
    arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    return (arr - 127.5) / 127.5
