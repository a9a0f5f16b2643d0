"""Launch plans (spatialformer_kernels/backends/triton/launch.py), without a GPU: launchers over
a JITFunction whose `run` hands out a stand-in compiled kernel that records its launches, on
CPU tensors standing in for a GPU's (DIRECT_DEVICE_TYPES). The plans of the real launchers are
checked against the reference in tests/test_kernel_parity.py (the interpreter runs every
plan's launches) and below.

What a GPU must confirm (benchmarks/gpu_check.sh runs the CUDA tests and the host profile): the
compiled kernel's launcher accepts the arguments as `JITFunction.run` passes them.
"""
import pytest
import torch
from triton.runtime.jit import JITFunction

from spatialformer_kernels.backends.triton import launch as plans


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
    monkeypatch.setattr(plans, "ENABLED", True)
    monkeypatch.setattr(plans, "INTERPRET", False)
    monkeypatch.setattr(plans, "DIRECT_DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(plans, "_current_stream", lambda index: 1000)
    plans.clear()
    yield FakeJIT()
    plans.clear()


class Launcher:
    """A launcher as fused.py writes them: sizes -> an allocation and a launch; counts its runs."""

    def __init__(self, kernel):
        self.kernel, self.runs = kernel, 0

    def __call__(self, x, y, scale, flag):
        self.runs += 1
        out = torch.empty((x.shape[0], 2), dtype=torch.float16, device=x.device)
        plans.launch(self.kernel, (x.shape[0] // 4,), x, out, x.shape[0], scale, BLOCK=y.shape[0],
                     FLAG=flag, num_warps=4)
        return out, None


def test_a_repeated_signature_allocates_and_launches_from_its_plan(kernel):
    launcher = Launcher(kernel)
    x, y = torch.zeros(64), torch.zeros(16, dtype=torch.float16)
    out, none = plans.run(launcher, (x, y, 0.5, True))
    assert none is None and out.shape == (64, 2) and out.dtype == torch.float16
    assert launcher.runs == 1 and len(kernel.plain_calls) == 1 and kernel.compiled.launches == []
    assert kernel.plain_calls[0] == ((16, 1, 1), (x, out, 64, 0.5), {"BLOCK": 16, "FLAG": True, "num_warps": 4})
    other = torch.ones(64)  # another tensor of the same signature
    out2, _ = plans.run(launcher, (other, y, 0.5, True))
    assert launcher.runs == 1 and len(kernel.plain_calls) == 1
    assert out2 is not out and out2.shape == (64, 2)  # a new allocation per call
    # run's own call: the grid in 3D, the stream, handles, no launch metadata or hooks, then every
    # parameter in order (keywords in place, defaults filled in); options such as num_warps are not parameters
    (launched,) = kernel.compiled.launches
    assert launched == (16, 1, 1, 1000, "function-handle", "packed-metadata", None, None, None,
                        other, out2, 64, 0.5, 16, True, 7)
    assert launched[9] is other and launched[10] is out2


@pytest.mark.parametrize("change", ["misaligned", "dtype", "shape", "stride", "float", "int", "flag"])
def test_anything_a_launcher_or_triton_specialises_on_is_a_new_signature(kernel, change):
    launcher = Launcher(kernel)
    args = [torch.zeros(64), torch.zeros(16), 1.0, False]
    plans.run(launcher, tuple(args))
    if change == "misaligned":
        args[0] = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    elif change == "dtype":
        args[0] = args[0].double()
    elif change == "shape":
        args[1] = torch.zeros(32)  # decides BLOCK
    elif change == "stride":
        args[0] = torch.zeros(128)[::2]
    elif change == "float":
        args[2] = 0.25
    elif change == "int":
        args[2] = 1  # equal to 1.0, but Triton makes an int of 1 a constant
    elif change == "flag":
        args[3] = True
    plans.run(launcher, tuple(args))
    assert launcher.runs == 2 and len(kernel.plain_calls) == 2 and kernel.compiled.launches == []


def test_one_tensor_passed_twice_maps_to_its_argument_not_the_other(kernel):
    """Cross attention passes q as k when keys are queries: the recording tells them apart."""
    def launcher(q, k):
        plans.launch(kernel, (1,), q, k, 1, 1.0, BLOCK=16)
        return ()

    q = torch.zeros(16)
    plans.run(launcher, (q, q))
    q2, k2 = torch.zeros(16), torch.ones(16)
    plans.run(launcher, (q2, k2))
    (launched,) = kernel.compiled.launches
    assert launched[9] is q2 and launched[10] is k2


def test_constants_between_tensors_keep_their_places(kernel):
    """A plan keeps runs of constants as tuples between the call's tensors: a constant first, a
    tensor, a constant, a tensor, then keywords and defaults keep their order."""
    def launcher(x, y):
        plans.launch(kernel, (1,), 5, x, 2.0, y, BLOCK=4, LAST=3)
        return ()

    plans.run(launcher, (torch.zeros(16), torch.zeros(4)))
    x2, y2 = torch.ones(16), torch.ones(4)
    plans.run(launcher, (x2, y2))
    (launched,) = kernel.compiled.launches
    assert launched[9:] == (5, x2, 2.0, y2, 4, False, 3) and launched[10] is x2 and launched[12] is y2


def test_a_launcher_with_other_torch_operations_runs_every_time(kernel):
    runs = []

    def launcher(x):
        runs.append(x)
        total = x.sum()  # between launches, as the wide-head backward does
        plans.launch(kernel, (1,), x, x, 1, float(total), BLOCK=16)
        return (x + 1,)

    for value in (1.0, 2.0):
        (out,) = plans.run(launcher, (torch.full((16,), value),))
        assert torch.equal(out, torch.full((16,), value + 1))
    # the recording stopped at the sum (nothing launched); then it ran as it is, twice
    assert len(runs) == 3 and len(kernel.plain_calls) == 2 and kernel.compiled.launches == []
    assert [call[1][3] for call in kernel.plain_calls] == [16.0, 32.0]


def test_a_result_that_is_neither_an_argument_nor_an_allocation_gets_no_plan(kernel):
    def launcher(x):
        out = torch.empty((4, 4), device=x.device)
        plans.launch(kernel, (1,), x, out, 1, 1.0, BLOCK=16)
        return (out.view(16),)

    for _ in range(2):
        (out,) = plans.run(launcher, (torch.zeros(16),))
        assert out.shape == (16,)
    assert len(kernel.plain_calls) == 2 and kernel.compiled.launches == []


def test_plain_launches_for_other_kernels_hooks_the_interpreter_and_when_disabled(kernel, monkeypatch):
    import triton

    class Recorder:  # the static check's stand-ins for kernels
        def __init__(self):
            self.calls = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))

    recorder = Recorder()
    x = torch.zeros(16)
    for _ in range(2):
        plans.run(Launcher(recorder), (x, x, 1.0, False))
    assert len(recorder.calls) == 2 and recorder.calls[1][1][0] is x
    launcher = Launcher(kernel)
    hook = lambda metadata: None  # noqa: E731 - a profiler's launch hook
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        for _ in range(2):
            plans.run(launcher, (x, x, 1.0, False))
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert launcher.runs == 1 and len(kernel.plain_calls) == 2  # planned, but launched through Triton
    monkeypatch.setattr(plans, "INTERPRET", True)
    plans.clear()
    for _ in range(2):
        plans.run(launcher, (x, x, 1.0, False))
    assert launcher.runs == 2 and len(kernel.plain_calls) == 4
    monkeypatch.setattr(plans, "ENABLED", False)
    for _ in range(2):
        plans.run(launcher, (x, x, 1.0, False))
    assert launcher.runs == 4 and len(kernel.plain_calls) == 6 and kernel.compiled.launches == []


