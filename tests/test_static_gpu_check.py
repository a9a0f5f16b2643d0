"""The static GPU check runs without a GPU: every kernel at its autotune configs (and the
wide-head backward at its configs) compiles for sm_80 and sm_90 with no spill and shared
memory within the device limit."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    jobs = os.environ.get("STATIC_CHECK_JOBS")  # default: the check's own (2 processes at most)
    result = subprocess.run(
        [sys.executable, "-m", "spatialformer_kernels.backends.triton.static_check", *(["--jobs", jobs] if jobs else [])],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"_bilateral_\w+_kernel ", line)]
    kernels = ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel", "_bilateral_combine_kernel",
               "_bilateral_wide_lse_kernel", "_bilateral_wide_delta_kernel", "_bilateral_wide_bwd_kernel")
    for kernel in kernels:
        for arch in ("sm_80", "sm_90"):
            assert any(row[0] == kernel and arch in row for row in rows), f"{kernel} not compiled for {arch}\n{report}"
    for dtype in ("fp16", "bf16", "fp32"):
        assert any(row[1] == dtype for row in rows), f"{dtype} not covered\n{report}"
    for block_d in ("16", "32", "64", "128", "256"):
        assert any(row[2] == block_d for row in rows), f"BLOCK_D {block_d} not covered\n{report}"
    for dtype, block_d in (("fp32", "128"), ("fp32", "256"), ("bf16", "256")):  # the wide-head buckets
        assert any(row[0] == "_bilateral_wide_bwd_kernel" and row[1:3] == [dtype, block_d] for row in rows), report
    assert all(row[-1] == "ok" for row in rows)
