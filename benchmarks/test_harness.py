"""Tests of the benchmark harness itself: arithmetic, roofline table, rows, the renderer, the CLI
(both ops: bilateral attention and masked cross-attention)."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spatialformer_kernels import dispatch, testing
from spatialformer_kernels.bench import cli, measurement, workload
from spatialformer_kernels.reference import bilateral_attention_reference, cross_attention_reference

_spec = importlib.util.spec_from_file_location("render_tables", Path(__file__).with_name("render_tables.py"))
render_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_tables)

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, label, peak",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM", 3350.0),
        ("NVIDIA H100 PCIe", "H100 PCIe", 2000.0),
        ("NVIDIA H100 NVL", "H100 NVL", 3900.0),
        ("NVIDIA H200", "H200", 4800.0),
        ("NVIDIA GH200 480GB", "GH200 (HBM3)", 4000.0),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM", 2039.0),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe", 1935.0),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB", 1555.0),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB", 1555.0),
        ("NVIDIA L4", "L4", 300.0),
        ("NVIDIA L40S", "L40S", 864.0),
        ("Tesla T4", "T4", 320.0),
    ],
)
def test_roofline_lookup(name, label, peak):
    assert measurement.lookup_roofline(name) == (label, peak)


@pytest.mark.parametrize("name", ["AMD EPYC", "Intel(R) Xeon(R) Platinum 8480+", "NVIDIA Mystery 9000"])
def test_unknown_devices_have_no_roofline(name):
    assert measurement.lookup_roofline(name) is None


def test_cpu_environment_says_no_roofline_unless_given():
    env = measurement.environment(CPU)
    assert env["roofline"]["peak_gbps"] is None and "no HBM roofline" in env["roofline"]["source"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and "reference" in env["backends"]
    assert measurement.environment(CPU, peak_gbps=40.0)["roofline"]["peak_gbps"] == 40.0
    measured = measurement.environment(CPU, measure_bandwidth=True)["roofline"]
    assert measured["peak_gbps"] > 0 and measured["source"].startswith("measured")
    assert measurement.hardware_slug({"device_type": "cpu", "device_name": "AMD EPYC 7B13", "cpu_count": 2}) == "cpu-amd-epyc-7b13-2c"
    assert measurement.hardware_slug({"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3"}) == "h100-80gb-hbm3"


def test_bytes_and_flops_of_cls224_stage1():
    shape = workload.SHAPES[0]
    assert (shape.B, shape.H, shape.M, shape.N, shape.D) == (64, 2, 64, 3136, 32)
    per_side = 64 * 2 * (64 + 3136) * 32  # B*H*(M+N)*D elements of one tensor pair side
    assert workload.bytes_moved(shape, torch.bfloat16, "fwd") == 4 * per_side * 2 == 104_857_600
    assert workload.bytes_moved(shape, torch.float32, "fwd") == 4 * per_side * 4
    assert workload.bytes_moved(shape, torch.bfloat16, "bwd") == 8 * per_side * 2 + 4 * 64 * 2 * 3200
    assert workload.bytes_moved(shape, torch.bfloat16, "fwd_bwd") == sum(workload.bytes_moved(shape, torch.bfloat16, p) for p in ("fwd", "bwd"))
    assert workload.flops(shape, "fwd") == 8 * 64 * 2 * 64 * 3136 * 32
    assert workload.flops(shape, "fwd_bwd") == 28 * 64 * 2 * 64 * 3136 * 32
    # docs/design.md section 2: "about 64 FLOP/byte at D = 32" in 16-bit.
    assert 60 < workload.flops(shape, "fwd") / workload.bytes_moved(shape, torch.bfloat16, "fwd") < 64


def test_bandwidth_and_roofline_arithmetic():
    assert workload.gbps(3_000_000_000, 1.5) == pytest.approx(2.0)
    assert workload.pct_of_roofline(1675.0, 3350.0) == pytest.approx(50.0)
    assert workload.pct_of_roofline(10.0, None) is None


def test_cpu_scaling_keeps_h_m_d_and_divides_b_n():
    shapes = {s.name: s for s in workload.shapes_for(CPU)}
    assert shapes["cls224-stage1"] == workload.Shape("cls224-stage1", 64 // 8, 2, 64, 3136 // 8, 32, scale=8)
    assert shapes["det800x1344-stage1"].B == 1 and shapes["det800x1344-stage1"].N == 8400
    assert shapes["cls224-stage1"].label == "cls224-stage1/8"
    assert "divided by 8" in workload.scaling_note(list(shapes.values()))
    bilateral = [s for s in workload.SHAPES if s.op == "bilateral"]
    assert workload.scaling_note(workload.shapes_for(CPU, [s.name for s in bilateral], scale=1)) == "full docs/design.md section 4 shapes"
    with pytest.raises(ValueError, match="unknown shape"):
        workload.shapes_for(CPU, ["nope"])


# ---------------------------------------------------------------------------- masked cross-attention

M2F = {s.name: s for s in workload.SHAPES if s.op == "masked_cross"}


def test_mask2former_shapes_are_never_scaled():
    assert {name: (s.B, s.H, s.M, s.N, s.D) for name, s in M2F.items()} == {
        "m2f512-s8": (2, 8, 100, 4096, 32), "m2f512-s16": (2, 8, 100, 1024, 32), "m2f512-s32": (2, 8, 100, 256, 32),
    }  # fmt: skip
    assert set(M2F) <= set(workload.SHAPE_NAMES) == set(cli._parse_args([]).shapes or workload.SHAPE_NAMES)
    for scale in (None, 8, 32):  # the CPU default, and --quick's
        shapes = {s.name: s for s in workload.shapes_for(CPU, scale=scale)}
        assert all(shapes[name] == shape and shapes[name].label == name for name, shape in M2F.items())
        assert shapes["cls224-stage1"].scale == (scale or 8)
    note = workload.scaling_note(workload.shapes_for(CPU))
    assert note.startswith("shapes scaled down for this device: B and N divided by 8")
    assert note.endswith("masked cross-attention shapes (m2f512-s8, m2f512-s16, m2f512-s32: Mask2Former) at "
                         "full size on every device (never scaled: small already)")  # fmt: skip
    assert cli._parse_args(["--shapes", "m2f512-s8", "m2f512-s32"]).shapes == ["m2f512-s8", "m2f512-s32"]
    with pytest.raises(ValueError, match="unknown op"):
        workload.Shape("x", 1, 1, 1, 1, 1, op="nope")


def test_bytes_and_flops_of_masked_cross():
    shape = M2F["m2f512-s8"]
    bhd = 2 * 8 * 32  # B*H*D
    mask = 2 * 100 * 4096  # B*M*N bytes of the bool mask
    fwd = (2 * 100 + 2 * 4096) * bhd * 4 + mask
    bwd = (4 * 100 + 4 * 4096) * bhd * 4 + 4 * 2 * 8 * 100 + mask
    assert (fwd, bwd) == (18_006_016, 35_199_232)
    assert workload.bytes_moved(shape, torch.float32, "fwd") == fwd
    assert workload.bytes_moved(shape, torch.float32, "bwd") == bwd
    assert workload.bytes_moved(shape, torch.float32, "fwd_bwd") == fwd + bwd
    assert workload.bytes_moved(shape, torch.bfloat16, "fwd") == (2 * 100 + 2 * 4096) * bhd * 2 + mask
    unit = 2 * 8 * 100 * 4096 * 32
    assert workload.flops(shape, "fwd") == 4 * unit == 838_860_800  # dense: masked pairs counted
    assert workload.flops(shape, "bwd") == 10 * unit and workload.flops(shape, "fwd_bwd") == 14 * unit


def _connected(mask: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """Per query of mask [Q, N]: whether its kept keys form one 8-connected blob on the key grid."""
    queries = mask.shape[0]
    grid = torch.zeros(queries, rows * columns)
    grid[:, : mask.shape[1]] = mask.float()
    grown = torch.zeros_like(grid)
    grown[torch.arange(queries), grid.argmax(-1)] = 1  # the first kept key
    grid, grown = grid.view(queries, 1, rows, columns), grown.view(queries, 1, rows, columns)
    while not torch.equal(more := torch.nn.functional.max_pool2d(grown, 3, 1, 1) * grid, grown):
        grown = more
    return (grown == grid).view(queries, -1).all(-1)


@pytest.mark.parametrize("name", list(M2F))
def test_masks_are_one_blob_per_query_and_keep_about_30_percent(name):
    shape = M2F[name]
    mask = workload.object_query_masks(shape.B, shape.M, shape.N)
    assert mask.dtype == torch.bool and mask.shape == (2, 100, shape.N)
    assert torch.equal(mask, workload.object_query_masks(shape.B, shape.M, shape.N))  # deterministic
    assert not torch.equal(mask, workload.object_query_masks(shape.B, shape.M, shape.N, seed=1))
    per_query = mask.double().mean(-1)
    assert 0.28 <= mask.double().mean().item() <= 0.32
    assert ((per_query == 0).sum(-1) == workload.MASK_EMPTY_QUERIES).all() and ((per_query == 1).sum(-1) == workload.MASK_FULL_QUERIES).all()
    blob = (per_query > 0) & (per_query < 1)
    assert ((per_query[blob] >= 0.195) & (per_query[blob] <= 0.405)).all()
    rows, columns = workload.key_grid(shape.N)
    assert rows * columns == shape.N and rows == columns == int(shape.N**0.5)
    assert _connected(mask[blob][:40], rows, columns).all()  # spatially coherent: one blob each (40 of them, for time)
    summary = workload.mask_summary(shape)
    assert summary["kept"] == round(mask.double().mean().item(), 4) and summary["grid"] == f"{rows}x{columns}"
    assert (summary["empty_queries"], summary["full_queries"]) == (4, 2)
    note = workload.mask_note(shape)
    assert note.startswith(f"{name} attn_mask: {100 * summary['kept']:.1f}% of (query, key) pairs kept") and "4 empty and 2 full" in note


def test_masks_on_a_grid_that_is_not_square():
    assert workload.key_grid(130) == (11, 12) and workload.key_grid(144) == (12, 12) and workload.key_grid(1) == (1, 1)
    mask = workload.object_query_masks(1, 13, 130, seed=3)
    kept = mask.double().mean(-1)
    assert mask.shape == (1, 13, 130) and (kept == 0).sum() == 2 and (kept == 1).sum() == 1


def test_masked_cross_case_carries_q_k_v_and_the_mask_as_a_constant():
    shape = workload.Shape("tiny-masked", B=2, H=3, M=10, N=49, D=16, op="masked_cross")
    case = workload.Case.make(shape, torch.float32, CPU)
    q, k, v = case.inputs
    (mask,) = case.extras
    assert q.shape == (2, 3, 10, 16) and k.shape == v.shape == (2, 3, 49, 16) and case.grad_outputs[0].shape == q.shape
    assert mask.dtype == torch.bool and torch.equal(mask, workload.object_query_masks(2, 10, 49))
    assert len(case.leaves()) == 3 and case.op.result_names == testing.CROSS_RESULT_NAMES
    same, exact = case.reference_forward
    assert torch.allclose(same[0], cross_attention_reference(q, k, v, 0.25, attn_mask=mask))
    assert exact[0].dtype == torch.float64 and len(case.reference_gradients[0]) == 4


def test_masked_cross_skip_reasons():
    cpu = {p.name: p for p in workload.providers_for(CPU)}
    fp32 = torch.float32
    for name in ("reference", "sdpa", "compile-reference", "flex", *(n for n in cpu if n.startswith("ours-"))):
        assert "masked_cross" in cpu[name].builds, name
    assert workload.skip_reason(cpu["flex"], fp32, "fwd", "masked_cross") is None
    assert workload.skip_reason(cpu["flex"], fp32, "fwd_bwd", "masked_cross") == "flex has no backward on this device"
    assert cpu["flex"].notes["masked_cross"] == workload.FLEX_MASK_NOTE and "outside the timed calls" in workload.FLEX_MASK_NOTE
    # where the library is there (a CUDA machine), the op's own reason
    flash = dataclasses.replace(cpu["flash-attn"], skip=None)
    assert "no arbitrary attention mask" in workload.skip_reason(flash, torch.bfloat16, "fwd", "masked_cross")
    assert workload.skip_reason(flash, torch.bfloat16, "fwd", "bilateral") is None
    xformers = dataclasses.replace(cpu["xformers"], skip=None)
    assert "additive float bias" in workload.skip_reason(xformers, fp32, "fwd", "masked_cross")
    cuda = {p.name: p for p in workload.providers_for(torch.device("cuda"))}
    assert workload.skip_reason(cuda["sdpa-flash"], torch.bfloat16, "fwd", "masked_cross") == (
        "SDPA's FlashAttention backend takes no attn_mask (causal masking only)"
    )
    for label in ("efficient", "cudnn", "math"):
        assert workload.skip_reason(cuda[f"sdpa-{label}"], torch.bfloat16, "fwd_bwd", "masked_cross") is None
    bare = workload.Provider("bare", "baseline", "reference", lambda: None)
    assert workload.skip_reason(bare, fp32, "fwd", "masked_cross") == "bare has no masked cross-attention here"


def test_the_flex_block_mask_is_built_once_per_case_outside_the_timed_calls():
    shape = workload.Shape("tiny-masked", B=1, H=2, M=8, N=36, D=16, op="masked_cross")
    case = workload.Case.make(shape, torch.float32, CPU)
    built, called = [], []

    def prepare(c):
        built.append(c)
        return ("prepared",)

    def build():
        def run(q, k, v, constant, scale):
            called.append(constant)
            return (cross_attention_reference(q, k, v, scale, attn_mask=case.extras[0]),)

        return run

    provider = workload.Provider("counting", "baseline", "flex", builds={"masked_cross": build}, prepare={"masked_cross": prepare})
    call = workload.make_callable(provider, case, "fwd")
    for _ in range(5):
        call()
    assert len(built) == 1 and called == ["prepared"] * 5
    assert workload.check_parity(provider, case, with_grads=True).passed and len(built) == 2


def test_a_masked_row_carries_its_op_mask_fraction_and_speedups():
    shape = workload.Shape("tiny-masked", B=1, H=2, M=12, N=64, D=16, op="masked_cross")
    providers = [p for p in workload.providers_for(CPU) if p.name in ("reference", "sdpa")]
    def ignores_mask(name, kind):
        return workload.Provider(name, kind, kind, builds={"masked_cross": lambda: lambda q, k, v, m, scale: (
            cross_attention_reference(q, k, v, scale),)})  # fmt: skip

    session = measurement.BenchSession(CPU, [*providers, ignores_mask("no-mask", "ours"), ignores_mask("wrong-baseline", "baseline")],
                                       budget_s=0.01, measure_memory=False)
    row = session.row(shape, torch.float32, "fwd_bwd", "reference")
    assert row.status == "ok" and row.op == "masked_cross" and row.best_baseline in ("reference", "sdpa")
    assert row.speedup_vs_sdpa is not None and row.mask_fraction == workload.mask_summary(shape)["kept"]
    assert row.bytes == workload.bytes_moved(shape, torch.float32, "fwd_bwd") and row.flops == 14 * 2 * 12 * 64 * 16
    assert row.metrics()["op"] == "masked_cross"
    bad = session.row(shape, torch.float32, "fwd", "no-mask")  # a provider that ignores the mask fails parity
    assert bad.status == "failed" and "no-mask B1 H2 M12 N64 D16 fp32 o: max abs err" in bad.note
    # A baseline that fails parity is reported as wrong, left untimed and out of the speedups; the run goes on.
    wrong = session.row(shape, torch.float32, "fwd", "wrong-baseline")
    assert wrong.status == "wrong" and wrong.median_ms is None and "wrong-baseline B1 H2 M12 N64 D16 fp32 o: max abs err" in wrong.note
    assert session.row(shape, torch.float32, "fwd", "reference").best_baseline != "wrong-baseline"
    table = cli.format_table(session.rows())
    assert re.search(r"^wrong results, not timed: wrong-baseline \(fwd\): parity: ", table, re.M)
    assert not re.search(r"^tiny-masked .* wrong-baseline ", table, re.M)
    assert re.search(r"^tiny-masked +masked cross +B1 H2 M12 N64 D16 +fp32 +fwd_bwd +reference ", table, re.M)
    checks = session.parity_checks()
    assert {check.op for _, check in checks} == {"masked_cross"} and {check.tensor for _, check in checks} <= set(testing.CROSS_RESULT_NAMES)
    assert re.search(r"^tiny-masked +B1 H2 M12 N64 D16 +fp32 +sdpa +.* pass$", cli.format_parity(checks), re.M)


def _row(provider, kind, family, median_ms):
    return measurement.Row("s", 1, 1, 1, 1, 1, 1, "fp32", "fwd", provider, kind, family, median_ms=median_ms)


def test_speedup_against_best_baseline_and_best_sdpa():
    ours = _row("ours-x", "ours", "ours", 1.0)
    baselines = [
        _row("reference", "baseline", "reference", 8.0),
        _row("sdpa-flash", "baseline", "sdpa", 3.0),
        _row("sdpa-math", "baseline", "sdpa", 6.0),
        _row("compile-reference", "baseline", "compile", 2.0),
        measurement.Row("s", 1, 1, 1, 1, 1, 1, "fp32", "fwd", "xformers", "baseline", "xformers", status="skipped"),
    ]
    measurement.add_speedup(ours, baselines)
    assert ours.speedup == pytest.approx(2.0) and ours.best_baseline == "compile-reference"
    assert ours.speedup_vs_sdpa == pytest.approx(3.0)


def test_measured_row_carries_every_metric():
    shape = workload.Shape("tiny", B=1, H=2, M=8, N=40, D=16)
    providers = [p for p in workload.providers_for(CPU) if p.name in ("reference", "sdpa")]
    session = measurement.BenchSession(CPU, providers, budget_s=0.02)
    row = session.row(shape, torch.float32, "fwd_bwd", "reference")
    assert row.status == "ok", row.note
    assert row.repeats >= 5 and row.median_ms > 0 and len(row.samples_s) == row.repeats
    assert row.gbps == pytest.approx(row.bytes / (row.median_ms / 1e3) / 1e9)
    assert row.tflops == pytest.approx(row.flops / (row.median_ms / 1e3) / 1e12)
    assert row.pct_roofline is None  # no roofline known for a CPU
    assert row.speedup is not None and row.best_baseline in ("reference", "sdpa")
    assert row.peak_mem_bytes is None or row.peak_mem_bytes >= 0
    metrics = row.metrics()
    assert "samples_s" not in metrics and metrics["pass"] == "fwd_bwd"
    json.dumps(metrics)


def test_measure_on_cpu_warms_up_then_repeats():
    calls = []
    samples = measurement.measure(lambda: calls.append(1), CPU, budget_s=0.0, min_repeats=7, warmup=3)
    assert len(samples) == 7 and len(calls) == 8  # one warm-up call on CPU and all(s >= 0 for s in samples)


def test_replay_clock_feeds_measured_samples_to_pytest_benchmark(benchmark, record, pytestconfig):
    if pytestconfig.getoption("--benchmark"):
        pytest.skip("keeps synthetic samples out of --benchmark result files")
    if benchmark.disabled:  # pytest-benchmark turns itself off under pytest-xdist: run this test alone
        assert "SPATIALFORMER_REPLAY_ALONE" not in os.environ, "pytest-benchmark is disabled even when run alone"
        node = f"{__file__}::test_replay_clock_feeds_measured_samples_to_pytest_benchmark"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # else it is "a worker" too
        env["SPATIALFORMER_REPLAY_ALONE"] = "1"
        alone = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", node],
                               capture_output=True, text=True, cwd=pytestconfig.rootpath, env=env, timeout=300)
        assert alone.returncode == 0 and "1 passed" in alone.stdout, alone.stdout[-3000:] + alone.stderr[-3000:]
        return
    row = _row("ours-x", "ours", "ours", 2.0)
    row.samples_s = [0.003, 0.001, 0.002]
    record(row, "harness self-test")
    assert benchmark.stats.stats.median == pytest.approx(0.002)
    assert benchmark.stats.stats.rounds == 3 and benchmark.extra_info["provider"] == "ours-x"


# ---------------------------------------------------------------------------- renderer


def _result_file(path: Path, device_type: str, device_name: str, rows: list[dict], roofline=None) -> Path:
    benchmarks = [{"name": f"row{i}", "group": "g", "extra_info": extra, "stats": {}} for i, extra in enumerate(rows)]
    data = {
        "machine_info": {
            "device_type": device_type, "device_name": device_name, "torch_version": "2.x", "triton_version": "3.x",
            "cuda_version": "12.x", "git_commit": "0123456789abcdef", "roofline_gbps": roofline,
            "roofline_source": "data sheet" if roofline else "no HBM roofline is known for a CPU unless measured",
        },
        "commit_info": {"id": "0123456789abcdef"},
        "datetime": "2026-11-25T12:00:00",
        "benchmarks": benchmarks,
    }  # fmt: skip
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _kernel(shape, pass_, provider, kind, median_ms, speedup_vs_sdpa=None, pct=None, dtype="bf16"):
    return {
        "shape": shape, "B": 2, "H": 2, "M": 64, "N": 67200, "D": 32, "dtype": dtype, "pass": pass_, "provider": provider,
        "kind": kind, "median_ms": median_ms, "gbps": 100.0, "pct_roofline": pct, "tflops": 1.0, "speedup": 1.0,
        "speedup_vs_sdpa": speedup_vs_sdpa,
    }  # fmt: skip


def test_renderer_without_gpu_file_says_not_yet_measured(tmp_path):
    _result_file(tmp_path / "cpu-x.json", "cpu", "AMD EPYC", [
        _kernel("cls224-stage1/8", "fwd", "ours-cpu", "ours", 1.5, dtype="fp32"),
        _kernel("cls224-stage1/8", "fwd", "reference", "baseline", 3.0, dtype="fp32"),
        {"model": "spatialformer_tiny", "mode": "inference", "backend": "cpu", "batch": 2, "img_size": 224, "dtype": "fp32",
         "median_ms": 100.0, "images_per_s": 20.0, "speedup": 1.3},
    ])  # fmt: skip
    text = render_tables.render(render_tables.load_results(tmp_path))
    assert "GPU numbers are not yet measured" in text
    assert "| cls224-stage1/8 (B2 H2 M64 N67200 D32) | fp32 | forward | 1.500 ms | 3.000 ms |" in text
    assert "| spatialformer_tiny | inference | 2, 224x224, fp32 | cpu | 20.0 | 100.0 | 1.30x |" in text
    assert text.count("| not yet measured | no H100 or H200 result file |") == len(render_tables.TARGETS)
    assert " met " not in text


def test_renderer_tables_masked_cross_rows_apart_with_their_speedups(tmp_path):
    def masked(provider, kind, median_ms, **extra):
        return {**_kernel("m2f512-s8", "fwd", provider, kind, median_ms, dtype="fp32"), "M": 100, "N": 4096, "H": 8,
                "op": "masked_cross", "mask_fraction": 0.301, **extra}  # fmt: skip

    _result_file(tmp_path / "cpu-x.json", "cpu", "AMD EPYC", [
        _kernel("cls224-stage1/8", "fwd", "ours-cpu", "ours", 1.5, dtype="fp32"),
        masked("ours-cpu", "ours", 2.0, speedup=3.0, speedup_vs_sdpa=2.5),
        masked("sdpa", "baseline", 5.0),
        masked("flex", "baseline", 6.0),
    ])  # fmt: skip
    text = render_tables.render(render_tables.load_results(tmp_path))
    bilateral, masked_part = text.split("Masked cross-attention (Mask2Former's decoder layer")
    assert "Bilateral attention, median time per call:" in bilateral and "m2f512" not in bilateral and "| flex |" not in bilateral
    assert masked_part.startswith(": M queries over N keys, attn_mask bool [B, M, N] keeping 30.1% of the pairs")
    assert "| shape | dtype | pass | ours-cpu | sdpa | flex | ours-cpu GB/s | ours-cpu TFLOP/s | ours-cpu vs best baseline | ours-cpu vs best SDPA |" in masked_part
    assert "| m2f512-s8 (B2 H8 M100 N4096 D32) | fp32 | forward | 2.000 ms | 5.000 ms | 6.000 ms | 100.0 | 1.000 | 3.00x | 2.50x |" in masked_part
    assert "cls224-stage1/8" not in masked_part


def test_renderer_reports_targets_met_and_not_met_from_an_h100_file(tmp_path):
    _result_file(tmp_path / "h100.json", "cuda", "NVIDIA H100 80GB HBM3", [
        _kernel("cls224-stage1", "fwd", "ours-triton", "ours", 0.05, speedup_vs_sdpa=1.8, pct=75.0),
        _kernel("det800x1344-stage1", "fwd", "ours-triton", "ours", 0.10, speedup_vs_sdpa=3.2),
        _kernel("cls224-stage1", "fwd_bwd", "ours-triton", "ours", 0.20, speedup_vs_sdpa=1.6),
    ], roofline=3350.0)  # fmt: skip
    text = render_tables.render(render_tables.load_results(tmp_path))
    assert "not yet measured** (no GPU" not in text
    assert "| forward cls224-stage1: >= 1.5x SDPA, >= 70% of HBM roofline | met | ours-triton 0.050 ms, 1.80x SDPA, 100 GB/s = 75.0% of roofline" in text
    assert "| forward det800x1344-stage1: >= 4x SDPA | not met | ours-triton 0.100 ms, 3.20x SDPA" in text
    assert "| forward+backward cls224-stage1: >= 1.5x SDPA | met |" in text
    assert "| forward+backward det800x1344-stage1: >= 1.5x SDPA | not yet measured | no bf16 row in h100.json (NVIDIA H100 80GB HBM3) |" in text


def test_renderer_rewrites_only_between_markers(tmp_path):
    readme = f"# title\nbefore\n{render_tables.START}\nold tables\n{render_tables.END}\nafter\n"
    updated = render_tables.rewrite(readme, "NEW\n")
    assert updated == f"# title\nbefore\n{render_tables.START}\nNEW\n{render_tables.END}\nafter\n"
    assert render_tables.rewrite("# no markers\n", "NEW\n") is None
    results = tmp_path / "results"
    results.mkdir()
    (tmp_path / "README.md").write_text(readme, encoding="utf-8")
    args = ["--results", str(results), "--readme", str(tmp_path / "README.md")]
    assert render_tables.main([*args, "--check"]) == 1
    assert render_tables.main(args) == 0
    assert render_tables.main([*args, "--check"]) == 0
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text.startswith("# title\nbefore\n") and text.endswith(f"{render_tables.END}\nafter\n")
    assert "GPU numbers are not yet measured" in text and "old tables" not in text


def test_committed_results_render(pytestconfig):
    """Every committed result file parses and renders (and the README section, if marked, is current)."""
    results = Path(__file__).with_name("results")
    loaded = render_tables.load_results(results)
    for result in loaded:  # every kernel row carries its bandwidth, every result its provenance
        assert result["kernels"] and all(row["gbps"] > 0 and row["median_ms"] > 0 for row in result["kernels"]), result["file"]
        assert all(result["machine"].get(key) for key in ("device_name", "torch_version", "git_commit")), result["file"]
    speed = render_tables.load_cpu_speed(results)
    text = render_tables.render(loaded, speed)
    assert "Targets (H100, bf16" in text or "Targets (bf16; measured on NVIDIA H" in text
    for record in speed:  # issue 4's measurement: both passes against their targets
        assert f"cpu-speed/{record['file']}" in text and text.count(" | >= ") >= 2
    readme = Path(__file__).resolve().parent.parent / "README.md"
    # A --benchmark run is about to write a new result file: the README is re-rendered after it.
    if render_tables.START in readme.read_text(encoding="utf-8") and not pytestconfig.getoption("--benchmark"):
        assert render_tables.main(["--check"]) == 0, "README tables are stale: run python benchmarks/render_tables.py"


def _gpu_check_folder(results: Path, gpu: str = "h200", device_name: str = "NVIDIA H200", provenance: dict | None = None) -> Path:
    """A benchmarks/gpu_check.sh folder: bench-kernels (ours, SDPA, a provider never timed), bench-baselines, bench-models."""
    folder = results / f"gpu-check-{gpu}"
    folder.mkdir(parents=True)
    skipped = {**_kernel("cls224-stage1", "fwd", "sdpa-efficient", "baseline", None), "status": "skipped", "gbps": None}
    _result_file(folder / f"bench-kernels-{gpu}.json", "cuda", device_name, [
        {**_kernel("cls224-stage1", "fwd", "ours-triton", "ours", 0.5, speedup_vs_sdpa=0.8, pct=4.0), "best_baseline": "compile-reference", "speedup": 0.4},
        _kernel("cls224-stage1", "fwd", "sdpa-flash", "baseline", 0.4),
        skipped,
    ], roofline=4800.0)  # fmt: skip
    _result_file(folder / f"bench-baselines-{gpu}.json", "cuda", device_name, [
        _kernel("cls224-stage1", "fwd", "compile-reference", "baseline", 0.3),
        _kernel("cls224-stage1", "fwd", "flex", "baseline", 0.9),
    ], roofline=4800.0)  # fmt: skip
    _result_file(folder / f"bench-models-{gpu}.json", "cuda", device_name, [
        {"model": "spatialformer_tiny", "mode": "inference", "backend": "triton", "batch": 64, "img_size": 224, "dtype": "bf16",
         "median_ms": 10.0, "images_per_s": 6400.0, "speedup": 1.5},
    ], roofline=4800.0)  # fmt: skip
    (folder / "summary.json").write_text("{}", encoding="utf-8")  # not a bench-*.json: not read
    if provenance is not None:
        (folder / "provenance.json").write_text(json.dumps(provenance), encoding="utf-8")
    return folder


def test_renderer_merges_a_gpu_check_folder_into_one_section(tmp_path):
    _gpu_check_folder(tmp_path)
    loaded = render_tables.load_results(tmp_path)
    assert [r["file"] for r in loaded] == ["gpu-check-h200/"]
    text = render_tables.render(loaded)
    assert text.count("#### ") == 1 and "#### NVIDIA H200 (`benchmarks/results/gpu-check-h200/`)" in text
    assert "`bench-kernels-h200.json`, `bench-baselines-h200.json` and `bench-models-h200.json` merged" in text
    # kernel rows of both runs in one table; sdpa-efficient was never timed, so it has no column
    assert "| shape | dtype | pass | ours-triton | sdpa-flash | compile-reference | flex | ours-triton GB/s |" in text
    assert "| cls224-stage1 (B2 H2 M64 N67200 D32) | bf16 | forward | 0.500 ms | 0.400 ms | 0.300 ms | 0.900 ms | 100.0 | 4.0% |" in text
    assert "sdpa-efficient" not in text
    assert "| spatialformer_tiny | inference | 64, 224x224, bf16 | triton | 6400.0 | 10.0 | 1.50x |" in text
    # the speedup stays the file's; where its baseline time differs from that baseline's own row, the section says so
    assert "| 0.40x | 0.80x |" in text
    assert "compile-reference 0.200 ms for ours-triton's speedup, 0.300 ms in its column" in text
    assert "commit `0123456789ab`, 2026-11-25." in text and "provenance.json" not in text


def test_renderer_takes_the_commit_of_a_gpu_check_folder_from_its_provenance(tmp_path):
    _gpu_check_folder(tmp_path, provenance={
        "gpu": "NVIDIA H200 (141 GB HBM3e, 132 SMs)", "date": "2026-12-04", "command": "benchmarks/gpu_check.sh OUTDIR",
        "commit": "fedcba9876543210fedcba9876543210fedcba98", "commit_note": "The machine's copy carried a stale .git.",
        "software": "torch 2.y", "timing_note": "Events include host time.",
    })  # fmt: skip
    text = render_tables.render(render_tables.load_results(tmp_path))
    assert "commit `fedcba987654` (from provenance.json), 2026-12-04." in text and "0123456789ab" not in text
    assert "Commit: The machine's copy carried a stale .git." in text
    assert "GPU: NVIDIA H200 (141 GB HBM3e, 132 SMs)." in text and "Software: torch 2.y." in text
    assert "Command: `benchmarks/gpu_check.sh OUTDIR`." in text and "Timing note: Events include host time." in text


def test_targets_accept_an_h200_result_and_name_it(tmp_path):
    _gpu_check_folder(tmp_path)
    text = render_tables.render(render_tables.load_results(tmp_path))
    assert "**Targets (bf16; measured on NVIDIA H200, `benchmarks/results/gpu-check-h200/`;" in text
    assert "targets set for an H100, unchanged; % of HBM roofline against this GPU's own 4800 GB/s (data sheet)" in text
    assert (
        "| forward cls224-stage1: >= 1.5x SDPA, >= 70% of HBM roofline | not met | ours-triton 0.500 ms, 0.80x SDPA, "
        "100 GB/s = 4.0% of roofline (on NVIDIA H200, gpu-check-h200/) |"
    ) in text
    assert "| forward det800x1344-stage1: >= 4x SDPA | not yet measured | no bf16 row in gpu-check-h200/ (NVIDIA H200) |" in text
    assert "no H100" not in text


def test_targets_skip_a_gpu_result_without_bilateral_rows(tmp_path):
    _gpu_check_folder(tmp_path)
    masked_only = tmp_path / "gpu-check-h200-masked"  # sorts before gpu-check-h200/
    masked_only.mkdir()
    _result_file(masked_only / "bench-masked-h200.json", "cuda", "NVIDIA H200", [
        {**_kernel("m2f512-s8", "fwd", "ours-triton", "ours", 0.1, speedup_vs_sdpa=2.0), "op": "masked_cross"},
    ], roofline=4800.0)  # fmt: skip
    loaded = render_tables.load_results(tmp_path)
    assert [r["file"] for r in loaded] == ["gpu-check-h200-masked/", "gpu-check-h200/"]
    text = render_tables.render(loaded)
    assert "**Targets (bf16; measured on NVIDIA H200, `benchmarks/results/gpu-check-h200/`;" in text
    assert "ours-triton 0.500 ms, 0.80x SDPA" in text


def test_targets_prefer_an_h100_result_to_an_h200_one(tmp_path):
    _gpu_check_folder(tmp_path)
    _result_file(tmp_path / "z-h100.json", "cuda", "NVIDIA H100 80GB HBM3", [
        _kernel("cls224-stage1", "fwd", "ours-triton", "ours", 0.05, speedup_vs_sdpa=1.8, pct=75.0),
    ], roofline=3350.0)  # fmt: skip
    text = render_tables.render(render_tables.load_results(tmp_path))
    cited = "`benchmarks/" + "results/z-h100.json`"  # a temporary file, not a path of this repository
    assert f"**Targets (bf16; measured on NVIDIA H100 80GB HBM3, {cited};" in text
    assert "set for an H100" not in text and "against this GPU's own 3350 GB/s" in text
    assert "| met | ours-triton 0.050 ms, 1.80x SDPA, 100 GB/s = 75.0% of roofline (on NVIDIA H100 80GB HBM3, z-h100.json) |" in text
    assert "(on NVIDIA H200" not in text and "#### NVIDIA H200 (`benchmarks/results/gpu-check-h200/`)" in text


# ---------------------------------------------------------------------------- parity


TINY = workload.Shape("tiny", B=2, H=2, M=16, N=300, D=16)


def _wrong_scale():
    return lambda q_s, k_s, v_s, q_x, k_x, v_x, scale: bilateral_attention_reference(q_s, k_s, v_s, q_x, k_x, v_x, 1.1 * scale)


def test_parity_checks_carry_max_error_bound_and_verdict():
    good = next(p for p in workload.providers_for(CPU) if p.name == "sdpa")
    wrong = workload.Provider("wrong-scale", "baseline", "reference", _wrong_scale)
    session = measurement.BenchSession(CPU, [good, wrong], measure_memory=False)
    for name in ("sdpa", "wrong-scale"):
        session.row(TINY, torch.float32, "fwd", name)
    (shape, ok), (_, bad) = session.parity_checks()
    assert shape == TINY and ok.dims == "B2 H2 M16 N300 D16" and ok.passed and 0 <= ok.max_err <= ok.bound
    assert not bad.passed and bad.max_err > bad.bound > 0 and "max abs err" in bad.failures
    assert ok.tensor in testing.BILATERAL_RESULT_NAMES[:2] and not ok.with_grads
    text = cli.format_parity(session.parity_checks())
    assert "tolerance rule" in text
    assert re.search(rf"tiny +B2 H2 M16 N300 D16 +fp32 +sdpa +{ok.max_err:.1e} <= {ok.bound:.1e} \(o_[sx]\) +- +pass$", text, re.M)
    assert re.search(rf"wrong-scale +{bad.max_err:.1e} > {bad.bound:.1e} \(o_[sx]\) +- +FAIL$", text, re.M)


@pytest.mark.skipif(torch.cuda.is_available() or "triton" not in dispatch.runnable_backends(CPU),
                    reason="needs Triton's interpreter on a machine without CUDA")  # fmt: skip
def test_triton_in_its_interpreter_is_checked_on_a_reduced_shape_and_not_timed():
    triton = next(p for p in workload.providers_for(CPU) if p.name == "ours-triton")
    session = measurement.BenchSession(CPU, [triton], measure_memory=False)
    row = session.row(TINY, torch.float32, "fwd", "ours-triton")
    assert row.status == "untimed" and row.median_ms is None and "interpreter" in row.note
    [(shape, check)] = session.parity_checks()
    assert shape == TINY and check.passed and check.dims == f"B1 H2 M16 N{workload.INTERPRETER_MAX_N} D16"
    assert "not timed ours-triton (fwd): Triton without CUDA runs only in its interpreter" in cli.format_table([row])


def test_triton_without_cuda_or_interpreter_says_it_was_not_checked(monkeypatch):
    if "triton" not in dispatch.available_backends() or torch.cuda.is_available():
        pytest.skip("needs Triton on a machine without CUDA")
    monkeypatch.setattr(dispatch, "triton_interpreter_enabled", lambda: False)
    triton = next(p for p in workload.providers_for(CPU) if p.name == "ours-triton")
    assert "not checked, not timed" in triton.skip and "TRITON_INTERPRET" in triton.skip and not triton.parity_only


def test_the_command_checks_triton_in_its_interpreter_without_cuda(tmp_path, monkeypatch):
    """`spatialformer-bench` on a machine without CUDA runs itself again under Triton's
    interpreter (it must be on before Triton defines a kernel), so the Triton parity appears."""
    if "triton" not in dispatch.available_backends() or torch.cuda.is_available():
        pytest.skip("needs Triton on a machine without CUDA")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "spatialformer_kernels.bench", "--quick", "--passes", "fwd", "--shapes", "cls224-stage2",
         "--providers", "ours-triton", "reference", "--budget", "0.01", "--out", str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    parity = json.loads((tmp_path / "results.json").read_text())["parity"]
    triton = [check for check in parity if check["provider"] == "ours-triton"]
    assert triton and all(check["passed"] for check in triton), parity
    assert "ours-triton" in (tmp_path / "table.txt").read_text()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli._interpreter_command() is None  # set either way by the user: respected
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli._interpreter_command()[1:3] == ["-m", "spatialformer_kernels.bench"]


# ---------------------------------------------------------------------------- environment


def test_commit_of_an_installed_package_is_not_a_git_checkout(monkeypatch, tmp_path):
    outside = tmp_path / "site-packages" / "spatialformer_kernels" / "bench" / "measurement.py"
    monkeypatch.setattr(measurement, "__file__", str(outside))
    assert measurement.git_commit() == measurement.NOT_A_CHECKOUT == "not a git checkout"
    # pip install . into a virtual environment inside a checkout: site-packages is not that checkout
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "c"], check=True)
    monkeypatch.setattr(measurement, "__file__", str(repo / ".venv/lib/site-packages/spatialformer_kernels/bench/measurement.py"))
    (repo / ".venv/lib/site-packages/spatialformer_kernels").mkdir(parents=True)
    assert measurement.git_commit() == measurement.NOT_A_CHECKOUT


def test_a_stated_commit_wins_and_is_reported_as_stated(monkeypatch, tmp_path):
    monkeypatch.setattr(measurement, "__file__", str(tmp_path / "copy" / "spatialformer_kernels" / "bench" / "measurement.py"))
    monkeypatch.setenv(measurement.STATED_COMMIT_ENV, "abc1234")
    assert measurement.git_commit() == "abc1234 (stated by SPATIALFORMER_SOURCE_COMMIT)"
    monkeypatch.delenv(measurement.STATED_COMMIT_ENV)
    assert measurement.git_commit() == measurement.NOT_A_CHECKOUT


def test_commit_of_this_checkout():
    if not (Path(measurement.__file__).resolve().parent.parent.parent / ".git").exists():
        pytest.skip("not running from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", measurement.git_commit())


def _fake_load(monkeypatch, values):
    """busy_cores() returns `values` in turn, then the last one again and again."""
    values = list(values)

    def busy():
        return values.pop(0) if len(values) > 1 else values[0]

    monkeypatch.setattr(measurement, "busy_cores", busy)
    monkeypatch.setattr(cli, "busy_cores", busy)


def test_wait_for_idle_waits_for_a_chained_command_then_stops(monkeypatch):
    _fake_load(monkeypatch, [1.7, 1.2, 0.1])  # a `pip install` finishing
    busy, waited = measurement.wait_for_idle(timeout_s=5.0)
    assert busy == 0.1 and 0.4 < waited < 2.0
    _fake_load(monkeypatch, [0.0])
    assert measurement.wait_for_idle(timeout_s=5.0) == (0.0, 0.0)  # idle: no wait
    _fake_load(monkeypatch, [1.7])
    busy, waited = measurement.wait_for_idle(timeout_s=0.3)  # still busy: bounded
    assert busy == 1.7 and 0.3 <= waited < 1.5
    env = measurement.environment(CPU, load=(busy, waited))
    assert not env["idle"] and env["busy_cores"] == 1.7
    assert cli.load_note(env).startswith(f"BUSY: other processes keep 1.7 of {os.cpu_count()} cores busy, still after waiting")
    assert measurement.choose_threads("auto", busy=float(os.cpu_count())) == 1
    env = measurement.environment(CPU, load=(0.0, 2.04))
    assert cli.load_note(env) == "idle (after waiting 2.0 s for other processes to finish)"
    env["busy_cores_at_end"] = 1.2
    assert cli.load_note(env).endswith(f"; BUSY at the end: other processes kept 1.2 of {os.cpu_count()} cores busy, so the last rows may be slowed")


def test_header_of_a_gpu_run_names_its_roofline_and_no_cpu_load():
    env = {
        "device_type": "cuda", "device_name": "NVIDIA H200", "capability": "9.0", "sm_count": 132, "cuda": "12.8",
        "torch": "2.x", "triton": "3.x", "python": "3.11", "git_commit": "not a git checkout", "backends": ["reference", "triton"],
        "roofline": {"peak_gbps": 4800.0, "source": "data sheet, H200"},
    }  # fmt: skip
    providers = [workload.Provider("ours-triton", "ours", "ours", None), workload.Provider("sdpa-flash", "baseline", "sdpa", None),
                 workload.Provider("xformers", "baseline", "xformers", None, skip="xformers is not installed")]  # fmt: skip
    lines = cli.header_lines(env, providers, workload.shapes_for(torch.device("cuda")), 0.25, "auto")
    assert lines[0].startswith("device: NVIDIA H200 (cuda, capability 9.0, 132 SMs)") and "commit: not a git checkout" in lines
    assert "% roof: of 4800 GB/s (data sheet, H200)" in lines
    assert "full docs/design.md section 4 shapes; masked cross-attention shapes (m2f512-s8, m2f512-s16, m2f512-s32" in "\n".join(lines)
    assert any(line.startswith("m2f512-s8 attn_mask: ") for line in lines) and not any(line.startswith("flex on") for line in lines)
    assert any(line.startswith("speedup: the fastest baseline's median time (of sdpa-flash) on") for line in lines)
    assert not any(line.startswith(("threads:", "load:")) for line in lines)


# ---------------------------------------------------------------------------- CLI


def _run(argv, monkeypatch, busy=0.0) -> int:
    _fake_load(monkeypatch, [busy])
    return cli.main(["--device", "cpu", "--no-progress", *argv])


def test_spatialformer_bench_quick_writes_table_json_and_plot(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench-out"
    ours = [p.name for p in workload.providers_for(CPU) if p.kind == "ours" and not p.skip and not p.parity_only]
    assert _run(["--quick", "--budget", "0.01", "--out", str(out), "--providers", "reference", "sdpa", *ours], monkeypatch) == 0
    printed = capsys.readouterr().out
    table = (out / "table.txt").read_text(encoding="utf-8")
    assert "median ms" in table and "GB/s" in table and "reference" in table
    result = json.loads((out / "results.json").read_text(encoding="utf-8"))
    env = result["environment"]
    assert env["device_type"] == "cpu" and "torch" in env and env["idle"] and env["git_commit"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    assert {r["pass"] for r in ok} == set(workload.PASSES)
    assert ok and all(r["gbps"] > 0 and r["tflops"] > 0 and r["median_ms"] > 0 for r in ok)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every provider's parity, both check kinds, on each shape: in results.json, table.txt and the console
    parity = result["parity"]
    quick = workload.shapes_for(CPU, cli.QUICK_SHAPES, 32)
    assert {s.label for s in quick} == {"cls224-stage1/32", "det800x1344-stage1/32", "m2f512-s32"}  # both ops; masked never scaled
    assert {(c["provider"], c["shape"], c["with_grads"]) for c in parity} == {
        (p, s.label, g) for p in ("reference", "sdpa", *ours) for s in quick for g in (False, True)
    }  # fmt: skip
    names = {"bilateral": testing.BILATERAL_RESULT_NAMES, "masked_cross": testing.CROSS_RESULT_NAMES}
    assert all(c["passed"] and 0 <= c["max_err"] <= c["bound"] and c["tensor"] in names[c["op"]] for c in parity)
    # the op is in every row, the masks' kept fraction in every masked row, the table and the config
    assert {r["op"] for r in ok if r["shape"] == "m2f512-s32"} == {"masked_cross"} and {r["op"] for r in ok} == set(names)
    assert all(0.28 <= r["mask_fraction"] <= 0.32 for r in result["rows"] if r["op"] == "masked_cross")
    assert result["config"]["masks"]["m2f512-s32"]["kept"] == workload.mask_summary(workload.shapes_for(CPU, ["m2f512-s32"])[0])["kept"]
    assert re.search(r"^m2f512-s32 +masked cross +B2 H8 M100 N256 D32 +fp32 +fwd +reference ", table, re.M)
    assert re.search(r"^m2f512-s32 attn_mask: (29|30|31)\.\d% of \(query, key\) pairs kept; one ellipse per query on the 16x16", table, re.M)
    for c in parity:
        line = rf"{re.escape(c['shape'])} +{c['dims']} +fp32 +{c['provider']} .*{c['max_err']:.1e} <= {c['bound']:.1e} \({c['tensor']}\).* pass$"
        assert re.search(line, table, re.M) and re.search(line, printed, re.M), line
    # table.txt reads alone: device, threads, load, commit, speedup's baseline, why % roof is empty
    header = table.split("\n\n")[0]
    for expected in (f"device: {env['device_name']}, {os.cpu_count()} cores (cpu)",
                     f"threads: {env['cpu_threads']} (--threads auto) on {os.cpu_count()} cores", "load: idle",
                     f"commit: {env['git_commit']}", "speedup: the fastest baseline's median time (of reference, sdpa)",
                     "% roof: empty: no HBM roofline", "shapes scaled down"):  # fmt: skip
        assert expected in header and expected in printed, expected
    assert "cores busy" not in printed and "None" not in header and "load: idle; idle at the end" in header


def test_a_busy_machine_is_said_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "wait_for_idle", lambda: (1.6, 5.0))  # still busy after the wait
    assert _run(["--quick", "--passes", "fwd", "--shapes", "cls224-stage2", "--providers", "reference",
                 "--budget", "0.01", "--out", str(tmp_path)], monkeypatch, busy=1.6) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert f"load: BUSY: other processes keep 1.6 of {os.cpu_count()} cores busy, still after waiting 5 s" in printed
    assert "load: BUSY" in (tmp_path / "table.txt").read_text(encoding="utf-8") and "BUSY at the end" in printed


def test_nothing_timed_writes_no_plot(tmp_path, capsys, monkeypatch):
    (tmp_path / "plot.png").write_bytes(b"an earlier run's plot")
    assert _run(["--quick", "--passes", "fwd", "--providers", "xformers", "--out", str(tmp_path)], monkeypatch) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "plot.png").exists() and "(no plot: no row was timed)" in printed
    table = (tmp_path / "table.txt").read_text(encoding="utf-8")
    assert "no row was timed" in table and "skipped xformers (fwd)" in table and "no provider was checked" in table
    assert cli.plot([], tmp_path / "plot.png", "title") is None and not (tmp_path / "plot.png").exists()


def test_thread_choice():
    assert measurement.choose_threads("3") == 3 and measurement.choose_threads(1) == 1
    assert 1 <= measurement.choose_threads("auto") <= torch.get_num_threads()
    assert measurement.busy_cores(samples=2, interval_s=0.0) >= 0


def test_host_cost_script_times_the_op_layers_and_the_triton_launchers():
    if "cpu" not in dispatch.available_backends():
        pytest.skip("the script stubs the C++ kernel's functions: it needs the cpu backend")
    script = Path(__file__).parent / "host_cost.py"
    env = {**os.environ, "TRITON_INTERPRET": "0"}  # the launchers' host cost, as on a GPU
    result = subprocess.run([sys.executable, str(script), "--calls", "20"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    times = dict(re.findall(r"^(.+?)\s+([0-9.]+) us$", result.stdout, re.M))
    expected = ["op layers, inference call", "op layers, forward + backward"]
    if "triton" in dispatch.available_backends():
        expected += [f"Triton {p} {what} (cls224-stage1 bf16)" for p in ("forward", "backward")
                     for what in ("call on its launch plan", "launcher")]
    for name in expected:
        assert float(times[name]) > 0, result.stdout


# ---------------------------------------------------------------------------- model fit

_fit_spec = importlib.util.spec_from_file_location("fit_perf_model", Path(__file__).with_name("fit_perf_model.py"))
fit_perf_model = importlib.util.module_from_spec(_fit_spec)
_fit_spec.loader.exec_module(fit_perf_model)


def test_model_fit_recovers_the_constants_that_timed_the_measurements(tmp_path):
    """Launches whose 'measured' times come from known constants: the grid's best is those
    constants, and the current ones are scored against the same passes."""
    truth = (1.25, 0.3, 20e9, 1.5)

    def launch(kernel, ctas, nbytes, issue_us, ctas_per_sm, warps, stages=2):
        return {"kernel": kernel, "ctas": ctas, "bytes": nbytes, "roofline_us": nbytes / 4.8e12 * 1e6, "issue_us": issue_us,
                "ipc": 2.0, "ctas_per_sm": ctas_per_sm, "tensor_us": 0.0,
                "config": {"BLOCK_N": 64, "num_warps": warps, "num_stages": stages}}  # fmt: skip

    cases = {  # memory-bound with few CTAs, issue-bound with few warps, and with many, small launches
        "a": [launch("_bilateral_fwd_kernel", 64, 100e6, 20.0, 2, 4), launch("_bilateral_combine_kernel", 256, 1e6, 1.0, 8, 4)],
        "b": [launch("_bilateral_fwd_kernel", 132, 10e6, 60.0, 1, 4), launch("_bilateral_combine_kernel", 256, 1e6, 1.0, 8, 4)],
        "c": [launch("_bilateral_fwd_kernel", 528, 50e6, 90.0, 4, 8), launch("_bilateral_combine_kernel", 132, 1e5, 0.2, 8, 2)],
        "d": [launch("_bilateral_fwd_kernel", 264, 30e6, 40.0, 2, 8), launch("_bilateral_combine_kernel", 132, 1e5, 0.1, 8, 4)],
        "e": [launch("_bilateral_fwd_kernel", 1320, 400e6, 30.0, 3, 4), launch("_bilateral_combine_kernel", 528, 4e6, 0.5, 8, 4)],
    }
    rows = [{**row, "case": case, "op": "bilateral", "dtype": "bf16", "mask": False, "pass": "fwd", "launch": i}
            for case, launches in cases.items() for i, row in enumerate(launches)]
    model = {"gpu": "h200", "ipc": 2.0, "per_sm_bw": 60e9, "launch_us": 2.0, "rows": rows}
    (tmp_path / "model.json").write_text(json.dumps(model))
    gpu = fit_perf_model.pm.GPUS["h200"]
    with open(tmp_path / "sweep.jsonl", "w") as sweep:
        for case, launches in cases.items():
            us = fit_perf_model.pass_us(launches, truth, gpu)
            sweep.write(json.dumps({"shape": case, "pass": "fwd", "dtype": "bf16", "config": "default", "graph_us": us}) + "\n")
            sweep.write(json.dumps({"shape": case, "pass": "fwd", "dtype": "fp16", "config": "default", "graph_us": 1.0}) + "\n")
    out = tmp_path / "fit.json"
    assert fit_perf_model.main([str(tmp_path / "model.json"), str(tmp_path / "sweep.jsonl"), "--json", str(out)]) == 0
    fit = json.loads(out.read_text())
    assert tuple(fit["best"]) == truth and fit["current"] == [2.0, 0.25, 60e9, 2.0]
    assert len(fit["passes"]) == 5 and all(p["best_us"] == pytest.approx(p["measured_us"]) for p in fit["passes"])
    assert any(abs(p["current_us"] / p["measured_us"] - 1) > 0.2 for p in fit["passes"])
    assert fit["sdpa"] is None  # no sdpa-flash rows
    excluded = tmp_path / "fit-excluded.json"
    fit_perf_model.main([str(tmp_path / "model.json"), str(tmp_path / "sweep.jsonl"), "--exclude", "a:fwd", "--json", str(excluded)])
    assert [p["case"] for p in json.loads(excluded.read_text())["passes"]] == ["b", "c", "d", "e"]


def test_a_forced_spatial_block_row_counts_only_at_the_models_block(tmp_path):
    """--bwd-block-m rows ("m<BLOCK_M>n..w..s..") match a modelled launch only where the launcher
    uses that spatial block (64 rows at D = 96, M = 64 on sm_90), and the tile's label too."""
    launch = {"config": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 1}}
    launches = {("cls224-stage1-D96", "bwd_s"): [{**launch, "kernel": "_spatial_delta_kernel"},
                                                  {**launch, "kernel": "_bilateral_bwd_kernel"}]}
    assert fit_perf_model.model_block_m("cls224-stage1-D96", True) == 64
    assert fit_perf_model.model_block_m("not-a-shape", True) is None
    sweep = tmp_path / "sweep.jsonl"
    for config, us in (("m32n32w4s1", 1.0), ("m64n32w4s2", 2.0), ("m64n32w4s1", 3.0), ("m16n32w4s1", 4.0)):
        with open(sweep, "a") as handle:
            handle.write(json.dumps({"shape": "cls224-stage1-D96", "pass": "bwd_s", "dtype": "bf16", "config": config,
                                     "graph_us": us}) + "\n")
    assert fit_perf_model.measured_passes([str(sweep)], launches) == {("cls224-stage1-D96", "bwd_s"): 3.0}


