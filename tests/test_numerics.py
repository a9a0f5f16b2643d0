"""Numerics on hostile inputs, on every backend (README: "Behaviour on edge cases"):

- NaN/Inf in an input reaches only the outputs that depend on it; NaN gradients stay in
  their head and direction.
- logits up to |scale * q.k| = 1e4 stay finite and within the one tolerance rule, outputs and
  all gradients, in every dtype (one-hot softmax rows, where the LSE and delta must be exact).
"""
import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels import dispatch
from spatialformer_kernels.reference import bilateral_attention_reference
from spatialformer_kernels.testing import (
    BILATERAL_RESULT_NAMES,
    CROSS_RESULT_NAMES,
    INPUT_NAMES,
    assert_close,
    assert_results_close,
    bilateral_results,
    cross_results,
    large_logit_inputs,
    make_bilateral_inputs,
    reference_bilateral_results,
    reference_cross_results,
    reference_pair,
)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
NAMES = INPUT_NAMES
GRAD_NAMES = BILATERAL_RESULT_NAMES[2:]
DIRECTION_S = {"q_s", "k_x", "v_x"}  # the inputs of o_s (spatial queries over image tokens)
DIRECTION_X = {"q_x", "k_s", "v_s"}  # the inputs of o_x
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small shapes: Triton runs in its interpreter on CPU here.
B, H, M, N, D = 2, 2, 5, 7, 16


def _inputs(dtype=FP32, seed=1, shape=(B, H, M, N, D), layout="contiguous"):
    return list(make_bilateral_inputs(*shape, dtype=dtype, device=DEVICE, layout=layout, seed=seed))


# ----------------------------------------------------------------------------------------
# NaN / Inf
# ----------------------------------------------------------------------------------------
# The poisoned element: sample 1, head 0, the middle token, feature 3.
POISON_B, POISON_H, POISON_D = 1, 0, 3


