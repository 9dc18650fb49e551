"""Checks a run's config BEFORE any Ray worker starts: what the schema cannot see on its own.

The loader already refuses unknown keys, bad types/ranges and missing files (naming the dotted key). Here:
combinations the distributed launch cannot run, a teacher checkpoint that does not fit the configured
architecture (checked on the meta device: no weights are materialised, the checkpoint is memory-mapped), and
teacher-token shards of another layout or teacher (:mod:`dd2dist.data.precheck`: the first samples are read),
and the caption source of a text-conditional teacher (its captions must fit the teacher's slots and width).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from dd2dist.config import ConfigError

log = logging.getLogger("dd2dist.launch")


def validate_launch(cfg) -> None:
    """Raise ConfigError (naming the key) for settings the launcher cannot run."""
    eng, launch = cfg.engine, cfg.launch
    if eng.kind == "torch" and launch.num_workers > 1:
        raise ConfigError(
            "engine.kind",
            f"'torch' runs one process without gradient synchronisation; launch.num_workers={launch.num_workers} "
            "needs engine.kind=deepspeed",
        )
    if eng.kind == "deepspeed":
        if eng.zero_stage_teacher not in (0, 3):
            raise ConfigError(
                "engine.zero_stage_teacher", f"must be 0 or 3 (no optimizer), got {eng.zero_stage_teacher}"
            )
    if eng.precision == "bf16" and not launch.use_gpu and eng.kind == "torch":
        raise ConfigError("engine.precision", "bf16 needs engine.kind=deepspeed (TorchEngine trains in fp32)")
    validate_teacher_weights(cfg)


def validate_teacher_weights(cfg, use: str = "the run would distil") -> None:
    """The teacher must come with its weights: a released model with both files, any other with its checkpoint,
    unless the config says random weights are meant (``teacher.random_init``, the tiny test teachers). ``use`` says
    what a random teacher would spoil, for the message (the shard writers call this too)."""
    teacher_cfg = cfg.teacher
    if teacher_cfg.official and not (teacher_cfg.checkpoint and teacher_cfg.tokenizer_checkpoint):
        missing = "teacher.checkpoint" if not teacher_cfg.checkpoint else "teacher.tokenizer_checkpoint"
        raise ConfigError(missing, f"must be set (a local file) with teacher.official={teacher_cfg.official!r}")
    if not teacher_cfg.checkpoint and not teacher_cfg.random_init:
        raise ConfigError(
            "teacher.checkpoint",
            f"not set: {use} a randomly initialised teacher. Set it to the teacher's weights (e.g. "
            "runs/teachers/teacher-<key>.pt from jobs/train_teacher.py), or set teacher.random_init=true for a "
            "smoke run on random weights",
        )


def _load_state(path: str) -> Mapping[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {k: f.get_slice(k) for k in f.keys()}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # not a torch zip file, truncated, pickle refused
        raise ConfigError("teacher.checkpoint", f"cannot read {path}: {type(err).__name__}: {err}") from None
    if isinstance(state, Mapping) and isinstance(state.get("teacher"), Mapping):
        state = state["teacher"]
    if not isinstance(state, Mapping):
        raise ConfigError("teacher.checkpoint", f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def _shape(value) -> tuple[int, ...]:
    return tuple(value.get_shape()) if hasattr(value, "get_shape") else tuple(value.shape)


def _meta_teacher(teacher_cfg):
    """The configured teacher architecture on the meta device (shapes and attributes, no weights)."""
    from dd2dist.teachers import OFFICIAL_ARCHS, build_family

    arch = {teacher_cfg.family: OFFICIAL_ARCHS[teacher_cfg.official]} if teacher_cfg.official else {
        "var": teacher_cfg.var, "llamagen": teacher_cfg.llamagen}
    with torch.device("meta"):
        return build_family(teacher_cfg.family, var=arch.get("var"), llamagen=arch.get("llamagen"))


def validate_teacher_checkpoint(teacher_cfg) -> None:
    """A dd2dist teacher checkpoint must hold exactly the configured architecture's tensors, shape for shape.

    Official checkpoints go through their own key maps at load time and are not checked here.
    """
    path = teacher_cfg.checkpoint
    if not path or teacher_cfg.official:
        return
    model = _meta_teacher(teacher_cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = _load_state(path)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            "teacher.checkpoint",
            f"{path} does not match the configured {teacher_cfg.family} teacher: missing keys {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected keys {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}",
        )
    for key, shape in expected.items():
        if _shape(state[key]) != shape:
            raise ConfigError(
                "teacher.checkpoint",
                f"{path}: tensor {key} has shape {_shape(state[key])}, the configured teacher "
                f"(teacher.{teacher_cfg.family}) expects {shape}",
            )


def validate_data(cfg) -> dict | None:
    """With ``data.source: shards``: the first samples of the shard set (and its precompute manifest) must have
    this run's token layout and teacher fingerprint; ConfigError("data.shards", ...) names the shard and both
    sides. Returns the check's report (None for online data)."""
    if cfg.data.source != "shards":
        return None
    from dd2dist.data.identity import teacher_id, teacher_layout
    from dd2dist.data.precheck import ShardSetMismatch, check_shard_set

    expected = teacher_layout(_meta_teacher(cfg.teacher), teacher_id(cfg.teacher, cfg.seed))
    try:
        report = check_shard_set(cfg.data.shards, expected)
    except ShardSetMismatch as err:
        raise ConfigError("data.shards", str(err)) from None
    for warning in report["warnings"]:
        log.warning("data.shards: %s", warning)
    return report


def validate_captions(cfg) -> str | None:
    """A text-conditional teacher draws the conditions of stage 2 and online sampling from a caption source
    (``data.captions``, else ``data.shards``): it must be set and, for token shards, hold captions of the
    teacher's slots and width (ConfigError("data.captions", ...) naming the shard). Returns the source (None for a
    class-conditional teacher). Caption sets (a directory with captions.json) are checked when they are read."""
    if not cfg.text_conditional:
        return None
    import os

    from dd2dist.data.precheck import ShardSetMismatch, check_caption_shards
    from dd2dist.train.condition_source import CAPTION_SET_MARKER

    source = cfg.caption_source()
    if "://" in source or os.path.isfile(os.path.join(source, CAPTION_SET_MARKER)):
        return source
    arch = cfg.teacher.arch
    try:
        check_caption_shards(source, (arch.cls_token_num, arch.caption_dim))
    except (ShardSetMismatch, FileNotFoundError) as err:
        raise ConfigError("data.captions", f"{source}: {err}") from None
    return source


def validate_run(cfg) -> None:
    """Every pre-launch check (call in the driver before starting Ray workers)."""
    validate_launch(cfg)
    validate_teacher_checkpoint(cfg.teacher)
    validate_captions(cfg)
    validate_data(cfg)
