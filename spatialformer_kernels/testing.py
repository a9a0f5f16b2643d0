"""The one tolerance rule, shared by tests and benchmarks.

A kernel output is judged against how far PyTorch itself drifts at the same precision:

    max|actual - exact| <= 2 * max|reference_same_dtype - exact| + floor[dtype] * max(1, max|exact|)

`exact` is the reference computed in float64; `reference_same_dtype` is the reference run
in the inputs' own dtype. The floor covers the case where PyTorch happens to be exact.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance_check(actual: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """Return (ok, max abs err, bound, message) for one tensor under the tolerance rule; err and
    bound are None when shapes or non-finite patterns differ or nothing finite is compared."""
    if actual.shape != exact.shape:
        return False, None, None, f"shape {tuple(actual.shape)} != expected {tuple(exact.shape)}"
    exact = exact.double()
    finite = torch.isfinite(exact)
    if not torch.equal(torch.isfinite(actual.double()), finite):
        bad = (torch.isfinite(actual.double()) != finite).nonzero()[0].tolist()
        return False, None, None, f"non-finite pattern differs from the reference, first at index {bad}"
    if actual.numel() == 0 or not finite.any():
        return True, None, None, "empty or all non-finite, pattern matches"
    diff = torch.where(finite, (actual.double() - exact).abs(), torch.zeros_like(exact))
    drift = torch.where(finite, (same_dtype.double() - exact).abs(), torch.zeros_like(exact))
    scale = max(1.0, exact[finite].abs().max().item())
    err, ref_drift = diff.max().item(), drift.max().item()
    bound = 2 * ref_drift + FLOOR[dtype] * scale
    worst = list(torch.unravel_index(diff.argmax(), diff.shape))
    message = (
        f"max abs err {err:.3e} (at index {[int(i) for i in worst]}), reference drift in {dtype} "
        f"{ref_drift:.3e}, bound {bound:.3e}"
    )
    return err <= bound, err, bound, message


def tolerance_report(actual: torch.Tensor, same_dtype: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype):
    """Return (ok, message) for one tensor under the tolerance rule."""
    ok, _, _, message = tolerance_check(actual, same_dtype, exact, dtype)
    return ok, message


def assert_close(actual, same_dtype, exact, dtype: torch.dtype, name: str = "output") -> None:
    """Assert the tolerance rule for one tensor (or matching sequences of tensors)."""
    if isinstance(actual, (tuple, list)):
        for i, (a, s, e) in enumerate(zip(actual, same_dtype, exact, strict=True)):
            assert_close(a, s, e, dtype, f"{name}[{i}]")
        return
    ok, message = tolerance_report(actual, same_dtype, exact, dtype)
    assert ok, f"{name}: {message}"


def reference_pair(fn: Callable, inputs: Sequence, **kwargs):
    """Run `fn` on `inputs` as given and in float64; return (same_dtype, exact) outputs.

    Non-tensor and non-floating inputs (masks, scale) pass through unchanged.
    """

    def to_double(x):
        return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    same_dtype = fn(*inputs, **kwargs)
    exact = fn(*[to_double(x) for x in inputs], **kwargs)
    return same_dtype, exact


def make_bilateral_inputs(
    B: int,
    H: int,
    M: int,
    N: int,
    D: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    layout: str = "contiguous",
    requires_grad: bool = False,
    seed: int = 0,
):
    """Random (q_s, k_s, v_s, q_x, k_x, v_x) for tests and benchmarks.

    layout: "contiguous"; "bnhd" (each tensor a [B, L, H, D] buffer viewed as [B, H, L, D],
    the layout a fused projection produces); or "strided" (a slice of a wider buffer, so
    no dimension is packed).
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def one(length: int) -> torch.Tensor:
        if layout == "contiguous":
            t = torch.randn(B, H, length, D, generator=generator)
        elif layout == "bnhd":
            t = torch.randn(B, length, H, D, generator=generator).transpose(1, 2)
        elif layout == "strided":
            t = torch.randn(B, H + 1, length + 3, D + 5, generator=generator)[:, 1:, 2 : length + 2, 3 : D + 3]
        else:
            raise ValueError(f"unknown layout {layout!r}")
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad) if requires_grad else t

    return tuple(one(M) for _ in range(3)) + tuple(one(N) for _ in range(3))


