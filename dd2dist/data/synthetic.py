"""Random token shards of a given spec, for tests and the data benchmark (not training data)."""

from __future__ import annotations

import os

import numpy as np

from dd2dist.data.schema import ShardSpec, TokenSample
from dd2dist.data.writer import TokenShardWriter


def random_spec(
    teacher_id: str = "synthetic", num_tokens: int = 21, vocab_size: int = 64, num_classes: int = 10,
    text_shape: tuple[int, int] | None = None,
) -> ShardSpec:
    """A small class- (or, with ``text_shape``, text-) conditional spec with VAR-like sampling settings."""
    sampling = {"guidance_scale": 1.5, "guidance_schedule": "var_linear", "top_k": 0, "top_p": 1.0, "temperature": 1.0}
    cond = "text" if text_shape else "class"
    return ShardSpec(
        teacher_id=teacher_id, family="var", vocab_size=vocab_size, token_shape=(num_tokens,), cond=cond,
        num_classes=num_classes if cond == "class" else 0, text_shape=text_shape, layout=f"flat:{num_tokens}",
        sampling=sampling,
    )


def random_sample(spec: ShardSpec, index: int, seed: int = 0) -> TokenSample:
    """Sample ``index`` of a reproducible random data set: key ``s<index>``, label ``index % num_classes``."""
    rng = np.random.default_rng([seed, index])
    tokens = rng.integers(0, spec.vocab_size, spec.token_shape)
    if spec.cond == "class":
        return TokenSample(f"s{index:09d}", tokens, spec, label=index % spec.num_classes, seed=seed, index=index)
    T, Dt = spec.text_shape
    mask = np.arange(T) >= int(rng.integers(0, T))  # left-padded
    text = rng.standard_normal((T, Dt)).astype(np.float32) * mask[:, None]
    return TokenSample(f"s{index:09d}", tokens, spec, text=text, text_mask=mask, seed=seed, index=index)


def write_random_shards(
    out_dir: str | os.PathLike, spec: ShardSpec, num_samples: int, per_shard: int, seed: int = 0,
    prefix: str = "tokens", start_index: int = 0,
) -> list[str]:
    """Write ``num_samples`` random samples in shards of ``per_shard``; return the shard paths."""
    with TokenShardWriter(out_dir, spec, prefix=prefix, maxcount=per_shard) as w:
        for i in range(start_index, start_index + num_samples):
            w.write_sample(random_sample(spec, i, seed))
    return [str(p) for p in w.shards]
