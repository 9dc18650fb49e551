"""The shard set checked in the driver before any Ray worker starts: one clear refusal instead of N worker logs.

Reads the first sample of (up to ``max_shards``, spread over the set) shards and the precompute ``manifest.json``
when there is one, and compares their layout (family, token layout, tokens per sample, vocabulary, condition)
and teacher fingerprint (:func:`dd2dist.data.identity.teacher_id`) with this run's teacher. A mismatch raises
:class:`ShardSetMismatch` naming the shard, the expected and the found values. Damaged shards are not refused
here (the stream skips and counts them); a set in which no checked shard has a readable first sample is.
Shards that are not checked, and samples after the first, stay the in-worker reader's job
(:mod:`dd2dist.data.tario`: foreign shards in a mixed set are refused there, one by one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from dd2dist.data.schema import SampleError, ShardSpec, decode_sample
from dd2dist.data.stats import DataStats
from dd2dist.data.stream import list_shards
from dd2dist.data.tario import iter_raw_samples

LAYOUT_KEYS = ("family", "layout", "num_tokens", "vocab_size", "cond", "num_classes", "text_shape")
PRECOMPUTE_MANIFEST = "manifest.json"  # written by dd2dist/pipelines/teacher_tokens.py


class ShardSetMismatch(ValueError):
    """Shards that this run's teacher cannot train on; the message names the shard and both sides."""


def spec_layout(spec: ShardSpec) -> dict:
    """The fields of :func:`dd2dist.data.identity.teacher_layout`, as one sample's spec states them."""
    return {"teacher_id": spec.teacher_id, "family": spec.family, "layout": spec.layout, "num_tokens": spec.num_tokens,
            "vocab_size": spec.vocab_size, "cond": spec.cond,
            "num_classes": spec.num_classes if spec.cond == "class" else None,
            "text_shape": spec.text_shape if spec.cond == "text" else None}


def describe(layout: dict) -> str:
    """``var var:1,2,4, 21 tokens/sample, vocab 64, 10 classes`` (what a person compares)."""
    cond = f"{layout['num_classes']} classes" if layout.get("cond") == "class" else "text-conditional"
    if layout.get("cond") == "text" and layout.get("text_shape"):
        slots, width = layout["text_shape"]
        cond += f" ({slots} caption slots x {width} features)"
    return (f"{layout['family']} {layout['layout'] or '(no layout)'}, {layout['num_tokens']} tokens/sample, "
            f"vocab {layout['vocab_size']}, {cond}")


def _spread(paths: list[str], n: int) -> list[str]:
    """At most ``n`` paths spread evenly over the list, first and last included."""
    if len(paths) <= n:
        return paths
    step = (len(paths) - 1) / (n - 1)
    return [paths[round(i * step)] for i in range(n)]


def _manifest_of(paths: list[str]) -> Path | None:
    parents = {Path(p).parent for p in paths}
    if len(parents) == 1 and (found := next(iter(parents)) / PRECOMPUTE_MANIFEST).is_file():
        return found
    return None


def _check_manifest(path: Path, expected: dict) -> list[str]:
    """Refuse a precompute manifest of another teacher; warnings (returned) for an unfinished precompute."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return [f"{path}: unreadable ({err}); not used"]
    found = manifest.get("teacher_id") or manifest.get("settings", {}).get("teacher_id")
    if found and found != expected["teacher_id"]:
        raise ShardSetMismatch(
            f"{path} says these shards were made by teacher {found}; this run's teacher is {expected['teacher_id']} "
            f"({describe(expected)}). Use shards precomputed with this config's teacher (jobs/precompute_teacher_"
            "tokens.py), or the config the shards were made with")
    if manifest.get("complete") is False:
        return [f"{path}: the precompute that wrote these shards did not finish (complete: false)"]
    return []


def check_shard_set(source: str | os.PathLike, expected: dict, max_shards: int = 32) -> dict:
    """Check a shard set against ``expected`` (:func:`dd2dist.data.identity.teacher_layout`).

    Returns ``{"shards", "checked", "unreadable", "warnings"}``; raises :class:`ShardSetMismatch` on the first
    shard of another layout or teacher, and FileNotFoundError when the set names no files.
    """
    paths = list_shards(source)
    checked, unreadable, warnings = _spread(paths, max_shards), [], []
    read = 0
    for path in checked:
        raws = list(iter_raw_samples(path, DataStats(), max_samples=1))
        if not raws:
            unreadable.append(path)
            continue
        key = raws[0].get("__key__", "?")
        try:
            found = spec_layout(decode_sample(raws[0]).spec)
        except SampleError as err:
            unreadable.append(path)
            warnings.append(f"{path}: first sample unusable ({err})")
            continue
        read += 1
        if any(found[k] != expected[k] for k in LAYOUT_KEYS):
            differ = ", ".join(f"{k} {found[k]!r} != {expected[k]!r}" for k in LAYOUT_KEYS if found[k] != expected[k])
            raise ShardSetMismatch(
                f"shard {path} (sample {key}) holds another token layout: {describe(found)} (teacher "
                f"{found['teacher_id']}); this run's teacher expects {describe(expected)} (teacher "
                f"{expected['teacher_id']}) [{differ}]")
        if found["teacher_id"] != expected["teacher_id"]:
            raise ShardSetMismatch(
                f"shard {path} (sample {key}) was made by teacher {found['teacher_id']}, this run's teacher is "
                f"{expected['teacher_id']} (same layout: {describe(expected)}). The fingerprint covers the "
                "architecture, the checkpoint files' names and sizes, and the seed of a randomly initialised "
                "teacher (dd2dist.data.identity.teacher_id)")
    manifest = _manifest_of(paths)  # after the shards: a refusal names a shard when one is foreign
    warnings += _check_manifest(manifest, expected) if manifest else []
    if not read:
        raise ShardSetMismatch(f"none of the {len(checked)} shards checked has a readable first sample (e.g. "
                               f"{checked[0]}); python -m data_pipelines.validate {Path(checked[0]).parent} says why")
    return {"shards": len(paths), "checked": len(checked), "unreadable": unreadable, "warnings": warnings}


def check_caption_shards(source: str | os.PathLike, text_shape: tuple[int, int], max_shards: int = 32) -> int:
    """Text-conditional token shards used only for their captions (``data.captions``): the first sample of (up
    to ``max_shards``) shards must hold captions of ``text_shape`` (T slots, Dt features). Any teacher's shards
    will do: only the captions are read. Returns the number of shards; raises :class:`ShardSetMismatch` naming
    the first shard of another caption layout, or one whose first sample does not decode."""
    paths = list_shards(source)
    want = tuple(text_shape)
    for path in _spread(paths, max_shards):
        raws = list(iter_raw_samples(path, DataStats(), max_samples=1))
        if not raws:
            raise ShardSetMismatch(f"shard {path} has no readable sample (python -m data_pipelines.validate says why)")
        try:
            spec = decode_sample(raws[0]).spec
        except SampleError as err:
            raise ShardSetMismatch(f"shard {path}: {err}") from None
        found = spec.text_shape if spec.cond == "text" else None
        if found != want:
            what = "class-conditional samples" if found is None else f"captions of {found[0]} slots x {found[1]}"
            raise ShardSetMismatch(f"shard {path} (sample {raws[0].get('__key__', '?')}) holds {what}; the teacher "
                                   f"reads {want[0]} caption slots x {want[1]} features")
    return len(paths)
