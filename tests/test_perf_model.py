"""The launch recorder, the run-time binding, the SASS reader and the MODELLED performance
table of the static check (launch_record.py, sass.py, perf_model.py, static_check --perf).
No GPU: kernels are compiled for sm_90 / sm_80 by name."""
import collections
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

# The root conftest runs the package in Triton's interpreter on a machine without CUDA; these
# tests need the real JIT, so under the interpreter the one test below reruns this file in a
# subprocess with TRITON_INTERPRET=0 (where the tests after it run).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_jit = pytest.mark.skipif(INTERPRETING, reason="run by test_rerun_with_the_real_triton_jit in a subprocess")


@pytest.mark.skipif(not INTERPRETING, reason="already under the real JIT")
def test_rerun_with_the_real_triton_jit():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                            capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout, result.stdout[-3000:]

from spatialformer_kernels.backends.triton import launch_record as lr  # noqa: E402
from spatialformer_kernels.backends.triton.configs import cdiv  # noqa: E402
from spatialformer_kernels.backends.triton import perf_model as pm  # noqa: E402
from spatialformer_kernels.backends.triton import sass  # noqa: E402


def _case(D=32, op="bilateral", dtype="bf16", mask=False, shape="cls224-stage1"):
    B, H, M, N, _ = lr.SHAPES[shape]
    return lr.Case(shape, op, B, H, M, N, D, dtype, mask)


def _launches(case, backward=False, n_sm=132, arch=90):
    return [e for e in lr.record(case, n_sm, backward, arch=arch) if isinstance(e, lr.KernelLaunch)]


def _arg_spec(task, name):
    index = [n for n, _ in task.signature].index(name)
    ty = dict(task.signature)[name]
    attrs = dict((p[0], v) for p, v in task.attrs).get(index)
    const = dict((p[0], v) for p, v in task.constexprs if len(p) == 1).get(index)
    return ty, attrs, const


@needs_jit
def test_records_the_launchers_launches_with_the_sm_count():
    launches = _launches(_case())
    assert [e.name for e in launches] == ["_bilateral_fwd_kernel", "_bilateral_combine_kernel"]
    fwd = launches[0]
    assert fwd.tuned and fwd.configs and all("BLOCK_N" in c and "num_warps" in c for c in fwd.configs)
    # split plan from the SM count: B*H = 128 programs per split, 2 per SM wanted
    assert fwd.grid[1] == lr.fused.split_plan(132, 128, 3136)[0]
    assert _launches(_case(), n_sm=108)[0].grid[1] == lr.fused.split_plan(108, 128, 3136)[0]
    bwd = [e.name for e in _launches(_case(), backward=True)]
    # one launch per direction, then one split reduction for both; M = 64 is one spatial block: no
    # separate delta launch
    assert bwd == ["_bilateral_bwd_kernel", "_bilateral_bwd_kernel", "_reduce_splits_kernel"]
    wide = {e.name for e in _launches(_case(D=256, dtype="fp32"), backward=True)}
    assert wide == {"_bilateral_wide_lse_kernel", "_bilateral_wide_delta_kernel", "_bilateral_wide_bwd_kernel",
                    "_reduce_splits_kernel"}
    # the kernels are restored afterwards
    assert type(lr.fused._bilateral_fwd_kernel).__name__ == "JITFunction"


@needs_jit
def test_runtime_specialisation_divisibility_constants_and_do_not_specialize():
    fwd32 = lr.bind(_launches(_case(32))[0], _launches(_case(32))[0].configs[0], 90)
    fwd40 = lr.bind(_launches(_case(40))[0], _launches(_case(40))[0].configs[0], 90)
    assert _arg_spec(fwd32, "D")[1] == [["tt.divisibility", 16]]
    assert _arg_spec(fwd32, "stride_qx_n")[1] == [["tt.divisibility", 16]]
    ty, attrs, const = _arg_spec(fwd32, "stride_qx_d")
    assert ty == "constexpr" and const == 1 and not attrs  # an int equal to 1 is a constant
    assert _arg_spec(fwd40, "D")[1] in ([], None) and _arg_spec(fwd40, "stride_qx_n")[1] in ([], None)
    for name in ("M", "N", "CHUNK", "SPLITS"):  # do_not_specialize
        assert _arg_spec(fwd32, name)[0] == "i32" and _arg_spec(fwd32, name)[1] in ([], None)
    assert _arg_spec(fwd32, "Q_X")[1] == [["tt.divisibility", 16]]  # 16-byte aligned allocation
    assert "D:16" in lr.specialisation_text(fwd32) and "D:16" not in lr.specialisation_text(fwd40)