def make_image_mask(B: int, N: int, empty_samples: Sequence[int] = (), device="cpu", seed: int = 0) -> torch.Tensor:
    """A bool [B, N] mask with a random number of real tokens per sample (at least one,
    except for the samples listed in `empty_samples`, which have none)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    lengths = torch.randint(1, N + 1, (B,), generator=generator)
    mask = torch.arange(N)[None, :] < lengths[:, None]
    for b in empty_samples:
        mask[b] = False
    return mask.to(device)


def case_id(B, H, M, N, D, dtype) -> str:
    """Readable test id, e.g. B2-H2-M64-N97-D40-bf16."""
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
    return f"B{B}-H{H}-M{M}-N{N}-D{D}-{short[dtype]}"


def bilateral_case_id(case) -> str:
    """Id of a (B, H, M, N, D, dtype, layout, mask_kind) test case, e.g. B2-H2-M49-N97-D40-fp16-bnhd-empty."""
    B, H, M, N, D, dtype, layout, mask_kind = case
    return f"{case_id(B, H, M, N, D, dtype)}-{layout}-{mask_kind or 'nomask'}"


def mask_for_case(B: int, N: int, kind, device="cpu", seed: int = 3):
    """The image mask of a test case: None, "mask" (random lengths) or "empty" (the last
    sample has no real token)."""
    if kind is None:
        return None
    return make_image_mask(B, N, empty_samples=(B - 1,) if kind == "empty" else (), device=device, seed=seed)


ATTN_MASK_KINDS = ("random", "query_broadcast", "key_broadcast", "transposed", "sliced", "empty_rows")


def make_attn_mask(B: int, Lq: int, Lk: int, kind: str | None, device="cpu", seed: int = 5) -> torch.Tensor | None:
    """A per-query mask bool [B, Lq, Lk] for `cross_attention(attn_mask=...)` tests, by kind:
    - "random": each pair kept with probability 0.4, and query 0 of every sample keeps no key;
    - "query_broadcast": one [B, 1, Lk] row expanded over the queries (stride 0 on Lq);
    - "key_broadcast": one [B, Lq, 1] column expanded over the keys (stride 0 on Lk): whole
      rows kept or dropped;
    - "transposed": a [B, Lk, Lq] buffer viewed as [B, Lq, Lk] (key stride 1, query stride Lk);
    - "sliced": every other key of a [B, Lq, 2 Lk] buffer (key stride 2);
    - "empty_rows": random, with every other query keeping no key at all;
    None gives None."""
    if kind is None:
        return None
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape, p=0.4):
        return torch.rand(*shape, generator=generator) < p

    if kind == "random":
        mask = draw(B, Lq, Lk)
        mask[:, 0] = False
    elif kind == "query_broadcast":
        mask = draw(B, 1, Lk, p=0.6).expand(B, Lq, Lk)
    elif kind == "key_broadcast":
        mask = draw(B, Lq, 1, p=0.7).expand(B, Lq, Lk)
    elif kind == "transposed":
        mask = draw(B, Lk, Lq).transpose(1, 2)
    elif kind == "sliced":
        mask = draw(B, Lq, 2 * Lk)[:, :, ::2]
    elif kind == "empty_rows":
        mask = draw(B, Lq, Lk, p=0.5)
        mask[:, ::2] = False
    else:
        raise ValueError(f"unknown attn_mask kind {kind!r}; kinds: {ATTN_MASK_KINDS}")
    return mask.to(device)


def transposed_grad(shape, dtype: torch.dtype, seed: int, device="cpu") -> torch.Tensor:
    """A non-contiguous grad output of `shape` [B, H, L, D]: a [B, L, H, D] buffer viewed as [B, H, L, D]."""
    B, H, L, D = shape
    grad = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)
    return grad.to(device=device, dtype=dtype)


def outputs_and_grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor]):
    """(outputs, gradients of every input) of fn(*inputs) for the given grad outputs (cast to the inputs' dtype).

    The inputs are detached copies, so the caller's tensors are untouched; fn may return a
    tensor or a tuple of tensors. An input the outputs do not reach gets a zero gradient.
    """
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    dtype = leaves[0].dtype
    grads = torch.autograd.grad(
        outputs, leaves, [g.to(dtype) for g in grad_outputs], allow_unused=True, materialize_grads=True
    )
    return tuple(o.detach() for o in outputs), grads


# Names of the results that `bilateral_results` and `cross_results` return, in order.
INPUT_NAMES = ("q_s", "k_s", "v_s", "q_x", "k_x", "v_x")
BILATERAL_RESULT_NAMES = ("o_s", "o_x") + tuple("d" + name for name in INPUT_NAMES)
CROSS_RESULT_NAMES = ("o", "dq", "dk", "dv")


def bilateral_results(inputs, grad_outputs, backend: str | None, scale=None, image_mask=None) -> list:
    """[o_s, o_x, dq_s, dk_s, dv_s, dq_x, dk_x, dv_x] of `bilateral_attention` on `backend`
    for grad outputs (do_s, do_x); backend=None runs the reference function itself (no op)."""
    from .ops.bilateral_attention import bilateral_attention
    from .reference import bilateral_attention_reference

    def run(*t):
        if backend is None:
            return bilateral_attention_reference(*t, scale if scale is not None else t[0].shape[-1] ** -0.5, image_mask)
        return bilateral_attention(*t, scale=scale, image_mask=image_mask, backend=backend)

    outputs, grads = outputs_and_grads(run, inputs, grad_outputs)
    return [*outputs, *grads]


def cross_results(q, k, v, grad_output, backend: str | None, scale=None, key_mask=None, attn_mask=None) -> list:
    """[o, dq, dk, dv] of `cross_attention` on `backend`; backend=None runs the reference."""
    from .ops.cross_attention import cross_attention
    from .reference import cross_attention_reference

    def run(*t):
        if backend is None:
            scale_ = scale if scale is not None else t[0].shape[-1] ** -0.5
            return cross_attention_reference(*t, scale_, key_mask, attn_mask=attn_mask)
        return cross_attention(*t, scale=scale, key_mask=key_mask, attn_mask=attn_mask, backend=backend)

    outputs, grads = outputs_and_grads(run, (q, k, v), (grad_output,))
    return [*outputs, *grads]


def reference_bilateral_results(inputs, grad_outputs, scale=None, image_mask=None):
    """(same_dtype, exact) reference results, each as `bilateral_results` returns them."""
    return reference_pair(lambda *t: bilateral_results(t[:6], t[6:], None, scale, image_mask), [*inputs, *grad_outputs])


def reference_cross_results(q, k, v, grad_output, scale=None, key_mask=None, attn_mask=None):
    """(same_dtype, exact) reference results, each as `cross_results` returns them."""
    return reference_pair(lambda *t: cross_results(*t, None, scale, key_mask, attn_mask), [q, k, v, grad_output])


def assert_results_close(got, same_dtype, exact, dtype: torch.dtype, names: Sequence[str], label: str = "") -> None:
    """The tolerance rule on every result, each failure message naming the result."""
    for name, g, s, e in zip(names, got, same_dtype, exact, strict=True):
        assert_close(g, s, e, dtype, f"{label} {name}".strip())


def large_logit_inputs(dtype: torch.dtype, scale: float, largest: float = 1e4, shape=(1, 2, 6, 40, 16),
                       device="cpu", seed: int = 0):
    """Bilateral inputs whose largest |scale * q.k| over both directions is `largest`, in `dtype`:
    softmax rows that are (nearly) one-hot, where a kernel's LSE and delta must be exact."""
    generator = torch.Generator().manual_seed(seed)
    b, h, m, n, d = shape
    q_s, k_s, v_s, q_x, k_x, v_x = [
        torch.randn(b, h, length, d, generator=generator, dtype=torch.float64) for length in (m, m, m, n, n, n)
    ]
    peak = scale * max((q_s @ k_x.mT).abs().max(), (q_x @ k_s.mT).abs().max())
    gain = (largest / peak) ** 0.5
    inputs = [q_s * gain, k_s * gain, v_s, q_x * gain, k_x * gain, v_x]
    return [t.to(device=device, dtype=dtype) for t in inputs]
