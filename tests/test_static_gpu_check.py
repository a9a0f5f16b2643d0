"""The static GPU check runs without a GPU: the launches the real launchers make at the
benchmark shapes (and cls224-stage1 at D = 16, 40, 64, 96, 128, 256), bf16 with a mask, for
bilateral and cross_attention forward and backward, bound by Triton's run-time
specialisation with the config each launch uses (and every forward and one-block backward
launch at every tail size, with the config its launcher then picks: configs.TAIL_CONFIGS),
compile for sm_80 and sm_90 with no spill and shared memory within the device limit. About
3-5 minutes on 2 cores."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

def test_launched_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    jobs = os.environ.get("STATIC_CHECK_JOBS")  # default: the check's own (2 processes at most)
    result = subprocess.run(
        [sys.executable, "-m", "spatialformer_kernels.backends.triton.static_check", *(["--jobs", jobs] if jobs else [])],
        capture_output=True, text=True, env=env, timeout=900,
    )
    report = result.stdout + result.stderr
    row = re.compile(r"^(_\w+_kernel)\s+(\S+ .*?)\s+(sm_\d\d)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+).*\s(ok|FAIL)")
    rows = [m.groups() for m in map(row.match, result.stdout.splitlines()) if m]
    assert rows, report
    kernels = ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel", "_bilateral_combine_kernel", "_spatial_delta_kernel",
               "_bilateral_wide_lse_kernel", "_bilateral_wide_delta_kernel", "_bilateral_wide_bwd_kernel")
    for kernel in kernels:
        for arch in ("sm_80", "sm_90"):
            assert any(r[0] == kernel and r[2] == arch for r in rows), f"{kernel} not compiled for {arch}\n{report}"
    for block_d in ("D16", "D32", "D64", "D128", "D256"):
        assert any(f" {block_d} " in f" {r[1]} " for r in rows if r[0] == "_bilateral_fwd_kernel"), block_d
    failing = {(r[0], r[1], r[2]) for r in rows if r[-1] == "FAIL"}
    assert not failing, f"spills or shared memory over the limit: {failing}\n{report}"
    assert result.returncode == 0, report
    for r in rows:  # every compile has an occupancy
        assert int(r[6]) >= 1 and int(r[7]) >= 1, r
