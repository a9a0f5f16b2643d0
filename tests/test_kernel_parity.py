"""Every kernel backend against the reference, under the one tolerance rule: outputs, LSEs and
all gradients of both ops, on odd shapes, every dtype the backend computes, every layout and
mask (cross attention's per-query attn_mask included, in every stride pattern); bitwise-equal
reruns; torch.compile(fullgraph=True). The backends come from the
`kernel_backend` fixture (tests/conftest.py), so a new backend gets this whole file."""
import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels import dispatch
from spatialformer_kernels.reference import cross_attention_reference_with_lse
from spatialformer_kernels.testing import (
    BILATERAL_RESULT_NAMES,
    CROSS_RESULT_NAMES,
    assert_close,
    assert_results_close,
    bilateral_case_id,
    bilateral_results,
    case_id,
    cross_results,
    make_attn_mask,
    make_bilateral_inputs,
    make_image_mask,
    mask_for_case,
    reference_bilateral_results,
    reference_cross_results,
    reference_pair,
    transposed_grad,
)

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def _skip_unsupported(backend, dtype):
    if dtype not in dispatch.kernels(backend).DTYPES:
        pytest.skip(f"backend {backend!r} does not compute {dtype}")


# (B, H, M, N, D, dtype, layout, mask: None | "mask" | "empty" (the last sample has no token)).
# Together: every dtype; M = 1, 5, 49, 130 (over one spatial block); N = 1, 97, 300, 1025,
# 1100 (several splits and work items); D = 8, 40, 96 (the Triton fp32 wide-head backward); all
# layouts.
BILATERAL_CASES = [
    (1, 1, 1, 1, 8, FP32, "contiguous", None),
    (2, 2, 49, 97, 40, FP16, "bnhd", "empty"),
    (2, 1, 130, 97, 8, BF16, "strided", "mask"),
    (1, 1, 49, 300, 96, FP32, "bnhd", "mask"),
    (1, 1, 1, 1025, 40, BF16, "contiguous", None),
    (2, 1, 130, 1, 96, FP16, "strided", "empty"),
    (1, 2, 130, 97, 40, FP32, "strided", "empty"),
    (1, 2, 130, 1025, 8, FP32, "strided", "mask"),
    (2, 1, 49, 97, 8, FP64, "strided", "empty"),
    (8, 4, 5, 1100, 8, FP32, "bnhd", "empty"),  # C++: two forward items per row (576, 524 tokens)
    (1, 2, 64, 300, 40, BF16, "strided", "mask"),  # Triton: rows not 16-byte aligned (ALIGN 1, 32-row blocks)
    (2, 2, 64, 300, 96, BF16, "bnhd", "mask"),  # Triton: 64-row blocks at BLOCK_D = 128
]


