"""The public boundary: validation messages, backend selection and shape edge cases."""
import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels import dispatch
from spatialformer_kernels.testing import make_bilateral_inputs, make_image_mask

B, H, M, N, D = 2, 2, 5, 7, 16


def _inputs(**overrides):
    names = ["q_s", "k_s", "v_s", "q_x", "k_x", "v_x"]
    tensors = dict(zip(names, make_bilateral_inputs(B, H, M, N, D)))
    tensors.update(overrides)
    return [tensors[n] for n in names]


BAD_BILATERAL = [
    (dict(q_s=torch.randn(B, M, D)), {}, ValueError, ["q_s", "rank 4", "(2, 5, 16)"]),
    (dict(k_s=[1.0]), {}, TypeError, ["k_s", "list"]),
    (dict(v_x=torch.randn(B, H, N, D, dtype=torch.float64)), {}, TypeError, ["v_x", "float64", "float32"]),
    (dict(q_x=torch.randn(B, H, N, D).int()), {}, TypeError, ["q_s", "q_x", "int32"]),
    (dict(k_x=torch.randn(B + 1, H, N, D)), {}, ValueError, ["k_x", "(3, 2, 7, 16)", "(2, 2, 5, 16)"]),
    (dict(v_s=torch.randn(B, H + 1, M, D)), {}, ValueError, ["v_s", "(2, 3, 5, 16)"]),
    (dict(q_x=torch.randn(B, H, N, D + 1)), {}, ValueError, ["q_x", "(2, 2, 7, 17)"]),
    (dict(k_s=torch.randn(B, H, M + 1, D)), {}, ValueError, ["spatial token count M", "k_s", "(2, 2, 6, 16)"]),
    (dict(v_x=torch.randn(B, H, N + 2, D)), {}, ValueError, ["image token count N", "v_x", "(2, 2, 9, 16)"]),
    ({}, dict(image_mask=torch.ones(B, N)), TypeError, ["image_mask", "torch.bool", "torch.float32"]),
    ({}, dict(image_mask=torch.ones(B, N + 1, dtype=torch.bool)), ValueError, ["image_mask", "[2, 7]", "(2, 8)"]),
    ({}, dict(image_mask=[True]), TypeError, ["image_mask", "list"]),
    ({}, dict(scale=float("nan")), ValueError, ["scale", "nan"]),
    ({}, dict(scale="0.5"), TypeError, ["scale", "str"]),
    ({}, dict(backend="cuda"), ValueError, ["backend", "'cuda'", "'auto'"]),
]


@pytest.mark.parametrize("overrides,kwargs,error,fragments", BAD_BILATERAL, ids=lambda x: None)
def test_bad_bilateral_inputs_raise_naming_the_argument(overrides, kwargs, error, fragments):
    with pytest.raises(error) as raised:
        sk.bilateral_attention(*_inputs(**overrides), **kwargs)
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@pytest.mark.parametrize("head_dim", [4, 7, 257, 512])
def test_head_dim_out_of_range(head_dim):
    tensors = make_bilateral_inputs(1, 1, 3, 4, head_dim)
    with pytest.raises(ValueError, match=rf"head dim D of q_s .* is {head_dim}; supported range is 8..256"):
        sk.bilateral_attention(*tensors)


def test_mixed_devices_are_rejected_before_any_kernel():
    meta = torch.empty(B, H, N, D, device="meta")
    with pytest.raises(ValueError, match=r"q_s is on cpu but k_x is on meta"):
        sk.bilateral_attention(*_inputs(k_x=meta))


