"""Launch a Triton kernel with less host work than `kernel[grid](...)` on repeated calls.

`JITFunction.run` binds and specialises every argument, builds the cache key and looks the
compiled kernel up on every call: on the H200 machine's CPU, 50 to 70 us per launch, more
than the GPU time of most launches at the benchmark shapes (seven launches per forward +
backward; benchmarks/results/gpu-check-h200/host-profile/). `launch` does that once per
*call signature* and then calls the compiled kernel's launcher directly, as `run` itself
does after its lookup.

A call signature determines Triton's specialisation of the call: the keyword arguments
(constexprs and launch options) with their values, every scalar argument by value (Triton
specialises ints on == 1, divisibility by 16 and width), every tensor by dtype and 16-byte
alignment of its data pointer (Triton's "D" attribute), and the device. A signature seen
before reuses that call's compiled kernel, with the parameters left to their defaults
filled in as `run` binds them.

The first call of a signature, a launch hook (a profiler's), the interpreter and anything
that is not a JITFunction (the static check's recorders) take the plain path.
"""
from __future__ import annotations

import os

import torch
import triton
from triton.runtime.jit import JITFunction

from .configs import INTERPRET

# SPATIALFORMER_TRITON_DIRECT_LAUNCH=0 sends every launch through `kernel[grid](...)`.
ENABLED = not INTERPRET and os.environ.get("SPATIALFORMER_TRITON_DIRECT_LAUNCH", "1") != "0"
# Signatures kept per kernel (scalar values are part of a signature: one per shape); the
# cache starts over when it fills.
MAX_SIGNATURES = 1024
_SCALARS = (int, float, bool, str, type(None))


class _Compiled:
    """A compiled kernel and the trailing parameters (after the positional ones) in bound order."""

    __slots__ = ("kernel", "tail")

    def __init__(self, kernel, tail: tuple):
        self.kernel, self.tail = kernel, tail


_signatures: dict = {}  # JITFunction -> {signature: _Compiled}


def signature(device: torch.device, args: tuple, kwargs: dict) -> tuple:
    """What decides Triton's specialisation of a call (module docstring)."""
    return (
        device.index,
        tuple(kwargs.items()),
        tuple(a if type(a) in _SCALARS else (a.dtype, a.data_ptr() % 16 == 0) for a in args),
    )


def _trailing(kernel: JITFunction, n_positional: int, kwargs: dict):
    """The parameters after the positional ones, in order: passed by keyword or defaulted; None
    when one has neither (the plain path then raises Triton's own error)."""
    tail = []
    for param in kernel.params[n_positional:]:
        if param.name in kwargs:
            tail.append(kwargs[param.name])
        elif param.has_default:
            tail.append(param.default)
        else:
            return None
    return tuple(tail)


def _current_stream(device_index: int) -> int:
    return triton.runtime.driver.active.get_current_stream(device_index)


def _hooked() -> bool:
    """Whether a launch hook is registered (Triton keeps them in HookChains, empty by default)."""
    runtime = triton.knobs.runtime
    return any(hook is not None and bool(getattr(hook, "calls", True))
               for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook))


def launch(kernel, grid: tuple, device: torch.device, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on `device`'s current stream; see the module docstring."""
    if not ENABLED or not isinstance(kernel, JITFunction) or device.type != "cuda" or _hooked():
        kernel[grid](*args, **kwargs)
        return
    known = _signatures.setdefault(kernel, {})
    key = signature(device, args, kwargs)
    hit = known.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)
        tail = _trailing(kernel, len(args), kwargs)
        if tail is not None and all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            if len(known) >= MAX_SIGNATURES:
                known.clear()
            known[key] = _Compiled(compiled, tail)
        return
    compiled = hit.kernel
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    stream = _current_stream(device.index)
    compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                 *args, *hit.tail)
