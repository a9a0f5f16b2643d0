"""Shared test setup: the backend parametrisation and the Hypothesis profiles.

Backends: every kernel backend this package has, run where `runnable_backends` says it can
run on the test device (Triton's interpreter on a CPU-only machine), reported as skipped
elsewhere. A test takes `kernel_backend` (each kernel backend) or `any_backend` (the reference
too); a new backend added to KERNEL_BACKEND_NAMES gets every such test.

Hypothesis profiles for the property-based tests (tests/test_properties.py), chosen by
SPATIALFORMER_HYPOTHESIS_PROFILE:
- "ci" (default): a few derandomized examples per test, so CI is reproducible and stays
  within a few minutes on a 2-core machine with every backend (Triton in its interpreter).
- "thorough": many random examples, for a long local or nightly run, e.g.
  SPATIALFORMER_HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

from spatialformer_kernels import runnable_backends

PROFILE_ENV = "SPATIALFORMER_HYPOTHESIS_PROFILE"

# Kernel calls are slow under Triton's interpreter: no deadline, and no health check that
# fails a test only for being slow.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=6, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNEL_BACKEND_NAMES = ("cpu", "triton")
RUNNABLE = runnable_backends(DEVICE)


def _backend_param(name):
    reason = f"backend {name!r} cannot run on {DEVICE} here"
    return pytest.param(name, id=name, marks=pytest.mark.skipif(name not in RUNNABLE, reason=reason))


@pytest.fixture(scope="session", params=[_backend_param(name) for name in KERNEL_BACKEND_NAMES])
def kernel_backend(request) -> str:
    """Each kernel backend (not the reference), on `device`."""
    return request.param


@pytest.fixture(scope="session", params=[pytest.param("reference", id="reference")] + [_backend_param(n) for n in KERNEL_BACKEND_NAMES])
def any_backend(request) -> str:
    """The reference and each kernel backend, on `device`."""
    return request.param


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same global RNG state: tests that draw with randn_like get
    the same values whatever the order in which tests run."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_launch_plans():
    """Every test makes its own Triton launch plans (backends/triton/launch.py): a test that
    replaces what a launcher depends on (the SM count, a kernel) must not run a plan made
    before, nor leave one behind."""
    try:
        from spatialformer_kernels.backends.triton.launch import clear
    except ImportError:  # no Triton
        yield
        return
    clear()
    yield
    clear()


@pytest.fixture
def device() -> str:
    """Where the backends' tests run: CUDA when there is a GPU, else the CPU."""
    return DEVICE


SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def run_script():
    """Run tests/scripts/<name> with arguments in a fresh Python process (for what must not
    share the test process: peak memory, huge mmap-backed storages, non-interpreted Triton);
    return the JSON value printed on its last line."""

    def run(name: str, *args: str, env: dict | None = None, timeout: int = 300):
        done = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
        assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        return json.loads(done.stdout.strip().splitlines()[-1])

    return run
