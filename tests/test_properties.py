"""Property-based tests (hypothesis): every kernel backend agrees with the reference, under
the one tolerance rule, on outputs and on the gradients of all inputs, for random shapes,
dtypes, layouts, masks (cross attention's per-query attn_mask in every stride pattern too),
scales and grad-output layouts.

Layouts are built as views of a leaf "base" tensor, so the kernels see the strides and the
gradients flow back through the view (an expanded input's gradient is summed, a sliced
one's lands in its slots). The same view-building function runs the backend and the
reference (in the input dtype and in float64), so both see identical inputs.

Profiles: tests/conftest.py ("ci" by default; SPATIALFORMER_HYPOTHESIS_PROFILE=thorough for
many examples). Sizes are kept small for Triton, which runs in its interpreter on CPU.
"""
from __future__ import annotations

import dataclasses

import torch
from hypothesis import given
from hypothesis import strategies as st

import spatialformer_kernels as sk
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference
from spatialformer_kernels.testing import (
    ATTN_MASK_KINDS,
    BILATERAL_RESULT_NAMES,
    CROSS_RESULT_NAMES,
    assert_close,
    case_id,
    make_attn_mask,
    reference_pair,
)

FP16, BF16, FP32, FP64 = torch.float16, torch.bfloat16, torch.float32, torch.float64


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Per backend: (max B, max H, max M, max N, head dims, dtypes). Triton runs in its
# interpreter here, so its shapes stay tiny (N up to 300 still reaches two splits).
LIMITS = {
    "cpu": (3, 3, 140, 600, (8, 12, 16, 24, 32, 40, 59, 64, 96, 128, 256), (FP32, BF16, FP16, FP64)),
    "triton": (2, 2, 70, 300, (8, 12, 16, 24, 32, 40, 59, 64, 96), (FP32, BF16, FP16)),
}

# Input layouts, each a view of a base tensor: see `_view`. No input is broadcast along its
# tokens here (tests/test_edge_cases.py checks that layout's forward): with one key, one value
# or one query shared by every token, softmax invariances make some exact gradients identically
# 0 (shared keys: dk; shared values: dq and dk; a single key: dq), so the comparison becomes
# pure fp32 rounding, summed over the broadcast copies, against the rule's absolute floor; the
# thorough profile found the C++ kernel 1.4x over it there (e.g. k_x and v_x shared over
# N = 535: 3.4e-5 vs 2.5e-5), at ~3 ulp of the terms' natural size.
LAYOUTS = ("contiguous", "bnhd", "d_major", "gaps", "expand_b", "hbld")
# Grad-output layouts: "expand" is what `.sum().backward()` produces (all strides 0);
# "unused" means the output does not take part in the loss (its grad is None).
GRAD_LAYOUTS = ("contiguous", "bnhd", "gaps", "expand", "unused")
MASKS = (None, "random", "empty_sample", "all_true", "transposed", "expand_b")
# Small sizes and tile/split-boundary neighbours, where indexing bugs live.
EDGE_M = (1, 15, 16, 17, 31, 32, 33, 63, 64, 65)
EDGE_N = (1, 2, 31, 32, 33, 127, 128, 129, 255, 256, 257)


def _base_shape(layout: str, B: int, H: int, L: int, D: int) -> tuple[int, ...]:
    return {
        "contiguous": (B, H, L, D),
        "bnhd": (B, L, H, D),
        "d_major": (B, H, D, L),
        "gaps": (B, H, 2 * L + 1, D + 3),
        "expand_b": (1, H, L, D),
        "hbld": (H, B, L, D),
        "expand": (1, 1, 1, 1),
        "unused": (1, 1, 1, 1),
    }[layout]


