"""Which teacher a shard belongs to: a stable teacher id from the config, and the shard spec of a teacher.

The id must be equal wherever the same teacher weights are used (precompute job, training, evaluation) and
differ otherwise, so that a reader can refuse shards of another teacher. It hashes the ``teacher`` section's
identity fields: family, official kind, the architecture in use, and each checkpoint file's name and size.
A teacher without a checkpoint is randomly initialised from ``torch.manual_seed(seed)``
(:func:`dd2dist.teachers.build_seeded_teacher`), so then the seed is part of its identity too. Sampling settings and the
compute dtype are not: they do not change which codebook the ids index (they are recorded per sample instead).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, is_dataclass
from typing import Any

from dd2dist.data.schema import ShardSpec, sampling_dict


def _file_identity(path: str | None) -> list | None:
    if not path:
        return None
    size = os.path.getsize(path) if os.path.exists(path) else None
    return [os.path.basename(path), size]


def _plain(x: Any) -> Any:
    return asdict(x) if is_dataclass(x) and not isinstance(x, type) else x


def teacher_id(teacher_cfg: Any, seed: int) -> str:
    """``<family>-<official kind or "own">-<12 hex digits>`` for a ``teacher`` config section."""
    family = teacher_cfg.family
    official = getattr(teacher_cfg, "official", None)
    checkpoint = getattr(teacher_cfg, "checkpoint", None)
    ident = {
        "family": family,
        "official": official,
        "arch": None if official else _plain(getattr(teacher_cfg, family)),
        "checkpoint": _file_identity(checkpoint),
        "tokenizer_checkpoint": _file_identity(getattr(teacher_cfg, "tokenizer_checkpoint", None)),
        "init_seed": None if checkpoint else int(seed),
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, default=repr).encode()).hexdigest()[:12]
    return f"{family}-{official or 'own'}-{digest}"


def token_layout(teacher) -> str:
    """``var:1,2,3,...`` (scale side lengths, concatenated row-major) or ``raster:HxW`` for one-token steps."""
    sizes = [s.stop - s.start for s in teacher.steps]
    if teacher.family == "var":
        return "var:" + ",".join(str(math.isqrt(n)) for n in sizes)
    side = math.isqrt(teacher.num_tokens)
    return f"raster:{side}x{side}" if side * side == teacher.num_tokens else f"flat:{teacher.num_tokens}"


def teacher_spec(teacher, tid: str, sampling: Any | None, source: str = "teacher") -> ShardSpec:
    """The :class:`ShardSpec` of token shards made with (or encoded by) ``teacher``: class-conditional, or
    text-conditional with ``text_shape`` (caption slots, caption width) for a text-to-image teacher."""
    text = bool(getattr(teacher, "is_text", False))
    return ShardSpec(
        teacher_id=tid, family=teacher.family, vocab_size=int(teacher.vocab_size), token_shape=(teacher.num_tokens,),
        cond="text" if text else "class", num_classes=0 if text else int(teacher.num_classes),
        text_shape=(int(teacher.num_cond), int(teacher.cfg.caption_dim)) if text else None, source=source,
        layout=token_layout(teacher), sampling=None if sampling is None else sampling_dict(sampling),
    )


def teacher_layout(teacher, tid: str) -> dict:
    """What a shard's ``meta.json`` must say for ``teacher`` (identified by ``tid``): the fields compared before a
    launch (:mod:`dd2dist.data.precheck`). Works on a teacher built on the meta device (no weights needed)."""
    num_classes = int(teacher.num_classes)
    return {"teacher_id": tid, "family": teacher.family, "layout": token_layout(teacher),
            "num_tokens": int(teacher.num_tokens), "vocab_size": int(teacher.vocab_size),
            "cond": "class" if num_classes > 0 else "text", "num_classes": num_classes if num_classes > 0 else None,
            "text_shape": teacher_text_shape(teacher)}


def teacher_text_shape(teacher) -> tuple[int, int] | None:
    """(T caption slots, Dt feature width) that a text-conditional teacher reads; None for class-conditional ones.
    The teacher fingerprint already covers them, but a shard of another width must be refused by its layout, with
    both sides named, before a worker meets it as a shape error."""
    arch = getattr(teacher, "cfg", None)
    caption_dim = int(getattr(arch, "caption_dim", 0) or 0)
    return (int(arch.cls_token_num), caption_dim) if caption_dim > 0 else None