def test_swapped_head_and_token_axes_are_named_with_the_fix():
    """A [B, L, H, D] tensor where [B, H, L, D] is expected: the message blames that tensor
    (not the first correct one it differs from) and suggests .transpose(1, 2)."""
    q_s, k_s, v_s, q_x, k_x, v_x = make_bilateral_inputs(B, H, M, N, D)
    with pytest.raises(ValueError) as raised:  # the first input alone is transposed
        sk.bilateral_attention(q_s.transpose(1, 2), k_s, v_s, q_x, k_x, v_x)
    message = str(raised.value)
    assert message.startswith("q_s (2, 5, 2, 16): expected [B, H, L, D] with (B, H, D) = (2, 2, 16)"), message
    assert "H and L axes look swapped" in message and "q_s.transpose(1, 2)" in message
    assert "k_s" not in message
    # every input a [B, L, H, D] projection passed without its view
    transposed = [t.transpose(1, 2) for t in (q_s, k_s, v_s, q_x, k_x, v_x)]
    with pytest.raises(ValueError, match=r"q_s \(2, 5, 2, 16\), k_s .*, v_x \(2, 7, 2, 16\): expected .* swapped"):
        sk.bilateral_attention(*transposed)
    with pytest.raises(ValueError, match=r"^k \(2, 7, 2, 16\): .* pass k.transpose\(1, 2\)"):
        sk.cross_attention(q_s, k_x.transpose(1, 2), v_x)


