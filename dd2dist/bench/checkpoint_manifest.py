"""Cost of checkpoint manifests (``python jobs/benchmark.py manifest --out FILE``).

For each recipe a Trainer on the plain-torch engine (one process; random-init teacher: the weights' values do not
change the cost) is run one iteration into stage 2, so that its checkpoint holds what a stage-2 checkpoint holds
(generator and guidance weights and AdamW state, EMA, RNG, counters). It is then checkpointed ``--repeats``
times; per checkpoint: the whole save (``checkpoint/write_s``), the manifest inside it (listing, SHA-256 of every
file, writing ``manifest.json``: ``checkpoint/manifest_s``) and a full :func:`dd2dist.train.manifest.verify`
(what a resume pays), as medians. Files were just written, so they are read from the page cache, as they are by
a resume that follows a save; a resume after a reboot reads them from disk once more.

Recipes: ``smoke_var_deepspeed`` and the demo's two (``configs/demo/var.yaml``, ``configs/demo/llamagen.yaml``,
whose students are the demo's: 1-2 M parameters each). ``--run-dir DIR`` also times ``verify`` on the checkpoints
of a finished run (e.g. a ``jobs/distill.py`` run of smoke_var_deepspeed: DeepSpeed files written by 2 Ray workers)
and reports the ``checkpoint/*`` metrics its rank 0 logged to MLflow.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "smoke_var_deepspeed": "configs/experiments/smoke_var_deepspeed.yaml",
    "demo_var": "configs/demo/var.yaml",
    "demo_llamagen": "configs/demo/llamagen.yaml",
}
# one process, the plain-torch engine, a random-init teacher, and a stage 1 of two steps (its length does not
# change what a stage-2 checkpoint holds)
OVERRIDES = ["engine.kind=torch", "launch.num_workers=1", "teacher.checkpoint=null", "data.source=online",
             "stage1.head_only_steps=1", "stage1.steps=1", "stage1.batch_size=4", "stage2.batch_size=4",
             "data.batch_size=4", "compact_head.enabled=false", "tracking.enabled=false"]


def measure_recipe(config: str, repeats: int) -> dict:
    """Median save / manifest / verify seconds of a stage-2 checkpoint of ``config`` (see the module docstring)."""
    import torch

    from dd2dist.config import load_config
    from dd2dist.engine.factory import TorchEngineFactory
    from dd2dist.teachers import build_teacher
    from dd2dist.train import Trainer
    from dd2dist.train.manifest import verify

    cfg = load_config(str(ROOT / config), OVERRIDES)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(cfg, build_teacher(cfg.teacher), TorchEngineFactory())
    stage1 = sum(p.iterations for p in trainer.schedule.phases if p.stage == "stage1")
    trainer.fit(max_iterations=stage1 + 1)
    params = {name: sum(p.numel() for p in e.module.parameters()) for name, e in trainer.engines.items()}
    rows = []
    with tempfile.TemporaryDirectory(prefix="dd2-manifest-") as tmp:
        for _ in range(repeats):
            path = trainer.save(tmp)
            t0 = time.perf_counter()
            problems = verify(path)
            rows.append({**trainer.last_save_timing, "verify_s": time.perf_counter() - t0})
            assert not problems, problems
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"config": config, "params": params, "files": int(med["checkpoint/files"]),
            "bytes": int(med["checkpoint/bytes"]), "save_s": med["checkpoint/write_s"],
            "manifest_s": med["checkpoint/manifest_s"], "verify_s": med["verify_s"],
            "manifest_share_of_save": med["checkpoint/manifest_s"] / med["checkpoint/write_s"], "repeats": repeats}


def measure_run(run_dir: Path) -> dict:
    """verify() time of each checkpoint of a finished run, and the checkpoint/* metrics its rank 0 logged."""
    from dd2dist.train import checkpoint as ckpt
    from dd2dist.train.manifest import read_manifest, verify

    out: dict = {"run_dir": str(run_dir), "checkpoints": []}
    for step in sorted(ckpt.complete_checkpoints(run_dir / "checkpoints")):
        t0 = time.perf_counter()
        problems = verify(step)
        files = read_manifest(step)["files"] if not problems else {}
        out["checkpoints"].append({"name": step.name, "verify_s": time.perf_counter() - t0, "problems": problems,
                                   "files": len(files), "bytes": sum(e["size"] for e in files.values())})
    stored = run_dir / "mlflow_run.json"
    if stored.is_file():
        from mlflow.tracking import MlflowClient

        info = json.loads(stored.read_text())
        client = MlflowClient(tracking_uri=info["tracking_uri"])
        for key in ("checkpoint/write_s", "checkpoint/manifest_s"):
            values = [m.value for m in client.get_metric_history(info["run_id"], key)]
            out[key] = {"n": len(values), "median": statistics.median(values) if values else None,
                        "max": max(values) if values else None}
    return out