@needs_jit
def test_d32_and_d40_compile_to_vector_loads_on_sm90_and_unaligned_rows_to_scalar_loads():
    """With run-time specialisation the D = 32 forward loads 16 bytes per thread (LDGSTS /
    LDG.128) and uses wgmma. D = 40 is not divisible by 16, so Triton's binder says nothing
    about it; the launcher's ALIGN (D and strides multiples of 8) makes its loads 16 bytes
    too. Rows whose stride is not a multiple of 8 (a [..., :40] view of 41-wide rows) load
    2 bytes at a time, on the smaller spatial block that keeps them in registers."""
    f32 = _launches(_case(32))[0]
    f40 = _launches(_case(40))[0]
    assert f32.kwargs["ALIGN"] == 8 and f40.kwargs["ALIGN"] == 8

    def view(L):
        return torch.empty(2, 2, L, 41, dtype=torch.bfloat16)[..., :40]

    events = []
    with lr.stubbed_kernels(132, events, 90):
        lr.fused.attention_fwd(view(64), view(64), view(64), view(3136), view(3136), view(3136), 40**-0.5)
    unaligned = [e for e in events if isinstance(e, lr.KernelLaunch)][0]
    assert unaligned.kwargs["ALIGN"] == 1 and unaligned.kwargs["BLOCK_M"] == 32 and f40.kwargs["BLOCK_M"] == 64
    d32 = sass.compile_task(lr.bind(f32, f32.configs[-1], 90))
    d40 = sass.compile_task(lr.bind(f40, f40.configs[-1], 90))
    d40_unaligned = sass.compile_task(lr.bind(unaligned, unaligned.configs[-1], 90))
    for facts in (d32, d40):
        assert facts["vector_loads"] > 0 and facts["ldgsts"] > 0 and facts["load_widths"].get("2", 0) == 0
    assert d32["hgmma"] > 0 and d32["loop_tensor_ops"] > 0
    assert d40_unaligned["vector_loads"] == 0 and d40_unaligned["load_widths"].get("2", 0) > 0
    for facts in (d32, d40, d40_unaligned):
        assert facts["ok"] and facts["spills"] == 0 and facts["warps_per_sm"] > 0
        assert facts["loop_static"] > 0 and facts["loop_dynamic"] >= facts["loop_static"]


def _exponent_sources(ptx):
    """For each ex2 of a PTX listing, how its argument is formed: the defining instruction and,
    for an FMA's addend or a sum's or difference's operands, theirs; a mul.rn whose multiplier
    is a negation is marked "by -rate"."""
    defs = {}
    for line in ptx.splitlines():
        match = re.match(r"\s*(?:@%p\d+\s+)?([a-z][\w.]*)\s+([^;]*);", line)
        if match:
            operands = [o.strip() for o in match.group(2).split(",")]
            if operands[0].startswith("%"):
                defs[operands[0]] = (match.group(1), operands)

    def term(reg):
        name, operands = defs.get(reg, ("?", [reg, reg, reg]))
        if name.startswith("mul.rn") and defs.get(operands[2], ("?",))[0].startswith("neg."):
            return f"{name} by -rate"
        return name

    sources = []
    for name, operands in defs.values():
        if name.startswith("ex2.approx"):
            arg, arg_operands = defs.get(operands[1], ("?", []))
            if arg.startswith("fma"):
                sources.append(f"fma + {term(arg_operands[3])}")
            elif arg.startswith(("sub", "add")):
                sign = " - " if arg.startswith("sub") else " + "
                sources.append(f"{arg[:3]} " + sign.join(sorted((term(arg_operands[1]), term(arg_operands[2])))))
            else:
                sources.append(arg)
    return sources


@needs_jit
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(64, 2, 64, 3136, 32), (64, 4, 64, 784, 32), (2, 2, 70, 300, 32)],
                         ids=["splits", "one-split-tail", "many-spatial"])
