"""Fast parity checks (CI): every provider the harness would time agrees with the reference.

These go through the harness's own parity path (BenchSession.parity, the one used before
every timed row) on small shapes, so a provider that runs in the throughput suite is known
to compute the op, for both ops: bilateral attention, and masked cross-attention (the
attn_mask of workload.object_query_masks, empty and full queries included). Triton is
included on CPU here (its interpreter, small shapes only).
"""
from __future__ import annotations

import pytest
import torch

from spatialformer_kernels.bench import measurement, workload
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SMALL = workload.Shape("parity", B=2, H=2, M=64, N=97, D=32)
ODD = workload.Shape("parity-odd", B=1, H=3, M=13, N=130, D=40)
MASKED = workload.Shape("parity-masked", B=2, H=2, M=20, N=144, D=32, op="masked_cross")  # a 12 x 12 key grid
MASKED_ODD = workload.Shape("parity-masked-odd", B=1, H=3, M=13, N=130, D=40, op="masked_cross")  # 11 x 12, the last row partial
PROVIDERS = workload.providers_for(DEVICE, timing=False)
DEFAULT = set(workload.default_provider_names(DEVICE))
# On CPU a compiled provider costs seconds per compilation (one per dtype and grad mode):
# CI checks torch.compile(reference) once per op, forward+backward in fp32 (outputs and
# gradients), and leaves out the providers a default CPU run does not time (FlexAttention),
# except FlexAttention's masked cross-attention forward in fp32 (one compilation), the
# baselines the masked rows are set against.


def _cases():
    for provider in PROVIDERS:
        for shape, odd, prefix in ((SMALL, ODD, ""), (MASKED, MASKED_ODD, "masked-")):
            if shape.op not in provider.builds:
                continue  # the op's skip reason is tested in test_harness.py
            dtypes = ["fp32", "bf16"] if DEVICE.type == "cpu" else ["fp16", "bf16", "fp32"]
            grad_modes = (False, True)
            if DEVICE.type == "cpu" and provider.name not in DEFAULT and provider.kind != "ours":
                if not (provider.family == "flex" and shape.op == "masked_cross"):
                    continue
                dtypes, grad_modes = ["fp32"], (False,)
            if DEVICE.type == "cpu" and provider.family == "compile":
                dtypes, grad_modes = ["fp32"], (True,)
            for dtype in dtypes:
                for with_grads in grad_modes:
                    grad_id = "fwd_bwd" if with_grads else "fwd"
                    yield pytest.param(provider, shape, dtype, with_grads, id=f"{prefix}{provider.name}-{dtype}-{grad_id}")
            if provider.kind == "ours":
                yield pytest.param(provider, odd, "fp32", True, id=f"{prefix}{provider.name}-odd-fp32-fwd_bwd")


@pytest.fixture(scope="module")
def session():
    return measurement.BenchSession(DEVICE, PROVIDERS, measure_memory=False)


@pytest.mark.parametrize("provider, shape, dtype, with_grads", list(_cases()))
def test_provider_matches_reference(session, provider, shape, dtype, with_grads):
    reason = workload.skip_reason(provider, workload.DTYPES[dtype], "fwd_bwd" if with_grads else "fwd", shape.op)
    if reason:
        pytest.skip(reason)
    try:
        failure = session.parity(provider, shape, workload.DTYPES[dtype], with_grads)
    except RuntimeError as error:
        if provider.kind == "ours":
            raise
        pytest.skip(f"{provider.name} cannot run this case: {str(error).splitlines()[0][:200]}")
    assert failure is None, failure


def test_parity_catches_a_wrong_provider(session):
    """A baseline with a wrong scale must be reported as wrong, never timed (ours would fail the run)."""
    wrong = workload.Provider(
        "wrong-scale", "baseline", "reference",
        lambda: lambda q_s, k_s, v_s, q_x, k_x, v_x, scale: bilateral_attention_reference(q_s, k_s, v_s, q_x, k_x, v_x, 1.1 * scale),
    )  # fmt: skip
    wrong_session = measurement.BenchSession(DEVICE, [wrong], measure_memory=False)
    row = wrong_session.row(SMALL, torch.float32, "fwd", "wrong-scale")
    assert row.status == "wrong" and "parity" in row.note and row.median_ms is None
    failure = wrong_session.parity(wrong, SMALL, torch.float32, with_grads=True)
    assert failure is not None and "max abs err" in failure


def test_parity_catches_a_provider_that_ignores_the_mask(session):
    """Masked cross-attention with the mask dropped (or its empty queries not zeroed) fails."""
    unmasked = workload.Provider("unmasked", "baseline", "sdpa", builds={
        "masked_cross": lambda: lambda q, k, v, mask, scale: (cross_attention_reference(q, k, v, scale),)})  # fmt: skip
    any_key = workload.Provider("empty-rows-attend", "baseline", "sdpa", builds={
        "masked_cross": lambda: lambda q, k, v, mask, scale: (  # Mask2Former's own fix-up: an empty mask attends everywhere
            cross_attention_reference(q, k, v, scale, attn_mask=mask | ~mask.any(-1, keepdim=True)),)})  # fmt: skip
    wrong_session = measurement.BenchSession(DEVICE, [unmasked, any_key], measure_memory=False)
    for name in ("unmasked", "empty-rows-attend"):
        row = wrong_session.row(MASKED, torch.float32, "fwd", name)
        assert row.status == "wrong" and f"{name} B2 H2 M20 N144 D32 fp32 o: max abs err" in row.note, row.note


def test_a_crashing_kernel_fails_its_row_and_a_crashing_baseline_is_skipped():
    def crash():
        def run(*args):
            raise RuntimeError("no kernel image is available")

        return run

    ours = workload.Provider("ours-broken", "ours", "ours", crash)
    baseline = workload.Provider("baseline-broken", "baseline", "sdpa", crash)
    crash_session = measurement.BenchSession(DEVICE, [ours, baseline], measure_memory=False)
    row = crash_session.row(SMALL, torch.float32, "fwd", "ours-broken")
    assert row.status == "failed" and "no kernel image" in row.note
    row = crash_session.row(SMALL, torch.float32, "fwd", "baseline-broken")
    assert row.status == "skipped" and "no kernel image" in row.note
