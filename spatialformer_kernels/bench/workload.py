"""What the benchmark runs: shapes, the work model, providers, cases and parity.

Part of the benchmark harness `spatialformer_kernels.bench` (whose docstring gives the
shapes, providers and the work model that `bytes_moved` and `flops` follow).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..ops.bilateral_attention import bilateral_attention
from ..reference import bilateral_attention_reference
from ..testing import (
    BILATERAL_RESULT_NAMES,
    make_bilateral_inputs,
    outputs_and_grads,
    reference_bilateral_results,
    reference_pair,
    tolerance_check,
)

# ----------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------

CPU_SCALE = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    B: int
    H: int
    M: int
    N: int
    D: int
    scale: int = 1  # B and N divided by this from the docs/design.md shape of the same name

    def scaled(self, factor: int) -> "Shape":
        if factor == 1:
            return self
        return dataclasses.replace(self, B=max(1, self.B // factor), N=max(1, self.N // factor), scale=factor)

    @property
    def label(self) -> str:
        return self.name if self.scale == 1 else f"{self.name}/{self.scale}"

    @property
    def dims(self) -> str:
        return f"B{self.B} H{self.H} M{self.M} N{self.N} D{self.D}"


SHAPES = (
    Shape("cls224-stage1", 64, 2, 64, 3136, 32),
    Shape("cls224-stage2", 64, 4, 64, 784, 32),
    Shape("seg512-stage1", 8, 2, 64, 16384, 32),
    Shape("det800x1344-stage1", 2, 2, 64, 67200, 32),
)
SHAPE_NAMES = tuple(s.name for s in SHAPES)


def default_scale(device: torch.device) -> int:
    return 1 if device.type == "cuda" else CPU_SCALE


def shapes_for(device: torch.device, names: Optional[Iterable[str]] = None, scale: Optional[int] = None) -> list[Shape]:
    """docs/design.md section 4 shapes by name, scaled for the device (CPU: B and N divided by CPU_SCALE)."""
    wanted = list(names) if names else list(SHAPE_NAMES)
    unknown = [n for n in wanted if n not in SHAPE_NAMES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPE_NAMES)}")
    factor = default_scale(device) if scale is None else scale
    return [s.scaled(factor) for s in SHAPES if s.name in wanted]


INTERPRETER_MAX_N = 256


def interpreter_shape(shape: Shape) -> Shape:
    """The shape Triton's interpreter checks for `shape` in seconds: B 1, N at most
    INTERPRETER_MAX_N, H, M and D kept (so the same per-head tiles, masked tail included)."""
    return Shape("interpreter", 1, shape.H, shape.M, min(shape.N, INTERPRETER_MAX_N), shape.D)


def scaling_note(shapes: Sequence[Shape]) -> str:
    """One line saying whether and how the shapes are scaled down from docs/design.md section 4."""
    factors = sorted({s.scale for s in shapes})
    if factors == [1]:
        return "full docs/design.md section 4 shapes"
    return (
        f"shapes scaled down for this device: B and N divided by {'/'.join(map(str, factors))} "
        "(B at least 1), H, M, D unchanged; a scaled shape is named <shape>/<factor>"
    )


# ----------------------------------------------------------------------------------------
# Work model
# ----------------------------------------------------------------------------------------

PASSES = ("fwd", "bwd", "fwd_bwd")
PASS_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def bytes_moved(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Minimum memory traffic of the op (see spatialformer_kernels.bench's docstring); the same for every provider."""
    elements = shape.B * shape.H * (shape.M + shape.N)
    item = torch.empty((), dtype=dtype).element_size()
    fwd = 4 * elements * shape.D * item
    bwd = 8 * elements * shape.D * item + 4 * elements
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


def flops(shape: Shape, pass_: str) -> int:
    """Matmul FLOPs of the op, the convention of the op's registered flop formulas."""
    unit = shape.B * shape.H * shape.M * shape.N * shape.D
    return {"fwd": 8 * unit, "bwd": 20 * unit, "fwd_bwd": 28 * unit}[pass_]


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def pct_of_roofline(achieved_gbps: float, peak_gbps: Optional[float]) -> Optional[float]:
    return None if not peak_gbps else 100.0 * achieved_gbps / peak_gbps


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------

AttentionFn = Callable[..., tuple]  # (q_s, k_s, v_s, q_x, k_x, v_x, scale) -> (o_s, o_x)


@dataclasses.dataclass
class Provider:
    name: str
    kind: str  # "ours" or "baseline"
    family: str  # "ours", "reference", "sdpa", "compile", "flex", "xformers", "flash-attn"
    build: Callable[[], AttentionFn]  # called once, lazily (imports, torch.compile)
    skip: Optional[str] = None  # why this provider does not run here
    parity_only: Optional[str] = None  # why it is parity-checked but not timed
    parity_shape: Optional[Callable[[Shape], Shape]] = None  # the shape checked for a row's shape (None: that shape)
    dtypes: Optional[tuple] = None  # None = all
    forward_only: bool = False
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @functools.cached_property
    def fn(self) -> AttentionFn:
        return self.build()


