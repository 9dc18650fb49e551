"""AR teachers: the interface, the two families, and loading of official checkpoints.

``build_teacher(cfg)`` builds our own implementation from a ``teacher`` config section (optionally loading a
checkpoint); ``load_official(kind, model_path, tokenizer_path)`` loads the released VAR / LlamaGen files through
explicit key maps. Family modules are imported lazily so that importing the interface stays cheap.
"""

from __future__ import annotations

from dd2dist.teachers.arch import OFFICIAL_ARCHS, LlamaGenConfig, VARConfig, VARVQConfig, VQ16Config
from dd2dist.teachers.base import ARTeacher

OFFICIAL_KINDS = tuple(OFFICIAL_ARCHS)

__all__ = [
    "ARTeacher", "VARConfig", "VARVQConfig", "LlamaGenConfig", "VQ16Config",
    "OFFICIAL_ARCHS", "OFFICIAL_KINDS", "build_family", "build_seeded_teacher", "build_teacher", "load_official",
]


def build_family(family: str, var: VARConfig | None = None, llamagen: LlamaGenConfig | None = None) -> ARTeacher:
    """A randomly initialised teacher of ``family`` ("var" | "llamagen") with the given architecture."""
    if family == "var":
        from dd2dist.teachers.var import VARTeacher

        return VARTeacher(var or VARConfig())
    if family == "llamagen":
        from dd2dist.teachers.llamagen import LlamaGenTeacher

        return LlamaGenTeacher(llamagen or LlamaGenConfig())
    raise ValueError(f"teacher.family must be 'var' or 'llamagen', got {family!r}")


def load_official(kind: str, model_path: str, tokenizer_path: str) -> ARTeacher:
    """Load a released checkpoint pair into our own modules (frozen). ``kind`` is one of OFFICIAL_KINDS."""
    if kind not in OFFICIAL_ARCHS:
        raise ValueError(f"unknown official teacher kind {kind!r}; expected one of {', '.join(OFFICIAL_KINDS)}")
    if kind.startswith("var_"):
        from dd2dist.teachers.var_official import load_var_official

        return load_var_official(kind, model_path, tokenizer_path).freeze()
    from dd2dist.teachers.llamagen_official import load_llamagen_official

    return load_llamagen_official(kind, model_path, tokenizer_path).freeze()


def build_teacher(cfg) -> ARTeacher:
    """The frozen teacher described by a ``teacher`` config section (see dd2dist/config/schema.py).

    ``official`` set: released files at ``checkpoint`` / ``tokenizer_checkpoint``. Otherwise our own
    architecture from ``cfg.var`` / ``cfg.llamagen``, loading ``checkpoint`` (a dd2dist teacher state dict,
    e.g. from jobs/train_teacher.py) when given.
    """
    import torch

    if cfg.official:
        if not (cfg.checkpoint and cfg.tokenizer_checkpoint):
            raise ValueError(
                f"teacher.official={cfg.official!r} needs teacher.checkpoint and "
                "teacher.tokenizer_checkpoint (local paths)"
            )
        return load_official(cfg.official, cfg.checkpoint, cfg.tokenizer_checkpoint)
    teacher = build_family(cfg.family, var=cfg.var, llamagen=cfg.llamagen)
    if cfg.checkpoint:
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        state = state.get("teacher", state)
        missing, unexpected = teacher.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"teacher.checkpoint {cfg.checkpoint} does not match the configured {cfg.family} architecture: "
                f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
            )
    return teacher.freeze()


def build_seeded_teacher(cfg, seed: int) -> ARTeacher:
    """:func:`build_teacher` with the torch RNG seeded first, so a teacher without a checkpoint gets the same random
    weights in every process (each Ray worker builds its own copy; ``dd2dist.data.identity.teacher_id`` counts the
    seed as part of such a teacher's identity)."""
    import torch

    torch.manual_seed(seed)
    return build_teacher(cfg)
