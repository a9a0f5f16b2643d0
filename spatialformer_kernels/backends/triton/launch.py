"""Launch plans: the Triton backend's host work per call, done once per call signature.

A launcher (fused.attention_fwd and _bwd, common.reduce_splits) turns its arguments into
allocations and kernel launches by arithmetic on sizes, strides, dtypes and flags, and
Triton's `kernel[grid](...)` then binds and specialises every argument and looks the
compiled kernel up. On a 2-core CPU that was 46 us of launcher and 19 us of per-launch
signatures per cls224-stage1 forward call before plans (perf_model.host_cost, commit c7b0ad1),
more than the GPU time of most launches.

`run(launcher, args)` records the launcher's work on the first call of a signature as a
plan: the allocations (shape and dtype: `torch.empty` is the only torch operation a
plannable launcher may run) and, per launch, the kernel, the grid, the keyword arguments
and where each positional argument comes from (an argument of the call, an allocation or a
constant). It then executes the plan. Later calls of the signature allocate and launch
from the plan, calling each kernel's compiled launcher directly as `JITFunction.run` does
after its lookup.

The signature is the device and, per argument, a tensor's shape, strides, dtype and the
16-byte alignment of its data pointer (Triton's "D" attribute), or a non-tensor's type and
value.
It determines everything a launcher computes (its integers come from sizes and strides)
and every specialisation Triton makes (fresh allocations are 16-byte aligned). What else
a launch depends on drops the plans: a forced config (configs.forced_config, counted by
configs.generation) and the static check's stubbed kernels.

A launcher that runs other torch operations (the wide-head backward reduces its softmax
statistics with torch between launches) gets no plan: it runs as it is on every call. So
does one called under `no_dispatch()` (a recording would not see its operations) and one
whose launches take anything but tensors and plain constants. So do all launches with
SPATIALFORMER_TRITON_DIRECT_LAUNCH=0. Launch hooks (a profiler's), kernels with pre-run
hooks and the interpreter take `kernel[grid](...)` with the plan's arguments.

A plan makes each allocation at the launch that first uses it and drops a workspace after
the last, so peak memory is the launcher's own. Its limits: a float argument is part of the
signature, so a softmax scale that changes on every call records a plan on every call; and
a plan assumes that fresh allocations are 16-byte aligned, as those of PyTorch's CUDA
allocators are (a custom allocator that breaks this gets a misaligned-address error, not a
wrong result).
"""
from __future__ import annotations

import contextlib
import operator
import os
import threading

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.jit import JITFunction

from . import configs
from .configs import INTERPRET

# SPATIALFORMER_TRITON_DIRECT_LAUNCH=0: no plans; every launcher runs and every launch
# goes through `kernel[grid](...)`.
ENABLED = os.environ.get("SPATIALFORMER_TRITON_DIRECT_LAUNCH", "1") != "0"
# Plans kept (one per signature: shapes are part of it); the cache starts over when full.
MAX_PLANS = 1024

# Devices whose compiled kernels are launched directly (perf_model.host_cost adds "meta").
DIRECT_DEVICE_TYPES = ("cuda",)

_plans: dict = {}
_configs_generation = configs.generation  # the forced configs the plans were made under
_state = threading.local()  # .recording: the _Recording of a launcher being recorded, if any


def clear() -> None:
    """Forget every plan (their launch configs or kernels may have changed)."""
    _plans.clear()


class _NotPlannable(Exception):
    pass


