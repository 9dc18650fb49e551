"""Model-state memory per GPU for DD2 stage 2 (teacher + generator + guidance) at each ZeRO stage.

The tables in docs/scaling.md are this script's output (tests/test_infra_scaling_doc.py keeps them equal):

    python infra/memory_table.py            # every generated block (memory N=8/64, shards, paper hours)
    python infra/memory_table.py --world-size 16
    python infra/memory_table.py --update docs/scaling.md   # refresh the doc after changing a number

Model (ZeRO paper, mixed-precision Adam), Ψ = parameters of one network, N = ranks (GPUs):

- generator and guidance each train with Adam: bf16 weights (2 B) + bf16 grads (2 B) + fp32 master weights,
  momentum and variance (12 B) = 16 B/param. ZeRO-1 shards the 12 B, ZeRO-2 also the grads, ZeRO-3 also
  the weights:  Z0 16Ψ,  Z1 4Ψ + 12Ψ/N,  Z2 2Ψ + 14Ψ/N,  Z3 16Ψ/N.
- the frozen teacher holds bf16 weights only (2 B/param, no grads, no optimizer): 2Ψ_T, or 2Ψ_T/N at ZeRO-3
  (dd2dist's default, engine.zero_stage_teacher = 3).
- activations, the EMA generator and framework buffers come on top (see docs/scaling.md).

Parameter counts: teachers from docs/teachers.md §2.1 / §3.1 (verified against the released checkpoints); the
student is the teacher's backbone without its token classifier (VAR: Linear C→4096 with bias; LlamaGen: the
16384×D input embedding and the D→16384 output matrix), plus the MLP head (~20–25M; docs/method.md §5.2).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
HEAD_PARAMS = 22_500_000  # MLP head, middle of a ~20-25M estimate (docs/method.md §5.2)
BYTES_TRAINED = 16  # bf16 weight + bf16 grad + fp32 master, m, v
BYTES_FROZEN = 2  # bf16 weight
ZERO_STAGES = (0, 1, 2, 3)
WORLD_SIZES = (8, 64)


@dataclass(frozen=True)
class Model:
    """A teacher and the parameters its student loses (token classifier / embeddings)."""

    name: str
    teacher_params: int
    removed_params: int
    paper_student_params: float | None  # the paper's Tab.1, for comparison only (None: the paper has no such model)

    @property
    def student_params(self) -> int:
        """Generator (= guidance) parameters: backbone + MLP head."""
        return self.teacher_params - self.removed_params + HEAD_PARAMS


def _var(depth: int, params: int, paper_student: float) -> Model:
    width = 64 * depth
    return Model(f"VAR-d{depth}", params, width * 4096 + 4096, paper_student)


MODELS = (
    _var(16, 310_283_520, 329e6),
    _var(20, 600_917_136, 619e6),
    _var(24, 1_033_399_360, 1.04e9),
    Model("LlamaGen-L", 342_910_976, 2 * 16384 * 1024, 335e6),
    # text-to-image: the student keeps the caption projection; DD2 reports no text-to-image model
    Model("LlamaGen-XL t2i", 777_678_080, 2 * 16384 * 1280, None),
)


def trained_bytes(params: int, zero_stage: int, world_size: int) -> float:
    """Per-GPU bytes of one Adam-trained network's weights, grads and optimizer state."""
    n = world_size
    if zero_stage == 0:
        return 16 * params
    if zero_stage == 1:
        return 4 * params + 12 * params / n
    if zero_stage == 2:
        return 2 * params + 14 * params / n
    if zero_stage == 3:
        return 16 * params / n
    raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")


def teacher_bytes(params: int, zero_stage: int, world_size: int) -> float:
    """Per-GPU bytes of the frozen bf16 teacher (weights only)."""
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    return BYTES_FROZEN * params / (world_size if zero_stage == 3 else 1)