def _view(base: torch.Tensor, layout: str, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """A [B, H, L, D] view of `base` (no copy) with the strides the layout names."""
    B, H, L, D = shape
    if layout == "contiguous":
        return base
    if layout == "bnhd":  # a fused projection's [B, L, H, D] output
        return base.transpose(1, 2)
    if layout == "d_major":  # transposed: stride along D is L, not 1
        return base.transpose(2, 3)
    if layout == "gaps":  # every other token, a window of D: gaps in every dimension but B, H
        return base[:, :, 1::2, 2 : D + 2]
    if layout in ("expand_b", "expand"):  # stride 0 along B, or along everything
        return base.expand(B, H, L, D)
    if layout == "hbld":
        return base.transpose(0, 1)
    raise ValueError(layout)


def _mask(kind, B, N, generator):
    if kind is None:
        return None
    if kind == "all_true":
        return torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    if kind == "expand_b":  # one row shared by the batch: stride 0 along B
        return (torch.rand(1, N, generator=generator) < 0.6).to(DEVICE).expand(B, N)
    mask = torch.rand(B, N, generator=generator) < 0.6
    mask[:, 0] |= kind != "empty_sample"  # a sample keeps at least one token ...
    if kind == "empty_sample":
        mask[B - 1] = False  # ... except the last one here, which has none
    if kind == "transposed":
        return mask.t().contiguous().t().to(DEVICE)  # strides (1, B)
    return mask.to(DEVICE)


@dataclasses.dataclass
class Case:
    B: int
    H: int
    M: int
    N: int
    D: int
    dtype: torch.dtype
    layouts: tuple[str, ...]  # one per input
    grad_layouts: tuple[str, ...]  # one per output
    mask: str | None
    scale: float | None  # a factor of the default D**-0.5 (negative flips every logit); None: default
    seed: int

    def __repr__(self):  # what hypothesis prints for a failing example
        return (f"{case_id(self.B, self.H, self.M, self.N, self.D, self.dtype)} layouts={self.layouts} "
                f"grads={self.grad_layouts} mask={self.mask} scale={self.scale} seed={self.seed}")


@st.composite
def cases(draw, backend: str, n_inputs: int, n_outputs: int):
    max_b, max_h, max_m, max_n, head_dims, dtypes = LIMITS[backend]
    grad_layouts = tuple(draw(st.sampled_from(GRAD_LAYOUTS)) for _ in range(n_outputs))
    if all(g == "unused" for g in grad_layouts):
        grad_layouts = ("expand",) + grad_layouts[1:]
    return Case(
        B=draw(st.integers(1, max_b)),
        H=draw(st.integers(1, max_h)),
        M=draw(st.one_of(st.integers(1, max_m), st.sampled_from([m for m in EDGE_M if m <= max_m]))),
        N=draw(st.one_of(st.integers(1, max_n), st.sampled_from([n for n in EDGE_N if n <= max_n]))),
        D=draw(st.sampled_from(head_dims)),
        dtype=draw(st.sampled_from(dtypes)),
        layouts=tuple(draw(st.sampled_from(LAYOUTS)) for _ in range(n_inputs)),
        grad_layouts=grad_layouts,
        mask=draw(st.sampled_from(MASKS)),
        scale=draw(st.one_of(st.none(), st.floats(-2.0, 2.0).filter(lambda f: abs(f) >= 0.05))),
        seed=draw(st.integers(0, 2**16)),
    )


def _bases(shapes_and_layouts, generator):
    return [torch.randn(_base_shape(layout, *shape), generator=generator) for shape, layout in shapes_and_layouts]


def _run_with_grads(fn, input_layouts, input_shapes, grad_layouts, output_shapes):
    """A function of (input bases..., grad bases...) -> [outputs..., gradients of the input bases...]."""
    n = len(input_layouts)

    def run(*tensors):
        leaves = [t.detach().requires_grad_() for t in tensors[:n]]
        views = [_view(b, lay, s) for b, lay, s in zip(leaves, input_layouts, input_shapes)]
        outs = fn(*views)
        outs = outs if isinstance(outs, tuple) else (outs,)
        used = [(o, _view(g, lay, s)) for o, g, lay, s in zip(outs, tensors[n:], grad_layouts, output_shapes)
                if lay != "unused"]
        grads = torch.autograd.grad([o for o, _ in used], leaves, [g for _, g in used],
                                    allow_unused=True, materialize_grads=True)
        return [o.detach() for o in outs] + list(grads)

    return run


def _check(case: Case, backend: str, op, reference, input_shapes, output_shapes, names):
    generator = torch.Generator().manual_seed(case.seed)
    bases = _bases(zip(input_shapes, case.layouts), generator)
    grad_bases = _bases(zip(output_shapes, case.grad_layouts), generator)
    bases = [t.to(device=DEVICE, dtype=case.dtype) for t in bases + grad_bases]
    mask = _mask(case.mask, case.B, input_shapes[-1][2], generator)
    kwargs = dict(scale=None if case.scale is None else case.scale * case.D**-0.5)
    run = _run_with_grads(lambda *t: op(*t, mask=mask, backend=backend, **kwargs), case.layouts, input_shapes,
                          case.grad_layouts, output_shapes)
    got = run(*bases)
    scale = case.D**-0.5 * (1.0 if case.scale is None else case.scale)
    same, exact = reference_pair(
        _run_with_grads(lambda *t: reference(*t, scale, mask), case.layouts, input_shapes, case.grad_layouts,
                        output_shapes),
        bases,
    )
    for name, a, s, e in zip(names, got, same, exact, strict=True):
        assert a.dtype == case.dtype, f"{name}: dtype {a.dtype}"
        assert_close(a, s, e, case.dtype, f"{name} ({case!r})")


def _bilateral(*t, mask, backend, scale):
    return sk.bilateral_attention(*t, scale=scale, image_mask=mask, backend=backend)


def _cross(*t, mask, backend, scale):
    return sk.cross_attention(*t, scale=scale, key_mask=mask, backend=backend)


@given(data=st.data())
def test_bilateral_matches_reference(kernel_backend, data):
    backend = kernel_backend
    case = data.draw(cases(backend, 6, 2), label="case")
    spatial, image = (case.B, case.H, case.M, case.D), (case.B, case.H, case.N, case.D)
    _check(case, backend, _bilateral, bilateral_attention_reference, [spatial] * 3 + [image] * 3,
           [spatial, image], BILATERAL_RESULT_NAMES)


@given(data=st.data())
def test_cross_attention_matches_reference(kernel_backend, data):
    """Both regimes: M plays the query count and N the key count, or the other way round."""
    backend = kernel_backend
    case = data.draw(cases(backend, 3, 1), label="case")
    queries_short = data.draw(st.booleans(), label="few queries over many keys")
    lq, lk = (case.M, case.N) if queries_short else (case.N, case.M)
    q_shape, kv_shape = (case.B, case.H, lq, case.D), (case.B, case.H, lk, case.D)
    _check(case, backend, _cross, cross_attention_reference, [q_shape, kv_shape, kv_shape], [q_shape],
           CROSS_RESULT_NAMES)


@given(data=st.data())
def test_cross_attention_with_attn_mask_matches_reference(kernel_backend, data):
    """A per-query mask [B, Lq, Lk] of every stride pattern (testing.make_attn_mask, and one
    shared by the batch: stride 0 along B), with or without a key mask, in both regimes."""
    backend = kernel_backend
    case = data.draw(cases(backend, 3, 1), label="case")
    queries_short = data.draw(st.booleans(), label="few queries over many keys")
    kind = data.draw(st.sampled_from(ATTN_MASK_KINDS + ("expand_b",)), label="attn_mask")
    lq, lk = (case.M, case.N) if queries_short else (case.N, case.M)
    if kind == "expand_b":
        attn_mask = make_attn_mask(1, lq, lk, "random", device=DEVICE, seed=case.seed).expand(case.B, lq, lk)
    else:
        attn_mask = make_attn_mask(case.B, lq, lk, kind, device=DEVICE, seed=case.seed)

    def op(*t, mask, backend, scale):
        return sk.cross_attention(*t, scale=scale, key_mask=mask, attn_mask=attn_mask, backend=backend)

    def reference(*t):
        return cross_attention_reference(*t[:-2], t[-2], t[-1], attn_mask=attn_mask)

    q_shape, kv_shape = (case.B, case.H, lq, case.D), (case.B, case.H, lk, case.D)
    _check(case, backend, op, reference, [q_shape, kv_shape, kv_shape], [q_shape], CROSS_RESULT_NAMES)
