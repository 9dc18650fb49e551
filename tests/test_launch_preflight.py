"""jobs/distill.py refuses bad runs before any Ray worker starts, naming the key or the file (exit code 2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from dd2dist.config import ConfigError, load_config
from dd2dist.launch.preflight import validate_run
from dd2dist.teachers import build_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "experiments" / "smoke_var_deepspeed.yaml")


def _distill():
    spec = importlib.util.spec_from_file_location("distill_job", ROOT / "jobs" / "distill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(argv, capsys, monkeypatch) -> tuple[int, str]:
    import ray

    import dd2dist.launch.ray_train as ray_train

    # Another test of the session may already hold a Ray instance, so "Ray is not initialised" proves nothing:
    # instead any attempt to start or join Ray, or to launch, fails the test.
    def refuse(*args, **kwargs):
        raise AssertionError("a refused run must not start Ray")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray_train, "launch", refuse)
    code = _distill().main(argv)
    err = capsys.readouterr().err
    assert "must not start Ray" not in err
    return code, err


def test_smoke_var_deepspeed_recipe_validates():
    cfg = load_config(TINY)
    validate_run(cfg)
    assert cfg.launch.num_workers == 2 and cfg.engine.kind == "deepspeed"
    assert cfg.stages == ("stage1", "stage2", "alignment")


def test_config_error_names_the_key(tmp_path, capsys, monkeypatch):
    argv = ["--config", TINY, "--set", "stage2.guidance_per_generator=0", "--output", str(tmp_path)]
    code, err = _run(argv, capsys, monkeypatch)
    assert code == 2 and "stage2.guidance_per_generator" in err
    code, err = _run(["--config", TINY, "--set", "stage2.no_such_key=1"], capsys, monkeypatch)
    assert code == 2 and "stage2.no_such_key" in err


def test_missing_checkpoint_names_the_file(tmp_path, capsys, monkeypatch):
    missing = tmp_path / "nowhere" / "teacher.pt"
    code, err = _run(["--config", TINY, "--set", f"teacher.checkpoint={missing}"], capsys, monkeypatch)
    assert code == 2 and "teacher.checkpoint" in err and str(missing) in err


def test_a_teacher_without_weights_is_refused_unless_random_weights_are_meant(capsys, monkeypatch):
    # the demo recipe run by hand without the trained teacher's file: it would distil random weights for 10 minutes
    demo = str(ROOT / "configs" / "demo" / "llamagen.yaml")
    code, err = _run(["--config", demo], capsys, monkeypatch)
    assert code == 2 and "teacher.checkpoint" in err and "not set" in err and "teacher.random_init=true" in err
    with pytest.raises(ConfigError) as info:
        validate_run(load_config(None))  # the schema's default teacher asks for weights too
    assert info.value.key == "teacher.checkpoint"
    # the tiny test teachers say that random weights are meant; any config can say so
    assert load_config(TINY).teacher.random_init and not load_config(demo).teacher.random_init
    validate_run(load_config(None, ["teacher.random_init=true"]))


def test_teacher_shape_mismatch_names_key_and_file(tmp_path, capsys, monkeypatch):
    other = load_config(None, ["teacher.var.width=32", "teacher.var.num_heads=2"]).teacher
    path = tmp_path / "narrow_teacher.pt"
    torch.save({"teacher": build_teacher(other).state_dict()}, path)
    code, err = _run(["--config", TINY, "--set", f"teacher.checkpoint={path}"], capsys, monkeypatch)
    assert code == 2 and str(path) in err and "transformer.pos_start" in err and "shape" in err


def test_checkpoint_with_foreign_keys_is_refused(tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"encoder.weight": torch.zeros(2)}, path)
    with pytest.raises(ConfigError, match="missing keys") as info:
        validate_run(load_config(TINY, [f"teacher.checkpoint={path}"]))
    assert info.value.key == "teacher.checkpoint"


def test_a_matching_checkpoint_passes(tmp_path):
    path = tmp_path / "teacher.pt"
    cfg = load_config(TINY)
    torch.save(build_teacher(cfg.teacher).state_dict(), path)
    validate_run(load_config(TINY, [f"teacher.checkpoint={path}"]))


@pytest.mark.parametrize(
    "override, key",
    [
        (["engine.kind=torch"], "engine.kind"),  # 2 workers without gradient sync
        (["engine.zero_stage_teacher=2"], "engine.zero_stage_teacher"),
    ],
)
def test_unrunnable_engine_settings(override, key):
    with pytest.raises(ConfigError) as info:
        validate_run(load_config(TINY, override))
    assert info.value.key == key


def test_zero3_trainables_are_accepted():
    # ZeRO-3 generator/guidance route their calls through DeepSpeed's root forward (dd2dist/engine/zero3_calls.py)
    validate_run(load_config(TINY, ["engine.zero_stage_generator=3", "engine.zero_stage_guidance=3"]))


def test_teacher_modules_import_first_inside_the_meta_block_of_validation():
    """validate_teacher_checkpoint builds the teacher under ``torch.device("meta")``; in a fresh process (``python
    jobs/distill.py``) that is where each teacher module is first imported, so no module-level value may need a
    real tensor (a torch-computed module constant in teachers.llamagen once made every LlamaGen distill fail there)."""
    import subprocess
    import sys

    code = ("import torch\n"
            "with torch.device('meta'):\n"
            "    from dd2dist.teachers import build_family\n"
            "    from dd2dist.teachers.arch import VARConfig, LlamaGenConfig\n"
            "    for family in ('var', 'llamagen'):\n"
            "        build_family(family, var=VARConfig(), llamagen=LlamaGenConfig())\n"
            "    import dd2dist.teachers.var_official, dd2dist.teachers.llamagen_official\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# ---- teacher-token shards checked before launch -----------------------------------------------------------------

LLAMAGEN = str(ROOT / "configs" / "experiments" / "smoke_llamagen_torch.yaml")


@pytest.fixture
def shard_sets(tiny_shards):
    return tiny_shards


def _shards_argv(tmp_path, shards, *extra):
    return ["--config", TINY, "--output", str(tmp_path / "run"), "--set", "data.source=shards",
            "--set", f"data.shards={shards}", *extra]


def test_another_teachers_shards_are_refused_before_any_worker(tmp_path, shard_sets, capsys, monkeypatch):
    from dd2dist.data import teacher_id

    code, err = _run(_shards_argv(tmp_path, shard_sets["smoke_llamagen_torch"]), capsys, monkeypatch)
    first = sorted(shard_sets["smoke_llamagen_torch"].glob("*.tar"))[0]
    assert code == 2 and err.count("\n") == 1, err  # one message
    assert f"data.shards: shard {first} (sample s000000000) holds another token layout" in err
    assert "llamagen raster:4x4, 16 tokens/sample, vocab 64, 10 classes" in err  # found
    assert "expects var var:1,2,4, 21 tokens/sample, vocab 64, 10 classes" in err  # expected
    assert teacher_id(load_config(TINY).teacher, 0) in err and teacher_id(load_config(LLAMAGEN).teacher, 0) in err
    assert not (tmp_path / "run").exists()  # nothing was started, not even the run directory


def test_same_layout_other_teacher_is_refused_by_fingerprint(tmp_path, shard_sets, capsys, monkeypatch):
    # seed 1: the random-init teacher (no checkpoint) is another teacher with the same architecture
    code, err = _run(_shards_argv(tmp_path, shard_sets["smoke_var_deepspeed"], "--set", "seed=1"), capsys, monkeypatch)
    assert code == 2 and "was made by teacher var-own-" in err and "this run's teacher is var-own-" in err
    assert "same layout: var var:1,2,4, 21 tokens/sample" in err


def test_a_foreign_shard_in_a_mixed_set_is_named(tmp_path, shard_sets):
    import shutil

    mixed = tmp_path / "mixed"
    shutil.copytree(shard_sets["smoke_var_deepspeed"], mixed)
    foreign = sorted(shard_sets["smoke_llamagen_torch"].glob("*.tar"))[-1]
    shutil.copy(foreign, mixed / "zz-foreign.tar")
    with pytest.raises(ConfigError, match=f"shard {mixed / 'zz-foreign.tar'} .*another token layout") as info:
        validate_run(load_config(TINY, ["data.source=shards", f"data.shards={mixed}"]))
    assert info.value.key == "data.shards"


def test_matching_shards_pass_and_a_damaged_one_is_left_to_the_stream(tmp_path, shard_sets):
    import shutil

    from dd2dist.launch.preflight import validate_data

    copy = tmp_path / "own"
    shutil.copytree(shard_sets["smoke_var_deepspeed"], copy)
    cfg = load_config(TINY, ["data.source=shards", f"data.shards={copy}"])
    assert validate_data(cfg) == {"shards": 6, "checked": 6, "unreadable": [], "warnings": []}
    damaged = sorted(copy.glob("*.tar"))[0]
    damaged.write_bytes(b"\0" * 100)  # truncated to nothing useful: counted and skipped by the stream
    report = validate_data(cfg)
    assert report["unreadable"] == [str(damaged)]
    for tar in copy.glob("*.tar"):
        tar.write_bytes(b"\0" * 100)
    with pytest.raises(ConfigError, match="none of the 6 shards checked has a readable first sample"):
        validate_data(cfg)


def test_precompute_manifest_of_another_teacher_is_refused(tmp_path, shard_sets):
    import json
    import shutil

    copy = tmp_path / "own"
    shutil.copytree(shard_sets["smoke_var_deepspeed"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "teacher_id": "var-own-000000000000"}))
    with pytest.raises(ConfigError, match=r"manifest.json says these shards were made by teacher var-own-000000000000"):
        validate_run(load_config(TINY, ["data.source=shards", f"data.shards={copy}"]))