def test_a_missing_parameter_is_never_launched_directly(kernel):
    def launcher(x):
        plans.launch(kernel, (1,), x, x, 3, 1.0)  # BLOCK has no default: Triton raises on a GPU
        return ()

    x = torch.zeros(16)
    for _ in range(2):
        plans.run(launcher, (x,))
    assert len(kernel.plain_calls) == 2 and kernel.compiled.launches == []


def test_a_forced_config_drops_the_plans(kernel):
    import triton

    from spatialformer_kernels.backends.triton import configs

    launcher, args = Launcher(kernel), (torch.zeros(16), torch.zeros(16), 1.0, False)
    for _ in range(2):
        plans.run(launcher, args)
    assert launcher.runs == 1
    with configs.forced_config("fwd", triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)):
        for _ in range(2):
            plans.run(launcher, args)  # a new plan under the forced config
    assert launcher.runs == 2
    plans.run(launcher, args)  # and another without it
    assert launcher.runs == 3 and len(plans._plans) == 1


def test_a_launcher_called_while_another_is_recorded_joins_its_plan(kernel):
    def inner(x):
        plans.launch(kernel, (2,), x, x, 2, 1.0, BLOCK=16)
        return ()

    def outer(x):
        plans.launch(kernel, (1,), x, x, 1, 1.0, BLOCK=16)
        plans.run(inner, (x,))
        return ()

    for value in (0.0, 1.0):
        plans.run(outer, (torch.full((16,), value),))
    assert [call[0] for call in kernel.plain_calls] == [(1, 1, 1), (2, 1, 1)]  # in order, from the outer plan
    assert [launch[:3] for launch in kernel.compiled.launches] == [(1, 1, 1), (2, 1, 1)]
    assert list(plans._plans) and all(key[0] is outer for key in plans._plans)


