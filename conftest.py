"""Shared pytest setup for tests/ and benchmarks/.

Without CUDA, Triton kernels run in Triton's interpreter; TRITON_INTERPRET must be set
before any kernel is defined, so it is set here, before the package is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
