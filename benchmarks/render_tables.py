"""Regenerate the README's performance tables from the raw result files in benchmarks/results/.

Each result file is the `--benchmark-json` output of `pytest benchmarks/ --benchmark`, named
by hardware. Kernel rows are tabled per op: bilateral attention, then (where a file has
them: rows with op "masked_cross") masked cross-attention at Mask2Former's shapes. A folder `gpu-check-*/` written by benchmarks/gpu_check.sh is one result: its
`bench-*.json` files (kernels, baselines, models: separate pytest runs) are merged into one
section, each row keeping its own run's speedups; its provenance.json, when there is one,
gives the commit that ran (over the files' own), the software and a timing note. This script
rewrites only the text between the markers

    <!-- benchmark-tables:start -->
    <!-- benchmark-tables:end -->

in README.md; without the markers it prints the tables to stdout. The tables are never
typed by hand. Until a GPU result exists, the section says GPU numbers are not yet
measured; the issue-5 targets (set for an H100, bf16) are reported met / not met from an H100
result, else from an H200 one, naming the GPU.

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


def _load_file(path: Path, name: str) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    infos = [b.get("extra_info", {}) for b in data.get("benchmarks", [])]
    return {
        "file": name,
        "machine": data.get("machine_info", {}),
        "commit": data.get("commit_info", {}),
        "datetime": data.get("datetime", ""),
        "notes": data.get("spatialformer", {}),
        "kernels": [i for i in infos if "provider" in i and "pass" in i],
        "models": [i for i in infos if "images_per_s" in i],
    }  # fmt: skip


def speedup_mismatches(rows: list[dict], tolerance: float = 0.05) -> list[str]:
    """Where a row's speedup was computed against a baseline time that differs from that baseline's own row
    (a merged folder: the kernels run times every baseline for the speedups, the baselines run records
    some of them again) by more than `tolerance`: "<shape> <dtype> <pass>: <baseline> <t1> ms for <ours>'s
    speedup, <t2> ms in its column"."""
    by_key = {(r["shape"], r["dtype"], r["pass"], r["provider"]): r for r in rows}
    out = []
    for r in rows:
        if r.get("kind") != "ours" or not (r.get("median_ms") and r.get("speedup") and r.get("best_baseline")):
            continue
        shown = by_key.get((r["shape"], r["dtype"], r["pass"], r["best_baseline"]), {}).get("median_ms")
        used = r["median_ms"] * r["speedup"]
        if shown and abs(used / shown - 1) > tolerance:
            out.append(
                f"{r['shape']} {r['dtype']} {PASS_LABELS[r['pass']]}: {r['best_baseline']} {_ms(used)} for {r['provider']}'s "
                f"speedup, {_ms(shown)} in its column"
            )
    return out


def load_gpu_check(folder: Path, name: str) -> dict | None:
    """A benchmarks/gpu_check.sh folder's bench-*.json files merged into one result (None without any):
    the kernel rows and the model rows of all of them, the machine of the first with kernel rows
    (bench-kernels-*), and the folder's provenance.json under "provenance" ({} without one)."""
    paths = sorted(folder.glob("bench-*.json"), key=lambda p: (not p.name.startswith("bench-kernels"), p.name))
    if not paths:
        return None
    parts = [_load_file(p, p.name) for p in paths]
    devices = {part["machine"].get("device_name") for part in parts}
    if len(devices) > 1:
        raise ValueError(f"{folder}: bench files from different devices {sorted(map(str, devices))}")
    kernels = [row for part in parts for row in part["kernels"]]
    keys = [(r["shape"], r["dtype"], r["pass"], r["provider"]) for r in kernels]
    if len(set(keys)) < len(keys):
        raise ValueError(f"{folder}: a (shape, dtype, pass, provider) row is in more than one bench file")
    provenance_path = folder / "provenance.json"
    provenance = json.loads(provenance_path.read_text(encoding="utf-8")) if provenance_path.exists() else {}
    main = next((part for part in parts if part["kernels"]), parts[0])
    return {
        **main,
        "file": name,
        "datetime": min(part["datetime"] for part in parts),
        "kernels": kernels,
        "models": [row for part in parts for row in part["models"]],
        "sources": [part["file"] for part in parts],
        "provenance": provenance,
    }


