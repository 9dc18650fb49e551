"""What a measurement ran on, for the records. Teachers trained from the same seed have come out different in two
checkouts on one cloud machine type, with the same code and torch. A suspected cause, not confirmed: torch picks its
CPU kernels (AVX2, AVX-512, ...) by what the processor offers, and those kernels may round differently. The record
names the processor and the kernel level, so that such runs can be told apart."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def describe_machine() -> dict:
    """cpus, processor (model name), cpu_family / cpu_model (x86 numbers, where known), cpu_kernels (torch's CPU
    capability: the kernel set its operators run), python, torch."""
    import torch

    info = _cpuinfo()
    return {
        "cpus": os.cpu_count(),
        "processor": info.get("model name") or platform.processor() or platform.machine(),
        "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "torch": torch.__version__,
    }
