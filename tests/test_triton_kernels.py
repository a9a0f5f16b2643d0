"""The Triton kernels (Triton's interpreter on CPU here, the GPU where there is one) against
the reference, under the one tolerance rule; determinism; split-K planning."""
import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels import dispatch
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference
from spatialformer_kernels.testing import (
    assert_close,
    bilateral_case_id,
    case_id,
    make_bilateral_inputs,
    make_image_mask,
    mask_for_case,
    outputs_and_grads,
    reference_pair,
    transposed_grad,
)

pytestmark = pytest.mark.skipif(
    "triton" not in sk.available_backends()
    or not (torch.cuda.is_available() or dispatch.triton_interpreter_enabled()),
    reason="the Triton backend needs CUDA or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x")
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

# (B, H, M, N, D, dtype, layout, mask: None | "mask" | "empty" (one sample without tokens)).
# Together: every dtype; N = 1, 97, 1025; M = 1, 49, 130; D = 8, 40, 96; all layouts.
BILATERAL_CASES = [
    (1, 1, 1, 1, 8, FP32, "contiguous", None),
    (2, 2, 49, 97, 40, FP16, "bnhd", "empty"),
    (2, 1, 130, 97, 8, BF16, "strided", "mask"),
    (1, 1, 49, 300, 96, FP32, "bnhd", "mask"),
    (1, 1, 1, 1025, 40, BF16, "contiguous", None),
    (2, 1, 130, 1, 96, FP16, "strided", "empty"),
    (1, 2, 130, 97, 40, FP32, "strided", "empty"),
]


@pytest.mark.parametrize("case", BILATERAL_CASES, ids=bilateral_case_id)
def test_bilateral_forward_and_all_gradients_match_reference(case):
    B, H, M, N, D, dtype, layout, mask_kind = case
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout=layout, seed=1)
    mask = mask_for_case(B, N, mask_kind, device=DEVICE)
    scale = 0.9 * D**-0.5
    grads = (transposed_grad((B, H, M, D), dtype, 4, device=DEVICE), transposed_grad((B, H, N, D), dtype, 5, device=DEVICE))

    outs, d_inputs = outputs_and_grads(
        lambda *t: sk.bilateral_attention(*t, scale=scale, image_mask=mask, backend="triton"), inputs, grads
    )
    (ref_outs, ref_grads), (exact_outs, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: bilateral_attention_reference(*u, scale, mask), t[:6], t[6:]),
        [*inputs, *grads],
    )
    name = bilateral_case_id(case)
    assert_close(outs, ref_outs, exact_outs, dtype, f"{name} (o_s, o_x)")
    for label, actual, same, exact in zip(NAMES, d_inputs, ref_grads, exact_grads):
        assert_close(actual, same, exact, dtype, f"{name} d{label}")
    if mask_kind == "empty":  # the empty-mask rule: o_s = 0 and zero gradients, never NaN
        empty = B - 1
        assert torch.equal(outs[0][empty], torch.zeros_like(outs[0][empty]))
        for label, g in zip(NAMES, d_inputs):
            assert torch.isfinite(g).all(), label
        for g in (d_inputs[0], d_inputs[4], d_inputs[5]):  # dq_s, dk_x, dv_x of that sample
            assert torch.equal(g[empty], torch.zeros_like(g[empty]))


# (B, H, Lq, Lk, D, dtype, masked): both paths (Lq <= Lk: split over keys; Lq > Lk: a full
# softmax per query tile), including keys beyond one block (Lk = 130 > BLOCK_M).
CROSS_CASES = [
    (2, 2, 7, 300, 40, FP16, True),
    (2, 1, 300, 7, 40, BF16, True),
    (1, 2, 200, 130, 8, FP32, True),
    (2, 1, 1, 1, 96, FP32, False),
    (1, 1, 130, 513, 8, BF16, False),
    # wide heads (the head-dim-split backward), both shapes
    (2, 1, 20, 130, 96, FP32, True),
    (2, 2, 130, 20, 256, BF16, True),
]


