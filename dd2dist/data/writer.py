"""Shard writers: ``<prefix>-000000.tar, -000001.tar, ...`` plus a DALI index file per shard.

A shard is written to ``<name>.tar.tmp`` and renamed to ``<name>.tar`` only once it is complete, and its
``.idx`` is written right after, so a reader (or a resumed precompute job) never sees a half-written shard:
an interrupted writer leaves at most a ``.tmp`` file, which :func:`remove_partial_shards` deletes.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import webdataset as wds

from dd2dist.data.schema import SampleError, ShardSpec, TokenSample, check_key, encode_sample

INDEX_VERSION = "v1.2"  # the format of DALI's wds2idx tool, read by fn.readers.webdataset(index_paths=...)


def index_path(tar_path: str | os.PathLike) -> Path:
    """``x/name-000003.tar`` -> ``x/name-000003.idx``."""
    p = Path(tar_path)
    return p.with_suffix(".idx")


def split_member(name: str) -> tuple[str, str]:
    """``dir/key.comp.ext`` -> (``dir/key``, ``comp.ext``): split at the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])


def write_index(tar_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> int:
    """Write DALI's WebDataset index (``wds2idx`` v1.2) for ``tar_path``; return the number of samples.

    Format: a header line ``v1.2 <num_samples>``, then one line per sample listing, for each of its members,
    ``<ext> <data offset> <size> <member name>`` separated by spaces.
    """
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isreg():
                continue
            base, ext = split_member(member.name)
            if not base or base.endswith("/") or not ext:
                continue
            if base != last:
                samples.append([])
                last = base
            samples[-1].append((ext, member.offset_data, member.size, member.name))
    if not samples:
        raise ValueError(f"{tar_path}: no samples, cannot index an empty shard")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{e} {o} {s} {n}" for e, o, s, n in sample) for sample in samples]
    out = Path(idx_path) if idx_path is not None else index_path(tar_path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return len(samples)


def read_index_keys(idx_path: str | os.PathLike) -> list[str]:
    """Sample keys listed in a ``.idx`` file (cheap: no tar read); raises ValueError naming the file if malformed."""
    text = Path(idx_path).read_text().splitlines()
    if not text or not text[0].startswith(INDEX_VERSION + " "):
        raise ValueError(f"{idx_path}: not a {INDEX_VERSION} WebDataset index")
    n = int(text[0].split()[1])
    keys = []
    for line in text[1 : 1 + n]:
        parts = line.split()
        if len(parts) < 4 or len(parts) % 4:
            raise ValueError(f"{idx_path}: malformed line {line!r}")
        keys.append(split_member(parts[3])[0])
    if len(keys) != n:
        raise ValueError(f"{idx_path}: header says {n} samples, found {len(keys)}")
    return keys


def shard_numbers(out_dir: str | os.PathLike, prefix: str) -> list[int]:
    """Numbers of the complete shards ``<prefix>-NNNNNN.tar`` in ``out_dir``."""
    pat = re.compile(re.escape(prefix) + r"-(\d{6})\.tar$")
    return sorted(int(m.group(1)) for p in Path(out_dir).glob(f"{prefix}-*.tar") if (m := pat.match(p.name)))


def remove_partial_shards(out_dir: str | os.PathLike) -> list[Path]:
    """Delete ``*.tar.tmp`` / ``*.idx.tmp`` left by an interrupted writer; return what was removed."""
    removed = sorted(Path(out_dir).glob("*.tar.tmp")) + sorted(Path(out_dir).glob("*.idx.tmp"))
    for p in removed:
        p.unlink()
    return removed


class ShardSetWriter:
    """Writes raw WebDataset sample dicts (``__key__`` + bytes members) into rolling, indexed shards.

    Built on ``webdataset.ShardWriter`` with no encoder (members must already be bytes) and a fixed mtime
    so that identical samples give identical tar files. ``start_shard=None`` continues after the highest
    complete shard with this prefix already in ``out_dir``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "shard",
        maxcount: int = 10_000,
        maxsize: float = 1e9,
        start_shard: int | None = None,
        index: bool = True,
    ):
        if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
            raise ValueError(f"shard prefix must be [A-Za-z0-9_-]+, got {prefix!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if start_shard is None:
            existing = shard_numbers(self.out_dir, prefix)
            start_shard = existing[-1] + 1 if existing else 0
        self.index = index
        self.shards: list[Path] = []  # completed in this session
        self.samples_written = 0
        self._file = None
        self._closed = False
        pattern = str(self.out_dir / f"{prefix}-%06d.tar")
        self._sw = wds.ShardWriter(
            pattern, maxcount=maxcount, maxsize=maxsize, post=self._finish_shard, start_shard=start_shard,
            verbose=0, opener=self._open, encoder=False, mtime=0,
        )

    def _open(self, fname: str):
        self._file = open(fname + ".tmp", "wb")
        return self._file

    def _finish_shard(self, fname: str) -> None:
        # Called by ShardWriter once the tar stream of a shard is closed (the file object is ours to close).
        self._file.close()
        tmp = fname + ".tmp"
        if self._sw.count == 0:
            os.unlink(tmp)
            return
        os.replace(tmp, fname)
        if self.index:
            write_index(fname)
        self.shards.append(Path(fname))

    def write(self, raw: Mapping[str, Any]) -> None:
        """Write one sample dict; every member value must be bytes."""
        check_key(raw.get("__key__"))
        self._sw.write(dict(raw))
        self.samples_written += 1

    def close(self) -> list[Path]:
        """Finish the current shard; return the shards completed by this writer."""
        if not self._closed:
            self._closed = True
            self._sw.close()
        return self.shards

    def abort(self) -> None:
        """Drop the shard in progress (its samples are lost, completed shards stay)."""
        if not self._closed:
            self._closed = True
            tar, self._sw.tarstream = self._sw.tarstream, None
            if tar is not None:
                try:  # close the tar stream first, else it flushes into a closed file when collected
                    tar.close()
                except (OSError, ValueError, tarfile.TarError):
                    pass
            if self._file is not None and not self._file.closed:
                self._file.close()
                Path(self._file.name).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # On an error the shard in progress may be cut mid-sample: drop it rather than publish it.
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenShardWriter(ShardSetWriter):
    """A :class:`ShardSetWriter` for token samples of one :class:`ShardSpec`, validating each sample."""

    def __init__(self, out_dir: str | os.PathLike, spec: ShardSpec, prefix: str = "tokens", **kw):
        super().__init__(out_dir, prefix=prefix, **kw)
        self.spec = spec

    def write_sample(self, sample: TokenSample) -> None:
        """Validate and write one sample; raises :class:`SampleError` (naming key and field) on bad input."""
        if sample.spec != self.spec:
            msg = f"sample spec {sample.spec} != writer spec {self.spec}"
            raise SampleError(sample.key, "spec", msg, "spec_mismatch")
        self.write(encode_sample(sample))