def test_the_16_bit_forwards_shift_products_are_rounded_alone(shape, dtype):
    """The 16-bit sm_90 forward's exponents are s * rate - round(shift * rate) by one FMA, and
    its online rescale is exp2(round(m_run * rate) - round(shift * rate)): each shift product
    rounded alone (mul.rn), as every term of a row was shifted, or the factor exp2(residual)
    stops cancelling. A plain product there is fused with the subtraction into an FMA on the
    GPU (Triton compiles with FP fusion on), which the interpreter cannot show: so here every
    ex2's argument must come from an FMA whose addend is a mul.rn by the negated rate (the
    negated product bitwise, with no negation left per row), from the sum of a mul.rn and
    such a mul.rn, or from a negation (exp2(-residual))."""
    case = lr.shape_cases(*shape, dtypes=(dtype,), ops=("bilateral",), masks=(False,))[0]
    launch = _launches(case)[0]
    assert launch.name == "_bilateral_fwd_kernel" and launch.kwargs["FMA_EXP"]
    sources = _exponent_sources(sass.ptx_of(lr.bind(launch, launch.configs[0], 90)))
    allowed = {"fma + mul.rn.f32 by -rate", "add mul.rn.f32 + mul.rn.f32 by -rate", "neg.f32"}
    assert sources and set(sources) <= allowed, collections.Counter(sources)
    assert "add mul.rn.f32 + mul.rn.f32 by -rate" in sources  # the online rescale is there


@needs_jit
def test_occupancy():
    assert sass.occupancy(128, 0, 8, 90) == (2, 16)  # 65536 / (128 * 32 * 8)
    assert sass.occupancy(255, 0, 4, 90) == (2, 8)  # 255 -> 256 per thread, 8192 per warp
    assert sass.occupancy(32, 100 * 1024, 4, 90) == (2, 8)  # shared memory bound
    assert sass.occupancy(32, 100 * 1024, 4, 80) == (1, 4)
    assert sass.occupancy(16, 0, 1, 80) == (32, 32)  # CTA limit


@needs_jit
def test_sass_loop_analysis():
    text = "\n".join([
        "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
        "        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;",
        "        /*0020*/                   LDGSTS.E.BYPASS.128 [R5], desc[UR4][R2.64] ;",
        "        /*0030*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;",
        "        /*0040*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;",
        "        /*0050*/              @!P0 BRA 0x30 ;",
        "        /*0060*/                   MUFU.EX2 R3, R3 ;",
        "        /*0070*/               @P1 BRA 0x10 ;",
        "        /*0080*/                   EXIT ;",
        "        /*0090*/                   BRA 0x90;",
    ])
    facts = sass.analyse_sass(text)
    assert facts["instructions"] == 9 and facts["loops"] == 2
    assert facts["loop_static"] == 7  # 0x10 .. 0x70
    assert facts["loop_dynamic"] == 7 and facts["loop_per_inner_trip"] == 3  # inner loop 0x30 .. 0x50
    assert facts["hmma"] == 1 and facts["loop_tensor_ops"] == 1 and facts["loop_mufu"] == 1
    assert facts["load_widths"] == {"16": 2, "2": 1} and facts["vector_loads"] == 2 and facts["narrow_loads"] == 1
    assert facts["loop_loads"] == 3
    assert sass.parse_ptxas_log("ptxas warning : (C7515) wgmma serialized\n 8 bytes spill stores, 8 bytes spill loads")[
        "spill_stores"] == 8
    # ptxas 12.x prints the wgmma serialisation advisory as info, not as a warning
    advisory = ("ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due "
                "to non wgmma instructions defining accumulator registers of a wgmma between start and end of the "
                "pipeline stage in the function '_bilateral_bwd_kernel'\nptxas info    : Used 124 registers")
    assert [w[:7] for w in sass.parse_ptxas_log(advisory)["ptxas_warnings"]] == ["(C7515)"]


