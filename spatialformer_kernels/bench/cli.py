"""The `spatialformer-bench` command: the output (tables, JSON, plot) and the command line
(the harness is described in the package docstring, spatialformer_kernels/bench/__init__.py).

    spatialformer-bench                         # default shapes, table + JSON + PNG in ./bench-out/
    TRITON_INTERPRET=0 spatialformer-bench      # without CUDA: skip the Triton kernels' parity check
    spatialformer-bench --quick                 # a few seconds
    spatialformer-bench --shapes cls224-stage1 --passes fwd --dtypes bf16
    spatialformer-bench --shapes m2f512-s8 m2f512-s16 m2f512-s32   # masked cross-attention only
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import torch

from .measurement import (
    IDLE_BELOW,
    NOT_A_CHECKOUT,
    SPEEDUP_NOTE,
    BenchSession,
    Row,
    busy_cores,
    choose_threads,
    environment,
    wait_for_idle,
)
from .workload import (
    CPU_SCALE,
    DTYPE_NAMES,
    DTYPES,
    FLEX_MASK_NOTE,
    MASKED_SHAPE_NAMES,
    PASS_LABELS,
    PASSES,
    SHAPE_NAMES,
    ParityCheck,
    Provider,
    Shape,
    default_provider_names,
    default_scale,
    mask_note,
    mask_summary,
    providers_for,
    scaling_note,
    shapes_for,
)

# ----------------------------------------------------------------------------------------
# Output: header, parity and timing tables, JSON, plot
# ----------------------------------------------------------------------------------------


def _fmt(value, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _columns(lines: Sequence[tuple]) -> list[str]:
    """Left-aligned columns, a rule under the first line; the last column is not padded."""
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]) - 1)]
    out = []
    for i, line in enumerate(lines):
        out.append(("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) + "  " + str(line[-1])).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * len(str(line[-1])))
    return out


def load_note(env: dict) -> str:
    """What other processes did to a CPU run: idle or busy (and by how much) at the start, and at the end once known."""
    waited = env.get("load_wait_s") or 0.0
    if env["idle"]:
        note = "idle" + (f" (after waiting {waited:.1f} s for other processes to finish)" if waited else "")
    else:
        note = (
            f"BUSY: other processes keep {env['busy_cores']:.1f} of {env['cpu_count']} cores busy, still after waiting "
            f"{waited:.0f} s: every row is slower and noisier than on an idle machine"
        )
    end = env.get("busy_cores_at_end")
    if end is None:
        return note
    if end < IDLE_BELOW:
        return f"{note}; idle at the end"
    return f"{note}; BUSY at the end: other processes kept {end:.1f} of {env['cpu_count']} cores busy, so the last rows may be slowed"


def header_lines(env: dict, providers: Sequence[Provider], shapes: Sequence[Shape], budget_s: float, threads_arg: str) -> list[str]:
    """What the tables need to be read alone: device, threads, load, commit, method and column meanings."""
    cpu = env["device_type"] == "cpu"
    if cpu:
        device = f"{env['device_name']}, {env['cpu_count']} cores (cpu)"
    else:
        device = f"{env['device_name']} (cuda, capability {env['capability']}, {env['sm_count']} SMs), CUDA {env['cuda']}"
    lines = [
        f"device: {device}; torch {env['torch']}, triton {env['triton']}, Python {env['python']}",
        f"commit: {env['git_commit']}",
    ]
    if cpu:
        lines.append(f"threads: {env['cpu_threads']} (--threads {threads_arg}) on {env['cpu_count']} cores")
        lines.append(f"load: {load_note(env)}")
    baselines = [p.name for p in providers if p.kind == "baseline" and not p.skip]
    roofline = env["roofline"]
    lines += [
        f"backends available: {', '.join(env['backends'])}; providers: {', '.join(p.name for p in providers)}",
        scaling_note(shapes),
        "timing: " + (
            f"triton.testing.do_bench (CUDA events, L2 flushed before each call), {budget_s:g} s per row, median"
            if not cpu else f"time.perf_counter per call after a warm-up call, {budget_s:g} s per row (5 to 200 calls), median"
        ),
        "GB/s, TFLOP/s: the op's minimum bytes and matmul FLOPs (the same for every provider) / median time; "
        "peak MiB: " + ("torch.cuda.max_memory_allocated above the start of one call" if not cpu else "growth of peak RSS during one call (approximate)"),
        SPEEDUP_NOTE.format(baselines=", ".join(baselines) or "none selected"),
        f"% roof: of {roofline['peak_gbps']:g} GB/s ({roofline['source']})" if roofline["peak_gbps"]
        else f"% roof: empty: {roofline['source']}",
    ]  # fmt: skip
    return lines + masked_cross_lines(shapes, providers)


def masked_cross_lines(shapes: Sequence[Shape], providers: Sequence[Provider]) -> list[str]:
    """What a masked cross-attention row measures, and each masked shape's masks (none without such shapes)."""
    masked = [s for s in shapes if s.op == "masked_cross"]
    if not masked:
        return []
    lines = [
        "masked cross (op masked_cross): q [B,H,M,D] over k, v [B,H,N,D] (M queries, N keys) with attn_mask bool "
        "[B,M,N] (True = attend, broadcast over the heads); its bytes include the mask's B*M*N, its FLOPs are the "
        "dense op's (masked pairs counted); SDPA gets the mask as a [B, 1, M, N] view",
    ]
    if any(p.name == "flex" for p in providers):
        lines.append(f"flex on masked cross: {FLEX_MASK_NOTE} (create_block_mask, its mask_mod reading the mask)")
    return lines + [mask_note(s) for s in masked]


