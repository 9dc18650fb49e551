"""Streaming reader of token shards for training: resampled, split by rank, shuffled, resumable.

Determinism and resume
----------------------
The stream of one rank is a pure function of ``(seed, rank, world_size, step)`` and the shard files. Steps are
grouped in *chunks* of ``chunk_steps`` batches; chunk ``c`` draws everything (which shard to read next, where
in it to start, the shuffle-buffer picks) from its own generator seeded with ``(seed, rank, c)``, starting with
an empty shuffle buffer. Resuming at step ``s`` therefore rebuilds chunk ``s // chunk_steps`` and fast-forwards
``s % chunk_steps`` batches inside it: at most one chunk of re-reading, and the batches after the resume are the
ones an uninterrupted run would have produced. The step lives in :class:`StreamState` (``state_dict()``), which
the trainer stores in its checkpoint.

Resampled mode (training): each draw picks one of the rank's shards uniformly and a uniformly random start
sample inside it (through the shard's ``.idx``; from the start when there is none), then reads up to
``samples_per_draw`` samples. Random entry points matter because every chunk restarts its draws: without them
only the first samples of each shard would ever be read.

Finite mode (``resampled=False``, evaluation and tests): one pass over the rank's shards in a seeded order,
last partial batch included. Ranks get disjoint shards (``shards[rank::world]``) when there are at least as
many shards as ranks, else every rank reads everything and keeps samples ``i % world == rank``; either way
the ranks' samples are disjoint and together cover the data.

Bad data never stops the stream: see :mod:`dd2dist.data.tario` and :class:`DataStats`. Only when a whole
chunk's worth of draws finds no usable sample does it raise, naming the shards, instead of spinning forever.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import braceexpand
import numpy as np
import torch

from dd2dist.conditions import Cond
from dd2dist.data.schema import TokenSample
from dd2dist.data.stats import DataStats
from dd2dist.data.tario import iter_shard_samples, sample_offsets

log = logging.getLogger("dd2dist.data")


def list_shards(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Shard paths from a directory (its ``*.tar``, sorted), a brace pattern / glob, or an explicit list."""
    if isinstance(source, (list, tuple)):
        paths = [str(p) for p in source]
    else:
        source = str(source)
        if os.path.isdir(source):
            paths = sorted(str(p) for p in Path(source).glob("*.tar"))
        else:
            paths = []
            for pat in braceexpand.braceexpand(source):
                paths += sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
    if not paths:
        raise FileNotFoundError(f"data.shards: no shard files found for {source!r}")
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"data.shards: {len(missing)} shard(s) do not exist, e.g. {missing[0]}")
    return paths


@dataclass
class StreamState:
    """Where a rank's stream is: everything needed to continue it exactly."""

    seed: int
    rank: int
    world_size: int
    step: int = 0  # batches handed to the consumer so far


@dataclass
class TokenBatch:
    """A training batch: token ids (B, N) int64 and the condition (labels (B,) or text (B, T, Dt) + mask)."""

    tokens: torch.Tensor
    labels: torch.Tensor | None
    text: torch.Tensor | None
    text_mask: torch.Tensor | None
    keys: list[str]

    def cond(self):
        """The batch condition as a :class:`dd2dist.conditions.Cond`."""
        return Cond(labels=self.labels, text=self.text, text_mask=self.text_mask)


def collate(samples: list[TokenSample]) -> TokenBatch:
    """Stack samples (all of one spec) into a :class:`TokenBatch`; tokens are flattened to (B, N)."""
    tokens = torch.from_numpy(np.stack([s.tokens.reshape(-1) for s in samples]))
    keys = [s.key for s in samples]
    if samples[0].label is not None:
        return TokenBatch(tokens, torch.tensor([s.label for s in samples], dtype=torch.long), None, None, keys)
    text = torch.from_numpy(np.stack([s.text for s in samples]))
    mask = torch.from_numpy(np.stack([s.text_mask for s in samples]))
    return TokenBatch(tokens, None, text, mask, keys)


@dataclass(frozen=True)
class _Plan:
    """The immutable description of a rank's stream (picklable, for loader worker processes)."""

    shards: tuple[str, ...]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    expect: tuple[tuple[str, object], ...]
    shuffle_buffer: int
    resampled: bool
    chunk_steps: int
    samples_per_draw: int
    drop_last: bool


def _rank_shards(plan: _Plan) -> tuple[list[str], bool]:
    """The shards this rank reads, and whether samples must additionally be split by index."""
    if len(plan.shards) >= plan.world_size:
        return list(plan.shards[plan.rank :: plan.world_size]), False
    return list(plan.shards), True


def _shuffled(samples: Iterator[TokenSample], size: int, rng: np.random.Generator) -> Iterator[TokenSample]:
    """Reservoir-style shuffle buffer: once full, each new sample evicts a uniformly chosen buffered one."""
    if size <= 1:
        yield from samples
        return
    buf: list[TokenSample] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = s
    rng.shuffle(buf)
    yield from buf


def _batched(samples: Iterator[TokenSample], batch_size: int, drop_last: bool) -> Iterator[TokenBatch]:
    batch: list[TokenSample] = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)