def _ours(backend: str) -> AttentionFn:
    def run(q_s, k_s, v_s, q_x, k_x, v_x, scale):
        return bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, scale=scale, backend=backend)

    return run


def _sdpa(q_s, k_s, v_s, q_x, k_x, v_x, scale):
    o_s = F.scaled_dot_product_attention(q_s, k_x, v_x, scale=scale)
    o_x = F.scaled_dot_product_attention(q_x, k_s, v_s, scale=scale)
    return o_s, o_x


def _sdpa_context(backend) -> Callable[[], contextlib.AbstractContextManager]:
    def context():
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([backend])

    return context


@contextlib.contextmanager
def _quiet_interpreter():
    # Triton's interpreter runs the kernels in numpy, which warns where a GPU computes
    # silently (-inf - -inf in a fully masked tile, discarded by the kernel).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def _compiled_reference() -> AttentionFn:
    return torch.compile(bilateral_attention_reference)


def _no_donated_buffers() -> contextlib.AbstractContextManager:
    # A compiled backward that donates its buffers cannot run twice on one graph; the
    # backward-only pass replays one graph (retain_graph=True), so compile without donation.
    import torch._functorch.config

    return torch._functorch.config.patch(donated_buffer=False)


def _flex() -> AttentionFn:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(q_s, k_s, v_s, q_x, k_x, v_x, scale):
        return compiled(q_s, k_x, v_x, scale=scale), compiled(q_x, k_s, v_s, scale=scale)

    return run


def _xformers() -> AttentionFn:
    import xformers.ops as xops

    def one(q, k, v, scale):  # xformers takes [B, L, H, D]
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale).transpose(1, 2)

    def run(q_s, k_s, v_s, q_x, k_x, v_x, scale):
        return one(q_s, k_x, v_x, scale), one(q_x, k_s, v_s, scale)

    return run


def _flash_attn() -> AttentionFn:
    from flash_attn import flash_attn_func

    def one(q, k, v, scale):  # flash-attn takes [B, L, H, D]
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale).transpose(1, 2)

    def run(q_s, k_s, v_s, q_x, k_x, v_x, scale):
        return one(q_s, k_x, v_x, scale), one(q_x, k_s, v_s, scale)

    return run


def _installed(module: str) -> Optional[str]:
    try:
        __import__(module)
    except Exception as error:  # an optional baseline must never break the harness
        return f"{module} is not installed ({type(error).__name__}: {error})"
    return None


def providers_for(device: torch.device, *, timing: bool = True) -> list[Provider]:
    """Every provider, those that cannot run on this device carrying the reason.

    Triton without CUDA runs only in its interpreter (TRITON_INTERPRET=1), far too slow to
    time: it is parity-checked on `interpreter_shape`s and not timed; timing=False (parity
    tests on their own small shapes) checks it on the shapes given.
    """
    out = []
    for backend in dispatch.available_backends():
        if backend == "reference":
            continue
        module = dispatch.kernels(backend)
        provider = Provider(f"ours-{backend}", "ours", "ours", functools.partial(_ours, backend), dtypes=tuple(module.DTYPES))
        if backend == "triton" and device.type != "cuda" and not dispatch.triton_interpreter_enabled():
            provider.skip = (
                "no CUDA device, and Triton's interpreter is off: not checked, not timed "
                "(spatialformer-bench checks it in the interpreter unless TRITON_INTERPRET is set to 0)"
            )
        elif backend == "triton" and device.type != "cuda" and timing:
            provider.parity_only = (
                "Triton without CUDA runs only in its interpreter, far too slow to time; its parity is checked "
                f"on B 1 and N at most {INTERPRETER_MAX_N} (the row's H, M, D)"
            )
            provider.parity_shape = interpreter_shape
            provider.context = _quiet_interpreter
        elif backend not in dispatch.runnable_backends(device):
            provider.skip = f"backend {backend!r} cannot run on {device.type} tensors here"
        out.append(provider)
    out.append(Provider("reference", "baseline", "reference", lambda: _ours("reference")))
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for label, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):
            out.append(Provider(f"sdpa-{label}", "baseline", "sdpa", lambda: _sdpa, context=_sdpa_context(backend)))
    else:
        out.append(Provider("sdpa", "baseline", "sdpa", lambda: _sdpa))
    out.append(Provider("compile-reference", "baseline", "compile", _compiled_reference, context=_no_donated_buffers))
    flex = Provider("flex", "baseline", "flex", _flex)
    if device.type == "cpu":
        flex.forward_only = True  # FlexAttention has no CPU backward
    out.append(flex)
    xformers = Provider("xformers", "baseline", "xformers", _xformers, skip=_installed("xformers"))
    flash = Provider("flash-attn", "baseline", "flash-attn", _flash_attn, skip=_installed("flash_attn"))
    flash.dtypes = (torch.float16, torch.bfloat16)
    for p in (xformers, flash):
        if p.skip is None and device.type != "cuda":
            p.skip = f"{p.name} runs on CUDA only"
        out.append(p)
    return out


# Providers left out of a default CPU run: they compile per shape, minutes on 2 cores.
CPU_OPTIONAL = ("flex",)


