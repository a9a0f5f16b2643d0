"""Record the launches the real launchers make, and bind them as Triton binds them at run time.

Used by the static check (static_check.py) and the modelled-performance table (perf_model.py).
No GPU is needed: every Triton kernel object of fused.py and wide.py is replaced by a
recorder while the launchers run on uninitialised CPU tensors (torch allocations on the
CPU are 64-byte aligned, as CUDA's are at least 256-byte aligned, so pointer alignment
specialises alike), with the SM count of the GPU that is modelled. The torch operations the
launchers run between kernels (the split reductions, casts, the wide backward's LSE merge)
are recorded too, through a dispatch mode.

Binding uses Triton's own run-time path: the kernel's binder
(`triton.runtime.jit.create_function_from_signature`, what `JITFunction.run` calls), which
makes an int argument equal to 1 a constant and gives ints divisible by 16 (and pointers
16-byte aligned) `tt.divisibility=16`, honouring `do_not_specialize`; then
`JITFunction._pack_args` turns that into the signature, constants and attributes
`triton.compile` gets. Each launch is bound with the config it was launched with (for the
fused forward and backward, the one configs.launch_config picked for its bucket).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from . import common, fused, wide  # noqa: E402
from .launch import clear as clear_plans  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (B, H, M, N, D): the benchmark shapes (spatial tokens M, image tokens N).
SHAPES = {
    "cls224-stage1": (64, 2, 64, 3136, 32),
    "cls224-stage2": (64, 4, 64, 784, 32),
    "seg512-stage1": (8, 2, 64, 16384, 32),
    "det800x1344-stage1": (2, 2, 64, 67200, 32),
}
# (B, H, queries, keys, D): Mask2Former's masked cross-attention, 100 object queries over the
# 1/8, 1/16 and 1/32 feature maps of a 512x512 image (as M, N: op cross_s with an attn_mask).
MASKED_CROSS_SHAPES = {
    "m2f512-s8": (2, 8, 100, 4096, 32),
    "m2f512-s16": (2, 8, 100, 1024, 32),
    "m2f512-s32": (2, 8, 100, 256, 32),
}
# Head dims compiled at cls224-stage1 besides D = 32 (D = 40: not a multiple of 16).
EXTRA_HEAD_DIMS = (40, 64, 96, 128, 256)
# bilateral; cross_attention with few queries over many keys (direction s: q [B,H,M,D] over
# k, v [B,H,N,D]) and with many queries over few keys (direction x: q [B,H,N,D] over [B,H,M,D]).
OPS = ("bilateral", "cross_s", "cross_x")


@dataclasses.dataclass(frozen=True)
class Case:
    shape: str
    op: str
    B: int
    H: int
    M: int
    N: int
    D: int
    dtype: str
    mask: bool
    attn_mask: bool = False  # cross attention's per-query mask [B, Lq, Lk]

    @property
    def name(self) -> str:
        named = {**SHAPES, **MASKED_CROSS_SHAPES}.get(self.shape)  # None: a shape given as its sizes
        return self.shape if named is None or self.D == named[4] else f"{self.shape}-D{self.D}"

    @property
    def label(self) -> str:
        masks = (" mask" if self.mask else "") + (" attn_mask" if self.attn_mask else "")
        return f"{self.name} {self.op} {self.dtype}{masks}"


def shape_cases(B: int, H: int, M: int, N: int, D: int, dtypes=tuple(DTYPES), ops=OPS, masks=(False, True)) -> list:
    """Cases of any shape (static_check --perf --shape), named by their sizes."""
    name = f"B{B}-H{H}-M{M}-N{N}-D{D}"
    return [Case(name, op, B, H, M, N, D, dt, mk) for dt in dtypes for mk in masks for op in ops]


def masked_cross_cases(dtypes=("bf16",)) -> list:
    """Mask2Former's masked cross-attention (op cross_s with a per-query attn_mask)."""
    return [Case(shape, "cross_s", *MASKED_CROSS_SHAPES[shape], dt, False, attn_mask=True)
            for shape in MASKED_CROSS_SHAPES for dt in dtypes]


