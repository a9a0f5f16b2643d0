"""Hypothesis profiles for the property-based tests (tests/test_properties.py).

SPATIALFORMER_HYPOTHESIS_PROFILE selects one:
- "ci" (default): a few derandomized examples per test, so CI is reproducible and stays
  within a few minutes on a 2-core machine with every backend (Triton in its interpreter).
- "thorough": many random examples, for a long local or nightly run, e.g.
  SPATIALFORMER_HYPOTHESIS_PROFILE=thorough pytest tests/test_properties.py
"""
import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "SPATIALFORMER_HYPOTHESIS_PROFILE"

# Kernel calls are slow under Triton's interpreter: no deadline, and no health check that
# fails a test only for being slow.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], print_blob=True)
settings.register_profile("ci", max_examples=6, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get(PROFILE_ENV, "ci"))
