"""The conditions of the draws that are not read from data: stage-2 generator and guidance batches, the PF-ODE
regression pairs and online stage-1 sampling.

A class-conditional teacher gets class labels (balanced cycles or uniform draws). A text-conditional teacher gets
captions from a :class:`CaptionBank`: text features held in memory, from which each draw takes an index vector
drawn from the (seed, rank, iteration, purpose) generator. Why a bank and not a second data stream: a draw is then
a pure function of the step, so a resumed run draws exactly the same captions with no position to checkpoint, and
the regression pairs of a block (``BatchSource.ode_pairs``) can be recomputed from their first step alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from dd2dist.conditions import Cond, cyclic_labels
from dd2dist.config import ConfigError
from dd2dist.method.seeding import make_generator

log = logging.getLogger("dd2dist.train")

CAPTION_SET_MARKER = "captions.json"  # a directory holding it is a caption set, not token shards


class ConditionSource(Protocol):
    """What the batch source asks for: the condition of ``batch`` rows of one purpose of one micro-step."""

    def draw(self, batch: int, iteration: int, micro: int, purpose: str) -> Cond: ...


class ClassLabels:
    """Class labels: balanced cycles (``label_mode: balanced``) or uniform draws (``random``)."""

    def __init__(self, num_classes: int, label_mode: str, seed: int, rank: int, world_size: int,
                 grad_accum: int, device: torch.device):
        self.num_classes, self.label_mode = int(num_classes), label_mode
        self.seed, self.rank, self.world_size, self.grad_accum = seed, rank, world_size, grad_accum
        self.device = device

    def draw(self, batch: int, iteration: int, micro: int, purpose: str) -> Cond:
        if self.num_classes <= 0:
            raise ValueError("class labels need a class-conditional teacher (num_classes > 0); a text-conditional "
                             "teacher draws captions (teacher.llamagen.caption_dim > 0, data.captions)")
        if self.label_mode == "balanced":
            # consecutive micro-batches and ranks continue the cycle, so each optimizer step sees balanced classes
            slot = (iteration * self.grad_accum + micro) * self.world_size + self.rank
            return Cond(labels=cyclic_labels(batch, self.num_classes, start=slot * batch, device=self.device))
        gen = make_generator(self.seed, self.rank, iteration, purpose, self.device)
        return Cond(labels=torch.randint(self.num_classes, (batch,), generator=gen, device=self.device))


class CaptionBank:
    """Captions held in memory: ``text`` (M, T, Dt) float16 features, left-padded, and ``mask`` (M, T) bool.

    float16 because that is how token shards store them (no precision is lost) and it halves the memory a
    rank holds: M x T x Dt x 2 bytes (4096 x 120 x 2048 x 2 = 2 GB for T5-XL features at the default size).
    """

    def __init__(self, text: Tensor | np.ndarray, mask: Tensor | np.ndarray, source: str = "arrays"):
        text, mask = torch.as_tensor(np.asarray(text)), torch.as_tensor(np.asarray(mask))
        if text.dim() != 3 or mask.shape != text.shape[:2]:
            raise ValueError(f"caption bank ({source}): text must be (M, T, Dt) and mask (M, T), got "
                             f"{tuple(text.shape)} and {tuple(mask.shape)}")
        if text.shape[0] == 0:
            raise ValueError(f"caption bank ({source}): no captions")
        self.text = text.to(torch.float16).contiguous()
        self.mask = mask.bool().contiguous()
        self.source = source

    def __len__(self) -> int:
        return self.text.shape[0]

    @property
    def slots(self) -> int:
        return self.text.shape[1]

    @property
    def width(self) -> int:
        return self.text.shape[2]

    def rows(self, index: Tensor, device: torch.device | str = "cpu") -> Cond:
        """The captions at ``index`` (B,) as a :class:`Cond` on ``device`` (text fp32, as the data stream gives)."""
        index = index.cpu()
        return Cond(text=self.text[index].to(device=device, dtype=torch.float32),
                    text_mask=self.mask[index].to(device))

    def check_layout(self, slots: int, width: int, key: str = "data.captions") -> None:
        """Refuse captions the teacher cannot read (T caption slots of Dt features), naming their source."""
        if (self.slots, self.width) != (slots, width):
            raise ConfigError(key, f"{self.source}: captions are {self.slots} slots x {self.width} features; the "
                                   f"teacher expects {slots} x {width} (teacher.llamagen.cls_token_num x caption_dim)")


class CaptionDraws:
    """Captions drawn uniformly from a :class:`CaptionBank`, one index vector per (seed, rank, iteration, purpose).

    The indices come from a CPU generator whatever the training device, so a run draws the same captions on CPU
    and GPU, and the bank itself stays in host memory.
    """

    def __init__(self, bank: CaptionBank, seed: int, rank: int, device: torch.device):
        self.bank, self.seed, self.rank, self.device = bank, seed, rank, device

    def draw(self, batch: int, iteration: int, micro: int, purpose: str) -> Cond:
        gen = make_generator(self.seed, self.rank, iteration, purpose, "cpu")
        return self.bank.rows(torch.randint(len(self.bank), (batch,), generator=gen), self.device)

    def first(self, rows: int) -> Cond:
        """The first captions of the bank (cycled when the bank is smaller): fixed conditions for sample grids,
        the same at every call so that grids compare over time."""
        return self.bank.rows(torch.arange(rows) % len(self.bank), self.device)


# ---- loading ------------------------------------------------------------------------------------------------


def _distinct_first(pairs, size: int) -> tuple[list, list]:
    """The first ``size`` distinct (text, mask) pairs of an iterable, compared byte for byte; reading stops
    there, so a bank costs ``size`` captions of reading however large the shard set is."""
    seen: set[bytes] = set()
    keep_t, keep_m = [], []
    for text, mask in pairs:
        text16, mask = np.asarray(text, dtype=np.float16), np.asarray(mask, dtype=bool)
        key = text16.tobytes() + mask.tobytes()
        if key in seen:
            continue
        seen.add(key)
        keep_t.append(text16)
        keep_m.append(mask)
        if len(keep_t) >= size:
            break
    return keep_t, keep_m


def _token_shard_captions(source: str, size: int, rank: int, world_size: int,
                          text_shape: tuple[int, int] | None) -> tuple[list, list]:
    """Captions of this rank's share of text-conditional token shards, split the way the training stream splits
    them (whole shards per rank when there are enough, else every ``world_size``-th sample), in file order.

    Strict where the training stream is tolerant: a sample that does not decode, or captions of another layout
    than ``text_shape`` (T, Dt), refuse the whole source with the shard's name, since the bank is read once and
    a silently smaller or foreign bank would only show up as a worse generator."""
    from dd2dist.data.schema import SampleError, decode_sample
    from dd2dist.data.stats import DataStats
    from dd2dist.data.stream import list_shards
    from dd2dist.data.tario import iter_raw_samples

    paths = list_shards(source)
    own = paths[rank::world_size] if len(paths) >= world_size else paths
    split = len(paths) < world_size

    def samples():
        i = 0
        for path in own:
            stats = DataStats()
            for raw in iter_raw_samples(path, stats):
                try:
                    s = decode_sample(raw, {"cond": "text", "text_shape": text_shape})
                except SampleError as err:
                    raise ValueError(f"shard {path}: {err}") from None
                if not split or i % world_size == rank:
                    yield s.text, s.text_mask
                i += 1
            if stats["shards_corrupt"]:
                raise ValueError(f"shard {path} is damaged (see the log)")

    return _distinct_first(samples(), size)


def _caption_set_captions(directory: str, size: int, rank: int, world_size: int) -> tuple[list, list]:
    """Captions of a caption set (a directory with captions.json, read in key order); rows ``rank::world_size``
    are this rank's."""
    from dd2dist.data.caption_shards import read_caption_shards

    captions = read_caption_shards(directory)
    text, mask = np.asarray(captions.text), np.asarray(captions.mask)
    return _distinct_first(zip(text[rank::world_size], mask[rank::world_size]), size)