def test_arguments_a_plan_cannot_keep_mean_no_plan(kernel):
    """A container could hold the first call's tensors; unhashable arguments have no signature."""
    def launcher(x, parts):
        plans.launch(kernel, (1,), x, parts, 1, 1.0, BLOCK=16)
        return ()

    x = torch.zeros(16)
    for _ in range(2):
        plans.run(launcher, (x, (x, x)))
        plans.run(launcher, (x, [x]))
    assert len(kernel.plain_calls) == 4 and kernel.compiled.launches == []


def test_allocations_live_from_their_first_launch_to_their_last(kernel):
    """As in the launchers themselves: a workspace is made when first used and dropped after its
    last launch, before the next launch's workspace is made; outputs stay."""
    def launcher(x):
        work_a = torch.empty((64,), device=x.device)
        plans.launch(kernel, (1,), x, work_a, 1, 1.0, BLOCK=16)
        out = torch.empty((16,), device=x.device)
        work_b = torch.empty((64,), device=x.device)
        plans.launch(kernel, (1,), work_b, out, 2, 1.0, BLOCK=16)
        return (out,)

    x = torch.zeros(16)
    for _ in range(2):
        (out,) = plans.run(launcher, (x,))
        assert out.shape == (16,)
    (plan,) = plans._plans.values()
    first, second = plan.steps
    assert [a[0] for a in first.allocate] == [1] and first.release == (1,)
    assert sorted(a[0] for a in second.allocate) == [2, 3] and second.release == (3,)
    assert kernel.compiled.launches[-1][10] is out


def test_no_plan_without_python_dispatch_or_with_a_pre_run_hook(kernel):
    from torch.utils._mode_utils import no_dispatch

    launcher = Launcher(kernel)
    x = torch.zeros(16)
    with no_dispatch():  # the recording could not see the launcher's torch operations
        for _ in range(2):
            plans.run(launcher, (x, x, 1.0, False))
    assert launcher.runs == 2 and not plans._plans
    kernel.pre_run_hooks.append(lambda *args, **kwargs: None)  # only Triton's own path calls it
    for _ in range(2):
        plans.run(launcher, (x, x, 1.0, False))
    assert launcher.runs == 3 and len(kernel.plain_calls) == 4 and kernel.compiled.launches == []


def test_the_cache_starts_over_when_full(kernel, monkeypatch):
    monkeypatch.setattr(plans, "MAX_PLANS", 3)
    launcher = Launcher(kernel)
    for n in range(5):
        plans.run(launcher, (torch.zeros(16 * (n + 1)), torch.zeros(16), 1.0, False))
    assert len(plans._plans) == 2  # cleared at the fourth, then two new ones
