"""The one dispatch point: which implementation runs for a backend name and a device.

Backends:
- "reference": the pure-PyTorch reference (spatialformer_kernels.reference), any device.
- "triton": the fused Triton kernels (spatialformer_kernels.backends.triton), CUDA
  tensors; CPU tensors too when TRITON_INTERPRET=1 (Triton's interpreter, used by tests).
- "cpu": the C++ kernel (spatialformer_kernels.backends.cpu), CPU tensors.
- "auto": the fastest available kernel for the tensors' device and dtype, else "reference".

Each kernel backend module provides the same four functions (all outputs are fresh,
contiguous tensors; LSEs are float64 natural-log (see reference.py), -inf for a row with no kept key):

    bilateral_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask) -> (o_s, o_x, lse_s, lse_x)
    bilateral_bwd(do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale,
                  image_mask) -> (dq_s, dk_s, dv_s, dq_x, dk_x, dv_x)
    cross_fwd(q, k, v, scale, key_mask, attn_mask) -> (o, lse)
    cross_bwd(do, q, k, v, o, lse, scale, key_mask, attn_mask) -> (dq, dk, dv)

(key_mask: bool [B, Lk] or None; attn_mask: bool [B, Lq, Lk], any strides, or None)
and a tuple DTYPES of the dtypes it computes.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from types import ModuleType

import torch

BACKENDS = ("auto", "reference", "triton", "cpu")
_KERNEL_MODULES = {
    "triton": "spatialformer_kernels.backends.triton",
    "cpu": "spatialformer_kernels.backends.cpu",
}


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _load(backend: str) -> ModuleType | None:
    """Import a kernel backend once; None (with one warning) when it cannot run here."""
    try:
        module = importlib.import_module(_KERNEL_MODULES[backend])
        if not module.is_available():
            return None
        return module
    except Exception as error:  # an optional backend must never break the import of the package
        warnings.warn(f"spatialformer_kernels: the {backend!r} backend is unavailable: {error}", stacklevel=3)
        return None


def _device_ok(backend: str, device: torch.device) -> bool:
    if backend == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreter_enabled())
    if backend == "cpu":
        return device.type == "cpu"
    return True


@torch.compiler.assume_constant_result
def available_backends() -> list[str]:
    """The backends this machine can run, e.g. ["reference", "triton", "cpu"]."""
    return ["reference"] + [name for name in _KERNEL_MODULES if _load(name) is not None]


def runnable_backends(device: torch.device | str) -> list[str]:
    """The backends that can run tensors on `device` here, "reference" first.

    `available_backends()` lists what is installed and loadable; this narrows it to a device:
    on a machine without a GPU, runnable_backends("cpu") is ["reference", "cpu"], plus
    "triton" only when Triton's interpreter is enabled (TRITON_INTERPRET=1, as the tests do).
    """
    device = torch.device(device)
    return [name for name in available_backends() if _device_ok(name, device)]


# Constant under torch.compile: it depends only on Python values and on what this machine can run.
@torch.compiler.assume_constant_result
def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn a backend name into the concrete backend for these inputs, or raise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "reference":
        return backend
    available = available_backends()
    if backend == "auto":
        preferred = ("triton",) if device.type == "cuda" else ("cpu",)
        for name in preferred:
            if name in available and dtype in _load(name).DTYPES:
                return name
        return "reference"
    if backend not in available:
        raise RuntimeError(
            f"backend {backend!r} is not available on this machine (available: {', '.join(available)})"
        )
    if not _device_ok(backend, device):
        hint = " (set TRITON_INTERPRET=1 before importing triton to run it on CPU)" if backend == "triton" else ""
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors{hint}")
    if dtype not in _load(backend).DTYPES:
        raise TypeError(f"backend {backend!r} does not support dtype {dtype}")
    return backend


def kernels(backend: str) -> ModuleType:
    """The module implementing the contract for a concrete backend: an available kernel
    backend's, or `reference`'s."""
    if backend == "reference":
        from . import reference

        return reference
    module = _load(backend)
    if module is None:
        raise RuntimeError(f"backend {backend!r} is not available on this machine")
    return module


def op_kernels(backend: str, *tensors: torch.Tensor) -> ModuleType:
    """What a registered op runs for a backend name, "auto" included: resolved for the first
    tensor's device and dtype, with the reference for inputs that are empty (no kernel launches
    on them). The public functions resolve the name before they call the op; a caller of
    torch.ops.spatialformer.* that cannot (TorchScript) passes "auto" or any other name."""
    first = tensors[0]
    name = resolve_backend(backend, first.device, first.dtype)
    if any(t.numel() == 0 for t in tensors):
        name = "reference"
    return kernels(name)


def eager_call_ok(*tensors: torch.Tensor | None) -> bool:
    """Whether a public function may call its kernels directly instead of through its
    torch.library op (for inference) or through a plain torch.autograd.Function (for training).

    The op adds what eager calls do not need (a single node for torch.compile and torch.export,
    visibility to dispatch modes such as FlopCounterMode and to functorch transforms) and costs
    host time per call: about 100 us for a forward + backward on a 2-core CPU (benchmarks/host_cost.py),
    more after a large kernel has flushed the interpreter's data from the caches; at the GPU
    benchmark shapes that is comparable to the kernels' own time. So:
    only in eager mode, with plain tensors, and no dispatch mode, function mode or functorch
    transform active. Anything else takes the op.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    present = [t for t in tensors if t is not None]
    if any(type(t) is not torch.Tensor for t in present):  # FakeTensor, FunctionalTensor, DTensor, ...
        return False
    return (
        torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and torch._C._functorch.peek_interpreter_stack() is None
    )


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
