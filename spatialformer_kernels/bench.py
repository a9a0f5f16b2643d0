"""Benchmark core and the `spatialformer-bench` command.

One measurement core serves both front ends: `spatialformer-bench` (a table with a
progress bar, JSON and a PNG plot) and `pytest benchmarks/ --benchmark` (pytest-benchmark
rows). Every row first checks parity with the reference (`testing.assert_close`), then
times one provider on one shape, dtype and pass.

Shapes are DESIGN.md section 4. On CPU they are scaled down so that every row runs in well
under a second on 2 cores: B and N are divided by `CPU_SCALE` (B at least 1); H, M and D
stay as they are, so per-head tiles keep their shape and every shape shrinks alike (N/M is
CPU_SCALE times smaller). A scaled shape is named "<shape>/<factor>".

Providers: ours (one per kernel backend in `available_backends()` that can run on the
device), the reference, PyTorch SDPA (each backend the device has, both directions as two
calls), torch.compile of the reference, FlexAttention (compiled; on CPU forward only, and
left out of a default CPU `spatialformer-bench` run for its compile time), xformers and
flash-attn when installed. Passes: "fwd" (inference, no autograd graph), "bwd" (autograd.grad of a
retained graph) and "fwd_bwd" (both).

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed before every call,
autotuning and compilation finished by explicit warm-up calls first); on CPU a warm-up
call, then `time.perf_counter` around each call until a time budget, median reported, with
as many threads as there are idle cores (`choose_threads`).

Work model (the same for every provider, so GB/s is an effective bandwidth):
    bytes fwd  = 4 * B*H*(M+N)*D * itemsize              (read q, k, v; write o; both sides)
    bytes bwd  = 8 * B*H*(M+N)*D * itemsize + 4*B*H*(M+N) (read q, k, v, o, do, lse; write dq, dk, dv)
    flops fwd  = 8 * B*H*M*N*D                            (q@k^T and p@v, both directions)
    flops bwd  = 20 * B*H*M*N*D                           (recomputed logits, dv, dp, dq, dk)
fwd_bwd is the sum of both.

    spatialformer-bench                         # default shapes, table + JSON + PNG in ./bench-out/
    spatialformer-bench --quick                 # a few seconds
    spatialformer-bench --shapes cls224-stage1 --passes fwd --dtypes bf16
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dispatch
from .ops.bilateral_attention import bilateral_attention
from .reference import bilateral_attention_reference
from .testing import assert_close, make_bilateral_inputs, reference_pair

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
    scale: int = 1  # B and N divided by this from the DESIGN.md shape of the same name

    def scaled(self, factor: int) -> "Shape":
        if factor == 1:
            return self
        return dataclasses.replace(self, B=max(1, self.B // factor), N=max(1, self.N // factor), scale=factor)

    @property
    def label(self) -> str:
        return self.name if self.scale == 1 else f"{self.name}/{self.scale}"


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
    """DESIGN.md shapes by name, scaled for the device (CPU: B and N divided by CPU_SCALE)."""
    wanted = list(names) if names else list(SHAPE_NAMES)
    unknown = [n for n in wanted if n not in SHAPE_NAMES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPE_NAMES)}")
    factor = default_scale(device) if scale is None else scale
    return [s.scaled(factor) for s in SHAPES if s.name in wanted]


def scaling_note(shapes: Sequence[Shape]) -> str:
    factors = sorted({s.scale for s in shapes})
    if factors == [1]:
        return "full DESIGN.md section 4 shapes"
    return (
        f"shapes scaled down for this device: B and N divided by {'/'.join(map(str, factors))} "
        "(B at least 1), H, M, D unchanged; a scaled shape is named <shape>/<factor>"
    )


# ----------------------------------------------------------------------------------------
# Devices, rooflines, environment
# ----------------------------------------------------------------------------------------

# Peak HBM bandwidth (GB/s, vendor data sheets). A device matches the first entry whose
# tokens all occur in its torch name (lower case, split on non-alphanumerics).
KNOWN_DEVICES: tuple[tuple[frozenset, str, float], ...] = tuple(
    (frozenset(tokens.split()), label, gbps)
    for tokens, label, gbps in (
        ("gh200 hbm3e", "GH200 (HBM3e)", 4900.0),
        ("gh200", "GH200 (HBM3)", 4000.0),
        ("h200", "H200", 4800.0),
        ("h100 pcie", "H100 PCIe", 2000.0),
        ("h100 nvl", "H100 NVL", 3900.0),
        ("h100", "H100 SXM", 3350.0),
        ("h800 pcie", "H800 PCIe", 2000.0),
        ("h800", "H800 SXM", 3350.0),
        ("b200", "B200", 8000.0),
        ("a100 80gb pcie", "A100 80GB PCIe", 1935.0),
        ("a100 80gb", "A100 80GB SXM", 2039.0),
        ("a100 40gb", "A100 40GB", 1555.0),
        ("a100 pcie 40gb", "A100 40GB", 1555.0),
        ("l40s", "L40S", 864.0),
        ("l40", "L40", 864.0),
        ("l4", "L4", 300.0),
        ("a10g", "A10G", 600.0),
        ("a10", "A10", 600.0),
        ("t4", "T4", 320.0),
        ("v100", "V100", 900.0),
        ("rtx 4090", "RTX 4090", 1008.0),
        ("rtx 3090", "RTX 3090", 936.0),
        ("rtx 6000 ada", "RTX 6000 Ada", 960.0),
        ("mi300x", "MI300X", 5300.0),
    )
)

CPU_ROOFLINE_NOTE = "no HBM roofline is known for a CPU unless measured: pass --measure-bandwidth or --peak-gbps"


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best GB/s of a large tensor copy (bytes read + bytes written): a measured roofline,
    for devices without a data-sheet entry (CPUs)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats + 1):  # the first copy faults the pages in
        _synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def lookup_roofline(device_name: str) -> Optional[tuple[str, float]]:
    """(label, peak GB/s) of a known device from its torch name, or None."""
    tokens = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for required, label, gbps in KNOWN_DEVICES:
        if required <= tokens:
            return label, gbps
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return name or platform.processor() or platform.machine()


def git_commit() -> Optional[str]:
    """The commit of the source tree this package runs from (with -dirty), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "")