@pytest.mark.parametrize("case", BILATERAL_CASES, ids=bilateral_case_id)
def test_bilateral_outputs_and_all_gradients_match_reference(kernel_backend, device, case):
    B, H, M, N, D, dtype, layout, mask_kind = case
    _skip_unsupported(kernel_backend, dtype)
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=device, layout=layout, seed=1)
    mask = mask_for_case(B, N, mask_kind, device=device)
    scale = 0.9 * D**-0.5
    grads = (transposed_grad((B, H, M, D), dtype, 4, device), transposed_grad((B, H, N, D), dtype, 5, device))

    got = bilateral_results(inputs, grads, kernel_backend, scale, mask)
    same, exact = reference_bilateral_results(inputs, grads, scale, mask)
    assert [t.dtype for t in got] == [dtype] * 8
    assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES, bilateral_case_id(case))
    if mask_kind == "empty":
        # The sample without image tokens: o_s = 0 and direction s gives no gradient, so dq_s,
        # dk_x and dv_x (which only direction s reaches) are exactly 0; nothing is NaN.
        o_s, dq_s, dk_x, dv_x = got[0], got[2], got[6], got[7]
        for t in (o_s, dq_s, dk_x, dv_x):
            assert torch.equal(t[B - 1], torch.zeros_like(t[B - 1]))
        assert all(torch.isfinite(t).all() for t in got)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_bilateral_lse_matches_reference(kernel_backend, device, dtype):
    """The LSEs the backward reads, through the backend contract: float64 for every input
    dtype, -inf for a sample with no kept key."""
    B, H, M, N, D = 2, 2, 49, 300, 40
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=device, layout="bnhd", seed=2)
    mask = make_image_mask(B, N, empty_samples=(1,), device=device, seed=5)
    q_s, k_s, v_s, q_x, k_x, v_x = inputs
    _, _, lse_s, lse_x = dispatch.kernels(kernel_backend).bilateral_fwd(*inputs, 0.2, mask)
    assert lse_s.dtype == lse_x.dtype == torch.float64
    assert torch.equal(lse_s[1], torch.full_like(lse_s[1], float("-inf")))
    for got, (q, k, v, m) in ((lse_s, (q_s, k_x, v_x, mask)), (lse_x, (q_x, k_s, v_s, None))):
        ref, exact = reference_pair(lambda *t: cross_attention_reference_with_lse(*t, 0.2, m, upcast=True)[1], [q, k, v])
        assert_close(got, ref, exact, FP32, "lse")


# (B, H, Lq, Lk, D, dtype, layout, mask). Few queries over many keys and many queries over few
# keys; keys beyond one block (Lk = 130); the B*H = 1 cases force split keys and split queries;
# wide heads (D = 96 fp32, D = 256 bf16: the Triton head-dim-split backward) in both shapes.
CROSS_CASES = [
    (2, 2, 64, 1025, 32, FP32, "contiguous", "empty"),
    (2, 2, 7, 300, 40, FP16, "bnhd", "mask"),
    (2, 2, 1025, 49, 40, BF16, "bnhd", "mask"),
    (1, 1, 5, 3000, 8, FP32, "strided", "mask"),
    (1, 2, 200, 130, 8, FP32, "contiguous", "mask"),
    (1, 1, 700, 30, 96, FP16, "strided", None),
    (2, 1, 1, 1, 96, FP32, "contiguous", None),
    (1, 1, 130, 513, 8, BF16, "strided", None),
    (1, 1, 300, 700, 40, FP64, "bnhd", "empty"),
    (2, 1, 20, 130, 96, FP32, "bnhd", "mask"),
    (2, 2, 130, 20, 256, BF16, "bnhd", "mask"),
]


def _cross_case_id(case):
    B, H, Lq, Lk, D, dtype, layout, mask_kind = case
    return f"{case_id(B, H, Lq, Lk, D, dtype)}-{layout}-{mask_kind or 'nomask'}"


@pytest.mark.parametrize("case", CROSS_CASES, ids=_cross_case_id)
def test_cross_outputs_gradients_and_lse_match_reference(kernel_backend, device, case):
    B, H, Lq, Lk, D, dtype, layout, mask_kind = case
    _skip_unsupported(kernel_backend, dtype)
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, device=device, layout=layout, seed=6)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, device=device, layout=layout, seed=7)[4:]
    mask = mask_for_case(B, Lk, mask_kind, device=device)
    grad = transposed_grad((B, H, Lq, D), dtype, 8, device)

    got = cross_results(q, k, v, grad, kernel_backend, 0.3, mask)
    same, exact = reference_cross_results(q, k, v, grad, 0.3, mask)
    assert_results_close(got, same, exact, dtype, CROSS_RESULT_NAMES, _cross_case_id(case))
    _, lse = dispatch.kernels(kernel_backend).cross_fwd(q, k, v, 0.3, mask, None)
    ref_lse, exact_lse = reference_pair(lambda *t: cross_attention_reference_with_lse(*t, 0.3, mask, upcast=True)[1],
                                        [q, k, v])
    assert lse.dtype == torch.float64  # for every input dtype
    assert_close(lse, ref_lse, exact_lse, FP32, "lse")
    if mask_kind == "empty":  # the last sample keeps no key: zeros and zero gradients
        for t in (got[0], got[1]):
            assert torch.equal(t[B - 1], torch.zeros_like(t[B - 1]))