class _Recording(TorchDispatchMode):
    """Collects a launcher's allocations (torch.empty, contiguous) and launches; any other
    torch operation ends the recording (_NotPlannable)."""

    def __init__(self):
        super().__init__()
        self.allocations: list = []
        self.launches: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.detach.default and self.allocations and args[0] is self.allocations[-1]:
            # a factory function's result comes back through the mode detached: the launcher
            # holds the detached tensor
            self.allocations[-1] = func(*args, **kwargs)
            return self.allocations[-1]
        if func is not torch.ops.aten.empty.memory_format or kwargs.get("memory_format") not in (
                None, torch.contiguous_format):
            raise _NotPlannable(str(func))
        out = func(*args, **kwargs)
        self.allocations.append(out)
        return out


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on the current device and stream, or a step of the plan
    being recorded (it runs when the plan does)."""
    recording = getattr(_state, "recording", None)
    if recording is not None:
        recording.launches.append((kernel, grid, args, kwargs))
        return
    kernel[grid](*args, **kwargs)


def _signature(launcher, args: tuple) -> tuple:
    """What decides a launcher's work and Triton's specialisation of its launches (module docstring)."""
    key, device = [launcher], None
    for a in args:
        if isinstance(a, torch.Tensor):
            if device is None:
                device = a.device
            key.append((a.shape, a.stride(), a.dtype, a.data_ptr() % 16 == 0))
        else:
            key.append((type(a), a))  # 1 and 1.0 are equal keys, not the same specialisation
    key.append(device)
    return tuple(key)


def _picker(indices: list):
    """values -> tuple(values[i] for i in indices), in C."""
    if not indices:
        return lambda values: ()
    if len(indices) == 1:
        index = indices[0]
        return lambda values: (values[index],)
    return operator.itemgetter(*indices)


def _segment_picker(entries: list):
    """values -> the launch's arguments, from `entries`: per argument, (True, index into the
    call's values) or (False, a constant of the plan). Runs of values are picked in C and runs
    of constants kept as tuples, so a call joins a few tuples (a launch's pointers, then its
    strides and flags) where it would pick every constant one by one."""
    runs: list = []
    for is_value, item in entries:
        if runs and runs[-1][0] == is_value:
            runs[-1][1].append(item)
        else:
            runs.append((is_value, [item]))
    parts = [_picker(items) if is_value else tuple(items) for is_value, items in runs]
    if not parts:
        return lambda values: ()
    if len(parts) == 1:
        part = parts[0]
        return part if callable(part) else (lambda values: part)
    if len(parts) == 2 and callable(parts[0]) and not callable(parts[1]):
        pick, tail = parts  # the usual shape: tensors first, then integers and flags
        return lambda values: pick(values) + tail

    def pick(values):
        out = ()
        for part in parts:
            out += part(values) if callable(part) else part
        return out
    return pick


def _trailing(kernel: JITFunction, n_positional: int, kwargs: dict):
    """The parameters after the positional ones, in order: passed by keyword or defaulted;
    None when one has neither (Triton's own path then raises its error)."""
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
    for hook in (runtime.launch_enter_hook, runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _Step:
    """One launch of a plan: `kernel[grid](*args, **kwargs)` with its positional arguments
    picked from the call's values and the plan's constants (`_segment_picker` entries); once
    Triton has returned its compiled kernel, that kernel's launcher with every parameter
    picked (`pick_params`: the positional arguments, then the later parameters passed by
    keyword or defaulted; None when a JITFunction's parameter has neither, or for another
    kernel object). `allocate`: the (value index, shape, dtype) of the allocations first used
    here; `release`: the value indices last used here and not returned, dropped after it (peak
    memory as the launcher's own)."""

    __slots__ = ("kernel", "grid", "pick_args", "kwargs", "pick_params", "compiled", "allocate", "release")

    def __init__(self, kernel, grid: tuple, arg_entries: list, kwargs: dict, param_entries: list | None):
        self.kernel, self.grid, self.kwargs = kernel, grid, kwargs
        self.pick_args = _segment_picker(arg_entries)
        self.pick_params = None if param_entries is None else _segment_picker(param_entries)
        self.compiled = None
        self.allocate = self.release = ()

    def keep(self, compiled) -> None:
        """Launch directly from now on, when Triton returned a compiled kernel of the shape
        JITFunction.run uses and the kernel has no pre-run hook (which only Triton's own
        path calls)."""
        if INTERPRET or self.pick_params is None or getattr(self.kernel, "pre_run_hooks", None):
            return
        if all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata")):
            self.compiled = compiled


class Plan:
    """A launcher's allocations and launches for one signature (module docstring). The values
    of a call: its arguments, then the allocations (made by the steps that first use them);
    the constants are the steps' own."""

    __slots__ = ("n_allocations", "steps", "pick_result", "device", "direct_device", "gpu_index")

    def __init__(self, n_allocations: int, steps: tuple, pick_result, device: torch.device):
        self.n_allocations, self.steps = n_allocations, steps
        self.pick_result, self.device = pick_result, device
        self.direct_device = device.type in DIRECT_DEVICE_TYPES
        # `_other_gpu`'s test with the device type read once per plan: torch.device.type builds
        # a string on every read (0.5 us on a 2-core AMD EPYC; the forward call measured 1.5-2 us
        # slower through _other_gpu, benchmarks/host_cost.py, three interleaved rounds)
        self.gpu_index = device.index if device.type == "cuda" else None

    def execute(self, args: tuple, allocated: list | None = None):
        """The launches on `args` (the recording's allocations on the first call); returns the
        launcher's result."""
        fresh = allocated is None
        values = [*args, *(allocated or (None,) * self.n_allocations)]
        gpu = self.gpu_index
        if gpu is not None and gpu != torch.cuda.current_device():
            # launch on the arguments' GPU (device_guard, without a null context)
            with torch.cuda.device(self.device):
                self._launch(values, fresh)
        else:
            self._launch(values, fresh)
        return self.pick_result(values)

    def _launch(self, values: list, fresh: bool) -> None:
        device = self.device
        direct = ENABLED and self.direct_device and not _hooked()
        stream = _current_stream(device.index) if direct else None
        for step in self.steps:
            if fresh:
                # sizes as separate arguments: torch's argument parser takes them faster than a tuple
                for index, shape, dtype in step.allocate:
                    values[index] = torch.empty(*shape, dtype=dtype, device=device)
            compiled = step.compiled
            if direct and compiled is not None:
                grid = step.grid
                compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata,
                             None, None, None, *step.pick_params(values))
            else:
                compiled = step.kernel[step.grid](*step.pick_args(values), **step.kwargs)
                if direct and compiled is not None and step.compiled is None:
                    step.keep(compiled)
            for index in step.release:
                values[index] = None


_MISSING = object()
_python_dispatch_excluded, _PYTHON_KEY = torch._C._dispatch_tls_is_dispatch_key_excluded, torch._C.DispatchKey.Python
_CONSTANTS = (int, float, bool, str, type(None), torch.dtype)  # what a plan may keep from its first call


def run(launcher, args: tuple):
    """launcher(*args), from the plan of the call's signature (module docstring)."""
    global _configs_generation
    if not ENABLED or getattr(_state, "recording", None) is not None:
        return launcher(*args)  # called from a launcher being recorded: part of its plan
    if configs.generation != _configs_generation:  # a forced config came or went
        _plans.clear()
        _configs_generation = configs.generation
    key = _signature(launcher, args)
    try:
        plan = _plans.get(key, _MISSING)
    except TypeError:  # an unhashable argument: no plan
        return launcher(*args)
    if plan is _MISSING:
        if _python_dispatch_excluded(_PYTHON_KEY):
            return launcher(*args)  # no_dispatch(): a recording would not see the launcher's torch operations
        plan, allocated = _record(launcher, args)
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[key] = plan
        if plan is not None:
            return plan.execute(args, allocated)
    if plan is None:
        return launcher(*args)
    return plan.execute(args)


def _record(launcher, args: tuple):
    """(plan, its allocations) of launcher(*args), or (None, None) when it is not plannable."""
    # a distinct tensor object per argument, so that each tensor a launch gets maps to one
    # argument even when the caller passed one tensor twice (cross attention: q is k)
    proxies = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    recording = _Recording()
    _state.recording = recording
    try:
        with recording:
            result = launcher(*proxies)
        return _plan_of(recording, proxies, result, device), recording.allocations
    except _NotPlannable:
        return None, None
    finally:
        _state.recording = None


def _plan_of(recording: _Recording, proxies: tuple, result, device: torch.device) -> Plan:
    """The recorded launches with every tensor replaced by the index of its value and every
    other argument kept as a constant; raises _NotPlannable for a tensor that is neither an
    argument nor an allocation."""
    index = {id(a): i for i, a in enumerate(proxies) if isinstance(a, torch.Tensor)}
    first = len(proxies)  # the allocations' first value index
    for j, t in enumerate(recording.allocations):
        if t.device != device or t.dim() == 0:
            raise _NotPlannable(f"a {t.dim()}-dimensional allocation on {t.device}")
        index[id(t)] = first + j

    def entry(value) -> tuple:
        """(True, the index of a tensor's value) or (False, a constant)."""
        if isinstance(value, torch.Tensor):
            if id(value) not in index:
                raise _NotPlannable("a tensor that is neither an argument nor an allocation")
            return True, index[id(value)]
        if not isinstance(value, _CONSTANTS):  # a container could hold the first call's tensors
            raise _NotPlannable(f"a {type(value).__name__} argument")
        return False, value

    steps, used = [], []
    for kernel, grid, args, kwargs in recording.launches:
        if not isinstance(grid, (tuple, list)) or not all(type(g) is int for g in grid) or not all(
                isinstance(v, _CONSTANTS) for v in kwargs.values()):
            raise _NotPlannable("a grid or keyword argument that is not a constant")
        arg_entries = [entry(a) for a in args]
        tail = _trailing(kernel, len(args), kwargs) if isinstance(kernel, JITFunction) else None
        param_entries = None if tail is None else arg_entries + [entry(c) for c in tail]
        steps.append(_Step(kernel, (*grid, 1, 1)[:3], arg_entries, kwargs, param_entries))
        used.append({i for is_value, i in arg_entries if is_value and first <= i})
    if not isinstance(result, (tuple, list)):
        raise _NotPlannable("a result that is not a tuple")
    result_entries = [entry(r) for r in result]
    returned = {i for is_value, i in result_entries if is_value and first <= i}
    if not steps or returned - set().union(*used):
        raise _NotPlannable("an allocation returned without a launch writing it")
    # each allocation is made by the step that first uses it and dropped after the last
    for j, t in enumerate(recording.allocations):
        steps_using = [k for k, indices in enumerate(used) if first + j in indices]
        if steps_using:
            step = steps[steps_using[0]]
            step.allocate = (*step.allocate, (first + j, tuple(t.shape), t.dtype))
            if first + j not in returned:
                last = steps[steps_using[-1]]
                last.release = (*last.release, first + j)
    return Plan(len(recording.allocations), tuple(steps), _segment_picker(result_entries), device)


def _other_gpu(device: torch.device) -> bool:
    """Whether `device` is a GPU other than the current one."""
    return device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device()


def device_guard(device: torch.device):
    """Launch on the arguments' GPU even when another one is current (no device switch, and
    no cost beyond one query, when it already is)."""
    return torch.cuda.device(device) if _other_gpu(device) else contextlib.nullcontext()
