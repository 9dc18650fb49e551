"""Encoding captions into caption shards (:mod:`dd2dist.data.caption_shards`) across Ray workers.

Determinism: the records are put in key order and cut into shards of ``shard_size`` consecutive records; shard
``b`` always holds the same records, is encoded in the same batches of ``batch_size`` and is written as
``captions-<b>.tar`` by whichever worker got it. The output files are therefore identical for any number of
workers (an encoder whose output depends on the batch it runs in, like T5 with padding, still sees the same
batches).

An output directory is tied to its encoder and its records through ``captions.json``: another encoder, other
records or another shard size is refused naming the directory; a complete identical set is reused without any
work; an incomplete one (an interrupted run) is resumed, encoding only the shards that are not there.

Ray: with ``RAY_ADDRESS`` set the actors run on that cluster, and ``output`` must then be storage that every node
sees at the same path (the workers write their shards directly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from dd2dist.data.caption_shards import (
    CAPTIONS_JSON,
    caption_sample,
    read_captions_json,
    shard_name,
    write_caption_shard,
)
from dd2dist.data.schema import check_key
from dd2dist.data.writer import read_index_keys, remove_partial_shards
from dd2dist.text import build_text_encoder, text_encoder_identity

log = logging.getLogger("dd2dist.data")


def check_records(records: list[dict]) -> list[dict]:
    """Records in key order; ValueError naming the record on a bad or duplicate key, a non-string caption or a
    field that JSON cannot hold."""
    seen: dict[str, int] = {}
    for n, r in enumerate(records):
        if not isinstance(r, dict) or "key" not in r or "caption" not in r:
            raise ValueError(f"caption record {n}: needs 'key' and 'caption', got {r!r}"[:300])
        try:
            check_key(r["key"])
        except ValueError as e:
            raise ValueError(f"caption record {n}: {e}") from None
        if r["key"] in seen:
            raise ValueError(f"caption record {n}: key {r['key']!r} already used by record {seen[r['key']]}")
        seen[r["key"]] = n
        if not isinstance(r["caption"], str):
            raise ValueError(f"caption record {n} ({r['key']}): caption must be a string")
        try:
            json.dumps(r)
        except (TypeError, ValueError) as e:
            raise ValueError(f"caption record {n} ({r['key']}): not JSON-serialisable: {e}") from None
    return sorted(records, key=lambda r: r["key"])


def records_fingerprint(records: list[dict]) -> str:
    """A hash of the (key-ordered) records, all fields included: the info travels into the shards too."""
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def load_caption_records(path: str | os.PathLike) -> list[dict]:
    """One JSON object per line (blank lines ignored); errors name the file and line."""
    records = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object: {e}") from None
        if not isinstance(records[-1], dict):
            raise ValueError(f"{path}:{n}: not a JSON object")
    return records


class CaptionEncoderWorker:
    """One encoding worker: builds the encoder once and writes whole shards."""

    def __init__(self, encoder_spec: str, out_dir: str, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        # a worker given a GPU (gpus_per_worker > 0) runs the encoder there: FLAN-T5-XL on CPU is far too slow
        self.encoder = build_text_encoder(encoder_spec, device="cuda" if torch.cuda.is_available() else "cpu")
        self.out_dir = out_dir

    def run(self, shards: dict[int, list[dict]], batch_size: int) -> dict:
        t0, written = time.perf_counter(), 0
        shape = (self.encoder.slots, self.encoder.width)
        for number in sorted(shards):
            records, samples = shards[number], []
            for start in range(0, len(records), batch_size):
                batch = records[start : start + batch_size]
                text, mask = self.encoder.encode([r["caption"] for r in batch])
                text, mask = text.numpy(), mask.numpy()
                for j, r in enumerate(batch):
                    info = {k: v for k, v in r.items() if k not in ("key", "caption")}
                    samples.append(caption_sample(r["key"], r["caption"], text[j], mask[j], info, shape))
            write_caption_shard(self.out_dir, number, samples)
            written += len(samples)
        return {"written": written, "shards": len(shards), "seconds": time.perf_counter() - t0}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _done_shards(out: Path, expected: dict[int, list[str]]) -> set[int]:
    """Shards already written with exactly their records' keys (by the ``.idx``)."""
    done = set()
    for number, keys in expected.items():
        idx = out / shard_name(number).replace(".tar", ".idx")
        if (out / shard_name(number)).is_file() and idx.is_file() and read_index_keys(idx) == keys:
            done.add(number)
    return done