def _poisoned_index(name):
    length = M if name.endswith("_s") else N
    return (POISON_B, POISON_H, length // 2, POISON_D)


def _dependent_region(name):
    """Boolean masks over (o_s, o_x): the outputs that mathematically depend on the element."""
    region_s = torch.zeros(B, H, M, D, dtype=torch.bool)
    region_x = torch.zeros(B, H, N, D, dtype=torch.bool)
    b, h, token, d = _poisoned_index(name)
    if name == "q_s":
        region_s[b, h, token, :] = True  # one spatial query row
    elif name == "k_x":
        region_s[b, h] = True  # a key every spatial query of this head sees
    elif name == "v_x":
        region_s[b, h, :, d] = True  # one value feature: one output column
    elif name == "q_x":
        region_x[b, h, token, :] = True
    elif name == "k_s":
        region_x[b, h] = True
    elif name == "v_s":
        region_x[b, h, :, d] = True
    return region_s.to(DEVICE), region_x.to(DEVICE)


def _gradient_region(name):
    """Where NaN gradients may appear: the poisoned head, in the direction of the input."""
    direction = DIRECTION_S if name in DIRECTION_S else DIRECTION_X
    regions = []
    for other in NAMES:
        length = M if other.endswith("_s") else N
        region = torch.zeros(B, H, length, D, dtype=torch.bool, device=DEVICE)
        if other in direction:
            region[POISON_B, POISON_H] = True
        regions.append(region)
    return regions


def _outside(tensors, region):
    return [t.masked_fill(region, 0) for t in tensors]


@pytest.mark.parametrize("name", NAMES)
def test_nan_reaches_only_the_outputs_that_depend_on_it(any_backend, name):
    inputs = _inputs()
    inputs[NAMES.index(name)][_poisoned_index(name)] = float("nan")
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    got = bilateral_results(inputs, grads, any_backend)
    same, exact = reference_bilateral_results(inputs, grads)
    for out_name, out, region in zip(("o_s", "o_x"), got[:2], _dependent_region(name)):
        # NaN exactly where the math puts it: never dropped, never spread to other rows or heads.
        nan_where_expected = torch.equal(torch.isnan(out), region)
        assert nan_where_expected, f"{out_name}: NaN at {torch.isnan(out).nonzero().tolist()}"
    assert_close(got[:2], same[:2], exact[:2], FP32, "o_s, o_x")
    for grad_name, g, s, e, region in zip(GRAD_NAMES, got[2:], same[2:], exact[2:], _gradient_region(name)):
        assert torch.isfinite(g[~region]).all(), f"{grad_name}: non-finite outside the poisoned head/direction"
        assert_close(*_outside([g, s, e], region), FP32, f"{grad_name} outside the poisoned head/direction")


@pytest.mark.parametrize("name", NAMES)
def test_inf_reaches_only_the_outputs_that_depend_on_it(any_backend, name):
    """+Inf may cancel (a -inf logit is a dropped key), so the non-finite outputs are a subset
    of the dependent region, with the float64 reference's exact pattern."""
    inputs = _inputs()
    inputs[NAMES.index(name)][_poisoned_index(name)] = float("inf")
    o_s, o_x = sk.bilateral_attention(*inputs, backend=any_backend)
    for out_name, out, region in zip(("o_s", "o_x"), (o_s, o_x), _dependent_region(name)):
        assert torch.isfinite(out[~region]).all(), f"{out_name}: non-finite outside the dependent outputs"
    same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
    assert_close([o_s, o_x], same, exact, FP32, "o_s, o_x")


def test_nan_in_a_masked_token(any_backend):
    """A masked-out token's k_x is never a logit, so NaN there does not reach o_s. Its v_x is
    multiplied by a zero weight, and 0 * NaN = NaN (as in the reference): padding must be finite."""
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[POISON_B, N - 2 :] = False
    for name, expect_nan in (("k_x", False), ("v_x", True)):
        inputs = _inputs()
        inputs[NAMES.index(name)][POISON_B, POISON_H, N - 1, POISON_D] = float("nan")
        o_s, o_x = sk.bilateral_attention(*inputs, image_mask=mask, backend=any_backend)
        expected = torch.zeros_like(o_s, dtype=torch.bool)
        if expect_nan:
            expected[POISON_B, POISON_H, :, POISON_D] = True
        nan_where_expected = torch.equal(torch.isnan(o_s), expected)
        assert nan_where_expected, f"{name}: NaN at {torch.isnan(o_s).nonzero().tolist()}"
        assert torch.isfinite(o_x).all()
        same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5, mask), inputs)
        assert_close([o_s, o_x], same, exact, FP32, f"{name}: o_s, o_x")


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
def test_nan_query_row_in_cross_attention(any_backend, few_queries):
    lq, lk = (M, N) if few_queries else (N, M)
    q = make_bilateral_inputs(B, H, 1, lq, D, seed=3)[3].to(DEVICE)
    k, v = [t.to(DEVICE) for t in make_bilateral_inputs(B, H, 1, lk, D, seed=4)[4:]]
    q[1, 1, lq // 2, 0] = float("nan")
    o = sk.cross_attention(q, k, v, backend=any_backend)
    expected = torch.zeros_like(o, dtype=torch.bool)
    expected[1, 1, lq // 2, :] = True
    nan_where_expected = torch.equal(torch.isnan(o), expected)
    assert nan_where_expected, f"NaN at {torch.isnan(o).nonzero().tolist()}"


# ----------------------------------------------------------------------------------------
# Large logits
# ----------------------------------------------------------------------------------------
LOGIT_SCALE = 0.25


# (B, H, M, N, D): one spatial block; M past a Triton fp32 block (its looped path) and past
# the CPU kernel's 64-key tile, odd N; whole tiles of a full spatial block (Triton's 16-bit
# backward then has no select between the logit's product and the LSE's subtraction, which
# a GPU compile must not fuse into one FMA); with a mask on the image tokens.
LARGE_LOGIT_SHAPES = {"one-block": (1, 2, 6, 40, 16), "many-spatial": (1, 1, 70, 45, 16),
                      "full-tiles": (1, 1, 64, 256, 16)}


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("shape", list(LARGE_LOGIT_SHAPES.values()), ids=list(LARGE_LOGIT_SHAPES))
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_logits_up_to_1e4_are_finite_and_exact(kernel_backend, dtype, shape, masked):
    """At |logit| = 1e4 the softmax is one-hot and the reference's backward cancels
    dP - delta exactly (its drift is ~1e-19, so the rule's bound is the dtype floor); the
    kernels must too, which they do by forming delta with the same arithmetic as dP."""
    inputs = large_logit_inputs(dtype, shape=shape, scale=LOGIT_SCALE, device=DEVICE)
    q_s, k_s, _, q_x, k_x, _ = [t.double() for t in inputs]
    peak = LOGIT_SCALE * max((q_s @ k_x.mT).abs().max(), (q_x @ k_s.mT).abs().max())
    assert 0.98e4 <= peak <= 1.02e4  # the inputs really reach |logit| = 1e4 in this dtype
    mask = None
    if masked:
        mask = torch.ones(shape[0], shape[3], dtype=torch.bool, device=DEVICE)
        mask[:, ::3] = False
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(inputs[i].shape, generator=generator).to(inputs[i]) for i in (0, 3)]
    got = bilateral_results(inputs, grads, kernel_backend, scale=LOGIT_SCALE, image_mask=mask)
    assert all(torch.isfinite(t).all() for t in got), "non-finite output or gradient"
    same, exact = reference_bilateral_results(inputs, grads, scale=LOGIT_SCALE, image_mask=mask)
    assert_results_close(got, same, exact, dtype, BILATERAL_RESULT_NAMES)


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
def test_cross_attention_logits_up_to_1e4_fp32_gradients(kernel_backend, few_queries):
    q_s, k_s, v_s, q_x, k_x, v_x = large_logit_inputs(FP32, LOGIT_SCALE, shape=(2, 2, 6, 90, 16), device=DEVICE)
    q, k, v = (q_s, k_x, v_x) if few_queries else (q_x, k_s, v_s)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)
    got = cross_results(q, k, v, grad, kernel_backend, LOGIT_SCALE)
    same, exact = reference_cross_results(q, k, v, grad, LOGIT_SCALE)
    assert_results_close(got, same, exact, FP32, CROSS_RESULT_NAMES)


