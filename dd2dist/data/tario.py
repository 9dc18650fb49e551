"""Reading WebDataset tars sample by sample, tolerating damage, and locating samples through ``.idx`` files."""

from __future__ import annotations

import functools
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from dd2dist.data.schema import SampleError, TokenSample, decode_sample
from dd2dist.data.stats import DataStats
from dd2dist.data.writer import INDEX_VERSION, index_path, split_member

# Errors a damaged or vanished tar can raise while streaming through it.
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, ValueError)
# A shard whose first sample has another teacher or token layout is refused whole: every sample shares it.
REFUSE_KINDS = ("teacher_mismatch", "spec_mismatch")


def iter_raw_samples(
    path: str, stats: DataStats, start_offset: int = 0, max_samples: int | None = None
) -> Iterator[dict]:
    """Yield raw sample dicts (``__key__`` + member suffix -> bytes) from one tar, in file order.

    Members are grouped by key as they come (WebDataset's convention: a sample's members are adjacent).
    ``start_offset`` is the byte offset of a member header to start at (from an index). A read error ends
    the shard: it is counted and logged as corrupt, and the sample being assembled when it happened is dropped
    because it may be incomplete.
    """
    stats.add("shards_read")
    n = 0
    current: dict | None = None
    try:
        with open(path, "rb") as f:
            if start_offset:
                f.seek(start_offset)
            with tarfile.open(fileobj=f, mode="r|") as tf:
                for member in tf:
                    if not member.isreg():
                        continue
                    key, ext = split_member(member.name)
                    if not ext:
                        continue
                    if current is not None and current["__key__"] != key:
                        yield current
                        n += 1
                        if max_samples is not None and n >= max_samples:
                            return
                        current = None
                    if current is None:
                        current = {"__key__": key, "__shard__": path}
                    current[ext] = tf.extractfile(member).read()
                end = start_offset + tf.offset
            # tarfile silently treats a cut inside a header as the end of the archive, so check that the
            # end-of-archive marker (two zero blocks) really follows the last member.
            with open(path, "rb") as f:
                f.seek(end)
                if f.read(1024) != bytes(1024):
                    raise tarfile.ReadError(f"truncated: no end-of-archive marker at byte {end}")
    except TAR_ERRORS as e:
        stats.corrupt_shard(path, n, e)
        return
    if current is not None:
        yield current


def iter_shard_samples(
    path: str,
    stats: DataStats,
    expect: dict | None = None,
    start_offset: int = 0,
    max_samples: int | None = None,
    pin: dict | None = None,
) -> Iterator[TokenSample]:
    """Decoded, validated samples of one shard; bad ones are skipped and counted, a foreign shard refused.

    ``pin``, when given, is filled with the batch-relevant layout of the first sample accepted (token shape,
    condition kind, text shape, vocabulary) and later shards with another layout are refused, so that samples
    that cannot be stacked into one batch never meet in the same stream.
    """
    for raw in iter_raw_samples(path, stats, start_offset, max_samples):
        try:
            sample = decode_sample(raw, expect)
            if pin is not None:
                _check_pin(sample, pin)
        except SampleError as e:
            if e.kind in REFUSE_KINDS:
                stats.refuse_shard(path, e.key, str(e))
                return
            stats.skip_sample(path, e.key, e.kind, str(e))
            continue
        yield sample


def _check_pin(sample: TokenSample, pin: dict) -> None:
    spec = sample.spec
    layout = {"token_shape": spec.token_shape, "cond": spec.cond, "text_shape": spec.text_shape,
              "vocab_size": spec.vocab_size}
    if not pin:
        pin.update(layout)
        return
    for k, v in layout.items():
        if pin[k] != v:
            raise SampleError(sample.key, f"meta.json:{k}", f"{v!r} != {pin[k]!r} of the stream's earlier samples",
                              "spec_mismatch")


@functools.lru_cache(maxsize=16)
def _header_offsets(idx_file: str, mtime_ns: int) -> tuple[int, ...]:
    lines = Path(idx_file).read_text().splitlines()
    if not lines or not lines[0].startswith(INDEX_VERSION + " "):
        raise ValueError(f"{idx_file}: not a {INDEX_VERSION} WebDataset index")
    # The first member's data offset minus its 512-byte ustar header (our writers use short names, no pax).
    return tuple(int(line.split()[1]) - 512 for line in lines[1:] if line.strip())


def sample_offsets(tar_path: str) -> tuple[int, ...] | None:
    """Header offsets of each sample of ``tar_path`` from its ``.idx`` (``None`` when there is no usable index)."""
    idx = index_path(tar_path)
    try:
        return _header_offsets(str(idx), os.stat(idx).st_mtime_ns)
    except (OSError, ValueError, IndexError):
        return None