def environment(device: torch.device, peak_gbps: Optional[float] = None, measure_bandwidth: bool = False) -> dict:
    """Device, versions, roofline and commit: what a result needs to be reproduced.

    The roofline is, in order: `peak_gbps` as given, a measured copy bandwidth when
    `measure_bandwidth`, the data-sheet table for a known GPU, else none (with the reason).
    """
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = device_name(device)
    known = lookup_roofline(name) if device.type == "cuda" else None
    if peak_gbps is not None:
        roofline = {"peak_gbps": peak_gbps, "source": "user-supplied (--peak-gbps)"}
    elif measure_bandwidth:
        measured = round(measure_copy_bandwidth(device), 1)
        roofline = {"peak_gbps": measured, "source": f"measured: best copy of 256 MiB (read + write), {torch.get_num_threads()} thread(s)"}
    elif known is not None:
        roofline = {"peak_gbps": known[1], "source": f"data sheet, {known[0]}"}
    else:
        roofline = {"peak_gbps": None, "source": CPU_ROOFLINE_NOTE if device.type == "cpu" else f"unknown device {name!r}"}
    env = {
        "device_type": device.type,
        "device_name": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "backends": dispatch.available_backends(),
        "roofline": roofline,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["sm_count"] = props.multi_processor_count
        env["capability"] = f"{props.major}.{props.minor}"
    else:
        env["cpu_threads"] = torch.get_num_threads()
        env["cpu_count"] = os.cpu_count()
        if hasattr(os, "getloadavg"):  # other processes on a shared CPU skew every timing
            env["load_average_1min"] = round(os.getloadavg()[0], 2)
        env["busy_cores"] = round(busy_cores(), 2)
    return env


def busy_cores(samples: int = 10, interval_s: float = 0.02) -> float:
    """Mean number of other processes' runnable tasks now (Linux /proc/loadavg), else the
    1-minute load average."""
    try:
        counts = []
        for _ in range(samples):
            with open("/proc/loadavg", encoding="utf-8") as f:
                running = int(f.read().split()[3].split("/")[0])
            counts.append(running - 1)  # this thread is running while it reads
            time.sleep(interval_s)
        return statistics.mean(counts)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def choose_threads(requested: Optional[str] = "auto") -> int:
    """CPU threads for timing: a number, or "auto".

    "auto" keeps torch's default unless other processes keep cores busy, then uses only the
    idle cores, at least one: with more threads than idle cores every parallel region waits
    at its barrier for a descheduled thread, and the timings measure the scheduler (on a
    shared 2-core machine, 2 threads turned a 9 ms row into 290 ms).
    """
    if requested not in (None, "auto"):
        return max(1, int(requested))
    default = torch.get_num_threads()
    return max(1, min(default, int((os.cpu_count() or 1) - busy_cores() + 0.5)))


def hardware_slug(env: dict) -> str:
    """A file-name stem naming the hardware, e.g. "h100-80gb-hbm3" or "cpu-amd-epyc-2c" (2 cores)."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower().replace("nvidia", "")).strip("-")
    if env["device_type"] == "cpu":
        return f"cpu-{slug}-{env.get('cpu_count') or 1}c"
    return slug


# ----------------------------------------------------------------------------------------
# Work model
# ----------------------------------------------------------------------------------------

PASSES = ("fwd", "bwd", "fwd_bwd")
PASS_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def bytes_moved(shape: Shape, dtype: torch.dtype, pass_: str) -> int:
    """Minimum memory traffic of the op (see the module docstring); the same for every provider."""
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

    timing=False is for parity checks only: it keeps Triton on CPU (Triton's interpreter,
    far too slow to time) when the backend is available.
    """
    out = []
    for backend in dispatch.available_backends():
        if backend == "reference":
            continue
        module = dispatch.kernels(backend)
        provider = Provider(f"ours-{backend}", "ours", "ours", functools.partial(_ours, backend), dtypes=tuple(module.DTYPES))
        if backend == "triton" and device.type != "cuda" and timing:
            provider.skip = "Triton without CUDA runs only in its interpreter: parity checks only, not timed"
        elif not dispatch._device_ok(backend, device):
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
# Cases, parity, timing
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
        return reference_pair(_reference_outputs_and_grads, (*self.inputs, *self.grad_outputs), scale=self.scale)


def _outputs_and_grads(fn: AttentionFn, inputs, grad_outputs, scale) -> tuple:
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    with torch.enable_grad():
        outputs = fn(*leaves, scale)
        grads = torch.autograd.grad(outputs, leaves, grad_outputs)
    return (*(o.detach() for o in outputs), *grads)


def _reference_outputs_and_grads(q_s, k_s, v_s, q_x, k_x, v_x, do_s, do_x, scale):
    return _outputs_and_grads(bilateral_attention_reference, (q_s, k_s, v_s, q_x, k_x, v_x), (do_s, do_x), scale)


GRAD_NAMES = ("o_s", "o_x", "dq_s", "dk_s", "dv_s", "dq_x", "dk_x", "dv_x")


def check_parity(provider: Provider, case: Case, with_grads: bool) -> None:
    """Assert the provider matches the reference on this case (outputs, and gradients)."""
    with provider.context():
        if with_grads:
            actual = _outputs_and_grads(provider.fn, case.inputs, case.grad_outputs, case.scale)
            same, exact = case.reference_gradients
            names = GRAD_NAMES
        else:
            with torch.no_grad():
                actual = provider.fn(*case.inputs, case.scale)
            same, exact = case.reference_forward
            names = GRAD_NAMES[:2]
    for name, a, s, e in zip(names, actual, same, exact, strict=True):
        assert_close(a, s, e, case.dtype, f"{provider.name} {case.shape.label} {DTYPE_NAMES[case.dtype]} {name}")


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    budget_s: float = 0.3,
    min_repeats: int = 5,
    max_repeats: int = 200,
    warmup: int = 3,
) -> list[float]:
    """Per-call times in seconds, after warm-up.

    CUDA: `warmup` synchronised calls (compilation, autotuning), then triton's do_bench
    (CUDA events, L2 cache cleared before each call; its own warm-up of 25 ms, then
    `budget_s` of timed calls). CPU: one warm-up call (a row's parity check has already run
    the provider once), then perf_counter per call until `budget_s` has passed (at least
    `min_repeats`, at most `max_repeats` calls).
    """
    for _ in range(warmup if device.type == "cuda" else min(warmup, 1)):
        fn()
    _synchronize(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        try:
            times_ms = do_bench(fn, warmup=25, rep=max(1, int(budget_s * 1000)), return_mode="all")
        except (AssertionError, TypeError, ValueError):  # a triton whose do_bench has no return_mode="all"
            times_ms = _cuda_event_times(fn, device, budget_s)
        return [t / 1e3 for t in times_ms]
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(samples) < max_repeats and (len(samples) < min_repeats or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def _cuda_event_times(fn: Callable[[], object], device: torch.device, budget_s: float) -> list[float]:
    """Milliseconds per call from CUDA events, L2 flushed before each call (do_bench's method)."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    repeats = max(5, min(1000, int(budget_s * 1e3 / max(start.elapsed_time(end) / 5, 1e-3))))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for begin, finish in events:
        flush.zero_()
        begin.record()
        fn()
        finish.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(finish) for begin, finish in events]


def _rss_bytes() -> tuple[int, int]:
    with open("/proc/self/status", encoding="utf-8") as f:
        status = f.read()
    fields = {k: int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}
    return fields["VmRSS"], fields["VmHWM"]


def peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[Optional[int], str]:
    """(bytes allocated above the starting point during one call, how it was measured).

    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): growth of the process's peak RSS
    after resetting it (clear_refs) and returning freed heap to the OS (malloc_trim); an
    approximation (None where /proc cannot be used).
    """
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        _synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return peak, "torch.cuda.max_memory_allocated"
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")
        base, _ = _rss_bytes()
        result = fn()
        _, high = _rss_bytes()
        del result
    except OSError:
        return None, "not measured (no /proc/self/clear_refs)"
    return max(0, high - base), "peak RSS growth (approximate)"


# ----------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    shape: str
    B: int
    H: int
    M: int
    N: int
    D: int
    scale_factor: int
    dtype: str
    pass_: str
    provider: str
    kind: str
    family: str
    status: str = "ok"  # "ok", "skipped", "failed"
    note: str = ""
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    repeats: int = 0
    bytes: int = 0
    flops: int = 0
    gbps: Optional[float] = None
    pct_roofline: Optional[float] = None
    tflops: Optional[float] = None
    speedup: Optional[float] = None  # best baseline time / this time
    best_baseline: Optional[str] = None
    speedup_vs_sdpa: Optional[float] = None  # best SDPA backend time / this time
    peak_mem_bytes: Optional[int] = None
    peak_mem_method: str = ""
    samples_s: list = dataclasses.field(default_factory=list, repr=False)

    def metrics(self) -> dict:
        """Everything but the raw samples (the JSON and pytest-benchmark extra_info)."""
        out = dataclasses.asdict(self)
        out.pop("samples_s")
        out["pass"] = out.pop("pass_")
        return out


class BenchSession:
    """Measures rows on demand and remembers them, so baselines are measured once.

    A row's speedup needs the baselines of its group (shape, dtype, pass): `row()` measures
    them first when they are not measured yet.
    """

    def __init__(
        self,
        device: torch.device,
        providers: Sequence[Provider],
        *,
        budget_s: float = 0.25,
        peak_gbps: Optional[float] = None,
        measure_memory: bool = True,
    ):
        self.device = device
        self.providers = {p.name: p for p in providers}
        self.budget_s = budget_s
        self.peak_gbps = peak_gbps
        self.measure_memory = measure_memory
        self._cases: dict = {}
        self._parity: dict = {}
        self._rows: dict = {}

    def case(self, shape: Shape, dtype: torch.dtype) -> Case:
        key = (shape, dtype)
        if key not in self._cases:
            self._cases = {k: v for k, v in self._cases.items() if k[0] == shape}  # keep one shape alive
            self._cases[key] = Case.make(shape, dtype, self.device)
        return self._cases[key]

    def parity(self, provider: Provider, shape: Shape, dtype: torch.dtype, with_grads: bool) -> Optional[str]:
        """None when the provider matches the reference, else the failure message."""
        key = (provider.name, shape, dtype, with_grads)
        if key not in self._parity:
            try:
                check_parity(provider, self.case(shape, dtype), with_grads)
                self._parity[key] = None
            except AssertionError as error:
                self._parity[key] = f"parity: {error}"
        return self._parity[key]

    def _measure(self, shape: Shape, dtype: torch.dtype, pass_: str, provider: Provider) -> Row:
        row = Row(
            shape.label, shape.B, shape.H, shape.M, shape.N, shape.D, shape.scale, DTYPE_NAMES[dtype], pass_,
            provider.name, provider.kind, provider.family,
            bytes=bytes_moved(shape, dtype, pass_), flops=flops(shape, pass_),
        )  # fmt: skip
        reason = skip_reason(provider, dtype, pass_)
        if reason:
            row.status, row.note = "skipped", reason
            return row
        try:
            failure = self.parity(provider, shape, dtype, with_grads=pass_ != "fwd")
            if failure:
                row.status, row.note = "failed", failure
                return row
            with provider.context():
                fn = make_callable(provider, self.case(shape, dtype), pass_)
                samples = measure(fn, self.device, budget_s=self.budget_s)
                if self.measure_memory:
                    row.peak_mem_bytes, row.peak_mem_method = peak_memory(fn, self.device)
            del fn
        except Exception as error:  # noqa: BLE001 - a baseline that cannot run here is skipped; ours failed
            message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"
            row.status, row.note = ("failed", message) if provider.kind == "ours" else ("skipped", message)
            return row
        median = statistics.median(samples)
        q = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median, median, median]
        row.samples_s = samples
        row.repeats = len(samples)
        row.median_ms, row.min_ms, row.iqr_ms = median * 1e3, min(samples) * 1e3, (q[2] - q[0]) * 1e3
        row.gbps = gbps(row.bytes, median)
        row.pct_roofline = pct_of_roofline(row.gbps, self.peak_gbps)
        row.tflops = row.flops / median / 1e12
        return row

    def row(self, shape: Shape, dtype: torch.dtype, pass_: str, provider_name: str, *, with_speedup: bool = True) -> Row:
        key = (shape, dtype, pass_, provider_name)
        if key not in self._rows:
            self._rows[key] = self._measure(shape, dtype, pass_, self.providers[provider_name])
        row = self._rows[key]
        if with_speedup and row.status == "ok":
            baselines = [
                self.row(shape, dtype, pass_, p.name, with_speedup=False)
                for p in self.providers.values()
                if p.kind == "baseline"
            ]
            add_speedup(row, baselines)
        return row

    def rows(self) -> list[Row]:
        return list(self._rows.values())


def add_speedup(row: Row, baselines: Iterable[Row]) -> None:
    """Speedup of a row against the best baseline and the best SDPA backend of its group."""
    measured = [b for b in baselines if b.status == "ok" and b.median_ms]
    if measured:
        best = min(measured, key=lambda b: b.median_ms)
        row.speedup, row.best_baseline = best.median_ms / row.median_ms, best.provider
    sdpa = [b.median_ms for b in measured if b.family == "sdpa"]
    if sdpa:
        row.speedup_vs_sdpa = min(sdpa) / row.median_ms


# ----------------------------------------------------------------------------------------
# Whole model
# ----------------------------------------------------------------------------------------

MODEL_VARIANTS = ("tiny", "small", "base")


class ModelsUnavailable(Exception):
    pass


def _spatialformer():
    try:
        import spatialformer  # noqa: F401  (registers the models in timm)
        import timm
    except Exception as error:
        raise ModelsUnavailable(f"spatialformer is not importable yet ({type(error).__name__}: {error})") from error
    return timm


def model_backends(device: torch.device) -> list[str]:
    """The model paths to compare: each kernel backend that runs on the device, and the reference."""
    kernels = [
        b
        for b in dispatch.available_backends()
        if b != "reference" and dispatch._device_ok(b, device) and not (b == "triton" and device.type != "cuda")
    ]
    return kernels + ["reference"]


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_model_parity(variant: str, backend: str, device: torch.device, dtype: torch.dtype, batch: int, img_size: int) -> None:
    """Logits of the `backend` path match the reference path (same weights) under the tolerance rule."""
    timm = _spatialformer()
    torch.manual_seed(0)
    reference = timm.create_model(f"spatialformer_{variant}", backend="reference").to(device).eval()
    model = timm.create_model(f"spatialformer_{variant}", backend=backend).to(device).eval()
    model.load_state_dict(reference.state_dict())
    images = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        with _autocast(device, dtype):
            actual, same = model(images), reference(images)
        exact = reference.double()(images.double())
    assert_close(actual.to(same.dtype), same, exact, dtype if dtype != torch.float32 else torch.float32, f"spatialformer_{variant} logits ({backend})")


@dataclasses.dataclass
class ModelRow:
    model: str
    mode: str  # "inference" or "train"
    backend: str
    batch: int
    img_size: int
    dtype: str
    median_ms: float
    images_per_s: float
    repeats: int
    peak_mem_bytes: Optional[int]
    peak_mem_method: str
    speedup: Optional[float] = None  # reference time / this time
    samples_s: list = dataclasses.field(default_factory=list, repr=False)

    def metrics(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("samples_s")
        return out


def bench_model(
    variant: str, backend: str, mode: str, device: torch.device, dtype: torch.dtype, batch: int, img_size: int,
    budget_s: float = 1.0,
) -> ModelRow:  # fmt: skip
    """Images per second of SpatialFormer-<variant>: inference forward, or a training step
    (forward, cross-entropy, backward, AdamW step)."""
    timm = _spatialformer()
    torch.manual_seed(0)
    model = timm.create_model(f"spatialformer_{variant}", backend=backend).to(device)
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    if mode == "inference":
        model.eval()

        def step():
            with torch.no_grad(), _autocast(device, dtype):
                return model(images)

    elif mode == "train":
        model.train()
        labels = torch.randint(0, model.num_classes, (batch,), device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, dtype):
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()

    else:
        raise ValueError(f"mode must be 'inference' or 'train', got {mode!r}")
    samples = measure(step, device, budget_s=budget_s, min_repeats=3, warmup=2)
    peak, method = peak_memory(step, device)
    median = statistics.median(samples)
    return ModelRow(
        f"spatialformer_{variant}", mode, backend, batch, img_size, DTYPE_NAMES[dtype], median * 1e3,
        batch / median, len(samples), peak, method, samples_s=samples,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------
# Output: table, JSON, plot
# ----------------------------------------------------------------------------------------


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    """Measured and failed rows as a table; skipped providers once each, with the reason, below it."""
    header = ("shape", "dims", "dtype", "pass", "provider", "median ms", "GB/s", "% roof", "TFLOP/s", "speedup", "vs SDPA", "peak MiB", "note")
    lines = [header]
    for r in rows:
        if r.status == "skipped":
            continue
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        lines.append((
            r.shape, f"B{r.B} H{r.H} M{r.M} N{r.N} D{r.D}", r.dtype, r.pass_, r.provider,
            _fmt(r.median_ms, ".3f"), _fmt(r.gbps, ".2f"), _fmt(r.pct_roofline, ".1f"), _fmt(r.tflops, ".3f"),
            _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""), _fmt(r.speedup_vs_sdpa, ".2f") + ("x" if r.speedup_vs_sdpa else ""),
            _fmt(mem, ".1f"), r.note if r.status != "ok" else "",
        ))  # fmt: skip
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header) - 1)]
    out = []
    for i, line in enumerate(lines):
        out.append(("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + line[-1]).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  ----")
    skipped: dict = {}
    for r in rows:
        if r.status == "skipped":
            skipped.setdefault((r.provider, r.note), set()).add(r.pass_)
    for (provider, note), passes in skipped.items():
        out.append(f"skipped {provider} ({', '.join(p for p in PASSES if p in passes)}): {note}")
    return "\n".join(out)


def plot(rows: Sequence[Row], path: Path, title: str) -> Path:
    """Time vs N per provider, one panel per (pass, dtype); matplotlib is imported here only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in rows if r.status == "ok"]
    panels = sorted({(r.pass_, r.dtype) for r in ok}, key=lambda p: (PASSES.index(p[0]), p[1]))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.5), squeeze=False)
    for ax, (pass_, dtype) in zip(axes[0], panels):
        subset = [r for r in ok if r.pass_ == pass_ and r.dtype == dtype]
        for provider in dict.fromkeys(r.provider for r in subset):
            points = sorted((r.N, r.median_ms) for r in subset if r.provider == provider)
            style = "-o" if any(r.kind == "ours" for r in subset if r.provider == provider) else "--."
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=provider)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ticks = sorted({(r.N, r.shape.split("/")[0]) for r in subset})
        ax.set_xticks([n for n, _ in ticks], [f"{n}\n{name}" for n, name in ticks], fontsize=6)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("N (image tokens); B and H differ per shape")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{PASS_LABELS[pass_]}, {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spatialformer-bench",
        description="Benchmark bilateral cross-attention against the reference and every baseline "
        "(parity first, then time). Writes table.txt, results.json and plot.png.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default ./bench-out/)")
    parser.add_argument("--quick", action="store_true", help="two small shapes, short timing, no torch.compile: seconds")
    parser.add_argument("--shapes", nargs="+", choices=SHAPE_NAMES, help="DESIGN.md shapes (default: all)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, help="default: all three")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", nargs="+", help="provider names (default: all that run here)")
    parser.add_argument("--scale", type=int, help=f"divide B and N by this (default {CPU_SCALE} on CPU, 1 on CUDA)")
    parser.add_argument("--budget", type=float, help="timed seconds per row (default 0.25, --quick 0.05)")
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth for %% of roofline (overrides the table)")
    parser.add_argument("--measure-bandwidth", action="store_true", help="use a measured copy bandwidth as the roofline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default="auto", help="CPU threads: a number, or auto (fewer when other processes keep cores busy)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(_parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests)


def _main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.quick:
        shape_names = args.shapes or ["cls224-stage1", "det800x1344-stage1"]
        scale = args.scale or (4 * default_scale(device) if device.type == "cpu" else 1)
        budget = args.budget or 0.05
    else:
        shape_names, scale, budget = args.shapes, args.scale, args.budget or 0.25
    shapes = shapes_for(device, shape_names, scale)
    passes = args.passes or list(PASSES)
    dtype_names = args.dtypes or (["bf16"] if device.type == "cuda" else ["fp32"])
    all_providers = providers_for(device)
    known = {p.name for p in all_providers}
    wanted = args.providers or default_provider_names(device, args.quick)
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise SystemExit(f"unknown provider(s) {unknown}; known here: {', '.join(sorted(known))}")
    providers = [p for p in all_providers if p.name in wanted]
    if device.type == "cpu":
        torch.set_num_threads(choose_threads(args.threads))
    env = environment(device, args.peak_gbps, args.measure_bandwidth)
    session = BenchSession(device, providers, budget_s=budget, peak_gbps=env["roofline"]["peak_gbps"])
    note = scaling_note(shapes)

    print(f"spatialformer-bench on {env['device_name']} ({device.type}), torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, commit {env['git_commit']}")  # fmt: skip
    print(f"backends available: {', '.join(env['backends'])}; providers: {', '.join(p.name for p in providers)}")
    print(f"shapes: {note}")
    if device.type == "cpu":
        print(f"roofline: {env['roofline']['source']}")
        print(f"threads: {env['cpu_threads']} (--threads {args.threads}); other processes keep {env['busy_cores']} of "
              f"{env['cpu_count']} cores busy (load average {env.get('load_average_1min')}): they slow every row")  # fmt: skip

    jobs = [(s, DTYPES[d], p, prov.name) for s in shapes for d in dtype_names for p in passes for prov in providers]
    try:
        from tqdm import tqdm

        progress = tqdm(jobs, desc="benchmarking", unit="row", disable=args.no_progress, file=sys.stderr)
    except ImportError:
        progress = jobs
    rows = []
    for shape, dtype, pass_, name in progress:
        if hasattr(progress, "set_postfix_str"):
            progress.set_postfix_str(f"{shape.label} {DTYPE_NAMES[dtype]} {pass_} {name}")
        rows.append(session.row(shape, dtype, pass_, name))

    table = format_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.txt").write_text(f"# {note}\n{table}\n", encoding="utf-8")
    result = {
        "environment": env,
        "config": {
            "shapes": [dataclasses.asdict(s) for s in shapes],
            "scaling": note,
            "dtypes": dtype_names,
            "passes": passes,
            "providers": [p.name for p in providers],
            "budget_s": budget,
            "timing": "triton.testing.do_bench, L2 flushed" if device.type == "cuda" else "perf_counter per call, median",
            "work_model": "bytes and FLOPs as in spatialformer_kernels.bench's docstring",
        },
        "rows": [r.metrics() for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    title = f"{env['device_name']} - {note}"
    plot(rows, args.out / "plot.png", title)
    print(f"wrote {args.out / 'table.txt'}, {args.out / 'results.json'}, {args.out / 'plot.png'}")
    failed = [r for r in rows if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.shape} {r.dtype} {r.pass_} {r.provider}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