@pytest.mark.parametrize(
    "case", CROSS_CASES, ids=lambda c: f"{case_id(c[0], c[1], c[2], c[3], c[4], c[5])}-{'mask' if c[6] else 'nomask'}"
)
def test_cross_attention_both_shapes_forward_and_gradients(case):
    B, H, Lq, Lk, D, dtype, masked = case
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(B, Lq, H, D, generator=gen).transpose(1, 2).to(DEVICE, dtype)  # bnhd view
    k = torch.randn(B, H, Lk, D, generator=gen).to(DEVICE, dtype)
    v = torch.randn(B, H, Lk + 2, D, generator=gen)[:, :, 1 : Lk + 1].to(DEVICE, dtype)  # strided
    key_mask = make_image_mask(B, Lk, empty_samples=(0,), device=DEVICE, seed=8) if masked else None
    grad = transposed_grad((B, H, Lq, D), dtype, 9, device=DEVICE)
    scale = D**-0.5

    (out,), grads = outputs_and_grads(
        lambda *t: sk.cross_attention(*t, scale=scale, key_mask=key_mask, backend="triton"), (q, k, v), (grad,)
    )
    ((ref_out,), ref_grads), ((exact_out,), exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: cross_attention_reference(*u, scale, key_mask), t[:3], t[3:]),
        [q, k, v, grad],
    )
    name = case_id(B, H, Lq, Lk, D, dtype)
    assert_close(out, ref_out, exact_out, dtype, f"{name} o")
    for label, actual, same, exact in zip("qkv", grads, ref_grads, exact_grads):
        assert_close(actual, same, exact, dtype, f"{name} d{label}")
    if masked:
        assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_two_runs_are_bitwise_equal_forward_and_backward():
    """Split-K partials and spatial-block partials are reduced in a fixed order, no atomics."""
    B, H, M, N, D = 1, 1, 49, 600, 40  # three splits and, in the backward, looped spatial blocks
    inputs = make_bilateral_inputs(B, H, M, N, D, FP16, device=DEVICE, layout="bnhd", seed=11)
    mask = mask_for_case(B, N, "mask", device=DEVICE)
    grads = (transposed_grad((B, H, M, D), FP16, 12, device=DEVICE), transposed_grad((B, H, N, D), FP16, 13, device=DEVICE))
    def run():
        return outputs_and_grads(lambda *t: sk.bilateral_attention(*t, image_mask=mask, backend="triton"), inputs, grads)

    first, second = run(), run()
    for a, b in zip([*first[0], *first[1]], [*second[0], *second[1]]):
        assert torch.equal(a, b)


def test_split_plan_fills_the_gpu_without_over_splitting():
    from spatialformer_kernels.ops.bilateral_attention_triton import split_plan

    h100_sms = 132
    splits, chunk = split_plan(h100_sms, 2 * 2, 67_200)  # det800x1344-stage1: B=2, H=2
    assert splits * 4 >= h100_sms and splits * chunk >= 67_200 > (splits - 1) * chunk
    splits, _ = split_plan(h100_sms, 64 * 2, 3_136)  # cls224-stage1 training batch
    assert splits <= 3
    assert split_plan(h100_sms, 1, 100) == (1, 128)  # never more splits than tokens allow


def test_small_batch_large_n_uses_several_splits_and_matches():
    from spatialformer_kernels.ops import bilateral_attention_triton as bt

    B, H, M, N, D = 1, 1, 49, 600, 40
    splits, _ = bt.split_plan(bt.sm_count(torch.device(DEVICE)), B * H, N)
    assert splits > 1
    inputs = make_bilateral_inputs(B, H, M, N, D, FP32, device=DEVICE, seed=14)
    out = sk.bilateral_attention(*inputs, backend="triton")
    same, exact = reference_pair(lambda *t: bilateral_attention_reference(*t, D**-0.5), inputs)
    assert_close(out, same, exact, FP32, case_id(B, H, M, N, D, FP32))


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bca_block_runs_on_the_triton_backend(mode):
    """The layer path: a BCA block with backend="triton" (one fused op, or two cross_attention
    calls) against the same block on the reference, outputs and every gradient."""
    import copy

    from spatialformer.layers import BCABlock

    torch.manual_seed(21)
    block = BCABlock(32, num_heads=2, mode=mode, backend="triton").to(DEVICE)
    exact_block = copy.deepcopy(block).double()
    same_block = copy.deepcopy(block)
    exact_block.attn.backend = same_block.attn.backend = "reference"
    assert block.attn._backend() == "triton"
    s, x = torch.randn(2, 6, 32, device=DEVICE), torch.randn(2, 37, 32, device=DEVICE)
    mask = make_image_mask(2, 37, empty_samples=(1,), device=DEVICE, seed=22)

    def run(module, s, x):
        s, x = s.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        out_s, out_x = module(s, x, mask)
        loss = out_s.square().sum() + out_x.sin().sum()
        grads = torch.autograd.grad(loss, [s, x, *module.parameters()])
        return [out_s, out_x, *grads]

    actual = run(block, s, x)
    same = run(same_block, s, x)
    exact = run(exact_block, s.double(), x.double())
    names = ["s", "x", "ds", "dx", *(f"d{n}" for n, _ in block.named_parameters())]
    for name, a, r, e in zip(names, actual, same, exact):
        assert_close(a, r, e, torch.float32, f"{mode} {name}")


def test_torch_compile_fullgraph_traces_the_triton_ops():
    """The custom ops (fake implementations + autograd) trace without a graph break."""
    B, H, M, N, D = 1, 2, 5, 33, 16
    inputs = [t.requires_grad_() for t in make_bilateral_inputs(B, H, M, N, D, FP32, device=DEVICE, seed=23)]
    mask = mask_for_case(B, N, "mask", device=DEVICE)

    def step(q_s, k_s, v_s, q_x, k_x, v_x):
        o_s, o_x = sk.bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, image_mask=mask, backend="triton")
        o = sk.cross_attention(o_x, q_s, v_s, backend="triton")  # many queries over few keys
        return o_s.sum() + o.square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    expected_loss = step(*inputs)
    expected = torch.autograd.grad(expected_loss, inputs)
    assert torch.equal(loss, expected_loss)
    for a, e in zip(grads, expected):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------
