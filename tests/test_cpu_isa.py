"""Every vector ISA path of the C++ CPU kernel that this CPU can run (AVX-512, AVX2, ATen's
generic at::vec code), each built on its own (cpu_backend.load_isa_build), against the reference
under the one tolerance rule, and against the package's own build (the widest ISA) under the
same rule. The ISA of the package's build is printed in pytest's header (tests/conftest.py)."""
import pytest
import torch

from spatialformer_kernels.backends import cpu as cpu_backend
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference
from spatialformer_kernels.testing import (
    assert_close,
    bilateral_case_id,
    make_attn_mask,
    make_bilateral_inputs,
    mask_for_case,
    outputs_and_grads,
    reference_pair,
    transposed_grad,
)

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
BILATERAL_NAMES = ("o_s", "o_x", "dq_s", "dk_s", "dv_s", "dq_x", "dk_x", "dv_x")

pytestmark = pytest.mark.skipif(not cpu_backend.is_available(), reason="the C++ CPU kernel is not built here")

# D = 8 and 40 pad differently for 8- and 16-float vectors; M = 130 and N = 1100 give several
# work items per (batch, head); "empty": the last sample has no image token.
BILATERAL_CASES = [
    (1, 2, 130, 1100, 8, FP32, "strided", "mask"),
    (2, 1, 49, 97, 40, BF16, "bnhd", "empty"),
    (2, 1, 5, 300, 96, FP16, "contiguous", None),
    (1, 1, 17, 200, 24, FP64, "bnhd", "mask"),
]
CROSS_CASES = [(1, 1, 5, 3000, 40, FP32), (1, 2, 700, 30, 8, BF16)]  # (B, H, Lq, Lk, D, dtype)
# (B, H, Lq, Lk, D, dtype, attn_mask kind, with key_mask): tiles some queries keep in part (the
# row form over a block's active queries, with select_kept's float and double vector code) and
# tiles no query keeps (skipped); in the "random" case every query also keeps the whole first
# tile, which takes the unmasked column path.
CROSS_ATTN_MASK_CASES = [
    (1, 2, 70, 300, 40, FP32, "random", False),
    (2, 1, 5, 700, 24, FP64, "transposed", True),
    (1, 1, 33, 130, 8, BF16, "query_broadcast", False),
]


@pytest.fixture(scope="module", params=cpu_backend.cpu_isas())
def isa_ops(request):
    """(isa, torch.ops namespace of the kernel built for that ISA)."""
    ops = cpu_backend.load_isa_build(request.param)
    return request.param, ops


def test_package_build_uses_the_widest_isa_of_this_cpu():
    assert cpu_backend.vector_isa() == cpu_backend.cpu_isas()[0]


def test_an_isa_this_cpu_cannot_run_is_refused():
    if "avx512" in cpu_backend.cpu_isas():
        pytest.skip("this CPU runs every ISA build")
    with pytest.raises(ValueError, match="cannot run the 'avx512' build"):
        cpu_backend.load_isa_build("avx512")


def _bilateral(ops, inputs, grads, scale, mask):
    """Outputs and the six gradients through the raw kernel ops of one build."""
    o_s, o_x, lse_s, lse_x = ops.bilateral_fwd(*inputs, scale, mask)
    d_inputs = ops.bilateral_bwd(*grads, *inputs, o_s, o_x, lse_s, lse_x, scale, mask)
    return [o_s, o_x, *d_inputs]


