"""Ray Train launch of a DD2 run: ``TorchTrainer`` workers, each running the Trainer on DeepSpeed engines.

Driver (:func:`launch`): validate -> join the cluster (``RAY_ADDRESS`` / ``launch.ray_address``, e.g. under
``ray job submit``) or start an embedded local Ray -> open the MLflow run -> ``TorchTrainer.fit()`` ->
log the export as artefacts.

Worker (:func:`train_worker`, one per rank): the process group comes from Ray Train (gloo on CPU, NCCL on GPU)
and DeepSpeed reuses it. The Trainer writes checkpoints under ``<output>/checkpoints/step_XXXXXXXX`` (every rank
its shards, then a barrier, the manifest, then rank 0 finalises); its callbacks (:mod:`dd2dist.launch.callbacks`)
then report it to Ray (rank 0 passes the directory, the others ``None``; every rank calls ``report`` so it is also
a barrier), and the trainer prunes the folder to ``launch.num_to_keep``. A restarted
worker group (``FailureConfig.max_failures``) and a rerun with the same name and storage resume from the newest
checkpoint that verifies against its manifest: Ray's ``get_checkpoint()`` or one under ``<output>/checkpoints``,
newest first; what was skipped and why goes to the log and ``<output>/workers/resume.log``.

Run safety (docs/run_safety.md): the driver holds ``<output>/run.lock`` (:mod:`dd2dist.launch.run_lock`) from
before Ray starts until it returns; SIGTERM / Ctrl-C on the driver or a worker stops every rank after the same
step with a checkpoint (:mod:`dd2dist.launch.preemption`; the summary's ``preempted``). When stage 2 takes over
from stage 1, the stage-1 student is exported to ``<output>/export/stage1_student.safetensors`` (what
``dd2dist.eval.run_eval`` evaluates as the stage-1 model); at the end the EMA generator is exported to
``<output>/export/generator.safetensors`` + ``config.yaml``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

WORKERS_DIR = "workers"  # <output>/workers/: pid files and a start log (operators, fault-injection tests)


def checkpoint_root(cfg) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def export_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "export"


STAGE1_FILE = "stage1_student.safetensors"


# ---- worker ------------------------------------------------------------------------------------------------


def _config_from_text(text: str):
    from dd2dist.config import ExperimentConfig, from_dict, parse_yaml

    # paths were checked by the driver; a remote worker may not see the same files until it needs them
    return from_dict(ExperimentConfig, parse_yaml(text, "<driver config>"), check_paths=False)


def _record_start(cfg, rank: int) -> None:
    folder = Path(cfg.output_dir) / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"rank{rank}.pid").write_text(str(os.getpid()))
    with (folder / "starts.log").open("a") as fh:
        fh.write(json.dumps({"rank": rank, "pid": os.getpid(), "time": time.time()}) + "\n")


def resume_candidates(ray_dir: str | os.PathLike | None, root: Path) -> list[Path]:
    """Checkpoints to try, newest first: Ray's reported one (when it has one) and every complete one under
    ``root``; at the same step Ray's copy comes first."""
    from dd2dist.train import checkpoint as ckpt

    def step(path: Path) -> int:
        m = ckpt.STEP_DIR.match(path.name)
        return int(m.group(1)) if m else -1

    ranked = [(step(p), 0, p) for p in ckpt.complete_checkpoints(root)]
    if ray_dir is not None:
        ray_path = Path(ray_dir)
        ranked.append((step(ray_path) if step(ray_path) >= 0 else 1 << 62, 1, ray_path))
    return [p for _, _, p in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def _resume(trainer, root: Path, cfg, rank: int, tracker) -> None:
    """Load the newest checkpoint that verifies (collective) and record what was skipped."""
    from contextlib import nullcontext

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    with checkpoint.as_directory() if checkpoint is not None else nullcontext(None) as ray_dir:
        loaded = trainer.resume(resume_candidates(ray_dir, root))
    if rank != 0:
        return
    skipped = [{"checkpoint": str(p), "problems": why} for p, why in trainer.resume_skipped]
    folder = Path(cfg.output_dir) / WORKERS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "resume.log").open("a") as fh:
        fh.write(json.dumps({"time": time.time(), "loaded": str(loaded) if loaded else None,
                             "iteration": trainer.state.iteration, "skipped": skipped}) + "\n")
    if tracker is not None and skipped:
        tracker.set_tags({"resume_skipped": "; ".join(f"{Path(s['checkpoint']).name}: {s['problems'][0]}"
                                                      for s in skipped)[:4000]})


