"""Time every candidate launch config of the fused Triton kernels on a CUDA GPU.

    python benchmarks/gpu_config_sweep.py OUT.jsonl [--shapes cls224-stage1,...] [--dtype bf16]
    python benchmarks/gpu_config_sweep.py OUT.jsonl --shapes "" --compare "" --head-dims 64 --bwd-block-m 32,64

First, at the --compare shapes: ours against SDPA (two calls; cuDNN and FlashAttention
backends) through the public functions, forward and forward + backward. Then, for each
benchmark shape (docs/design.md section 4) and each config in a grid wider than the
candidates (tile BLOCK_N x warps x stages, the static check's filters not applied), it forces
that one config on the forward or backward launcher (configs.forced_config) and times the
launcher; the default config (configs.launch_config) is timed too. Before the grid, at
cls224-stage1 with each of --head-dims, only the default is timed, unless --bwd-block-m names
spatial block sizes: then both backward directions at those head dims also run the backward
grid at each BLOCK_M (rows labelled m<BLOCK_M>n<BLOCK_N>w<warps>s<stages>). Then, at
cls224-stage2 with each of --tail-head-dims (N = 784 leaves a partial 32-token tile), the
defaults and direction x's backward at TAIL_GRID's configs. Each measurement is one JSON line appended to OUT.jsonl as it
goes (a cut run keeps what it measured): shape, pass (fwd = forward launcher, combine
included; bwd_s / bwd_x = one backward direction, its delta kernel and split reduction
included), config, the largest difference of its outputs from the default config's
(max |a - b| / max |b| over the outputs, a check that the tiling computes the same function),
the registers / spills / shared memory of the kernels compiled for it, and three times in
microseconds:
  us            triton.testing.do_bench median (CUDA events around each call, L2 flushed
                between calls): includes any time the GPU waits for the host;
  graph_us      per call inside a CUDA graph (no host in the way; L2 not flushed);
  pipelined_us  wall time per call of back-to-back eager calls (the larger of host and GPU).

It measures what the performance model (static_check --perf) predicts, so the model's
assumptions can be checked, and its results fill configs.MEASURED_CONFIGS. Exits 2 without CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time

import torch

from spatialformer_kernels.bench import workload

FWD_GRID = [(bn, w, s) for bn in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
BWD_GRID = [(bn, w, s) for bn in (32, 64) for w in (4, 8) for s in (1, 2)]
# Direction x's backward at D = 72 to 128 where N leaves a partial 32-token tile: the 4-warp
# configs of whole tiles (one with C7515 there, one spilling at some tail sizes in the static
# gate) against configs.TAIL_CONFIGS' 8 warps, which the model puts 35% slower.
TAIL_GRID = [(32, 4, 2), (32, 4, 1), (32, 8, 1)]


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


def _snapshot(jit_fns) -> set:
    return {(fn, key) for fn in jit_fns for key in _compiled(fn)}


def graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """GPU time per call with no host in the way: `calls` calls captured in one CUDA graph,
    the median replay over `replays`, divided by `calls`. L2 is not flushed between the calls
    (inputs larger than the 60 MB L2 of an H100/H200 stream from HBM anyway)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()  # warm-up outside capture: compiles, allocator pools
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    del graph
    return sorted(times)[len(times) // 2]


def pipelined_us(fn, calls: int = 50, rounds: int = 5) -> float:
    """Wall time per call of `calls` back-to-back eager calls (what a training loop sees: the
    larger of the host's launch cost and the GPU's time), the median of `rounds`."""
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e6 / calls)
    return sorted(times)[len(times) // 2]


COMPARED = ("ours-triton", "sdpa-cudnn", "sdpa-flash")


def compare(shape, dtype, emit) -> None:
    """Ours against SDPA (two calls, cuDNN and FlashAttention backends), the benchmark
    harness's providers and callables, forward and forward + backward: eager (do_bench), CUDA
    graph and pipelined."""
    from triton.testing import do_bench

    case = workload.Case.make(shape, dtype, torch.device("cuda"))
    providers = [p for p in workload.providers_for(torch.device("cuda")) if p.name in COMPARED]
    for provider in providers:
        for pass_name in ("fwd", "fwd_bwd"):
            row = {"compare": provider.name, "shape": shape.label, "dims": shape.dims, "pass": pass_name,
                   "dtype": workload.DTYPE_NAMES[dtype]}
            try:
                with provider.context():
                    call = workload.make_callable(provider, case, pass_name)
                    call()
                    torch.cuda.synchronize()
                    row["eager_us"] = round(do_bench(call, warmup=10, rep=60, return_mode="median") * 1e3, 2)
                    row["pipelined_us"] = round(pipelined_us(call), 2)
                    row["graph_us"] = round(graph_us(call), 2)
                    row["min_bytes"] = workload.bytes_moved(shape, dtype, pass_name)
                    row["graph_gbps"] = round(row["min_bytes"] / (row["graph_us"] * 1e-6) / 1e9, 1)
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
            emit(row)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--shapes", default="cls224-stage1,cls224-stage2,det800x1344-stage1")
    parser.add_argument("--head-dims", default="32,40,64,96,128",
                        help="before the grid: the default configs only, at cls224-stage1 with these head dims")
    parser.add_argument("--bwd-block-m", default="",
                        help="at the --head-dims: the backward grid at each of these spatial block sizes too")
    parser.add_argument("--tail-head-dims", default="96",
                        help="then, at cls224-stage2 (N = 784: a 16-token partial tile) with these head dims, "
                             "direction x's backward at TAIL_GRID's configs and the default")
    parser.add_argument("--dtype", default="bf16", choices=sorted(workload.DTYPES))
    parser.add_argument("--rep-ms", type=float, default=40.0)
    parser.add_argument("--compare", default="cls224-stage1,cls224-stage2,det800x1344-stage1,seg512-stage1",
                        help="first: ours vs SDPA x2 through the public functions at these shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_config_sweep: no CUDA GPU here; nothing was run", file=sys.stderr)
        return 2

    import triton
    from triton.testing import do_bench

    from spatialformer_kernels.backends.triton import common, configs, fused

    dtype = workload.DTYPES[args.dtype]
    device = torch.device("cuda")
    jit_fns = [fused._bilateral_fwd_kernel, fused._bilateral_combine_kernel, fused._bilateral_bwd_kernel,
               fused._spatial_delta_kernel, common._reduce_splits_kernel]
    out = open(args.out, "a")

    def emit(row):
        out.write(json.dumps(row) + "\n")
        out.flush()
        print(json.dumps(row), flush=True)

    (base,) = workload.shapes_for(device, ["cls224-stage1"])
    block_ms = [int(m) for m in args.bwd_block_m.split(",") if m]
    jobs = [(dataclasses.replace(base, name=f"cls224-stage1-D{d}", D=int(d)), "bwd_block_m" if block_ms else None)
            for d in args.head_dims.split(",") if d]
    (stage2,) = workload.shapes_for(device, ["cls224-stage2"])
    jobs += [(dataclasses.replace(stage2, name=f"cls224-stage2-D{d}", D=int(d)), "tail")
             for d in args.tail_head_dims.split(",") if d]
    jobs += [(workload.shapes_for(device, [name])[0], "configs") for name in args.shapes.split(",") if name]
    for name in args.compare.split(","):
        if name:
            compare(workload.shapes_for(device, [name])[0], dtype, emit)
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
        default_outputs = {}
        for pass_name, (fn, kind, grid) in passes.items():
            if sweep == "configs":
                grid = [(None, *config) for config in grid]
            elif sweep == "bwd_block_m" and kind == "bwd":
                grid = [(bm, *config) for bm in block_ms for config in BWD_GRID]
            elif sweep == "tail" and pass_name == "bwd_x":
                grid = [(None, *config) for config in TAIL_GRID]
            else:
                grid = []
            for config in [None] + grid:
                label, forced = "default", contextlib.nullcontext()
                if config is not None:
                    bm, bn, w, s = config
                    label = (f"m{bm}" if bm else "") + f"n{bn}w{w}s{s}"
                    kwargs = {"BLOCK_N": bn} if bm is None else {"BLOCK_M": bm, "BLOCK_N": bn}
                    forced = configs.forced_config(kind, triton.Config(kwargs, num_warps=w, num_stages=s))
                before = _snapshot(jit_fns)
                row = {"shape": shape.label, "dims": shape.dims, "dtype": args.dtype, "pass": pass_name, "config": label}
                start = time.time()
                try:
                    with forced:
                        outputs = [t for t in fn() if t is not None]
                        torch.cuda.synchronize()
                        if config is None:
                            default_outputs[pass_name] = outputs
                        elif pass_name in default_outputs:  # same function, another tiling
                            row["max_rel_diff_vs_default"] = max(
                                ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
                                for a, b in zip(outputs, default_outputs[pass_name]))
                        ms = do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")
                        row.update(us=round(ms * 1e3, 2), min_bytes=min_bytes[pass_name])
                        row["graph_us"] = round(graph_us(fn), 2)
                        row["pipelined_us"] = round(pipelined_us(fn), 2)
                        row["graph_gbps"] = round(min_bytes[pass_name] / (row["graph_us"] * 1e-6) / 1e9, 1)
                except Exception as error:  # record and go on: one bad config must not end the sweep
                    row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
                    torch.cuda.synchronize()
                row["kernels"] = _new_kernels(jit_fns, before)
                row["seconds"] = round(time.time() - start, 2)
                emit(row)
        torch.cuda.empty_cache()
    compiled = [{"kernel": getattr(fn, "__name__", None) or fn.fn.__name__, "key": str(key)[:400], **_describe(k)}
                for fn in jit_fns for key, k in _compiled(fn).items()]
    emit({"summary": "every kernel compiled in this sweep", "kernels": compiled})
    return 0


if __name__ == "__main__":
    sys.exit(main())