def test_sdpa_fit_recovers_the_constants_that_timed_the_measurements(tmp_path):
    """SDPA's flash rows whose 'measured' times come from known FA2 constants (memory-bound and
    compute-bound shapes, forward and forward + backward): the grid's best is those constants;
    other providers' rows and other dtypes are not fitted."""
    pm = fit_perf_model.pm
    gpu, truth = pm.GPUS["h200"], (12.5e9, 0.35)
    shapes = {"small-d": (64, 2, 64, 3136, 32), "long": (2, 2, 64, 67200, 32), "wide": (8, 4, 64, 4096, 128)}
    with open(tmp_path / "sweep.jsonl", "w") as sweep:
        for label, (B, H, M, N, D) in shapes.items():
            case = pm.Case(label, "bilateral", B, H, M, N, D, "bf16", False)
            for name, backward in fit_perf_model.SDPA_PASSES.items():
                row = {"shape": label, "dims": f"B{B} H{H} M{M} N{N} D{D}", "pass": name}
                sweep.write(json.dumps({**row, "compare": "sdpa-flash", "graph_us": pm.sdpa_pass(case, gpu, backward, truth)}) + "\n")
                sweep.write(json.dumps({**row, "compare": "sdpa-cudnn", "graph_us": 1.0}) + "\n")
                sweep.write(json.dumps({**row, "compare": "sdpa-flash", "dtype": "fp16", "graph_us": 1.0}) + "\n")
    fit = fit_perf_model.fit_sdpa([str(tmp_path / "sweep.jsonl")], gpu)
    assert tuple(fit["best"]) == truth and tuple(fit["current"]) == (pm.FA2_PER_SM_BW, pm.FA2_MMA_EFFICIENCY)
    assert len(fit["passes"]) == 6 and all(p["best_us"] == pytest.approx(p["measured_us"]) for p in fit["passes"])