def test_two_runs_are_bitwise_equal_forward_and_backward(kernel_backend, device):
    """Split partials are reduced in a fixed order and nothing is atomic, so every result of
    both ops repeats bit for bit (several splits; in Triton's backward, looped spatial blocks)."""
    B, H, M, N, D = 1, 1, 49, 600, 40
    inputs = make_bilateral_inputs(B, H, M, N, D, FP16, device=device, layout="bnhd", seed=11)
    mask = mask_for_case(B, N, "mask", device=device)
    grads = (transposed_grad((B, H, M, D), FP16, 12, device), transposed_grad((B, H, N, D), FP16, 13, device))

    def run():
        return [
            *bilateral_results(inputs, grads, kernel_backend, image_mask=mask),
            *cross_results(inputs[0], inputs[4], inputs[5], grads[0], kernel_backend, key_mask=mask),
            *cross_results(inputs[3], inputs[1], inputs[2], grads[1], kernel_backend),
        ]

    for a, b in zip(run(), run(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_traces_the_ops(kernel_backend, device):
    """The custom ops (fake implementations + autograd) trace without a graph break and give
    the eager results, forward and backward."""
    B, H, M, N, D = 1, 2, 5, 33, 16
    inputs = [t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, FP32, device=device, seed=23)]
    mask = mask_for_case(B, N, "mask", device=device)

    def step(q_s, k_s, v_s, q_x, k_x, v_x):
        o_s, o_x = sk.bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, image_mask=mask, backend=kernel_backend)
        o = sk.cross_attention(o_x, q_s, v_s, backend=kernel_backend)  # many queries over few keys
        return o_s.sum() + o.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = step(*inputs)
    expected = torch.autograd.grad(expected_loss, inputs)
    assert torch.equal(loss, expected_loss)
    for a, e in zip(grads, expected):
        assert torch.equal(a, e)


# Per-query masks (cross attention's attn_mask, [B, Lq, Lk], any strides), alone and with a
# key mask: (B, H, Lq, Lk, D, dtype, layout, attn_mask kind (testing.make_attn_mask), key mask).
# Both regimes; Lq = 100 (Mask2Former's queries: more than one Triton spatial block, so its
# backward loops over blocks), odd sizes, D = 40 and 96 (the Triton fp32 wide-head backward).
ATTN_MASK_CASES = [
    (2, 2, 100, 300, 32, FP32, "bnhd", "random", None),
    (1, 2, 100, 300, 32, BF16, "contiguous", "query_broadcast", "mask"),
    (2, 1, 7, 130, 40, FP16, "strided", "key_broadcast", None),
    (1, 1, 5, 1025, 8, FP32, "strided", "transposed", "mask"),
    (2, 1, 3, 97, 96, FP32, "bnhd", "sliced", None),
    (1, 2, 130, 20, 16, BF16, "bnhd", "random", "mask"),
    (2, 1, 300, 7, 40, FP32, "contiguous", "empty_rows", None),
    (1, 1, 49, 600, 16, FP64, "strided", "empty_rows", "empty"),
    (1, 1, 1, 1, 8, FP32, "contiguous", "random", None),
]


def _attn_mask_case_id(case):
    B, H, Lq, Lk, D, dtype, layout, kind, key_mask_kind = case
    return f"{case_id(B, H, Lq, Lk, D, dtype)}-{layout}-{kind}-{key_mask_kind or 'nokeymask'}"