def _make_factory(cfg):
    if cfg.engine.kind == "deepspeed":
        from dd2dist.engine.deepspeed_factory import DeepSpeedEngineFactory

        precision = "bf16" if cfg.teacher.dtype == "bfloat16" else "fp32"
        return DeepSpeedEngineFactory(cfg.engine, use_gpu=cfg.launch.use_gpu, teacher_precision=precision)
    import torch

    from dd2dist.engine.factory import TorchEngineFactory

    return TorchEngineFactory("cuda" if cfg.launch.use_gpu and torch.cuda.is_available() else "cpu")


def partition_at_build(cfg) -> bool:
    """Whether the worker builds the teacher already partitioned (ZeRO-3 from a dd2dist teacher file), so that no
    rank ever holds the whole teacher; a random-init or official teacher is built whole, then partitioned."""
    t = cfg.teacher
    return (cfg.engine.kind == "deepspeed" and cfg.engine.zero_stage_teacher == 3 and bool(t.checkpoint)
            and not t.official and not t.tokenizer_checkpoint)


def _build_teacher(cfg, factory):
    """(teacher, student template or None) for the Trainer (see :func:`partition_at_build`)."""
    if not partition_at_build(cfg):
        from dd2dist.teachers import build_teacher

        return build_teacher(cfg.teacher), None
    from dd2dist.launch.partitioned_models import build_partitioned_teacher, student_from_teacher_checkpoint

    teacher = build_partitioned_teacher(cfg.teacher, cfg.teacher.checkpoint, precision=factory.teacher_precision,
                                        use_gpu=cfg.launch.use_gpu)
    return teacher, student_from_teacher_checkpoint(cfg.teacher, cfg.student, cfg.teacher.checkpoint)


def samples_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "samples"


def _final_grid(cfg, trainer, factory, tracker, rank: int) -> None:
    """A sample grid of the exported EMA generator, loaded the way sampling loads it (collective decode)."""
    from dd2dist.eval.sampling import load_generator
    from dd2dist.launch.sample_grid import GRID_ROWS, generator_grid, grid_captions, save_png

    net, _ = load_generator(export_dir(cfg), device=getattr(factory, "device", "cpu"))
    grid = generator_grid(net, trainer.teacher_engine.module, trainer.num_classes, GRID_ROWS,
                          captions=grid_captions(trainer))
    if rank == 0:
        path = save_png(grid, samples_dir(cfg) / "final_ema.png")
        if tracker is not None:
            tracker.log_artifact(path, "samples")


