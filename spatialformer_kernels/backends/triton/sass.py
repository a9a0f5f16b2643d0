"""Compile one bound launch (launch_record.CompileTask) and read its machine code.

Per compiled kernel: registers, spill bytes (stack + local frame, and ptxas's spill
stores/loads), shared memory, occupancy (CTAs and warps per SM from registers, shared memory
and the warp count), tensor-core instructions (HGMMA on sm_90, HMMA on sm_80 or where the
sm_90 code falls back to it), ptxas warnings (e.g. C7515, wgmma serialised), the width of
every global load (16-byte LDGSTS / LDG.128, or narrower), and the loops: the main loop is
the outermost backward branch with the largest body; its instruction count is the static
count of that body with every nested loop run once (`loop_dynamic`), plus
`loop_per_inner_trip` per further trip of the nested loops (all branches inside taken: an
upper bound where a branch skips work).

`cuobjdump` (shipped in the Triton wheel) gives the SASS and the resource usage; the ptxas
log comes from Triton's own ptxas run (TRITON_DUMP_PTXAS_LOG) or, when the kernel came from
Triton's cache, from rerunning the same ptxas on the cached PTX.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from collections import Counter

os.environ.setdefault("TRITON_INTERPRET", "0")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

# Per-SM limits (sm_80 A100, sm_90 H100/H200): registers, shared memory usable by CTAs,
# the per-block shared limit, warps and CTAs.
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Shared memory the system reserves per CTA (sm_80: counted here; on sm_90 cuobjdump already
# reports it as the kernel's 1 KB of static shared memory).
SMEM_RESERVED_PER_CTA = {80: 1024, 90: 0}
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def tool(name: str) -> str:
    return os.path.join(_BIN, name)


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> tuple[int, int]:
    """(CTAs per SM, warps per SM) from registers per thread, shared bytes per CTA, warps per CTA."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = SMEM_PER_SM[arch] // (smem + SMEM_RESERVED_PER_CTA[arch]) if smem else MAX_CTAS_PER_SM
    by_warps = MAX_WARPS_PER_SM // num_warps
    ctas = max(0, min(by_regs, by_smem, by_warps, MAX_CTAS_PER_SM))
    return ctas, ctas * num_warps


def is_global_load(opcode: str) -> bool:
    """Whether an opcode loads from global memory (LDG, LDG.*, LDGSTS.*)."""
    return opcode.startswith(("LDG.", "LDGSTS")) or opcode == "LDG"


