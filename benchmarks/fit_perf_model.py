"""Set the performance model's constants against GPU measurements of the same launches.

    python benchmarks/fit_perf_model.py MODEL.json SWEEP.jsonl [SWEEP.jsonl ...] [--exclude CASE:PASS ...] [--json OUT]

MODEL.json: rows of `static_check --perf --gpu h200 --json` (perf_model.py, MODELLED). SWEEP.jsonl:
lines of benchmarks/gpu_config_sweep.py run on that GPU (MEASURED: CUDA-graph time per launcher
pass). A measured pass is matched to the model's launches of the same case with the same
configs: `fwd` = every launch of the forward (the kernel, once per direction where they run
apart, and the combine), `bwd_s` = the
backward's direction-s launches (its delta kernel, the fused kernel, its split reduction),
`bwd_x` = the direction-x ones. Rows of a forced config are used where it is the config the
model's launch runs (with `--bwd-block-m`'s "m<BLOCK_M>" prefix: and its spatial block); a later
file's row replaces an earlier one's. A `default` row is the
default of the commit that ran the sweep: `--exclude` leaves out passes whose default has
changed since (e.g. `cls224-stage1-D128:bwd_s`).

For every combination of the model's four constants on a grid (IPC, WARP_IPC, PER_SM_BW,
LAUNCH_US; perf_model.py) the script re-times each launch from the quantities the model stored
(bytes, CTAs, residency, issue cycles, tensor time) and scores the combination by the mean
squared log ratio of modelled to measured time. It prints each pass's measured time, its time
under the current constants and under the best ones, and the best constants; it changes nothing.

SDPA's model (perf_model.sdpa_pass, FlashAttention-2) is fitted the same way on its own two
constants (FA2_PER_SM_BW, FA2_MMA_EFFICIENCY) against the sweeps' `sdpa-flash` rows (two
calls, one per direction; rows without a dtype ran at the sweep's default, bf16).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys

from spatialformer_kernels.backends.triton import configs
from spatialformer_kernels.backends.triton import launch_record as lr
from spatialformer_kernels.backends.triton import perf_model as pm

PASS_LAUNCHES = {"fwd": ("fwd", None), "bwd_s": ("bwd", (0, 1, 2)), "bwd_x": ("bwd", (3, 4))}  # None: every launch
GRID = {
    "ipc": [0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0],
    "warp_ipc": [0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5],
    "per_sm_bw": [e * 1e9 for e in (10, 12.5, 15, 17.5, 20, 22.5, 25, 30, 35, 40, 50, 60, 80)],
    "launch_us": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
}

FA2_GRID = {
    "per_sm_bw": [e * 1e9 for e in (5, 6, 7, 8, 9, 10, 11, 12.5, 15, 17.5, 20, 25, 30)],
    "mma_efficiency": [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
}
SDPA_PASSES = {"fwd": False, "fwd_bwd": True}  # sweep pass -> sdpa_pass's `backward`


def _config_label(config: dict) -> str:
    return f"n{config['BLOCK_N']}w{config['num_warps']}s{config['num_stages']}"


def model_launches(model: dict) -> dict:
    """(case, pass) -> the launch rows of bilateral bf16 without a mask, keyed as in PASS_LAUNCHES."""
    by_pass: dict = {}
    for row in model["rows"]:
        if row.get("kernel") == "(pass)" or row.get("op") != "bilateral" or row.get("dtype") != "bf16" or row.get("mask"):
            continue
        by_pass.setdefault((row["case"], row["pass"]), {})[row["launch"]] = row
    out = {}
    for (case, model_pass), launches in by_pass.items():
        for name, (wanted, indices) in PASS_LAUNCHES.items():
            if indices is None:
                indices = sorted(launches)
            if wanted == model_pass and all(i in launches for i in indices):
                out[(case, name)] = [launches[i] for i in indices]
    return out


def model_block_m(case_name: str, backward: bool) -> int | None:
    """The spatial block (BLOCK_M) the model's launches of a bilateral bf16 case use (contiguous
    rows, sm_90), or None for a case name that is not a benchmark shape."""
    shape, _, head_dim = case_name.partition("-D")
    if shape not in lr.SHAPES:
        return None
    _, _, M, _, D = lr.SHAPES[shape]
    D = int(head_dim) if head_dim else D
    return configs.block_m_for(configs.block_d_for(D), 2, backward, n_spatial=M, arch=90)


def measured_passes(paths: list[str], launches: dict) -> dict:
    """(case, pass) -> measured CUDA-graph us, for rows run at the config the model launches."""
    out = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if "config" not in row or row.get("dtype") != "bf16" or not row.get("graph_us"):
                continue
            key = (row["shape"], row["pass"])
            if key not in launches:
                continue
            main = next(r for r in launches[key] if r["kernel"] in ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel"))
            label = _config_label(main["config"])
            forced_block = re.fullmatch(r"m(\d+)(n\d+w\d+s\d+)", row["config"])  # --bwd-block-m rows
            if row["config"] in ("default", label) or (
                    forced_block and forced_block[2] == label
                    and int(forced_block[1]) == model_block_m(row["shape"], row["pass"] != "fwd")):
                out[key] = row["graph_us"]
    return out


def measured_sdpa(paths: list[str]) -> dict:
    """(shape, pass) -> (its bilateral bf16 Case, measured CUDA-graph us) of SDPA's flash backend."""
    out = {}
    for path in paths:
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            if (row.get("compare") != "sdpa-flash" or row.get("dtype", "bf16") != "bf16" or not row.get("graph_us")
                    or row.get("pass") not in SDPA_PASSES):
                continue
            dims = {part[0]: int(part[1:]) for part in row["dims"].split()}
            case = pm.Case(row["shape"], "bilateral", dims["B"], dims["H"], dims["M"], dims["N"], dims["D"], "bf16", False)
            out[(row["shape"], row["pass"])] = (case, row["graph_us"])
    return out