def encode_captions(
    records: list[dict],
    encoder_spec: str,
    output: str | os.PathLike,
    workers: int = 1,
    batch_size: int = 256,
    shard_size: int = 1000,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> dict:
    """Encode ``records`` (dicts with "key", "caption" and any other fields, which go to ``info.json``) with the
    encoder ``encoder_spec`` into caption shards in ``output`` on ``workers`` Ray actors; return ``captions.json``.
    """
    import ray

    from dd2dist.launch.ray_env import init_local_ray

    if workers <= 0 or batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"--workers, --batch-size, --shard-size must be > 0: {workers}, {batch_size}, {shard_size}")
    records = check_records(records)
    if not records:
        raise ValueError("encode_captions: no caption records")
    name, slots, width = text_encoder_identity(encoder_spec)
    settings = {"encoder": name, "text_shape": [slots, width], "records": records_fingerprint(records),
                "count": len(records), "shard_size": int(shard_size)}
    out = Path(output)
    if (out / CAPTIONS_JSON).exists():
        old = read_captions_json(out)
        for k, v in settings.items():
            if old.get(k) != v:
                raise ValueError(f"{out}: caption shards made with {k}={old.get(k)!r}, this run has {k}={v!r}; "
                                 "use another --output")
        if old.get("complete"):
            log.info("captions: %s already holds this caption set", out)
            return {**old, "this_run": {"written": 0, "workers": []}}
    out.mkdir(parents=True, exist_ok=True)
    for p in remove_partial_shards(out):
        log.warning("captions: removed partial shard %s left by an interrupted run", p)
    shards = {b: records[i : i + shard_size] for b, i in enumerate(range(0, len(records), shard_size))}
    names = [shard_name(b) for b in shards]
    stray = sorted(p.name for p in out.glob("*.tar") if p.name not in names)
    if stray:
        raise ValueError(f"{out}: holds shards this caption set does not have, e.g. {stray[0]}; use another --output")
    manifest = {**settings, "complete": False, "encoder_spec": encoder_spec, "shards": names}
    _write_json(out / CAPTIONS_JSON, manifest)
    done = _done_shards(out, {b: [r["key"] for r in rs] for b, rs in shards.items()})
    todo = [b for b in shards if b not in done]
    log.info("captions: %d of %d shards present, %d to encode on %d workers", len(done), len(shards), len(todo),
             workers)
    results = []
    if todo:
        started = init_local_ray(num_cpus=max(2, int(workers * cpus_per_worker)))
        try:
            Actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(CaptionEncoderWorker)
            parts = [list(p) for p in np.array_split(np.asarray(todo), min(workers, len(todo)))]
            threads = max(1, int(cpus_per_worker))
            actors = [Actor.remote(encoder_spec, str(out), threads) for _ in parts]
            futures = [a.run.remote({int(b): shards[int(b)] for b in part}, batch_size)
                       for a, part in zip(actors, parts)]
            owner = dict(zip(futures, range(len(actors))))
            pending = list(futures)
            while pending:  # free each actor as soon as its part is done (a small cluster runs the rest)
                ready, pending = ray.wait(pending, num_returns=1)
                results.append({"worker": owner[ready[0]], **ray.get(ready[0])})
                ray.kill(actors[owner[ready[0]]])
        finally:
            if started:
                ray.shutdown()
    missing = [n for n in names if not (out / n).is_file()]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} caption shards missing after encoding, e.g. {missing[0]}")
    manifest = {**manifest, "complete": True}
    _write_json(out / CAPTIONS_JSON, manifest)
    results.sort(key=lambda r: r["worker"])
    return {**manifest, "this_run": {"written": sum(r["written"] for r in results), "workers": results}}
