"""DeepSpeed engines on 2 gloo ranks (spawned processes, no Ray): trainable ZeRO 0/1/2 against a plain-torch
reference of data-parallel AdamW (with a parameter group at a multiple of the LR), save/load, and the ZeRO-3 frozen
teacher (memory share, equal outputs)."""

from __future__ import annotations

import math

import pytest
import torch

from dd2dist.launch.local_ranks import run_ranks

pytestmark = pytest.mark.integration

STEPS = 3


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _spec():
    from dd2dist.engine.optim import OptimSpec

    # the output layer ("2.") steps at 10x the scheduled LR, in a parameter group of its own
    return OptimSpec(lr=1e-2, lr_start=1e-3, warmup_steps=3, grad_clip=0.05, weight_decay=0.01, betas=(0.9, 0.95),
                     lr_scales=(("2.", 10.0),))


def _reference(world: int, steps: int):
    """Data-parallel AdamW by hand: gradient = mean over ranks, clipped by the global norm, LR warm-up, the output
    layer at 10x the LR."""
    spec = _spec()
    model = _mlp()
    groups = [{"params": list(model[0].parameters()), "scale": 1.0},
              {"params": list(model[2].parameters()), "scale": 10.0}]
    opt = torch.optim.AdamW(groups, lr=spec.lr_at(0), betas=spec.betas, weight_decay=spec.weight_decay,
                            foreach=False)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        loss = sum(_loss(model, *_batch(r, step)) for r in range(world)) / world
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = spec.lr_at(step) * group["scale"]
        opt.step()
    return model, norms


def _trainable_worker(rank: int, world: int, stages: list[int], tmp: str):
    return {stage: _train_one(rank, stage, tmp) for stage in stages}


def _train_one(rank: int, stage: int, tmp: str):
    from dd2dist.engine.deepspeed_trainable import DeepSpeedEngine

    engine = DeepSpeedEngine("generator", _mlp(), _spec(), zero_stage=stage)
    assert not engine.trainable  # starts frozen, like TorchEngine
    engine.set_trainable(True)
    engine.assert_mode(True)
    out = {"norms": [], "lrs": []}
    for step in range(STEPS):
        engine.backward(_loss(engine.module, *_batch(rank, step)))
        stats = engine.step()
        out["norms"].append(stats.grad_norm)
        out["lrs"].append(stats.lr)
    skipped = engine.skip_step()
    out["skipped"] = (skipped.skipped, engine.optimizer_steps)
    out["weights"] = engine.full_state_dict()
    engine.save(f"{tmp}/stage{stage}")
    engine.backward(_loss(engine.module, *_batch(rank, 7)))
    engine.step()
    after = engine.full_state_dict()
    engine.load(f"{tmp}/stage{stage}")
    out["restored_steps"] = engine.optimizer_steps
    out["restored_equal"] = all(torch.equal(v, out["weights"][k]) for k, v in engine.full_state_dict().items())
    engine.backward(_loss(engine.module, *_batch(rank, 7)))
    engine.step()
    out["replay_equal"] = all(torch.allclose(v, after[k], rtol=1e-6, atol=1e-7)
                              for k, v in engine.full_state_dict().items())
    engine.set_trainable(False)
    engine.assert_mode(False)
    return out


@pytest.mark.slow
def test_trainable_engine_matches_data_parallel_adamw(tmp_path):
    """ZeRO 0 and 2 (one pair of processes for both, to pay the start-up once)."""
    per_rank = run_ranks(_trainable_worker, 2, [0, 2], str(tmp_path))
    ref, ref_norms = _reference(2, STEPS)
    spec = _spec()
    for stage in (0, 2):
        results = [r[stage] for r in per_rank]
        _check_against_reference(results, ref, ref_norms, spec)


def _check_against_reference(results, ref, ref_norms, spec):
    for out in results:
        for key, value in ref.state_dict().items():
            torch.testing.assert_close(out["weights"][key], value, rtol=1e-5, atol=1e-6)
        assert out["norms"] == pytest.approx(ref_norms, rel=1e-5)
        assert out["lrs"] == pytest.approx([spec.lr_at(s) for s in range(STEPS)])
        assert out["skipped"] == (True, STEPS)  # a skipped step does not tick the LR clock
        assert out["restored_steps"] == STEPS and out["restored_equal"] and out["replay_equal"]
    # both ranks hold the same weights
    for key in results[0]["weights"]:
        assert torch.equal(results[0]["weights"][key], results[1]["weights"][key])


LLAMAGEN = ["teacher.family=llamagen", "teacher.sampling.guidance_schedule=constant"]


def _teacher_worker(rank: int, world: int, paths: dict):
    out = {via_factory: _check_teacher(paths["var"], via_factory) for via_factory in (False, True)}
    out["llamagen"] = _check_teacher(paths["llamagen"], False, LLAMAGEN)
    return out


