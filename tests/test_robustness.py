"""Defined behaviour on hostile inputs and edge cases, on every backend this machine has
(README: "Behaviour on edge cases"):

- NaN/Inf in an input reaches only the outputs that depend on it; NaN gradients stay in
  their head and direction.
- logits up to |scale * q.k| = 1e4 stay finite and within the one tolerance rule.
- a sample whose image tokens are all masked gets o_s = 0 and zero gradients.
- B = 0, M = 0 or N = 0 return correctly shaped outputs (o_s = 0 when N = 0) and launch no kernel.
- any subset of inputs may require grad; grad outputs may be stride-0 expands (what
  `.sum().backward()` gives), partial (one output unused) or non-contiguous.
- element offsets past 2**31 (int64 indexing), memory O(B*H*(M+N)*D) never O(M*N).
- the layers under torch.autocast equal explicit casts, and fp32 master weights train.
- error messages name the argument and the offending backend, device or dtype.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F

import spatialformer_kernels as sk
from spatialformer import BCABlock, BilateralCrossAttention
from spatialformer.layers import _merge_heads, _split_heads
from spatialformer_kernels import dispatch
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference
from spatialformer_kernels.testing import assert_close, make_bilateral_inputs, reference_pair

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
NAMES = ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x")
GRAD_NAMES = tuple("d" + n for n in NAMES)
DIRECTION_S = {"q_s", "k_x", "v_x"}  # the inputs of o_s (spatial queries over image tokens)
DIRECTION_X = {"q_x", "k_s", "v_s"}  # the inputs of o_x


def _usable(name):
    if name not in sk.available_backends():
        return False
    return name != "triton" or torch.cuda.is_available() or dispatch.triton_interpreter_enabled()


def _param(name):
    return pytest.param(name, marks=pytest.mark.skipif(not _usable(name), reason=f"backend {name!r} cannot run here"))


KERNEL_BACKENDS = [_param("cpu"), _param("triton")]
ALL_BACKENDS = [pytest.param("reference")] + KERNEL_BACKENDS
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)  # randn_like below: the same grads whatever the test order


# Small shapes: Triton runs in its interpreter on CPU here.
B, H, M, N, D = 2, 2, 5, 7, 16


def _inputs(dtype=FP32, seed=1, shape=(B, H, M, N, D), layout="contiguous"):
    return [t.to(DEVICE) for t in make_bilateral_inputs(*shape, dtype=dtype, layout=layout, seed=seed)]


def _bilateral_with_grads(inputs, grads, backend, scale=None, mask=None):
    """(o_s, o_x, dq_s, dk_s, dv_s, dq_x, dk_x, dv_x) for the backend, or the reference."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if backend == "reference_fn":
        outs = bilateral_attention_reference(*leaves, scale if scale is not None else leaves[0].shape[-1] ** -0.5, mask)
    else:
        outs = sk.bilateral_attention(*leaves, scale=scale, image_mask=mask, backend=backend)
    d = torch.autograd.grad(outs, leaves, grads, allow_unused=True, materialize_grads=True)
    return [o.detach() for o in outs] + list(d)


