#!/usr/bin/env bash
# One-command GPU check:  benchmarks/gpu_check.sh OUTDIR
#
# On a CUDA machine, from the repository root, in the current Python environment (PYTHON,
# default python), every step below writes its log to OUTDIR/<step>.log. The whole check has
# a budget of GPU_CHECK_BUDGET_S seconds (default 470, under 8 minutes on an H100/H200): each
# step's limit is cut to what is left of it, so a slow step shortens the ones after it rather
# than the check overrunning. Steps run in order of value, the short ones before the long
# pytest-benchmark tables; each runs even if an earlier one failed; GPU_CHECK_SKIP
# (space-separated step names) leaves steps out.
#   env.txt              nvidia-smi, torch / triton versions, the GPU the model is picked for
#   build                import the package (first-use build of the C++ CPU kernel, once)
#   tests (.log/.xml)    the CUDA tests that matter: parity of every kernel path, numerics, edge
#                        cases (stops after 10 failures; they include bitwise reruns and torch.compile
#                        fullgraph), on 8 pytest-xdist workers when xdist is installed
#   config_sweep         ours vs SDPA x2 timed eager, in a CUDA graph and pipelined, the D = 96
#                        direction-x backward with a partial last tile at its candidate configs
#                        (configs.TAIL_CONFIGS), then every candidate launch config
#                        (benchmarks/gpu_config_sweep.py) -> config-sweep-<gpu>.jsonl
#   graph_check          determinism (two eager runs bitwise equal) and CUDA-graph capture of
#                        forward + backward after warm-up (replay bitwise equal to eager), for
#                        bilateral_attention and cross_attention (both directions), bf16 and fp32
#                        -> graph_check.json
#   host_cost            Python cost per call with the kernels stubbed (benchmarks/host_cost.py) on this
#                        machine's CPU -> host_cost.log
#   host_profile         eager calls of ours and SDPA: pipelined, synced and CUDA-graph time per call,
#                        allocator segments, and profiler tables of ours (benchmarks/host_profile.py)
#                        -> host-profile/
#   bench_models         whole-model rows (SpatialFormer-T/S/B) -> bench-models-<gpu>.json
#   bench_kernels        pytest-benchmark at the bilateral benchmark shapes (bf16): ours and SDPA's
#                        flash / efficient / cuDNN backends and the reference -> bench-kernels-<gpu>.json
#   bench_masked         masked cross-attention at Mask2Former's shapes (m2f512-s8/-s16/-s32;
#                        bf16): ours, the reference, SDPA with the boolean mask (efficient,
#                        cuDNN, math; flash takes no mask: skipped), torch.compile of the reference
#                        and FlexAttention with a BlockMask -> bench-masked-<gpu>.json (its own step
#                        and file, so a slow or cut run of it leaves bench_kernels' results whole)
#   bench_baselines      at the bilateral shapes, the baselines that compile per shape (torch.compile
#                        of the reference, FlexAttention) and SDPA's math backend -> bench-baselines-<gpu>.json
#   static_model         the MODELLED table of the static check for the same GPU, to set against
#                        the measured numbers -> static-model-<gpu>.json
#   summary.json         each step's exit status and seconds
# The exit status is non-zero if any step failed. Without a CUDA GPU it says so and exits 2
# before running anything.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUTDIR" >&2
    exit 64
fi
OUT="$1"
PY="${PYTHON:-python}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
SKIP=" ${GPU_CHECK_SKIP:-} "
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, also for scripts

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: NO CUDA GPU on this machine (torch.cuda.is_available() is False): nothing was run." >&2
    exit 2
fi
mkdir -p "$OUT"

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
case "$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]')" in
    *h200*) MODEL_GPU=h200 ;;
    *h100*) MODEL_GPU=h100 ;;
    *a100*) MODEL_GPU=a100 ;;
    *) MODEL_GPU=h100; echo "gpu_check: '$GPU_NAME' has no model entry; the static model uses h100" >&2 ;;
esac

STATUS=()
step() {  # step NAME TIMEOUT_S COMMAND...: the limit is cut to what is left of the budget
    local name="$1" limit="$2"; shift 2
    local left=$((BUDGET - SECONDS))
    if [[ "$SKIP" == *" $name "* ]]; then
        echo "== $name: skipped (GPU_CHECK_SKIP)"
        return
    fi
    if [ "$left" -lt 10 ]; then
        echo "== $name: not run, the ${BUDGET}s budget is spent"
        STATUS+=("\"$name\": {\"rc\": \"not run: budget spent\", \"seconds\": 0}")
        return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
    local start=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - start))s (log: $OUT/$name.log)"
    tail -3 "$OUT/$name.log" | sed 's/^/   | /'
    STATUS+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - start))}")
}

{
    nvidia-smi || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__); print(torch.cuda.get_device_properties(0))"
    echo "static model GPU: $MODEL_GPU"
    git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

