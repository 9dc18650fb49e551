"""Real-image token shards: DALI decodes and preprocesses image shards, the teacher's VQ encoder tokenises them.

    image shards (``<key>.jpg|png`` + ``label.i64``, with ``.idx``)
      -> fn.readers.webdataset -> fn.decoders.image (``cpu``; ``mixed`` = nvJPEG when a GPU is present)
      -> fn.resize (shorter side to the teacher's resolution, antialiased) -> fn.crop_mirror_normalize (centre
         crop, CHW, (x - 127.5) / 127.5 = [-1, 1]) -> teacher.encode -> token shards (``source: real``)

The reader runs unshuffled over the shards in order, so output ``i`` is sample ``i`` of the shards' indexes:
the keys come from the ``.idx`` files, and the label DALI read is checked against the label of that key.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dd2dist.data.identity import teacher_id, teacher_spec
from dd2dist.data.schema import TokenSample
from dd2dist.data.stream import list_shards
from dd2dist.data.writer import TokenShardWriter, index_path, read_index_keys, write_index
from dd2dist.pipelines.teacher_tokens import _write_json
from dd2dist.teachers import build_seeded_teacher

log = logging.getLogger("dd2dist.data")


def _gpu_available() -> bool:
    import torch

    return torch.cuda.is_available()


def ensure_indexes(shards: list[str]) -> list[str]:
    """The ``.idx`` of each shard, written when missing (DALI needs them for random access and sizes)."""
    out = []
    for s in shards:
        idx = index_path(s)
        if not idx.exists():
            log.info("tokenize: writing missing index %s", idx)
            write_index(s)
        out.append(str(idx))
    return out


def build_image_pipeline(
    shards: list[str],
    index_files: list[str],
    size: int,
    batch_size: int,
    num_threads: int = 2,
    device: str = "auto",
):
    """The DALI pipeline -> (images float (B, 3, size, size) in [-1, 1], labels int64 (B, 1)); ``device`` is
    ``cpu``, ``gpu`` (mixed decode, GPU resize) or ``auto`` (gpu when CUDA is available)."""
    from nvidia.dali import fn, pipeline_def, types

    use_gpu = _gpu_available() if device == "auto" else device == "gpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=0 if use_gpu else None,
                  prefetch_queue_depth=2)
    def pipe():
        jpegs, labels = fn.readers.webdataset(
            paths=shards, index_paths=index_files, ext=["jpg;jpeg;png", "label.i64"],
            dtypes=[types.UINT8, types.INT64], missing_component_behavior="error", random_shuffle=False,
            pad_last_batch=True, name="reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if use_gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_shorter=size, antialias=True, interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(
            images, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, mean=[127.5] * 3, std=[127.5] * 3,
            dtype=types.FLOAT, output_layout="CHW",
        )
        return images, labels

    p = pipe()
    p.build()
    return p


def iter_dali_images(shards: list[str], size: int, batch_size: int, num_threads: int = 2, device: str = "auto"):
    """Yield (keys, images torch float (B, 3, size, size), labels torch long (B,)) in shard order."""
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    index_files = ensure_indexes(shards)
    keys = [k for idx in index_files for k in read_index_keys(idx)]
    pipe = build_image_pipeline(shards, index_files, size, batch_size, num_threads, device)
    it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                             last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
    pos = 0
    for out in it:
        images, labels = out[0]["images"], out[0]["labels"].reshape(-1).long()
        n = images.shape[0]
        yield keys[pos : pos + n], images, labels
        pos += n
    if pos != len(keys):
        raise RuntimeError(f"DALI produced {pos} images for {len(keys)} indexed samples")


def _teacher_image_size(teacher) -> int:
    import torch

    with torch.no_grad():
        ids = torch.zeros(1, teacher.num_tokens, dtype=torch.long, device=next(teacher.parameters()).device)
        return int(teacher.decode(ids).shape[-1])


def tokenize_images(
    cfg: Any,
    images: str | os.PathLike | list[str],
    output: str | os.PathLike,
    image_size: int | None = None,
    batch_size: int = 32,
    num_threads: int = 2,
    shard_size: int = 1000,
    device: str = "auto",
) -> dict:
    """Encode every image of the image shards ``images`` with the config's teacher tokenizer into token shards.

    Returns a summary (counts, label histogram, teacher id, images/s). Keys are kept from the image shards.
    """
    import torch

    shards = list_shards(images)
    out = Path(output)
    if out.exists() and any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds shards; tokenisation starts from an empty --output directory")
    teacher = build_seeded_teacher(cfg.teacher, cfg.seed)
    dev = "cuda" if (device == "gpu" or (device == "auto" and _gpu_available())) else "cpu"
    teacher = teacher.to(dev)
    size = image_size or _teacher_image_size(teacher)
    tid = teacher_id(cfg.teacher, cfg.seed)
    spec = teacher_spec(teacher, tid, sampling=None, source="real")
    hist: dict[int, int] = {}
    n, t0 = 0, time.perf_counter()
    label_by_key = _labels_by_key(shards)
    with TokenShardWriter(out, spec, prefix="real", maxcount=shard_size) as w:
        for keys, imgs, labels in iter_dali_images(shards, size, batch_size, num_threads, device):
            for k, y in zip(keys, labels.tolist()):
                if label_by_key[k] != y:
                    msg = f"DALI output out of step with the index: {k} has label {label_by_key[k]}, got {y}"
                    raise RuntimeError(msg)
                if not 0 <= y < teacher.num_classes:
                    raise ValueError(f"image {k}: label {y} outside [0, {teacher.num_classes}) of the teacher")
            with torch.no_grad():
                ids = teacher.encode(imgs.to(dev)).cpu().numpy()
            for k, y, row in zip(keys, labels.tolist(), ids):
                w.write_sample(TokenSample(k, row, spec, label=int(y)))
                hist[y] = hist.get(y, 0) + 1
            n += len(keys)
    seconds = time.perf_counter() - t0
    summary = {
        "complete": True, "teacher_id": tid, "num_samples": n, "image_size": size, "source_shards": shards,
        "num_shards": len(w.shards), "label_histogram": {str(k): hist[k] for k in sorted(hist)},
        "images_per_s": n / seconds if seconds > 0 else None, "device": dev,
    }
    _write_json(out / "manifest.json", summary)
    return summary


def _labels_by_key(shards: list[str]) -> dict[str, int]:
    """label.i64 of every sample, read through the index offsets (8 bytes each, no decoding)."""
    labels = {}
    for s in shards:
        lines = index_path(s).read_text().splitlines()[1:]
        with open(s, "rb") as f:
            for line in lines:
                parts = line.split()
                comps = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
                key = parts[3].split(".", 1)[0]
                if "label.i64" not in comps:
                    raise ValueError(f"{s}: sample {key} has no label.i64")
                off, size = comps["label.i64"]
                f.seek(off)
                labels[key] = int(np.frombuffer(f.read(size), dtype="<i8")[0])
    return labels