def test_logits_up_to_1e3_fp32_gradients_are_exact(kernel_backend):
    inputs = large_logit_inputs(FP32, largest=1e3, scale=LOGIT_SCALE, device=DEVICE)
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    got = bilateral_results(inputs, grads, kernel_backend, scale=LOGIT_SCALE)
    same, exact = reference_bilateral_results(inputs, grads, scale=LOGIT_SCALE)
    assert_close(got, same, exact, FP32, "outputs and gradients")


def _soft_rows_near_1e4(dtype, shape, seed):
    """Inputs whose every dot is exact in fp32 and in float64 (small integers) and near 4e4
    (the first features 200 x 200), the other features spreading each row's logits over a few
    units at LOGIT_SCALE: soft rows at |logit| ~ 1e4, not one-hot."""
    B, H, M, N, D = shape
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for length in (M, M, M, N, N, N):
        t = torch.randint(-3, 4, (B, H, length, D), generator=generator).to(torch.float64)
        t[..., 0] = 200.0
        tensors.append(t.to(dtype).to(DEVICE))
    return tensors


def _lse_from_top_logit(q, k, scale, mask=None):
    """float64 LSE of rows whose dots q.k are exact: the top logit rounded to fp32 (the
    kernels' contract, what the backward recomputes) plus the log of the exact sum."""
    s = q.double() @ k.double().mT
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    top = s.amax(-1, keepdim=True)
    top_logit = (top.float() * scale).double()
    return (top_logit + torch.log(torch.exp((s - top) * scale).sum(-1, keepdim=True))).squeeze(-1)


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("shape", [(1, 2, 6, 300, 16), (1, 1, 70, 45, 16)], ids=["one-block", "many-spatial"])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_lse_of_soft_rows_at_1e4_is_the_top_logit_plus_the_log_sum(kernel_backend, dtype, shape, masked):
    """Past what the tolerance rule sees (its bound at |LSE| ~ 1e4 is 0.2): the LSE is the fp32
    top logit plus the log of the sum to about 1e-6, however the exponent is formed. The 16-bit
    Triton forward shifts by a rounded max * rate and takes the residual off (left on, it is
    3e-4 here), in its own LSE and in the split partials it leaves the combine (N = 300)."""
    q_s, k_s, v_s, q_x, k_x, v_x = _soft_rows_near_1e4(dtype, shape, seed=7)
    mask = None
    if masked:
        mask = torch.ones(shape[0], shape[3], dtype=torch.bool, device=DEVICE)
        mask[:, ::3] = False
    _, _, lse_s, lse_x = dispatch.kernels(kernel_backend).bilateral_fwd(
        q_s, k_s, v_s, q_x, k_x, v_x, LOGIT_SCALE, mask)
    expected_s = _lse_from_top_logit(q_s, k_x, LOGIT_SCALE, mask)
    expected_x = _lse_from_top_logit(q_x, k_s, LOGIT_SCALE)
    assert 0.99e4 <= expected_s.abs().min() and expected_s.abs().max() <= 1.01e4
    for name, got, expected in (("lse_s", lse_s, expected_s), ("lse_x", lse_x, expected_x)):
        err = (got - expected).abs().max().item()
        assert err <= 2e-6, f"{name}: max abs err {err:.3e}"


