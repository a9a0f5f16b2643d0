"""Regenerate the README's performance tables from the raw result files in benchmarks/results/.

Each result file is the `--benchmark-json` output of `pytest benchmarks/ --benchmark`, named
by hardware. This script rewrites only the text between the markers

    <!-- benchmark-tables:start -->
    <!-- benchmark-tables:end -->

in README.md; without the markers it prints the tables to stdout. The tables are never
typed by hand. Until a GPU result file exists, the section says GPU numbers are not yet
measured; the issue-5 targets (H100, bf16) are reported met / not met only from an H100 file.

    python benchmarks/render_tables.py               # rewrite README.md
    python benchmarks/render_tables.py --stdout      # print only
    python benchmarks/render_tables.py --check       # exit 1 when README.md is out of date

Standard library only, so it runs anywhere.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START = "<!-- benchmark-tables:start -->"
END = "<!-- benchmark-tables:end -->"
PASS_LABELS = {"fwd": "forward", "bwd": "backward", "fwd_bwd": "forward+backward"}
PASS_ORDER = ("fwd", "bwd", "fwd_bwd")

# Issue 5 item 7 (H100, bf16): (pass, shape, minimum speedup over the best SDPA backend, minimum % of roofline)
TARGETS = (
    ("fwd", "cls224-stage1", 1.5, 70.0),
    ("fwd", "det800x1344-stage1", 4.0, None),
    ("fwd_bwd", "cls224-stage1", 1.5, None),
    ("fwd_bwd", "det800x1344-stage1", 1.5, None),
)


def load_results(results_dir: Path) -> list[dict]:
    """Every result file as {"file", "machine", "commit", "datetime", "kernels", "models"}, CPU last."""
    out = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        infos = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
        out.append({
            "file": path.name,
            "machine": data.get("machine_info", {}),
            "commit": data.get("commit_info", {}),
            "datetime": data.get("datetime", ""),
            "notes": data.get("spatialformer", {}),
            "kernels": [i for i in infos if "provider" in i and "pass" in i],
            "models": [i for i in infos if "images_per_s" in i],
        })  # fmt: skip
    return sorted(out, key=lambda r: (r["machine"].get("device_type") != "cuda", r["file"]))


# Issue 4 (C++ kernel vs PyTorch SDPA computing both directions, cls224-stage1 at B=8, fp32):
# (pass, minimum speedup), from benchmarks/cpu_speed.py result files in results/cpu-speed/.
CPU_SPEED_TARGETS = (("forward", 1.5), ("forward+backward", 1.3))


def load_cpu_speed(results_dir: Path) -> list[dict]:
    """Every benchmarks/cpu_speed.py result file, with its name under "file"."""
    return [
        {"file": path.name, **json.loads(path.read_text(encoding="utf-8"))}
        for path in sorted((results_dir / "cpu-speed").glob("*.json"))
    ]


def cpu_speed_section(records: list[dict]) -> str:
    """Issue 4's table: median ms of the C++ kernel and its baselines, speedups against the targets."""
    parts = []
    for record in records:
        machine, shape = record["machine"], record["shape"]
        dims = " ".join(f"{k}{shape[k]}" for k in ("B", "H", "M", "N", "D"))
        parts += [
            f"#### C++ CPU kernel, {machine['cpu']}, {machine['threads']} threads "
            f"(`benchmarks/results/cpu-speed/{record['file']}`)",
            "",
            f"`python benchmarks/cpu_speed.py`: {dims} {shape['dtype']}, torch {record['torch']}, "
            f"commit `{record.get('commit', 'not recorded')[:12]}{'-dirty' if record.get('commit', '').endswith('-dirty') else ''}`, "
            f"{record['rounds']} interleaved rounds, load average {machine['load_average']:.2f} at the start.",
            "",
            "| pass | cpu kernel | SDPA (two calls) | torch.compile(reference) | vs SDPA | target | status |",
            "|---|---|---|---|---|---|---|",
        ]
        for pass_, target in CPU_SPEED_TARGETS:
            ms = {name: record["median_ms"][f"{name} | {pass_}"] for name in ("cpu kernel", "sdpa x2", "compile(reference)")}
            speedup = record["speedup"][f"cpu kernel vs sdpa x2 | {pass_}"]
            parts.append(
                f"| {pass_} | {_ms(ms['cpu kernel'])} | {_ms(ms['sdpa x2'])} | {_ms(ms['compile(reference)'])} "
                f"| {speedup:.2f}x | >= {target}x | {'met' if speedup >= target else 'not met'} |"
            )
        parts.append("")
    return "\n".join(parts)


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" if value < 100 else f"{value:.1f} ms"


