"""The C++ CPU kernel (csrc/, via ops/cpu_backend.py) against the reference under the one
tolerance rule: outputs, LSEs and all gradients; masks, strides, odd shapes, every dtype;
bitwise determinism across thread counts; kernel-level input checks; torch.compile; and the
package without a compiler."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import spatialformer_kernels as sk
from spatialformer_kernels.ops import cpu_backend
from spatialformer_kernels.reference import (
    bilateral_attention_reference,
    cross_attention_reference,
    cross_attention_reference_with_lse,
)
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

HAS_COMPILER = shutil.which(os.environ.get("CXX", "c++")) is not None
FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


def test_kernel_builds_where_a_compiler_exists():
    if not HAS_COMPILER:
        pytest.skip("no C++ compiler on this machine; test_no_compiler covers this case")
    assert cpu_backend.is_available(), cpu_backend._failure
    assert "cpu" in sk.available_backends()


needs_kernel = pytest.mark.skipif(
    not HAS_COMPILER or "cpu" not in sk.available_backends(), reason="the C++ CPU kernel is not built here"
)


# (B, H, M, N, D, dtype, layout, mask: None | "mask" | "empty" (the last sample has no token)).
# Together: every dtype; M = 1, 5, 49, 130; N = 1, 97, 1025, 1100 (several splits); D = 8, 40, 96.
BILATERAL_CASES = [
    (1, 1, 1, 1, 8, FP32, "contiguous", None),
    (2, 2, 49, 97, 40, FP32, "bnhd", "empty"),
    (1, 2, 130, 1025, 8, FP32, "strided", "mask"),
    (2, 1, 49, 1025, 96, BF16, "bnhd", "mask"),
    (2, 1, 130, 97, 40, FP16, "strided", "empty"),
    (1, 1, 1, 1025, 40, BF16, "contiguous", None),
    (2, 1, 49, 97, 8, FP64, "strided", "empty"),
    (3, 1, 130, 1, 96, FP32, "contiguous", "empty"),
    (8, 4, 5, 1100, 8, FP32, "bnhd", "empty"),  # B*H = 32: two forward items per row (576, 524 tokens)
]


@needs_kernel
@pytest.mark.parametrize("case", BILATERAL_CASES, ids=bilateral_case_id)
def test_bilateral_outputs_and_all_gradients_match_reference(case):
    B, H, M, N, D, dtype, layout, mask_kind = case
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, layout=layout, seed=1)
    mask = mask_for_case(B, N, mask_kind)
    scale = 0.9 * D**-0.5
    grads = (transposed_grad((B, H, M, D), dtype, 4), transposed_grad((B, H, N, D), dtype, 5))

    outs, d_inputs = outputs_and_grads(
        lambda *t: sk.bilateral_attention(*t, scale=scale, image_mask=mask, backend="cpu"), inputs, grads
    )
    (ref_outs, ref_grads), (exact_outs, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: bilateral_attention_reference(*u, scale, mask), t[:6], t[6:]),
        [*inputs, *grads],
    )
    assert [o.dtype for o in outs] == [dtype, dtype]
    assert_close(list(outs), list(ref_outs), list(exact_outs), dtype, "o_s, o_x")
    names = ("dq_s", "dk_s", "dv_s", "dq_x", "dk_x", "dv_x")
    for name, got, ref, exact in zip(names, d_inputs, ref_grads, exact_grads):
        assert_close(got, ref, exact, dtype, name)
    if mask_kind == "empty":
        # The sample without image tokens: o_s = 0 and direction s gives no gradient, so dq_s,
        # dk_x and dv_x (which only direction s reaches) are exactly 0; nothing is NaN.
        assert torch.equal(outs[0][B - 1], torch.zeros_like(outs[0][B - 1]))
        for grad in (d_inputs[0], d_inputs[4], d_inputs[5]):
            assert torch.equal(grad[B - 1], torch.zeros_like(grad[B - 1]))
        assert all(torch.isfinite(g).all() for g in d_inputs)


@needs_kernel
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_bilateral_lse_matches_reference(dtype):
    B, H, M, N, D = 2, 2, 49, 300, 40
    inputs = make_bilateral_inputs(B, H, M, N, D, dtype, layout="bnhd", seed=2)
    mask = make_image_mask(B, N, empty_samples=(1,), seed=5)
    q_s, k_s, v_s, q_x, k_x, v_x = inputs
    _, _, lse_s, lse_x = cpu_backend.bilateral_fwd(*inputs, 0.2, mask)
    assert lse_s.dtype == lse_x.dtype == torch.float64  # for every input dtype
    assert torch.equal(lse_s[1], torch.full_like(lse_s[1], float("-inf")))
    for got, (q, k, v, m) in ((lse_s, (q_s, k_x, v_x, mask)), (lse_x, (q_x, k_s, v_s, None))):
        ref, exact = reference_pair(
            lambda *t: cross_attention_reference_with_lse(*t, 0.2, m, upcast=True)[1], [q, k, v]
        )
        assert_close(got, ref, exact, FP32, "lse")


# (B, H, Lq, Lk, D, dtype, layout, mask). Few queries over many keys and many queries over few
# keys; the B*H = 1 cases force split keys (forward partials, dq partials) and split
# queries (dk/dv partials).
CROSS_CASES = [
    (2, 2, 64, 1025, 32, FP32, "contiguous", "empty"),
    (2, 2, 1025, 49, 40, BF16, "bnhd", "mask"),
    (1, 1, 5, 3000, 8, FP32, "strided", "mask"),
    (1, 1, 700, 30, 96, FP16, "strided", None),
    (1, 1, 300, 700, 40, FP64, "bnhd", "empty"),
]


@needs_kernel
@pytest.mark.parametrize(
    "case", CROSS_CASES, ids=lambda c: f"{case_id(c[0], c[1], c[2], c[3], c[4], c[5])}-{c[6]}-{c[7] or 'nomask'}"
)
def test_cross_outputs_and_gradients_match_reference(case):
    B, H, Lq, Lk, D, dtype, layout, mask_kind = case
    q = make_bilateral_inputs(B, H, 1, Lq, D, dtype, layout=layout, seed=6)[3]
    k, v = make_bilateral_inputs(B, H, 1, Lk, D, dtype, layout=layout, seed=7)[4:]
    mask = mask_for_case(B, Lk, mask_kind)
    grads = (transposed_grad((B, H, Lq, D), dtype, 8),)
    out, d_qkv = outputs_and_grads(
        lambda *t: sk.cross_attention(*t, scale=0.3, key_mask=mask, backend="cpu"), (q, k, v), grads
    )
    (ref_out, ref_grads), (exact_out, exact_grads) = reference_pair(
        lambda *t: outputs_and_grads(lambda *u: cross_attention_reference(*u, 0.3, mask), t[:3], t[3:]), [q, k, v, *grads]
    )
    assert_close(out[0], ref_out[0], exact_out[0], dtype, "o")
    for name, got, ref, exact in zip(("dq", "dk", "dv"), d_qkv, ref_grads, exact_grads):
        assert_close(got, ref, exact, dtype, name)
    _, lse = cpu_backend.cross_fwd(q, k, v, 0.3, mask)
    ref_lse, exact_lse = reference_pair(
        lambda *t: cross_attention_reference_with_lse(*t, 0.3, mask, upcast=True)[1], [q, k, v]
    )
    assert_close(lse, ref_lse, exact_lse, FP32, "lse")
    assert lse.dtype == torch.float64  # for every input dtype


def _run_everything(inputs, mask, grads, threads):
    torch.set_num_threads(threads)
    outs, d_bilateral = outputs_and_grads(
        lambda *t: sk.bilateral_attention(*t, image_mask=mask, backend="cpu"), inputs, grads
    )
    few, d_few = outputs_and_grads(lambda *t: sk.cross_attention(*t, backend="cpu"), (inputs[0], *inputs[4:]), grads[:1])
    many, d_many = outputs_and_grads(
        lambda *t: sk.cross_attention(*t, backend="cpu"), (inputs[3], *inputs[1:3]), grads[1:]
    )
    return [*outs, *d_bilateral, *few, *d_few, *many, *d_many]


@needs_kernel
@pytest.mark.parametrize(
    "B, H, M, N, D",
    [
        (1, 2, 64, 1500, 32),  # 6 splits of N; cross attention splits both ways
        (8, 4, 5, 1100, 8),  # forward items of 576 and 524 tokens (B*H = 32), backward items of 256
    ],
)
def test_bitwise_deterministic_across_thread_counts_and_runs(B, H, M, N, D):
    inputs = make_bilateral_inputs(B, H, M, N, D, seed=9)
    mask = make_image_mask(B, N, seed=9)
    grads = (transposed_grad((B, H, M, D), FP32, 10), transposed_grad((B, H, N, D), FP32, 11))
    threads = torch.get_num_threads()
    try:
        first = _run_everything(inputs, mask, grads, 1)
        for count in (2, 1, 3):
            again = _run_everything(inputs, mask, grads, count)
            for a, b in zip(first, again):
                assert torch.equal(a, b), f"results differ with {count} threads"
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_torch_compile_fullgraph_forward_and_backward():
    inputs = make_bilateral_inputs(2, 2, 16, 70, 16, seed=12)
    mask = make_image_mask(2, 70, seed=12)

    def loss(*t):
        o_s, o_x = sk.bilateral_attention(*t, image_mask=mask, backend="cpu")
        return (o_s * 2).sum() + (o_x**2).sum()

    eager_leaves = [t.clone().requires_grad_() for t in inputs]
    compiled_leaves = [t.clone().requires_grad_() for t in inputs]
    torch._dynamo.reset()
    eager = loss(*eager_leaves)
    eager.backward()
    compiled = torch.compile(loss, fullgraph=True)(*compiled_leaves)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


# -- kernel-level checks: what reaches the backend directly (public validation bypassed) --
def _bilateral_args(**overrides):
    q_s, k_s, v_s, q_x, k_x, v_x = make_bilateral_inputs(2, 2, 5, 7, 8)
    args = dict(q_s=q_s, k_s=k_s, v_s=v_s, q_x=q_x, k_x=k_x, v_x=v_x, scale=0.5, image_mask=None)
    args.update(overrides)
    return args


BAD_FWD = [
    (dict(q_s=torch.randn(2, 5, 8)), ["q_s", "rank 4"]),
    (dict(k_x=torch.randn(2, 2, 8, 8)), ["k_x", "[2, 2, 8, 8]", "[2, 2, 7, 8]"]),
    (dict(v_s=torch.randn(2, 2, 5, 8, dtype=torch.float64)), ["v_s", "Double", "Float"]),
    (dict(q_s=torch.randn(2, 2, 5, 8).int(), k_s=torch.randn(2, 2, 5, 8).int(), v_s=torch.randn(2, 2, 5, 8).int()),
     ["q_s", "unsupported dtype"]),
    (dict(q_x=torch.empty(2, 2, 7, 8, device="meta")), ["q_x", "CPU tensor", "meta"]),
    (dict(image_mask=torch.ones(2, 7)), ["image_mask", "bool"]),
    (dict(image_mask=torch.ones(2, 8, dtype=torch.bool)), ["image_mask", "[2, 7]"]),
    (dict(scale=float("inf")), ["scale", "finite"]),
    (dict(q_s=torch.randn(2, 2, 5, 0), k_s=torch.randn(2, 2, 5, 0), v_s=torch.randn(2, 2, 5, 0),
          q_x=torch.randn(2, 2, 7, 0), k_x=torch.randn(2, 2, 7, 0), v_x=torch.randn(2, 2, 7, 0)), ["head dim D"]),
]


@needs_kernel
@pytest.mark.parametrize("overrides,fragments", BAD_FWD, ids=lambda x: None)
def test_kernel_rejects_bad_forward_inputs(overrides, fragments):
    with pytest.raises(RuntimeError) as raised:
        cpu_backend.bilateral_fwd(**_bilateral_args(**overrides))
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@needs_kernel
@pytest.mark.parametrize(
    "which,bad,fragments",
    [
        ("lse_s", lambda t: t.float(), ["lse_s", "float64"]),
        ("lse_x", lambda t: t[..., :-1], ["lse_x", "[2, 2, 7]"]),
        ("do_x", lambda t: t[:, :, :-1], ["do_x", "[2, 2, 7, 8]"]),
        ("o_s", lambda t: t.bfloat16(), ["o_s", "BFloat16"]),
    ],
    ids=["lse-dtype", "lse-shape", "grad-shape", "saved-dtype"],
)
def test_kernel_rejects_bad_backward_inputs(which, bad, fragments):
    args = _bilateral_args()
    o_s, o_x, lse_s, lse_x = cpu_backend.bilateral_fwd(**args)
    saved = dict(do_s=torch.randn_like(o_s), do_x=torch.randn_like(o_x), o_s=o_s, o_x=o_x, lse_s=lse_s, lse_x=lse_x)
    saved[which] = bad(saved[which])
    with pytest.raises(RuntimeError) as raised:
        cpu_backend.bilateral_bwd(
            saved["do_s"], saved["do_x"], *[args[n] for n in ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x")],
            saved["o_s"], saved["o_x"], saved["lse_s"], saved["lse_x"], 0.5, None,
        )
    for fragment in fragments:
        assert fragment in str(raised.value), f"{fragment!r} not in {raised.value}"


@needs_kernel
def test_kernel_rejects_bad_cross_inputs():
    q, k, v = make_bilateral_inputs(2, 2, 3, 9, 8)[3:]
    with pytest.raises(RuntimeError, match=r"k must have shape \[B, H, Lk, D\]"):
        cpu_backend.cross_fwd(q, k[:, :1], v[:, :1], 0.5, None)
    with pytest.raises(RuntimeError, match=r"v must have shape"):
        cpu_backend.cross_fwd(q, k, v[:, :, :-1], 0.5, None)
    with pytest.raises(RuntimeError, match=r"key_mask must have shape \[2, 9\]"):
        cpu_backend.cross_fwd(q, k, v, 0.5, torch.ones(2, 8, dtype=torch.bool))
    o, lse = cpu_backend.cross_fwd(q, k, v, 0.5, None)
    with pytest.raises(RuntimeError, match=r"lse must have shape"):
        cpu_backend.cross_bwd(torch.randn_like(o), q, k, v, o, lse[:, :1], 0.5, None)


def test_no_compiler_still_imports_warns_once_and_drops_cpu(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch
            import spatialformer_kernels as sk
            built_at_import = os.listdir(os.environ["SPATIALFORMER_KERNELS_CACHE"])
            first = sk.available_backends()
            second = sk.available_backends()
            inputs = [torch.randn(1, 1, 3, 8) for _ in range(3)] + [torch.randn(1, 1, 5, 8) for _ in range(3)]
            o_s, o_x = sk.bilateral_attention(*inputs)  # auto: the reference on CPU
            try:
                sk.bilateral_attention(*inputs, backend="cpu")
                explicit = "no error"
            except RuntimeError as error:
                explicit = str(error)
        ours = [str(w.message) for w in caught if "C++" in str(w.message)]
        print(json.dumps(dict(first=first, second=second, warnings=ours, built_at_import=built_at_import,
                              finite=bool(torch.isfinite(o_s).all() and torch.isfinite(o_x).all()),
                              explicit=explicit)))
        """
    )
    cache = tmp_path / "cache"
    cache.mkdir()
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), SPATIALFORMER_KERNELS_CACHE=str(cache))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["built_at_import"] == []
    assert "cpu" not in result["first"] and result["first"] == result["second"]
    assert len(result["warnings"]) == 1, result["warnings"]
    assert "could not be built" in result["warnings"][0]
    assert result["finite"]
    assert "'cpu' is not available" in result["explicit"]
