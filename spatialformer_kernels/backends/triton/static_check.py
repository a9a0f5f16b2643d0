"""Static GPU check: compile the Triton kernels as the GPU will, for sm_80 and sm_90, without a GPU.

    python -m spatialformer_kernels.backends.triton.static_check [--full] [--arch 80 90] [--jobs N]
    python -m spatialformer_kernels.backends.triton.static_check --perf [--arch 90] [--gpu h100|h200|a100] [--json FILE]
        [--shape B H M N D] [--case TEXT...]
    python -m spatialformer_kernels.backends.triton.static_check --calibrate [--case LABEL...]

The launches are the real launchers' (launch_record.py): the facade's bilateral and
cross_attention forward and backward run on CPU tensors of the benchmark shapes
(launch_record.SHAPES, D = 32) and of cls224-stage1 at D = 16 (the smallest head-dim bucket),
40, 64, 96, 128 and 256, with the kernels stubbed and the SM count of the GPU (132 for
H100/H200, 108 for A100). Each launch is bound by Triton's own run-time specialisation
(ints equal to 1 become constants, ints divisible by 16 get tt.divisibility=16,
`do_not_specialize` honoured) with the config it launches with (configs.launch_config), then
compiled for each target; sass.py reads the cubin (registers, spills, shared memory,
occupancy, tensor-core instructions, load widths, the main loop).

Default (the gate, run in CI, ~580 compiles, 4-6 minutes on 2 cores): bf16 with and without
a mask, every op, shape and head dim, and each forward and one-block backward launch at every
tail size its tile allows (`configs.tail_sizes`): one row per distinct compile; exits non-zero on
any spill, shared memory above the device limit (sm_80: 163 KB, sm_90: 227 KB per block) or
a kernel whose wgmma ptxas serialised (C7515, which ptxas reports as info, not as a warning).
`--full` (every tail size too, several hundred compiles per arch): every dtype (fp16 and fp32
too), with and without a mask; it is not in CI for time.

`--perf`: every case of `--full` for one GPU (its arch only unless --arch is given), the
modelled time per kernel and per pass (perf_model.py; every figure there is MODELLED), the
host cost per call, a table on stdout and JSON rows with `--json`. `--shape B H M N D` models
that shape instead (every op, dtype and key mask; `--case` filters on the labels).

`--calibrate [--case ...]`: compiles every config of FWD_CONFIGS / BWD_CONFIGS (not only
those the filters keep) for each fused forward/backward launch of the full case set (or the cases named)
and prints the spilling ones as MEASURED_SPILLS entries.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# The kernels must be real JIT functions, not the interpreter's stand-ins.
os.environ["TRITON_INTERPRET"] = "0"

from . import launch_record as lr  # noqa: E402
from . import perf_model as pm  # noqa: E402
from .sass import compile_task  # noqa: E402

SM_COUNT = {80: 108, 90: 132}
COVERAGE_HEAD_DIMS = (16,)  # BLOCK_D 16, compiled besides the issue's head dims


def gate_cases():
    """bf16 with and without masks (a full tile of an unmasked launch compiles without the mask
    code, a different register allocation) and the masked cross attention cases."""
    head_dims = lr.EXTRA_HEAD_DIMS + COVERAGE_HEAD_DIMS
    return lr.all_cases(dtypes=("bf16",), head_dims=head_dims) + lr.masked_cross_cases()


def full_cases():
    return lr.all_cases(head_dims=lr.EXTRA_HEAD_DIMS + COVERAGE_HEAD_DIMS) + lr.masked_cross_cases(tuple(lr.DTYPES))


def collect(cases, archs, torch_ops=False, every_config=False, every_tail=False):
    """Record every case's forward and backward for each arch's SM count and bind every launch.
    every_tail: each forward and one-block backward launch is also compiled with every tail
    size its tile allows (`tail_variants`), whether or not the case's N leaves a partial tile:
    other N take them (`configs.tail_block`). every_config: each candidate's tail is the one
    its own BLOCK_N would run.

    Returns (passes, tasks): passes[(case, backward, arch)] = [(event, [(config, task key)])];
    tasks = {task key: CompileTask}, deduplicated."""
    from . import configs

    passes, tasks = {}, {}
    for arch in archs:
        for case in cases:
            for backward in (False, True):
                bound = []
                for event in lr.record(case, SM_COUNT[arch], backward, torch_ops=torch_ops, arch=arch):
                    if isinstance(event, lr.TorchOp):
                        bound.append((event, []))
                        continue
                    candidates = event.configs
                    if every_config and event.tuned:
                        pool = configs.BWD_CONFIGS if event.name == "_bilateral_bwd_kernel" else configs.FWD_CONFIGS
                        stages = event.configs[0]["num_stages"]
                        candidates = [{**c.all_kwargs(), "num_stages": stages} for c in pool]
                    pairs = []
                    for config in candidates:
                        launched = event
                        if every_config and peeled(event):  # the tail follows the candidate's tile
                            a = event.named()
                            launched = with_tail(event, configs.tail_block(a["N"], a["CHUNK"], a["SPLITS"],
                                                                           config["BLOCK_N"], arch), config, arch)
                        task = lr.bind(launched, config, arch)
                        tasks.setdefault(task.key(), task)
                        pairs.append((config, task.key()))
                        twin = tail_twin(launched, config, arch)
                        if twin is not None:
                            tasks.setdefault(twin.key(), twin)
                        if every_tail and peeled(launched):
                            for other in tail_variants(launched, config, arch):
                                tasks.setdefault(other.key(), other)
                    bound.append((event, pairs))
                passes[(case, backward, arch)] = bound
    return passes, tasks


def with_tail(event, tail: int, config: dict, arch: int):
    """The launch with another TAIL_BLOCK_N (0: no partial-tile code); a forward's with the
    TAIL_RELOADS its launcher gives that tail (`configs.tail_reloads_spatial`)."""
    from . import configs

    kwargs = {**event.kwargs, "TAIL_BLOCK_N": tail}
    if event.name == "_bilateral_fwd_kernel":
        k = {**kwargs, **config}
        key_mask = (k["DIR_S"] and k["HAS_IMAGE_MASK"]) or (k["DIR_X"] and k["HAS_SPATIAL_MASK"])
        kwargs["TAIL_RELOADS"] = configs.tail_reloads_spatial(
            arch, event.named()["Q_X"].element_size(), k["DIR_S"], k["DIR_X"], k["BLOCK_M"], k["BLOCK_D"],
            k["BLOCK_N"], k["num_warps"], key_mask, tail)
    return dataclasses.replace(event, kwargs=kwargs)


def peeled(event) -> bool:
    """Whether a launch runs a split's partial last tile as separate code (TAIL_BLOCK_N): the
    forward and the one-block backward."""
    return event.name == "_bilateral_fwd_kernel" or (
        event.name == "_bilateral_bwd_kernel" and bool(event.kwargs.get("M_ONE_BLOCK")))


def tail_twin(event, config, arch):
    """The same forward or one-block backward launch compiled without its partial-tile code
    (TAIL_BLOCK_N=0), or None: the perf model takes the tail tile's code size from the
    difference (pm.model_kernel), since it runs only in the split that ends in a partial tile."""
    if not peeled(event) or not event.kwargs.get("TAIL_BLOCK_N"):
        return None
    return lr.bind(with_tail(event, 0, config, arch), config, arch)


def tail_variants(event, config, arch):
    """The launch compiled with every tail size its tile allows (`configs.tail_sizes`) but its
    own, each as its launcher would then make it (`tail_launch`)."""
    from .configs import tail_sizes

    block_n = {**event.kwargs, **config}["BLOCK_N"]
    sizes = [t for t in tail_sizes(block_n, arch) if t != event.kwargs["TAIL_BLOCK_N"]]
    return [lr.bind(*tail_launch(event, config, arch, t), arch) for t in sizes]


def tail_launch(event, config, arch, tail: int):
    """(launch, config) of `event` with TAIL_BLOCK_N = tail as the backward launcher makes it:
    with a partial tile, its bucket's configs.TAIL_CONFIGS entry and the ASYNC_DOTS that
    entry's stages give (`fused._bwd_direction`); else `event` with that tail and `config`."""
    from . import configs

    launched = with_tail(event, tail, config, arch)
    if not tail or event.name != "_bilateral_bwd_kernel":
        return launched, config
    a = event.named()
    elem = a["Q_X"].element_size()
    key = configs.bucket_key(arch, True, False, a["DIR_S"], a["BLOCK_M"], a["BLOCK_D"], elem)
    entry = configs.TAIL_CONFIGS.get(key)
    if entry is None:
        return launched, config
    block_n, warps, stages = entry
    launched.kwargs["ASYNC_DOTS"] = configs.async_dots(arch, stages, elem)
    return launched, {**config, "BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}


def compile_all(tasks: dict, jobs: int) -> dict:
    keys = list(tasks)
    if jobs > 1:
        # Processes, not threads: compilation holds the GIL for most of its time.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_task, [tasks[k] for k in keys]))
    else:
        results = [compile_task(tasks[k]) for k in keys]
    return dict(zip(keys, results))


def constexprs(task) -> dict:
    """A compile task's constexpr values by parameter name."""
    names = [n for n, _ in task.signature]
    return {names[path[0]]: v for path, v in task.constexprs if len(path) == 1}


def variant_text(task) -> str:
    c = constexprs(task)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_R", "BLOCK_C", "BLOCK_DC")
    parts = [f"{k.split('_')[1]}{c[k]}" for k in keys if k in c]
    if "DIR_S" in c:
        parts.append({(True, True): "both", (True, False): "s", (False, True): "x"}[(c["DIR_S"], c["DIR_X"])])
    if c.get("M_ONE_BLOCK") is False:
        parts.append("loop")
    if c.get("TAIL_BLOCK_N"):
        parts.append(f"tail{c['TAIL_BLOCK_N']}")
    if "QUERIES_SPATIAL" in c:
        parts.append("s" if c["QUERIES_SPATIAL"] else "x")
    if c.get("HAS_IMAGE_MASK") or c.get("HAS_SPATIAL_MASK") or c.get("HAS_MASK"):
        parts.append("mask")
    if c.get("HAS_PAIR_MASK"):
        parts.append("pairmask")
    options = dict(task.options)
    parts.append(f"w{options['num_warps']}s{options['num_stages']}")
    dtype = next((ty[1:] for n, ty in task.signature if n in ("Q_X", "Q", "O_S", "O")), "?")
    return f"{dtype:<4} " + " ".join(parts)


def _load_text(facts) -> str:
    return " ".join(f"{w}B:{n}" for w, n in facts["load_widths"].items()) or "-"


def _mask_label(row: dict) -> str:
    """The perf table's mask column: "y" for a key mask, "attn" for a per-query attn_mask."""
    return "attn" if row.get("attn_mask") else ("y" if row["mask"] else "-")


def gate_report(tasks, facts, out=sys.stdout) -> int:
    header = (f"{'kernel':<28} {'dtype variant':<38} {'arch':<5} {'regs':>4} {'spill':>5} {'smemKB':>6} "
              f"{'CTA/SM':>6} {'warp/SM':>7} {'TC':>4} {'loop/64tok':>10}  {'global loads (bytes:count)':<26} status")
    print(header, file=out)
    print("-" * len(header), file=out)
    failures = 0
    for key in sorted(tasks, key=lambda k: (tasks[k].name, variant_text(tasks[k]), tasks[k].arch)):
        task, f = tasks[key], facts[key]
        failures += not f["ok"]
        block_n = constexprs(task).get("BLOCK_N")
        per64 = f"{f['loop_dynamic'] * 64 / block_n:.0f}" if block_n and f["loop_static"] else "-"
        warn = " C7515" if f["wgmma_serialised"] else ""
        print(f"{task.name:<28} {variant_text(task):<38} sm_{task.arch:<2} {f['regs']:>4} {f['spills']:>5} "
              f"{f['smem'] / 1024:>6.1f} {f['ctas_per_sm']:>6} {f['warps_per_sm']:>7} {f['tensor_core_ops']:>4} "
              f"{per64:>10}  {_load_text(f):<26} {'ok' if f['ok'] else 'FAIL'}{warn}", file=out, flush=True)
    return failures


# ----------------------------------------------------------------------------------------
# --perf
# ----------------------------------------------------------------------------------------
def perf_rows(cases, passes, facts, gpu: pm.Gpu, arch: int, host: dict):
    """JSON rows: one per kernel launch (at the config with the least modelled time) and one
    per (case, pass) for 'fwd' and 'fwd+bwd'."""
    rows = []
    for case in cases:
        totals = {}
        for backward in (False, True):
            total = 0.0
            kernel_bytes = 0
            for index, (event, pairs) in enumerate(passes[(case, backward, arch)]):
                if isinstance(event, lr.TorchOp):
                    m = pm.model_torch_op(event, gpu)
                    row = dict(kernel=f"torch.{event.name}", **m)
                else:
                    best = None
                    for config, key in pairs:
                        twin = tail_twin(event, config, arch)
                        m = pm.model_kernel(event, config, facts[key], gpu, facts[twin.key()] if twin else None)
                        if best is None or m["modelled_us"] < best[1]["modelled_us"]:
                            best = (config, m, facts[key])
                    config, m, f = best
                    row = dict(kernel=event.name, config=config, regs=f["regs"], spills=f["spills"], smem=f["smem"],
                               ctas_per_sm=f["ctas_per_sm"], warps_per_sm=f["warps_per_sm"],
                               tensor_core_ops=f["tensor_core_ops"], hgmma=f["hgmma"], hmma=f["hmma"],
                               vector_loads=f["vector_loads"], narrow_loads=f["narrow_loads"],
                               load_widths=f["load_widths"], ptxas_warnings=f["ptxas_warnings"],
                               **{k: v for k, v in m.items()})
                row.update(case=case.name, op=case.op, dtype=case.dtype, mask=case.mask, attn_mask=case.attn_mask,
                           arch=arch, gpu=gpu.name,
                           pass_="bwd" if backward else "fwd", launch=index, modelled=True)
                rows.append(row)
                total += row["modelled_us"]
                kernel_bytes += row["bytes"]
            totals[backward] = (total, kernel_bytes)
        for label, backward_too in (("fwd", False), ("fwd+bwd", True)):
            modelled = totals[False][0] + (totals[True][0] if backward_too else 0)
            nbytes = pm.op_bytes(case, False) + (pm.op_bytes(case, True) if backward_too else 0)
            moved = totals[False][1] + (totals[True][1] if backward_too else 0)
            sdpa = pm.sdpa_pass(case, gpu, backward_too)
            h = host.get((case, False), {})
            hb = host.get((case, True), {})
            host_us = None
            if h:
                # steady state: every call after a signature's first runs on its launch plan
                host_us = h["planned_us"] + (hb["planned_us"] if backward_too and hb else 0)
            rows.append(dict(
                kernel="(pass)", case=case.name, op=case.op, dtype=case.dtype, mask=case.mask,
                attn_mask=case.attn_mask, arch=arch, gpu=gpu.name, pass_=label, bytes=nbytes, bytes_moved=moved, roofline_us=nbytes / gpu.bandwidth * 1e6,
                modelled_us=modelled, modelled_pct_roofline=100 * nbytes / gpu.bandwidth * 1e6 / modelled,
                sdpa_modelled_us=sdpa, ratio_to_sdpa=(modelled / sdpa) if sdpa else None, host_us=host_us,
                modelled=True,
            ))
    for row in rows:
        row["pass"] = row.pop("pass_")
    return rows


def print_perf(rows, gpu, out=sys.stdout):
    print(f"MODELLED performance on {gpu.name} ({gpu.bandwidth / 1e12:.2f} TB/s, {gpu.sms} SMs) -- no GPU ran this.",
          file=out)
    print(pm.ASSUMPTIONS, file=out)
    header = (f"{'case':<24} {'op':<9} {'dtype':<5} {'mask':<4} {'pass':<8} {'kernel':<28} {'regs':>4} {'spill':>5} "
              f"{'w/SM':>4} {'TC':>4} {'vec':>4} {'lp/64':>6} {'MB':>8} {'roof us':>8} {'issue us':>8} "
              f"{'model us':>9} {'%roof':>6} {'xSDPA':>6} {'host us':>8}")
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        pas = r["kernel"] == "(pass)"
        lp = r.get("loop_instr_per_64_tokens")
        ratio = r.get("ratio_to_sdpa")
        print(f"{r['case']:<24} {r['op']:<9} {r['dtype']:<5} {_mask_label(r):<4} {r['pass']:<8} "
              f"{r['kernel']:<28} {r.get('regs', ''):>4} {r.get('spills', ''):>5} {r.get('warps_per_sm', ''):>4} "
              f"{r.get('tensor_core_ops', ''):>4} {r.get('vector_loads', ''):>4} "
              f"{(f'{lp:.0f}' if lp else '-') if not pas else '':>6} {r['bytes'] / 1e6:>8.2f} {r['roofline_us']:>8.1f} "
              f"{r.get('issue_us', 0) if not pas else 0:>8.1f} {r['modelled_us']:>9.1f} "
              f"{r['modelled_pct_roofline']:>5.0f}% {(f'{ratio:.2f}' if ratio else '-') if pas else '':>6} "
              f"{(format(r['host_us'], '.0f') if r.get('host_us') else '-') if pas else '':>8}", file=out)


def run_perf(args) -> int:
    gpu = pm.GPUS[args.gpu]
    archs = args.arch or [gpu.arch]
    cases = lr.shape_cases(*args.shape) if args.shape else full_cases()
    cases = [c for c in cases if not args.case or any(s in c.label for s in args.case)]
    passes, tasks = collect(cases, archs, torch_ops=True)
    start = time.time()
    facts = compile_all(tasks, args.jobs)
    print(f"{len(tasks)} compiles in {time.time() - start:.0f} s with {args.jobs} job(s)", file=sys.stderr)
    failures = sum(not f["ok"] for f in facts.values())
    host = {}
    if not args.no_host:
        for case in cases:
            if case.mask or case.dtype == "fp16":
                continue  # the launch path does not depend on these
            for backward in (False, True):
                host[(case, backward)] = pm.host_cost(case, backward, SM_COUNT[gpu.arch])
        for case in cases:  # the same figure for the variants not measured
            twin = lr.Case(case.shape, case.op, case.B, case.H, case.M, case.N, case.D,
                           "bf16" if case.dtype == "fp16" else case.dtype, False)
            for backward in (False, True):
                if (twin, backward) in host:
                    host.setdefault((case, backward), host[(twin, backward)])
    rows = []
    for arch in archs:
        model_gpu = gpu if arch == gpu.arch else next(g for g in pm.GPUS.values() if g.arch == arch)
        rows += perf_rows(cases, passes, facts, model_gpu, arch, host)
    print_perf(rows, gpu)
    if failures:  # the table still stands; the gate (default mode) is what fails on these
        print(f"{failures} of the compiles spill or overflow shared memory (spills / smem columns)", file=sys.stderr)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(dict(modelled=True, gpu=args.gpu, assumptions=pm.ASSUMPTIONS, ipc=pm.IPC,
                           warp_ipc=pm.WARP_IPC, per_sm_bw=pm.PER_SM_BW, launch_us=pm.LAUNCH_US, rows=rows), handle, indent=1, default=str)
    return 0


# ----------------------------------------------------------------------------------------
# --calibrate
# ----------------------------------------------------------------------------------------
def calibrate(args) -> int:
    """Compile every FWD_CONFIGS / BWD_CONFIGS candidate of each fused forward/backward launch and print the
    MEASURED_SPILLS entries (the configs.py key) that spill or overflow shared memory."""
    cases = [c for c in full_cases() if not args.case or any(s in c.label for s in args.case)]
    passes, tasks = collect(cases, args.arch or [80, 90], every_config=True)
    start = time.time()
    facts = compile_all(tasks, args.jobs)
    print(f"{len(tasks)} compiles in {time.time() - start:.0f} s", file=sys.stderr)
    spills = {}
    for key, task in tasks.items():
        if task.name not in ("_bilateral_fwd_kernel", "_bilateral_bwd_kernel") or facts[key]["ok"]:
            continue
        c = constexprs(task)
        if c.get("HAS_PAIR_MASK"):
            continue  # their tiles are capped by configs.PAIR_MASK_TILE, not by this table
        elem = 4 if c["DOT_PRECISION"] == "ieee" else 2
        spills.setdefault(task.arch, set()).add((task.name == "_bilateral_bwd_kernel", c["DIR_S"], c["DIR_X"],
                                                 c["BLOCK_M"], c["BLOCK_D"], elem, c["BLOCK_N"], task.num_warps))
    print("# (backward, DIR_S, DIR_X, BLOCK_M, BLOCK_D, element bytes, BLOCK_N, num_warps) that spill,")
    print("# on every arch checked (MEASURED_SPILLS), then on one arch only (SPILLS_ON_ARCH):")
    everywhere = set.intersection(*spills.values()) if spills else set()
    for entry in sorted(everywhere):
        print(f"    {entry!r},")
    for arch in sorted(spills):
        print(f"# sm_{arch} only:")
        for entry in sorted(spills[arch] - everywhere):
            print(f"    {entry!r},")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="every dtype, with and without a mask")
    parser.add_argument("--perf", action="store_true", help="the MODELLED time table (perf_model.py)")
    parser.add_argument("--calibrate", action="store_true", help="derive the spilling candidate configs")
    parser.add_argument("--gpu", choices=sorted(pm.GPUS), default="h100")
    parser.add_argument("--json", help="with --perf: write the rows here")
    parser.add_argument("--no-host", action="store_true", help="with --perf: skip the host-cost timing")
    parser.add_argument("--case", nargs="+", help="with --perf / --calibrate: only cases whose label contains one")
    parser.add_argument("--shape", type=int, nargs=5, metavar=("B", "H", "M", "N", "D"),
                        help="with --perf: model this shape (every op, dtype and mask; --case filters) instead of the table's")
    parser.add_argument("--arch", type=int, nargs="+", choices=[80, 90])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    if args.shape and not args.perf:
        parser.error("--shape needs --perf")
    if args.perf:
        return run_perf(args)
    if args.calibrate:
        return calibrate(args)
    archs = args.arch or [80, 90]
    _, tasks = collect(full_cases() if args.full else gate_cases(), archs, every_tail=True)
    start = time.time()
    facts = compile_all(tasks, args.jobs)
    failures = gate_report(tasks, facts)
    print(f"{len(tasks)} compiles in {time.time() - start:.0f} s with {args.jobs} job(s), {failures} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
