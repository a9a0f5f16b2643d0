"""Static GPU check: compile the Triton kernels for sm_80 and sm_90 without a GPU.

    python -m spatialformer_kernels.backends.triton.static_check [--all] [--arch 80 90] [--jobs N]

For every kernel variant the launchers can launch, at every config the autotuner may keep
for it (the launcher's own tables: `block_m_for`, `fuse_directions`, `backward_supported`,
`configs_for`; the interpreter's fixed test config is one of them, marked "(test)"; for
the wide-head backward, wide.py, its three kernels at the config
`wide_config` gives each bucket and direction it serves), Triton compiles the kernel to a
cubin for each target; `cuobjdump --dump-resource-usage`
(shipped in the triton wheel) reads registers and stack bytes (spills), and
`metadata.shared` plus the static shared memory give the shared memory. Prints one row per
compile and exits non-zero on any spill or on shared memory above the device limit
(sm_80: 163 KB, sm_90: 227 KB per block).

Coverage: by default a representative set of (dtype, head-dim bucket) pairs that covers
every dtype and every BLOCK_D bucket (fp16 and bf16 compile to the same resource usage in
every bucket of an `--all` run), plus every bucket the wide-head backward serves in fp32 and
bf16; `--all` compiles every dtype at every bucket (about three times longer). Pointer
alignment and unit strides are specialised as they are at run time for contiguous last
dimensions and torch allocations.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# The kernels must be real JIT functions, not the interpreter's stand-ins.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from . import configs  # noqa: E402
from . import fused  # noqa: E402
from . import wide  # noqa: E402
from .common import dot_precision  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_D_BUCKETS = (16, 32, 64, 128, 256)
# (dtype, BLOCK_D) pairs of the default run: every dtype and every bucket at least once.
REPRESENTATIVE = (
    (torch.float16, 16),
    (torch.bfloat16, 32),
    (torch.float32, 64),
    (torch.float16, 128),
    (torch.float32, 256),
)
# The wide-head backward's buckets in the default run (fp16 compiles like bf16).
WIDE_REPRESENTATIVE = ((torch.float32, 128), (torch.float32, 256), (torch.bfloat16, 256))
_INT_ARGS = {"H", "M", "N", "D", "CHUNK", "SPLITS", "LQ", "LK"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
# Strides that are 1 in the usual layouts; Triton specialises an int argument equal to 1.
_UNIT_STRIDE = re.compile(r"stride_\w+_d$|stride_im_n$|stride_sm_m$|stride_mask_l$")


def _pointer_type(name: str, dtype: torch.dtype) -> str:
    if name.endswith("MASK"):
        return "*i1"
    if name.startswith("LSE"):
        return "*fp64"
    if name.startswith(("PART", "DELTA")):
        return "*fp32"
    return {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}[dtype]


def _source(fn, dtype, constexprs):
    signature, constants, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], constants[name] = "constexpr", constexprs[name]
        elif _UNIT_STRIDE.match(name):
            signature[name], constants[name] = "constexpr", 1
        elif name.startswith("stride_") or name in _INT_ARGS:
            signature[name] = "i32"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = _pointer_type(name, dtype)
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
    return triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, stack bytes, static shared bytes) of the one function in a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run(
            [_cuobjdump(), "--dump-resource-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if usage is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    regs, stack, shared, local = map(int, usage.groups())
    return regs, stack + local, shared


def _flag_text(c) -> str:
    if "BLOCK_DC" in c:  # the wide-head backward's kernels
        if "QUERIES_SPATIAL" in c:
            return f"M{c['BLOCK_M']} N{c['BLOCK_N']} C{c['BLOCK_DC']} dir={'s' if c['QUERIES_SPATIAL'] else 'x'}"
        return f"R{c['BLOCK_R']}" + (f" K{c['BLOCK_C']}" if "BLOCK_C" in c else "") + f" C{c['BLOCK_DC']}"
    if "DIR_S" not in c:
        return f"M{c['BLOCK_M']}"
    dirs = {(True, True): "both", (True, False): "s", (False, True): "x"}[(c["DIR_S"], c["DIR_X"])]
    loop = "+loop" if c.get("M_ONE_BLOCK") is False else ""
    return f"M{c['BLOCK_M']}{loop} dir={dirs}"


def variants(pairs, wide_pairs=()):
    """Yield (kernel name, jit fn, dtype, BLOCK_D, constexprs, config text, num_warps, num_stages):
    every variant the launchers can launch for these (dtype, BLOCK_D) pairs, at every
    config the autotuner may keep for it plus the fixed interpreter config, then the
    wide-head backward's kernels for those of `wide_pairs` it serves."""
    yield from _fused_variants(pairs)
    yield from _wide_variants(wide_pairs)


def _wide_variants(pairs):
    for dtype, block_d in pairs:
        elem = torch.tensor([], dtype=dtype).element_size()
        if not wide.serves(block_d, elem):
            continue
        for spatial in (True, False):  # direction s, direction x
            cfg = wide.wide_config(block_d, elem, spatial)
            base = dict(BLOCK_DC=cfg.BLOCK_DC, DOT_PRECISION=dot_precision(dtype))
            config = f"w{cfg.num_warps} s1"
            rows, keys = (cfg.BLOCK_M, cfg.BLOCK_N) if spatial else (cfg.BLOCK_N, cfg.BLOCK_M)
            yield ("_bilateral_wide_lse_kernel", wide._bilateral_wide_lse_kernel, dtype, block_d,
                   dict(base, BLOCK_R=rows, BLOCK_C=keys, HAS_MASK=True), config, cfg.num_warps, 1)
            yield ("_bilateral_wide_delta_kernel", wide._bilateral_wide_delta_kernel, dtype, block_d,
                   dict(base, BLOCK_R=rows), config, cfg.num_warps, 1)
            yield ("_bilateral_wide_bwd_kernel", wide._bilateral_wide_bwd_kernel, dtype, block_d,
                   dict(base, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, QUERIES_SPATIAL=spatial, HAS_MASK=True),
                   config, cfg.num_warps, 1)


