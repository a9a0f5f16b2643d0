"""The direct launch path (spatialformer_kernels/backends/triton/launch.py), without a GPU: a
JITFunction whose `run` hands out a stand-in compiled kernel that records its launches.

What a GPU must confirm (benchmarks/gpu_check.sh runs the CUDA tests and the host profile): the
compiled kernel's launcher accepts the arguments as `JITFunction.run` passes them.
"""
import pytest
import torch
from triton.runtime.jit import JITFunction

from spatialformer_kernels.backends.triton import launch as direct

CUDA0 = torch.device("cuda", 0)


def _body(X, Y, n, scale, BLOCK: "tl.constexpr", FLAG: "tl.constexpr" = False, LAST: "tl.constexpr" = 7):  # noqa: F821
    pass


class FakeCompiled:
    function, packed_metadata = "function-handle", "packed-metadata"

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class FakeJIT(JITFunction):
    """Triton's JITFunction (parameters, defaults) with a `run` that compiles nothing."""

    def __init__(self):
        super().__init__(_body)
        self.compiled, self.plain_calls = FakeCompiled(), []

    def run(self, *args, grid, warmup, **kwargs):
        self.plain_calls.append((grid, args, kwargs))
        return self.compiled


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(direct, "ENABLED", True)
    monkeypatch.setattr(direct, "_current_stream", lambda index: 1000 + index)
    monkeypatch.setattr(direct, "_signatures", {})
    return FakeJIT()


def test_a_repeated_signature_calls_the_compiled_kernel_with_the_bound_arguments(kernel):
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.float16)
    direct.launch(kernel, (4, 2), CUDA0, x, y, 10, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.plain_calls) == 1 and kernel.compiled.launches == []  # first call: Triton's own path
    assert kernel.plain_calls[0] == ((4, 2), (x, y, 10, 0.5), {"BLOCK": 32, "num_warps": 4})
    direct.launch(kernel, (4, 2), CUDA0, x, y, 10, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.plain_calls) == 1
    # run's own call: grid padded to 3D, the stream, handles, no launch metadata or hooks, then every
    # parameter in order (keywords in place, defaults filled in); options such as num_warps are not parameters
    assert kernel.compiled.launches == [
        (4, 2, 1, 1000, "function-handle", "packed-metadata", None, None, None, x, y, 10, 0.5, 32, False, 7)]
    other = torch.ones(64)  # another tensor of the same dtype and alignment: same signature
    direct.launch(kernel, (8,), CUDA0, other, y, 10, 0.5, BLOCK=32, num_warps=4)
    assert len(kernel.plain_calls) == 1 and kernel.compiled.launches[-1][:3] == (8, 1, 1)
    assert kernel.compiled.launches[-1][9] is other


@pytest.mark.parametrize("change", ["misaligned", "dtype", "int", "float", "constexpr", "option", "default", "device"])
def test_anything_triton_specialises_on_is_a_new_signature(kernel, change):
    x, y = torch.zeros(64), torch.zeros(64, dtype=torch.float16)
    args, kwargs, device = [x, y, 16, 0.5], {"BLOCK": 32, "num_warps": 4}, CUDA0
    direct.launch(kernel, (1,), device, *args, **kwargs)
    if change == "misaligned":
        args[0] = x[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = x.to(torch.float64)
    elif change == "int":
        args[2] = 1  # Triton makes an int of 1 a constant
    elif change == "float":
        args[3] = 0.25
    elif change == "constexpr":
        kwargs["BLOCK"] = 64
    elif change == "option":
        kwargs["num_warps"] = 8
    elif change == "default":
        kwargs["LAST"] = 7  # the default's value, but passed: Triton's key differs, so does ours
    elif change == "device":
        device = torch.device("cuda", 1)
    direct.launch(kernel, (1,), device, *args, **kwargs)
    assert len(kernel.plain_calls) == 2 and kernel.compiled.launches == []


def test_plain_path_for_recorders_hooks_cpu_and_when_disabled(kernel, monkeypatch):
    import triton

    class Recorder:
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))

    recorder = Recorder()
    direct.launch(recorder, (2,), CUDA0, 1, BLOCK=4)
    assert recorder.calls == [((2,), (1,), {"BLOCK": 4})]
    x = torch.zeros(16)
    for _ in range(2):
        direct.launch(kernel, (1,), torch.device("cpu"), x, x, 3, 1.0, BLOCK=16)
    hook = lambda metadata: None  # noqa: E731 - a profiler's launch hook
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(2):
            direct.launch(kernel, (1,), CUDA0, x, x, 3, 1.0, BLOCK=16)
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    monkeypatch.setattr(direct, "ENABLED", False)
    for _ in range(2):
        direct.launch(kernel, (1,), CUDA0, x, x, 3, 1.0, BLOCK=16)
    assert len(kernel.plain_calls) == 6 and kernel.compiled.launches == []


def test_a_missing_parameter_is_never_cached(kernel):
    x = torch.zeros(16)
    for _ in range(2):
        direct.launch(kernel, (1,), CUDA0, x, x, 3, 1.0)  # BLOCK has no default: Triton raises on a GPU
    assert len(kernel.plain_calls) == 2 and direct._signatures[kernel] == {}


def test_the_cache_starts_over_when_full(kernel, monkeypatch):
    monkeypatch.setattr(direct, "MAX_SIGNATURES", 3)
    x = torch.zeros(16)
    for n in range(5):
        direct.launch(kernel, (1,), CUDA0, x, x, n, 1.0, BLOCK=16)
    assert len(direct._signatures[kernel]) == 2  # cleared at the fourth, then two new ones
