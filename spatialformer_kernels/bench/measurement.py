"""How the benchmark measures: environment and rooflines, timing, peak memory, and the rows
(Row, BenchSession: parity first, then timing, per provider).

Part of the benchmark harness `spatialformer_kernels.bench` (whose docstring describes the
timing method).
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch

from .. import dispatch
from .workload import (
    DTYPE_NAMES,
    Case,
    ParityCheck,
    Provider,
    Shape,
    bytes_moved,
    check_parity,
    flops,
    gbps,
    make_callable,
    mask_summary,
    pct_of_roofline,
    skip_reason,
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
    for required, label, peak_gbps in KNOWN_DEVICES:
        if required <= tokens:
            return label, peak_gbps
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


NOT_A_CHECKOUT = "not a git checkout"
# A copy of a checkout (e.g. a working tree sent to a GPU machine, whose .git may be missing
# or stale) can state the commit it was copied from; results then say the commit was stated.
STATED_COMMIT_ENV = "SPATIALFORMER_SOURCE_COMMIT"


def git_commit() -> str:
    """The commit stated in $SPATIALFORMER_SOURCE_COMMIT (marked as stated), else the commit of
    the git checkout this package runs from (with -dirty), else NOT_A_CHECKOUT (an installed
    package: site-packages, even inside a checkout's virtual environment)."""
    stated = os.environ.get(STATED_COMMIT_ENV, "").strip()
    if stated:
        return f"{stated} (stated by {STATED_COMMIT_ENV})"
    return _checkout_commit()


def _checkout_commit() -> str:
    root = Path(__file__).resolve().parents[2]  # the repository root in a checkout
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        if Path(top).resolve() != root:
            return NOT_A_CHECKOUT
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return NOT_A_CHECKOUT
    return sha + ("-dirty" if dirty else "")


def environment(
    device: torch.device, peak_gbps: Optional[float] = None, measure_bandwidth: bool = False,
    load: Optional[tuple[float, float]] = None,
) -> dict:  # fmt: skip
    """Device, versions, roofline, commit and (CPU) threads and load: what a result needs to be reproduced.

    The roofline is, in order: `peak_gbps` as given, a measured copy bandwidth when
    `measure_bandwidth`, the data-sheet table for a known GPU, else none (with the reason).
    `load` is (busy cores, seconds waited) from `wait_for_idle`; measured now when not given.
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
        busy, waited = load if load is not None else (busy_cores(), 0.0)
        env["busy_cores"] = round(busy, 2)
        env["idle"] = busy < IDLE_BELOW
        env["load_wait_s"] = round(waited, 1)
    return env


def _own_running() -> int:
    """Threads of this process running now, this one included (an intra-op thread spins a
    while after a parallel region: it is not another process's load)."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat", encoding="utf-8") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread has exited
            pass
    return count


def busy_cores(samples: int = 10, interval_s: float = 0.02) -> float:
    """Mean number of other processes' runnable tasks now (Linux /proc/loadavg), else the
    1-minute load average."""
    try:
        counts = []
        for _ in range(samples):
            with open("/proc/loadavg", encoding="utf-8") as f:
                running = int(f.read().split()[3].split("/")[0])
            counts.append(max(0, running - _own_running()))
            time.sleep(interval_s)
        return statistics.mean(counts)
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


IDLE_BELOW = 0.5  # busy cores under which the machine counts as idle
LOAD_WAIT_S = 5.0


def wait_for_idle(timeout_s: float = LOAD_WAIT_S) -> tuple[float, float]:
    """(busy cores, seconds waited): waits up to `timeout_s` for other processes to leave the
    cores idle, so that a command just before the benchmark (`pip install ... && spatialformer-bench`,
    a kernel build) neither decides the thread count nor slows the first rows."""
    start = time.perf_counter()
    busy, waited = busy_cores(), 0.0
    while busy >= IDLE_BELOW and waited < timeout_s:
        time.sleep(0.25)
        busy, waited = busy_cores(), time.perf_counter() - start
    return busy, waited


def choose_threads(requested: Optional[str] = "auto", busy: Optional[float] = None) -> int:
    """CPU threads for timing: a number, or "auto".

    "auto" keeps torch's default unless other processes keep cores busy (`busy`, measured
    now when not given), then uses only the idle cores, at least one: with more threads than
    idle cores every parallel region waits at its barrier for a descheduled thread, and the
    timings measure the scheduler (on a shared 2-core machine, 2 threads turned a 9 ms row
    into 290 ms).
    """
    if requested not in (None, "auto"):
        return max(1, int(requested))
    busy = busy_cores() if busy is None else busy
    return max(1, min(torch.get_num_threads(), int((os.cpu_count() or 1) - busy + 0.5)))


def hardware_slug(env: dict) -> str:
    """A file-name stem naming the hardware, e.g. "h100-80gb-hbm3" or "cpu-amd-epyc-2c" (2 cores)."""
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower().replace("nvidia", "")).strip("-")
    if env["device_type"] == "cpu":
        return f"cpu-{slug}-{env.get('cpu_count') or 1}c"
    return slug


# ----------------------------------------------------------------------------------------
# Timing, peak memory
# ----------------------------------------------------------------------------------------


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
    op: str = "bilateral"  # workload.OPS: "bilateral" or "masked_cross" (M queries over N keys)
    # "ok"; "untimed" (parity passed, not timed: provider.parity_only); "skipped" (cannot run
    # here); "wrong" (a baseline whose results fail parity: not timed, not a competitor);
    # "failed" (ours failed parity or raised: the run fails)
    status: str = "ok"
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
    mask_fraction: Optional[float] = None  # masked_cross: the fraction of (query, key) pairs its attn_mask keeps
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
    them first when they are not measured yet. Parity checks are kept too (`parity_checks`).
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
        self._parity: dict = {}  # (provider, shape checked, dtype, with_grads) -> ParityCheck
        self._row_checks: dict = {}  # (provider, row shape, dtype, with_grads) -> ParityCheck
        self._rows: dict = {}

    def case(self, shape: Shape, dtype: torch.dtype) -> Case:
        key = (shape, dtype)
        if key not in self._cases:
            self._cases = {k: v for k, v in self._cases.items() if k[0] == shape}  # keep one shape alive
            self._cases[key] = Case.make(shape, dtype, self.device)
        return self._cases[key]

    def parity_check(self, provider: Provider, shape: Shape, dtype: torch.dtype, with_grads: bool) -> ParityCheck:
        """The provider against the reference for rows of `shape`, checked on
        `provider.parity_shape(shape)` where it has one; each shape checked once."""
        checked = provider.parity_shape(shape) if provider.parity_shape else shape
        key = (provider.name, checked, dtype, with_grads)
        if key not in self._parity:
            case = self.case(shape, dtype) if checked == shape else Case.make(checked, dtype, self.device)
            self._parity[key] = check_parity(provider, case, with_grads)
        self._row_checks[(provider.name, shape, dtype, with_grads)] = self._parity[key]
        return self._parity[key]

    def parity(self, provider: Provider, shape: Shape, dtype: torch.dtype, with_grads: bool) -> Optional[str]:
        """None when the provider matches the reference, else the failure message."""
        check = self.parity_check(provider, shape, dtype, with_grads)
        return None if check.passed else f"parity: {check.failures}"

    def parity_checks(self) -> list[tuple[Shape, ParityCheck]]:
        """(row shape, check) of every parity check so far, in the order the rows asked for them."""
        return [(shape, check) for (_, shape, _, _), check in self._row_checks.items()]

    def _measure(self, shape: Shape, dtype: torch.dtype, pass_: str, provider: Provider) -> Row:
        row = Row(
            shape.label, shape.B, shape.H, shape.M, shape.N, shape.D, shape.scale, DTYPE_NAMES[dtype], pass_,
            provider.name, provider.kind, provider.family, shape.op,
            bytes=bytes_moved(shape, dtype, pass_), flops=flops(shape, pass_),
        )  # fmt: skip
        if shape.op == "masked_cross":
            row.mask_fraction = mask_summary(shape)["kept"]
        reason = skip_reason(provider, dtype, pass_, shape.op)
        if reason:
            row.status, row.note = "skipped", reason
            return row
        try:
            failure = self.parity(provider, shape, dtype, with_grads=pass_ != "fwd")
            if failure:
                row.status, row.note = ("failed", failure) if provider.kind == "ours" else ("wrong", failure)
                return row
            if provider.parity_only:
                row.status, row.note = "untimed", provider.parity_only
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
        row.note = provider.notes.get(shape.op, "")
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


SPEEDUP_NOTE = (
    "speedup: the fastest baseline's median time (of {baselines}) on the same shape, dtype and pass / this row's; "
    "vs SDPA: the same against the fastest SDPA"
)


def add_speedup(row: Row, baselines: Iterable[Row]) -> None:
    """Speedup of a row against the best baseline and the best SDPA backend of its group (SPEEDUP_NOTE)."""
    measured = [b for b in baselines if b.status == "ok" and b.median_ms]
    if measured:
        best = min(measured, key=lambda b: b.median_ms)
        row.speedup, row.best_baseline = best.median_ms / row.median_ms, best.provider
    sdpa = [b.median_ms for b in measured if b.family == "sdpa"]
    if sdpa:
        row.speedup_vs_sdpa = min(sdpa) / row.median_ms