def default_provider_names(device: torch.device, quick: bool = False) -> list[str]:
    names = [p.name for p in providers_for(device)]
    if device.type == "cpu":
        names = [n for n in names if n not in CPU_OPTIONAL]
    if quick:
        names = [n for n in names if n not in ("compile-reference", "flex")]
    return names


def skip_reason(provider: Provider, dtype: torch.dtype, pass_: str) -> Optional[str]:
    if provider.skip:
        return provider.skip
    if provider.dtypes is not None and dtype not in provider.dtypes:
        return f"{provider.name} does not support {DTYPE_NAMES.get(dtype, dtype)}"
    if provider.forward_only and pass_ != "fwd":
        return f"{provider.name} has no backward on this device"
    return None


# ----------------------------------------------------------------------------------------
# Cases and parity
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    shape: Shape
    dtype: torch.dtype
    inputs: tuple  # (q_s, k_s, v_s, q_x, k_x, v_x), no grad
    grad_outputs: tuple  # (do_s, do_x)
    scale: float

    @classmethod
    def make(cls, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> "Case":
        inputs = make_bilateral_inputs(shape.B, shape.H, shape.M, shape.N, shape.D, dtype=dtype, device=device, seed=seed)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        grads = tuple(
            torch.randn(shape.B, shape.H, length, shape.D, generator=generator).to(device=device, dtype=dtype)
            for length in (shape.M, shape.N)
        )
        return cls(shape, dtype, inputs, grads, shape.D**-0.5)

    def leaves(self) -> list[torch.Tensor]:
        return [t.detach().clone().requires_grad_(True) for t in self.inputs]

    @functools.cached_property
    def reference_forward(self):
        return reference_pair(bilateral_attention_reference, self.inputs, scale=self.scale)

    @functools.cached_property
    def reference_gradients(self):
        return reference_bilateral_results(self.inputs, self.grad_outputs, self.scale)


def _outputs_and_grads(fn: AttentionFn, inputs, grad_outputs, scale) -> tuple:
    with torch.enable_grad():
        outputs, grads = outputs_and_grads(lambda *t: fn(*t, scale), inputs, grad_outputs)
    return (*outputs, *grads)


@dataclasses.dataclass
class ParityCheck:
    """One provider against the reference on one case, under `testing.tolerance_check`'s rule.

    max_err and bound are those of the tensor nearest its bound (a failing one first);
    failures lists every tensor past its bound.
    """

    provider: str
    dims: str  # the shape checked
    dtype: str
    with_grads: bool  # outputs and the six gradients (bwd, fwd_bwd), else outputs only (fwd)
    passed: bool
    tensor: str
    max_err: Optional[float]
    bound: Optional[float]
    failures: str = ""

    def summary(self) -> str:
        """E.g. "3.1e-06 <= 4.0e-05 (dq_s)"."""
        if self.max_err is None:
            return f"{'pass' if self.passed else 'FAIL'} ({self.tensor})"
        return f"{self.max_err:.1e} {'<=' if self.passed else '>'} {self.bound:.1e} ({self.tensor})"

    def metrics(self) -> dict:
        return dataclasses.asdict(self)


def check_parity(provider: Provider, case: Case, with_grads: bool) -> ParityCheck:
    """The provider against the reference on this case (outputs, and gradients); a mismatch
    is reported in the result, an error in the provider raises."""
    with provider.context():
        if with_grads:
            actual = _outputs_and_grads(provider.fn, case.inputs, case.grad_outputs, case.scale)
            same, exact = case.reference_gradients
            names = BILATERAL_RESULT_NAMES
        else:
            with torch.no_grad():
                actual = provider.fn(*case.inputs, case.scale)
            same, exact = case.reference_forward
            names = BILATERAL_RESULT_NAMES[:2]
    results = [(name, *tolerance_check(a, s, e, case.dtype)) for name, a, s, e in zip(names, actual, same, exact, strict=True)]
    failures = [f"{provider.name} {case.shape.dims} {DTYPE_NAMES[case.dtype]} {name}: {message}"
                for name, ok, _, _, message in results if not ok]  # fmt: skip
    name, ok, err, bound, _ = max(results, key=lambda r: (not r[1], -1.0 if r[2] is None else r[2] / r[3]))
    return ParityCheck(provider.name, case.shape.dims, DTYPE_NAMES[case.dtype], with_grads, not failures, name, err, bound, "; ".join(failures))


def make_callable(provider: Provider, case: Case, pass_: str) -> Callable[[], object]:
    """A no-argument function running one pass of the provider on the case."""
    fn, scale = provider.fn, case.scale
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return fn(*case.inputs, scale)

        return forward
    leaves = case.leaves()
    if pass_ == "bwd":
        with torch.enable_grad():
            outputs = fn(*leaves, scale)

        def backward():
            return torch.autograd.grad(outputs, leaves, case.grad_outputs, retain_graph=True)

        return backward

    def forward_backward():
        with torch.enable_grad():
            outputs = fn(*leaves, scale)
            return torch.autograd.grad(outputs, leaves, case.grad_outputs)

    return forward_backward