def train_worker(config: dict[str, Any]) -> None:
    """The per-rank training function given to ``TorchTrainer`` (``config`` from :func:`launch`)."""
    cfg = _config_from_text(config["config_yaml"])
    if not cfg.launch.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train

    from dd2dist.launch.quiet import rank_logs

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    rank_logs(cfg.output_dir, rank)  # before torch and DeepSpeed are imported: their import-time messages too
    import torch

    from dd2dist.launch.callbacks import PhaseExport, RayReport
    from dd2dist.train import LogMetrics, Trainer

    torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    dry_run = bool(config.get("dry_run"))
    if not dry_run:
        _record_start(cfg, rank)

    torch.manual_seed(cfg.seed)  # a random-init teacher (no checkpoint) is the same on every rank and restart
    factory = _make_factory(cfg)
    teacher, student_template = _build_teacher(cfg, factory)
    callbacks = []
    tracker = None
    if rank == 0 and config.get("run_id") and not dry_run:
        from dd2dist.tracking import open_run

        tracker = open_run(cfg, run_id=config["run_id"])
        callbacks.append(LogMetrics(tracker))
    root = checkpoint_root(cfg)
    if rank == 0 and cfg.tracking.progress_every_s > 0 and not dry_run:
        import logging

        from dd2dist.launch.progress import ProgressReporter
        from dd2dist.launch.quiet import PROGRESS_LOGGER

        callbacks.append(ProgressReporter(cfg.tracking.progress_every_s, emit=logging.getLogger(PROGRESS_LOGGER).info))
    if cfg.tracking.sample_grid_every and not dry_run:
        from dd2dist.launch.sample_grid import SampleGrid

        callbacks.append(SampleGrid(cfg.tracking.sample_grid_every, samples_dir(cfg), tracker, rank))
    data = None
    if cfg.data.source == "shards":
        from dd2dist.data import stream_from_config

        # each rank reads its own split of the teacher-token shards; the stream's position is checkpointed
        data = stream_from_config(cfg, rank, world, num_tokens=teacher.num_tokens)
    if dry_run:
        trainer = Trainer(cfg, teacher, factory, rank=rank, world_size=world, data=data,
                          student_template=student_template, callbacks=callbacks)
        trainer.fit(max_iterations=1)
        ray.train.report({"iteration": float(trainer.state.iteration), "dry_run": 1.0})
        return
    from dd2dist.launch.preemption import worker_stop_source, write_stop_record

    callbacks += [PhaseExport(export_dir(cfg), rank), RayReport(rank, tracker)]
    with worker_stop_source(config.get("stop_board")) as stop_source:
        trainer = Trainer(cfg, teacher, factory, rank=rank, world_size=world, data=data,
                          student_template=student_template, callbacks=callbacks, stop_source=stop_source)
        _resume(trainer, root, cfg, rank, tracker)
        if tracker is not None and trainer.state.iteration:
            tracker.set_tags({"resumed_from_iteration": trainer.state.iteration})
        trainer.fit(checkpoint_dir=root, checkpoint_every=cfg.launch.checkpoint_every,
                    max_iterations=config.get("max_iterations"))
    if trainer.preempted is not None:
        # without a checkpoint the directory belongs to another run now: write nothing more into it
        if rank == 0 and trainer.preempted.checkpoint:
            request, it = trainer.preempted, trainer.state.iteration
            from dd2dist.train import checkpoint as ckpt

            write_stop_record(cfg.output_dir, it, request, str(ckpt.step_dir(root, it)))
            if tracker is not None:
                tracker.set_tags({"stopped_at_iteration": it, "stop_reason": request.reason[:4000]})
        return
    if trainer.done and "generator" in trainer.engines:
        path = trainer.export_generator(export_dir(cfg))
        _final_grid(cfg, trainer, factory, tracker, rank)
        if tracker is not None:
            tracker.log_artifact(path, "export")
            tracker.log_artifact(path.parent / "config.yaml", "export")
    if tracker is not None:
        tracker.set_tags({"stage": trainer.phase.stage if trainer.phase else "done"})
        if trainer.done:
            tracker.close("FINISHED")


# ---- driver ------------------------------------------------------------------------------------------------


def _scaling(cfg):
    from ray.train import ScalingConfig

    return ScalingConfig(
        num_workers=cfg.launch.num_workers,
        use_gpu=cfg.launch.use_gpu,
        resources_per_worker={"CPU": cfg.launch.cpus_per_worker, **({"GPU": 1} if cfg.launch.use_gpu else {})},
    )


def launch(cfg, *, dry_run: bool = False, max_iterations: int | None = None) -> dict[str, Any]:
    """Run (or resume) the distillation described by ``cfg`` on Ray Train; returns a summary dict.

    ``dry_run``: validate, build every engine and run one iteration, with no checkpoints, tracking or export
    (in a throw-away Ray storage folder). ``max_iterations`` stops at that global iteration (a checkpoint is
    written there; rerunning continues). Before anything starts the run takes the lock of its output directory
    (:class:`dd2dist.launch.run_lock.RunLocked` when another live run holds it). ``summary["preempted"]`` is
    the stop record (iteration, reason, checkpoint) when a SIGTERM / Ctrl-C stopped the run early, else None.
    """
    from dd2dist.launch.preflight import validate_run
    from dd2dist.launch.run_lock import acquire_run_locks

    validate_run(cfg)
    locks = [] if dry_run else acquire_run_locks(cfg)
    try:
        return _launch(cfg, dry_run, max_iterations, locks)
    finally:
        for lock in locks:
            lock.release()


