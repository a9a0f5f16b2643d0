"""The benchmark harness behind `spatialformer-bench` and `pytest benchmarks/ --benchmark`.

One measurement core serves both front ends: `spatialformer-bench` (a table with a
progress bar, JSON and a PNG plot) and `pytest benchmarks/ --benchmark` (pytest-benchmark
rows). Every row first checks parity with the reference (`testing.tolerance_check`, the
rule of `testing.assert_close`; the command prints each check's max error and bound), then
times one provider on one shape, dtype and pass.

Shapes are docs/design.md section 4. On CPU they are scaled down so that every row runs in well
under a second on 2 cores: B and N are divided by `CPU_SCALE` (B at least 1); H, M and D
stay as they are, so per-head tiles keep their shape and every shape shrinks alike (N/M is
CPU_SCALE times smaller). A scaled shape is named "<shape>/<factor>".

Providers: ours (one per kernel backend in `available_backends()` that can run on the
device; Triton without CUDA in its interpreter, parity-checked on reduced shapes, never
timed: the command runs itself again with TRITON_INTERPRET=1 unless that is set either way), the reference, PyTorch SDPA (each backend
the device has, both directions as two calls), torch.compile of the reference, FlexAttention
(compiled; on CPU forward only, and left out of a default CPU `spatialformer-bench` run for
its compile time), xformers and flash-attn when installed. Passes: "fwd" (inference, no
autograd graph), "bwd" (autograd.grad of a retained graph) and "fwd_bwd" (both).

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed before every call,
autotuning and compilation finished by explicit warm-up calls first); on CPU a warm-up
call, then `time.perf_counter` around each call until a time budget, median reported, with
as many threads as there are idle cores (`choose_threads`), after waiting a few seconds for
the load of a command just before (`pip install`) to settle (`wait_for_idle`).

Work model (the same for every provider, so GB/s is an effective bandwidth):
    bytes fwd  = 4 * B*H*(M+N)*D * itemsize              (read q, k, v; write o; both sides)
    bytes bwd  = 8 * B*H*(M+N)*D * itemsize + 4*B*H*(M+N) (read q, k, v, o, do, lse; write dq, dk, dv)
    flops fwd  = 8 * B*H*M*N*D                            (q@k^T and p@v, both directions)
    flops bwd  = 20 * B*H*M*N*D                           (recomputed logits, dv, dp, dq, dk)
fwd_bwd is the sum of both.

Modules:
    workload     what is run: shapes, the work model, providers, cases and parity
    measurement  how it is measured: environment and rooflines, timing, peak memory,
                 rows and BenchSession
    cli          the output (table, plot) and the command line (also `python -m
                 spatialformer_kernels.bench`)
The whole-model benchmark (SpatialFormer images per second) lives with the models, in
spatialformer.benchmark: this package never imports the models.

    spatialformer-bench                         # default shapes, table + JSON + PNG in ./bench-out/
    TRITON_INTERPRET=0 spatialformer-bench      # without CUDA: skip the Triton kernels' parity check
    spatialformer-bench --quick                 # a few seconds
    spatialformer-bench --shapes cls224-stage1 --passes fwd --dtypes bf16
"""