def format_parity(checks: Sequence[tuple[Shape, ParityCheck]]) -> str:
    """One line per (shape, dtype, provider): max error vs bound of outputs (fwd) and of outputs
    and gradients (bwd, fwd_bwd), and pass or FAIL."""
    groups: dict = {}
    for shape, check in checks:
        groups.setdefault((shape.label, check.dtype, check.provider), {"dims": set()})[check.with_grads] = check
        groups[(shape.label, check.dtype, check.provider)]["dims"].add(check.dims)
    lines = [("shape", "checked on", "dtype", "provider", "outputs (fwd)", "outputs and gradients (bwd, fwd_bwd)", "result")]
    for (label, dtype, provider), done in groups.items():
        found = [done[g] for g in (False, True) if g in done]
        lines.append((
            label, ", ".join(sorted(done["dims"])), dtype, provider,
            done[False].summary() if False in done else "-", done[True].summary() if True in done else "-",
            "pass" if all(c.passed for c in found) else "FAIL",
        ))  # fmt: skip
    rule = (
        "parity, checked before timing: max |actual - float64 reference| <= or > the bound of "
        "spatialformer_kernels.testing's tolerance rule (2 x the reference's own error in the dtype + a floor), "
        "for the tensor nearest its bound"
    )
    return "\n".join([rule, *(_columns(lines) if len(lines) > 1 else ["no provider was checked"])])


OP_COLUMN = {"bilateral": "bilateral", "masked_cross": "masked cross"}
# Row statuses listed below the table (provider and reason once), with their label there.
BELOW_TABLE = {"untimed": "not timed", "skipped": "skipped", "wrong": "wrong results, not timed:"}


def format_table(rows: Sequence[Row]) -> str:
    """Measured and failed rows as a table; untimed, skipped and wrong (a baseline failing parity)
    providers once each, with the reason, below it."""
    lines = [("shape", "op", "dims", "dtype", "pass", "provider", "median ms", "GB/s", "% roof", "TFLOP/s", "speedup", "vs SDPA", "peak MiB", "note")]
    for r in rows:
        if r.status in BELOW_TABLE:
            continue
        mem = None if r.peak_mem_bytes is None else r.peak_mem_bytes / 2**20
        lines.append((
            r.shape, OP_COLUMN.get(r.op, r.op), f"B{r.B} H{r.H} M{r.M} N{r.N} D{r.D}", r.dtype, r.pass_, r.provider,
            _fmt(r.median_ms, ".3f"), _fmt(r.gbps, ".2f"), _fmt(r.pct_roofline, ".1f"), _fmt(r.tflops, ".3f"),
            _fmt(r.speedup, ".2f") + ("x" if r.speedup else ""), _fmt(r.speedup_vs_sdpa, ".2f") + ("x" if r.speedup_vs_sdpa else ""),
            _fmt(mem, ".1f"), r.note,
        ))  # fmt: skip
    out = _columns(lines) if len(lines) > 1 else ["no row was timed"]
    below: dict = {}
    for r in rows:
        if r.status in BELOW_TABLE:
            below.setdefault((r.status, r.provider, r.note), set()).add(r.pass_)
    for (status, provider, note), passes in below.items():
        label = BELOW_TABLE[status]
        out.append(f"{label} {provider} ({', '.join(p for p in PASSES if p in passes)}): {note}")
    return "\n".join(out)