# Wide-head backward (bilateral_attention_triton_wide), called directly
# ----------------------------------------------------------------------------------------
# (B, H, M, N, D, dtype, layout, mask: None | "mask" | "empty", direction): the buckets it
# serves (fp32 BLOCK_D 128 and 256; 16-bit D = 256 with M = 20 and 33, over one spatial
# block), odd N, every layout; direction s masks the image tokens, direction x the spatial
# ones ("empty": the last sample has no kept key: zero gradients). N = 300 with B = H = 1
# gives two splits in the interpreter (it pretends 8 SMs).
WIDE_CASES = [
    (2, 1, 20, 150, 96, FP32, "bnhd", "empty", "s"),
    (2, 1, 20, 150, 96, FP32, "bnhd", "empty", "x"),
    (1, 2, 7, 97, 72, FP32, "strided", "mask", "s"),
    (1, 1, 5, 131, 200, FP32, "contiguous", None, "s"),
    (1, 1, 5, 131, 200, FP32, "strided", None, "x"),
    (2, 1, 20, 101, 256, BF16, "bnhd", "mask", "s"),
    (2, 1, 33, 90, 256, FP16, "strided", "empty", "s"),
    (1, 2, 33, 90, 256, BF16, "contiguous", "mask", "x"),
    (1, 1, 9, 300, 72, FP32, "contiguous", "mask", "s"),
    (1, 1, 9, 300, 72, FP32, "bnhd", "mask", "x"),
]


def _wide_case_id(case):
    *shape, layout, mask_kind, direction = case
    return f"{case_id(*shape)}-{layout}-{mask_kind or 'nomask'}-dir{direction}"


def _wide_direction_inputs(case, seed):
    """(q, k, v, key mask, grad output) of one direction of a WIDE_CASES case."""
    B, H, M, N, D, dtype, layout, mask_kind, direction = case
    q_s, k_s, v_s, q_x, k_x, v_x = make_bilateral_inputs(B, H, M, N, D, dtype, device=DEVICE, layout=layout, seed=seed)
    if direction == "s":
        q, k, v, keys = q_s, k_x, v_x, N
    else:
        q, k, v, keys = q_x, k_s, v_s, M
    mask = mask_for_case(B, keys, mask_kind, device=DEVICE, seed=seed + 1)
    return q, k, v, mask, transposed_grad(tuple(q.shape), dtype, seed + 2, device=DEVICE)


def _wide_grads(q, k, v, mask, grad, scale, direction):
    from spatialformer_kernels.ops.bilateral_attention_triton_wide import wide_head_bwd

    o = sk.cross_attention(q, k, v, scale=scale, key_mask=mask, backend="triton")  # the Triton forward's output
    return wide_head_bwd(grad, q, k, v, o, scale, mask, direction == "s")


@pytest.mark.parametrize("case", WIDE_CASES, ids=_wide_case_id)
def test_wide_head_backward_matches_reference(case):
    B, H, M, N, D, dtype, layout, mask_kind, direction = case
    q, k, v, mask, grad = _wide_direction_inputs(case, seed=31)
    scale = 0.9 * D**-0.5
    grads = _wide_grads(q, k, v, mask, grad, scale, direction)
    (_, same), (_, exact) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: cross_attention_reference(*u, scale, mask), t[:3], t[3:]),
        [q, k, v, grad],
    )
    name = _wide_case_id(case)
    for label, actual, s, e in zip("qkv", grads, same, exact):
        assert actual.shape == e.shape and actual.dtype == dtype and actual.is_contiguous()
        assert_close(actual, s, e, dtype, f"{name} d{label}")
    if mask_kind == "empty":  # no kept key in the last sample: zero gradients, never NaN
        for g in grads:
            assert torch.equal(g[B - 1], torch.zeros_like(g[B - 1]))


def test_wide_head_backward_splits_and_reruns_bitwise():
    """Both directions of the multi-split cases: several splits, bitwise-equal reruns."""
    from spatialformer_kernels.ops import bilateral_attention_triton as bt
    from spatialformer_kernels.ops import bilateral_attention_triton_wide as wide

    for case in WIDE_CASES[-2:]:
        B, H, M, N, D, dtype, *_, direction = case
        cfg = wide.wide_config(bt.block_d_for(D), 4, direction == "s")
        splits, _ = bt.split_plan(bt.sm_count(torch.device(DEVICE)), B * H * -(-D // cfg.BLOCK_DC), N)
        assert splits > 1, case
        q, k, v, mask, grad = _wide_direction_inputs(case, seed=41)
        first = _wide_grads(q, k, v, mask, grad, D**-0.5, direction)
        second = _wide_grads(q, k, v, mask, grad, D**-0.5, direction)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