def _num(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def _commit(result: dict) -> str:
    commit = result["machine"].get("git_commit") or result["commit"].get("id") or "unknown"
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def kernel_table(rows: list[dict]) -> str:
    """One line per (shape, dtype, pass): median time per provider, then ours' bandwidth and speedup."""
    providers = list(dict.fromkeys(r["provider"] for r in sorted(rows, key=lambda r: r["kind"] != "ours")))
    ours = [p for p in providers if p.startswith("ours-")]
    has_roofline = any(r.get("pct_roofline") is not None for r in rows)
    header = ["shape", "dtype", "pass", *providers]
    for p in ours:
        header += [f"{p} GB/s"] + ([f"{p} % roofline"] if has_roofline else []) + [f"{p} TFLOP/s", f"{p} vs best baseline", f"{p} vs best SDPA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["shape"], r["dtype"], r["pass"]), {})[r["provider"]] = r
    shape_order = list(dict.fromkeys(r["shape"] for r in rows))
    for key in sorted(groups, key=lambda k: (shape_order.index(k[0]), k[1], PASS_ORDER.index(k[2]))):
        group = groups[key]
        any_row = next(iter(group.values()))
        dims = f"B{any_row['B']} H{any_row['H']} M{any_row['M']} N{any_row['N']} D{any_row['D']}"
        cells = [f"{key[0]} ({dims})", key[1], PASS_LABELS[key[2]]]
        cells += [_ms(group[p]["median_ms"]) if p in group else "-" for p in providers]
        for p in ours:
            r = group.get(p, {})
            cells.append(_num(r.get("gbps"), ".1f"))
            if has_roofline:
                cells.append(_num(r.get("pct_roofline"), ".1f", "%"))
            cells += [_num(r.get("tflops"), ".3f"), _num(r.get("speedup"), ".2f", "x"), _num(r.get("speedup_vs_sdpa"), ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    lines = ["| model | mode | batch, image, dtype | path | images/s | ms per step | vs reference path |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["mode"], r["backend"] == "reference", r["backend"])):
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']}, {r['img_size']}x{r['img_size']}, {r['dtype']} | {r['backend']} "
            f"| {r['images_per_s']:.1f} | {r['median_ms']:.1f} | {_num(r.get('speedup'), '.2f', 'x')} |"
        )
    return "\n".join(lines)


def _is_h100(result: dict) -> bool:
    name = result["machine"].get("device_name", "")
    return result["machine"].get("device_type") == "cuda" and "h100" in re.split(r"[^a-z0-9]+", name.lower())


def targets_section(results: list[dict]) -> str:
    """Met / not met for each issue-5 target, from the first H100 result file."""
    lines = ["**Targets (H100, bf16; ours vs the best PyTorch SDPA backend):**", ""]
    h100 = next((r for r in results if _is_h100(r)), None)
    lines += ["| target | status | measured |", "|---|---|---|"]
    for pass_, shape, min_speedup, min_roofline in TARGETS:
        goal = f"{PASS_LABELS[pass_]} {shape}: >= {min_speedup:g}x SDPA" + (f", >= {min_roofline:g}% of HBM roofline" if min_roofline else "")
        if h100 is None:
            lines.append(f"| {goal} | not yet measured | no H100 result file |")
            continue
        candidates = [
            r for r in h100["kernels"]
            if r["kind"] == "ours" and r["shape"] == shape and r["dtype"] == "bf16" and r["pass"] == pass_ and r.get("median_ms")
        ]  # fmt: skip
        if not candidates:
            lines.append(f"| {goal} | not yet measured | no bf16 row in {h100['file']} |")
            continue
        best = min(candidates, key=lambda r: r["median_ms"])
        speedup, roofline = best.get("speedup_vs_sdpa"), best.get("pct_roofline")
        met = speedup is not None and speedup >= min_speedup and (min_roofline is None or (roofline or 0) >= min_roofline)
        measured = f"{best['provider']} {best['median_ms']:.3f} ms, {_num(speedup, '.2f', 'x')} SDPA"
        if min_roofline:
            measured += f", {_num(best.get('gbps'), '.0f')} GB/s = {_num(roofline, '.1f', '%')} of roofline"
        lines.append(f"| {goal} | {'met' if met else 'not met'} | {measured} ({h100['file']}) |")
    return "\n".join(lines)


def render(results: list[dict], cpu_speed: list[dict] = ()) -> str:
    parts = ["<!-- generated by `python benchmarks/render_tables.py` from benchmarks/results/*.json; do not edit by hand -->", ""]
    if not any(r["machine"].get("device_type") == "cuda" for r in results):
        parts += ["**GPU numbers are not yet measured** (no GPU result file in `benchmarks/results/`).", ""]
    for result in results:
        m = result["machine"]
        is_cpu = m.get("device_type") != "cuda"
        title = m.get("device_name", "unknown device")
        if is_cpu and "cpu_count" in m:
            title += f", {m['cpu_count']} cores, timed with {m.get('cpu_threads', '?')} thread(s)"
        parts += [f"#### {title} (`benchmarks/results/{result['file']}`)", ""]
        facts = [
            f"torch {m.get('torch_version')}", f"triton {m.get('triton_version')}", f"CUDA {m.get('cuda_version')}",
            f"commit `{_commit(result)}`", result["datetime"][:10],
        ]  # fmt: skip
        parts.append(", ".join(facts) + ".")
        if m.get("shape_scaling"):
            parts.append(f"Shapes: {m['shape_scaling']}.")
        roofline = m.get("roofline_gbps")
        parts.append(
            f"Roofline: {roofline:g} GB/s ({m.get('roofline_source')})." if roofline else f"Roofline: {m.get('roofline_source', 'unknown')}."
        )
        if m.get("load_average_1min") is not None and (m.get("busy_cores") or 0) < 0.5:
            parts.append(f"No other process kept a core busy when the run started (load average {m['load_average_1min']:g}).")
        elif m.get("load_average_1min") is not None:
            parts.append(
                f"A shared machine: other processes kept {m.get('busy_cores', '?')} of {m.get('cpu_count')} cores busy when the run "
                f"started (load average {m['load_average_1min']:g}), so timings are noisy; fewer threads than cores avoids "
                "measuring the scheduler."
            )
        if result["notes"].get("timing"):
            parts.append(f"Timing: {result['notes']['timing']}; median per row, each row parity-checked first.")
        parts.append("")
        if result["kernels"]:
            parts += ["Bilateral attention, median time per call:", "", kernel_table(result["kernels"]), ""]
        if result["models"]:
            parts += ["Whole model:", "", model_table(result["models"]), ""]
    if cpu_speed:
        parts.append(cpu_speed_section(list(cpu_speed)))
    parts.append(targets_section(results))
    return "\n".join(parts).rstrip() + "\n"


def rewrite(readme: str, tables: str) -> str | None:
    """README text with the marked section replaced, or None when the markers are missing."""
    start, end = readme.find(START), readme.find(END)
    if start < 0 or end < start:
        return None
    return readme[: start + len(START)] + "\n" + tables + readme[end:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--stdout", action="store_true", help="print the tables, do not touch the README")
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's tables are out of date")
    args = parser.parse_args(argv)
    tables = render(load_results(args.results), load_cpu_speed(args.results))
    if args.stdout:
        print(tables, end="")
        return 0
    readme = args.readme.read_text(encoding="utf-8") if args.readme.exists() else ""
    updated = rewrite(readme, tables)
    if updated is None:
        print(f"{args.readme} has no {START} ... {END} markers; the tables follow:", file=sys.stderr)
        print(tables, end="")
        return 1 if args.check else 0
    if args.check:
        if updated != readme:
            print(f"{args.readme}: benchmark tables are out of date; run python benchmarks/render_tables.py", file=sys.stderr)
            return 1
        return 0
    if updated != readme:
        args.readme.write_text(updated, encoding="utf-8")
        print(f"rewrote the benchmark tables in {args.readme}")
    else:
        print(f"{args.readme} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