@needs_jit
@pytest.mark.parametrize("op,n_parts", [("bilateral", 3), ("cross_s", 1)])
def test_the_split_reduction_loop_is_one_trip_per_pass(op, n_parts):
    """The model reads one loop body as one trip. ptxas unrolls the split reduction's short
    run-time loop 4x (the one-part reduction of cross_attention's spatial side) unless the
    kernel's nounroll pragma stops it: at det800x1344 (4 samples, 66 splits, 32 splits of 32
    outputs per step on 4 warps) one pass loads each partial's 32 x 32 fp32 tile once, 16 bytes
    a load: 2 loads per thread and part."""
    reduce = _launches(_case(op=op, shape="det800x1344-stage1"), backward=True)[-1]
    assert reduce.name == "_reduce_splits_kernel"
    k = {**reduce.kwargs, **reduce.configs[0]}
    assert (k["BLOCK"], k["SPLIT_ROWS"], k["num_warps"], k["N_PARTS"]) == (32, 32, 4, n_parts)
    facts = sass.compile_task(lr.bind(reduce, reduce.configs[0], 90))
    per_thread_and_part = k["SPLIT_ROWS"] * k["BLOCK"] * 4 // (k["num_warps"] * 32 * 16)
    assert facts["loop_loads"] == n_parts * per_thread_and_part == 2 * n_parts
    assert facts["load_widths"].get("16", 0) >= facts["loop_loads"] and facts["spills"] == 0


@needs_jit
def test_op_bytes_and_sdpa_model(monkeypatch):
    case = _case()
    B, H, M, N, D = 64, 2, 64, 3136, 32
    fwd = (3 * M + 3 * N) * B * H * D * 2 + (M + N) * B * H * D * 2 + (M + N) * B * H * 8
    assert pm.op_bytes(case, False) == fwd
    bwd = (4 * (M + N) + 4 * (N + M)) * B * H * D * 2 + (M + N) * B * H * 8
    assert pm.op_bytes(case, True) == bwd
    gpu = pm.GPUS["h100"]
    # few queries over many keys: FA2 splits the keys; plenty of query blocks: it does not
    assert pm._fa2_splits(B * H, 2 * gpu.sms, cdiv(N, 256)) > 1
    assert pm._fa2_splits(B * H * 49, 2 * gpu.sms, 1) == 1
    assert pm.sdpa_pass(_case(mask=True), gpu, False) is None  # the flash backend takes no mask
    fwd_us, both_us = pm.sdpa_pass(case, gpu, False), pm.sdpa_pass(case, gpu, True)
    assert 0 < fwd_us < both_us
    assert fwd_us > pm.op_bytes(case, False) / gpu.bandwidth * 1e6 * 0.9  # never under its own bytes' time
    # more HBM bandwidth never costs time; it saves time where HBM, not the per-SM bandwidth, binds
    assert pm.sdpa_pass(case, pm.GPUS["h200"], False) <= fwd_us
    monkeypatch.setattr(pm, "FA2_PER_SM_BW", 1e15)
    assert pm.sdpa_pass(case, pm.GPUS["h200"], False) < pm.sdpa_pass(case, gpu, False)
    # its own constants, or those given (the fit's): a slower SM or slower dots never save time
    fitted = (pm.FA2_PER_SM_BW, pm.FA2_MMA_EFFICIENCY)
    assert pm.sdpa_pass(case, gpu, True, fitted) == pm.sdpa_pass(case, gpu, True)
    assert pm.sdpa_pass(case, gpu, True, (5e9, pm.FA2_MMA_EFFICIENCY)) > pm.sdpa_pass(case, gpu, True)
    assert pm.sdpa_pass(case, gpu, True, (pm.FA2_PER_SM_BW, 0.05)) > pm.sdpa_pass(case, gpu, True)



