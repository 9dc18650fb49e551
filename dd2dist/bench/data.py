"""Data benchmark (``python jobs/benchmark.py data``): streaming rate, DALI vs PIL decoding, teacher sampling on Ray.

1. Streaming: samples/s of one rank's :class:`TokenStream` over VAR-d16-shaped token shards (680 int16 ids,
   vocabulary 4096), in-process and with one loader process, against the paper's per-GPU consumption rates
   (computed below from the DD2 paper's batch sizes, iteration counts and wall-clock on 8 GPUs, docs/method.md §13)
   or ``--consumption-rate``. The target is >= 10x the highest consumer.
2. Decoding: images/s of the DALI CPU pipeline (1 and 2 threads) and of the PIL reference, same JPEGs, same
   decode -> resize shorter side -> centre crop -> [-1, 1] chain.
3. Teacher sampling: samples/s of the precompute job with 1 and 2 Ray workers (time inside the workers, and
   end to end including actor start-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

# DD2 paper (docs/method.md §13, Tab.8/11), VAR-d16 on 8 GPUs: (iterations, batch, hours).
_PAPER_D16 = {
    "stage1_head_only": (300_000, 512, 60.1),
    "stage1_full": (30_000, 512, 8.0),
    "stage2_main": (40_000 + 8_000, 512, 42.6),  # guidance + generator iterations, one batch each
}


def paper_consumption_per_gpu() -> dict[str, float]:
    """Samples per second per GPU that each d16 training phase consumed in the paper (8 GPUs)."""
    return {k: it * b / (h * 3600) / 8 for k, (it, b, h) in _PAPER_D16.items()}


def bench_streaming(work: Path, batch_size: int, batches: int, num_samples: int = 8192) -> dict:
    from dd2dist.data.stream import TokenStream
    from dd2dist.data.synthetic import random_spec, write_random_shards

    spec = random_spec(teacher_id="bench", num_tokens=680, vocab_size=4096, num_classes=1000)
    d = work / "tokens"
    write_random_shards(d, spec, num_samples=num_samples, per_shard=num_samples // 4)
    out = {"shards": 4, "samples_in_shards": num_samples, "batch_size": batch_size, "batches": batches}
    for workers in (0, 1):
        s = TokenStream(d, batch_size, expect={"teacher_id": "bench"}, num_workers=workers).with_epoch(batches + 5)
        it = iter(s)
        for _ in range(5):  # warm-up: first chunk fills the shuffle buffer, the loader process starts
            next(it)
        t0 = time.perf_counter()
        n = sum(len(b.keys) for b in it)
        out[f"samples_per_s_loader_workers_{workers}"] = n / (time.perf_counter() - t0)
    return out


def _bench_images(n: int, size: int) -> list[np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = photos[i % 2]
        y, x = int(rng.integers(0, p.shape[0] - 300)), int(rng.integers(0, p.shape[1] - 400))
        out.append(np.asarray(Image.fromarray(p[y : y + 300, x : x + 400]).resize((size * 4 // 3, size))))
    return out


def bench_decoding(work: Path, n: int, size: int) -> dict:
    import tarfile

    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    from dd2dist.data.image_shards import pil_preprocess, write_image_shards
    from dd2dist.pipelines.tokenize_images import build_image_pipeline, ensure_indexes

    shards = write_image_shards(work / "images", _bench_images(n, size), [0] * n, fmt="jpg", per_shard=n)
    out = {"images": n, "jpeg_size": [size, size * 4 // 3], "output_size": size, "epochs_timed": 2}
    for threads in (1, 2):
        # The pipeline the tokenisation job runs, built once; the first epoch is warm-up.
        pipe = build_image_pipeline(shards, ensure_indexes(shards), size, 32, num_threads=threads, device="cpu")
        it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader",
                                 last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=True)
        sum(o[0]["images"].shape[0] for o in it)
        t0 = time.perf_counter()
        count = sum(o[0]["images"].shape[0] for _ in range(2) for o in it)
        out[f"dali_cpu_images_per_s_threads_{threads}"] = count / (time.perf_counter() - t0)
        del it, pipe
    with tarfile.open(shards[0]) as tf:
        jpegs = [tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")]
    t0 = time.perf_counter()
    for data in jpegs:
        pil_preprocess(data, size)
    out["pil_images_per_s"] = len(jpegs) / (time.perf_counter() - t0)
    out["dali_1_thread_over_pil"] = out["dali_cpu_images_per_s_threads_1"] / out["pil_images_per_s"]
    return out


def bench_teacher_sampling(work: Path, cfg, num_samples: int, batch_size: int) -> dict:
    from dd2dist.pipelines.teacher_tokens import precompute_teacher_tokens

    out = {"num_samples": num_samples, "batch_size": batch_size, "teacher": cfg.teacher.family}
    for workers in (1, 2):
        d = work / f"teacher_w{workers}"
        t0 = time.perf_counter()
        m = precompute_teacher_tokens(cfg, num_samples, d, workers=workers, batch_size=batch_size, shard_size=1000)
        wall = time.perf_counter() - t0
        inside = max(w["seconds"] for w in m["this_run"]["workers"])
        out[f"workers_{workers}"] = {"samples_per_s_in_workers": num_samples / inside,
                                     "samples_per_s_end_to_end": num_samples / wall, "wall_s": wall}
    out["speedup_2_over_1_in_workers"] = (
        out["workers_2"]["samples_per_s_in_workers"] / out["workers_1"]["samples_per_s_in_workers"])
    return out


def run_data_benchmark(args: argparse.Namespace) -> dict:
    """Run the selected parts (``args.parts``: the flags of ``jobs/benchmark.py data``); the JSON-able results."""
    from dd2dist.config import load_config
    from dd2dist.launch.ray_env import init_local_ray

    work = Path(tempfile.mkdtemp(prefix="dd2_data_bench_"))
    result: dict = {"cpu_count": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        if "stream" in args.parts:
            s = bench_streaming(work, args.batch_size, args.batches)
            consumers = paper_consumption_per_gpu()
            if args.consumption_rate:
                consumers = {"given": args.consumption_rate}
            worst = max(consumers.values())
            s["consumption_samples_per_s_per_worker"] = consumers
            s["ratio_vs_highest_consumer"] = s["samples_per_s_loader_workers_0"] / worst
            s["meets_10x_target"] = s["ratio_vs_highest_consumer"] >= 10
            result["streaming"] = s
        if "decode" in args.parts:
            result["decoding"] = bench_decoding(work, args.images, args.image_size)
        if "sample" in args.parts:
            cfg = load_config(args.config, args.overrides)
            started = init_local_ray(num_cpus=2)
            try:
                result["teacher_sampling"] = bench_teacher_sampling(work, cfg, args.num_samples, args.sample_batch)
            finally:
                if started:
                    import ray

                    ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
