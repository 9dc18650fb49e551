"""Stage-2 training benchmark on Ray Train + DeepSpeed (``python jobs/benchmark.py train --out FILE``).

What it measures, on CPU (one thread per worker):
  * samples/s of stage-2 iterations with 1 and 2 Ray workers (weak scaling: the per-worker batch is fixed), and
    the speed-up of 2 workers over 1 (target >= 1.6x);
  * the split of iteration time into exclusive parts: teacher forward (time inside teacher calls, minus the
    collectives they issue), guidance steps and generator step (the rest of those iterations: student
    forwards, losses, backward, optimizer step, EMA), communication (time inside torch.distributed
    collectives: ZeRO gathers, gradient all-reduce, the finite-loss check), and other (the trainer loop outside
    iterations; target <= 10%);
  * per-rank memory for teacher ZeRO 0/3 and trainable ZeRO 0/2 (ZeRO-3 is for the frozen teacher only): the
    bytes of parameters + optimizer state each rank holds, and the process's peak RSS.
With ``--gpu`` it instead runs one process on the GPU: stage-2 iterations at a true-size geometry (default the
VAR-d16 teacher, random weights, bf16 autocast) and records step time and peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor", "broadcast",
    "barrier", "all_gather_object", "reduce", "all_to_all_single",
)
TEACHER_CALLS = ("features", "head_logits", "log_probs", "sample", "codebook", "decode")
CATEGORIES = ("teacher_forward", "guidance_steps", "generator_step", "communication", "other")


class SplitTimer:
    """Exclusive wall-clock time per category: an inner section pauses the one around it."""

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[str] = []
        self._mark = 0.0

    def _switch(self) -> float:
        now = time.perf_counter()
        if self._stack:
            self.totals[self._stack[-1]] += now - self._mark
        self._mark = now
        return now

    @contextlib.contextmanager
    def section(self, category: str):
        self._switch()
        self._stack.append(category)
        try:
            yield
        finally:
            self._switch()
            self._stack.pop()

    def wrap(self, fn, category: str):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            with self.section(category):
                return fn(*args, **kwargs)

        return timed

    def reset(self) -> None:
        self.totals.clear()


def _patch_collectives(timer: SplitTimer) -> None:
    """Time every torch.distributed collective (patched before DeepSpeed binds to them)."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if callable(fn) and not getattr(fn, "_dd2_timed", False):
            timed = timer.wrap(fn, "communication")
            timed._dd2_timed = True
            setattr(dist, name, timed)


def _instrument_trainer(trainer, timer: SplitTimer) -> None:
    teacher = trainer.teacher_engine.module
    for name in TEACHER_CALLS:
        method = getattr(teacher, name, None)
        if callable(method):
            object.__setattr__(teacher, name, timer.wrap(method, "teacher_forward"))
    iteration = trainer._iteration

    def timed_iteration(phase):
        role = phase.role_at(trainer.state.phase_iter)
        with timer.section("guidance_steps" if role == "guidance" else "generator_step"):
            return iteration(phase)

    trainer._iteration = timed_iteration


def engine_state_bytes(engine) -> int:
    """Parameter + optimizer-state bytes this rank holds for one engine (ZeRO partitions count their share)."""
    import torch

    from dd2dist.engine.param_bytes import local_param_bytes

    total = local_param_bytes(engine.module)
    optimizer = getattr(engine, "_optimizer", None) or getattr(engine, "optimizer", None)
    seen: set[int] = set()

    def add(t) -> int:
        if torch.is_tensor(t) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            return t.numel() * t.element_size()
        return 0

    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        for state in inner.state.values():
            total += sum(add(v) for v in state.values())
        # fp32 master partitions: ZeRO-1/2 (and bf16), ZeRO-3
        for name in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition", "fp32_partitioned_groups_flat"):
            total += sum(add(t) for t in getattr(optimizer, name, None) or [])
    return total


def _bench_config(args, workers: int, teacher_stage: int, train_stage: int):
    from dd2dist.config import load_config

    steps = args.warmup + args.iterations  # iterations needed (K+1 per generator step)
    k = args.k
    overrides = [
        "stages=[stage2]", "alignment.enabled=false", f"launch.num_workers={workers}", "launch.cpus_per_worker=1",
        f"engine.zero_stage_teacher={teacher_stage}", f"engine.zero_stage_generator={train_stage}",
        f"engine.zero_stage_guidance={train_stage}", f"stage2.batch_size={args.batch}",
        f"stage2.guidance_per_generator={k}", f"stage2.generator_steps={steps // (k + 1) + 2}",
        "tracking.enabled=false", "launch.max_failures=0", f"output_dir={args.scratch}/w{workers}",
        f"name=bench-w{workers}-t{teacher_stage}-g{train_stage}",
    ]
    overrides += [f"teacher.var.width={args.width}", f"teacher.var.depth={args.depth}",
                  f"teacher.var.num_heads={max(1, args.width // 32)}"]
    return load_config(str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml"),
                       overrides + list(args.set or []))


