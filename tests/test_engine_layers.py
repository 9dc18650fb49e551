"""The engine layer stands alone: no module under dd2dist/engine imports the model families, the method, the
trainer or the launch code, the optimizer spec is a leaf, and the DeepSpeed engine takes its optimizer settings
from that spec (no defaults of its own)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dd2dist.engine.ds_config import trainable_ds_config
from dd2dist.engine.optim import OptimSpec

ENGINE = Path(__file__).resolve().parents[1] / "dd2dist" / "engine"
FORBIDDEN = ("dd2dist.teachers", "dd2dist.nets", "dd2dist.train", "dd2dist.launch", "dd2dist.method")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports inside functions count), relative ones resolved."""
    package = ["dd2dist", "engine"]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # from dd2dist import nets
    return names


def _reaches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_engine_modules_import_no_higher_layer(path):
    bad = sorted(n for n in _imports(path) if any(_reaches(n, prefix) for prefix in FORBIDDEN))
    assert not bad, f"dd2dist/engine/{path.name} imports {bad}"


def test_the_import_check_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import dd2dist.nets.head\nfrom dd2dist import teachers\nfrom ..train import trainer\n"
                     "def f():\n    from dd2dist.launch.partitioned_models import build_partitioned_teacher\n")
    assert {n for n in _imports(probe) if any(_reaches(n, p) for p in FORBIDDEN)} >= {
        "dd2dist.nets.head", "dd2dist.teachers", "dd2dist.train.trainer", "dd2dist.launch.partitioned_models"}


def test_optim_spec_is_a_leaf_and_torch_engine_does_not_import_the_factory():
    assert not {n for n in _imports(ENGINE / "optim.py") if n.split(".")[0] in ("torch", "deepspeed", "ray")}
    assert not {n for n in _imports(ENGINE / "optim.py") if _reaches(n, "dd2dist")}
    assert not {n for n in _imports(ENGINE / "torch_engine.py") if _reaches(n, "dd2dist.engine.factory")}


def test_deepspeed_settings_of_a_default_spec_are_the_spec_defaults():
    spec = OptimSpec(lr=3e-4)
    config = trainable_ds_config(spec, zero_stage=0, precision="fp32")
    assert config["gradient_clipping"] == spec.grad_clip == 1.0
    assert config["gradient_accumulation_steps"] == spec.grad_accum == 1
    assert spec.adamw_kwargs() == {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.0, "eps": 1e-8}


def test_deepspeed_settings_follow_an_explicit_spec():
    spec = OptimSpec(lr=1e-2, betas=(0.8, 0.99), grad_clip=0.05, weight_decay=0.1, lr_start=1e-4, warmup_steps=4,
                     grad_accum=3, eps=1e-6)
    config = trainable_ds_config(spec, zero_stage=2, precision="bf16")
    assert config["gradient_clipping"] == 0.05 and config["gradient_accumulation_steps"] == 3
    assert trainable_ds_config(spec, zero_stage=2, precision="bf16", grad_accum=2)["gradient_accumulation_steps"] == 2
    assert spec.adamw_kwargs() == {"lr": spec.lr_at(0), "betas": (0.8, 0.99), "weight_decay": 0.1, "eps": 1e-6}
    assert trainable_ds_config(OptimSpec(lr=1e-3, grad_clip=0), zero_stage=0, precision="fp32")[
        "gradient_clipping"] == 0.0
