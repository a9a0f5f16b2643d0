"""Benchmark core (imported from here) and the `spatialformer-bench` command.

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

The core lives in three modules; import its names from here:
    bench_workload  what is run: shapes, the work model, providers, cases and parity
    bench_measure   how it is measured: environment and rooflines, timing, peak memory,
                    rows and BenchSession
    bench_models    the whole-model benchmark (SpatialFormer images per second)
This module holds the output (table, plot) and the command line.

    spatialformer-bench                         # default shapes, table + JSON + PNG in ./bench-out/
    spatialformer-bench --quick                 # a few seconds
    spatialformer-bench --shapes cls224-stage1 --passes fwd --dtypes bf16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from .bench_measure import (  # noqa: F401  (re-exported: the core is imported from here)
    CPU_ROOFLINE_NOTE,
    KNOWN_DEVICES,
    BenchSession,
    Row,
    add_speedup,
    busy_cores,
    choose_threads,
    device_name,
    environment,
    git_commit,
    hardware_slug,
    lookup_roofline,
    measure,
    measure_copy_bandwidth,
    peak_memory,
)
from .bench_models import (  # noqa: F401
    MODEL_VARIANTS,
    ModelRow,
    ModelsUnavailable,
    bench_model,
    check_model_parity,
    model_backends,
)
from .bench_workload import (  # noqa: F401
    CPU_OPTIONAL,
    CPU_SCALE,
    DTYPE_NAMES,
    DTYPES,
    GRAD_NAMES,
    PASS_LABELS,
    PASSES,
    SHAPE_NAMES,
    SHAPES,
    AttentionFn,
    Case,
    Provider,
    Shape,
    bytes_moved,
    check_parity,
    default_provider_names,
    default_scale,
    flops,
    gbps,
    make_callable,
    pct_of_roofline,
    providers_for,
    scaling_note,
    shapes_for,
    skip_reason,
)
from .reference import bilateral_attention_reference  # noqa: F401

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