def _check_teacher(path: str, via_factory: bool, overrides: list[str] = ()):
    from dd2dist.conditions import Cond
    from dd2dist.config import load_config
    from dd2dist.engine.deepspeed_factory import DeepSpeedEngineFactory
    from dd2dist.engine.deepspeed_frozen import DeepSpeedFrozenEngine
    from dd2dist.engine.param_bytes import param_bytes_ratio
    from dd2dist.launch.partitioned_models import build_partitioned_teacher
    from dd2dist.method.ode_init import teacher_ode_tokens
    from dd2dist.teachers import build_teacher

    cfg = load_config(None, list(overrides))
    reference = build_teacher(cfg.teacher)
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.freeze()
    if via_factory:  # the trainer's path: a plain module partitioned in place
        plain = build_teacher(cfg.teacher)
        plain.load_state_dict(torch.load(path, weights_only=True))
        engine = DeepSpeedEngineFactory(cfg.engine).teacher(plain)
    else:  # partitioned at construction, loaded module by module
        engine = DeepSpeedFrozenEngine("teacher", build_partitioned_teacher(cfg.teacher, path))
    out = {"ratio": param_bytes_ratio(engine)}
    g = torch.Generator().manual_seed(torch.distributed.get_rank())
    ids = torch.randint(0, reference.vocab_size, (3, reference.num_tokens), generator=g)
    cond = Cond(labels=torch.tensor([1, 2, reference.num_classes]))
    sampling = cfg.teacher.sampling
    with torch.no_grad():
        out["log_probs"] = (engine.module.log_probs(ids, cond, sampling), reference.log_probs(ids, cond, sampling))
        out["features"] = (engine.module.features(ids, cond), reference.features(ids, cond))
    out["codebook"] = (engine.module.codebook(), reference.codebook())
    out["sample"] = (engine.module.sample(cond, sampling, torch.Generator().manual_seed(5)),
                     reference.sample(cond, sampling, torch.Generator().manual_seed(5)))
    # the PF-ODE pairs of the generator's regression start run the sampler with a pick rule (whole teacher gathered)
    eps = torch.randn(3, reference.num_tokens, reference.embed_dim, generator=torch.Generator().manual_seed(6))
    out["ode"] = tuple(teacher_ode_tokens(t, eps, cond, sampling, reference.codebook(), 4)
                       for t in (engine.module, reference))
    with torch.no_grad():  # the tokenizer: gathered module by module inside its encoder / decoder
        images = reference.decode(ids)
        out["decode"] = (engine.module.decode(ids), images)
        out["encode"] = (engine.module.encode(images), reference.encode(images))
    full = engine.full_state_dict()
    out["state_equal"] = set(full) == set(reference.state_dict()) and all(
        torch.equal(full[k], v) for k, v in reference.state_dict().items())
    out["ratio_after_calls"] = param_bytes_ratio(engine)
    try:
        engine.set_trainable(True)
        out["refused_trainable"] = False
    except AssertionError:
        out["refused_trainable"] = True
    engine.assert_mode(False)
    return out


@pytest.mark.slow
def test_zero3_teacher_is_sharded_and_equals_the_unsharded_teacher(tmp_path):
    """Both ways of building it: partitioned at construction + loaded module by module, and the trainer's path
    (a plain module handed to the factory, partitioned in place); VAR both ways, LlamaGen the first way."""
    from dd2dist.config import load_config
    from dd2dist.teachers import build_teacher

    torch.manual_seed(3)
    paths = {"var": str(tmp_path / "var.pt"), "llamagen": str(tmp_path / "llamagen.pt")}
    torch.save(build_teacher(load_config(None).teacher).state_dict(), paths["var"])
    torch.save(build_teacher(load_config(None, LLAMAGEN).teacher).state_dict(), paths["llamagen"])
    outs = [o for per_rank in run_ranks(_teacher_worker, 2, paths) for o in per_rank.values()]
    for out in outs:
        # each rank holds half of every tensor (plus <= world-1 padding elements per tensor)
        assert out["ratio"] <= 0.55 and out["ratio_after_calls"] <= 0.55
        assert math.isclose(out["ratio"], 0.5, abs_tol=0.01)
        for key in ("log_probs", "features", "codebook", "decode"):
            torch.testing.assert_close(*out[key], rtol=0, atol=0, msg=key)
        assert torch.equal(*out["sample"]) and torch.equal(*out["ode"]) and torch.equal(*out["encode"])
        assert out["state_equal"] and out["refused_trainable"]


def _dtype_worker(rank: int, world: int, path: str):
    """The partitioned teacher's dtype when the accelerator reports no fp16 support (AMD EPYC CPUs, for one)."""
    from deepspeed.accelerator import get_accelerator

    from dd2dist.config import load_config
    from dd2dist.launch.partitioned_models import build_partitioned_teacher

    get_accelerator().is_fp16_supported = lambda: False  # what DeepSpeed's CPU accelerator says on such machines
    cfg = load_config(None)
    return {precision: sorted({str(p.dtype) for p in build_partitioned_teacher(cfg.teacher, path,
                                                                             precision=precision).parameters()})
            for precision in ("fp32", "bf16")}


def test_partitioned_teacher_keeps_the_configured_precision_without_fp16_support(tmp_path):
    """DeepSpeed's zero.Init ignores its dtype argument where the accelerator has no fp16 and builds in bf16:
    the precision must come through the config (an fp32 teacher stayed bf16 on this project's AMD machines)."""
    from dd2dist.config import load_config
    from dd2dist.teachers import build_teacher

    path = str(tmp_path / "var.pt")
    torch.save(build_teacher(load_config(None).teacher).state_dict(), path)
    out = run_ranks(_dtype_worker, 1, path)[0]
    assert out == {"fp32": ["torch.float32"], "bf16": ["torch.bfloat16"]}


def _mismatch_worker(rank: int, world: int, path: str):
    from dd2dist.config import load_config
    from dd2dist.launch.partitioned_models import build_partitioned_teacher

    cfg = load_config(None, ["teacher.var.width=32", "teacher.var.num_heads=2"])
    try:
        build_partitioned_teacher(cfg.teacher, path)
    except ValueError as err:
        return str(err)
    return ""


def test_partitioned_teacher_names_the_mismatching_key(tmp_path):
    from dd2dist.config import load_config
    from dd2dist.teachers import build_teacher

    path = tmp_path / "teacher.pt"
    torch.save({"teacher": build_teacher(load_config(None).teacher).state_dict()}, path)
    (message,) = run_ranks(_mismatch_worker, 1, str(path))
    assert str(path) in message and "transformer." in message and "shape" in message
