"""Large inputs: 64-bit offsets on every kernel backend. (The Triton kernels' address
arithmetic is also checked statically in tests/test_triton_backend.py.)"""
import pytest

import spatialformer_kernels as sk
from spatialformer_kernels.testing import BILATERAL_RESULT_NAMES


def test_element_offsets_past_2_31_are_safe(run_script):
    """tests/scripts/large_offsets.py: inputs whose element offsets pass 2**31 (byte offsets
    2**32, in one mmap-backed storage of which only the touched pages become resident), on
    every kernel backend that runs here, against the reference."""
    backends = [name for name in sk.runnable_backends("cpu") if name != "reference"]  # the storage is on the CPU
    if not backends:
        pytest.skip("no kernel backend here")
    report = run_script("large_offsets.py", *backends)
    assert report["last_element_offset"] > 2**31 and report["storage_bytes"] > 2**32
    assert report["max_rss_bytes"] < 3 * 2**30, "the test touched far more memory than the views"
    for backend in backends:
        for name, (ok, message) in zip(BILATERAL_RESULT_NAMES, report[backend]):
            assert ok, f"{backend} {name}: {message}"
