"""Where the time of an eager call goes on a CUDA GPU: host, GPU, allocator.

    python benchmarks/host_profile.py OUTDIR [--shapes cls224-stage1,cls224-stage2] [--dtype bf16]

For each shape, pass (fwd, bwd, fwd_bwd: the benchmark harness's callables) and provider
(ours-triton, sdpa-cudnn), one JSON line in OUTDIR/host-profile.jsonl:
  pipelined_us  wall time per call of back-to-back calls (what a training loop sees);
  pipelined_plain_us  (ours) the same with launch plans off (SPATIALFORMER_TRITON_DIRECT_LAUNCH=0:
                every call runs the launchers and Triton's own launch path);
  synced_us     wall time per call with a synchronize after each (host and GPU in series);
  graph_us      GPU time per call in a CUDA graph (no host in the way);
  segments      cudaMalloc'd segments the caching allocator added during the timed calls
                (non-zero: the calls re-allocate device memory, which synchronizes);
then, for ours at each shape's fwd_bwd, the torch profiler's table (self CPU time, CUDA
runtime calls included) and cProfile's (Python tottime) in OUTDIR/profile-<shape>.txt.
Exits 2 without CUDA.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

from gpu_config_sweep import graph_us, pipelined_us
from spatialformer_kernels.bench import workload

PROVIDERS = ("ours-triton", "sdpa-cudnn")


def synced_us(fn, calls: int = 30) -> float:
    times = []
    for _ in range(calls):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6)
    return sorted(times)[len(times) // 2]


def without_plans(measure):
    """measure() with the Triton backend's launch plans off (backends/triton/launch.py)."""
    from spatialformer_kernels.backends.triton import launch

    saved, launch.ENABLED = launch.ENABLED, False
    try:
        return measure()
    finally:
        launch.ENABLED = saved


def segments() -> int:
    return torch.cuda.memory_stats().get("segment.all.allocated", 0)


def profile_tables(fn, calls: int = 20) -> str:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(40)
    stats = io.StringIO()
    pstats.Stats(profiler, stream=stats).sort_stats("cumulative").print_stats(40)
    return (f"torch.profiler, {calls} calls\n{table}\n\ncProfile by tottime, {calls} calls\n{stream.getvalue()}"
            f"\n\ncProfile by cumulative time\n{stats.getvalue()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shapes", default="cls224-stage1,cls224-stage2")
    parser.add_argument("--dtype", default="bf16", choices=sorted(workload.DTYPES))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("host_profile: no CUDA GPU here; nothing was run", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device("cuda"), workload.DTYPES[args.dtype]
    providers = [p for p in workload.providers_for(device) if p.name in PROVIDERS]
    with open(args.out / "host-profile.jsonl", "a") as out:
        for shape in workload.shapes_for(device, args.shapes.split(",")):
            case = workload.Case.make(shape, dtype, device)
            for provider in providers:
                for pass_ in workload.PASSES:
                    row = {"shape": shape.label, "provider": provider.name, "pass": pass_}
                    try:
                        with provider.context():
                            fn = workload.make_callable(provider, case, pass_)
                            for _ in range(5):
                                fn()
                            torch.cuda.synchronize()
                            before = segments()
                            row["pipelined_us"] = round(pipelined_us(fn), 1)
                            row["synced_us"] = round(synced_us(fn), 1)
                            row["segments"] = segments() - before
                            if provider.name == "ours-triton":
                                row["pipelined_plain_us"] = round(without_plans(lambda: pipelined_us(fn)), 1)
                            if provider.name == "ours-triton" and pass_ == "fwd_bwd":
                                (args.out / f"profile-{shape.label}.txt").write_text(profile_tables(fn))
                            row["graph_us"] = round(graph_us(fn), 1)
                    except Exception as error:  # record and go on
                        row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                        torch.cuda.synchronize()
                    out.write(json.dumps(row) + "\n")
                    out.flush()
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
