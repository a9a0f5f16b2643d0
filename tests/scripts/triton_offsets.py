"""Static check of the Triton kernels' address arithmetic (fused.py and wide.py): each kernel
is lowered to Triton IR for sm_90 (no GPU needed) with every int argument typed i32, which is
what Triton passes for a stride or size below 2**31. Every `tt.addptr` offset must then be
i64, or an i32 that is a tile index (built from tl.arange and constants only, so bounded by
the block size). A control kernel computing `pid * stride` in i32 must be flagged, so the
check can fail. Prints one JSON report.

    TRITON_INTERPRET=0 python tests/scripts/triton_offsets.py
"""
import json
import os
import re

os.environ["TRITON_INTERPRET"] = "0"  # real JIT functions, not the interpreter's stand-ins
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import make_backend  # noqa: E402

from spatialformer_kernels.backends.triton import fused, wide  # noqa: E402

INT_ARGS = {"H", "M", "N", "D", "CHUNK", "SPLITS", "LQ", "LK"}
FLOAT_ARGS = {"qk_scale", "sm_scale"}
CONSTEXPRS = {"BLOCK_M": 32, "BLOCK_N": 32, "TAIL_BLOCK_N": 16, "BLOCK_D": 32, "BLOCK_R": 32, "BLOCK_C": 32,
              "BLOCK_DC": 32, "BLOCK_S": 4, "DOT_PRECISION": "tf32"}
BOUNDED_OPS = {"tt.make_range", "arith.constant", "tt.expand_dims", "tt.broadcast", "tt.splat", "tt.reshape",
               "arith.addi", "arith.subi", "arith.muli", "arith.andi", "arith.ori", "arith.remsi", "arith.divsi"}
target = GPUTarget("cuda", 90, 32)
backend = make_backend(target)
options = backend.parse_options({})

def ttir(fn, constexprs):
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.startswith("stride_") or p.name in INT_ARGS:
            signature[p.name] = "i32"
        elif p.name in FLOAT_ARGS:
            signature[p.name] = "fp32"
        elif p.name.endswith("MASK"):
            signature[p.name] = "*i1"
        elif p.name.startswith(("LSE", "PART")):
            signature[p.name] = "*fp32"
        else:
            signature[p.name] = "*fp16"
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(target, options, backend.get_codegen_implementation(options),
                            backend.get_module_map(), context)
    stages = {}
    backend.add_stages(stages, options, source.language)
    return str(stages["ttir"](module, {}))  # helpers inlined, canonicalised

def unsafe_offsets(text):
    defs = {}
    for line in text.splitlines():
        m = re.match(r"\s*(%[\w.]+) = (\S+) (.*)", line)
        if m:
            defs[m.group(1)] = (m.group(2), m.group(3).split(" : ")[0])
    found = []
    for line in text.splitlines():
        m = re.search(r"tt\.addptr %[\w.]+, (%[\w.]+) : .*, (?:tensor<[\dx]*)?(i\d+)>?", line)
        if not m or m.group(2) == "i64":
            continue
        stack, seen = [m.group(1)], set()
        while stack:
            value = stack.pop()
            if value in seen:
                continue
            seen.add(value)
            op, operands = defs.get(value, ("an argument or loop variable", ""))
            if op not in BOUNDED_OPS:
                found.append(f"{line.strip()[:200]}  <- {value} from {op}")
                break
            stack += re.findall(r"%[\w.]+", operands)
    return found

@triton.jit
def _control_int32_offset(X, Y, stride_b):
    pid = tl.program_id(0)
    tl.store(Y + pid.to(tl.int64), tl.load(X + pid * stride_b))

# Kernels that run one direction per launch (they static_assert DIR_S != DIR_X).
ONE_DIRECTION_KERNELS = {"_bilateral_bwd_kernel"}

report = {"kernels": [], "variants": 0, "addptr": 0, "unsafe": [],
          "control": unsafe_offsets(ttir(_control_int32_offset, {}))}
for name, fn in sorted({**vars(fused), **vars(wide)}.items()):
    if not (isinstance(fn, triton.runtime.JITFunction) and name.endswith("_kernel")):
        continue
    flags = [p.name for p in fn.params if p.is_constexpr and p.name not in CONSTEXPRS]
    every_branch = {**{k: v for k, v in CONSTEXPRS.items() if k in fn.arg_names}, **{f: True for f in flags}}
    one_direction = []
    if "HAS_PAIR_MASK" in flags and "DIR_S" in flags:  # a per-query mask comes with one direction only
        every_branch["HAS_PAIR_MASK"] = False
        one_direction = [{**every_branch, "HAS_PAIR_MASK": True, other: False} for other in ("DIR_S", "DIR_X")]
    variants = [every_branch] + [{**every_branch, f: False} for f in flags if not f.startswith(("DIR_", "HAS_"))]
    variants += one_direction
    if name in ONE_DIRECTION_KERNELS:  # each variant once per direction
        variants = [dict(t) for t in dict.fromkeys(
            tuple(sorted({**v, "DIR_S": dir_s, "DIR_X": not dir_s}.items())) for v in variants for dir_s in (True, False))]
    for constexprs in variants:
        text = ttir(fn, constexprs)
        report["variants"] += 1
        report["addptr"] += text.count("tt.addptr")
        report["unsafe"] += [f"{name} {constexprs}: {u}" for u in unsafe_offsets(text)]
    report["kernels"].append(name)
print(json.dumps(report))
