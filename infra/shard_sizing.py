"""Bytes per sample and samples per shard of dd2dist's token shards (WebDataset tars).

One sample (docs/scaling.md §4) = ``tokens.tok16`` (int16, 2 B per token: VAR 680 tokens, LlamaGen 256),
``cond.cls`` (decimal label), ``label.i64`` (8 B) and ``meta.json``. A tar stores every member as a 512-byte
header plus its data padded to 512 bytes, so small members cost far more than their payload. WebDataset's
writers stamp members with a float ``time.time()`` by default, which Python's tarfile can only store in an
extra PAX header (another 1024 B per member); an integer ``mtime=`` avoids that and makes shards reproducible.
The table in docs/scaling.md is this script's output (``python infra/shard_sizing.py``).
"""

from __future__ import annotations

import math

TAR_BLOCK = 512
TAR_RECORD = 10240  # tarfile pads the archive to whole 20-block records
TAR_END = 2 * TAR_BLOCK  # two zero blocks close the archive
PAX_MTIME_BYTES = 2 * TAR_BLOCK  # PAX header block + its one data block ("NN mtime=1795681362.64\n")
META_JSON_BYTES = 200  # teacher id, shape, CFG/top-k/top-p, seed: ~150-250 B
SEQUENCE_TOKENS = {"VAR (680 tokens)": 680, "LlamaGen 256 px (256 tokens)": 256, "LlamaGen 384 px (576 tokens)": 576}
SHARD_TARGETS_GB = (0.5, 1.0)
# Text-conditional sequences: (image tokens, caption slots T, feature width Dt). Features are stored as float16.
TEXT_SEQUENCES = {"LlamaGen-XL t2i 256 px (FLAN-T5-XL)": (256, 120, 2048),
                  "digits t2i demo (hashed n-grams)": (16, 16, 64)}
CAPTION_BANK = 4096  # data.caption_bank_size default: captions each rank holds for stage-2 draws


def member_bytes(payload: int) -> int:
    """Bytes one tar member occupies: header block + payload rounded up to whole blocks."""
    if payload < 0:
        raise ValueError(f"payload must be >= 0, got {payload}")
    return TAR_BLOCK + TAR_BLOCK * math.ceil(payload / TAR_BLOCK)


def sample_payloads(tokens: int, label: int = 999, meta_bytes: int = META_JSON_BYTES) -> dict[str, int]:
    """Payload bytes of each member of one class-conditional sample."""
    return {"tokens.tok16": 2 * tokens, "cond.cls": len(str(label)), "label.i64": 8, "meta.json": meta_bytes}


def text_sample_payloads(tokens: int, slots: int, width: int, meta_bytes: int = META_JSON_BYTES) -> dict[str, int]:
    """Payload bytes of each member of one text-conditional sample (no label members)."""
    return {"tokens.tok16": 2 * tokens, "text.f16": 2 * slots * width, "text_mask.u8": slots, "meta.json": meta_bytes}


def caption_bank_bytes(slots: int, width: int, captions: int = CAPTION_BANK) -> int:
    """Host memory of one rank's caption bank: float16 features + one mask byte per slot, per caption."""
    return captions * (2 * slots * width + slots)


def sample_bytes(tokens: int, label: int = 999, meta_bytes: int = META_JSON_BYTES, float_mtime: bool = False) -> int:
    """Bytes one sample adds to a tar; ``float_mtime``: written with WebDataset's default (float) mtime."""
    members = sample_payloads(tokens, label, meta_bytes).values()
    return sum(member_bytes(size) + (PAX_MTIME_BYTES if float_mtime else 0) for size in members)


def shard_bytes(samples: int, per_sample: int) -> int:
    """Size of a tar holding ``samples`` samples of ``per_sample`` bytes (end blocks, record padding)."""
    return TAR_RECORD * math.ceil((samples * per_sample + TAR_END) / TAR_RECORD)


def samples_per_shard(target_bytes: float, per_sample: int) -> int:
    """Most samples whose tar stays within ``target_bytes`` (the inverse of :func:`shard_bytes`)."""
    usable = TAR_RECORD * math.floor(target_bytes / TAR_RECORD) - TAR_END
    return max(1, usable // per_sample)


def shard_markdown() -> str:
    """The shard-sizing table of docs/scaling.md."""
    lines = ["| sequence | token payload | bytes per sample (integer mtime) | (default float mtime) "
             "| samples per 0.5 GB shard | samples per 1 GB shard | 1 GB shards for 1.28M samples |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, tokens in SEQUENCE_TOKENS.items():
        per_sample = sample_bytes(tokens)
        counts = [samples_per_shard(gb * 1e9, per_sample) for gb in SHARD_TARGETS_GB]
        lines.append(f"| {name} | {2 * tokens} B | {per_sample} B | {sample_bytes(tokens, float_mtime=True)} B "
                     f"| {counts[0]:,} | {counts[1]:,} | {math.ceil(1_281_167 / counts[1])} |")
    return "\n".join(lines)


def text_shard_markdown() -> str:
    """The text-conditional shard table of docs/scaling.md (integer mtime)."""
    lines = ["| sequence | text features | bytes per sample | samples per 0.5 GB shard | samples per 1 GB shard "
             f"| 1 GB shards for 1M samples | caption bank of {CAPTION_BANK:,} per rank |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (tokens, slots, width) in TEXT_SEQUENCES.items():
        per_sample = sum(member_bytes(b) for b in text_sample_payloads(tokens, slots, width).values())
        counts = [samples_per_shard(gb * 1e9, per_sample) for gb in SHARD_TARGETS_GB]
        bank = caption_bank_bytes(slots, width)
        bank_text = f"{bank / 2**30:.2f} GiB" if bank >= 2**30 else f"{bank / 2**20:.1f} MiB"
        lines.append(f"| {name} | {slots} x {width} x 2 B = {2 * slots * width:,} B | {per_sample:,} B "
                     f"| {counts[0]:,} | {counts[1]:,} | {math.ceil(1_000_000 / counts[1])} | {bank_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(shard_markdown())
    print()
    print(text_shard_markdown())