@pytest.mark.parametrize("case", ATTN_MASK_CASES, ids=_attn_mask_case_id)
def test_cross_with_attn_mask_matches_reference(kernel_backend, device, case):
    B, H, Lq, Lk, D, dtype, layout, kind, key_mask_kind = case
    _skip_unsupported(kernel_backend, dtype)
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, device=device, layout=layout, seed=16)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, device=device, layout=layout, seed=17)[4:]
    key_mask = mask_for_case(B, Lk, key_mask_kind, device=device)
    attn_mask = make_attn_mask(B, Lq, Lk, kind, device=device)
    grad = transposed_grad((B, H, Lq, D), dtype, 18, device)

    got = cross_results(q, k, v, grad, kernel_backend, 0.3, key_mask, attn_mask)
    same, exact = reference_cross_results(q, k, v, grad, 0.3, key_mask, attn_mask)
    assert_results_close(got, same, exact, dtype, CROSS_RESULT_NAMES, _attn_mask_case_id(case))
    _, lse = dispatch.kernels(kernel_backend).cross_fwd(q, k, v, 0.3, key_mask, attn_mask)
    ref_lse, exact_lse = reference_pair(
        lambda *t: cross_attention_reference_with_lse(*t, 0.3, key_mask, upcast=True, attn_mask=attn_mask)[1],
        [q, k, v],
    )
    assert_close(lse, ref_lse, exact_lse, FP32, "lse")
    # a query row with no kept key: output 0, LSE -inf, dq 0
    keeps = attn_mask if key_mask is None else attn_mask & key_mask[:, None, :]
    empty = ~keeps.any(-1)  # [B, Lq]
    assert empty.any() or kind in ("query_broadcast", "transposed", "sliced")
    for t in (got[0], got[1]):
        assert torch.equal(t.transpose(1, 2)[empty], torch.zeros_like(t.transpose(1, 2)[empty]))
    assert torch.all(lse.transpose(1, 2)[empty] == float("-inf"))


def test_attn_mask_runs_are_bitwise_equal(kernel_backend, device):
    """Per-query masks keep the determinism of the split reductions."""
    B, H, Lq, Lk, D = 1, 2, 100, 700, 32
    q = make_bilateral_inputs(B, H, 1, Lq, D, FP32, device=device, seed=21)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, FP32, device=device, seed=22)[4:]
    attn_mask = make_attn_mask(B, Lq, Lk, "random", device=device)
    grad = transposed_grad((B, H, Lq, D), FP32, 23, device)
    first = cross_results(q, k, v, grad, kernel_backend, None, None, attn_mask)
    second = cross_results(q, k, v, grad, kernel_backend, None, None, attn_mask)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_traces_attn_mask(kernel_backend, device):
    """cross_attention with a per-query mask, dense and as a stride-0 expand of one query's row,
    traces without a graph break and gives the eager results, forward and backward."""
    B, H, Lq, Lk, D = 2, 2, 10, 40, 16
    q = make_bilateral_inputs(B, H, 1, Lq, D, FP32, device=device, seed=24)[3].requires_grad_()
    k, v = (t.requires_grad_() for t in make_bilateral_inputs(B, H, 1, Lk, D, FP32, device=device, seed=25)[4:])
    blobs = make_attn_mask(B, Lq, Lk, "random", device=device)

    def step(q, k, v, mask):
        o = sk.cross_attention(q, k, v, attn_mask=mask, backend=kernel_backend)
        shared = sk.cross_attention(q, k, v, attn_mask=mask[:, 1:2].expand(B, Lq, Lk), backend=kernel_backend)
        return o.square().sum() + shared.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, blobs)
    grads = torch.autograd.grad(loss, (q, k, v))
    expected_loss = step(q, k, v, blobs)
    expected = torch.autograd.grad(expected_loss, (q, k, v))
    assert torch.equal(loss, expected_loss)
    for a, e in zip(grads, expected):
        assert torch.equal(a, e)
