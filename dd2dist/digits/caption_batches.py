"""Caption conditions of the text-to-image digits teacher's AR training (a ``BatchCond`` of ``ar_training``).

Every training image carries several true captions in different phrasings (:func:`caption_records`); each time a
batch holds the image, one of them is drawn, so the teacher meets a new phrasing of the same content most epochs
and has to read the content words rather than memorise one sentence per image. With probability ``drop_prob`` the
caption is replaced by the teacher's null caption, keeping the caption's own slot mask (the rule CFG sampling
uses: :meth:`ARTeacher.null_cond` with ``like=cond``), so the teacher learns the unconditional model CFG needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dd2dist.conditions import Cond
from dd2dist.text import TextEncoder


@dataclass(frozen=True)
class CaptionBatches:
    """Encoded captions of N images, K per image: features (N, K, T, Dt), mask (N, K, T); null caption (T, Dt)."""

    features: Tensor
    mask: Tensor
    null_text: Tensor
    drop_prob: float

    def __post_init__(self) -> None:
        n, k, t, d = self.features.shape
        if self.mask.shape != (n, k, t) or self.null_text.shape != (t, d):
            raise ValueError(f"CaptionBatches: features {tuple(self.features.shape)}, mask "
                             f"{tuple(self.mask.shape)} and null caption {tuple(self.null_text.shape)} disagree")

    def __call__(self, idx: Tensor, gen: torch.Generator) -> Cond:
        drop = torch.rand(idx.shape, generator=gen) < self.drop_prob
        pick = torch.randint(0, self.features.shape[1], idx.shape, generator=gen)
        text = self.features[idx, pick].clone()
        text[drop] = self.null_text.to(text.dtype)
        return Cond(text=text, text_mask=self.mask[idx, pick].clone())


def encode_records(records: Sequence[dict], encoder: TextEncoder, batch_size: int = 1024) -> Cond:
    """Text condition of each caption record, in order."""
    feats, masks = [], []
    for i in range(0, len(records), batch_size):
        f, m = encoder.encode([r["caption"] for r in records[i : i + batch_size]])
        feats.append(f)
        masks.append(m)
    return Cond(text=torch.cat(feats), text_mask=torch.cat(masks))


def caption_batches(records: Sequence[dict], num_images: int, encoder: TextEncoder, null_text: Tensor,
                    drop_prob: float) -> CaptionBatches:
    """:class:`CaptionBatches` of images 0..num_images-1 from their records (``index`` = image row), every image
    holding the same number of captions."""
    by_image: dict[int, list[int]] = {}
    for j, r in enumerate(records):
        by_image.setdefault(int(r["index"]), []).append(j)
    missing = [i for i in range(num_images) if i not in by_image]
    if missing:
        raise ValueError(f"caption records lack images {missing[:5]} (of {len(missing)} without captions)")
    counts = {len(by_image[i]) for i in range(num_images)}
    if len(counts) != 1:
        raise ValueError(f"every image needs the same number of captions, got counts {sorted(counts)}")
    k = counts.pop()
    order = [j for i in range(num_images) for j in by_image[i]]
    cond = encode_records([records[j] for j in order], encoder)
    t, d = cond.text.shape[1:]
    return CaptionBatches(cond.text.reshape(num_images, k, t, d), cond.text_mask.reshape(num_images, k, t),
                          null_text.detach().float().cpu(), drop_prob)