def load_width(opcode: str) -> int:
    """Bytes per thread of a global load opcode (LDG.* or LDGSTS.*)."""
    for suffix, width in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in opcode:
            return width
    return 4


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] of the one function in a cuobjdump --dump-sass text."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def loops(instrs) -> list[tuple[int, int]]:
    """(head index, tail index) of each loop: a branch to an earlier address (not to itself)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    out = []
    for i, (addr, op, operands) in enumerate(instrs):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", operands)
            if m and int(m.group(1), 16) < addr and int(m.group(1), 16) in index:
                out.append((index[int(m.group(1), 16)], i))
    return sorted(set(out))


def _dynamic(loop, all_loops, inner_trips):
    """Instructions of one iteration of `loop`, nested loops run `inner_trips` times."""
    head, tail = loop
    total = tail - head + 1
    children = [lp for lp in all_loops if lp != loop and head <= lp[0] and lp[1] <= tail]
    direct = [c for c in children if not any(o != c and o[0] <= c[0] and c[1] <= o[1] for o in children)]
    for child in direct:
        total += (inner_trips - 1) * _dynamic(child, all_loops, inner_trips) + (
            _dynamic(child, all_loops, inner_trips) - (child[1] - child[0] + 1))
    return total


def analyse_sass(text: str) -> dict:
    instrs = parse_sass(text)
    # the code ends at the last EXIT (a self-branch and NOP padding follow)
    last_exit = max((i for i, (_, op, _) in enumerate(instrs) if op == "EXIT"), default=len(instrs) - 1)
    instrs = instrs[: last_exit + 1]
    ops = Counter(op for _, op, _ in instrs)
    found = loops(instrs)
    outer = [lp for lp in found if not any(o != lp and o[0] <= lp[0] and lp[1] <= o[1] for o in found)]
    main = max(outer, key=lambda lp: lp[1] - lp[0], default=None)
    body = Counter(op for _, op, _ in instrs[main[0]: main[1] + 1]) if main else Counter()
    loads = Counter()
    for op, n in ops.items():
        if is_global_load(op):
            loads[load_width(op)] += n
    tensor_prefix = ("HGMMA", "HMMA")
    return dict(
        instructions=len(instrs),
        loop_static=(main[1] - main[0] + 1) if main else 0,
        # one main-loop iteration with nested loops run once, and what each further trip adds
        loop_dynamic=_dynamic(main, found, 1) if main else 0,
        loop_per_inner_trip=(_dynamic(main, found, 2) - _dynamic(main, found, 1)) if main else 0,
        loops=len(found),
        hgmma=sum(n for op, n in ops.items() if op.startswith("HGMMA")),
        hmma=sum(n for op, n in ops.items() if op.startswith("HMMA")),
        loop_tensor_ops=sum(n for op, n in body.items() if op.startswith(tensor_prefix)),
        loop_mufu=sum(n for op, n in body.items() if op.startswith("MUFU")),
        loop_loads=sum(n for op, n in body.items() if is_global_load(op)),
        # cross-thread row reductions, and float64 work (the LSE), in the main loop
        loop_shuffles=sum(n for op, n in body.items() if op.startswith("SHFL")),
        loop_fp64=sum(n for op, n in body.items() if op.startswith(("DFMA", "DADD", "DMUL", "F2F.F64"))),
        ldgsts=sum(n for op, n in ops.items() if op.startswith("LDGSTS")),
        load_widths={str(w): n for w, n in sorted(loads.items(), reverse=True)},
        vector_loads=loads.get(16, 0),
        narrow_loads=loads.get(2, 0) + loads.get(4, 0) + loads.get(1, 0),
        local_ops=sum(n for op, n in ops.items() if op.startswith(("LDL", "STL"))),
    )


def _run_ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as handle:
            handle.write(ptx)
        result = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    return result.stdout + result.stderr


def parse_ptxas_log(log: str) -> dict:
    """Spills and warnings from ptxas -v. Warnings include the performance advisories that
    ptxas prints as info with a code, such as "ptxas info : (C7515) Potential Performance
    Loss: wgmma.mma_async instructions are serialized ..." (the form ptxas 12.x uses)."""
    warnings = sorted({w.strip() for w in re.findall(r"warning\s*:?\s*(.*)", log, flags=re.I)}
                      | {w.strip() for w in re.findall(r"info\s*:\s*(\(C\d+\).*)", log)})
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return dict(ptxas_warnings=warnings, spill_stores=int(spill.group(1)) if spill else 0,
                spill_loads=int(spill.group(2)) if spill else 0)


def _compile(task):
    """triton.compile of one launch_record.CompileTask for its arch."""
    from .launch_record import kernel_fn

    jit = kernel_fn(task.module, task.name)
    source = triton.compiler.ASTSource(jit, dict(task.signature), dict(task.constexprs),
                                       {k: v for k, v in task.attrs})
    return triton.compile(source, target=GPUTarget("cuda", task.arch, 32), options=dict(task.options))


def ptx_of(task) -> str:
    """The PTX of one launch_record.CompileTask, compiled for its arch."""
    return _compile(task).asm["ptx"]


def compile_task(task) -> dict:
    """Compile one launch_record.CompileTask; returns its resources and SASS facts."""
    captured = io.StringIO()
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(captured):
            compiled = _compile(task)
    finally:
        os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
    log = captured.getvalue()
    if "registers" not in log:  # from Triton's cache: rerun its ptxas on the same PTX for the log
        log = _run_ptxas(compiled.asm["ptx"], task.arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        usage_text = subprocess.run([tool("cuobjdump"), "--dump-resource-usage", handle.name],
                                    capture_output=True, text=True, check=True).stdout
        sass_text = subprocess.run([tool("cuobjdump"), "--dump-sass", handle.name],
                                   capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage_text)
    if usage is None:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{usage_text}")
    regs, stack, static_shared, local = map(int, usage.groups())
    smem = compiled.metadata.shared + static_shared
    ctas, warps = occupancy(regs, smem, task.num_warps, task.arch)
    ptxas = parse_ptxas_log(log)
    out = dict(regs=regs, spills=stack + local + ptxas["spill_stores"], smem=smem, ctas_per_sm=ctas,
               warps_per_sm=warps, **ptxas, **analyse_sass(sass_text))
    out["tensor_core_ops"] = out["hgmma"] + out["hmma"]
    # C7515: ptxas serialised every wgmma of the kernel (each waits for the one before)
    out["wgmma_serialised"] = any("C7515" in w for w in out["ptxas_warnings"])
    out["ok"] = out["spills"] == 0 and smem <= SHARED_LIMIT[task.arch] and not out["wgmma_serialised"]
    return out
