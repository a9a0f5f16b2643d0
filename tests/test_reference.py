"""The reference against an independent float64 computation (PyTorch SDPA's math path)."""
import pytest
import torch
import torch.nn.functional as F

from spatialformer_kernels.reference import (
    bilateral_attention_reference,
    cross_attention_reference,
    cross_attention_reference_with_lse,
)
from spatialformer_kernels.testing import assert_close, case_id, make_bilateral_inputs, make_image_mask

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(2, 2, 64, 97, 32), (1, 3, 1, 1, 8), (2, 1, 49, 130, 40), (1, 2, 5, 1025, 96), (3, 2, 130, 17, 16)]


def _sdpa(q, k, v, scale, key_mask=None):
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)


def _sdpa_bilateral(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask=None):
    return _sdpa(q_s, k_x, v_x, scale, image_mask), _sdpa(q_x, k_s, v_s, scale)


def _double(tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "bnhd", "strided"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_forward_matches_float64(shape, dtype, layout, masked):
    B, H, M, N, D = shape
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, layout=layout)
    mask = make_image_mask(B, N, seed=1) if masked else None
    scale = D**-0.5
    ours = bilateral_attention_reference(*inputs, scale, mask)
    torch_same_dtype = _sdpa_bilateral(*inputs, scale, mask)
    exact = _sdpa_bilateral(*_double(inputs), scale, mask)
    assert_close(ours, torch_same_dtype, exact, dtype, case_id(B, H, M, N, D, dtype))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_of_all_inputs_match_float64(shape):
    B, H, M, N, D = shape
    inputs = make_bilateral_inputs(B, H, M, N, D, torch.float64, layout="bnhd", requires_grad=True)
    mask = make_image_mask(B, N, seed=2)
    scale = 0.7 * D**-0.5
    grad_s = torch.randn(B, H, M, D, dtype=torch.float64)
    grad_x = torch.randn(B, H, N, D, dtype=torch.float64)

    def grads(fn, tensors):
        o_s, o_x = fn(*tensors, scale, mask)
        return torch.autograd.grad((o_s * grad_s).sum() + (o_x * grad_x).sum(), tensors)

    ours = grads(bilateral_attention_reference, inputs)
    independent = grads(_sdpa_bilateral, _double(inputs))
    for name, a, b in zip(["q_s", "k_s", "v_s", "q_x", "k_x", "v_x"], ours, independent):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_upcast_computes_in_float32_and_returns_input_dtype():
    q, k, v = make_bilateral_inputs(2, 2, 64, 300, 32, torch.bfloat16)[3:]
    upcast = cross_attention_reference(q, k, v, 32**-0.5, upcast=True)
    assert upcast.dtype == torch.bfloat16
    exact = cross_attention_reference(q.double(), k.double(), v.double(), 32**-0.5)
    plain = cross_attention_reference(q, k, v, 32**-0.5)
    assert (upcast.double() - exact).abs().max() <= (plain.double() - exact).abs().max()


def test_empty_mask_sample_gives_zeros_and_zero_gradients():
    B, H, M, N, D = 3, 2, 8, 11, 16
    inputs = make_bilateral_inputs(B, H, M, N, D, requires_grad=True)
    mask = make_image_mask(B, N, empty_samples=[1])
    o_s, o_x = bilateral_attention_reference(*inputs, D**-0.5, mask)
    assert torch.equal(o_s[1], torch.zeros_like(o_s[1]))
    assert torch.isfinite(o_s).all() and torch.isfinite(o_x).all()
    (o_s.square().sum() + o_x.sum()).backward()
    q_s, k_x, v_x = inputs[0], inputs[4], inputs[5]
    for grad in (q_s.grad[1], k_x.grad[1], v_x.grad[1]):
        assert torch.equal(grad, torch.zeros_like(grad))
    assert all(torch.isfinite(t.grad).all() for t in inputs)


def test_lse_is_logsumexp_and_minus_inf_for_empty_rows():
    q, k, v = make_bilateral_inputs(2, 1, 5, 9, 8, torch.float64)[:3]
    mask = make_image_mask(2, 5, empty_samples=[0])
    _, lse = cross_attention_reference_with_lse(q, k, v, 0.5, mask)
    logits = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(lse[1], torch.logsumexp(logits[1], dim=-1))
    assert torch.all(lse[0] == float("-inf"))


def test_zero_keys_give_zero_output():
    q = torch.randn(2, 2, 4, 8)
    empty = torch.randn(2, 2, 0, 8)
    assert torch.equal(cross_attention_reference(q, empty, empty, 1.0), torch.zeros_like(q))