def test_bad_cross_inputs():
    q, k, v = make_bilateral_inputs(B, H, M, N, D)[3:]
    with pytest.raises(ValueError, match=r"key count of v .* does not match k"):
        sk.cross_attention(q, k, v[:, :, :3])
    with pytest.raises(ValueError, match=r"key_mask must have shape \[B, N\] = \[2, 7\] to match k"):
        sk.cross_attention(q, k, v, key_mask=torch.ones(B, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        sk.cross_attention(None, k, v)
    with pytest.raises(TypeError, match=r"q is torch.float32 but k is torch.float16"):
        sk.cross_attention(q, k.half(), v)
    with pytest.raises(ValueError, match=r"q is on cpu but v is on meta"):
        sk.cross_attention(q, k, torch.empty_like(v, device="meta"))
    with pytest.raises(ValueError, match=r"\[B, H, \*, D\] of k \(2, 3, 7, 16\) does not match q \(2, 2, 7, 16\)"):
        sk.cross_attention(q, torch.randn(B, H + 1, N, D), v)
    with pytest.raises(ValueError, match=r"head dim D of q \(2, 2, 7, 4\) is 4; supported range is 8..256"):
        sk.cross_attention(q[..., :4], k[..., :4], v[..., :4])
    with pytest.raises(TypeError, match=r"key_mask must have dtype torch.bool .* got torch.int64"):
        sk.cross_attention(q, k, v, key_mask=torch.ones(B, N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"key_mask is on meta but k is on cpu"):
        sk.cross_attention(q, k, v, key_mask=torch.ones(B, N, dtype=torch.bool, device="meta"))


def test_bad_attn_mask():
    """attn_mask errors name the argument, the expected [B, Lq, Lk] and what came, with a hint
    for the two layouts other libraries use (a head axis of 1, or [B * H, Lq, Lk])."""
    q, k, v = make_bilateral_inputs(B, H, M, N, D)[3:]  # Lq = Lk = 7
    q = q[:, :, :5]
    with pytest.raises(ValueError, match=r"attn_mask must have shape \[B, Lq, Lk\] = \[2, 5, 7\] to match q "
                                         r"\(2, 2, 5, 16\) and k \(2, 2, 7, 16\), got \(2, 7, 5\)$"):
        sk.cross_attention(q, k, v, attn_mask=torch.ones(B, 7, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(2, 1, 5, 7\); the mask is shared by every head: pass attn_mask\[:, 0\]"):
        sk.cross_attention(q, k, v, attn_mask=torch.ones(B, 1, 5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"got \(4, 5, 7\) \(\[B \* H, Lq, Lk\], as nn.MultiheadAttention"):
        sk.cross_attention(q, k, v, attn_mask=torch.ones(B * H, 5, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"attn_mask must have dtype torch.bool \(True = attend\), got torch.float32"):
        sk.cross_attention(q, k, v, attn_mask=torch.zeros(B, 5, 7))
    with pytest.raises(TypeError, match=r"attn_mask must be a torch.Tensor or None, got list"):
        sk.cross_attention(q, k, v, attn_mask=[[True]])
    with pytest.raises(ValueError, match=r"attn_mask is on meta but q is on cpu"):
        sk.cross_attention(q, k, v, attn_mask=torch.ones(B, 5, 7, dtype=torch.bool, device="meta"))
    # the mask is checked on the slow path too (inputs that need the explaining checks)
    with pytest.raises(ValueError, match=r"attn_mask must have shape"):
        sk.cross_attention(q, k, v, key_mask=torch.ones(B, N, dtype=torch.bool).t().contiguous().t(),
                           attn_mask=torch.ones(B, 5, 5, dtype=torch.bool))


def test_backend_that_cannot_take_the_tensors_names_backend_device_and_dtype(monkeypatch):
    meta = [torch.empty(1, 1, L, 8, device="meta") for L in (3, 3, 3, 5, 5, 5)]
    if "cpu" in sk.available_backends():
        with pytest.raises(ValueError, match=r"backend 'cpu' cannot run on meta tensors"):
            sk.bilateral_attention(*meta, backend="cpu")
        with pytest.raises(ValueError, match=r"backend 'cpu' cannot run on meta tensors"):
            sk.cross_attention(*meta[:3], backend="cpu")
    if "triton" in sk.available_backends():
        inputs = make_bilateral_inputs(1, 1, 3, 5, 8, dtype=torch.float64)
        with pytest.raises(TypeError, match=r"backend 'triton' does not support dtype torch.float64"):
            sk.bilateral_attention(*inputs, backend="triton")
        with pytest.raises(TypeError, match=r"backend 'triton' does not support dtype torch.float64"):
            sk.cross_attention(*inputs[3:], backend="triton")
        monkeypatch.setattr(dispatch, "triton_interpreter_enabled", lambda: False)
        with pytest.raises(ValueError, match=r"backend 'triton' cannot run on cpu tensors \(set TRITON_INTERPRET=1"):
            sk.bilateral_attention(*make_bilateral_inputs(1, 1, 3, 5, 8), backend="triton")


def test_available_backends_and_unavailable_backend_errors():
    available = sk.available_backends()
    assert available[0] == "reference"
    assert set(available) <= {"reference", "triton", "cpu"}
    for backend in ("triton", "cpu"):
        if backend not in available:
            with pytest.raises(RuntimeError, match=f"backend '{backend}' is not available"):
                sk.bilateral_attention(*_inputs(), backend=backend)


def test_runnable_backends_are_the_available_ones_that_run_on_the_device(monkeypatch):
    cpu = sk.runnable_backends("cpu")
    assert cpu[0] == "reference" and set(cpu) <= set(sk.available_backends())
    assert ("cpu" in cpu) == ("cpu" in sk.available_backends())
    # Triton runs CPU tensors only in its interpreter; CUDA tensors need a CUDA machine
    assert ("triton" in cpu) == ("triton" in sk.available_backends() and dispatch.triton_interpreter_enabled())
    for backend in cpu:  # each one really runs there
        o_s, o_x = sk.bilateral_attention(*make_bilateral_inputs(1, 1, 3, 5, 8), backend=backend)
        assert o_s.shape == (1, 1, 3, 8) and o_x.shape == (1, 1, 5, 8)
    assert "cpu" not in sk.runnable_backends("meta")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in sk.runnable_backends(torch.device("cpu"))


def test_auto_resolves_to_a_kernel_for_the_device_or_the_reference():
    resolved = dispatch.resolve_backend("auto", torch.device("cpu"), torch.float32)
    expected = "cpu" if "cpu" in sk.available_backends() else "reference"
    assert resolved == expected
    # float64 has no kernel: auto takes the reference, an explicit kernel backend refuses.
    assert dispatch.resolve_backend("auto", torch.device("cpu"), torch.float64) in ("reference", "cpu")


def test_default_scale_is_inverse_sqrt_head_dim():
    tensors = _inputs()
    default = sk.bilateral_attention(*tensors, backend="reference")
    explicit = sk.bilateral_attention(*tensors, scale=D**-0.5, backend="reference")
    for a, b in zip(default, explicit):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_registered_ops_take_any_backend_name_with_gradients(backend):
    """torch.ops.spatialformer.* called directly (as TorchScript does) with "auto" or
    "reference": the op resolves the name, and its outputs and gradients are the public
    function's; empty inputs launch no kernel."""
    from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference

    inputs = [t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, seed=3)]
    mask = make_image_mask(B, N, empty_samples=(1,), seed=4)
    o_s, o_x, lse_s, lse_x = torch.ops.spatialformer.bilateral_attention(*inputs, 0.3, mask, backend)
    assert lse_s.dtype == lse_x.dtype == torch.float64
    grads = torch.autograd.grad(o_s.sum() + o_x.square().sum(), inputs)
    ref_s, ref_x = bilateral_attention_reference(*inputs, 0.3, mask)
    ref_grads = torch.autograd.grad(ref_s.sum() + ref_x.square().sum(), inputs)
    torch.testing.assert_close([o_s, o_x, *grads], [ref_s, ref_x, *ref_grads], rtol=1e-4, atol=1e-5)
    q, k, v = inputs[0], inputs[4], inputs[5]
    o, lse = torch.ops.spatialformer.cross_attention(q, k, v, 0.3, mask, backend)
    dq, dk, dv = torch.autograd.grad(o.sum(), (q, k, v))
    ref = cross_attention_reference(q, k, v, 0.3, mask)
    torch.testing.assert_close([o, dq, dk, dv], [ref, *torch.autograd.grad(ref.sum(), (q, k, v))], rtol=1e-4, atol=1e-5)
    empty = make_bilateral_inputs(B, H, M, 0, D)
    o_s, o_x, _, _ = torch.ops.spatialformer.bilateral_attention(*empty, 0.3, None, backend)
    assert o_s.shape == (B, H, M, D) and o_x.shape == (B, H, 0, D) and torch.count_nonzero(o_s) == 0


def test_ops_are_registered_with_torch_library():
    for name in ("bilateral_attention", "bilateral_attention_backward", "cross_attention", "cross_attention_backward"):
        assert hasattr(torch.ops.spatialformer, name)


def test_masked_reference_path_through_public_api():
    tensors = _inputs()
    mask = make_image_mask(B, N, empty_samples=[0])
    o_s, _ = sk.bilateral_attention(*tensors, image_mask=mask, backend="reference")
    assert torch.equal(o_s[0], torch.zeros_like(o_s[0]))


def _needs_cpu_kernel():
    if "cpu" not in sk.available_backends():
        pytest.skip("the C++ CPU kernel is not available")


def _spy_on_ops(monkeypatch):
    """Count calls of the torch.library ops that the public functions go through."""
    from spatialformer_kernels.ops import bilateral_attention as bilateral_module
    from spatialformer_kernels.ops import cross_attention as cross_module

    calls = []
    for module, name in ((bilateral_module, "_bilateral_attention_op"), (cross_module, "_cross_attention_op")):
        op = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _op=op, _name=name: calls.append(_name) or _op(*args))
    return calls


def test_eager_inference_calls_the_kernel_directly_with_the_ops_results(monkeypatch):
    _needs_cpu_kernel()
    tensors = _inputs()
    mask = make_image_mask(B, N, empty_samples=[1])
    op_s, op_x, _, _ = torch.ops.spatialformer.bilateral_attention(*tensors, D**-0.5, mask, "cpu")
    op_cross, _ = torch.ops.spatialformer.cross_attention(tensors[0], tensors[4], tensors[5], D**-0.5, mask, "cpu")
    calls = _spy_on_ops(monkeypatch)
    with torch.no_grad():
        o_s, o_x = sk.bilateral_attention(*tensors, image_mask=mask, backend="cpu")
        o_cross = sk.cross_attention(tensors[0], tensors[4], tensors[5], key_mask=mask, backend="cpu")
    assert calls == []
    assert torch.equal(o_s, op_s) and torch.equal(o_x, op_x) and torch.equal(o_cross, op_cross)
    sk.bilateral_attention(*tensors, backend="cpu")  # grad enabled, but nothing requires grad
    assert calls == []


def test_eager_training_skips_the_op_and_matches_its_gradients_bitwise(monkeypatch):
    _needs_cpu_kernel()
    mask = make_image_mask(B, N, empty_samples=[1])
    grads_out = [torch.randn(B, H, L, D) for L in (M, N)]

    def grads(call):
        leaves = [t.requires_grad_() for t in _inputs()]
        outs = call(leaves)
        return [*outs, *torch.autograd.grad(outs, leaves, grads_out)]

    through_op = grads(lambda t: torch.ops.spatialformer.bilateral_attention(*t, D**-0.5, mask, "cpu")[:2])
    calls = _spy_on_ops(monkeypatch)
    eager = grads(lambda t: sk.bilateral_attention(*t, image_mask=mask, backend="cpu"))
    assert calls == []  # a plain autograd.Function, not the torch.library op
    assert all(torch.equal(a, b) for a, b in zip(eager, through_op))
    q, k, v = (t.requires_grad_() for t in _inputs()[3:])
    o = sk.cross_attention(q, k, v, key_mask=mask, backend="cpu")
    op_o, _ = torch.ops.spatialformer.cross_attention(q, k, v, D**-0.5, mask, "cpu")
    assert calls == [] and torch.equal(o, op_o)
    g_eager = torch.autograd.grad(o, (q, k, v), torch.ones_like(o))
    g_op = torch.autograd.grad(op_o, (q, k, v), torch.ones_like(o))
    assert all(torch.equal(a, b) for a, b in zip(g_eager, g_op))


def test_eager_training_refuses_a_second_derivative():
    _needs_cpu_kernel()
    leaves = [t.requires_grad_() for t in _inputs()]
    o_s, _ = sk.bilateral_attention(*leaves, backend="cpu")
    (g,) = torch.autograd.grad(o_s.sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):  # as through the op
        g.sum().backward()


def test_dispatch_modes_and_transforms_go_through_the_ops(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    _needs_cpu_kernel()
    calls = _spy_on_ops(monkeypatch)
    counter = FlopCounterMode(display=False)
    with counter:
        leaves = [t.requires_grad_() for t in _inputs()]
        o_s, o_x = sk.bilateral_attention(*leaves, backend="cpu")
        (o_s.sum() + o_x.sum()).backward()
    assert calls == ["_bilateral_attention_op"] and all(t.grad is not None for t in leaves)
    calls.clear()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        sk.bilateral_attention(*_inputs(), backend="cpu")
        sk.cross_attention(*_inputs()[3:], backend="cpu")
    assert calls == ["_bilateral_attention_op", "_cross_attention_op"]
    assert counter.get_total_flops() > 0


def test_kernels_are_called_directly_only_for_plain_eager_tensors_with_nothing_to_record():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.overrides import TorchFunctionMode

    def direct_call_ok(*tensors):  # what the public functions ask before an inference call
        return dispatch.eager_call_ok(*tensors) and not dispatch.needs_autograd(*tensors)

    x = torch.randn(3)
    assert direct_call_ok(x, None)
    assert not direct_call_ok(x, x.clone().requires_grad_())
    with torch.no_grad():
        assert direct_call_ok(x.clone().requires_grad_())
    seen = []
    torch.func.grad(lambda t: seen.append(direct_call_ok(t)) or t.sum())(x)
    torch.func.vmap(lambda t: seen.append(direct_call_ok(t)) or t)(x)
    assert seen == [False, False]
    with FakeTensorMode() as mode:
        assert not direct_call_ok(mode.from_tensor(x))

    class PassThrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with PassThrough():
        assert not direct_call_ok(x)
    compiled = torch.compile(lambda t: t + 1 if direct_call_ok(t) else t - 1, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), x - 1)
