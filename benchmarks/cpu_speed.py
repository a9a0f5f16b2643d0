"""CPU speed of the C++ kernel against PyTorch SDPA (two calls) and torch.compile(reference).

Issue 4's measurement: cls224-stage1 at B=8 (B=8, H=2, M=64, N=3136, D=32), float32, all
cores (torch.set_num_threads(os.cpu_count())). Every candidate and pass runs once per
round and the rounds repeat, so load from other processes hits all of them alike (running
the candidates in separate phases gave biased numbers on a shared machine); wall-clock
medians over the rounds. Writes the raw samples and medians as JSON.

    python benchmarks/cpu_speed.py --rounds 40 --json benchmarks/results/cpu-speed/<machine>.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import spatialformer_kernels as sk
from spatialformer_kernels.bench.measurement import device_name, git_commit
from spatialformer_kernels.reference import bilateral_attention_reference

B, H, M, N, D = 8, 2, 64, 3136, 32


def _sdpa_both_directions(q_s, k_s, v_s, q_x, k_x, v_x):
    return F.scaled_dot_product_attention(q_s, k_x, v_x), F.scaled_dot_product_attention(q_x, k_s, v_s)


def _cpu_kernel(*tensors):
    return sk.bilateral_attention(*tensors, backend="cpu")


def _forward(fn, inputs):
    def run():
        with torch.no_grad():
            fn(*inputs)

    return run


def _forward_backward(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]

    def run():
        o_s, o_x = fn(*leaves)
        (o_s.sum() + o_x.sum()).backward()
        for t in leaves:
            t.grad = None

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", help="write samples and medians here")
    args = parser.parse_args()
    if "cpu" not in sk.available_backends():
        raise SystemExit("the C++ CPU kernel is not available on this machine")
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, H, M, D, generator=generator) for _ in range(3)]
    inputs += [torch.randn(B, H, N, D, generator=generator) for _ in range(3)]
    compiled_reference = torch.compile(lambda *t: bilateral_attention_reference(*t, D**-0.5))
    candidates = {"cpu kernel": _cpu_kernel, "sdpa x2": _sdpa_both_directions, "compile(reference)": compiled_reference}
    runs = {}
    for name, fn in candidates.items():
        runs[f"{name} | forward"] = _forward(fn, inputs)
        runs[f"{name} | forward+backward"] = _forward_backward(fn, inputs)
    for run in runs.values():  # warm-up, and torch.compile's compilation
        for _ in range(3):
            run()
    samples = {key: [] for key in runs}
    for _ in range(args.rounds):
        for key, run in runs.items():
            start = time.perf_counter()
            run()
            samples[key].append(time.perf_counter() - start)
    median_ms = {key: statistics.median(t) * 1e3 for key, t in samples.items()}
    speedups = {
        f"cpu kernel vs {baseline} | {pass_}": median_ms[f"{baseline} | {pass_}"] / median_ms[f"cpu kernel | {pass_}"]
        for baseline in ("sdpa x2", "compile(reference)")
        for pass_ in ("forward", "forward+backward")
    }
    load = os.getloadavg()[0]
    print(f"{device_name(torch.device('cpu'))}, {args.threads} threads, torch {torch.__version__}, "
          f"commit {git_commit()}, load average {load:.2f}")
    print(f"B={B} H={H} M={M} N={N} D={D} float32, {args.rounds} interleaved rounds, median ms:")
    for key, value in median_ms.items():
        print(f"  {key:40s} {value:9.2f}")
    for key, value in speedups.items():
        print(f"  {key:50s} {value:5.2f}x")
    if args.json:
        record = {
            "machine": {"cpu": device_name(torch.device("cpu")), "threads": args.threads, "cores": os.cpu_count(), "load_average": load},
            "commit": git_commit(),
            "torch": torch.__version__,
            "shape": dict(B=B, H=H, M=M, N=N, D=D, dtype="float32"),
            "rounds": args.rounds,
            "median_ms": median_ms,
            "speedup": speedups,
            "samples_s": samples,
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