def stage2_gib(model: Model, zero_stage: int, world_size: int, teacher_zero_stage: int = 3) -> float:
    """Per-GPU model-state GiB of stage 2: generator + guidance at ``zero_stage``, teacher at its own stage."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = 2 * trained_bytes(model.student_params, zero_stage, world_size)
    total += teacher_bytes(model.teacher_params, teacher_zero_stage, world_size)
    return total / GIB


def memory_markdown(world_size: int) -> str:
    """The markdown table for one world size."""
    head = "| model | teacher params | student params (paper) | " + " | ".join(
        f"ZeRO-{z}" for z in ZERO_STAGES) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(ZERO_STAGES)]
    for m in MODELS:
        cells = [f"{stage2_gib(m, z, world_size):.1f}" for z in ZERO_STAGES]
        paper = f"{m.paper_student_params / 1e6:.0f}M" if m.paper_student_params else "–"
        lines.append(f"| {m.name} | {m.teacher_params / 1e6:.0f}M | {m.student_params / 1e6:.0f}M ({paper}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# Paper wall-clock on 8×A800 (docs/method.md §13.4: Tab.8 per stage, Tab.3 totals and DD1).
PAPER_HOURS = {
    "VAR-d16": {"adaptation": 0.0, "stage1_head": 60.1, "stage1_full": 8.0, "stage2": 42.6, "alignment": 4.8,
                "total": 115.5, "dd1_total": 296.9},
    "VAR-d20": {"adaptation": 0.0, "stage1_head": 72.6, "stage1_full": 9.1, "stage2": 88.0, "alignment": 4.7,
                "total": 174.4, "dd1_total": 484.4},
    "VAR-d24": {"adaptation": 0.0, "stage1_head": 59.9, "stage1_full": 17.2, "stage2": 19.0, "alignment": 0.0,
                "total": 96.1, "dd1_total": 604.2},
    "LlamaGen-L": {"adaptation": 3.3, "stage1_head": 0.0, "stage1_full": 8.6, "stage2": 40.7, "alignment": 0.0,
                   "total": 52.6, "dd1_total": 647.7},
}
PAPER_GPUS = 8


def hours_markdown() -> str:
    """The paper's training cost as wall-clock hours on 8 GPUs and as GPU-hours."""
    lines = ["| model | adaptation | stage 1 head | stage 1 full | stage 2 | alignment | total h (8×A800) "
             "| GPU-hours | DD1 GPU-hours |", "|---|" + "---:|" * 8]
    for name, h in PAPER_HOURS.items():
        parts = [h[k] for k in ("adaptation", "stage1_head", "stage1_full", "stage2", "alignment")]
        cells = ["–" if v == 0 else f"{v:.1f}" for v in parts]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {h['total']:.1f} | {h['total'] * PAPER_GPUS:.0f} "
                     f"| {h['dd1_total'] * PAPER_GPUS:.0f} |")
    return "\n".join(lines)


def all_markdown() -> dict[str, str]:
    """Every generated block of docs/scaling.md, by marker name."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from shard_sizing import shard_markdown, text_shard_markdown  # noqa: PLC0415 - sibling script

    blocks = {f"memory-n{n}": memory_markdown(n) for n in WORLD_SIZES}
    blocks["shards"] = shard_markdown()
    blocks["text-shards"] = text_shard_markdown()
    blocks["paper-hours"] = hours_markdown()
    return blocks


def update_doc(path: str | Path) -> list[str]:
    """Rewrite every ``<!-- BEGIN name -->...<!-- END name -->`` block of ``path``; returns the names changed."""
    path = Path(path)
    text = path.read_text()
    blocks = all_markdown()
    changed: list[str] = []

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in blocks:
            raise KeyError(f"{path}: generated block {name!r} is not one of {sorted(blocks)}")
        if match.group(2) != blocks[name]:
            changed.append(name)
        return f"<!-- BEGIN {name} -->\n{blocks[name]}\n<!-- END {name} -->"

    path.write_text(re.sub(r"<!-- BEGIN (\S+) -->\n(.*?)\n<!-- END \1 -->", replace, text, flags=re.S))
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, help="print one memory table for this many GPUs")
    parser.add_argument("--update", metavar="MARKDOWN", help="rewrite the generated blocks of this file")
    args = parser.parse_args()
    if args.update:
        print(f"updated blocks: {update_doc(args.update) or 'none'}")
        return
    if args.world_size:
        print(memory_markdown(args.world_size))
        return
    for name, block in all_markdown().items():
        print(f"<!-- BEGIN {name} -->\n{block}\n<!-- END {name} -->\n")


if __name__ == "__main__":
    main()
