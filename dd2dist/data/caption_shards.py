"""Caption shards: WebDataset tars of encoded captions, the condition source of text-to-image teacher sampling.

One sample per caption, members ``<key>.caption.txt`` (UTF-8), ``<key>.text.f16`` (T x Dt little-endian float16,
left-padded), ``<key>.text_mask.u8`` (T bytes, 1 = valid slot) and ``<key>.info.json`` (any JSON object: class,
measured properties, phrasing, split...). ``captions.json`` in the directory records the encoder name, the text
shape [T, Dt], the caption count, the shard list and whether the set is complete; a directory is read only when
it is complete, and a set is always handed out in key order, so that "caption i" means the same caption however
the set was sharded.

A shard that cannot be read to its end is skipped whole (its samples are not half used) and counted in
:attr:`CaptionSet.skipped`, as the token stream counts corrupt shards (:class:`dd2dist.data.stats.DataStats`); a
sample that is malformed is not skipped but refused with a ValueError naming shard and key, because a caption set
is small and made by our own job: a bad sample there is a bug to fix, not noise to train around.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dd2dist.conditions import Cond
from dd2dist.data.schema import TEXT, TEXT_DTYPE, TEXT_MASK, check_key
from dd2dist.data.stats import DataStats
from dd2dist.data.tario import iter_raw_samples
from dd2dist.data.writer import ShardSetWriter

log = logging.getLogger("dd2dist.data")

CAPTIONS_JSON = "captions.json"
CAPTION = "caption.txt"
INFO = "info.json"
SHARD_PREFIX = "captions"


def caption_sample(key: str, caption: str, text: np.ndarray, mask: np.ndarray, info: dict,
                   text_shape: tuple[int, int]) -> dict:
    """The raw WebDataset dict of one caption; ValueError naming the key on a shape, mask or type problem."""
    check_key(key)
    text, mask = np.asarray(text), np.asarray(mask).astype(bool)
    if tuple(text.shape) != tuple(text_shape) or not np.isfinite(text).all():
        raise ValueError(f"caption {key!r}: text must be finite {tuple(text_shape)}, got {tuple(text.shape)}")
    if mask.shape != (text_shape[0],) or not mask.any():
        raise ValueError(f"caption {key!r}: text_mask must be ({text_shape[0]},) with a valid slot, got "
                         f"shape {mask.shape} with {int(mask.sum())} valid")
    if not isinstance(caption, str) or not isinstance(info, dict):
        raise ValueError(f"caption {key!r}: caption must be a string and info a dict")
    return {
        "__key__": key,
        CAPTION: caption.encode("utf-8"),
        TEXT: np.ascontiguousarray(text, dtype=TEXT_DTYPE).tobytes(),
        TEXT_MASK: mask.astype(np.uint8).tobytes(),
        INFO: json.dumps(info, sort_keys=True).encode("utf-8"),
    }


def write_caption_shard(out_dir: str | os.PathLike, number: int, samples: list[dict]) -> Path:
    """Write ``samples`` (from :func:`caption_sample`) as the one shard ``captions-<number>.tar`` (+ its ``.idx``),
    published only once complete; the name depends on the shard number only, so any worker can write it."""
    if not samples:
        raise ValueError(f"{out_dir}: caption shard {number} would be empty")
    writer = ShardSetWriter(out_dir, prefix=SHARD_PREFIX, maxcount=len(samples) + 1, start_shard=number)
    with writer:
        for s in samples:
            writer.write(s)
    return writer.shards[0]


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}-{number:06d}.tar"


@dataclass(frozen=True)
class CaptionSet:
    """A caption set in key order: ``text[i]`` / ``mask[i]`` are the features of ``captions[i]`` (key ``keys[i]``).

    ``skipped`` lists the shards that could not be read (their captions are absent).
    """

    keys: list[str]
    captions: list[str]
    text: np.ndarray  # (M, T, Dt) float16
    mask: np.ndarray  # (M, T) bool
    info: list[dict]
    encoder: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def text_shape(self) -> tuple[int, int]:
        return int(self.text.shape[1]), int(self.text.shape[2])

    def cond(self, indices) -> Cond:
        """The teacher condition of captions ``indices`` (fp32 text, bool mask)."""
        idx = np.asarray(indices, dtype=np.int64)
        text = torch.from_numpy(self.text[idx].astype(np.float32))
        return Cond(text=text, text_mask=torch.from_numpy(self.mask[idx].copy()))

    def fingerprint(self) -> str:
        """A hash of what conditions a teacher (encoder, keys in order, feature and mask bytes): equal sets, equal
        fingerprints, so a resumed sampling run can check it conditions on the same captions."""
        h = hashlib.sha256(self.encoder.encode())
        h.update(json.dumps(self.keys).encode())
        h.update(np.ascontiguousarray(self.text, dtype=TEXT_DTYPE).tobytes())
        h.update(np.ascontiguousarray(self.mask, dtype=np.uint8).tobytes())
        return h.hexdigest()[:16]


def read_captions_json(directory: str | os.PathLike) -> dict:
    """The ``captions.json`` of a caption directory; ValueError naming the file when absent or unreadable."""
    path = Path(directory) / CAPTIONS_JSON
    if not path.is_file():
        raise ValueError(f"{directory}: not a caption shard directory (no {CAPTIONS_JSON})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from None
    shape = meta.get("text_shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"{path}: text_shape must be [T, Dt] > 0, got {shape!r}")
    if not isinstance(meta.get("encoder"), str) or not isinstance(meta.get("shards"), list):
        raise ValueError(f"{path}: needs an encoder name and a shard list")
    return meta


def _decode(raw: dict, shard: str, text_shape: tuple[int, int]) -> tuple[str, str, np.ndarray, np.ndarray, dict]:
    key = raw["__key__"]
    where = f"caption shard {shard}, key {key!r}"
    missing = [m for m in (CAPTION, TEXT, TEXT_MASK, INFO) if m not in raw]
    if missing:
        raise ValueError(f"{where}: missing {missing}")
    T, Dt = text_shape
    if len(raw[TEXT]) != 2 * T * Dt:
        raise ValueError(f"{where}: {TEXT} has {len(raw[TEXT])} bytes, expected {2 * T * Dt} for ({T}, {Dt})")
    mask = np.frombuffer(raw[TEXT_MASK], dtype=np.uint8)
    if mask.shape != (T,) or not np.isin(mask, (0, 1)).all() or not mask.any():
        raise ValueError(f"{where}: {TEXT_MASK} must be {T} bytes of 0/1 with a valid slot, got {mask.tolist()}")
    text = np.frombuffer(raw[TEXT], dtype=TEXT_DTYPE).reshape(T, Dt)
    if not np.isfinite(text).all():
        raise ValueError(f"{where}: {TEXT} has non-finite values")
    try:
        caption = raw[CAPTION].decode("utf-8")
        info = json.loads(raw[INFO].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: {INFO} must be a JSON object")
    return key, caption, text, mask.astype(bool), info


def read_caption_shards(directory: str | os.PathLike) -> CaptionSet:
    """The complete caption set of ``directory`` in key order; see the module docstring for what is refused."""
    meta = read_captions_json(directory)
    if not meta.get("complete"):
        raise ValueError(f"{Path(directory) / CAPTIONS_JSON}: the caption set is not complete (an interrupted "
                         "encoding: rerun it with the same arguments)")
    text_shape = tuple(meta["text_shape"])
    rows: dict[str, tuple] = {}
    skipped = []
    for name in meta["shards"]:
        shard = str(Path(directory) / name)
        stats, got = DataStats(), []
        if not os.path.isfile(shard):
            stats.corrupt_shard(shard, 0, FileNotFoundError(shard))
        else:
            got = [_decode(raw, shard, text_shape) for raw in iter_raw_samples(shard, stats)]
        if stats["shards_corrupt"]:
            skipped.append(shard)
            continue
        for row in got:
            if row[0] in rows:
                raise ValueError(f"caption shard {shard}: key {row[0]!r} also in {rows[row[0]][-1]}")
            rows[row[0]] = (*row, shard)
    if skipped:
        log.warning("captions: %d unreadable shard(s) of %s skipped, e.g. %s", len(skipped), directory, skipped[0])
    if not rows:
        raise ValueError(f"{directory}: no readable captions ({len(skipped)} shard(s) skipped)")
    keys = sorted(rows)
    return CaptionSet(
        keys=keys,
        captions=[rows[k][1] for k in keys],
        text=np.stack([rows[k][2] for k in keys]).astype(np.float16),
        mask=np.stack([rows[k][3] for k in keys]),
        info=[rows[k][4] for k in keys],
        encoder=meta["encoder"],
        skipped=tuple(skipped),
    )
