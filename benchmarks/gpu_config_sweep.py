"""Time every candidate launch config of the fused Triton kernels on a CUDA GPU.

    python benchmarks/gpu_config_sweep.py OUT.jsonl [--shapes cls224-stage1,...] [--dtype bf16]

For each benchmark shape (docs/design.md section 4) and each config in a grid wider than the
autotuner's (tile BLOCK_N x warps x stages, the static check's filters not applied), it
forces that one config on the forward and on the backward launchers, times the launcher with
triton.testing.do_bench (median, L2 flushed between repeats), and appends one JSON line per
measurement to OUT.jsonl as it goes (a cut run keeps what it measured): shape, pass
(fwd = forward launcher, combine included; bwd_s / bwd_x = one backward direction, its
delta kernel and split reduction included), config, median microseconds, GB/s of the op's
minimum traffic for that pass, and the registers / spills / shared memory of the kernels
compiled for it. The autotuner's own choice is timed too (config "tuned"); then, for
--head-dims at cls224-stage1, only the tuned choice.

It measures what the performance model (static_check --perf) predicts, so the model's
assumptions can be checked and the configs re-chosen from measurements. Exits 2 without CUDA.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch

from spatialformer_kernels.bench import workload

FWD_GRID = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
BWD_GRID = [(bn, w, s) for bn in (32, 64) for w in (4, 8) for s in (1, 2)]


def _compiled(jit_fn) -> dict:
    """CompiledKernel objects of one @triton.jit function, by cache key (Triton 3.x)."""
    found = {}
    for caches in getattr(jit_fn, "device_caches", {}).values():
        kernel_cache = caches[0] if isinstance(caches, tuple) else caches
        for key, kernel in dict(kernel_cache).items():
            found[key] = kernel
    return found


def _describe(kernel) -> dict:
    meta = getattr(kernel, "metadata", None)
    return {
        "regs": getattr(kernel, "n_regs", None),
        "spills": getattr(kernel, "n_spills", None),
        "smem": getattr(meta, "shared", None),
        "warps": getattr(meta, "num_warps", None),
        "stages": getattr(meta, "num_stages", None),
    }


def _new_kernels(jit_fns, before: dict) -> list[dict]:
    out = []
    for fn in jit_fns:
        for key, kernel in _compiled(fn).items():
            if (fn, key) not in before:
                out.append({"kernel": getattr(fn, "__name__", None) or fn.fn.__name__, **_describe(kernel)})
    return out


def _snapshot(jit_fns) -> dict:
    return {(fn, key): True for fn in jit_fns for key in _compiled(fn)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shapes", default="cls224-stage1,cls224-stage2,det800x1344-stage1,seg512-stage1")
    parser.add_argument("--head-dims", default="40,64,96,128",
                        help="after the grid: the tuned configs only, at cls224-stage1 with these head dims")
    parser.add_argument("--dtype", default="bf16", choices=sorted(workload.DTYPES))
    parser.add_argument("--rep-ms", type=float, default=60.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_config_sweep: no CUDA GPU here; nothing was run", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    from spatialformer_kernels.backends.triton import fused

    dtype = workload.DTYPES[args.dtype]
    device = torch.device("cuda")
    jit_fns = [fused._bilateral_fwd_kernel, fused._bilateral_combine_kernel, fused._bilateral_bwd_kernel,
               fused._spatial_delta_kernel]
    tuners = {"fwd": fused._bilateral_fwd, "bwd": fused._bilateral_bwd}
    default_configs = {name: list(t.configs) for name, t in tuners.items()}
    out = open(args.out, "a")

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    jobs = [(workload.shapes_for(device, [name])[0], True) for name in args.shapes.split(",") if name]
    (base,) = workload.shapes_for(device, ["cls224-stage1"])
    jobs += [(dataclasses.replace(base, name=f"cls224-stage1-D{d}", D=int(d)), False)
             for d in args.head_dims.split(",") if d]
    for shape, sweep in jobs:
        case = workload.Case.make(shape, dtype, device)
        q_s, k_s, v_s, q_x, k_x, v_x = case.inputs
        scale = shape.D ** -0.5
        with torch.no_grad():
            o_s, o_x, lse_s, lse_x = fused.attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale)
        do_s, do_x = torch.randn_like(o_s), torch.randn_like(o_x)
        element = torch.tensor([], dtype=dtype).element_size()
        bhd = shape.B * shape.H * shape.D * element
        # Minimum traffic per pass: the forward's from the workload model; direction s's
        # backward reads k_x, v_x and writes dk_x, dv_x (N side), reads q_s, o_s, dO_s and
        # writes dq_s (M side); direction x's reads q_x, dO_x and writes dq_x (its delta comes
        # from P and dP), reads k_s, v_s and writes dk_s, dv_s, and reads the float64 LSE.
        rows = shape.B * shape.H
        min_bytes = {
            "fwd": workload.bytes_moved(shape, dtype, "fwd"),
            "bwd_s": bhd * (4 * shape.N + 4 * shape.M) + rows * shape.M * 8,
            "bwd_x": bhd * (3 * shape.N + 4 * shape.M) + rows * shape.N * 8,
        }
        passes = {
            "fwd": (lambda: fused.attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale), "fwd", FWD_GRID),
            "bwd_s": (lambda: fused.attention_bwd(do_s, None, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x,
                                                  scale, None, None, True, False), "bwd", BWD_GRID),
            "bwd_x": (lambda: fused.attention_bwd(None, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x,
                                                  scale, None, None, False, True), "bwd", BWD_GRID),
        }
        for pass_name, (fn, tuner_name, grid) in passes.items():
            tuner = tuners[tuner_name]
            for config in [None] + (grid if sweep else []):
                label = "tuned"
                if config is None:
                    tuner.configs = default_configs[tuner_name]
                else:
                    bn, w, s = config
                    tuner.configs = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)]
                    label = f"n{bn}w{w}s{s}"
                tuner.cache.clear()
                before = _snapshot(jit_fns)
                row = {"shape": shape.label, "dims": shape.dims, "dtype": args.dtype, "pass": pass_name, "config": label}
                start = time.time()
                try:
                    fn()
                    torch.cuda.synchronize()
                    if config is None:
                        best = getattr(tuner, "best_config", None)
                        row["tuned_choice"] = str(best)
                    ms = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")
                    row.update(us=round(ms * 1e3, 2), gbps=round(min_bytes[pass_name] / (ms * 1e-3) / 1e9, 1),
                               min_bytes=min_bytes[pass_name])
                except Exception as error:  # record and go on: one bad config must not end the sweep
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    torch.cuda.synchronize()
                row["kernels"] = _new_kernels(jit_fns, before)
                row["seconds"] = round(time.time() - start, 2)
                emit(row)
        for t, configs in default_configs.items():
            tuners[t].configs = configs
            tuners[t].cache.clear()
        torch.cuda.empty_cache()
    compiled = [{"kernel": getattr(fn, "__name__", None) or fn.fn.__name__, "key": str(key)[:400], **_describe(k)}
                for fn in jit_fns for key, k in _compiled(fn).items()]
    emit({"summary": "every kernel compiled in this sweep", "kernels": compiled})
    return 0


if __name__ == "__main__":
    sys.exit(main())