def _draws(
    plan: _Plan, shards: list[str], rng: np.random.Generator, stats: DataStats, pin: dict
) -> Iterator[TokenSample]:
    """Endless resampled samples for one chunk; raises if a long run of draws finds nothing usable."""
    expect = dict(plan.expect)
    patience = max(16, 4 * len(shards))
    empty = 0
    while True:
        path = shards[int(rng.integers(len(shards)))]
        offsets = sample_offsets(path)
        start = offsets[int(rng.integers(len(offsets)))] if offsets else 0
        got = 0
        for s in iter_shard_samples(path, stats, expect, start, plan.samples_per_draw, pin):
            got += 1
            yield s
        empty = 0 if got else empty + 1
        if empty >= patience:
            raise RuntimeError(
                f"data: {empty} consecutive shard draws gave no usable sample (rank {plan.rank}, {len(shards)} "
                f"shards such as {shards[0]}); counters: {stats.as_dict()}"
            )


def _chunk(plan: _Plan, chunk: int, stats: DataStats, pin: dict) -> Iterator[TokenBatch]:
    shards, _ = _rank_shards(plan)
    draw_seq, shuffle_seq = np.random.SeedSequence([plan.seed, plan.rank, chunk]).spawn(2)
    samples = _draws(plan, shards, np.random.default_rng(draw_seq), stats, pin)
    shuffled = _shuffled(samples, plan.shuffle_buffer, np.random.default_rng(shuffle_seq))
    batches = _batched(shuffled, plan.batch_size, drop_last=True)
    for _ in range(plan.chunk_steps):
        yield next(batches)


def _finite(plan: _Plan, epoch: int, stats: DataStats) -> Iterator[TokenBatch]:
    shards, split_samples = _rank_shards(plan)
    order_seq, shuffle_seq = np.random.SeedSequence([plan.seed, plan.rank, epoch, 1]).spawn(2)
    if plan.shuffle_buffer > 1:
        # Ranks that share all shards must read them in the same order for the index split to partition them.
        seq = np.random.SeedSequence([plan.seed, 0, epoch, 1]).spawn(1)[0] if split_samples else order_seq
        shards = [shards[i] for i in np.random.default_rng(seq).permutation(len(shards))]
    expect = dict(plan.expect)
    pin: dict = {}

    def samples() -> Iterator[TokenSample]:
        i = 0
        for path in shards:
            for s in iter_shard_samples(path, stats, expect, pin=pin):
                if not split_samples or i % plan.world_size == plan.rank:
                    yield s
                i += 1

    shuffled = _shuffled(samples(), plan.shuffle_buffer, np.random.default_rng(shuffle_seq))
    yield from _batched(shuffled, plan.batch_size, plan.drop_last)


def _source(plan: _Plan, start_step: int, epoch: int) -> Iterator[tuple[TokenBatch, dict]]:
    """(batch, counters added while producing it) from ``start_step`` on (resampled) or for one pass (finite)."""
    stats = DataStats()

    def with_stats(batches: Iterator[TokenBatch]) -> Iterator[tuple[TokenBatch, dict]]:
        for b in batches:
            stats.add("samples", len(b.keys))
            delta = stats.snapshot()
            stats.counts.clear()
            yield b, delta

    if not plan.resampled:
        yield from with_stats(_finite(plan, epoch, stats))
        return
    chunk, skip = divmod(start_step, plan.chunk_steps)
    pin: dict = {}  # the layout of the first sample read; shards of another layout are refused
    while True:
        batches = _chunk(plan, chunk, stats, pin)
        for _ in range(skip):
            next(batches)  # fast-forward inside the chunk
        skip = 0
        stats.counts.clear()  # re-read samples were counted before the resume
        yield from with_stats(batches)
        chunk += 1


class _LoaderSource(torch.utils.data.IterableDataset):
    """Runs :func:`_source` inside one DataLoader worker process (prefetching off the training thread)."""

    def __init__(self, plan: _Plan, start_step: int, epoch: int):
        super().__init__()
        self.plan, self.start_step, self.epoch = plan, start_step, epoch

    def __iter__(self):
        return _source(self.plan, self.start_step, self.epoch)


