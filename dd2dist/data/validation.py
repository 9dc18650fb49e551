"""A full scan of a directory of token shards, as a JSON-able report of everything that is wrong.

Reads every sample of every ``*.tar`` through the same decoder as training, and checks each shard's ``.idx``
against the tar. The report holds ``{"shards", "samples", "corrupt", "skipped_samples", "refused_shards",
"errors": [...], "label_histogram", "teacher_ids", ..., "ok"}``. The command line is
``python -m data_pipelines.validate DIR``; the cheap check before a launch is :mod:`dd2dist.data.precheck`.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from dd2dist.data.stats import DataStats
from dd2dist.data.tario import iter_shard_samples
from dd2dist.data.writer import read_index_keys


def validate_dir(directory: str | os.PathLike, teacher_id: str | None = None, max_errors: int = 100) -> dict:
    """The validation report of every shard in ``directory`` (see the module docstring); ``ok`` says clean."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory")
    stats = DataStats(keep_events=max_errors)
    labels: Counter[int] = Counter()
    teachers: Counter[str] = Counter()
    layouts: Counter[str] = Counter()
    keys_seen: dict[str, str] = {}
    errors: list[dict] = []
    shards = sorted(d.glob("*.tar"))
    samples = 0
    for tar in shards:
        keys = []
        before = stats.snapshot()
        for s in iter_shard_samples(str(tar), stats, {"teacher_id": teacher_id} if teacher_id else None):
            samples += 1
            keys.append(s.key)
            teachers[s.spec.teacher_id] += 1
            layouts[f"{s.spec.family} {s.spec.layout} tokens={list(s.spec.token_shape)} vocab={s.spec.vocab_size} "
                    f"cond={s.spec.cond} text={s.spec.text_shape} source={s.spec.source}"] += 1
            if s.label is not None:
                labels[s.label] += 1
            if s.key in keys_seen:
                errors.append({"shard": str(tar), "key": s.key, "kind": "duplicate_key",
                               "message": f"also in {keys_seen[s.key]}"})
            keys_seen[s.key] = str(tar)
        damaged = stats.snapshot() != {**before, "shards_read": before.get("shards_read", 0) + 1}
        idx = tar.with_suffix(".idx")
        if not idx.exists():
            errors.append({"shard": str(tar), "key": None, "kind": "missing_index", "message": f"{idx.name} not found"})
        elif not damaged:
            try:
                idx_keys = read_index_keys(idx)
            except ValueError as e:
                errors.append({"shard": str(tar), "key": None, "kind": "bad_index", "message": str(e)})
            else:
                if idx_keys != keys:
                    errors.append({"shard": str(tar), "key": None, "kind": "bad_index",
                                   "message": f"index lists {len(idx_keys)} samples, tar has {len(keys)} valid"})
    if len(teachers) > 1:
        msg = f"teacher ids {dict(teachers)}"
        errors.append({"shard": None, "key": None, "kind": "mixed_teachers", "message": msg})
    if len(layouts) > 1:
        errors.append({"shard": None, "key": None, "kind": "mixed_layouts", "message": f"layouts {dict(layouts)}"})
    partial = sorted(p.name for p in d.glob("*.tmp"))
    counts = stats.snapshot()
    report = {
        "directory": str(d),
        "shards": len(shards),
        "samples": samples,
        "corrupt": counts.get("shards_corrupt", 0),
        "refused_shards": counts.get("shards_refused", 0),
        "skipped_samples": counts.get("samples_skipped", 0),
        "skipped_by_kind": {k[len("skipped_"):]: v for k, v in sorted(counts.items()) if k.startswith("skipped_")},
        "partial_files": partial,
        "errors": (stats.events + errors)[:max_errors],
        "num_errors": len(stats.events) + len(errors),
        "label_histogram": {str(k): labels[k] for k in sorted(labels)},
        "teacher_ids": dict(teachers),
        "layouts": dict(layouts),
    }
    report["ok"] = bool(shards) and not (
        report["corrupt"] or report["refused_shards"] or report["skipped_samples"] or errors or partial
    )
    if not shards:
        report["errors"].append({"shard": None, "key": None, "kind": "no_shards", "message": f"no *.tar in {d}"})
    return report