@pytest.mark.parametrize("case", BILATERAL_CASES, ids=bilateral_case_id)
def test_isa_build_bilateral_matches_reference_and_package_build(isa_ops, case):
    isa, ops = isa_ops
    assert ops.vector_isa() == isa
    B, H, M, N, D, dtype, layout, mask_kind = case
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, layout=layout, seed=11)
    mask = mask_for_case(B, N, mask_kind)
    grads = (transposed_grad((B, H, M, D), dtype, 12), transposed_grad((B, H, N, D), dtype, 13))
    scale = 0.8 * D**-0.5

    got = _bilateral(ops, inputs, grads, scale, mask)
    package = _bilateral(torch.ops.spatialformer_cpu, inputs, grads, scale, mask)
    (ref_outs, ref_grads), (exact_outs, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: bilateral_attention_reference(*u, scale, mask), t[:6], t[6:]),
        [*inputs, *grads],
    )
    ref, exact = [*ref_outs, *ref_grads], [*exact_outs, *exact_grads]
    for name, value, ref_value, exact_value, package_value in zip(BILATERAL_NAMES, got, ref, exact, package):
        assert value.dtype == dtype
        assert_close(value, ref_value, exact_value, dtype, f"{isa} {name} vs reference")
        # the two builds agree within the same rule, the package's build taken as the expected value
        assert_close(value, ref_value, package_value, dtype, f"{isa} {name} vs the {cpu_backend.vector_isa()} build")


@pytest.mark.parametrize("case", CROSS_CASES, ids=lambda c: f"Lq{c[2]}-Lk{c[3]}-D{c[4]}-{str(c[5])[6:]}")
def test_isa_build_cross_attention_matches_reference(isa_ops, case):
    isa, ops = isa_ops
    B, H, Lq, Lk, D, dtype = case
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, layout="bnhd", seed=14)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, layout="strided", seed=15)[4:]
    mask = mask_for_case(B, Lk, "mask")
    grad = transposed_grad((B, H, Lq, D), dtype, 16)
    o, lse = ops.cross_fwd(q, k, v, 0.3, mask)
    got = [o, *ops.cross_bwd(grad, q, k, v, o, lse, 0.3, mask)]
    (ref_out, ref_grads), (exact_out, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: cross_attention_reference(*u, 0.3, mask), t[:3], t[3:]), [q, k, v, grad]
    )
    for name, value, ref_value, exact_value in zip(("o", "dq", "dk", "dv"), got, [*ref_out, *ref_grads],
                                                   [*exact_out, *exact_grads]):
        assert_close(value, ref_value, exact_value, dtype, f"{isa} {name}")


@pytest.mark.parametrize("case", CROSS_ATTN_MASK_CASES,
                         ids=lambda c: f"Lq{c[2]}-Lk{c[3]}-D{c[4]}-{str(c[5])[6:]}-{c[6]}" + ("-keymask" if c[7] else ""))
def test_isa_build_cross_attention_with_attn_mask(isa_ops, case):
    isa, ops = isa_ops
    B, H, Lq, Lk, D, dtype, kind, with_key_mask = case
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, layout="bnhd", seed=17)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, layout="strided", seed=18)[4:]
    grad = transposed_grad((B, H, Lq, D), dtype, 19)
    attn_mask = make_attn_mask(B, Lq, Lk, kind)
    if kind == "random":
        attn_mask = attn_mask | (torch.arange(Lk) < 64)
    key_mask = mask_for_case(B, Lk, "mask") if with_key_mask else None

    def kernel(ops):
        o, lse = ops.cross_fwd(q, k, v, 0.3, key_mask, attn_mask)
        return [o, *ops.cross_bwd(grad, q, k, v, o, lse, 0.3, key_mask, attn_mask)]

    got, package = kernel(ops), kernel(torch.ops.spatialformer_cpu)
    (ref_out, ref_grads), (exact_out, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(
            lambda *u: cross_attention_reference(*u, 0.3, key_mask, attn_mask=attn_mask), t[:3], t[3:]
        ),
        [q, k, v, grad],
    )
    for name, value, ref_value, exact_value, package_value in zip(
        ("o", "dq", "dk", "dv"), got, [*ref_out, *ref_grads], [*exact_out, *exact_grads], package
    ):
        assert_close(value, ref_value, exact_value, dtype, f"{isa} {name} vs reference")
        assert_close(value, ref_value, package_value, dtype, f"{isa} {name} vs the {cpu_backend.vector_isa()} build")
