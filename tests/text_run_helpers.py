"""A tiny text-conditional LlamaGen run for the tests: its config and text-conditional token shards it accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dd2dist.config import load_config
from dd2dist.data import TokenShardWriter, teacher_id
from dd2dist.data.identity import token_layout
from dd2dist.data.schema import ShardSpec, TokenSample, sampling_dict
from dd2dist.teachers import build_seeded_teacher

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "experiments" / "smoke_llamagen_torch.yaml"
SLOTS, WIDTH = 8, 16
TEXT_TEACHER = ["teacher.llamagen.num_classes=0", f"teacher.llamagen.cls_token_num={SLOTS}",
                f"teacher.llamagen.caption_dim={WIDTH}", f"teacher.text_encoder=hashed:slots={SLOTS},width={WIDTH}"]
TINY_SCHEDULE = ["stage1.steps=2", "stage1.warmup_steps=1", "stage1.batch_size=3", "stage2.batch_size=3",
                 "stage2.generator_steps=2", "stage2.guidance_per_generator=1", "stage2.warmup_guidance_steps=2",
                 "stage2.fcs_samples=2", "student.head_width=16", "student.head_depth=1",
                 "student.time_embed_dim=8"]


def text_config(tmp: Path, *overrides: str):
    """The tiny LlamaGen smoke recipe with a text-conditional teacher (8 slots x 16 features)."""
    return load_config(RECIPE, [*TEXT_TEACHER, *TINY_SCHEDULE, f"output_dir={tmp / 'run'}", *overrides])


def text_teacher(cfg):
    return build_seeded_teacher(cfg.teacher, cfg.seed)


def caption(index: int, slots: int = SLOTS, width: int = WIDTH) -> tuple[np.ndarray, np.ndarray]:
    """Caption ``index`` of a reproducible set: left-padded features (slots, width) and their mask."""
    rng = np.random.default_rng([7, index])
    valid = 1 + index % slots
    mask = np.arange(slots) >= slots - valid
    text = (rng.standard_normal((slots, width)) * mask[:, None]).astype(np.float16)
    return text, mask


def write_text_shards(out: Path, cfg, captions_per_shard: list[list[int]], *, text_shape=None,
                      teacher_of=None) -> Path:
    """One shard per list of caption indices, samples with random tokens, in the layout ``cfg``'s teacher reads
    (or ``text_shape`` / the teacher id of ``teacher_of``, to make shards it must refuse)."""
    arch = cfg.teacher.arch
    slots, width = text_shape or (arch.cls_token_num, arch.caption_dim)
    teacher = text_teacher(cfg)
    spec = ShardSpec(teacher_id=teacher_id((teacher_of or cfg).teacher, cfg.seed), family="llamagen",
                     vocab_size=teacher.vocab_size, token_shape=(teacher.num_tokens,), cond="text",
                     text_shape=(slots, width), layout=token_layout(teacher),
                     sampling=sampling_dict(cfg.teacher.sampling))
    rng = np.random.default_rng(0)
    n = 0
    for shard, indices in enumerate(captions_per_shard):
        with TokenShardWriter(out, spec, prefix=f"text{shard:03d}", maxcount=10_000) as writer:
            for index in indices:
                text, mask = caption(index, slots, width)
                tokens = rng.integers(0, teacher.vocab_size, (teacher.num_tokens,))
                writer.write_sample(TokenSample(f"s{n:06d}", tokens, spec, text=text, text_mask=mask, index=n))
                n += 1
    return out
