"""Edge cases on every backend (README: "Behaviour on edge cases"):

- a sample whose image tokens are all masked gets o_s = 0 and zero gradients; a query row
  that keeps no key in cross_attention gets zeros.
- B = 0, M = 0 or N = 0 return correctly shaped outputs (o_s = 0 when N = 0) and launch no kernel.
- any subset of inputs may require grad; grad outputs may be stride-0 expands (what
  `.sum().backward()` gives), partial (one output unused) or non-contiguous; inputs may be
  stride-0 along their tokens.
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
    make_bilateral_inputs,
    reference_bilateral_results,
    reference_cross_results,
    reference_pair,
)

FP32 = torch.float32
NAMES = INPUT_NAMES
GRAD_NAMES = BILATERAL_RESULT_NAMES[2:]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small shapes: Triton runs in its interpreter on CPU here.
B, H, M, N, D = 2, 2, 5, 7, 16


def _inputs(dtype=FP32, seed=1, shape=(B, H, M, N, D), layout="contiguous"):
    return list(make_bilateral_inputs(*shape, dtype=dtype, device=DEVICE, layout=layout, seed=seed))


# ----------------------------------------------------------------------------------------
# Empty masks, empty inputs
# ----------------------------------------------------------------------------------------
def test_fully_masked_sample_gives_zeros_and_zero_gradients(any_backend):
    shape = (3, H, M, N, D)
    inputs = _inputs(shape=shape)
    mask = torch.ones(3, N, dtype=torch.bool, device=DEVICE)
    mask[0, 3:] = False  # partly masked
    mask[1] = False  # no real token at all
    grads = [torch.randn(3, H, M, D, device=DEVICE), torch.randn(3, H, N, D, device=DEVICE)]
    got = bilateral_results(inputs, grads, any_backend, image_mask=mask)
    assert all(torch.isfinite(t).all() for t in got)
    o_s, dq_s, dk_x, dv_x = got[0], got[2], got[6], got[7]
    for name, t in (("o_s", o_s), ("dq_s", dq_s), ("dk_x", dk_x), ("dv_x", dv_x)):
        assert torch.count_nonzero(t[1]) == 0, f"{name} of the empty sample is not 0"
    # Masked tokens of the partly masked sample are no keys: no gradient reaches them.
    assert torch.count_nonzero(dk_x[0, :, 3:]) == 0 and torch.count_nonzero(dv_x[0, :, 3:]) == 0
    same, exact = reference_bilateral_results(inputs, grads, image_mask=mask)
    assert_close(got, same, exact, FP32, "outputs and gradients")


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
def test_cross_attention_with_no_kept_key(any_backend, few_queries):
    lq, lk = (M, N) if few_queries else (N, M)
    q = torch.randn(B, H, lq, D, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, lk, D, device=DEVICE, requires_grad=True)
    v = torch.randn(B, H, lk, D, device=DEVICE, requires_grad=True)
    mask = torch.ones(B, lk, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    o = sk.cross_attention(q, k, v, key_mask=mask, backend=any_backend)
    o.backward(torch.randn_like(o))
    for name, t in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all() and torch.count_nonzero(t[0]) == 0, name
    assert torch.count_nonzero(o[1]) > 0


@pytest.mark.parametrize("few_queries", [True, False], ids=["few-queries", "many-queries"])
def test_attn_mask_edge_values(any_backend, few_queries):
    """A per-query mask that keeps nothing gives zeros and zero gradients everywhere (finite);
    one that keeps everything gives the results of the call without it: bit for bit on the
    reference and the C++ kernel (a fully kept tile takes its unmasked path), under the
    tolerance rule on Triton, whose masked launch is a kernel compiled apart (on an H200 its
    fp32 results differed from the unmasked kernel's in the last bits); one that repeats the
    key mask on every query gives the key mask's results under the tolerance rule (the C++
    kernel may take its row form for partly kept tiles, which sums in another order)."""
    lq, lk = (M, N) if few_queries else (N, M)
    q, k, v = (torch.randn(B, H, length, D, device=DEVICE) for length in (lq, lk, lk))
    grad = torch.randn(B, H, lq, D, device=DEVICE)
    nothing = torch.zeros(B, lq, lk, dtype=torch.bool, device=DEVICE)
    for name, t in zip(CROSS_RESULT_NAMES, cross_results(q, k, v, grad, any_backend, attn_mask=nothing)):
        assert torch.isfinite(t).all() and torch.count_nonzero(t) == 0, name
    kept = cross_results(q, k, v, grad, any_backend, attn_mask=~nothing)
    if any_backend in ("reference", "cpu"):
        for name, a, e in zip(CROSS_RESULT_NAMES, kept, cross_results(q, k, v, grad, any_backend)):
            assert torch.equal(a, e), name
    assert_results_close(kept, *reference_cross_results(q, k, v, grad), FP32, CROSS_RESULT_NAMES, "all kept")
    key_mask = torch.rand(B, lk, device=DEVICE) < 0.6
    key_mask[:, 0] = True
    same, exact = reference_cross_results(q, k, v, grad, key_mask=key_mask)
    for masks in (dict(attn_mask=key_mask[:, None, :].expand(B, lq, lk)), dict(key_mask=key_mask, attn_mask=~nothing)):
        got = cross_results(q, k, v, grad, any_backend, **masks)
        assert_results_close(got, same, exact, FP32, CROSS_RESULT_NAMES, str(sorted(masks)))


def _forbid_kernels(monkeypatch, backend):
    module = dispatch.kernels(backend)
    for fn in ("bilateral_fwd", "bilateral_bwd", "cross_fwd", "cross_bwd"):
        def launched(*args, _fn=fn, **kwargs):
            raise AssertionError(f"{backend}.{_fn} ran on an empty input")
        monkeypatch.setattr(module, fn, launched)


@pytest.mark.parametrize("b,m,n", [(0, M, N), (B, M, 0), (B, 0, N), (0, 0, 0)], ids=["B0", "N0", "M0", "all0"])
def test_empty_inputs_return_shaped_outputs_without_launching(monkeypatch, any_backend, b, m, n):
    if any_backend != "reference":
        _forbid_kernels(monkeypatch, any_backend)
        with pytest.raises(AssertionError, match="ran on an empty input"):  # the trap works
            sk.bilateral_attention(*_inputs(), backend=any_backend)
    inputs = [t.requires_grad_() for t in _inputs(shape=(b, H, m, n, D))]
    mask = torch.ones(b, n, dtype=torch.bool, device=DEVICE)
    o_s, o_x = sk.bilateral_attention(*inputs, image_mask=mask, backend=any_backend)
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
        o = sk.cross_attention(q, k, k, backend=any_backend)
        assert o.shape == (b, H, lq, D) and torch.count_nonzero(o) == 0
        o.sum().backward()
        assert q.grad.shape == q.shape and k.grad.shape == k.shape


# ----------------------------------------------------------------------------------------
# Partial requires_grad, grad-output layouts
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "needs_grad", [("q_x",), ("k_s", "v_x"), ("q_s", "k_s", "v_s"), ("k_x",)], ids=lambda t: "+".join(t)
)
def test_only_some_inputs_require_grad(kernel_backend, needs_grad):
    inputs = _inputs(layout="bnhd")
    grads = [torch.randn_like(inputs[0]), torch.randn_like(inputs[3])]
    leaves = [t.detach().clone().requires_grad_(n in needs_grad) for n, t in zip(NAMES, inputs)]
    o_s, o_x = sk.bilateral_attention(*leaves, backend=kernel_backend)
    torch.autograd.backward((o_s, o_x), grads)
    same, exact = reference_bilateral_results(inputs, grads)
    for i, (name, leaf) in enumerate(zip(NAMES, leaves)):
        if name in needs_grad:
            assert_close(leaf.grad, same[2 + i], exact[2 + i], FP32, "d" + name)
        else:
            assert leaf.grad is None, name
    with torch.no_grad():
        o_s2, o_x2 = sk.bilateral_attention(*leaves, backend=kernel_backend)
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
def test_grad_output_layouts(monkeypatch, kernel_backend, loss):
    seen = _record_backward_grads(monkeypatch, kernel_backend)
    inputs = _inputs(layout="strided")
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    LOSSES[loss](*sk.bilateral_attention(*leaves, backend=kernel_backend)).backward()
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


def test_inputs_broadcast_along_tokens(kernel_backend):
    """Stride 0 along the token axis (one query, key or value shared by every token): the
    kernels must read it as given. Forward only: some exact gradients are then identically 0
    (softmax invariances), which makes a gradient comparison pure rounding."""
    base = _inputs(shape=(B, H, 1, 1, D))
    for shared in ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x"):
        inputs = _inputs(seed=2)
        i = NAMES.index(shared)
        inputs[i] = base[i].expand_as(inputs[i])
        assert inputs[i].stride(2) == 0
        outs = sk.bilateral_attention(*inputs, backend=kernel_backend)
        same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
        assert_close(list(outs), list(same), list(exact), FP32, f"{shared} shared by all tokens: o_s, o_x")
