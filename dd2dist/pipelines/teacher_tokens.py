"""Teacher-token shards: sample the teacher with the distillation-target settings across Ray workers.

Determinism: samples are generated in fixed *blocks* of ``batch_size`` consecutive indices; block ``b`` is one
``teacher.sample`` call with a generator seeded from ``(seed, b)`` and the labels of its indices. Which worker
runs a block does not matter, so the output is the same for any number of workers (a per-sample generator
would need batch-1 sampling, far too slow for the real teachers). Sample ``i`` has key ``s<i:09d>``; its label
is ``labels[i]`` from a label-list file, or class-balanced: indices are taken in groups of ``num_classes``,
each group a seeded permutation of all classes (balanced to within one for any count, and independent of it).
A text-conditional teacher is conditioned on a caption set instead (``captions``: a caption shard directory of
``dd2dist.data.caption_shards``, M captions in key order): sample ``i`` gets caption ``i mod M``, so every
caption is used equally often (to within one) and a sample's caption does not depend on the sample count; the
caption's key is recorded in the sample's ``meta.json`` (``caption_key``) and its features in the sample.
Bit-identical output additionally needs the same device type and torch build (CPU and CUDA kernels differ).
The teacher runs in fp32 (``teacher.dtype`` is not applied here).

Resume: workers write complete shards only (``.tar.tmp`` renamed when done, then its ``.idx``); a rerun with
the same settings lists the keys already present from the ``.idx`` files, deletes stale ``.tmp`` files,
regenerates only the blocks with missing keys and writes only the missing samples. ``manifest.json`` is written
first (``complete: false``, with the settings a resume must match) and rewritten at the end with the counts,
the label histogram and a check that every key ``0..N-1`` is present exactly once.

Ray: with ``RAY_ADDRESS`` set the actors run on that cluster, and ``output`` must then be storage that every
node sees at the same path (the workers write their shards directly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dd2dist.data.caption_shards import CaptionSet, read_caption_shards
from dd2dist.data.identity import teacher_id, teacher_spec
from dd2dist.data.schema import TokenSample, current_sampling_names, sampling_dict
from dd2dist.data.writer import TokenShardWriter, read_index_keys, remove_partial_shards
from dd2dist.teachers import build_seeded_teacher

log = logging.getLogger("dd2dist.data")
MANIFEST = "manifest.json"


def sample_key(index: int) -> str:
    return f"s{index:09d}"


def key_index(key: str) -> int:
    if not (key.startswith("s") and key[1:].isdigit()):
        raise ValueError(f"not a precompute sample key: {key!r}")
    return int(key[1:])


def seeded_balanced_labels(seed: int, num_classes: int, num_samples: int) -> np.ndarray:
    """Labels where each consecutive group of ``num_classes`` indices is a seeded permutation of all classes."""
    groups = -(-num_samples // num_classes)
    perms = [np.random.default_rng([seed, 7, g]).permutation(num_classes) for g in range(groups)]
    return np.concatenate(perms)[:num_samples].astype(np.int64) if perms else np.zeros(0, np.int64)


def load_label_file(path: str, num_samples: int, num_classes: int) -> np.ndarray:
    """One integer class label per line (``#`` comments and blank lines ignored); the first N are used."""
    labels = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            y = int(line)
        except ValueError:
            raise ValueError(f"{path}:{n}: label {line!r} is not an integer") from None
        if not 0 <= y < num_classes:
            raise ValueError(f"{path}:{n}: label {y} outside [0, {num_classes})")
        labels.append(y)
    if len(labels) < num_samples:
        raise ValueError(f"{path}: {len(labels)} labels, fewer than --num-samples {num_samples}")
    return np.asarray(labels[:num_samples], dtype=np.int64)


def block_seed(seed: int, block: int) -> int:
    """The torch generator seed of block ``block`` (recorded as ``seed`` in each sample's meta.json)."""
    return int(np.random.SeedSequence([seed, block]).generate_state(1, dtype=np.uint64)[0] >> 1)


def existing_keys(out_dir: str | os.PathLike) -> dict[str, str]:
    """key -> shard for every complete shard (by its ``.idx``); ValueError on a key present twice."""
    found: dict[str, str] = {}
    for tar in sorted(Path(out_dir).glob("*.tar")):
        idx = tar.with_suffix(".idx")
        if not idx.exists():
            raise ValueError(f"{tar}: complete shard without its index {idx.name}; rerun validation/indexing")
        for key in read_index_keys(idx):
            if key in found:
                raise ValueError(f"duplicate sample {key} in {found[key]} and {tar}")
            found[key] = str(tar)
    return found


@dataclass(frozen=True)
class Settings:
    """What fixes the content of a precompute output; a resume must match it (``num_samples`` may grow)."""

    teacher_id: str
    seed: int
    batch_size: int
    sampling: dict
    labels: str  # "balanced", "file:<sha256 of the label file>" or "captions"
    captions: str | None = None  # the caption set's fingerprint (CaptionSet.fingerprint) when conditioned on one


@dataclass(frozen=True)
class CaptionBlock:
    """The text conditions of one block: caption features (n, T, Dt) float16, masks (n, T) bool, caption keys."""

    text: np.ndarray
    mask: np.ndarray
    keys: list[str] = field(default_factory=list)


def caption_block(captions: CaptionSet, indices: range) -> CaptionBlock:
    """The captions of sample ``indices``: sample ``i`` takes caption ``i mod M`` (see the module docstring)."""
    rows = np.arange(indices.start, indices.stop) % len(captions)
    return CaptionBlock(captions.text[rows], captions.mask[rows], [captions.keys[r] for r in rows])


class TokenSampler:
    """One precompute worker: holds a teacher, samples blocks and writes its own shard set."""

    def __init__(self, cfg: Any, out_dir: str, worker: int, shard_size: int, threads: int = 1):
        import torch

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.teacher = build_seeded_teacher(cfg.teacher, cfg.seed).to(self.device)
        self.sampling = cfg.teacher.sampling
        self.spec = teacher_spec(self.teacher, teacher_id(cfg.teacher, cfg.seed), self.sampling)
        self.out_dir, self.worker, self.shard_size = out_dir, worker, shard_size

    def run(self, blocks: list[int], conds: dict[int, np.ndarray | CaptionBlock], done: set[str], seed: int,
            batch_size: int) -> dict:
        """Sample ``blocks`` (class labels or a :class:`CaptionBlock` per block), write the samples whose key is
        not in ``done``."""
        import torch

        from dd2dist.conditions import Cond

        written, t0 = 0, time.perf_counter()
        prefix = f"tokens-w{self.worker:03d}"
        with TokenShardWriter(self.out_dir, self.spec, prefix=prefix, maxcount=self.shard_size) as w:
            for b in blocks:
                c = conds[b]
                gen = torch.Generator(self.device).manual_seed(block_seed(seed, b))
                if isinstance(c, CaptionBlock):
                    cond = Cond(text=torch.from_numpy(c.text.astype(np.float32)).to(self.device),
                                text_mask=torch.from_numpy(c.mask).to(self.device))
                else:
                    cond = Cond(labels=torch.tensor(c, dtype=torch.long, device=self.device))
                ids = self.teacher.sample(cond, self.sampling, gen).cpu().numpy()
                for j in range(len(ids)):
                    i = b * batch_size + j
                    if sample_key(i) in done:
                        continue
                    if isinstance(c, CaptionBlock):
                        sample = TokenSample(sample_key(i), ids[j], self.spec, text=c.text[j], text_mask=c.mask[j],
                                             caption_key=c.keys[j], seed=block_seed(seed, b), index=i)
                    else:
                        sample = TokenSample(sample_key(i), ids[j], self.spec, label=int(c[j]),
                                             seed=block_seed(seed, b), index=i)
                    w.write_sample(sample)
                    written += 1
        return {"worker": self.worker, "written": written, "seconds": time.perf_counter() - t0,
                "shards": [str(p) for p in w.shards]}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _check_resume(out: Path, settings: Settings) -> None:
    path = out / MANIFEST
    if not path.exists():
        return
    old = json.loads(path.read_text()).get("settings", {})
    if isinstance(old.get("sampling"), dict):
        old["sampling"] = current_sampling_names(old["sampling"])
    for k, v in asdict(settings).items():
        if old.get(k) != v:
            raise ValueError(
                f"{path}: output was made with {k}={old.get(k)!r}, this run has {k}={v!r}; use another --output "
                "or the original settings"
            )


def precompute_teacher_tokens(
    cfg: Any,
    num_samples: int,
    output: str | os.PathLike,
    workers: int = 1,
    batch_size: int | None = None,
    label_file: str | None = None,
    shard_size: int = 1000,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    captions: str | os.PathLike | None = None,
) -> dict:
    """Sample ``num_samples`` teacher sequences into ``output`` with ``workers`` Ray actors; return the manifest.

    Joins the Ray cluster of ``RAY_ADDRESS`` (or the already initialised one), else starts an embedded local
    Ray for the call. ``batch_size`` defaults to ``cfg.data.batch_size``. A text-conditional teacher needs
    ``captions``, a caption shard directory whose text shape is the teacher's ``(cls_token_num, caption_dim)``.
    """
    import ray

    from dd2dist.launch.ray_env import init_local_ray

    if num_samples <= 0 or workers <= 0 or shard_size <= 0:
        raise ValueError(f"--num-samples, --workers, --shard-size must be > 0: {num_samples}, {workers}, {shard_size}")
    caption_set = load_captions_for(cfg, captions, label_file)
    batch_size = int(batch_size or cfg.data.batch_size)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tid = teacher_id(cfg.teacher, cfg.seed)
    label_src = "balanced"
    if label_file:
        label_src = "file:" + hashlib.sha256(Path(label_file).read_bytes()).hexdigest()[:16]
    if caption_set is not None:
        label_src = "captions"
    settings = Settings(tid, int(cfg.seed), batch_size, sampling_dict(cfg.teacher.sampling), label_src,
                        None if caption_set is None else caption_set.fingerprint())
    _check_resume(out, settings)
    for p in remove_partial_shards(out):
        log.warning("precompute: removed partial shard %s left by an interrupted run", p)
    done = existing_keys(out)
    extra = [k for k in done if key_index(k) >= num_samples]
    if extra:
        raise ValueError(f"{out}: holds {len(extra)} samples beyond --num-samples {num_samples} (e.g. {extra[0]})")

    started = init_local_ray(num_cpus=max(2, int(workers * cpus_per_worker)))
    try:
        labels = None
        if caption_set is None:
            num_classes = _num_classes(cfg)
            labels = load_label_file(label_file, num_samples, num_classes) if label_file else seeded_balanced_labels(
                cfg.seed, num_classes, num_samples)
        _write_json(out / MANIFEST, {"complete": False, "settings": asdict(settings), "num_samples": num_samples})
        num_blocks = -(-num_samples // batch_size)
        block_range = lambda b: range(b * batch_size, min(num_samples, (b + 1) * batch_size))
        todo = [b for b in range(num_blocks) if any(sample_key(i) not in done for i in block_range(b))]
        log.info("precompute: %d of %d samples present, %d blocks to sample on %d workers",
                 len(done), num_samples, len(todo), workers)
        results = []
        if todo:
            Actor = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker)(TokenSampler)
            parts = [list(p) for p in np.array_split(np.asarray(todo), min(workers, len(todo)))]
            threads = max(1, int(cpus_per_worker))
            actors = [Actor.remote(cfg, str(out), w, shard_size, threads) for w in range(len(parts))]
            done_set = set(done)
            futures = []
            for actor, part in zip(actors, parts):
                if caption_set is None:
                    block_conds = {int(b): labels[block_range(b).start : block_range(b).stop] for b in part}
                else:
                    block_conds = {int(b): caption_block(caption_set, block_range(b)) for b in part}
                keys = {sample_key(i) for b in part for i in block_range(b)} & done_set
                futures.append(actor.run.remote([int(b) for b in part], block_conds, keys, int(cfg.seed), batch_size))
            # Free each actor's CPU/GPU as soon as its part is done: on a cluster smaller than the requested
            # worker count the remaining actors are pending on those resources.
            owner = dict(zip(futures, actors))
            pending = list(futures)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                results.append(ray.get(ready[0]))
                ray.kill(owner[ready[0]])
            results.sort(key=lambda r: r["worker"])
    finally:
        if started:
            ray.shutdown()
    caption_info = None
    if caption_set is not None:
        caption_info = {"directory": str(captions), "count": len(caption_set), "encoder": caption_set.encoder,
                        "text_shape": list(caption_set.text_shape), "fingerprint": caption_set.fingerprint(),
                        "skipped_shards": list(caption_set.skipped)}
    return finalize_manifest(out, settings, num_samples, labels, results, caption_info)


def teacher_text_shape(cfg: Any) -> tuple[int, int] | None:
    """(cls_token_num, caption_dim) of a text-conditional teacher config, None for a class-conditional one."""
    if cfg.teacher.family != "llamagen":
        return None
    arch = cfg.teacher.arch
    return (int(arch.cls_token_num), int(arch.caption_dim)) if arch.caption_dim > 0 else None


def load_captions_for(cfg: Any, captions: str | os.PathLike | None, label_file: str | None) -> CaptionSet | None:
    """The caption set a text-conditional teacher is sampled with, checked against the teacher before any work;
    None for a class-conditional teacher. Refuses a missing or mismatched caption set, and captions for a
    class-conditional teacher."""
    shape = teacher_text_shape(cfg)
    if shape is None:
        if captions is not None:
            raise ValueError(f"--captions {captions}: the teacher is class-conditional (teacher.{cfg.teacher.family}"
                             ".num_classes); caption conditions are for text-conditional teachers")
        return None
    if captions is None:
        raise ValueError("the teacher is text-conditional (caption_dim > 0): pass --captions DIR, a caption shard "
                         "directory written by jobs/encode_captions.py")
    if label_file:
        raise ValueError("--labels is for class-conditional teachers; a text-conditional teacher takes --captions")
    caption_set = read_caption_shards(captions)
    if caption_set.text_shape != shape:
        raise ValueError(f"--captions {captions}: caption features have text shape {caption_set.text_shape}, the "
                         f"teacher reads (cls_token_num, caption_dim) = {shape}; encode the captions for this teacher")
    return caption_set


def _num_classes(cfg: Any) -> int:
    if cfg.teacher.official:
        from dd2dist.teachers.arch import OFFICIAL_ARCHS

        return int(OFFICIAL_ARCHS[cfg.teacher.official].num_classes)
    return int(getattr(cfg.teacher, cfg.teacher.family).num_classes)


def finalize_manifest(out: Path, settings: Settings, num_samples: int, labels: np.ndarray | None,
                      results: list[dict], captions: dict | None = None) -> dict:
    """Check that keys 0..N-1 are present exactly once and write the final ``manifest.json``; ``labels`` is None
    for a caption-conditioned run, whose caption set is described by ``captions``."""
    present = existing_keys(out)
    missing = [i for i in range(num_samples) if sample_key(i) not in present]
    if missing:
        raise RuntimeError(f"{out}: {len(missing)} samples missing after precompute, e.g. {sample_key(missing[0])}")
    hist = Counter() if labels is None else Counter(int(labels[key_index(k)]) for k in present)
    shards = sorted({Path(s).name for s in present.values()})
    manifest = {
        "complete": True,
        "settings": asdict(settings),
        "teacher_id": settings.teacher_id,
        "num_samples": num_samples,
        "num_shards": len(shards),
        "shards": shards,
        "label_histogram": {str(k): hist[k] for k in sorted(hist)},
        "this_run": {"written": sum(r["written"] for r in results),
                     "workers": [{k: r[k] for k in ("worker", "written", "seconds")} for r in results]},
    }
    if captions is not None:
        manifest["captions"] = captions
    _write_json(out / MANIFEST, manifest)
    return manifest