def bench_worker(config: dict[str, Any]) -> None:
    """One Ray worker: build the stage-2 engines, warm up, time ``iterations`` iterations, report."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import torch

    from dd2dist.launch.ray_train import _config_from_text, _make_factory
    from dd2dist.teachers import build_teacher
    from dd2dist.train import Trainer

    cfg = _config_from_text(config["config_yaml"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    timer = SplitTimer()
    _patch_collectives(timer)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, build_teacher(cfg.teacher), _make_factory(cfg), rank=rank, world_size=world)
    _instrument_trainer(trainer, timer)
    warmup, iterations = config["warmup"], config["iterations"]
    trainer.fit(max_iterations=warmup)
    torch.distributed.barrier()
    timer.reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    with timer.section("other"):
        trainer.fit(max_iterations=warmup + iterations)
        torch.distributed.barrier()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    samples = iterations * cfg.stage2.batch_size * world
    memory = {
        "teacher_bytes": engine_state_bytes(trainer.teacher_engine),
        "generator_bytes": engine_state_bytes(trainer.engines["generator"]),
        "guidance_bytes": engine_state_bytes(trainer.engines["guidance"]),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    mine = {"rank": rank, "total_s": total, "cpu_s": cpu, "split_s": dict(timer.totals), "memory": memory}
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    if rank == 0:  # Ray Train v2 keeps metrics only with checkpoints: hand the result over through a file
        Path(config["result_file"]).write_text(json.dumps({"samples_per_s": samples / total, "ranks": gathered}))
    ray.train.report({"samples_per_s": samples / total})


def _run(cfg, args) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dd2dist.config import to_yaml

    result_file = os.path.join(args.scratch, f"{cfg.name}.json")
    trainer = TorchTrainer(
        bench_worker,
        train_loop_config={"config_yaml": to_yaml(cfg), "warmup": args.warmup, "iterations": args.iterations,
                           "result_file": result_file},
        scaling_config=ScalingConfig(num_workers=cfg.launch.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=os.path.join(args.scratch, "ray")),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    metrics = json.loads(Path(result_file).read_text())
    ranks = metrics["ranks"]
    split = defaultdict(float)
    for r in ranks:
        for key, value in r["split_s"].items():
            split[key] += value / len(ranks)
    total = sum(r["total_s"] for r in ranks) / len(ranks)
    cpu = sum(r["cpu_s"] for r in ranks) / len(ranks)
    fractions = {k: split.get(k, 0.0) / total for k in CATEGORIES}
    samples = metrics["samples_per_s"] * total
    return {"samples_per_s": metrics["samples_per_s"], "world": len(ranks), "mean_total_s": total,
            # process CPU seconds per rank over the timed iterations: wall/cpu > 1 means the worker waited for a
            # core (an oversubscribed machine) or for a collective
            "mean_cpu_s": cpu, "wall_over_cpu": total / cpu if cpu else float("nan"),
            "samples_per_cpu_s_per_rank": samples / len(ranks) / cpu if cpu else float("nan"),
            "split_fraction": fractions, "split_s": {k: split.get(k, 0.0) for k in CATEGORIES},
            "memory_per_rank": [r["memory"] for r in ranks],
            "zero": {"teacher": cfg.engine.zero_stage_teacher, "trainable": cfg.engine.zero_stage_generator}}


def run_train_benchmark(args: argparse.Namespace) -> dict:
    """The CPU scaling / split / memory benchmark (see the module docstring); returns the JSON-able result."""
    if args.gpu:
        return run_gpu_step(args)
    import tempfile

    from dd2dist.launch.ray_env import init_local_ray

    args.scratch = tempfile.mkdtemp(prefix="dd2-bench-")
    load_before = os.getloadavg()
    owns = init_local_ray(num_cpus=2)
    try:
        # scaling: the same engine settings on 1 and 2 workers (teacher ZeRO stage --teacher-zero, trainables 0)
        t = args.teacher_zero
        runs = {"workers1": _run(_bench_config(args, 1, t, 0), args)}
        runs["workers2"] = runs[f"zero_t{t}_g0"] = _run(_bench_config(args, 2, t, 0), args)
        for teacher_stage, train_stage in ((0, 0), (3, 0), (3, 2), (3, 3)):  # memory per rank, 2 workers
            if f"zero_t{teacher_stage}_g{train_stage}" not in runs:
                runs[f"zero_t{teacher_stage}_g{train_stage}"] = _run(
                    _bench_config(args, 2, teacher_stage, train_stage), args)
    finally:
        if owns:
            import ray

            ray.shutdown()
    speedup = runs["workers2"]["samples_per_s"] / runs["workers1"]["samples_per_s"]
    return {
        "benchmark": "train", "device": "cpu", "threads_per_worker": 1, "batch_per_worker": args.batch,
        "K": args.k, "teacher": {"family": "var", "width": args.width, "depth": args.depth},
        "scaling_engines": {"teacher_zero": args.teacher_zero, "trainable_zero": 0},
        "warmup_iterations": args.warmup, "timed_iterations": args.iterations,
        "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "speedup_2_over_1": speedup, "target_speedup": 1.6, "speedup_ok": speedup >= 1.6,
        "other_fraction_2_workers": runs["workers2"]["split_fraction"]["other"], "target_other": 0.10,
        "runs": runs,
    }


# ---- GPU: one true-size stage-2 step -------------------------------------------------------------------------


def run_gpu_step(args: argparse.Namespace) -> dict:
    """Stage-2 iterations at a true-size geometry on one GPU (random weights, bf16 autocast, TorchEngine)."""
    import torch

    from dd2dist.config import load_config
    from dd2dist.engine.factory import TorchEngineFactory
    from dd2dist.teachers import build_teacher
    from dd2dist.train import Trainer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--gpu: no CUDA device is visible")
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    cfg = load_config(str(ROOT / "configs" / "teachers" / f"{args.geometry}.yaml"), [
        "teacher.official=null", "stages=[stage2]", "alignment.enabled=false", "engine.kind=torch",
        f"stage2.batch_size={args.batch}", f"stage2.guidance_per_generator={args.k}", "stage2.generator_steps=100",
        "tracking.enabled=false", f"output_dir={args.scratch if hasattr(args, 'scratch') else '/tmp/dd2-gpu'}",
        "student.head_width=1024", "student.head_depth=3", *list(args.set or []),
    ], check_paths=False)
    cfg = replace(cfg)
    torch.manual_seed(0)
    teacher = build_teacher(cfg.teacher)
    trainer = Trainer(cfg, teacher, TorchEngineFactory(device))
    if args.teacher_bf16:
        trainer.teacher_engine.module.to(torch.bfloat16)  # bf16 teacher weights (its closed form stays fp32)
    times = {"guidance": [], "generator": []}
    iteration = trainer._iteration

    def timed(phase):
        role = phase.role_at(trainer.state.phase_iter)
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = iteration(phase)
        sync()
        times[role].append(time.perf_counter() - t0)
        return out

    trainer._iteration = timed
    n = (args.k + 1) * (1 + args.gpu_cycles)  # one warm-up cycle, then the timed ones
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(max_iterations=n)
    skip_g, skip_d = 1, args.k  # the first cycle is warm-up
    gen = times["generator"][skip_g:]
    gui = times["guidance"][skip_d:]
    cycle = sum(gen) / max(1, len(gen)) + args.k * sum(gui) / max(1, len(gui))
    params = {name: sum(p.numel() for p in e.module.parameters()) for name, e in trainer.engines.items()}
    params["teacher"] = sum(p.numel() for p in trainer.teacher_engine.module.parameters())
    return {
        "benchmark": "train", "device": torch.cuda.get_device_name() if cuda else "cpu", "geometry": args.geometry,
        "precision": "bf16 autocast; students fp32 weights + AdamW; teacher weights "
                     + ("bf16" if args.teacher_bf16 else "fp32"), "batch": args.batch,
        "K": args.k, "tokens_per_sample": teacher.num_tokens, "params": params,
        "generator_step_s": sum(gen) / max(1, len(gen)), "guidance_step_s": sum(gui) / max(1, len(gui)),
        "cycle_s": cycle, "samples_per_s_per_cycle": args.batch / cycle,
        "peak_memory_gib": (torch.cuda.max_memory_allocated() if cuda else
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30,
        "peak_memory_kind": "torch.cuda.max_memory_allocated" if cuda else "process peak RSS",
        "timed": {"generator": gen, "guidance": gui},
    }