def _fused_variants(pairs):
    for dtype, block_d in pairs:
        elem = torch.tensor([], dtype=dtype).element_size()
        base = dict(BLOCK_D=block_d, DOT_PRECISION=dot_precision(dtype))
        # forward: bilateral (fused, or one direction per launch) and cross_attention's two
        fwd_dirs = [(True, False), (False, True)] + ([(True, True)] if configs.fuse_directions(block_d, elem) else [])
        kernels = [("_bilateral_fwd_kernel", fused._bilateral_fwd_kernel, False, d, {}) for d in fwd_dirs]
        # backward: one direction per launch, spatial side in registers or looped (where a
        # spill-free kernel exists; the launcher sends the other shapes to the wide-head backward)
        one_block_m = configs.block_m_for(block_d, elem, backward=True)
        kernels += [
            ("_bilateral_bwd_kernel", fused._bilateral_bwd_kernel, True, d, {"M_ONE_BLOCK": one})
            for d in ((True, False), (False, True))
            for one in (True, False)
            if configs.backward_supported(block_d, elem, one_block_m if one else one_block_m + 1)
        ]
        for name, fn, backward, (dir_s, dir_x), extra in kernels:
            # the looped backward uses the smaller block it gets for a large M
            block_m = configs.block_m_for(block_d, elem, backward, 0 if extra.get("M_ONE_BLOCK", True) else 1 << 20)
            constexprs = dict(
                base, BLOCK_M=block_m, DIR_S=dir_s, DIR_X=dir_x,
                HAS_IMAGE_MASK=dir_s, HAS_SPATIAL_MASK=dir_x and not dir_s, **extra,
            )
            tuned = configs.configs_for(block_m, block_d, elem, backward, dir_s and dir_x, dir_s)
            fixed = configs.fixed_config(block_m, block_d, elem, backward, dir_s and dir_x, dir_s)
            for c in tuned:  # the interpreter's fixed config is one of them
                block_n = c.kwargs["BLOCK_N"]
                config = f"N{block_n} w{c.num_warps} s{c.num_stages}" + (" (test)" if c is fixed or c.kwargs == fixed.kwargs and c.num_warps == fixed.num_warps else "")
                yield name, fn, dtype, block_d, {**constexprs, "BLOCK_N": block_n}, config, c.num_warps, c.num_stages
        if configs.backward_supported(block_d, elem):  # direction s's delta, launched before the fused backward
            yield ("_spatial_delta_kernel", fused._spatial_delta_kernel, dtype, block_d,
                   dict(base, BLOCK_M=configs.DELTA_BLOCK_M), "fixed", 4, 3)
        combine_m = 16 if block_d >= 128 else 32
        yield ("_bilateral_combine_kernel", fused._bilateral_combine_kernel, dtype, block_d,
               dict(BLOCK_M=combine_m, BLOCK_D=block_d), "fixed", 4, 1)


def _compile_one(task):
    """Compile one kernel variant for one target; returns (regs, spill bytes, shared bytes)."""
    name, dtype, constexprs, warps, stages, arch = task
    module = wide if name.startswith("_bilateral_wide_") else fused
    compiled = triton.compile(
        _source(getattr(module, name), dtype, constexprs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    regs, spill, static_shared = _resource_usage(compiled.asm["cubin"])
    return regs, spill, compiled.metadata.shared + static_shared


def run(pairs, archs, jobs=1, out=sys.stdout, wide_pairs=()) -> int:
    header = (
        f"{'kernel':<28} {'dtype':<5} {'D':>4} {'variant':<20} {'config':<18} {'arch':<6} "
        f"{'regs':>4} {'spill B':>7} {'smem KB':>8}  status"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    rows, tasks = [], []
    for name, _fn, dtype, block_d, constexprs, config, warps, stages in variants(pairs, wide_pairs):
        variant = _flag_text(constexprs)
        for arch in archs:
            rows.append((name, DTYPE_NAMES[dtype], block_d, variant, config, arch))
            tasks.append((name, dtype, constexprs, warps, stages, arch))
    start = time.time()
    if jobs > 1:
        # Processes, not threads: compilation holds the GIL for most of its time.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = pool.map(_compile_one, tasks)
            failures = _report(rows, results, out)
    else:
        failures = _report(rows, map(_compile_one, tasks), out)
    print(f"{len(tasks)} compiles in {time.time() - start:.0f} s with {jobs} job(s), {failures} failing", file=out)
    return failures


def _report(rows, results, out) -> int:
    failures = 0
    for (name, dtype, block_d, variant, config, arch), (regs, spill, shared) in zip(rows, results):
        ok = spill == 0 and shared <= SHARED_LIMIT[arch]
        failures += not ok
        print(
            f"{name:<28} {dtype:<5} {block_d:>4} {variant:<20} {config:<18} sm_{arch:<3} "
            f"{regs:>4} {spill:>7} {shared / 1024:>8.1f}  {'ok' if ok else 'FAIL'}",
            file=out,
            flush=True,
        )
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every dtype at every head-dim bucket")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args(argv)
    every_pair = [(d, b) for d in DTYPE_NAMES for b in BLOCK_D_BUCKETS]
    pairs = every_pair if args.all else REPRESENTATIVE
    wide_pairs = every_pair if args.all else WIDE_REPRESENTATIVE
    return 1 if run(pairs, args.arch, args.jobs, wide_pairs=wide_pairs) else 0


if __name__ == "__main__":
    sys.exit(main())
