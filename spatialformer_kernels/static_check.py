"""Static GPU check: compile the Triton kernels for sm_80 and sm_90 without a GPU.

    python -m spatialformer_kernels.static_check [--all] [--arch 80 90]

For every kernel, at every config the autotuner may pick (the launcher's own tables:
`block_m_for`, `fuse_directions`, `configs_for`) and at the fixed interpreter/test config,
Triton compiles the kernel to a cubin for each target; `cuobjdump --dump-resource-usage`
(shipped in the triton wheel) reads registers and stack (spill) bytes, and
`metadata.shared` gives the shared memory. Prints one row per compile and exits non-zero on
any spill or on shared memory above the device limit (sm_80: 163 KB, sm_90: 227 KB).

Coverage: by default a representative set of (dtype, head-dim bucket) pairs that covers
every dtype and every BLOCK_D bucket, the heaviest dtype (fp32) at small, middle and large
D, and every kernel variant those pairs reach (both directions fused or one at a time, the
one-block and looped-M paths, the cross_attention directions). `--all` compiles every
dtype at every bucket (several times slower).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

# The kernels must be real JIT functions, not the interpreter's stand-ins.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from .ops import bilateral_attention_triton as bt  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
BLOCK_D_BUCKETS = (16, 32, 64, 128, 256)
# (dtype, BLOCK_D) pairs of the default run: every dtype and every bucket at least once.
REPRESENTATIVE = (
    (torch.float16, 16),
    (torch.bfloat16, 32),
    (torch.float16, 64),
    (torch.bfloat16, 128),
    (torch.float16, 256),
    (torch.float32, 32),
    (torch.float32, 128),
    (torch.float32, 256),
)
_INT_ARGS = {"H", "M", "N", "D", "CHUNK", "SPLITS"}
_FLOAT_ARGS = {"qk_scale", "sm_scale"}
# Strides that are 1 in the usual layouts; Triton specialises an int argument equal to 1.
_UNIT_STRIDE = re.compile(r"stride_\w+_d$|stride_im_n$|stride_sm_m$")


def _pointer_type(name: str, dtype: torch.dtype) -> str:
    if name.endswith("MASK"):
        return "*i1"
    if name.startswith(("LSE", "PART")):
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
    dirs = {(True, True): "both", (True, False): "s", (False, True): "x"}[(c["DIR_S"], c["DIR_X"])]
    return f"M{c['BLOCK_M']}{'' if c['M_ONE_BLOCK'] else '+loop'} dir={dirs}"


def variants(pairs):
    """Yield (kernel name, jit fn, dtype, constexprs, config text, num_warps, num_stages)."""
    fixed = (bt.FIXED_BLOCK_N, bt.FIXED_WARPS, bt.FIXED_STAGES)
    for dtype, block_d in pairs:
        elem = torch.tensor([], dtype=dtype).element_size()
        precision = bt._dot_precision(dtype)
        for backward, fn in ((False, bt._bilateral_fwd_kernel), (True, bt._bilateral_bwd_kernel)):
            block_m = bt.block_m_for(block_d, elem, backward)
            fused = bt.fuse_directions(block_d, elem, backward)
            # bilateral (fused or one direction at a time) and cross_attention's two directions
            dir_sets = [(True, False), (False, True)] + ([(True, True)] if fused else [])
            for dir_s, dir_x in dir_sets:
                both = dir_s and dir_x
                tuned = [(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                         for c in bt.configs_for(block_m, block_d, elem, backward, both)]
                for one_block in (True, False):
                    constexprs = dict(
                        BLOCK_M=block_m, BLOCK_D=block_d, M_ONE_BLOCK=one_block, DIR_S=dir_s, DIR_X=dir_x,
                        HAS_IMAGE_MASK=dir_s, HAS_SPATIAL_MASK=dir_x and not dir_s, DOT_PRECISION=precision,
                    )
                    for block_n, warps, stages in tuned + ([fixed] if fixed not in tuned else []):
                        name = "_bilateral_bwd_kernel" if backward else "_bilateral_fwd_kernel"
                        config = f"N{block_n} w{warps} s{stages}" + (" (fixed)" if (block_n, warps, stages) == fixed else "")
                        yield name, fn, dtype, {**constexprs, "BLOCK_N": block_n}, config, warps, stages
        combine_m = 16 if block_d >= 128 else 32
        yield ("_bilateral_combine_kernel", bt._bilateral_combine_kernel, dtype,
               dict(BLOCK_M=combine_m, BLOCK_D=block_d), "fixed", 4, 1)


def run(pairs, archs, out=sys.stdout) -> int:
    header = f"{'kernel':<26} {'dtype':<5} {'D':>4} {'variant':<22} {'config':<20} {'arch':<6} {'regs':>4} {'spill B':>7} {'smem KB':>8}  status"
    print(header, file=out)
    print("-" * len(header), file=out)
    failures, count, start = 0, 0, time.time()
    for name, fn, dtype, constexprs, config, warps, stages in variants(pairs):
        variant = _flag_text(constexprs) if "DIR_S" in constexprs else f"M{constexprs['BLOCK_M']}"
        for arch in archs:
            compiled = triton.compile(
                _source(fn, dtype, constexprs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": warps, "num_stages": stages},
            )
            regs, spill, static_shared = _resource_usage(compiled.asm["cubin"])
            shared = compiled.metadata.shared + static_shared
            ok = spill == 0 and shared <= SHARED_LIMIT[arch]
            failures += not ok
            count += 1
            print(
                f"{name:<26} {DTYPE_NAMES[dtype]:<5} {constexprs['BLOCK_D']:>4} {variant:<22} {config:<20} "
                f"sm_{arch:<3} {regs:>4} {spill:>7} {shared / 1024:>8.1f}  {'ok' if ok else 'FAIL'}",
                file=out,
                flush=True,
            )
    print(f"{count} compiles in {time.time() - start:.0f} s, {failures} failing", file=out)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every dtype at every head-dim bucket")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90])
    args = parser.parse_args(argv)
    pairs = [(d, b) for d in DTYPE_NAMES for b in BLOCK_D_BUCKETS] if args.all else REPRESENTATIVE
    return 1 if run(pairs, args.arch) else 0


if __name__ == "__main__":
    sys.exit(main())
