"""Every random draw of training comes from its own generator seeded by (seed, rank, step, purpose).

No draw touches the global RNG, so a resumed run repeats exactly the draws an uninterrupted run makes, whatever
happened before the checkpoint, and adding a new draw somewhere does not shift the others (edm2-style seeding).
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, rank: int, step: int, purpose: str) -> int:
    """A 63-bit seed that is a pure function of its arguments (stable across processes and Python versions)."""
    digest = hashlib.blake2b(f"{seed}/{rank}/{step}/{purpose}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def make_generator(
    seed: int, rank: int, step: int, purpose: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` for one purpose of one step of one rank."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, rank, step, purpose))
    return gen