@needs_jit
def test_kernel_model_bounds(monkeypatch):
    launch = _launches(_case())[0]
    facts = dict(regs=128, ctas_per_sm=2, warps_per_sm=16, instructions=1400, loop_static=1000, loop_dynamic=1000,
                 loop_per_inner_trip=400, tensor_core_ops=16, hgmma=16)
    config = launch.configs[0]
    h100 = pm.model_kernel(launch, config, facts, pm.GPUS["h100"])
    h200 = pm.model_kernel(launch, config, facts, pm.GPUS["h200"])
    assert h100["bytes"] == h200["bytes"] > 0
    assert h100["modelled_us"] >= max(h100["mem_us"], h100["issue_us"], h100["tensor_us"])
    assert h200["mem_us"] <= h100["mem_us"] and h200["issue_us"] == h100["issue_us"]
    # 256 CTAs on 132 SMs: the busiest SM's bytes at PER_SM_BW bind before either GPU's HBM
    per_sm_us = h100["bytes"] * 2 / 256 / pm.PER_SM_BW * 1e6
    assert h100["mem_us"] == pytest.approx(per_sm_us) and per_sm_us > h100["bytes"] / pm.GPUS["h100"].bandwidth * 1e6
    monkeypatch.setattr(pm, "PER_SM_BW", 1e15)  # HBM-bound: more bandwidth, less time
    hbm_h100 = pm.model_kernel(launch, config, facts, pm.GPUS["h100"])
    hbm_h200 = pm.model_kernel(launch, config, facts, pm.GPUS["h200"])
    assert hbm_h200["mem_us"] < hbm_h100["mem_us"] == pytest.approx(h100["bytes"] / pm.GPUS["h100"].bandwidth * 1e6)
    monkeypatch.undo()
    lighter = pm.model_kernel(launch, config, dict(facts, loop_dynamic=100, loop_static=100), pm.GPUS["h100"])
    assert lighter["issue_us"] < h100["issue_us"]
    assert h100["loop_instr_per_64_tokens"] == pytest.approx(1000 * 64 / config["BLOCK_N"])


@needs_jit
def test_host_cost_is_measured_per_call():
    cost = pm.host_cost(_case(), False, repeats=3)
    assert cost["launches"] == 2 and cost["planned_us"] > 0 and cost["launcher_us"] > 0 and cost["binder_us"] > 0


@needs_jit
def test_perf_cli_writes_modelled_json(tmp_path):
    out = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, "-m", "spatialformer_kernels.backends.triton.static_check", "--perf", "--gpu", "h100",
         "--case", "cls224-stage2 bilateral bf16", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MODELLED" in result.stdout
    data = json.loads(out.read_text())
    assert data["modelled"] is True and "MODELLED" in data["assumptions"]
    required = {"kernel", "case", "dtype", "arch", "regs", "spills", "smem", "warps_per_sm", "tensor_core_ops",
                "vector_loads", "loop_instr_per_64_tokens", "bytes", "roofline_us", "issue_us", "modelled_us",
                "modelled_pct_roofline"}
    kernels = [r for r in data["rows"] if r["kernel"] != "(pass)"]
    assert kernels and all(required <= set(r) for r in kernels if not r["kernel"].startswith("torch."))
    passes = {(r["mask"], r["pass"]): r for r in data["rows"] if r["kernel"] == "(pass)"}
    assert set(passes) == {(False, "fwd"), (False, "fwd+bwd"), (True, "fwd"), (True, "fwd+bwd")}
    for row in passes.values():
        assert row["modelled"] is True and 0 < row["modelled_pct_roofline"] <= 100 and row["host_us"] > 0
    assert passes[(False, "fwd")]["ratio_to_sdpa"] > 0 and passes[(True, "fwd")]["ratio_to_sdpa"] is None
    assert passes[(False, "fwd+bwd")]["modelled_us"] > passes[(False, "fwd")]["modelled_us"]