@pytest.mark.parametrize("shape", [(2, 1, 6, 300, 16), (1, 2, 70, 45, 16)], ids=["splits", "many-spatial"])
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
def test_one_hot_rows_at_large_logits_are_exact(kernel_backend, dtype, shape):
    """Rows whose top logit (1.75e4) leads the rest by 1.5e4: every other term of the sum
    underflows, so the output row is the top key's value row bitwise and the LSE is the fp32
    top logit exactly, the value the backward recomputes (P = 1 there), whatever the
    exponent's rounding (the 16-bit Triton forward's top term is exp2(residual), not 1, and
    fp16 does not round it to 1 at these logits). The
    winning key is the third of the first head, whose later tiles then keep the max (and at
    N = 300 the other splits lose to it in the combine), and the third from last of the other."""
    B, H, M, N, D = shape
    generator = torch.Generator().manual_seed(11)
    tensors = []
    for length, is_query in ((M, True), (M, False), (M, False), (N, True), (N, False), (N, False)):
        t = torch.randint(-1, 2, (B, H, length, D), generator=generator).to(torch.float64)
        t[..., 0] = 200.0
        if is_query:
            t[..., 1] = 250.0
        else:  # one winning key per head: +120 against -120 on feature 1, 60,000 in q.k
            t[..., 1] = -120.0
            for head in range(B * H):
                t[head // H, head % H, 2 if head % 2 == 0 else length - 3, 1] = 120.0
        tensors.append(t.to(dtype).to(DEVICE))
    q_s, k_s, v_s, q_x, k_x, v_x = tensors
    v_s = torch.randn(v_s.shape, generator=generator).to(dtype).to(DEVICE)
    v_x = torch.randn(v_x.shape, generator=generator).to(dtype).to(DEVICE)
    o_s, o_x, lse_s, lse_x = dispatch.kernels(kernel_backend).bilateral_fwd(
        q_s, k_s, v_s, q_x, k_x, v_x, LOGIT_SCALE, None)
    for name, q, k, v, o, lse in (("s", q_s, k_x, v_x, o_s, lse_s), ("x", q_x, k_s, v_s, o_x, lse_x)):
        dots = q.double() @ k.double().mT  # exact: small integers
        top, winner = dots.max(-1)
        second = dots.topk(2, -1).values[..., 1]
        assert (top - second).min() * LOGIT_SCALE >= 1.4e4 and top.abs().max() * LOGIT_SCALE <= 1.8e4
        expected_o = torch.gather(v, 2, winner[..., None].expand(*winner.shape, D))
        assert torch.equal(o, expected_o), f"o_{name}: not the top key's value row"
        assert torch.equal(lse, (top.float() * LOGIT_SCALE).double()), f"lse_{name}: not the fp32 top logit"


@pytest.mark.skipif("triton" not in sk.runnable_backends(DEVICE), reason="the Triton backend cannot run here")
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_wide_head_logits_up_to_1e4_fp32_gradients(masked):
    """fp32 at D = 96, where the Triton backward splits the head dim
    (backends/triton/wide.py): at |logit| = 1e4 every softmax row is one-hot and
    the reference's gradients are exact, so the bound is the fp32 floor."""
    from spatialformer_kernels.backends.triton import configs

    shape = (1, 2, 6, 40, 96)
    assert not configs.backward_supported(configs.block_d_for(shape[4]), 4, shape[2])  # the wide-head path
    inputs = large_logit_inputs(FP32, shape=shape, scale=LOGIT_SCALE, device=DEVICE)
    mask = None
    if masked:
        mask = torch.ones(shape[0], shape[3], dtype=torch.bool, device=DEVICE)
        mask[:, 1::4] = False
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(inputs[i].shape, generator=generator).to(inputs[i]) for i in (0, 3)]
    got = bilateral_results(inputs, grads, "triton", scale=LOGIT_SCALE, image_mask=mask)
    same, exact = reference_bilateral_results(inputs, grads, scale=LOGIT_SCALE, image_mask=mask)
    assert_results_close(got, same, exact, FP32, BILATERAL_RESULT_NAMES)