def all_cases(dtypes=tuple(DTYPES), ops=OPS, masks=(False, True), shapes=tuple(SHAPES), head_dims=EXTRA_HEAD_DIMS):
    """The benchmark shapes at D = 32, then cls224-stage1 at the other head dims."""
    out = []
    for shape in shapes:
        B, H, M, N, D = SHAPES[shape]
        out += [Case(shape, op, B, H, M, N, D, dt, mk) for dt in dtypes for mk in masks for op in ops]
    B, H, M, N, _ = SHAPES["cls224-stage1"]
    out += [Case("cls224-stage1", op, B, H, M, N, d, dt, mk)
            for d in head_dims for dt in dtypes for mk in masks for op in ops]
    return out


# ----------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class KernelLaunch:
    """One kernel launch as the launcher made it."""
    name: str  # the jit function's name
    module: str  # its module (for the compile workers)
    grid: tuple
    args: tuple
    kwargs: dict
    configs: list  # [dict of meta-parameters incl. num_warps / num_stages]: the config launched
    tuned: bool  # a fused forward/backward launch: its config is picked per bucket (--calibrate tries the rest)

    def named(self) -> dict:
        jit = kernel_fn(self.module, self.name)
        return {**dict(zip(jit.arg_names, self.args)), **self.kwargs}


@dataclasses.dataclass
class TorchOp:
    """A torch operation the launcher ran between kernels (one CUDA kernel on a GPU)."""
    name: str
    bytes_in: int
    bytes_out: int


def kernel_fn(module: str, name: str) -> JITFunction:
    return getattr(importlib.import_module(module), name)


class _Recorder:
    def __init__(self, obj, events):
        self.obj, self.events = obj, events

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            jit = self.obj
            tuned = jit.fn.__name__ in PER_BUCKET_CONFIG
            config = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
            if tuned:
                config["BLOCK_N"] = kwargs.pop("BLOCK_N")
            self.events.append(KernelLaunch(jit.fn.__name__, jit.fn.__module__, tuple(grid), args, kwargs,
                                            [config], tuned))

        return launch


_NO_DATA = {"empty", "empty_strided", "view", "_unsafe_view", "as_strided", "alias", "detach", "t", "transpose",
            "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "lift_fresh", "_to_copy_noop"}


class _TorchOps(TorchDispatchMode):
    def __init__(self, events):
        super().__init__()
        self.events = events

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _NO_DATA:
            def nbytes(tree):
                return sum(t.numel() * t.element_size() for t in tree_leaves(tree) if isinstance(t, torch.Tensor))
            self.events.append(TorchOp(name, nbytes((args, kwargs)), nbytes(out)))
        return out


# Kernels whose launch config (BLOCK_N, warps, stages) configs.launch_config picks per bucket.
PER_BUCKET_CONFIG = ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel")


def _kernel_objects():
    for module in (common, fused, wide):
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and name.endswith("_kernel"):
                yield module, name, obj


@contextlib.contextmanager
def stubbed_device(n_sm: int, arch: int = 90):
    """Make the launchers see a GPU of `n_sm` SMs and architecture `arch` (whatever the
    tensors' device); restores them on exit. Launch plans made meanwhile are dropped on exit
    (and those made before, on entry)."""
    saved = [(module, "sm_count", module.sm_count) for module in (common, fused, wide)]
    saved.append((fused, "capability", fused.capability))
    clear_plans()
    try:
        for module in (common, fused, wide):
            module.sm_count = lambda device: n_sm
        fused.capability = lambda device: arch
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)
        clear_plans()


@contextlib.contextmanager
def stubbed_kernels(n_sm: int, events: list, arch: int = 90):
    """Replace every launchable kernel object of fused.py / wide.py by a recorder appending to
    `events`, under `stubbed_device(n_sm, arch)`; restores them on exit."""
    saved = list(_kernel_objects())
    with stubbed_device(n_sm, arch):
        try:
            for module, name, obj in saved:
                setattr(module, name, _Recorder(obj, events))
            yield events
        finally:
            for module, name, obj in saved:
                setattr(module, name, obj)