def sdpa_score(points: list, fa2: tuple, gpu: pm.Gpu) -> float:
    return sum(math.log(pm.sdpa_pass(case, gpu, SDPA_PASSES[name], fa2) / measured) ** 2
               for (_, name), case, measured in points) / len(points)


def fit_sdpa(paths: list[str], gpu: pm.Gpu) -> dict | None:
    """The FA2 constants' fit (module docstring), printed; None without sdpa-flash rows."""
    points = [(key, case, us) for key, (case, us) in sorted(measured_sdpa(paths).items())]
    if not points:
        return None
    current = (pm.FA2_PER_SM_BW, pm.FA2_MMA_EFFICIENCY)
    best = min(itertools.product(*FA2_GRID.values()), key=lambda c: sdpa_score(points, c, gpu))
    print(f"SDPA (FlashAttention-2), {len(points)} passes; constants (FA2_PER_SM_BW GB/s, FA2_MMA_EFFICIENCY)")
    for label, fa2 in (("current", current), ("best", best)):
        print(f"  {label:<7} {fa2[0] / 1e9:g}, {fa2[1]:g}: rms log error {math.sqrt(sdpa_score(points, fa2, gpu)):.3f}")
    table = []
    for (shape, name), case, us in points:
        now, fitted = (pm.sdpa_pass(case, gpu, SDPA_PASSES[name], fa2) for fa2 in (current, best))
        print(f"{shape:<24} {name:<8} {us:9.1f} {now:9.1f} {fitted:9.1f}  ({now / us:.2f}, {fitted / us:.2f})")
        table.append(dict(case=shape, pass_=name, measured_us=us, current_us=now, best_us=fitted))
    return dict(current=current, best=best, grid=FA2_GRID, passes=table)


def launch_us(row: dict, constants: tuple, gpu: pm.Gpu) -> float:
    """perf_model.model_kernel's time of one launch under `constants` (IPC, WARP_IPC, PER_SM_BW,
    LAUNCH_US), re-timed from the quantities the model stored for it."""
    ipc, warp_ipc, per_sm_bw, launch_cost = constants
    ctas, warps = row["ctas"], row["config"]["num_warps"]
    cycles = row["issue_us"] * 1e-6 * gpu.clock * row["ipc"]  # the busiest SM's warp-instructions
    issue = cycles / (gpu.clock * pm.sustained_ipc(ctas, row["ctas_per_sm"], warps, gpu, ipc, warp_ipc)) * 1e6
    return max(pm.memory_us(row["bytes"], ctas, gpu, per_sm_bw), issue, row["tensor_us"]) + launch_cost


def pass_us(rows: list, constants: tuple, gpu: pm.Gpu) -> float:
    return sum(launch_us(r, constants, gpu) for r in rows)


def score(points: list, constants: tuple, gpu: pm.Gpu) -> float:
    return sum(math.log(pass_us(rows, constants, gpu) / measured) ** 2 for _, rows, measured in points) / len(points)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("sweeps", nargs="+")
    parser.add_argument("--exclude", nargs="*", default=[], help="CASE:PASS pairs to leave out")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    model = json.load(open(args.model, encoding="utf-8"))
    gpu = pm.GPUS[model["gpu"]]
    launches = model_launches(model)
    measured = measured_passes(args.sweeps, launches)
    excluded = {tuple(item.rsplit(":", 1)) for item in args.exclude}
    points = [(key, launches[key], measured[key]) for key in sorted(measured) if key not in excluded]
    if not points:
        print("fit_perf_model: no measured pass matches a modelled one", file=sys.stderr)
        return 1
    current = (model["ipc"], model.get("warp_ipc", 0.25), model["per_sm_bw"], model["launch_us"])  # files before warp_ipc: 0.25
    best = min(itertools.product(*GRID.values()), key=lambda c: score(points, c, gpu))
    print(f"{len(points)} passes; constants (IPC, WARP_IPC, PER_SM_BW GB/s, LAUNCH_US)")
    print(f"  current {current[0]}, {current[1]}, {current[2] / 1e9:g}, {current[3]}: "
          f"rms log error {math.sqrt(score(points, current, gpu)):.3f}")
    print(f"  best    {best[0]}, {best[1]}, {best[2] / 1e9:g}, {best[3]}: rms log error {math.sqrt(score(points, best, gpu)):.3f}")
    print(f"{'case':<24} {'pass':<6} {'measured':>9} {'current':>9} {'best':>9}  (us; model / measured)")
    table = []
    for (case, name), rows, us in points:
        now, fitted = pass_us(rows, current, gpu), pass_us(rows, best, gpu)
        print(f"{case:<24} {name:<6} {us:9.1f} {now:9.1f} {fitted:9.1f}  ({now / us:.2f}, {fitted / us:.2f})")
        table.append(dict(case=case, pass_=name, measured_us=us, current_us=now, best_us=fitted))
    sdpa = fit_sdpa(args.sweeps, gpu)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(dict(model=args.model, sweeps=args.sweeps, current=current, best=best, grid=GRID, passes=table,
                           sdpa=sdpa), handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
