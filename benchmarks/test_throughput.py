"""Throughput suite (run with --benchmark): the ops on their shapes, and whole models.

Kernel rows: every provider x shape x dtype x pass, over both ops of the harness: bilateral
attention at docs/design.md section 4's shapes and masked cross-attention at Mask2Former's
(m2f512-s8/-s16/-s32; `-k m2f512` selects them). Each row first asserts parity with the
reference (outputs, and gradients for the passes with a backward), then is timed. A provider
that cannot run here (or cannot run the row's op) is skipped with the reason. On CPU the
bilateral shapes are scaled down (B and N divided by spatialformer_kernels.bench.workload.CPU_SCALE);
the masked cross-attention shapes never are.

Model rows: SpatialFormer-T/S/B images per second, inference and a training step, on each
kernel path of the device and on the reference path; the kernel path first asserts that its
logits match the reference path's (same weights).
"""
from __future__ import annotations

import pytest
import torch

from spatialformer import benchmark as model_bench
from spatialformer_kernels.bench import workload

pytestmark = pytest.mark.throughput

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Whole-model settings: a training batch on CUDA (bf16 autocast); a small batch on CPU.
MODEL_BATCH, MODEL_IMG, MODEL_DTYPE = (64, 224, "bf16") if DEVICE.type == "cuda" else (2, 224, "fp32")


def _dtypes(config) -> list[str]:
    option = config.getoption("--bench-dtypes")
    return option.split(",") if option else (["bf16"] if DEVICE.type == "cuda" else ["fp32"])


def pytest_generate_tests(metafunc):
    if "kernel_row" in metafunc.fixturenames:
        params = [
            pytest.param((shape, dtype, pass_, provider.name), id=f"{shape.label}-{dtype}-{pass_}-{provider.name}")
            for shape in workload.shapes_for(DEVICE)
            for dtype in _dtypes(metafunc.config)
            for pass_ in workload.PASSES
            for provider in workload.providers_for(DEVICE)
        ]
        metafunc.parametrize("kernel_row", params)
    if "model_row" in metafunc.fixturenames:
        params = [
            pytest.param((variant, mode, backend), id=f"{variant}-{mode}-{backend}")
            for variant in model_bench.MODEL_VARIANTS
            for mode in ("inference", "train")
            for backend in model_bench.model_backends(DEVICE)
        ]
        metafunc.parametrize("model_row", params)


def test_attention_throughput(kernel_row, bench_session, record):
    shape, dtype, pass_, provider = kernel_row
    row = bench_session.row(shape, workload.DTYPES[dtype], pass_, provider)
    if row.status in ("skipped", "untimed"):  # untimed: parity passed, not timed (Triton's interpreter)
        pytest.skip(row.note)
    if row.status == "wrong":  # a baseline whose results fail parity here: reported, not timed
        pytest.skip(f"{provider} gives wrong results here, not timed: {row.note}")
    assert row.status == "ok", row.note  # parity with the reference failed
    assert row.gbps is not None and row.gbps > 0
    record(row, f"{shape.label} {dtype} {workload.PASS_LABELS[pass_]}")


_model_rows: dict = {}


def _model_row(variant: str, mode: str, backend: str, budget: float) -> model_bench.ModelRow:
    key = (variant, mode, backend)
    if key not in _model_rows:
        _model_rows[key] = model_bench.bench_model(
            variant, backend, mode, DEVICE, workload.DTYPES[MODEL_DTYPE], MODEL_BATCH, MODEL_IMG, budget_s=budget
        )
    return _model_rows[key]


def test_model_throughput(model_row, pytestconfig, bench_env, record):
    variant, mode, backend = model_row
    option = pytestconfig.getoption("--bench-models")
    wanted = option.split(",") if option else (list(model_bench.MODEL_VARIANTS) if DEVICE.type == "cuda" else ["tiny"])
    if variant not in wanted:
        pytest.skip(f"spatialformer_{variant} not selected (CPU runs tiny only by default; --bench-models={','.join(model_bench.MODEL_VARIANTS)})")
    if backend != "reference":
        model_bench.check_model_parity(variant, backend, DEVICE, workload.DTYPES[MODEL_DTYPE], batch=2, img_size=MODEL_IMG)
    budget = 3 * pytestconfig.getoption("--bench-budget")
    row = _model_row(variant, mode, backend, budget)
    reference = _model_row(variant, mode, "reference", budget)
    row.speedup = reference.median_ms / row.median_ms
    record(row, f"spatialformer_{variant} {mode} B{MODEL_BATCH} {MODEL_IMG}px {MODEL_DTYPE}")
