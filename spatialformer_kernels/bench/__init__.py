"""The benchmark harness behind `spatialformer-bench` and `pytest benchmarks/ --benchmark`.

Two ops (workload.OPS, a shape's `op`): bilateral attention (`bilateral_attention`, six inputs,
both directions), and masked cross-attention (`cross_attention(q, k, v, attn_mask=...)`,
op "masked_cross": M queries over N keys, attn_mask bool [B, M, N], True = attend,
broadcast over the heads), the masked cross-attention of a Mask2Former decoder layer.

One measurement core serves both front ends: `spatialformer-bench` (a table with a
progress bar, JSON and a PNG plot) and `pytest benchmarks/ --benchmark` (pytest-benchmark
rows). Every row first checks parity with the reference (`testing.tolerance_check`, the
rule of `testing.assert_close`; the command prints each check's max error and bound), then
times one provider on one shape, dtype and pass.

Shapes: the bilateral ones are docs/design.md section 4. On CPU they are scaled down so that
every row runs in well under a second on 2 cores: B and N are divided by `CPU_SCALE` (B at least 1); H, M and D
stay as they are, so per-head tiles keep their shape and every shape shrinks alike (N/M is
CPU_SCALE times smaller). A scaled shape is named "<shape>/<factor>". The masked
cross-attention ones are Mask2Former's on a 512 x 512 image: B 2, H 8, M 100
object queries, D 32, over the 1/8, 1/16 and 1/32 feature maps, N 4096, 1024 and 256 keys
(m2f512-s8, -s16, -s32); they are small, so they are never scaled, on any device. Their
masks (workload.object_query_masks, deterministic from the seed): per query one ellipse on
the sqrt(N) x sqrt(N) key grid (raster order) holding 20% to 40% of the keys, and in each
sample 2 queries that attend to no key and 1 to every key: about 30% of the (query, key)
pairs kept (the command prints the measured fraction of each shape; results carry it).

Providers: ours (one per kernel backend in `available_backends()` that can run on the
device; Triton without CUDA in its interpreter, parity-checked on reduced shapes, never
timed: the command runs itself again with TRITON_INTERPRET=1 unless that is set either way), the reference, PyTorch SDPA (each backend
the device has, both directions as two calls), torch.compile of the reference, FlexAttention
(compiled; on CPU forward only, and left out of a default CPU `spatialformer-bench` run for
its compile time), xformers and flash-attn when installed. Masked cross-attention: ours is
`cross_attention(..., attn_mask=mask)`; SDPA gets the boolean mask as `attn_mask=mask[:, None]`
(on CUDA every backend that takes a mask; FlashAttention takes none: skipped, with the
reason); FlexAttention gets a BlockMask made by `create_block_mask` from a mask_mod reading the
mask tensor, built once per case outside the timed calls (Provider.prepare); xformers and
flash-attn are skipped with the reason (flash-attn has no arbitrary mask; xformers would need
the mask as an additive bias, not wired up). Passes: "fwd" (inference, no
autograd graph), "bwd" (autograd.grad of a retained graph) and "fwd_bwd" (both).

Timing: on CUDA `triton.testing.do_bench` (CUDA events, L2 flushed before every call,
autotuning and compilation finished by explicit warm-up calls first); on CPU a warm-up
call, then `time.perf_counter` around each call until a time budget, median reported, with
as many threads as there are idle cores (`choose_threads`), after waiting a few seconds for
the load of a command just before (`pip install`) to settle (`wait_for_idle`).

Work model (the same for every provider, so GB/s is an effective bandwidth), bilateral:
    bytes fwd  = 4 * B*H*(M+N)*D * itemsize              (read q, k, v; write o; both sides)
    bytes bwd  = 8 * B*H*(M+N)*D * itemsize + 4*B*H*(M+N) (read q, k, v, o, do, lse; write dq, dk, dv)
    flops fwd  = 8 * B*H*M*N*D                            (q@k^T and p@v, both directions)
    flops bwd  = 20 * B*H*M*N*D                           (recomputed logits, dv, dp, dq, dk)
masked cross-attention (one direction: M queries, N keys; the bool mask is one byte per
(query, key) pair, read once, not per head, by each pass):
    bytes fwd  = (2*M + 2*N) * B*H*D * itemsize + B*M*N              (read q, k, v, mask; write o)
    bytes bwd  = (4*M + 4*N) * B*H*D * itemsize + 4*B*H*M + B*M*N    (read q, k, v, o, do, lse, mask; write dq, dk, dv)
    flops fwd  = 4 * B*H*M*N*D                            (q@k^T and p@v)
    flops bwd  = 10 * B*H*M*N*D                           (recomputed logits, dv, dp, dq, dk)
    The lse counts 4 bytes per query row, as in the bilateral model. The FLOPs are the dense op's, masked pairs included (what a kernel that skips nothing
    computes; at ~30% kept a block-sparse one does less), so TFLOP/s compares providers, not
    the work each really does.
fwd_bwd is the sum of both (so the mask is counted twice, once per pass).

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
    spatialformer-bench --shapes m2f512-s8 m2f512-s16 m2f512-s32   # masked cross-attention rows only
"""