def load_results(results_dir: Path) -> list[dict]:
    """Every result file, and every gpu-check-*/ folder merged into one result, as
    {"file", "machine", "commit", "datetime", "notes", "kernels", "models"} (a folder also has
    "sources" and "provenance"), GPU first, CPU last."""
    out = [_load_file(path, path.name) for path in sorted(results_dir.glob("*.json"))]
    for folder in sorted(p for p in results_dir.glob("gpu-check-*") if p.is_dir()):
        result = load_gpu_check(folder, folder.name + "/")
        if result is not None:
            out.append(result)
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
    """The commit that ran: provenance.json's where a gpu-check folder has one, else the file's own."""
    commit = result.get("provenance", {}).get("commit") or result["machine"].get("git_commit") or result["commit"].get("id") or "unknown"
    return commit[:12] + ("-dirty" if commit.endswith("-dirty") else "")


def _and(names: list[str]) -> str:
    names = [f"`{n}`" for n in names]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def kernel_table(rows: list[dict]) -> str:
    """One line per (shape, dtype, pass): median time per provider, then ours' bandwidth and speedup."""
    timed = [r for r in sorted(rows, key=lambda r: r["kind"] != "ours") if r.get("median_ms") is not None]
    providers = list(dict.fromkeys(r["provider"] for r in timed))  # a provider never timed has no column
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


def masked_cross_heading(rows: list[dict]) -> str:
    """The line above the masked cross-attention table: what it measures and the masks' kept fraction."""
    kept = sorted({r["mask_fraction"] for r in rows if r.get("mask_fraction") is not None})
    low, high = (f"{100 * kept[0]:.1f}", f"{100 * kept[-1]:.1f}") if kept else (None, None)
    fraction = "about 30%" if low is None else f"{low}%" if low == high else f"{low}-{high}%"
    return (
        "Masked cross-attention (Mask2Former's decoder layer: M queries over N keys, attn_mask bool "
        f"[B, M, N] keeping {fraction} of the pairs, one blob per query; GB/s counts the mask's bytes, TFLOP/s the "
        "dense op's FLOPs; SDPA with the boolean mask, FlexAttention with a BlockMask built outside the timed "
        "calls), median time per call:"
    )


def model_table(rows: list[dict]) -> str:
    lines = ["| model | mode | batch, image, dtype | path | images/s | ms per step | vs reference path |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["mode"], r["backend"] == "reference", r["backend"])):
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']}, {r['img_size']}x{r['img_size']}, {r['dtype']} | {r['backend']} "
            f"| {r['images_per_s']:.1f} | {r['median_ms']:.1f} | {_num(r.get('speedup'), '.2f', 'x')} |"
        )
    return "\n".join(lines)


TARGET_GPUS = ("h100", "h200")  # the targets were set for an H100; an H200 result is used when there is no H100 one


def _target_gpu(result: dict) -> str | None:
    """"h100" or "h200" for a CUDA result measured on one, else None."""
    if result["machine"].get("device_type") != "cuda":
        return None
    words = re.split(r"[^a-z0-9]+", result["machine"].get("device_name", "").lower())
    return next((gpu for gpu in TARGET_GPUS if gpu in words), None)


def _is_h100(result: dict) -> bool:
    return _target_gpu(result) == "h100"