@needs_jit
@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "key-mask"])
def test_a_backward_with_a_partial_last_tile_launches_its_buckets_tail_config(masked):
    """Direction x's one-block backward at D = 96 (BLOCK_D 128): on whole 32-token tiles the
    bucket's measured 4-warp config; where N leaves a partial tile, configs.TAIL_CONFIGS' entry
    (the 4-warp one cannot hold the partial-tile branch: the static gate), on the same tile."""
    from spatialformer_kernels.backends.triton import configs

    from spatialformer_kernels.backends.triton import static_check as sc

    def direction_x_backward(n_tokens):
        case = lr.shape_cases(64, 2, 64, n_tokens, 96, dtypes=("bf16",), ops=("cross_x",), masks=(masked,))[0]
        (launch,) = [e for e in _launches(case, backward=True) if e.name == "_bilateral_bwd_kernel"]
        return launch

    whole, partial = direction_x_backward(3136), direction_x_backward(3120)
    block_n, warps, stages = configs.TAIL_CONFIGS[configs.bucket_key(90, True, False, False, 64, 128, 2)]
    assert whole.kwargs["TAIL_BLOCK_N"] == 0 and partial.kwargs["TAIL_BLOCK_N"] == 16
    assert whole.configs[0]["num_warps"] == 4
    assert partial.configs[0] == {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
    assert whole.configs[0]["BLOCK_N"] == block_n
    assert partial.kwargs["ASYNC_DOTS"] == configs.async_dots(90, stages, 2)
    # the static gate compiles the whole-tile launch's tail variants as the launcher makes them
    variants = sc.tail_variants(whole, whole.configs[0], 90)
    assert sorted(sc.constexprs(t)["TAIL_BLOCK_N"] for t in variants) == [16, 32]
    for task in variants:
        options = dict(task.options)
        assert (options["num_warps"], options["num_stages"]) == (warps, stages)
        assert sc.constexprs(task)["ASYNC_DOTS"] == partial.kwargs["ASYNC_DOTS"]
    (same,) = [t for t in variants if sc.constexprs(t)["TAIL_BLOCK_N"] == 16]
    assert same.key() == lr.bind(partial, partial.configs[0], 90).key()


def _forward(arch, dtype, op, B, H, M, N, D, masked=False):
    case = lr.shape_cases(B, H, M, N, D, dtypes=(dtype,), ops=(op,), masks=(masked,))[0]
    return [e for e in _launches(case, n_sm={80: 108, 90: 132}[arch], arch=arch) if e.name == "_bilateral_fwd_kernel"][0]


@needs_jit
@pytest.mark.parametrize("arch,dtype,op,shape", [
    (90, "fp32", "cross_s", (2, 2, 16, 340, 128)),  # FMA dots, 16-row blocks, D = 128
    (80, "bf16", "bilateral", (64, 2, 64, 3120, 64)),  # mma.sync, 32-row blocks, both directions, one split
], ids=["sm90-fp32-d128", "sm80-bf16-d64"])
def test_a_forwards_partial_tile_costs_its_loop_no_occupancy(arch, dtype, op, shape):
    """A forward whose dots take the spatial operands in registers (not wgmma) runs its partial
    last tile on copies of its own (TAIL_RELOADS): with the main loop's, Triton formed the
    tail's before the loop and held them through it, and these two compiles kept fewer CTAs per
    SM than the same launch without the tail code (fp32: 255 registers and 2 KB of spills
    against 80; bf16 on sm_80: 204 registers against 128)."""
    from spatialformer_kernels.backends.triton import static_check as sc

    launch = _forward(arch, dtype, op, *shape)
    assert launch.kwargs["TAIL_BLOCK_N"] == launch.configs[0]["BLOCK_N"] == 32 and launch.kwargs["TAIL_RELOADS"]
    tailed = sass.compile_task(lr.bind(launch, launch.configs[0], arch))
    untailed = sass.compile_task(sc.tail_twin(launch, launch.configs[0], arch))
    assert tailed["spills"] == 0 and tailed["ctas_per_sm"] == untailed["ctas_per_sm"], (tailed["regs"], untailed["regs"])


@needs_jit
def test_the_wgmma_forward_sums_within_threads_and_forms_the_lse_once_per_row():
    """configs.wgmma_rows (sm_90, 16 bits, 64-row blocks; the interpreter runs it as sm_90, so
    the parity tests cover it): direction s keeps eight partial sums per row, each within the
    threads that hold its keys, and direction x moves each tile's (max, sum) to one row per
    thread before the float64 LSE. Against the same launch without: fewer shuffles and a
    quarter of the float64 work in the main loop, and a shorter loop. sm_80 (it spilled), fp32
    (FMA dots) and a per-query mask (the reshape went through shared memory) launch without."""
    import dataclasses

    launch = _forward(90, "bf16", "bilateral", 64, 4, 64, 784, 32)
    assert launch.kwargs["WGMMA_ROWS"]
    assert not _forward(80, "bf16", "bilateral", 64, 4, 64, 784, 32).kwargs["WGMMA_ROWS"]
    assert not _forward(90, "fp32", "bilateral", 64, 4, 64, 784, 32).kwargs["WGMMA_ROWS"]
    masked_cross = [c for c in lr.masked_cross_cases() if c.shape == "m2f512-s8"][0]
    per_query = [e for e in _launches(masked_cross) if e.name == "_bilateral_fwd_kernel"][0]
    assert per_query.kwargs["HAS_PAIR_MASK"] and per_query.kwargs["BLOCK_M"] == 64
    assert not per_query.kwargs["WGMMA_ROWS"]
    plain = dataclasses.replace(launch, kwargs={**launch.kwargs, "WGMMA_ROWS": False})
    rows, per_quad = (sass.compile_task(lr.bind(e, launch.configs[0], 90)) for e in (launch, plain))
    assert rows["spills"] == 0 and rows["ctas_per_sm"] == per_quad["ctas_per_sm"]
    assert rows["loop_shuffles"] < per_quad["loop_shuffles"]
    assert 0 < 4 * rows["loop_fp64"] <= per_quad["loop_fp64"]
    assert rows["loop_dynamic"] < per_quad["loop_dynamic"]


@needs_jit
def test_the_static_check_compiles_the_forwards_tail_variants_as_launched():
    """TAIL_RELOADS depends on the tail (configs.TAIL_RELOAD_SPILLS): the static check's tail
    variants of a launch must carry what the launcher gives a launch with that tail."""
    from spatialformer_kernels.backends.triton import static_check as sc

    # sm_80, direction x at D = 32 with a key mask: 32-row tails keep the loop's operands
    tail32 = _forward(80, "bf16", "cross_x", 2, 2, 64, 800, 32, masked=True)
    tail64 = _forward(80, "bf16", "cross_x", 2, 2, 64, 830, 32, masked=True)
    assert (tail32.kwargs["TAIL_BLOCK_N"], tail64.kwargs["TAIL_BLOCK_N"]) == (32, 64)
    assert (tail32.kwargs["TAIL_RELOADS"], tail64.kwargs["TAIL_RELOADS"]) == (False, True)
    for launch, other in ((tail32, tail64), (tail64, tail32)):
        (variant,) = [t for t in sc.tail_variants(other, other.configs[0], 80)
                      if sc.constexprs(t)["TAIL_BLOCK_N"] == launch.kwargs["TAIL_BLOCK_N"]]
        assert sc.constexprs(variant)["TAIL_RELOADS"] == launch.kwargs["TAIL_RELOADS"]
    # wgmma's operands stay in shared memory: the bf16 sm_90 forward keeps the loop's
    assert not _forward(90, "bf16", "bilateral", 64, 4, 64, 784, 32).kwargs["TAIL_RELOADS"]


def test_every_tail_config_keeps_its_buckets_tile():
    """The launcher sizes the partial tile (TAIL_BLOCK_N) from the bucket's untailed BLOCK_N
    before it looks up the tail config, so a tail config must keep that tile."""
    from spatialformer_kernels.backends.triton import configs

    assert configs.TAIL_CONFIGS
    for (arch, backward, dir_s, dir_x, block_m, block_d, elem), entry in configs.TAIL_CONFIGS.items():
        assert backward and dir_s != dir_x  # the one-block backward's launcher looks it up
        bucket = (block_m, block_d, elem, backward, False, dir_s, arch)
        for key_mask in (False, True):
            for pair_mask in (False, True):
                untailed = configs.gpu_config(*bucket, pair_mask=pair_mask, key_mask=key_mask)
                tailed = configs.gpu_config(*bucket, pair_mask=pair_mask, key_mask=key_mask, tail=True)
                assert untailed.kwargs["BLOCK_N"] == entry[0], (arch, key_mask, pair_mask)
                assert (tailed.kwargs["BLOCK_N"], tailed.num_warps, tailed.num_stages) == entry


@needs_jit
def test_perf_cli_models_any_shape(tmp_path):
    out = tmp_path / "model.json"
    result = subprocess.run(
        [sys.executable, "-m", "spatialformer_kernels.backends.triton.static_check", "--perf", "--gpu", "h100",
         "--no-host", "--shape", "2", "3", "20", "300", "40", "--case", "cross_s bf16", "--json", str(out)],
        capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "0"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["case"] for r in rows} == {"B2-H3-M20-N300-D40"} and {r["op"] for r in rows} == {"cross_s"}
    passes = [r for r in rows if r["kernel"] == "(pass)"]
    assert len(passes) == 4 and all(r["modelled_us"] > 0 for r in passes)