def plot(rows: Sequence[Row], path: Path, title: str, peak_gbps: Optional[float] = None) -> Optional[Path]:
    """Effective GB/s per shape, a bar per provider (higher is better), one panel per (pass,
    dtype); no file and None when no row was timed. matplotlib is imported here only."""
    ok = [r for r in rows if r.status == "ok"]
    if not ok:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.pass_, r.dtype) for r in ok}, key=lambda p: (PASSES.index(p[0]), p[1]))
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(r.provider for r in ok))}
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.8), squeeze=False, layout="constrained")
    for ax, (pass_, dtype) in zip(axes[0], panels):
        subset = [r for r in ok if r.pass_ == pass_ and r.dtype == dtype]
        shapes = list(dict.fromkeys((r.shape, r.B, r.H, r.N) for r in subset))
        ops = {r.shape: r.op for r in subset}
        providers = list(dict.fromkeys(r.provider for r in subset))
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            by_shape = {(r.shape, r.B, r.H, r.N): r.gbps for r in subset if r.provider == provider}
            xs = [j for j, s in enumerate(shapes) if s in by_shape]
            ours = any(r.kind == "ours" for r in subset if r.provider == provider)
            ax.bar([x + (i - (len(providers) - 1) / 2) * width for x in xs], [by_shape[shapes[x]] for x in xs], width,
                   label=provider, color=colors[provider], edgecolor="black" if ours else "none")  # fmt: skip
        if peak_gbps:
            ax.axhline(peak_gbps, color="black", linestyle=":", label=f"roofline {peak_gbps:g} GB/s")
        md = sorted({(r.M, r.D) for r in subset})
        ms = {r.shape: r.M for r in subset}
        ticks = [
            f"{name}\n" + ("masked cross " if ops[name] == "masked_cross" else "")
            + f"B{b} H{h}" + (f" M{ms[name]}" if len(md) > 1 else "") + f" N{n}"
            for name, b, h, n in shapes
        ]  # fmt: skip
        ax.set_xticks(range(len(shapes)), ticks, fontsize=7)
        ax.set_xlabel("shape" + (f" (M {md[0][0]}, D {md[0][1]} in each)" if len(md) == 1 else ""))
        ax.set_ylabel("effective GB/s (higher is better)")
        ax.set_title(f"{PASS_LABELS[pass_]}, {dtype}")
        ax.grid(True, axis="y", alpha=0.3)
    legend = {label: handle for ax in axes[0] for handle, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 8), fontsize=8)
    fig.suptitle("\n".join(textwrap.fill(line, 60 * len(panels)) for line in title.splitlines()), fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


QUICK_SHAPES = ("cls224-stage1", "det800x1344-stage1", "m2f512-s32")  # both ops


def _parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="spatialformer-bench",
        description="Benchmark bilateral cross-attention, and masked cross-attention at Mask2Former's shapes "
        f"({', '.join(MASKED_SHAPE_NAMES)}), against the reference and every baseline "
        "(parity first, then time). Writes table.txt, results.json and plot.png. Without CUDA, the "
        "Triton kernels' parity is checked in Triton's interpreter on reduced shapes (not timed); "
        "TRITON_INTERPRET=0 skips that.",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory (default ./bench-out/)")
    parser.add_argument("--quick", action="store_true",
                        help=f"shapes {', '.join(QUICK_SHAPES)} (on CPU the bilateral ones scaled down 32x), short timing, "
                        "no torch.compile: seconds")
    parser.add_argument("--shapes", nargs="+", choices=SHAPE_NAMES,
                        help="docs/design.md section 4 shapes and the masked cross-attention m2f512-* shapes (default: all)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, help="default: all three")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--providers", nargs="+", help="provider names (default: all that run here)")
    parser.add_argument("--scale", type=int, help=f"divide B and N of the bilateral shapes by this (default {CPU_SCALE} on CPU, "
                        "1 on CUDA; m2f512-* are never scaled)")
    parser.add_argument("--budget", type=float, help="timed seconds per row (default 0.25, --quick 0.05)")
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth for %% of roofline (overrides the table)")
    parser.add_argument("--measure-bandwidth", action="store_true", help="use a measured copy bandwidth as the roofline")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", default="auto", help="CPU threads: a number, or auto (fewer when other processes keep cores busy)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def _interpreter_command() -> Optional[list[str]]:
    """On a machine without CUDA, the command line again under Triton's interpreter, so that
    the Triton kernels' parity is checked too: TRITON_INTERPRET must be set before Triton
    defines a kernel, which `import torch` has already prepared for in this process. None
    when there is CUDA, no Triton, or the user set TRITON_INTERPRET either way."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or importlib.util.find_spec("triton") is None:
        return None
    return [sys.executable, "-m", "spatialformer_kernels.bench", *sys.argv[1:]]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (`spatialformer-bench`); argv=None reads sys.argv."""
    command = _interpreter_command() if argv is None else None
    if command is not None:
        # The same package again, not whatever a `-m` run would find first in the current folder.
        here = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        os.execve(sys.executable, command, {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, "PYTHONSAFEPATH": "1"})
    threads = torch.get_num_threads()
    try:
        return _main(_parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (tests)


def _main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.quick:
        shape_names = args.shapes or list(QUICK_SHAPES)
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
    load = None
    if device.type == "cpu":
        load = wait_for_idle()
        torch.set_num_threads(choose_threads(args.threads, load[0]))
    env = environment(device, args.peak_gbps, args.measure_bandwidth, load)
    session = BenchSession(device, providers, budget_s=budget, peak_gbps=env["roofline"]["peak_gbps"])
    header = header_lines(env, providers, shapes, budget, args.threads)
    print("spatialformer-bench: every provider is checked against the reference, then timed")
    print("\n".join(header))

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

    if device.type == "cpu":
        env["busy_cores_at_end"] = round(busy_cores(), 2)
        header = header_lines(env, providers, shapes, budget, args.threads)
    checks = session.parity_checks()
    tables = f"{format_parity(checks)}\n\ntimings (each row passed its parity check first)\n{format_table(rows)}"
    print(f"\n{tables}")
    if device.type == "cpu":
        print(f"load: {load_note(env)}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.txt").write_text("\n".join(["# spatialformer-bench", *header, "", tables, ""]), encoding="utf-8")
    result = {
        "environment": env,
        "config": {
            "shapes": [dataclasses.asdict(s) for s in shapes],
            "scaling": scaling_note(shapes),
            "dtypes": dtype_names,
            "passes": passes,
            "providers": [p.name for p in providers],
            "budget_s": budget,
            "threads": args.threads,
            "timing": "triton.testing.do_bench, L2 flushed" if device.type == "cuda" else "perf_counter per call, median",
            "work_model": "bytes and FLOPs as in spatialformer_kernels.bench's docstring",
            "ops": {s.label: s.op for s in shapes},
            "masks": {s.label: mask_summary(s) for s in shapes if s.op == "masked_cross"},
            "speedup": SPEEDUP_NOTE.format(baselines=", ".join(p.name for p in providers if p.kind == "baseline" and not p.skip)),
        },
        "parity": [{"shape": shape.label, **check.metrics()} for shape, check in checks],
        "rows": [r.metrics() for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
    (args.out / "plot.png").unlink(missing_ok=True)  # never leave an earlier run's plot beside these results
    commit = env["git_commit"]
    commit = commit if commit == NOT_A_CHECKOUT else f"commit {commit[:12]}{'-dirty' if commit.endswith('-dirty') else ''}"
    where = "cuda"
    if device.type == "cpu":
        idle = env["idle"] and env["busy_cores_at_end"] < IDLE_BELOW
        where = f"cpu, {env['cpu_threads']} thread(s), {'idle' if idle else 'busy: see table.txt'}"
    title = f"spatialformer-bench on {env['device_name']} ({where}), {commit}\n{scaling_note(shapes)}"
    plotted = plot(rows, args.out / "plot.png", title, env["roofline"]["peak_gbps"])
    written = [args.out / "table.txt", args.out / "results.json", *([plotted] if plotted else [])]
    print(f"wrote {', '.join(map(str, written))}" + ("" if plotted else " (no plot: no row was timed)"))
    failed = [r for r in rows if r.status == "failed"]
    for r in failed:
        print(f"FAILED {r.shape} {r.dtype} {r.pass_} {r.provider}: {r.note}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
