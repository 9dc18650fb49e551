"""YAML loading, includes, --set overrides, the resolved dump and the experiment schema's own rules."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import yaml

from dd2dist.conditions import Sampling
from dd2dist.config import (
    ConfigError,
    ExperimentConfig,
    TeacherConfig,
    add_config_args,
    config_from_args,
    dump_yaml,
    flatten,
    load_config,
    parse_config_args,
    parse_override,
    to_yaml,
)
from dd2dist.config.loader import RENAMED_CONFIGS
from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig, VARConfig

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "base.yaml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _raises(fn, *args, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kw)
    return info.value


# ---- base.yaml and defaults ------------------------------------------------------------------------------
def test_base_yaml_equals_schema_defaults():
    assert load_config(BASE) == ExperimentConfig()
    assert load_config(None) == ExperimentConfig()


def test_base_yaml_writes_out_every_key():
    raw = yaml.safe_load(BASE.read_text())

    def keys(d, prefix=""):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                yield from keys(v, key + ".")
            else:
                yield key

    assert set(keys(raw)) == set(flatten(ExperimentConfig()))


def test_derived_defaults_are_absolute_and_follow_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["name=exp1"])
    assert cfg.output_dir == str(tmp_path / "runs" / "exp1")
    assert cfg.launch.storage_path == str(tmp_path / "runs" / "exp1" / "ray")
    cfg = load_config(None, ["output_dir=out/x", "launch.storage_path=s3://bucket/ray"])
    assert cfg.output_dir == str(tmp_path / "out" / "x")
    assert cfg.launch.storage_path == "s3://bucket/ray"  # URIs are not turned into local paths


# ---- overrides -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, read, expected",
    [
        ("seed=7", lambda c: c.seed, 7),
        ("stage1.lr=1e-3", lambda c: c.stage1.lr, 1e-3),  # YAML 1.1 would read "1e-3" as a string
        ("stage1.lr=3", lambda c: c.stage1.lr, 3.0),
        ("stage2.csd_alpha=0.5", lambda c: c.stage2.csd_alpha, 0.5),
        ("engine.activation_checkpointing=true", lambda c: c.engine.activation_checkpointing, True),
        ("tracking.enabled=false", lambda c: c.tracking.enabled, False),
        ("eval.refine_steps=[2, 3]", lambda c: c.eval.refine_steps, (2, 3)),
        ("stage2.betas=[0.5,0.99]", lambda c: c.stage2.betas, (0.5, 0.99)),
        ("stages=[stage2]", lambda c: c.stages, ("stage2",)),
        ("tracking.tracking_uri=http://mlflow:5000", lambda c: c.tracking.tracking_uri, "http://mlflow:5000"),
        ("tracking.tracking_uri=null", lambda c: c.tracking.tracking_uri, None),
        ("tracking.experiment=2024", lambda c: c.tracking.experiment, "2024"),  # str field keeps the text
        ("name=007", lambda c: c.name, "007"),
        ("engine.kind=deepspeed", lambda c: c.engine.kind, "deepspeed"),
        ("teacher.sampling.top_p=0.95", lambda c: c.teacher.sampling.top_p, 0.95),
        ("teacher.sampling={guidance_scale: 1.5, top_k: 3}", lambda c: c.teacher.sampling,
         Sampling(guidance_scale=1.5, guidance_schedule="var_linear", top_k=3)),  # merged into the section
        ("teacher.var.patch_nums=[1, 2, 3, 4]", lambda c: c.teacher.var.patch_nums, (1, 2, 3, 4)),
    ],
)
def test_override_values_are_parsed_as_yaml(override, read, expected):
    cfg = load_config(BASE, [override])
    value = read(cfg)
    assert value == expected and type(value) is type(expected)


def test_later_override_wins_and_file_value_is_overridden(tmp_path):
    path = _write(tmp_path / "e.yaml", "stage1:\n  lr: 5.0e-4\n")
    assert load_config(path).stage1.lr == 5e-4
    assert load_config(path, ["stage1.lr=1e-5", "stage1.lr=2e-5"]).stage1.lr == 2e-5


@pytest.mark.parametrize("override, key", [
    ("stage1.learning_rate=1", "stage1.learning_rate"),
    ("nope=1", "nope"),
    ("teacher.var.tokenizer.chanels=1", "teacher.var.tokenizer.chanels"),
    ("seed.x=1", "seed.x"),
])
def test_unknown_override_key_is_named(override, key):
    err = _raises(load_config, BASE, [override])
    assert err.key == key
    assert err.source == f"--set {override}"


def test_malformed_override():
    assert "KEY=VALUE" in str(_raises(parse_override, "seed"))
    assert "KEY=VALUE" in str(_raises(parse_override, "=3"))


def test_bad_override_value_names_key():
    err = _raises(load_config, BASE, ["stage2.guidance_per_generator=0"])
    assert err.key == "stage2.guidance_per_generator" and ">= 1" in err.message
    err = _raises(load_config, BASE, ["engine.precision=fp16"])
    assert err.key == "engine.precision" and "'fp32', 'bf16'" in err.message
    err = _raises(load_config, BASE, ["stage1.batch_size=abc"])
    assert err.key == "stage1.batch_size" and "expected int" in err.message


# ---- errors from files -----------------------------------------------------------------------------------
def test_file_errors_name_key_and_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "stage2:\n  ema_maxx: 0.99\n")
    err = _raises(load_config, path)
    assert err.key == "stage2.ema_maxx" and "ema_max" in err.message and str(path) in str(err)

    path = _write(tmp_path / "bad2.yaml", "launch:\n  num_workers: two\n")
    err = _raises(load_config, path)
    assert err.key == "launch.num_workers" and "expected int" in err.message and "str 'two'" in err.message

    err = _raises(load_config, _write(tmp_path / "bad3.yaml", "stage2: [1, 2]\n"))
    assert err.key == "stage2" and "expected a mapping" in err.message

    err = _raises(load_config, _write(tmp_path / "bad4.yaml", "seed: [unclosed\n"))
    assert "invalid YAML" in err.message

    err = _raises(load_config, _write(tmp_path / "bad5.yaml", "- a\n- b\n"))
    assert "mapping at the top level" in err.message

    err = _raises(load_config, tmp_path / "absent.yaml")
    assert "config file not found" in err.message and "absent.yaml" in err.message


def test_missing_file_path_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _raises(load_config, None, ["teacher.checkpoint=ckpt/teacher.pt"])
    assert err.key == "teacher.checkpoint"
    assert str(tmp_path / "ckpt" / "teacher.pt") in err.message
    err = _raises(load_config, None, ["eval.inception_weights=/no/such/inception.pth"])
    assert err.key == "eval.inception_weights" and "/no/such/inception.pth" in err.message

    _write(tmp_path / "ckpt" / "teacher.pt", "x")
    cfg = load_config(None, ["teacher.checkpoint=ckpt/teacher.pt"])
    assert cfg.teacher.checkpoint == str(tmp_path / "ckpt" / "teacher.pt")


# ---- includes --------------------------------------------------------------------------------------------
def test_defaults_are_merged_in_order_then_own_keys(tmp_path):
    _write(tmp_path / "parts" / "a.yaml", "seed: 1\nstage1:\n  lr: 1.0e-3\n  steps: 5\n")
    _write(tmp_path / "parts" / "b.yaml", "seed: 2\nstage1:\n  steps: 6\n")  # deep merge: lr survives
    path = _write(tmp_path / "exp.yaml", "defaults: [parts/a.yaml, parts/b.yaml]\nstage1:\n  warmup_steps: 3\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.stage1.lr, cfg.stage1.steps, cfg.stage1.warmup_steps) == (2, 1e-3, 6, 3)

    own_wins = _write(tmp_path / "exp2.yaml", "include: parts/a.yaml\nseed: 9\n")
    assert load_config(own_wins).seed == 9


def test_section_include_and_nested_include(tmp_path):
    _write(tmp_path / "teachers" / "lg_common.yaml", "family: llamagen\nsampling:\n  guidance_schedule: constant\n")
    _write(
        tmp_path / "teachers" / "lg_tiny.yaml",
        "defaults: [lg_common.yaml]\nllamagen:\n  grid: 2\n  input_adapter: soft\n",
    )
    path = _write(tmp_path / "experiments" / "x.yaml", "defaults:\n  - teacher: ../teachers/lg_tiny.yaml\n")
    cfg = load_config(path)
    assert cfg.teacher.family == "llamagen"
    assert cfg.teacher.sampling == Sampling(guidance_scale=2.0, guidance_schedule="constant")
    assert cfg.teacher.llamagen == LlamaGenConfig(grid=2, input_adapter="soft")
    assert cfg.teacher.arch == cfg.teacher.llamagen


def test_include_falls_back_to_cwd(tmp_path, monkeypatch):
    _write(tmp_path / "configs" / "teachers" / "t.yaml", "teacher:\n  dtype: bfloat16\n")
    path = _write(tmp_path / "configs" / "experiments" / "x.yaml", "defaults: [configs/teachers/t.yaml]\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).teacher.dtype == "bfloat16"


def test_include_errors(tmp_path):
    err = _raises(load_config, _write(tmp_path / "m.yaml", "defaults: [nothere.yaml]\n"))
    assert err.key == "defaults" and "nothere.yaml" in err.message
    _write(tmp_path / "c1.yaml", "defaults: [c2.yaml]\n")
    _write(tmp_path / "c2.yaml", "defaults: [c1.yaml]\n")
    err = _raises(load_config, tmp_path / "c1.yaml")
    assert "include cycle" in err.message
    err = _raises(load_config, _write(tmp_path / "d.yaml", "defaults: [{a: x.yaml, b: y.yaml}]\n"))
    assert err.key == "defaults[0]"
    err = _raises(load_config, _write(tmp_path / "e.yaml", "defaults: [a.yaml]\ninclude: [b.yaml]\n"))
    assert "either" in err.message


# ---- dump and reload -------------------------------------------------------------------------------------
def test_dump_reload_gives_equal_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = _write(tmp_path / "w" / "teacher.pt", "x")
    for i in range(2):
        _write(tmp_path / "data" / f"teacher-{i:06d}.tar", "")
    cfg = load_config(
        None,
        [
            "name=roundtrip",
            "stages=[stage1, stage2, alignment]",
            "alignment.enabled=true",
            "teacher.family=llamagen",
            "teacher.checkpoint=w/teacher.pt",
            "teacher.llamagen.tokenizer.ch_mult=[1, 1, 2]",
            "teacher.sampling={guidance_scale: 1.75, guidance_schedule: constant, top_k: 8, top_p: 0.9, "
            "temperature: 0.8}",
            "stage1.lr=1e-5",
            "stage2.csd_loss=dmd",
            "stage2.betas=[0.0, 0.99]",
            "eval.refine_steps=[2, 3]",
            "tracking.experiment=1e-3",  # a string that looks like a float must survive the dump
            "data.source=shards",
            "data.shards=data/teacher-{000000..000001}.tar",
        ],
    )
    assert cfg.data.shards == str(tmp_path / "data" / "teacher-{000000..000001}.tar")
    assert cfg.teacher.checkpoint == str(ckpt)
    assert cfg.tracking.experiment == "1e-3"
    out = dump_yaml(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(out)
    assert again == cfg
    assert again.teacher.sampling == Sampling(1.75, "constant", 8, 0.9, 0.8)
    assert again.teacher.llamagen.tokenizer.ch_mult == (1, 1, 2)
    assert again.tracking.tracking_uri is None
    # the dump holds resolved absolute paths, so it reloads the same from any directory
    monkeypatch.chdir(REPO)
    assert load_config(out) == cfg
    assert yaml.safe_load(to_yaml(cfg))["teacher"]["checkpoint"] == str(ckpt)


def test_dump_of_defaults_reloads_equal(tmp_path):
    cfg = ExperimentConfig()
    assert load_config(dump_yaml(cfg, tmp_path / "c.yaml")) == cfg


# ---- argparse --------------------------------------------------------------------------------------------
def test_config_args(tmp_path):
    path = _write(tmp_path / "e.yaml", "seed: 3\n")
    parser = add_config_args(argparse.ArgumentParser())
    ns = parser.parse_args(["--config", str(path), "--set", "stage1.steps=2", "--set", "engine.grad_accum=4"])
    cfg = config_from_args(ns)
    assert (cfg.seed, cfg.stage1.steps, cfg.engine.grad_accum) == (3, 2, 4)
    assert config_from_args(parser.parse_args([])) == ExperimentConfig()


# ---- the experiment schema's cross-field rules -----------------------------------------------------------
def test_official_teacher_must_match_family():
    err = _raises(load_config, None, ["teacher.official=llamagen_l"])  # family defaults to var
    assert err.key == "teacher.official" and "llamagen" in err.message
    err = _raises(load_config, None, ["teacher.official=var_d99"])
    assert err.key == "teacher.official" and "var_d16" in err.message
    cfg = load_config(None, ["teacher.official=var_d16"])
    assert cfg.teacher.arch == OFFICIAL_ARCHS["var_d16"]
    err = _raises(load_config, None, ["teacher.official=var_d16", "teacher.var.depth=7"])
    assert err.key == "teacher.var" and "ignored" in err.message


def test_sampling_and_adapter_ranges():
    assert _raises(load_config, None, ["teacher.sampling.top_p=0"]).key == "teacher.sampling.top_p"
    assert _raises(load_config, None, ["teacher.sampling.top_k=-1"]).key == "teacher.sampling.top_k"
    assert _raises(load_config, None, ["teacher.sampling.temperature=0"]).key == "teacher.sampling.temperature"
    err = _raises(load_config, None, ["teacher.sampling.guidance_schedule=linear"])
    assert err.key == "teacher.sampling.guidance_schedule" and "var_linear" in err.message
    assert _raises(load_config, None, ["teacher.llamagen.input_adapter=x"]).key == "teacher.llamagen.input_adapter"


def test_old_sampling_key_names_still_load_with_one_warning_each(tmp_path, monkeypatch):
    from dd2dist.config import typed

    monkeypatch.setattr(typed, "_WARNED_RENAMES", set())
    old = _write(tmp_path / "old.yaml", "teacher:\n  sampling: {cfg: 1.5, cfg_schedule: constant, top_k: 3}\n")
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_config(old)
        again = load_config(old)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(messages) == 2  # once per key and process, not once per load
    assert any("'teacher.sampling.cfg'" in m and "'teacher.sampling.guidance_scale'" in m for m in messages)
    assert any("'teacher.sampling.cfg_schedule'" in m and "guidance_schedule" in m for m in messages)
    expected = Sampling(guidance_scale=1.5, guidance_schedule="constant", top_k=3)
    assert cfg.teacher.sampling == again.teacher.sampling == expected
    # The new names in the resolved dump: a reload gives the same config without a warning.
    assert "cfg:" not in to_yaml(cfg) and "guidance_scale: 1.5" in to_yaml(cfg)


def test_old_sampling_key_in_an_override_and_both_names_at_once(tmp_path, monkeypatch):
    from dd2dist.config import typed

    monkeypatch.setattr(typed, "_WARNED_RENAMES", set())
    with pytest.warns(DeprecationWarning, match="teacher.sampling.cfg"):
        cfg = load_config(BASE, ["teacher.sampling.cfg=3.0"])  # base.yaml says guidance_scale: the override wins
    assert cfg.teacher.sampling.guidance_scale == 3.0
    both = _write(tmp_path / "both.yaml", "teacher:\n  sampling: {cfg: 1.5, guidance_scale: 2.0}\n")
    err = _raises(load_config, both)
    assert err.key == "teacher.sampling.cfg" and "guidance_scale" in err.message


def test_a_stored_config_with_a_retired_key_loads_with_one_warning(tmp_path, monkeypatch):
    from dd2dist.config import typed

    monkeypatch.setattr(typed, "_WARNED_RENAMES", set())
    old = _write(tmp_path / "old.yaml", "tracking:\n  progress_bar: true\n  log_every: 5\n")
    with pytest.warns(DeprecationWarning, match="'tracking.progress_bar' is no longer used") as caught:
        cfg = load_config(old)
        load_config(old)
    assert len([w for w in caught if issubclass(w.category, DeprecationWarning)]) == 1
    assert cfg.tracking.log_every == 5 and "progress_bar" not in to_yaml(cfg)
    assert _raises(load_config, None, ["tracking.progress_barr=true"]).key == "tracking.progress_barr"


def test_stage_and_section_rules():
    assert _raises(load_config, None, ["stages=[stage2, stage1]"]).key == "stages"
    assert _raises(load_config, None, ["stages=[stage1, stage1]"]).key == "stages"
    assert _raises(load_config, None, ["stages=[stage3]"]).key == "stages[0]"
    assert _raises(load_config, None, ["stages=[stage2, alignment]"]).key == "alignment.enabled"
    assert _raises(load_config, None, ["data.source=shards"]).key == "data.shards"
    err = _raises(load_config, None, ["stage2.csd_t_min=0.97"])
    assert err.key == "stage2.csd_t_min"
    assert _raises(load_config, None, ["name=a b"]).key == "name"
    assert _raises(load_config, None, ["engine.zero_stage_generator=4"]).key == "engine.zero_stage_generator"
    assert _raises(load_config, None, ["eval.refine_steps=[1]"]).key == "eval.refine_steps[0]"
    assert _raises(load_config, None, ["stage2.ema_compare=[0.99, 0.99]"]).key == "stage2.ema_compare"
    assert _raises(load_config, None, ["stage2.ema_compare=[1.5]"]).key == "stage2.ema_compare[0]"
    assert load_config(None, ["stage2.ema_compare=[0.995, 0.998]"]).stage2.ema_compare == (0.995, 0.998)


def test_config_objects_are_frozen_and_schema_types_reused():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1  # type: ignore[misc]
    assert isinstance(cfg.teacher, TeacherConfig)
    assert isinstance(cfg.teacher.var, VARConfig) and isinstance(cfg.teacher.sampling, Sampling)
    assert os.path.isabs(cfg.output_dir)


def test_partial_section_keeps_the_fields_own_default():
    # teacher.sampling defaults to Sampling(guidance_scale=2.0, guidance_schedule="var_linear"), not to
    # Sampling()'s defaults
    cfg = load_config(None, ["teacher.sampling.top_p=0.95"])
    assert cfg.teacher.sampling == Sampling(guidance_scale=2.0, guidance_schedule="var_linear", top_p=0.95)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")))
def test_every_repo_config_validates(path, monkeypatch):
    """Every YAML under configs/ loads against the schema (file existence is the run's concern, not checked)."""
    monkeypatch.chdir(REPO)
    cfg = load_config(path, check_paths=False)
    assert isinstance(cfg, ExperimentConfig)


def test_config_pickles_equal_for_ray_workers():
    import pickle

    cfg = load_config(BASE, ["name=pk", "eval.refine_steps=[2]"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_dump_replaces_file_atomically(tmp_path):
    target = _write(tmp_path / "c.yaml", "old: true\n")
    dump_yaml(ExperimentConfig(), target)
    assert load_config(target) == ExperimentConfig()
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temporary file left behind


def test_config_from_args_can_skip_path_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = add_config_args(argparse.ArgumentParser()).parse_args(["--set", "data.shards=out/s-{0..1}.tar"])
    assert _raises(config_from_args, ns).key == "data.shards"
    assert config_from_args(ns, check_paths=False).data.shards == str(tmp_path / "out" / "s-{0..1}.tar")


def test_parse_config_args_exits_with_the_key(capsys):
    parser = add_config_args(argparse.ArgumentParser(prog="job"))
    ns, cfg = parse_config_args(parser, ["--set", "seed=5"])
    assert cfg.seed == 5 and ns.overrides == ["seed=5"]
    with pytest.raises(SystemExit) as info:
        parse_config_args(parser, ["--set", "stage2.ema_maxx=0.9"])
    assert info.value.code == 2
    assert "job: error: stage2.ema_maxx: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(p.name for p in (REPO / "configs" / "teachers").glob("*.yaml")))
def test_repo_teacher_files_include_as_plain_paths(path, tmp_path):
    exp = _write(tmp_path / "exp.yaml", f"defaults: [{REPO / 'configs' / 'teachers' / path}]\nseed: 4\n")
    cfg = load_config(exp, check_paths=False)
    assert cfg == load_config(REPO / "configs" / "teachers" / path, ["seed=4"], check_paths=False)


@pytest.mark.parametrize("old", sorted(RENAMED_CONFIGS))
def test_renamed_preset_fails_naming_its_new_path(old, monkeypatch):
    monkeypatch.chdir(REPO)
    new = RENAMED_CONFIGS[old]
    assert (REPO / new).is_file() and not (REPO / old).exists()
    err = _raises(load_config, old)
    assert "config file not found" in err.message and f"use {REPO / new}" in err.message
    assert f"use {REPO / new}" in _raises(load_config, REPO / old).message


def test_include_of_a_renamed_preset_names_its_new_path(tmp_path):
    exp = _write(tmp_path / "exp.yaml", f"defaults: [{REPO / 'configs' / 'digits' / 'var.yaml'}]\n")
    err = _raises(load_config, exp)
    assert err.key == "defaults" and str(REPO / "configs/teachers/digits_var.yaml") in err.message