class TokenStream:
    """Iterable of :class:`TokenBatch` for one rank; see the module docstring for the guarantees.

    Args:
        shards: directory, brace pattern, glob or list of ``.tar`` shards (all ranks pass the same list).
        batch_size: samples per batch (per rank).
        seed, rank, world_size: the stream's identity; with ``step`` they fix every batch.
        expect: required :class:`ShardSpec` values, at least ``teacher_id`` for training (shards of another
            teacher are refused), plus e.g. ``num_tokens`` / ``vocab_size``.
        shuffle_buffer: shuffle-buffer size in samples (<= 1: no shuffling).
        resampled: endless resampled stream (training) or one finite pass per iteration.
        chunk_steps: batches per reseeded chunk (resume re-reads at most this many batches).
        samples_per_draw: samples read consecutively from one random place of one shard.
        num_workers: 0 reads in the calling thread; 1 reads in one DataLoader worker process. More would make
            the order depend on the worker count, and token decoding is cheap (``dd2dist.bench.data``).
        drop_last: drop the last partial batch of a finite pass.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str],
        batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        expect: Mapping[str, object] | None = None,
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        chunk_steps: int = 100,
        samples_per_draw: int = 256,
        num_workers: int = 0,
        drop_last: bool = False,
    ):
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
        if num_workers not in (0, 1):
            raise ValueError(
                f"data.num_loader_workers must be 0 or 1 for a reproducible stream, got {num_workers} "
                "(more workers would interleave their batches in a worker-count-dependent order)"
            )
        if chunk_steps <= 0 or samples_per_draw <= 0:
            raise ValueError("chunk_steps and samples_per_draw must be > 0")
        paths = list_shards(shards)
        if expect is None or not expect.get("teacher_id"):
            log.warning("data: TokenStream without an expected teacher_id: shards of any teacher are accepted")
        self.plan = _Plan(
            shards=tuple(paths), batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
            expect=tuple(sorted((expect or {}).items())), shuffle_buffer=shuffle_buffer, resampled=resampled,
            chunk_steps=chunk_steps, samples_per_draw=samples_per_draw, drop_last=drop_last,
        )
        if len(paths) < world_size:
            log.warning("data: %d shards for %d ranks: ranks share shards", len(paths), world_size)
        self.num_workers = num_workers
        self.state = StreamState(seed=seed, rank=rank, world_size=world_size)
        self.stats = DataStats()
        self.epoch = 0  # finite passes completed (finite mode)
        self.epoch_batches: int | None = None

    # ---- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The stream position to store in a checkpoint."""
        return {**asdict(self.state), "epoch": self.epoch}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from a stored position. A different seed/rank/world gives a different (valid) stream."""
        for k in ("seed", "rank", "world_size", "step"):
            if k not in state:
                raise KeyError(f"data stream state lacks {k!r}: {dict(state)}")
        mine = asdict(self.state)
        changed = [k for k in ("seed", "rank", "world_size") if state[k] != mine[k]]
        if changed:
            log.warning("data: resuming with different %s than the stored stream: the data order changes", changed)
        self.state.step = int(state["step"])
        self.epoch = int(state.get("epoch", 0))

    # ---- iteration ----------------------------------------------------------------------------------------
    def with_epoch(self, num_batches: int) -> TokenStream:
        """Make each ``iter()`` of a resampled stream yield ``num_batches`` batches, continuing the stream."""
        if num_batches <= 0:
            raise ValueError(f"with_epoch needs num_batches > 0, got {num_batches}")
        self.epoch_batches = num_batches
        return self

    def _pairs(self) -> Iterator[tuple[TokenBatch, dict]]:
        if self.num_workers == 0:
            return _source(self.plan, self.state.step, self.epoch)
        loader = torch.utils.data.DataLoader(
            _LoaderSource(self.plan, self.state.step, self.epoch), batch_size=None, num_workers=1, prefetch_factor=4,
        )
        return iter(loader)

    def __iter__(self) -> Iterator[TokenBatch]:
        pairs = self._pairs()
        n = 0
        try:
            while self.epoch_batches is None or n < self.epoch_batches or not self.plan.resampled:
                try:
                    batch, delta = next(pairs)
                except StopIteration:
                    break
                self.stats.merge(delta)
                self.state.step += 1
                n += 1
                yield batch
            if not self.plan.resampled:
                self.epoch += 1
        finally:
            close = getattr(pairs, "close", None) or getattr(pairs, "_shutdown_workers", None)
            if close is not None:
                close()

    def metrics(self) -> dict[str, int]:
        """Counters for the metrics logger (``data/samples``, ``data/samples_skipped``, ``data/shards_corrupt``...)."""
        return self.stats.as_dict()


def stream_from_config(cfg, rank: int = 0, world_size: int = 1, num_tokens: int | None = None) -> TokenStream:
    """The training stream of an :class:`~dd2dist.config.ExperimentConfig` (``data.source == "shards"``).

    Shards of any other teacher than ``cfg.teacher`` are refused (:func:`dd2dist.data.identity.teacher_id`);
    pass the teacher's ``num_tokens`` to refuse shards of another token layout too. For a text-conditional teacher,
    shards whose captions have another number of slots or feature width than it reads are refused by name.
    """
    from dd2dist.data.identity import teacher_id

    data = cfg.data
    if not data.shards:
        raise ValueError("data.shards must name the teacher-token shards when data.source is 'shards'")
    expect = {"teacher_id": teacher_id(cfg.teacher, cfg.seed), "num_tokens": num_tokens}
    if cfg.text_conditional:
        arch = cfg.teacher.arch
        expect["text_shape"] = (arch.cls_token_num, arch.caption_dim)
    return TokenStream(
        data.shards, data.batch_size, seed=cfg.seed, rank=rank, world_size=world_size, expect=expect,
        shuffle_buffer=data.shuffle_buffer, num_workers=data.num_loader_workers,
    )
