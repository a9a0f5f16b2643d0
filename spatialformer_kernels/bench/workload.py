"""What the benchmark runs: shapes, the work model, providers, cases and parity.

Part of the benchmark harness `spatialformer_kernels.bench` (whose docstring gives the
shapes, providers and the work model that `bytes_moved` and `flops` follow).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import dispatch
from ..ops.bilateral_attention import bilateral_attention
from ..ops.cross_attention import cross_attention
from ..reference import bilateral_attention_reference, cross_attention_reference
from ..testing import (
    BILATERAL_RESULT_NAMES,
    CROSS_RESULT_NAMES,
    make_bilateral_inputs,
    outputs_and_grads,
    reference_bilateral_results,
    reference_cross_results,
    reference_pair,
    tolerance_check,
)

# ----------------------------------------------------------------------------------------
# Ops and shapes
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Op:
    """One op the harness benchmarks: what a provider computes and what parity compares."""

    name: str
    label: str
    result_names: tuple  # the outputs, then the gradients of the differentiable inputs
    n_outputs: int


OPS = {
    "bilateral": Op("bilateral", "bilateral attention", BILATERAL_RESULT_NAMES, 2),
    "masked_cross": Op("masked_cross", "masked cross-attention", CROSS_RESULT_NAMES, 1),
}

CPU_SCALE = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    """B, H, D as named; bilateral: M tokens on one side, N on the other; masked_cross: M
    queries over N keys (the key grid sqrt(N) x sqrt(N), raster order)."""

    name: str
    B: int
    H: int
    M: int
    N: int
    D: int
    scale: int = 1  # B and N divided by this from the docs/design.md shape of the same name
    op: str = "bilateral"  # a key of OPS

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; ops: {', '.join(OPS)}")

    def scaled(self, factor: int) -> "Shape":
        """B and N divided by `factor` (B at least 1); masked cross-attention shapes are never
        scaled (they are small: milliseconds on 2 cores already)."""
        if factor == 1 or not self.scalable:
            return self
        return dataclasses.replace(self, B=max(1, self.B // factor), N=max(1, self.N // factor), scale=factor)

    @property
    def scalable(self) -> bool:
        return self.op == "bilateral"

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
    # Mask2Former's masked cross-attention on a 512 x 512 image, 100 object queries
    # over the pixel decoder's 1/8, 1/16 and 1/32 feature maps (64^2, 32^2, 16^2 keys).
    Shape("m2f512-s8", 2, 8, 100, 4096, 32, op="masked_cross"),
    Shape("m2f512-s16", 2, 8, 100, 1024, 32, op="masked_cross"),
    Shape("m2f512-s32", 2, 8, 100, 256, 32, op="masked_cross"),
)
SHAPE_NAMES = tuple(s.name for s in SHAPES)
MASKED_SHAPE_NAMES = tuple(s.name for s in SHAPES if s.op == "masked_cross")


def default_scale(device: torch.device) -> int:
    return 1 if device.type == "cuda" else CPU_SCALE


def shapes_for(device: torch.device, names: Optional[Iterable[str]] = None, scale: Optional[int] = None) -> list[Shape]:
    """Shapes by name (default: all), scaled for the device (CPU: B and N of the bilateral
    shapes divided by CPU_SCALE; masked cross-attention shapes as they are)."""
    wanted = list(names) if names else list(SHAPE_NAMES)
    unknown = [n for n in wanted if n not in SHAPE_NAMES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPE_NAMES)}")
    factor = default_scale(device) if scale is None else scale
    return [s.scaled(factor) for s in SHAPES if s.name in wanted]


INTERPRETER_MAX_N = 256
INTERPRETER_MAX_H_MASKED = 2


def interpreter_shape(shape: Shape) -> Shape:
    """The shape Triton's interpreter checks for `shape` in seconds: B 1, N at most
    INTERPRETER_MAX_N, H, M and D kept (so the same per-head tiles, masked tail included);
    masked cross-attention also H at most INTERPRETER_MAX_H_MASKED (its heads share the mask
    and run as separate programs: 8 heads cost the interpreter 4x as long, check nothing more)."""
    H = min(shape.H, INTERPRETER_MAX_H_MASKED) if shape.op == "masked_cross" else shape.H
    return Shape("interpreter", 1, H, shape.M, min(shape.N, INTERPRETER_MAX_N), shape.D, op=shape.op)


def scaling_note(shapes: Sequence[Shape]) -> str:
    """One line saying whether and how the shapes are scaled down from docs/design.md section 4
    (and, when there are any, that the masked cross-attention shapes are not)."""
    bilateral = [s for s in shapes if s.scalable]
    masked = [s.name for s in shapes if not s.scalable]
    factors = sorted({s.scale for s in bilateral})
    parts = []
    if factors == [1]:
        parts.append("full docs/design.md section 4 shapes")
    elif factors:
        parts.append(
            f"shapes scaled down for this device: B and N divided by {'/'.join(map(str, factors))} "
            "(B at least 1), H, M, D unchanged; a scaled shape is named <shape>/<factor>"
        )
    if masked:
        parts.append(
            f"masked cross-attention shapes ({', '.join(masked)}: Mask2Former) at full size on "
            "every device (never scaled: small already)"
        )
    return "; ".join(parts)


# ----------------------------------------------------------------------------------------
# Masks of the masked cross-attention shapes
# ----------------------------------------------------------------------------------------

MASK_FRACTION = 0.3  # mean fraction of the keys a query attends to
MASK_SPREAD = 0.1  # a blob query's fraction is uniform in [MASK_FRACTION - MASK_SPREAD, + MASK_SPREAD]
MASK_EMPTY_QUERIES = 2  # per sample: queries that attend to no key (the op's zero-output rule)
MASK_FULL_QUERIES = 1  # per sample: queries that attend to every key


def key_grid(N: int) -> tuple[int, int]:
    """(rows, columns) of the grid the N keys fill in raster order: sqrt(N) x sqrt(N) for a
    square N, else ceil(sqrt(N)) columns and as many rows as needed (the last one partial)."""
    columns = math.isqrt(N - 1) + 1 if N > 0 else 1
    return -(-N // columns), columns


def object_query_masks(
    B: int, M: int, N: int, *, seed: int = 0, fraction: float = MASK_FRACTION, spread: float = MASK_SPREAD,
    empty: int = MASK_EMPTY_QUERIES, full: int = MASK_FULL_QUERIES,
) -> torch.Tensor:  # fmt: skip
    """bool [B, M, N], True = attend: Mask2Former-like masks of M object queries over N keys.

    Each query's keys form one spatially coherent blob on the key grid (`key_grid`, raster
    order): a random ellipse (centre anywhere on the grid, axis ratio 1 to 3, any rotation)
    grown until it holds a fraction of the keys drawn uniformly from [fraction - spread,
    fraction + spread]; its keys are those nearest its centre in the ellipse's metric, so the
    fraction is exact (to a key) even where the grid's edge clips the ellipse. In each sample,
    `empty` random queries attend to no key and `full` others to every key (so with the
    defaults, 2 and 1 of 100, the mean stays about 30%). Deterministic from `seed`, on the CPU.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows, columns = key_grid(N)
    keys = torch.arange(N)
    y, x = (keys // columns).double(), (keys % columns).double()
    centre_y = torch.rand(B, M, 1, generator=generator, dtype=torch.float64) * rows
    centre_x = torch.rand(B, M, 1, generator=generator, dtype=torch.float64) * columns
    angle = torch.rand(B, M, 1, generator=generator, dtype=torch.float64) * math.pi
    ratio = 1 + 2 * torch.rand(B, M, 1, generator=generator, dtype=torch.float64)
    dy, dx = y - centre_y, x - centre_x
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    across = dy * torch.cos(angle) - dx * torch.sin(angle)
    distance = (along / ratio) ** 2 + across**2  # [B, M, N]
    share = fraction + spread * (2 * torch.rand(B, M, 1, generator=generator, dtype=torch.float64) - 1)
    count = (share * N).round().clamp(1, N)
    rank = torch.empty(B, M, N, dtype=torch.long).scatter_(-1, distance.argsort(-1), keys.expand(B, M, N).contiguous())
    mask = rank < count
    for b in range(B):
        order = torch.randperm(M, generator=generator)
        mask[b, order[:empty]] = False
        mask[b, order[empty : empty + full]] = True
    return mask


@functools.lru_cache(maxsize=None)
def mask_summary(shape: Shape, seed: int = 0) -> dict:
    """What the masks of a masked cross-attention shape are: the fraction of (query, key) pairs
    kept, the range over the blob queries, and the empty and full queries per sample."""
    mask = object_query_masks(shape.B, shape.M, shape.N, seed=seed)
    per_query = mask.double().mean(-1)
    blob = per_query[(per_query > 0) & (per_query < 1)]
    rows, columns = key_grid(shape.N)
    return {
        "kept": round(mask.double().mean().item(), 4),
        "blob_min": round(blob.min().item(), 4) if blob.numel() else None,
        "blob_max": round(blob.max().item(), 4) if blob.numel() else None,
        "empty_queries": int((per_query == 0).sum()),
        "full_queries": int((per_query == 1).sum()),
        "grid": f"{rows}x{columns}",
    }


def mask_note(shape: Shape) -> str:
    """E.g. "m2f512-s8 attn_mask: 30.1% of (query, key) pairs kept; one ellipse per query on the
    64x64 key grid, 20.0-40.0% of the keys; 4 empty and 2 full queries (of B*M = 200)"."""
    m = mask_summary(shape)
    blob = f"{100 * m['blob_min']:.1f}-{100 * m['blob_max']:.1f}% of the keys" if m["blob_min"] is not None else "no blob"
    return (
        f"{shape.label} attn_mask: {100 * m['kept']:.1f}% of (query, key) pairs kept; one ellipse per query on the "
        f"{m['grid']} key grid, {blob}; {m['empty_queries']} empty and {m['full_queries']} full queries "
        f"(of B*M = {shape.B * shape.M})"
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
    item = torch.empty((), dtype=dtype).element_size()
    if shape.op == "masked_cross":
        bhd = shape.B * shape.H * shape.D * item
        mask = shape.B * shape.M * shape.N  # bool, one byte per (query, key), read by each pass
        fwd = (2 * shape.M + 2 * shape.N) * bhd + mask
        bwd = (4 * shape.M + 4 * shape.N) * bhd + 4 * shape.B * shape.H * shape.M + mask
        return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]
    elements = shape.B * shape.H * (shape.M + shape.N)
    fwd = 4 * elements * shape.D * item
    bwd = 8 * elements * shape.D * item + 4 * elements
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[pass_]


def flops(shape: Shape, pass_: str) -> int:
    """Matmul FLOPs of the op, the convention of the op's registered flop formulas; for masked
    cross-attention those of the dense op (masked pairs counted: what a dense kernel computes)."""
    unit = shape.B * shape.H * shape.M * shape.N * shape.D
    per_direction = {"fwd": 4 * unit, "bwd": 10 * unit, "fwd_bwd": 14 * unit}[pass_]
    return per_direction if shape.op == "masked_cross" else 2 * per_direction


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def pct_of_roofline(achieved_gbps: float, peak_gbps: Optional[float]) -> Optional[float]:
    return None if not peak_gbps else 100.0 * achieved_gbps / peak_gbps


# ----------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------

# A provider's function of one op takes the case's differentiable inputs, then its constants
# (Case.extras, after Provider.prepare), then the scale, and returns a tuple of outputs:
#   bilateral     (q_s, k_s, v_s, q_x, k_x, v_x, scale) -> (o_s, o_x)
#   masked_cross  (q, k, v, attn_mask, scale) -> (o,)    attn_mask bool [B, M, N], True = attend
AttentionFn = Callable[..., tuple]


@dataclasses.dataclass
class Provider:
    name: str
    kind: str  # "ours" or "baseline"
    family: str  # "ours", "reference", "sdpa", "compile", "flex", "xformers", "flash-attn"
    build: Optional[Callable[[], AttentionFn]] = None  # the bilateral op's function: short for builds["bilateral"]
    skip: Optional[str] = None  # why this provider does not run here
    parity_only: Optional[str] = None  # why it is parity-checked but not timed
    parity_shape: Optional[Callable[[Shape], Shape]] = None  # the shape checked for a row's shape (None: that shape)
    dtypes: Optional[tuple] = None  # None = all
    forward_only: bool = False
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    builds: dict = dataclasses.field(default_factory=dict)  # op -> build of its function, called once, lazily
    op_skip: dict = dataclasses.field(default_factory=dict)  # op -> why this provider does not run that op
    # op -> the case's constants as this provider's function takes them (flex: the BlockMask),
    # made once per case before its calls, never inside a timed call (default: Case.extras)
    prepare: dict = dataclasses.field(default_factory=dict)
    notes: dict = dataclasses.field(default_factory=dict)  # op -> a note for this provider's timed rows
    _fns: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.build is not None:
            self.builds.setdefault("bilateral", self.build)

    def fn_for(self, op: str) -> AttentionFn:
        """The provider's function of `op`, built on first use."""
        if op not in self._fns:
            self._fns[op] = self.builds[op]()
        return self._fns[op]

    @property
    def fn(self) -> AttentionFn:  # the bilateral op's (benchmarks/gpu_config_sweep.py)
        return self.fn_for("bilateral")

    def constants(self, case: "Case") -> tuple:
        """The case's constants as this provider takes them (see `prepare`)."""
        prepare = self.prepare.get(case.shape.op)
        return tuple(prepare(case)) if prepare else case.extras


def _ours(backend: str) -> AttentionFn:
    def run(q_s, k_s, v_s, q_x, k_x, v_x, scale):
        return bilateral_attention(q_s, k_s, v_s, q_x, k_x, v_x, scale=scale, backend=backend)

    return run


def _ours_masked(backend: str) -> AttentionFn:
    def run(q, k, v, attn_mask, scale):
        return (cross_attention(q, k, v, scale=scale, attn_mask=attn_mask, backend=backend),)

    return run


def _sdpa(q_s, k_s, v_s, q_x, k_x, v_x, scale):
    o_s = F.scaled_dot_product_attention(q_s, k_x, v_x, scale=scale)
    o_x = F.scaled_dot_product_attention(q_x, k_s, v_s, scale=scale)
    return o_s, o_x


def _sdpa_masked(q, k, v, attn_mask, scale):
    # SDPA's boolean mask: True = attend, broadcast over the heads as [B, 1, M, N]
    return (F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask[:, None], scale=scale),)


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