def load_caption_bank(source: str, size: int, rank: int = 0, world_size: int = 1,
                      text_shape: tuple[int, int] | None = None) -> CaptionBank:
    """The first ``size`` distinct captions of this rank's share of ``source``: text-conditional token shards
    (directory, brace pattern or glob) or a caption set (a directory holding ``captions.json``). Ranks get
    different captions, deterministically. ``text_shape`` (T, Dt), when given, is the layout every caption must
    have. Errors name ``data.captions``, the source and, for token shards, the shard."""
    if size <= 0:
        raise ConfigError("data.caption_bank_size", f"must be > 0, got {size}")
    path = Path(os.path.expanduser(source))
    try:
        if path.is_dir() and (path / CAPTION_SET_MARKER).is_file():
            texts, masks = _caption_set_captions(str(path), size, rank, world_size)
        else:
            texts, masks = _token_shard_captions(str(source), size, rank, world_size, text_shape)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("data.captions", f"cannot read captions from {source}: {err}") from None
    if not texts:
        raise ConfigError("data.captions", f"{source}: rank {rank} of {world_size} found no captions in its share")
    bank = CaptionBank(np.stack(texts), np.stack(masks), source=str(source))
    if text_shape is not None:
        bank.check_layout(*text_shape)
    if len(texts) < size:
        log.info("caption bank of rank %d: %d distinct captions in %s (data.caption_bank_size %d)",
                 rank, len(texts), source, size)
    return bank


# ---- from a config --------------------------------------------------------------------------------------------


def conditions_from_config(cfg, num_classes: int, rank: int, world_size: int,
                           device: torch.device) -> ConditionSource:
    """The condition source of one rank of a run: class labels for a class-conditional teacher, or draws from
    the caption bank of ``cfg.caption_source()`` (checked against the teacher's slots and width) for a text one."""
    if not cfg.text_conditional:
        return ClassLabels(num_classes, cfg.data.label_mode, cfg.seed, rank, world_size, cfg.engine.grad_accum,
                           device)
    arch = cfg.teacher.arch
    bank = load_caption_bank(cfg.caption_source(), cfg.data.caption_bank_size, rank, world_size,
                             text_shape=(arch.cls_token_num, arch.caption_dim))
    return CaptionDraws(bank, cfg.seed, rank, device)