step build 90 "$PY" -c "import spatialformer_kernels as sk; print('backends', sk.available_backends())"

XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step tests 150 "$PY" -m pytest tests/test_kernel_parity.py tests/test_triton_backend.py tests/test_numerics.py \
    tests/test_edge_cases.py --maxfail=10 -q "${XDIST[@]}" --junitxml="$OUT/tests.xml"

step config_sweep 130 "$PY" benchmarks/gpu_config_sweep.py "$OUT/config-sweep-$MODEL_GPU.jsonl"

step graph_check 60 "$PY" - "$OUT/graph_check.json" <<'EOF'
"""Determinism and CUDA-graph capture of forward + backward after warm-up."""
import json, sys
import torch
import spatialformer_kernels as sk

results = []


def run(fn, inputs, grads):
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.detach().clone() for o in outs] + [g.clone() for g in
            torch.autograd.grad(outs, inputs, grads)]


for dtype in (torch.bfloat16, torch.float32):
    for op, shapes in (("bilateral", None), ("cross_s", None), ("cross_x", None)):
        B, H, M, N, D = 8, 2, 64, 3136, 32
        g = torch.Generator(device="cuda").manual_seed(0)
        def t(L):
            return torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
        if op == "bilateral":
            inputs = [t(M), t(M), t(M), t(N), t(N), t(N)]
            fn = lambda *x: sk.bilateral_attention(*x, backend="triton")
            grads = [torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=g) for L in (M, N)]
        else:
            lq, lk = (M, N) if op == "cross_s" else (N, M)
            inputs = [t(lq), t(lk), t(lk)]
            fn = lambda *x: sk.cross_attention(*x, backend="triton")
            grads = [torch.randn(B, H, lq, D, device="cuda", dtype=dtype, generator=g)]
        first, second = run(fn, inputs, grads), run(fn, inputs, grads)
        deterministic = all(torch.equal(a, b) for a, b in zip(first, second))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                run(fn, inputs, grads)  # warm-up: autotuning and compiles happen here
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        error = None
        try:
            with torch.cuda.graph(graph):
                captured = run(fn, inputs, grads)
            graph.replay()
            torch.cuda.synchronize()
            replay_equal = all(torch.equal(a, b) for a, b in zip(captured, first))
        except Exception as exc:  # report, do not stop the other cases
            error, replay_equal = repr(exc), False
        results.append(dict(op=op, dtype=str(dtype), deterministic=deterministic, graph_replay_equal=replay_equal,
                            error=error))
        print(results[-1])
with open(sys.argv[1], "w") as handle:
    json.dump(results, handle, indent=1)
sys.exit(0 if all(r["deterministic"] and r["graph_replay_equal"] for r in results) else 1)
EOF

step host_cost 60 "$PY" benchmarks/host_cost.py --calls 300

step host_profile 120 "$PY" benchmarks/host_profile.py "$OUT/host-profile" --shapes cls224-stage1,cls224-stage2,det800x1344-stage1

step bench_models 90 "$PY" -m pytest benchmarks/test_throughput.py --benchmark -q -k model_throughput \
    --benchmark-json="$OUT/bench-models-$MODEL_GPU.json"

step bench_kernels 120 "$PY" -m pytest benchmarks/test_throughput.py --benchmark --bench-dtypes bf16 -q \
    -k "attention_throughput and not m2f512 and not compile and not flex and not math" \
    --benchmark-json="$OUT/bench-kernels-$MODEL_GPU.json"

step bench_masked 150 "$PY" -m pytest benchmarks/test_throughput.py --benchmark --bench-dtypes bf16 -q \
    -k "attention_throughput and m2f512" --benchmark-json="$OUT/bench-masked-$MODEL_GPU.json"

step bench_baselines 90 "$PY" -m pytest benchmarks/test_throughput.py --benchmark --bench-dtypes bf16 -q \
    -k "attention_throughput and not m2f512 and (compile or flex or math)" \
    --benchmark-json="$OUT/bench-baselines-$MODEL_GPU.json"

JOBS="$(nproc 2>/dev/null || echo 4)"
step static_model 90 "$PY" -m spatialformer_kernels.backends.triton.static_check --perf --gpu "$MODEL_GPU" \
    --jobs "$JOBS" --no-host --json "$OUT/static-model-$MODEL_GPU.json"

FAILED=0
for entry in "${STATUS[@]}"; do
    case "$entry" in *'"rc": 0,'*) ;; *) FAILED=1 ;; esac
done
( IFS=,; echo "{\"gpu\": \"$GPU_NAME\", \"model_gpu\": \"$MODEL_GPU\", \"steps\": {${STATUS[*]}}}" ) > "$OUT/summary.json"
echo "gpu_check: results in $OUT (summary.json); $([ $FAILED = 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')"
exit $FAILED