def _masked_cross_reference(q, k, v, attn_mask, scale):
    return (cross_attention_reference(q, k, v, scale, attn_mask=attn_mask),)


def _compiled_masked_reference() -> AttentionFn:
    return torch.compile(_masked_cross_reference)


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


def _flex_masked() -> AttentionFn:
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention)

    def run(q, k, v, block_mask, scale):
        return (compiled(q, k, v, block_mask=block_mask, scale=scale),)

    return run


def _flex_block_mask(case: "Case") -> tuple:
    """The case's attn_mask as FlexAttention's BlockMask (its mask_mod reads the mask tensor)."""
    from torch.nn.attention.flex_attention import create_block_mask

    (attn_mask,) = case.extras

    def mask_mod(b, h, q_idx, kv_idx):
        return attn_mask[b, q_idx, kv_idx]

    B, M, N = attn_mask.shape
    return (create_block_mask(mask_mod, B, None, M, N, device=attn_mask.device),)


FLEX_MASK_NOTE = "BlockMask built from the mask once per case, outside the timed calls"


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
    """Every provider, those that cannot run on this device carrying the reason (and those
    that cannot run an op, the reason for that op).

    Triton without CUDA runs only in its interpreter (TRITON_INTERPRET=1), far too slow to
    time: it is parity-checked on `interpreter_shape`s and not timed; timing=False (parity
    tests on their own small shapes) checks it on the shapes given.
    """
    out = []
    for backend in dispatch.available_backends():
        if backend == "reference":
            continue
        module = dispatch.kernels(backend)
        provider = Provider(
            f"ours-{backend}", "ours", "ours", functools.partial(_ours, backend), dtypes=tuple(module.DTYPES),
            builds={"masked_cross": functools.partial(_ours_masked, backend)},
        )  # fmt: skip
        if backend == "triton" and device.type != "cuda" and not dispatch.triton_interpreter_enabled():
            provider.skip = (
                "no CUDA device, and Triton's interpreter is off: not checked, not timed "
                "(spatialformer-bench checks it in the interpreter unless TRITON_INTERPRET is set to 0)"
            )
        elif backend == "triton" and device.type != "cuda" and timing:
            provider.parity_only = (
                "Triton without CUDA runs only in its interpreter, far too slow to time; its parity is checked "
                f"on B 1 and N at most {INTERPRETER_MAX_N} (the row's H, M, D; masked cross-attention: H at most "
                f"{INTERPRETER_MAX_H_MASKED})"
            )
            provider.parity_shape = interpreter_shape
            provider.context = _quiet_interpreter
        elif backend not in dispatch.runnable_backends(device):
            provider.skip = f"backend {backend!r} cannot run on {device.type} tensors here"
        out.append(provider)
    out.append(Provider("reference", "baseline", "reference", lambda: _ours("reference"),
                        builds={"masked_cross": lambda: _ours_masked("reference")}))  # fmt: skip
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        for label, backend in (
            ("flash", SDPBackend.FLASH_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("math", SDPBackend.MATH),
        ):
            sdpa = Provider(f"sdpa-{label}", "baseline", "sdpa", lambda: _sdpa, context=_sdpa_context(backend))
            if label == "flash":
                sdpa.op_skip["masked_cross"] = "SDPA's FlashAttention backend takes no attn_mask (causal masking only)"
            else:
                sdpa.builds["masked_cross"] = lambda: _sdpa_masked
            out.append(sdpa)
    else:
        out.append(Provider("sdpa", "baseline", "sdpa", lambda: _sdpa, builds={"masked_cross": lambda: _sdpa_masked}))
    out.append(Provider("compile-reference", "baseline", "compile", _compiled_reference, context=_no_donated_buffers,
                        builds={"masked_cross": _compiled_masked_reference}))  # fmt: skip
    flex = Provider(
        "flex", "baseline", "flex", _flex, builds={"masked_cross": _flex_masked},
        prepare={"masked_cross": _flex_block_mask}, notes={"masked_cross": FLEX_MASK_NOTE},
    )  # fmt: skip
    if device.type == "cpu":
        flex.forward_only = True  # FlexAttention has no CPU backward
    out.append(flex)
    xformers = Provider("xformers", "baseline", "xformers", _xformers, skip=_installed("xformers"))
    xformers.op_skip["masked_cross"] = (
        "xformers would take the mask as an additive float bias [B, H, M, N]; not wired up in this harness"
    )
    flash = Provider("flash-attn", "baseline", "flash-attn", _flash_attn, skip=_installed("flash_attn"))
    flash.dtypes = (torch.float16, torch.bfloat16)
    flash.op_skip["masked_cross"] = "flash-attn takes no arbitrary attention mask (causal and sliding window only)"
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


def skip_reason(provider: Provider, dtype: torch.dtype, pass_: str, op: str = "bilateral") -> Optional[str]:
    if provider.skip:
        return provider.skip
    if op not in provider.builds:
        return provider.op_skip.get(op) or f"{provider.name} has no {OPS[op].label} here"
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
    inputs: tuple  # the differentiable inputs, no grad: (q_s, k_s, v_s, q_x, k_x, v_x); masked_cross (q, k, v)
    grad_outputs: tuple  # one per output: (do_s, do_x); masked_cross (do,)
    scale: float
    extras: tuple = ()  # constant inputs, passed after `inputs`, before the scale: masked_cross (attn_mask,)

    @classmethod
    def make(cls, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> "Case":
        if shape.op == "masked_cross":
            return cls._make_masked_cross(shape, dtype, device, seed)
        inputs = make_bilateral_inputs(shape.B, shape.H, shape.M, shape.N, shape.D, dtype=dtype, device=device, seed=seed)
        generator = torch.Generator(device="cpu").manual_seed(seed + 1)
        grads = tuple(
            torch.randn(shape.B, shape.H, length, shape.D, generator=generator).to(device=device, dtype=dtype)
            for length in (shape.M, shape.N)
        )
        return cls(shape, dtype, inputs, grads, shape.D**-0.5)

    @classmethod
    def _make_masked_cross(cls, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> "Case":
        """q [B, H, M, D] over k, v [B, H, N, D], with `object_query_masks` as the attn_mask."""
        generator = torch.Generator(device="cpu").manual_seed(seed)

        def one(length: int) -> torch.Tensor:
            return torch.randn(shape.B, shape.H, length, shape.D, generator=generator).to(device=device, dtype=dtype)

        inputs = (one(shape.M), one(shape.N), one(shape.N))
        grads = (one(shape.M),)
        mask = object_query_masks(shape.B, shape.M, shape.N, seed=seed).to(device)
        return cls(shape, dtype, inputs, grads, shape.D**-0.5, (mask,))

    @property
    def op(self) -> Op:
        return OPS[self.shape.op]

    def leaves(self) -> list[torch.Tensor]:
        return [t.detach().clone().requires_grad_(True) for t in self.inputs]

    @functools.cached_property
    def reference_forward(self):
        """(same dtype, float64) outputs of the reference, as tuples."""
        if self.shape.op == "masked_cross":
            (mask,) = self.extras
            fn = functools.partial(_masked_cross_reference, attn_mask=mask, scale=self.scale)
            return reference_pair(lambda q, k, v: fn(q, k, v), self.inputs)
        return reference_pair(bilateral_attention_reference, self.inputs, scale=self.scale)

    @functools.cached_property
    def reference_gradients(self):
        """(same dtype, float64) outputs and input gradients of the reference (Op.result_names)."""
        if self.shape.op == "masked_cross":
            (mask,) = self.extras
            return reference_cross_results(*self.inputs, self.grad_outputs[0], self.scale, attn_mask=mask)
        return reference_bilateral_results(self.inputs, self.grad_outputs, self.scale)


def _outputs_and_grads(fn: AttentionFn, inputs, constants, grad_outputs, scale) -> tuple:
    with torch.enable_grad():
        outputs, grads = outputs_and_grads(lambda *t: fn(*t, *constants, scale), inputs, grad_outputs)
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
    with_grads: bool  # outputs and every input's gradient (bwd, fwd_bwd), else outputs only (fwd)
    passed: bool
    tensor: str
    max_err: Optional[float]
    bound: Optional[float]
    failures: str = ""
    op: str = "bilateral"

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
    op = case.op
    with provider.context():
        fn, constants = provider.fn_for(op.name), provider.constants(case)
        if with_grads:
            actual = _outputs_and_grads(fn, case.inputs, constants, case.grad_outputs, case.scale)
            same, exact = case.reference_gradients
            names = op.result_names
        else:
            with torch.no_grad():
                actual = fn(*case.inputs, *constants, case.scale)
            same, exact = case.reference_forward
            names = op.result_names[: op.n_outputs]
    results = [(name, *tolerance_check(a, s, e, case.dtype)) for name, a, s, e in zip(names, actual, same, exact, strict=True)]
    failures = [f"{provider.name} {case.shape.dims} {DTYPE_NAMES[case.dtype]} {name}: {message}"
                for name, ok, _, _, message in results if not ok]  # fmt: skip
    name, ok, err, bound, _ = max(results, key=lambda r: (not r[1], -1.0 if r[2] is None else r[2] / r[3]))
    return ParityCheck(
        provider.name, case.shape.dims, DTYPE_NAMES[case.dtype], with_grads, not failures, name, err, bound,
        "; ".join(failures), op.name,
    )  # fmt: skip


def make_callable(provider: Provider, case: Case, pass_: str) -> Callable[[], object]:
    """A no-argument function running one pass of the provider on the case (the case's
    constants prepared for the provider first, outside the calls)."""
    fn, scale = provider.fn_for(case.shape.op), case.scale
    constants = provider.constants(case)
    if pass_ == "fwd":

        def forward():
            with torch.no_grad():
                return fn(*case.inputs, *constants, scale)

        return forward
    leaves = case.leaves()
    if pass_ == "bwd":
        with torch.enable_grad():
            outputs = fn(*leaves, *constants, scale)

        def backward():
            return torch.autograd.grad(outputs, leaves, case.grad_outputs, retain_graph=True)

        return backward

    def forward_backward():
        with torch.enable_grad():
            outputs = fn(*leaves, *constants, scale)
            return torch.autograd.grad(outputs, leaves, case.grad_outputs)

    return forward_backward
