"""Ray Train launch of a DD2 run: ``TorchTrainer`` workers, each running the Trainer on DeepSpeed engines.

Driver (:func:`launch`): validate -> join the cluster (``RAY_ADDRESS`` / ``launch.ray_address``, e.g. under
``ray job submit``) or start an embedded local Ray -> open the MLflow run -> ``TorchTrainer.fit()`` ->
log the export as artefacts.

Worker (:func:`train_worker`, one per rank): the process group comes from Ray Train (gloo on CPU, NCCL on GPU)
and DeepSpeed reuses it. The Trainer writes checkpoints under ``<output>/checkpoints/step_XXXXXXXX`` (every rank
its shards, then a barrier, then rank 0 finalises); the checkpoint hook then reports it to Ray (rank 0 passes the
directory, the others ``None``; every rank calls ``report`` so it is also a barrier). A restarted worker group
(``FailureConfig.max_failures``) and a rerun with the same name and storage resume from the newest checkpoint:
Ray's ``get_checkpoint()``, else the newest complete one under ``<output>/checkpoints``. When stage 2 takes over
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


def phase_export_hook(cfg, rank: int):
    """Trainer ``export_hook``: rank 0 writes the consolidated weights of a hand-over to
    ``export/<name>.safetensors`` (STAGE1_FILE; the regression's generator is
    ``dd2dist.eval.fidelity.REGRESSION_EXPORT``), atomically: a crash leaves the old file or none, never half."""

    def hook(name: str, state) -> None:
        if rank != 0:
            return
        from safetensors.torch import save_file

        path = export_dir(cfg) / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
                   for k, v in state.items()}, str(tmp))
        os.replace(tmp, path)

    return hook


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


def _prune(root: Path, keep: int) -> None:
    from dd2dist.train import checkpoint as ckpt

    complete = sorted(p for p in root.iterdir() if ckpt.STEP_DIR.match(p.name) and (p / ckpt.STATE_FILE).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _make_factory(cfg):
    if cfg.engine.kind == "deepspeed":
        from dd2dist.engine.deepspeed_engine import DeepSpeedEngineFactory

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
    from dd2dist.engine.deepspeed_engine import build_partitioned_teacher, student_from_teacher_checkpoint

    teacher = build_partitioned_teacher(cfg.teacher, cfg.teacher.checkpoint, precision=factory.teacher_precision,
                                        use_gpu=cfg.launch.use_gpu)
    return teacher, student_from_teacher_checkpoint(cfg.teacher, cfg.student, cfg.teacher.checkpoint)


def samples_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "samples"


def _final_grid(cfg, trainer, factory, tracker, rank: int) -> None:
    """A sample grid of the exported EMA generator, loaded the way sampling loads it (collective decode)."""
    from dd2dist.eval.sampling import load_generator
    from dd2dist.launch.sample_grid import generator_grid, save_png

    net, _ = load_generator(export_dir(cfg), device=getattr(factory, "device", "cpu"))
    grid = generator_grid(net, trainer.teacher_engine.module, trainer.num_classes)
    if rank == 0:
        path = save_png(grid, samples_dir(cfg) / "final_ema.png")
        if tracker is not None:
            tracker.log_artifact(path, "samples")


def _numeric(metrics: dict) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        out[key] = value if math.isfinite(value) else float("nan")
    return out


def train_worker(config: dict[str, Any]) -> None:
    """The per-rank training function given to ``TorchTrainer`` (``config`` from :func:`launch`)."""
    cfg = _config_from_text(config["config_yaml"])
    if not cfg.launch.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray.train
    import torch

    from dd2dist.train import Trainer
    from dd2dist.train.metrics import NullLogger

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.launch.cpus_per_worker)))
    dry_run = bool(config.get("dry_run"))
    if not dry_run:
        _record_start(cfg, rank)

    torch.manual_seed(cfg.seed)  # a random-init teacher (no checkpoint) is the same on every rank and restart
    factory = _make_factory(cfg)
    teacher, student_template = _build_teacher(cfg, factory)
    logger = NullLogger()
    tracker = None
    if rank == 0 and config.get("run_id") and not dry_run:
        from dd2dist.method.schedule import build_schedule
        from dd2dist.tracking import open_run

        tracker = open_run(cfg, run_id=config["run_id"], total=build_schedule(cfg).total_iterations)
        logger = tracker
    root = checkpoint_root(cfg)

    def report(directory: Path, step: int, metrics: dict) -> None:
        values = {**_numeric(metrics), "iteration": float(step)}
        if rank == 0:
            if tracker is not None:
                (directory / "tracking.json").write_text(json.dumps({"run_id": tracker.run_id}))
            ray.train.report(values, checkpoint=ray.train.Checkpoint.from_directory(str(directory)),
                             checkpoint_dir_name=directory.name)
            _prune(root, cfg.launch.num_to_keep)
        else:
            ray.train.report(values, checkpoint=None)

    callbacks = []
    if cfg.tracking.sample_grid_every and not dry_run:
        from dd2dist.launch.sample_grid import grid_callback

        callbacks.append(grid_callback(cfg.tracking.sample_grid_every, samples_dir(cfg), tracker, rank))
    data = None
    if cfg.data.source == "shards":
        from dd2dist.data import stream_from_config

        # each rank reads its own split of the teacher-token shards; the stream's position is checkpointed
        data = stream_from_config(cfg, rank, world, num_tokens=teacher.num_tokens)
    trainer = Trainer(cfg, teacher, factory, logger=logger, rank=rank, world_size=world, data=data,
                      student_template=student_template, checkpoint_hook=None if dry_run else report,
                      export_hook=None if dry_run else phase_export_hook(cfg, rank), callbacks=callbacks)
    if dry_run:
        trainer.fit(max_iterations=1)
        ray.train.report({"iteration": float(trainer.state.iteration), "dry_run": 1.0})
        return
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            trainer.load(directory)
    else:
        trainer.resume_latest(root)
    if tracker is not None and trainer.state.iteration:
        tracker.set_tags({"resumed_from_iteration": trainer.state.iteration})
    trainer.fit(checkpoint_dir=root, checkpoint_every=cfg.launch.checkpoint_every,
                max_iterations=config.get("max_iterations"))
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
    written there; rerunning continues).
    """
    from dd2dist.config import dump_yaml, to_yaml
    from dd2dist.launch.ray_env import init_local_ray
    from dd2dist.launch.validate import validate_run

    validate_run(cfg)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    need_cpus = math.ceil(cfg.launch.num_workers * cfg.launch.cpus_per_worker)
    owns_ray = init_local_ray(num_cpus=need_cpus, object_store_mb=cfg.launch.object_store_mb,
                              address=cfg.launch.ray_address)
    run_id = None
    scratch = None
    tracker = None
    try:
        if dry_run:
            scratch = tempfile.mkdtemp(prefix="dd2-dryrun-")
            cfg = replace(cfg, output_dir=os.path.join(scratch, cfg.name))
            storage, name = os.path.join(scratch, "ray"), f"{cfg.name}-dryrun"
        else:
            os.makedirs(cfg.output_dir, exist_ok=True)
            dump_yaml(cfg, os.path.join(cfg.output_dir, "config.yaml"))
            storage, name = cfg.launch.storage_path, cfg.name
            from dd2dist.tracking import open_run

            tracker = open_run(cfg, progress=False)  # creates the run (params, tags) or finds the stored one
            run_id = tracker.run_id if tracker is not None else None
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"config_yaml": to_yaml(cfg), "run_id": run_id, "dry_run": dry_run,
                               "max_iterations": max_iterations},
            scaling_config=_scaling(cfg),
            torch_config=TorchConfig(backend="nccl" if cfg.launch.use_gpu else "gloo"),
            run_config=RunConfig(
                name=name,
                storage_path=storage,
                failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.launch.num_to_keep),
            ),
        )
        start = time.perf_counter()
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
        }
        return summary
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if owns_ray:
            ray.shutdown()