def targets_section(results: list[dict]) -> str:
    """Met / not met for each issue-5 target, from the first H100 result with bilateral rows,
    else the first such H200 one."""
    measured_on = [r for r in results if _target_gpu(r) and any(k.get("op", "bilateral") == "bilateral" for k in r["kernels"])]
    chosen = min(measured_on, key=lambda r: TARGET_GPUS.index(_target_gpu(r))) if measured_on else None
    if chosen is None:
        lines = ["**Targets (H100, bf16; ours vs the best PyTorch SDPA backend):**", ""]
    else:
        m = chosen["machine"]
        gpu = m.get("device_name", "unknown GPU")
        roofline = m.get("roofline_gbps")
        where = (
            f"% of HBM roofline against this GPU's own {roofline:g} GB/s ({m.get('roofline_source')})"
            if roofline else "no HBM roofline known for this GPU"
        )  # fmt: skip
        set_for = "" if _is_h100(chosen) else "targets set for an H100, unchanged; "
        lines = [f"**Targets (bf16; measured on {gpu}, `benchmarks/results/{chosen['file']}`; ours vs the best PyTorch SDPA backend; {set_for}{where}):**", ""]
    lines += ["| target | status | measured |", "|---|---|---|"]
    for pass_, shape, min_speedup, min_roofline in TARGETS:
        goal = f"{PASS_LABELS[pass_]} {shape}: >= {min_speedup:g}x SDPA" + (f", >= {min_roofline:g}% of HBM roofline" if min_roofline else "")
        if chosen is None:
            lines.append(f"| {goal} | not yet measured | no H100 or H200 result file |")
            continue
        candidates = [
            r for r in chosen["kernels"]
            if r["kind"] == "ours" and r["shape"] == shape and r["dtype"] == "bf16" and r["pass"] == pass_ and r.get("median_ms")
        ]  # fmt: skip
        if not candidates:
            lines.append(f"| {goal} | not yet measured | no bf16 row in {chosen['file']} ({gpu}) |")
            continue
        best = min(candidates, key=lambda r: r["median_ms"])
        speedup, roofline = best.get("speedup_vs_sdpa"), best.get("pct_roofline")
        met = speedup is not None and speedup >= min_speedup and (min_roofline is None or (roofline or 0) >= min_roofline)
        measured = f"{best['provider']} {best['median_ms']:.3f} ms, {_num(speedup, '.2f', 'x')} SDPA"
        if min_roofline:
            measured += f", {_num(best.get('gbps'), '.0f')} GB/s = {_num(roofline, '.1f', '%')} of roofline"
        lines.append(f"| {goal} | {'met' if met else 'not met'} | {measured} (on {gpu}, {chosen['file']}) |")
    return "\n".join(lines)


def render(results: list[dict], cpu_speed: list[dict] = ()) -> str:
    parts = [
        "<!-- generated by `python benchmarks/render_tables.py` from benchmarks/results/*.json and "
        "benchmarks/results/gpu-check-*/; do not edit by hand -->",
        "",
    ]
    if not any(r["machine"].get("device_type") == "cuda" for r in results):
        parts += ["**GPU numbers are not yet measured** (no GPU result file in `benchmarks/results/`).", ""]
    for result in results:
        m = result["machine"]
        is_cpu = m.get("device_type") != "cuda"
        title = m.get("device_name", "unknown device")
        if is_cpu and "cpu_count" in m:
            title += f", {m['cpu_count']} cores, timed with {m.get('cpu_threads', '?')} thread(s)"
        parts += [f"#### {title} (`benchmarks/results/{result['file']}`)", ""]
        provenance = result.get("provenance", {})
        facts = [
            f"torch {m.get('torch_version')}", f"triton {m.get('triton_version')}", f"CUDA {m.get('cuda_version')}",
            f"commit `{_commit(result)}`" + (" (from provenance.json)" if provenance.get("commit") else ""),
            provenance.get("date") or result["datetime"][:10],
        ]  # fmt: skip
        parts.append(", ".join(facts) + ".")
        if provenance.get("gpu"):
            parts.append(f"GPU: {provenance['gpu']}.")
        if provenance.get("command"):
            parts.append(f"Command: `{provenance['command']}`.")
        if provenance.get("software"):
            parts.append(f"Software: {provenance['software']}.")
        if provenance.get("commit_note"):
            parts.append(f"Commit: {provenance['commit_note']}")
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
        if provenance.get("timing_note"):
            parts.append(f"Timing note: {provenance['timing_note']}")
        if result.get("sources"):
            parts.append(
                f"One run of `benchmarks/gpu_check.sh`: {_and(result['sources'])} merged (separate pytest runs, one after "
                "another). The speedup columns are those of the run that timed ours, which timed every baseline for them, "
                "including those only another run records."
            )
            mismatches = speedup_mismatches(result["kernels"])
            if mismatches:
                parts.append(f"Where a baseline's time differs between the runs, the speedup is not its column's ratio: {'; '.join(mismatches)}.")
        parts.append("")
        bilateral = [r for r in result["kernels"] if r.get("op", "bilateral") == "bilateral"]
        masked = [r for r in result["kernels"] if r.get("op") == "masked_cross"]
        if bilateral:
            parts += ["Bilateral attention, median time per call:", "", kernel_table(bilateral), ""]
        if masked:
            parts += [masked_cross_heading(masked), "", kernel_table(masked), ""]
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
