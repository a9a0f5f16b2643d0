"""Compile the cls224-stage2 bf16 forward for sm_90 with and without the TMA prototype
(tma-prototype.patch, applied to commit b5c4235) and print its SASS instruction counts per warp:
outside the main loop, one trip of the loop, and a program (outside + 6 trips of 128 tokens, as
the static model counts the one-split launch). No GPU is needed.

    git checkout b5c4235 && git apply benchmarks/results/static-model/tma-prototype/tma-prototype.patch
    python benchmarks/results/static-model/tma-prototype/compile_prototype.py
"""
import os

os.environ["TRITON_INTERPRET"] = "0"

import subprocess  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from spatialformer_kernels.backends.triton import launch_record as lr  # noqa: E402
from spatialformer_kernels.backends.triton import static_check as sc  # noqa: E402
from spatialformer_kernels.backends.triton.sass import analyse_sass, tool  # noqa: E402

DESCRIPTORS = ("QX_DESC", "KX_DESC", "VX_DESC", "OX_DESC")
TRIPS = 6  # 784 tokens: 6 tiles of 128 and a 16-token tail


def compile_forward(tma: bool) -> str:
    (case,) = [c for c in sc.full_cases() if c.label == "cls224-stage2 bilateral bf16"]
    launch = [e for e in lr.record(case, 132, False, arch=90)
              if isinstance(e, lr.KernelLaunch) and e.name == "_bilateral_fwd_kernel"][0]
    task = lr.bind(launch, launch.configs[0], 90)
    jit = lr.kernel_fn(task.module, task.name)
    signature, constexprs = dict(task.signature), dict(task.constexprs)
    index = {name: (i,) for i, name in enumerate(jit.arg_names)}
    block_n, block_d = launch.configs[0]["BLOCK_N"], launch.kwargs["BLOCK_D"]
    if tma:
        for name in DESCRIPTORS:  # the launcher passes None (a constexpr) for them
            constexprs.pop(index[name], None)
            signature[name] = f"tensordesc<bf16[1,1,{block_n},{block_d}]>"
        constexprs[index["TMA"]] = True
    signature = {name: signature[name] for name in jit.arg_names}
    source = triton.compiler.ASTSource(jit, signature, constexprs, {k: v for k, v in task.attrs})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(task.options))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(compiled.asm["cubin"])
        handle.flush()
        return subprocess.run([tool("cuobjdump"), "--dump-sass", handle.name], capture_output=True, text=True,
                              check=True).stdout


for tma in (False, True):
    facts = analyse_sass(compile_forward(tma))
    outside = facts["instructions"] - facts["loop_static"]
    loop = facts["loop_dynamic"]
    print(f"{'TMA' if tma else 'pointers'}: outside the loop {outside}, per trip {loop}, "
          f"per program {outside + TRIPS * loop} (per warp, SASS, sm_90)")
