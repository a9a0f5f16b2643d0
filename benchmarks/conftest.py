"""pytest setup for benchmarks/.

`pytest benchmarks/` runs the fast parity checks and the harness's own tests (part of CI).
`pytest benchmarks/ --benchmark` also runs the throughput suite (tests marked `throughput`):
every row checks parity with the reference, then is timed by spatialformer_kernels.bench's
measurement core (CUDA: triton.testing.do_bench with L2 flushes; CPU: perf_counter per call)
and the measured samples are replayed into pytest-benchmark, so `--benchmark-json` carries
the device timings, with GB/s, % of roofline, TFLOP/s, speedup and peak memory in each
row's extra_info and the device, versions and commit in machine_info.

    pytest benchmarks/ --benchmark --benchmark-json=benchmarks/results/<hardware>.json  (hardware: measurement.hardware_slug, e.g. cpu-amd-epyc-2c, h100-80gb-hbm3)
    pytest benchmarks/test_throughput.py --benchmark -k "attention_throughput and m2f512"   (masked cross-attention rows only)

Kernel rows cover both ops of the harness (spatialformer_kernels.bench): bilateral attention
at docs/design.md section 4's shapes and masked cross-attention at Mask2Former's (m2f512-*);
each row's extra_info names its op ("op") and, for masked rows, the mask's kept fraction.
"""
from __future__ import annotations

import pytest
import torch

from spatialformer_kernels.bench import measurement, workload


def pytest_addoption(parser):
    group = parser.getgroup("spatialformer benchmarks")
    group.addoption(
        "--benchmark", action="store_true", default=False,
        help="run the throughput suite in benchmarks/ (without it only the fast parity checks run)",
    )  # fmt: skip
    group.addoption("--bench-dtypes", default=None, help="comma list of fp32,fp16,bf16 (default: bf16 on CUDA, fp32 on CPU)")
    group.addoption("--bench-models", default=None, help="comma list of tiny,small,base (default: all on CUDA, tiny on CPU)")
    group.addoption("--bench-budget", type=float, default=0.25, help="timed seconds per kernel row (default 0.25)")
    group.addoption("--bench-threads", default="auto", help="CPU threads for timed rows: a number, or auto (see measurement.choose_threads)")
    group.addoption("--bench-peak-gbps", type=float, default=None, help="peak bandwidth for %% of roofline (overrides the table)")
    group.addoption("--bench-measure-bandwidth", action="store_true", help="use a measured copy bandwidth as the roofline")


def pytest_configure(config):
    config.addinivalue_line("markers", "throughput: timed benchmark rows, run only with --benchmark")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--benchmark"):
        return
    skip = pytest.mark.skip(reason="throughput suite: run with --benchmark")
    for item in items:
        if "throughput" in item.keywords:
            item.add_marker(skip)


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _environment(config) -> dict:
    if not hasattr(config, "_spatialformer_env"):
        if config.getoption("--benchmark") and bench_device().type == "cpu":
            # Only a throughput run changes the thread count (the CI run shares this process with tests/).
            torch.set_num_threads(measurement.choose_threads(config.getoption("--bench-threads")))
        config._spatialformer_env = measurement.environment(
            bench_device(), config.getoption("--bench-peak-gbps"), config.getoption("--bench-measure-bandwidth")
        )
    return config._spatialformer_env


def pytest_benchmark_update_machine_info(config, machine_info):
    env = _environment(config)
    machine_info.update({
        "device_type": env["device_type"],
        "device_name": env["device_name"],
        "torch_version": env["torch"],
        "triton_version": env["triton"],
        "cuda_version": env["cuda"],
        "cudnn_version": env["cudnn"],
        "git_commit": env["git_commit"],
        "kernel_backends": env["backends"],
        "roofline_gbps": env["roofline"]["peak_gbps"],
        "roofline_source": env["roofline"]["source"],
        "hardware_slug": measurement.hardware_slug(env),
        "shape_scaling": workload.scaling_note(workload.shapes_for(bench_device())),
    })  # fmt: skip
    for key in ("sm_count", "capability", "cpu_threads", "cpu_count", "load_average_1min", "busy_cores"):
        if key in env:
            machine_info[key] = env[key]


def pytest_benchmark_update_commit_info(config, commit_info):
    commit_info["package_commit"] = _environment(config)["git_commit"]


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["spatialformer"] = {
        "work_model": "bytes and FLOPs per row as in spatialformer_kernels.bench (the same for every provider)",
        "timing": (
            "triton.testing.do_bench (CUDA events, L2 flushed), samples replayed into pytest-benchmark"
            if bench_device().type == "cuda"
            else "warm-up, then time.perf_counter per call; samples replayed into pytest-benchmark"
        ),
        "shape_scaling": workload.scaling_note(workload.shapes_for(bench_device())),
    }


class ReplayClock:
    """A clock for pytest-benchmark that advances by measured samples, one per call of `tick`.

    pytest-benchmark times `timer(); target(); timer()`; with this clock as the timer and
    `tick` as the target, each round records exactly one sample measured by the bench core
    (on CUDA, device time from CUDA events rather than host wall time).
    """

    def __init__(self, samples, name: str):
        self._samples = iter(samples)
        self._now = 0.0
        self.__name__ = name

    def __call__(self) -> float:
        return self._now

    def tick(self) -> None:
        self._now += next(self._samples)


def replay(benchmark, samples, name: str) -> None:
    """Record `samples` (seconds) as the benchmark's rounds."""
    clock = ReplayClock(samples, name)
    benchmark._timer = clock  # pytest-benchmark's runner reads its timer from this attribute
    benchmark.pedantic(clock.tick, rounds=len(samples), iterations=1, warmup_rounds=0)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def bench_env(pytestconfig) -> dict:
    return _environment(pytestconfig)


@pytest.fixture(scope="session")
def bench_session(pytestconfig, device, bench_env) -> measurement.BenchSession:  # bench_env first: it sets the threads
    return measurement.BenchSession(
        device,
        workload.providers_for(device),
        budget_s=pytestconfig.getoption("--bench-budget"),
        peak_gbps=bench_env["roofline"]["peak_gbps"],
    )


@pytest.fixture
def record(benchmark, device):
    """record(row_or_model_row, group): replay its samples into pytest-benchmark with its metrics."""

    def _record(row, group: str) -> None:
        benchmark.group = group
        benchmark.extra_info.update(row.metrics())
        name = "triton.testing.do_bench" if device.type == "cuda" else "time.perf_counter"
        replay(benchmark, row.samples_s, name)

    return _record