def _reference_with_grads(inputs, grads, scale=None, mask=None):
    """(same-dtype, float64) reference results matching `_bilateral_with_grads`."""
    return reference_pair(lambda *t: _bilateral_with_grads(t[:6], t[6:], "reference_fn", scale, mask),
                          [*inputs, *grads])


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
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_reaches_only_the_outputs_that_depend_on_it(backend, name):
    inputs = _inputs()
    inputs[NAMES.index(name)][_poisoned_index(name)] = float("nan")
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    got = _bilateral_with_grads(inputs, grads, backend)
    same, exact = _reference_with_grads(inputs, grads)
    for out_name, out, region in zip(("o_s", "o_x"), got[:2], _dependent_region(name)):
        # NaN exactly where the math puts it: never dropped, never spread to other rows or heads.
        nan_where_expected = torch.equal(torch.isnan(out), region)
        assert nan_where_expected, f"{out_name}: NaN at {torch.isnan(out).nonzero().tolist()}"
    assert_close(got[:2], same[:2], exact[:2], FP32, "o_s, o_x")
    for grad_name, g, s, e, region in zip(GRAD_NAMES, got[2:], same[2:], exact[2:], _gradient_region(name)):
        assert torch.isfinite(g[~region]).all(), f"{grad_name}: non-finite outside the poisoned head/direction"
        assert_close(*_outside([g, s, e], region), FP32, f"{grad_name} outside the poisoned head/direction")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inf_reaches_only_the_outputs_that_depend_on_it(backend, name):
    """+Inf may cancel (a -inf logit is a dropped key), so the non-finite outputs are a subset
    of the dependent region, with the float64 reference's exact pattern."""
    inputs = _inputs()
    inputs[NAMES.index(name)][_poisoned_index(name)] = float("inf")
    o_s, o_x = sk.bilateral_attention(*inputs, backend=backend)
    for out_name, out, region in zip(("o_s", "o_x"), (o_s, o_x), _dependent_region(name)):
        assert torch.isfinite(out[~region]).all(), f"{out_name}: non-finite outside the dependent outputs"
    same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
    assert_close([o_s, o_x], same, exact, FP32, "o_s, o_x")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_in_a_masked_token(backend):
    """A masked-out token's k_x is never a logit, so NaN there does not reach o_s. Its v_x is
    multiplied by a zero weight, and 0 * NaN = NaN (as in the reference): padding must be finite."""
    mask = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    mask[POISON_B, N - 2 :] = False
    for name, expect_nan in (("k_x", False), ("v_x", True)):
        inputs = _inputs()
        inputs[NAMES.index(name)][POISON_B, POISON_H, N - 1, POISON_D] = float("nan")
        o_s, o_x = sk.bilateral_attention(*inputs, image_mask=mask, backend=backend)
        expected = torch.zeros_like(o_s, dtype=torch.bool)
        if expect_nan:
            expected[POISON_B, POISON_H, :, POISON_D] = True
        nan_where_expected = torch.equal(torch.isnan(o_s), expected)
        assert nan_where_expected, f"{name}: NaN at {torch.isnan(o_s).nonzero().tolist()}"
        assert torch.isfinite(o_x).all()
        same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5, mask), inputs)
        assert_close([o_s, o_x], same, exact, FP32, f"{name}: o_s, o_x")


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nan_query_row_in_cross_attention(backend, few_queries):
    lq, lk = (M, N) if few_queries else (N, M)
    q = make_bilateral_inputs(B, H, 1, lq, D, seed=3)[3].to(DEVICE)
    k, v = [t.to(DEVICE) for t in make_bilateral_inputs(B, H, 1, lk, D, seed=4)[4:]]
    q[1, 1, lq // 2, 0] = float("nan")
    o = sk.cross_attention(q, k, v, backend=backend)
    expected = torch.zeros_like(o, dtype=torch.bool)
    expected[1, 1, lq // 2, :] = True
    nan_where_expected = torch.equal(torch.isnan(o), expected)
    assert nan_where_expected, f"NaN at {torch.isnan(o).nonzero().tolist()}"


# ----------------------------------------------------------------------------------------
# Large logits
# ----------------------------------------------------------------------------------------
LOGIT_SCALE = 0.25


def _large_logit_inputs(dtype, largest=1e4, shape=(1, 2, 6, 40, 16)):
    """Inputs whose largest |scale * q.k| (both directions) is `largest`, in `dtype`."""
    generator = torch.Generator().manual_seed(0)
    b, h, m, n, d = shape
    q_s, k_s, v_s, q_x, k_x, v_x = [
        torch.randn(b, h, length, d, generator=generator, dtype=torch.float64) for length in (m, m, m, n, n, n)
    ]
    peak = LOGIT_SCALE * max((q_s @ k_x.mT).abs().max(), (q_x @ k_s.mT).abs().max())
    gain = (largest / peak) ** 0.5
    inputs = [q_s * gain, k_s * gain, v_s, q_x * gain, k_x * gain, v_x]
    return [t.to(device=DEVICE, dtype=dtype) for t in inputs]


# (B, H, M, N, D): one spatial block; M past a Triton fp32 block (its looped path) and past
# the CPU kernel's 64-key tile, odd N; with a mask on the image tokens.
LARGE_LOGIT_SHAPES = {"one-block": (1, 2, 6, 40, 16), "many-spatial": (1, 1, 70, 45, 16)}


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("shape", list(LARGE_LOGIT_SHAPES.values()), ids=list(LARGE_LOGIT_SHAPES))
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16], ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_logits_up_to_1e4_are_finite_and_exact(backend, dtype, shape, masked):
    """At |logit| = 1e4 the softmax is one-hot and the reference's backward cancels
    dP - delta exactly (its drift is ~1e-19, so the rule's bound is the dtype floor); the
    kernels must too, which they do by forming delta with the same arithmetic as dP."""
    inputs = _large_logit_inputs(dtype, shape=shape)
    q_s, k_s, _, q_x, k_x, _ = [t.double() for t in inputs]
    peak = LOGIT_SCALE * max((q_s @ k_x.mT).abs().max(), (q_x @ k_s.mT).abs().max())
    assert 0.98e4 <= peak <= 1.02e4  # the inputs really reach |logit| = 1e4 in this dtype
    mask = None
    if masked:
        mask = torch.ones(shape[0], shape[3], dtype=torch.bool, device=DEVICE)
        mask[:, ::3] = False
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(inputs[i].shape, generator=generator).to(inputs[i]) for i in (0, 3)]
    got = _bilateral_with_grads(inputs, grads, backend, scale=LOGIT_SCALE, mask=mask)
    assert all(torch.isfinite(t).all() for t in got), "non-finite output or gradient"
    same, exact = _reference_with_grads(inputs, grads, scale=LOGIT_SCALE, mask=mask)
    for name, g, s, e in zip(("o_s", "o_x", *GRAD_NAMES), got, same, exact):
        assert_close(g, s, e, dtype, name)


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cross_attention_logits_up_to_1e4_fp32_gradients(backend, few_queries):
    q_s, k_s, v_s, q_x, k_x, v_x = _large_logit_inputs(FP32, shape=(2, 2, 6, 90, 16))
    q, k, v = (q_s, k_x, v_x) if few_queries else (q_x, k_s, v_s)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q)

    def run(q, k, v, grad, backend):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        if backend == "reference_fn":
            o = cross_attention_reference(*leaves, LOGIT_SCALE)
        else:
            o = sk.cross_attention(*leaves, scale=LOGIT_SCALE, backend=backend)
        return [o.detach(), *torch.autograd.grad(o, leaves, grad)]

    got = run(q, k, v, grad, backend)
    same, exact = reference_pair(lambda *t: run(*t, "reference_fn"), [q, k, v, grad])
    for name, g, s, e in zip(("o", "dq", "dk", "dv"), got, same, exact):
        assert_close(g, s, e, FP32, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_logits_up_to_1e3_fp32_gradients_are_exact(backend):
    inputs = _large_logit_inputs(FP32, largest=1e3)
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    got = _bilateral_with_grads(inputs, grads, backend, scale=LOGIT_SCALE)
    same, exact = _reference_with_grads(inputs, grads, scale=LOGIT_SCALE)
    assert_close(got, same, exact, FP32, "outputs and gradients")


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
def test_wide_head_logits_up_to_1e4_fp32_gradients(masked):
    """fp32 at D = 96, where the Triton backward splits the head dim
    (`bilateral_attention_triton_wide`): at |logit| = 1e4 every softmax row is one-hot and
    the reference's gradients are exact, so the bound is the fp32 floor."""
    from spatialformer_kernels.ops import bilateral_attention_triton as kernels

    shape = (1, 2, 6, 40, 96)
    assert not kernels.backward_supported(kernels.block_d_for(shape[4]), 4, shape[2])  # the wide-head path
    inputs = _large_logit_inputs(FP32, shape=shape)
    mask = None
    if masked:
        mask = torch.ones(shape[0], shape[3], dtype=torch.bool, device=DEVICE)
        mask[:, 1::4] = False
    generator = torch.Generator().manual_seed(3)
    grads = [torch.randn(inputs[i].shape, generator=generator).to(inputs[i]) for i in (0, 3)]
    got = _bilateral_with_grads(inputs, grads, "triton", scale=LOGIT_SCALE, mask=mask)
    same, exact = _reference_with_grads(inputs, grads, scale=LOGIT_SCALE, mask=mask)
    for name, g, s, e in zip(("o_s", "o_x", *GRAD_NAMES), got, same, exact):
        assert_close(g, s, e, FP32, name)


# ----------------------------------------------------------------------------------------
# Empty masks, empty inputs
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fully_masked_sample_gives_zeros_and_zero_gradients(backend):
    shape = (3, H, M, N, D)
    inputs = _inputs(shape=shape)
    mask = torch.ones(3, N, dtype=torch.bool, device=DEVICE)
    mask[0, 3:] = False  # partly masked
    mask[1] = False  # no real token at all
    grads = [torch.randn(3, H, M, D, device=DEVICE), torch.randn(3, H, N, D, device=DEVICE)]
    got = _bilateral_with_grads(inputs, grads, backend, mask=mask)
    assert all(torch.isfinite(t).all() for t in got)
    o_s, dq_s, dk_x, dv_x = got[0], got[2], got[6], got[7]
    for name, t in (("o_s", o_s), ("dq_s", dq_s), ("dk_x", dk_x), ("dv_x", dv_x)):
        assert torch.count_nonzero(t[1]) == 0, f"{name} of the empty sample is not 0"
    # Masked tokens of the partly masked sample are no keys: no gradient reaches them.
    assert torch.count_nonzero(dk_x[0, :, 3:]) == 0 and torch.count_nonzero(dv_x[0, :, 3:]) == 0
    same, exact = _reference_with_grads(inputs, grads, mask=mask)
    assert_close(got, same, exact, FP32, "outputs and gradients")


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_cross_attention_with_no_kept_key(backend, few_queries):
    lq, lk = (M, N) if few_queries else (N, M)
    q = torch.randn(B, H, lq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, lk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, lk, D, device=DEVICE, requires_grad=True)
    mask = torch.ones(B, lk, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    o = sk.cross_attention(q, k, v, key_mask=mask, backend=backend)
    o.backward(torch.randn_like(o))
    for name, t in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all() and torch.count_nonzero(t[0]) == 0, name
    assert torch.count_nonzero(o[1]) > 0


def _forbid_kernels(monkeypatch, backend):
    module = dispatch.kernels(backend)
    for fn in ("bilateral_fwd", "bilateral_bwd", "cross_fwd", "cross_bwd"):
        def launched(*args, _fn=fn, **kwargs):
            raise AssertionError(f"{backend}.{_fn} ran on an empty input")
        monkeypatch.setattr(module, fn, launched)


@pytest.mark.parametrize("b,m,n", [(0, M, N), (B, M, 0), (B, 0, N), (0, 0, 0)], ids=["B0", "N0", "M0", "all0"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_inputs_return_shaped_outputs_without_launching(monkeypatch, backend, b, m, n):
    _forbid_kernels(monkeypatch, backend)
    with pytest.raises(AssertionError, match="ran on an empty input"):  # the trap works
        sk.bilateral_attention(*_inputs(), backend=backend)
    inputs = [t.requires_grad_() for t in _inputs(shape=(b, H, m, n, D))]
    mask = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    o_s, o_x = sk.bilateral_attention(*inputs, image_mask=mask, backend=backend)
    assert o_s.shape == (b, H, m, D) and o_x.shape == (b, H, n, D)
    assert o_s.dtype == o_x.dtype == FP32
    assert torch.count_nonzero(o_s) == 0 and torch.count_nonzero(o_x) == 0  # o_s = 0 when N = 0
    (o_s.sum() + o_x.sum()).backward()
    for name, t in zip(NAMES, inputs):
        assert t.grad is not None and t.grad.shape == t.shape and torch.count_nonzero(t.grad) == 0, name
    # cross attention with no query, no key or no batch
    for lq, lk in ((0, 4), (4, 0), (m, n)):
        q = torch.randn(b, H, lq, D, device=DEVICE, requires_grad=True)
        k = torch.randn(b, H, lk, D, device=DEVICE, requires_grad=True)
        o = sk.cross_attention(q, k, k, backend=backend)
        assert o.shape == (b, H, lq, D) and torch.count_nonzero(o) == 0
        o.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------------------
# Partial requires_grad, grad-output layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "needs_grad", [("q_x",), ("k_s", "v_x"), ("q_s", "k_s", "v_s"), ("k_x",)], ids=lambda t: "+".join(t)
)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_only_some_inputs_require_grad(backend, needs_grad):
    inputs = _inputs(layout="bnhd")
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    leaves = [t.detach().clone().requires_grad_(n in needs_grad) for n, t in zip(NAMES, inputs)]
    o_s, o_x = sk.bilateral_attention(*leaves, backend=backend)
    torch.autograd.backward((o_s, o_x), grads)
    same, exact = _reference_with_grads(inputs, grads)
    for i, (name, leaf) in enumerate(zip(NAMES, leaves)):
        if name in needs_grad:
            assert_close(leaf.grad, same[2 + i], exact[2 + i], FP32, "d" + name)
        else:
            assert leaf.grad is None, name
    with torch.no_grad():
        o_s2, o_x2 = sk.bilateral_attention(*leaves, backend=backend)
    assert not o_s2.requires_grad and torch.equal(o_s2, o_s.detach()) and torch.equal(o_x2, o_x.detach())


def _record_backward_grads(monkeypatch, backend):
    """Wrap the backend's bilateral_bwd to record the strides of the grad outputs it gets."""
    module = dispatch.kernels(backend)
    original, seen = module.bilateral_bwd, []

    def recording(do_s, do_x, *rest):
        seen.append((do_s.stride(), do_x.stride()))
        return original(do_s, do_x, *rest)

    monkeypatch.setattr(module, "bilateral_bwd", recording)
    return seen


LOSSES = {
    "sum-both": lambda o_s, o_x: o_s.sum() + o_x.sum(),  # stride-0 expanded grads (all strides 0)
    "mean-both": lambda o_s, o_x: o_s.mean() - 3 * o_x.mean(),
    "sum-o_x-only": lambda o_s, o_x: o_x.sum(),  # o_s unused: its grad is None
    "o_s-only": lambda o_s, o_x: (o_s * torch.linspace(-1, 1, D, device=o_s.device)).sum(),
    # a grad that is a transposed [B, N, H, D] view: non-contiguous, no stride is 1 along N
    "transposed": lambda o_s, o_x: (o_x.transpose(1, 2) * torch.arange(B * N * H * D, device=o_x.device)
                                    .reshape(B, N, H, D).sin()).sum() + o_s.pow(2).sum(),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_grad_output_layouts(monkeypatch, backend, loss):
    seen = _record_backward_grads(monkeypatch, backend)
    inputs = _inputs(layout="strided")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    LOSSES[loss](*sk.bilateral_attention(*leaves, backend=backend)).backward()
    assert len(seen) == 1
    if loss == "sum-both":
        assert seen[0] == ((0, 0, 0, 0), (0, 0, 0, 0)), seen  # the test really feeds stride-0 grads

    def reference_grads(*t):
        refs = [x.detach().requires_grad_() for x in t]
        return torch.autograd.grad(LOSSES[loss](*bilateral_attention_reference(*refs, D**-0.5)), refs,
                                   allow_unused=True, materialize_grads=True)

    same, exact = reference_pair(reference_grads, inputs)
    for name, leaf, s, e in zip(GRAD_NAMES, leaves, same, exact):
        assert_close(leaf.grad, s, e, FP32, name)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inputs_broadcast_along_tokens(backend):
    """Stride 0 along the token axis (one query, key or value shared by every token): the
    kernels must read it as given. Forward only: some exact gradients are then identically 0
    (softmax invariances), which makes a gradient comparison pure rounding."""
    base = _inputs(shape=(B, H, 1, 1, D))
    for shared in ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x"):
        inputs = _inputs(seed=2)
        i = NAMES.index(shared)
        inputs[i] = base[i].expand_as(inputs[i])
        assert inputs[i].stride(2) == 0
        outs = sk.bilateral_attention(*inputs, backend=backend)
        same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
        assert_close(list(outs), list(same), list(exact), FP32, f"{shared} shared by all tokens: o_s, o_x")


# ----------------------------------------------------------------------------------------
# Large inputs: int64 offsets, memory
# ----------------------------------------------------------------------------------------
def _run_script(script: str, env: dict | None = None, timeout: int = 300) -> dict:
    """Run a Python script in a fresh process; return the JSON object on its last line."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "script.py")  # a file: triton.jit reads its source
        with open(path, "w") as f:
            f.write(textwrap.dedent(script))
        done = subprocess.run([sys.executable, path], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


# The six inputs live in one bf16 storage, each a [3, 2, L, 16] view with batch stride
# 3 * 2**29 and head stride 2**29 elements, so the last sample starts ~3.76e9 elements (7.5 GB)
# into the storage: element offsets pass 2**31 and byte offsets 2**32. The storage comes from
# torch.empty (mmap), so only the pages the views touch become resident (a few MB).
LARGE_OFFSET_SCRIPT = """
    import json, resource, sys
    import torch, spatialformer_kernels as sk
    from spatialformer_kernels.reference import bilateral_attention_reference
    from spatialformer_kernels.testing import reference_pair, tolerance_report

    B, H, M, N, D, dtype = 3, 2, 5, 40, 16, torch.bfloat16
    stride_b, stride_h = 3 * 2**29, 2**29
    lengths = (M, M, M, N, N, N)
    offsets = [sum(lengths[:i]) * D for i in range(6)]
    storage = torch.empty((B - 1) * stride_b + (H - 1) * stride_h + sum(lengths) * D, dtype=dtype)
    views = [storage.as_strided((B, H, L, D), (stride_b, stride_h, D, 1), o) for L, o in zip(lengths, offsets)]
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(B, H, L, D, generator=generator).to(dtype) for L in lengths]
    for view, values in zip(views, data):
        view.copy_(values)
    grads_out = [torch.randn(B, H, L, D, generator=generator).to(dtype) for L in (M, N)]
    last = max(v.storage_offset() + sum((s - 1) * st for s, st in zip(v.shape, v.stride())) for v in views)

    def run(backend, tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        outs = sk.bilateral_attention(*leaves, backend=backend)
        return list(outs) + list(torch.autograd.grad(outs, leaves, grads_out))

    def reference(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors]
        outs = bilateral_attention_reference(*leaves, D**-0.5)
        return list(outs) + list(torch.autograd.grad(outs, leaves, [g.to(tensors[0].dtype) for g in grads_out]))

    same, exact = reference_pair(reference, data)
    report = {"last_element_offset": last, "storage_bytes": storage.numel() * 2}
    for backend in sys.argv[1:]:
        got = run(backend, views)
        report[backend] = [tolerance_report(g, s, e, dtype) for g, s, e in zip(got, same, exact)]
    report["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(report))
"""


def test_element_offsets_past_2_31_are_safe():
    backends = [name for name in ("cpu", "triton") if _usable(name)]
    if not backends:
        pytest.skip("no kernel backend here")
    script = LARGE_OFFSET_SCRIPT.replace("sys.argv[1:]", repr(backends))
    report = _run_script(script)
    assert report["last_element_offset"] > 2**31 and report["storage_bytes"] > 2**32
    assert report["max_rss_bytes"] < 3 * 2**30, "the test touched far more memory than the views"
    names = ("o_s", "o_x") + GRAD_NAMES
    for backend in backends:
        for name, (ok, message) in zip(names, report[backend]):
            assert ok, f"{backend} {name}: {message}"


# Static check of the Triton kernels' address arithmetic: each kernel is lowered to Triton IR
# for sm_90 (no GPU needed) with every int argument typed i32, which is what Triton passes
# for a stride or size below 2**31. Every `tt.addptr` offset must then be i64, or an i32 that
# is a tile index (built from tl.arange and constants only, so bounded by the block size).
# A control kernel computing `pid * stride` in i32 must be flagged, so the check can fail.
TRITON_OFFSETS_SCRIPT = r"""
    import json, os, re
    os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not the interpreter's stand-ins
    import triton
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from spatialformer_kernels.ops import bilateral_attention_triton as kernels

    INT_ARGS = {"H", "M", "N", "D", "CHUNK", "SPLITS"}
    FLOAT_ARGS = {"qk_scale", "sm_scale"}
    CONSTEXPRS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 32, "DOT_PRECISION": "tf32"}
    BOUNDED_OPS = {"tt.make_range", "arith.constant", "tt.expand_dims", "tt.broadcast", "tt.splat", "tt.reshape",
                   "arith.addi", "arith.subi", "arith.muli", "arith.andi", "arith.ori", "arith.remsi", "arith.divsi"}
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    options = backend.parse_options({})

    def ttir(fn, constexprs):
        signature = {}
        for p in fn.params:
            if p.is_constexpr:
                signature[p.name] = "constexpr"
            elif p.name.startswith("stride_") or p.name in INT_ARGS:
                signature[p.name] = "i32"
            elif p.name in FLOAT_ARGS:
                signature[p.name] = "fp32"
            elif p.name.endswith("MASK"):
                signature[p.name] = "*i1"
            elif p.name.startswith(("LSE", "PART")):
                signature[p.name] = "*fp32"
            else:
                signature[p.name] = "*fp16"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                                backend.get_module_map(), context)
        stages = {}
        backend.add_stages(stages, options, source.language)
        return str(stages["ttir"](module, {}))  # helpers inlined, canonicalised

    def unsafe_offsets(text):
        defs = {}
        for line in text.splitlines():
            m = re.match(r"\s*(%[\w.]+) = (\S+) (.*)", line)
            if m:
                defs[m.group(1)] = (m.group(2), m.group(3).split(" : ")[0])
        found = []
        for line in text.splitlines():
            m = re.search(r"tt\.addptr %[\w.]+, (%[\w.]+) : .*, (?:tensor<[\dx]*)?(i\d+)>?", line)
            if not m or m.group(2) == "i64":
                continue
            stack, seen = [m.group(1)], set()
            while stack:
                value = stack.pop()
                if value in seen:
                    continue
                seen.add(value)
                op, operands = defs.get(value, ("an argument or loop variable", ""))
                if op not in BOUNDED_OPS:
                    found.append(f"{line.strip()[:200]}  <- {value} from {op}")
                    break
                stack += re.findall(r"%[\w.]+", operands)
        return found

    @triton.jit
    def _control_int32_offset(X, Y, stride_b):
        pid = tl.program_id(0)
        tl.store(Y + pid.to(tl.int64), tl.load(X + pid * stride_b))

    report = {"kernels": [], "variants": 0, "addptr": 0, "unsafe": [],
              "control": unsafe_offsets(ttir(_control_int32_offset, {}))}
    for name, fn in sorted(vars(kernels).items()):
        if not (isinstance(fn, triton.runtime.JITFunction) and name.endswith("_kernel")):
            continue
        flags = [p.name for p in fn.params if p.is_constexpr and p.name not in CONSTEXPRS]
        every_branch = {**{k: v for k, v in CONSTEXPRS.items() if k in fn.arg_names}, **{f: True for f in flags}}
        variants = [every_branch] + [{**every_branch, f: False} for f in flags if not f.startswith(("DIR_", "HAS_"))]
        for constexprs in variants:
            text = ttir(fn, constexprs)
            report["variants"] += 1
            report["addptr"] += text.count("tt.addptr")
            report["unsafe"] += [f"{name} {constexprs}: {u}" for u in unsafe_offsets(text)]
        report["kernels"].append(name)
    print(json.dumps(report))
"""


def test_triton_address_arithmetic_is_int64():
    pytest.importorskip("triton")
    report = _run_script(TRITON_OFFSETS_SCRIPT, env={"TRITON_INTERPRET": "0"})
    assert len(report["control"]) == 1, report["control"]  # the i32 pid * stride is caught
    assert {"_bilateral_fwd_kernel", "_bilateral_bwd_kernel"} <= set(report["kernels"]), report["kernels"]
    assert report["addptr"] > 20
    assert report["unsafe"] == [], "\n".join(report["unsafe"])


# Peak memory of forward + backward, measured as the growth of the process's peak resident
# set (VmHWM, reset through /proc/self/clear_refs) in a fresh process, with the outputs and
# all six gradients kept alive. D = 8 and M up to 512 make M*N logits (B*H*M*N*4 bytes) 30-60x
# larger than the inputs, so O(M*N) memory cannot hide in the noise.
MEMORY_SCRIPT = """
    import json, sys
    import torch, spatialformer_kernels as sk
    from spatialformer_kernels.testing import make_bilateral_inputs

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    def measure(backend, B, H, M, N, D):
        inputs = [t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, seed=0)]
        warm = [t.requires_grad_() for t in make_bilateral_inputs(1, 1, 4, 8, D)]
        sum(o.sum() for o in sk.bilateral_attention(*warm, backend=backend)).backward()  # loads the kernel
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        before = status("VmRSS")
        o_s, o_x = sk.bilateral_attention(*inputs, backend=backend)
        (o_s.sum() + o_x.sum()).backward()
        extra = status("VmHWM") - before
        return {"backend": backend, "shape": [B, H, M, N, D], "extra": extra,
                "inputs": sum(t.numel() * t.element_size() for t in inputs), "logits": B * H * M * N * 4}

    print(json.dumps([measure(*case) for case in CASES]))
"""


def _measure_memory(cases):
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    return _run_script(MEMORY_SCRIPT.replace("CASES", repr(cases)))


@pytest.mark.skipif(not _usable("cpu"), reason="the C++ CPU kernel is not built here")
def test_cpu_kernel_memory_is_linear_in_tokens_not_m_times_n():
    small_m, large_m, reference = _measure_memory(
        [("cpu", 1, 2, 64, 70_000, 8), ("cpu", 1, 2, 512, 70_000, 8), ("reference", 1, 2, 256, 20_000, 8)]
    )
    for run in (small_m, large_m):
        # Outputs + six gradients alone are ~1.4x the inputs. The rest is the split workspace:
        # work items span at least 4 * M image tokens, so their spatial-side partials stay a
        # fraction of the image tensors for any M and any vector width (measured on an AVX-512
        # machine, where D = 8 pads to 16 floats: 2.1x at M = 64 and at M = 512; with items of
        # a fixed 256 tokens it was 5.5x at M = 512).
        assert run["extra"] < 3 * run["inputs"], run
    assert large_m["extra"] < 0.25 * large_m["logits"], large_m
    # 8x the spatial tokens: the logits grow by 250 MB; the kernel's memory barely moves
    growth = large_m["extra"] - small_m["extra"]
    assert growth < 0.02 * (large_m["logits"] - small_m["logits"]), (small_m, large_m)
    # Contrast, same measurement: the reference materialises the M*N logits several times.
    assert reference["extra"] > 2 * reference["logits"], reference


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
@pytest.mark.parametrize(
    "dtype,head_dim,n_image",
    [
        (BF16, 8, 70_000),
        (FP16, 128, 70_000),
        (FP32, 64, 70_000),
        (FP32, 96, 70_000),  # the wide-head backward (bilateral_attention_triton_wide)
        (BF16, 256, 70_000),
    ],
    ids=["bf16-D8", "fp16-D128", "fp32-D64", "fp32-D96", "bf16-D256"],
)
def test_triton_launchers_allocate_no_m_by_n_workspace(monkeypatch, dtype, head_dim, n_image):
    """Every byte the Triton launchers allocate for forward + backward at N = 70,000, with the
    kernels stubbed out (the interpreter is too slow for this N) and the split count planned
    for a 132-SM GPU. No allocation may be [B, H, M, N]-sized, and all of them together (a bound
    on the peak) stay within 6x the inputs (outputs, LSEs, gradients) plus the split workspace
    of fp32 partials, [B*H, splits, M, D] per buffer."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from spatialformer_kernels.ops import bilateral_attention_triton as kernels
    from spatialformer_kernels.ops import bilateral_attention_triton_wide as wide_kernels

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    stubbed = [(module, name) for module in (kernels, wide_kernels) for name, obj in vars(module).items()
               if type(obj).__module__.startswith("triton") and hasattr(obj, "__getitem__")]
    names = {name for _, name in stubbed}
    assert {"_bilateral_fwd_kernel", "_bilateral_bwd_kernel", "_bilateral_wide_bwd_kernel"} <= names, names
    for module, name in stubbed:
        monkeypatch.setattr(module, name, NoLaunch())
    for module in (kernels, wide_kernels):
        monkeypatch.setattr(module, "sm_count", lambda device: 132)

    class CountAllocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages, self.total, self.largest = set(), 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.storages:
                    self.storages.add(t.untyped_storage().data_ptr())
                    self.total += t.untyped_storage().nbytes()
                    self.largest = max(self.largest, t.untyped_storage().nbytes())
            return out

    B_, H_, M_, N_, D_ = 1, 2, 512, n_image, head_dim
    inputs = [torch.zeros(B_, H_, L, D_, dtype=dtype) for L in (M_, M_, M_, N_, N_, N_)]
    counter = CountAllocations()
    with counter:
        o_s, o_x, lse_s, lse_x = kernels.attention_fwd(*inputs, 0.3)
        kernels.attention_bwd(torch.zeros_like(o_s), torch.zeros_like(o_x), *inputs, o_s.zero_(), o_x.zero_(),
                              lse_s.zero_(), lse_x.zero_(), 0.3)
    logits = B_ * H_ * M_ * N_ * 4
    splits, _ = kernels.split_plan(132, B_ * H_, N_)  # the most splits either pass plans
    workspace = 4 * B_ * H_ * splits * M_ * D_ * 4  # fp32 partials: forward acc, backward dq_s/dk_s/dv_s
    inputs_bytes = sum(t.numel() * t.element_size() for t in inputs)
    report = dict(total=counter.total, largest=counter.largest, inputs=inputs_bytes, workspace=workspace,
                  logits=logits, splits=splits)
    assert counter.largest < 0.5 * logits, report  # no [B, H, M, N]-sized tensor
    assert counter.total < 6 * inputs_bytes + workspace, report


# ----------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------
AUTOCAST_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DIM, HEADS, N_SPATIAL, N_IMAGE = 32, 2, 9, 20


def _linear_bf16(linear, t):
    """What autocast does to an nn.Linear: input, weight and bias cast to bfloat16."""
    bias = linear.bias.to(BF16) if linear.bias is not None else None
    return F.linear(t.to(BF16), linear.weight.to(BF16), bias)


def _explicit_bf16_attention(attn, s, x, backend):
    q_s, k_s, v_s = _split_heads(_linear_bf16(attn.qkv_s, s), attn.num_heads)
    q_x, k_x, v_x = _split_heads(_linear_bf16(attn.qkv_x, x), attn.num_heads)
    o_s, o_x = sk.bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, backend=backend)
    return _linear_bf16(attn.proj_s, _merge_heads(o_s)), _linear_bf16(attn.proj_x, _merge_heads(o_x))


def _tokens(seed=0):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(2, N_SPATIAL, DIM, generator=generator).to(DEVICE)
    x = torch.randn(2, N_IMAGE, DIM, generator=generator).to(DEVICE)
    return s, x


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_attention_layer_under_autocast_equals_explicit_casts(backend):
    """Forward and parameter gradients, bitwise: autocast hands the op bf16 q/k/v and the op
    runs in bf16 (no hidden upcast, no autocast registration needed)."""
    torch.manual_seed(0)
    attn = BilateralCrossAttention(DIM, HEADS, backend=backend).to(DEVICE)
    twin = copy.deepcopy(attn)
    s, x = _tokens()
    with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
        ds, dx = attn(s, x)
    assert ds.dtype == dx.dtype == BF16
    ds_explicit, dx_explicit = _explicit_bf16_attention(twin, s, x, backend)
    assert torch.equal(ds, ds_explicit) and torch.equal(dx, dx_explicit)
    (ds.float().square().sum() + dx.float().sum()).backward()
    (ds_explicit.float().square().sum() + dx_explicit.float().sum()).backward()
    for (name, p), q in zip(attn.named_parameters(), twin.parameters()):
        assert p.grad.dtype == FP32 and torch.equal(p.grad, q.grad), name


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bca_block_under_autocast_matches_reference(backend, mode):
    """The block under autocast on a kernel backend vs the same under autocast on the
    reference backend, judged by the one tolerance rule against the block in float64."""
    torch.manual_seed(0)
    block = BCABlock(DIM, HEADS, mode=mode, backend=backend).to(DEVICE)
    reference = copy.deepcopy(block)
    reference.attn.backend = "reference"
    exact = copy.deepcopy(reference).double()
    s, x = _tokens(1)
    with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
        got = block(s, x)
        same = reference(s, x)
    want = exact(s.double(), x.double())
    assert [t.dtype for t in got] == [FP32, FP32]  # residual streams stay fp32
    assert_close(list(got), list(same), list(want), BF16, f"BCABlock {mode} (s, x)")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_fp32_master_weights_train_under_autocast(backend):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "block": BCABlock(DIM, HEADS, backend=backend),
        "head": torch.nn.Linear(DIM, 1),
    }).to(DEVICE)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    s, x = _tokens(2)
    target = torch.linspace(-1, 1, N_IMAGE, device=DEVICE).expand(2, N_IMAGE)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        with torch.autocast(AUTOCAST_DEVICE, dtype=BF16):
            s_out, x_out = model["block"](s, x)
            prediction = model["head"](x_out).squeeze(-1) + s_out.mean()
        loss = F.mse_loss(prediction.float(), target)
        loss.backward()
        assert all(p.grad.dtype == FP32 and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < 0.9 * losses[0], losses
    for name, p in model.named_parameters():
        assert p.dtype == FP32 and torch.isfinite(p).all(), name
        assert not torch.equal(p, before[name]), f"{name} was not updated"


# ----------------------------------------------------------------------------------------
# Messages (validation messages are covered by tests/test_api.py)
# ----------------------------------------------------------------------------------------
def test_backend_device_mismatch_names_backend_and_device():
    meta = [torch.empty(1, 1, L, 8, device="meta") for L in (3, 3, 3, 5, 5, 5)]
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run on meta tensors"):
        sk.bilateral_attention(*meta, backend="cpu")
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run on meta tensors"):
        sk.cross_attention(*meta[:3], backend="cpu")


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
def test_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_interpreter_enabled", lambda: False)
    with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cpu tensors \(set TRITON_INTERPRET=1"):
        sk.bilateral_attention(*make_bilateral_inputs(1, 1, 3, 5, 8), backend="triton")


@pytest.mark.skipif(not _usable("triton"), reason="the Triton backend cannot run here")
def test_backend_dtype_mismatch_names_backend_and_dtype():
    inputs = make_bilateral_inputs(1, 1, 3, 5, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"backend 'triton' does not support dtype torch.float64"):
        sk.bilateral_attention(*inputs, backend="triton")
    with pytest.raises(TypeError, match=r"backend 'triton' does not support dtype torch.float64"):
        sk.cross_attention(*inputs[3:], backend="triton")


def test_mask_and_cross_messages_name_argument_and_offender():
    inputs = make_bilateral_inputs(2, 1, 3, 5, 8)
    with pytest.raises(ValueError, match=r"image_mask is on meta but k_x is on cpu"):
        sk.bilateral_attention(*inputs, image_mask=torch.ones(2, 5, dtype=torch.bool, device="meta"))
    q, k, v = inputs[3:]
    with pytest.raises(TypeError, match=r"q is torch.float32 but k is torch.float16"):
        sk.cross_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"q is on cpu but v is on meta"):
        sk.cross_attention(q, k, torch.empty_like(v, device="meta"))
    with pytest.raises(ValueError, match=r"\[B, H, \*, D\] of k \(2, 2, 5, 8\) does not match q \(2, 1, 5, 8\)"):
        sk.cross_attention(q, k.expand(2, 2, 5, 8), v)
    with pytest.raises(ValueError, match=r"head dim D of q \(2, 1, 5, 4\) is 4; supported range is 8..256"):
        sk.cross_attention(q[..., :4], k[..., :4], v[..., :4])
    with pytest.raises(TypeError, match=r"key_mask must have dtype torch.bool .* got torch.int64"):
        sk.cross_attention(q, k, v, key_mask=torch.ones(2, 5, dtype=torch.long))
