"""The machine record every demo and benchmark result carries."""

import torch

from dd2dist.machine import describe_machine


def test_the_record_names_the_processor_and_the_cpu_kernels_torch_runs():
    info = describe_machine()
    assert info["cpus"] >= 1 and info["processor"]
    # the kernel set decides the rounding of every CPU operator, so two hosts of one machine type can train different
    # teachers from one seed; it is what torch itself reports
    assert info["cpu_kernels"] == torch.backends.cpu.get_cpu_capability() and info["cpu_kernels"]
    assert info["torch"] == torch.__version__ and info["python"].count(".") == 2