def _launch(cfg, dry_run: bool, max_iterations: int | None, locks: list) -> dict[str, Any]:
    from contextlib import nullcontext

    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from dd2dist.config import dump_yaml, to_yaml
    from dd2dist.launch.preemption import DriverStop, StopAwareTorchConfig, clear_stop_record, read_stop_record
    from dd2dist.launch.quiet import LOG_DIR, RAY_TRAIN_LOG_LEVEL, ray_log_dir
    from dd2dist.launch.ray_env import init_local_ray

    need_cpus = math.ceil(cfg.launch.num_workers * cfg.launch.cpus_per_worker)
    owns_ray = init_local_ray(num_cpus=need_cpus, object_store_mb=cfg.launch.object_store_mb,
                              address=cfg.launch.ray_address)
    run_id = None
    scratch = None
    tracker = None
    stop = None
    try:
        for lock in locks:
            lock.update(ray_job_id=ray.get_runtime_context().get_job_id())
        if dry_run:
            scratch = tempfile.mkdtemp(prefix="dd2-dryrun-")
            cfg = replace(cfg, output_dir=os.path.join(scratch, cfg.name))
            storage, name = os.path.join(scratch, "ray"), f"{cfg.name}-dryrun"
        else:
            os.makedirs(cfg.output_dir, exist_ok=True)
            dump_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            clear_stop_record(cfg.output_dir)
            storage, name = cfg.launch.storage_path, cfg.name
            from dd2dist.tracking import open_run

            tracker = open_run(cfg)  # creates the run (params, tags) or finds the stored one
            run_id = tracker.run_id if tracker is not None else None
            stop = DriverStop()
            for lock in locks:  # another run took the directory over: stop without writing anything more
                lock.on_lost = lambda holder, stop=stop: stop.request(
                    f"lost the run lock to host {holder.get('host')} pid {holder.get('pid')}", checkpoint=False)
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config_yaml": to_yaml(cfg), "run_id": run_id, "dry_run": dry_run,
                               "max_iterations": max_iterations, "stop_board": stop.board_name if stop else None},
            scaling_config=_scaling(cfg),
            torch_config=StopAwareTorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo"),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
                # Ray's copies only: resume reads Ray's latest and falls back through <output>/checkpoints, which
                # the trainer prunes (Trainer._checkpoint), so older Ray copies are never needed
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.launch.num_to_keep),
                logging_config=LoggingConfig(log_level=RAY_TRAIN_LOG_LEVEL),
            ),
        )
        if not dry_run:
            print(f"{cfg.name}: {cfg.launch.num_workers} {cfg.engine.kind} workers; each rank's log: "
                  f"{Path(cfg.output_dir) / LOG_DIR}/rank<N>.log; Ray's logs: {ray_log_dir()}", flush=True)
        start = time.perf_counter()
        with stop if stop is not None else nullcontext():
            result = trainer.fit()
        if result.error is not None:
            if tracker is not None:
                tracker.close("FAILED")
            raise result.error
        summary = {
            "name": cfg.name, "output_dir": cfg.output_dir, "run_id": run_id, "dry_run": dry_run,
            # Ray Train keeps metrics with checkpoints only, so a dry run (no checkpoint) reports none
            "iteration": int(result.metrics["iteration"]) if result.metrics else None,
            "seconds": time.perf_counter() - start,
            "export": str(export_dir(cfg) / "generator.safetensors")
            if (export_dir(cfg) / "generator.safetensors").is_file() else None,
            "preempted": None if dry_run else read_stop_record(cfg.output_dir),
        }
        if any(lock.lost for lock in locks):  # stopped without a checkpoint (stop.json belongs to the new owner)
            request = stop.flag.get()
            summary["preempted"] = {"iteration": summary["iteration"], "checkpoint": None,
                                    "reason": request.reason if request else "lost the run lock"}
        if summary["preempted"] is not None:
            summary["iteration"] = summary["preempted"]["iteration"]
        return summary
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if owns_ray:
            ray.shutdown()
