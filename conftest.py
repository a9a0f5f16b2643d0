"""Shared pytest setup for tests/ and benchmarks/.

Without CUDA, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set
before any kernel is defined, so it is set here, before the package is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """Which vector ISA the C++ CPU kernel was built for (and which ones this CPU runs)."""
    from spatialformer_kernels.backends import cpu as cpu_backend

    if not cpu_backend.is_available():
        return f"C++ CPU kernel: not built ({cpu_backend._failure.splitlines()[0]})"
    return f"C++ CPU kernel: {cpu_backend.vector_isa()} build; this CPU runs {', '.join(cpu_backend.cpu_isas())}"