def case_tensors(case: Case):
    """Uninitialised CPU tensors of a case: (forward args, backward args) of the facade call."""
    B, H, M, N, D = case.B, case.H, case.M, case.N, case.D
    dt = DTYPES[case.dtype]

    def t(L):
        return torch.empty(B, H, L, D, dtype=dt)

    scale = D ** -0.5
    if case.op == "bilateral":
        ins = [t(M), t(M), t(M), t(N), t(N), t(N)]
        mask = torch.empty(B, N, dtype=torch.bool) if case.mask else None
        lse = [torch.empty(B, H, M, dtype=torch.float64), torch.empty(B, H, N, dtype=torch.float64)]
        fwd = (*ins, scale, mask)
        bwd = (t(M), t(N), *ins, t(M), t(N), *lse, scale, mask)
        return fwd, bwd
    lq, lk = (M, N) if case.op == "cross_s" else (N, M)
    q, k, v = t(lq), t(lk), t(lk)
    mask = torch.empty(B, lk, dtype=torch.bool) if case.mask else None
    attn_mask = torch.empty(B, lq, lk, dtype=torch.bool) if case.attn_mask else None
    fwd = (q, k, v, scale, mask, attn_mask)
    bwd = (t(lq), q, k, v, t(lq), torch.empty(B, H, lq, dtype=torch.float64), scale, mask, attn_mask)
    return fwd, bwd


def facade(case: Case, backward: bool):
    from . import bilateral_bwd, bilateral_fwd, cross_bwd, cross_fwd

    if case.op == "bilateral":
        return bilateral_bwd if backward else bilateral_fwd
    return cross_bwd if backward else cross_fwd


def record(case: Case, n_sm: int, backward: bool, torch_ops: bool = True, arch: int = 90) -> list:
    """The ordered kernel launches (KernelLaunch) and torch operations (TorchOp) of one pass."""
    fwd_args, bwd_args = case_tensors(case)
    events = []
    with stubbed_kernels(n_sm, events, arch):
        ctx = _TorchOps(events) if torch_ops else contextlib.nullcontext()
        with ctx:
            facade(case, backward)(*(bwd_args if backward else fwd_args))
    return events


# ----------------------------------------------------------------------------------------
# Binding (Triton's run-time specialisation)
# ----------------------------------------------------------------------------------------
_BINDERS: dict = {}


def binder_for(jit: JITFunction, arch: int):
    key = (id(jit), arch)
    if key not in _BINDERS:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _BINDERS[key] = (backend, create_function_from_signature(jit.signature, jit.params, backend))
    return _BINDERS[key]


@dataclasses.dataclass(frozen=True)
class CompileTask:
    """What `triton.compile` gets for one launch at one config on one target (picklable)."""
    module: str
    name: str
    signature: tuple  # ((arg name, type), ...)
    constexprs: tuple  # ((path, value), ...)
    attrs: tuple  # ((path, attributes), ...)
    options: tuple  # ((option, value), ...)
    arch: int

    @property
    def num_warps(self) -> int:
        return dict(self.options)["num_warps"]

    def key(self) -> str:
        return repr((self.module, self.name, self.signature, self.constexprs, self.attrs, self.options, self.arch))


def bind(launch: KernelLaunch, config: dict, arch: int) -> CompileTask:
    """Bind one launch at one config exactly as `JITFunction.run` does before compiling."""
    jit = kernel_fn(launch.module, launch.name)
    backend, binder = binder_for(jit, arch)
    kwargs = dict(launch.kwargs, **config)
    kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    return CompileTask(
        launch.module, launch.name, tuple(signature.items()), tuple(sorted(constexprs.items())),
        tuple(sorted(attrs.items())), tuple(sorted(_freeze(options.__dict__).items())), arch,
    )


def _freeze(d):
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def specialisation_text(task: CompileTask) -> str:
    """Compact text of what run-time specialisation decided for the int arguments:
    `D=16|1` style (name=16: divisibility 16; name=1: constant 1)."""
    attrs = {path[0] for path, value in task.attrs if value}
    names = [name for name, _ in task.signature]
    consts = {names[path[0]]: value for path, value in task.constexprs if len(path) == 1}
    parts = []
    for index, (name, ty) in enumerate(task.signature):
        if ty.startswith("i") and index in attrs:
            parts.append(f"{name}:16")
        elif ty == "constexpr" and consts.get(name) == 1 and not name.isupper():
            parts.append(f"{name}=1")
    return " ".join(parts)
