"""Launch configurations of the fused Triton kernels (fused.py).

Which tile sizes, warps and stages the autotuner may pick per shape bucket, which buckets
have a fused backward at all (`backward_supported`), and when the forward fuses both
directions. Budgets and exclusions were set from the static check
(python -m spatialformer_kernels.backends.triton.static_check): every kept config compiles for sm_80 and
sm_90 without spills.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# BLOCK_M (spatial rows per block) is fixed per head-dim bucket and dtype size; the tuner
# picks the image tile BLOCK_N and the warps. Stages follow D (2 up to D = 64; beyond, a
# second stage only adds shared memory). Budgets and exclusions below were set from the
# static check (python -m spatialformer_kernels.backends.triton.static_check): every kept config compiles
# for sm_80 and sm_90 without spills.
FWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w)
    for bn in (16, 32, 64, 128)
    for w in (4, 8)
]
# Backward tiles stop at 64 tokens: at 128 the s-direction backward spills at every D.
BWD_CONFIGS = [c for c in FWD_CONFIGS if c.kwargs["BLOCK_N"] <= 64]
# At most this many configs are benchmarked per shape bucket (the largest tiles that fit);
# the interpreter (no autotuning there) always runs the last of them, so the test config
# is one the static check compiles.
MAX_TUNED_CONFIGS = 2
# Image tokens per split are a multiple of the largest tile, so tiles never straddle splits.
CHUNK_ALIGN = 128
# A split gets at least this many image tokens, so a large batch is not over-split.
MIN_SPLIT_TOKENS = 256
# Spatial rows per program of `_spatial_delta_kernel` (a [16, 16] diagonal block per program).
DELTA_BLOCK_M = 16
# Fallback when no config passes the budget (none does today: the static check fails if
# a bucket ends up here and spills).
FALLBACK_BLOCK_N = 32
FALLBACK_WARPS = 8
# Pretend SM count in the interpreter so that split-K is exercised by the tests.
INTERPRETER_SM_COUNT = 8
# Estimated live 32-bit registers per thread (see _live_words_per_thread) above which a
# config spills on sm_90 in the static check's measurements.
REGISTER_BUDGET = 96
REGISTER_BUDGET_4_WARPS = 64


def block_d_for(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(head_dim))


def num_stages_for(block_d: int) -> int:
    return 2 if block_d <= 64 else 1


def block_m_for(block_d: int, elem_bytes: int, backward: bool, n_spatial: int = 0) -> int:
    """Spatial rows per block, fixed per head-dim bucket. In the backward, M <= this cap
    keeps the spatial side and its gradients in registers for the whole chunk; a larger M
    loops over blocks of half the size (the loop also carries the image-side gradients)."""
    cap = {16: 64, 32: 64, 64: 32, 128: 32, 256: 16}[block_d]
    if elem_bytes == 4:
        cap //= 2
    if backward and n_spatial > cap:
        cap //= 2
    return max(16, cap)


def backward_supported(block_d: int, elem_bytes: int, n_spatial: int = 0) -> bool:
    """Whether the fused backward kernel fits this bucket without spills (else the head dim
    is split across programs, wide.py). fp32 dots run on FMA
    units, whose operand layouts replicate the D-long reduction axis across threads: at
    D > 64 every fp32 backward tile spills on sm_80/sm_90. In 16-bit, D = 256 with M > 16
    (the looped path) spills too."""
    if elem_bytes == 4:
        return block_d <= 64
    return block_d <= 128 or n_spatial <= block_m_for(block_d, elem_bytes, backward=True)


def fuse_directions(block_d: int, elem_bytes: int) -> bool:
    """Whether the forward runs both directions in one launch. The directions read disjoint
    image tensors (s: k_x, v_x; x: q_x), so two launches move the same bytes; at large D
    each runs alone to keep its live state in registers. The backward always runs one
    direction per launch: fused, its live state spills at every tile size on sm_80/sm_90."""
    return elem_bytes == 2 and block_d <= 64


def _live_words_per_thread(block_m, block_n, block_d, elem_bytes, num_warps, backward, both):
    """Rough count of 32-bit registers per thread held by a program's live tiles."""
    e = elem_bytes / 4
    if backward:
        spatial = block_m * block_d * (4 * e + 3)  # q, k, v, dO + three fp32 accumulators
        image = block_n * block_d * (4 * e + 3)
        scores = 4 * block_m * block_n
    else:
        spatial = block_m * block_d * (3 * e + 1)
        image = block_n * block_d * (3 * e + 1)
        scores = 2 * block_m * block_n
    if not both:
        spatial, image, scores = spatial / 2, image / 2, scores / 2
    return (spatial + image + scores) / (32 * num_warps)


# (backward, DIR_S, DIR_X, BLOCK_M, BLOCK_D, element bytes, BLOCK_N, num_warps) that the
# static check measured to spill on sm_80 or sm_90 although the rules below admit them
# (ptxas sometimes caps 8-warp kernels at 128 registers).
MEASURED_SPILLS = frozenset({
    (False, False, True, 64, 16, 2, 128, 8),
    (True, True, False, 32, 16, 2, 64, 4),
    (False, True, True, 32, 64, 2, 64, 8),
    (True, True, False, 32, 64, 2, 64, 8),
    (False, True, False, 32, 128, 2, 64, 8),
    (True, True, False, 16, 256, 2, 32, 8),
    (True, False, True, 16, 256, 2, 32, 8),
    (False, True, False, 32, 32, 4, 32, 8),
    (True, True, False, 16, 64, 4, 32, 8),
    (True, False, True, 16, 64, 4, 32, 8),
    (False, False, True, 16, 128, 4, 32, 8),
    (False, False, True, 64, 16, 2, 32, 4),
    (False, True, True, 64, 16, 2, 32, 4),
    (True, True, False, 16, 16, 4, 16, 8),
    (True, True, False, 32, 32, 4, 16, 8),
    (True, True, False, 32, 16, 2, 32, 4),
    (True, True, False, 32, 32, 2, 64, 8),
    (True, True, False, 16, 64, 2, 32, 8),
    (False, False, True, 32, 16, 4, 16, 8),
    (True, False, True, 16, 16, 4, 32, 8),
    (True, True, False, 16, 32, 4, 16, 8),
    # From the run-time-specialised compiles of the static check (launch_record.py: the
    # launchers' own launches bound by Triton's binder), not the old synthetic signature:
    # direction x forward with a spatial key mask (cross_attention, many queries) spills on sm_80.
    (False, False, True, 64, 32, 2, 128, 8),
    (False, False, True, 32, 64, 2, 64, 8),
    (False, False, True, 64, 32, 2, 32, 4),  # the next candidate there: spills on sm_90
})


def configs_for(block_m, block_d, elem_bytes, backward, both, dir_s=True):
    """The configs autotuning may pick for one shape bucket (also used by the static check)."""
    kept = []
    dirs = (True, True) if both else (dir_s, not dir_s)
    for config in BWD_CONFIGS if backward else FWD_CONFIGS:
        bn, w = config.kwargs["BLOCK_N"], config.num_warps
        if elem_bytes == 4:
            # fp32 dots run on FMA units whose operand layouts replicate the reduction axis
            # across threads: only small tiles on 8 warps stay in registers.
            if bn > 32 or w != 8:
                continue
        else:
            if bn * block_d > 8192 or (bn == 16 and block_d < 128):
                continue  # 16-token tiles only where a wider one would not fit
            if w == 8 and bn * block_d < 2048:
                continue  # too little work per tile for 8 warps
            budget = REGISTER_BUDGET if w == 8 else REGISTER_BUDGET_4_WARPS
            if _live_words_per_thread(block_m, bn, block_d, elem_bytes, w, backward, both) > budget:
                continue
        if (backward, *dirs, block_m, block_d, elem_bytes, bn, w) in MEASURED_SPILLS:
            continue
        kept.append(triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=num_stages_for(block_d)))
    kept.sort(key=lambda c: (-c.kwargs["BLOCK_N"], c.num_warps))
    if not kept:
        kept = [triton.Config({"BLOCK_N": FALLBACK_BLOCK_N}, num_warps=FALLBACK_WARPS, num_stages=num_stages_for(block_d))]
    return kept[:MAX_TUNED_CONFIGS]


def fixed_config(block_m, block_d, elem_bytes, backward, both, dir_s=True) -> triton.Config:
    """The one config the interpreter runs for a bucket: the smallest tile the tuner may pick."""
    return configs_for(block_m, block_d, elem_bytes, backward, both, dir_s)[-1]


def _prune(backward):
    def prune(configs, named_args, **kwargs):
        elem_bytes = named_args["Q_X"].element_size()
        both = kwargs["DIR_S"] and kwargs["DIR_X"]
        return configs_for(kwargs["BLOCK_M"], kwargs["BLOCK_D"], elem_bytes, backward, both, kwargs["DIR_S"])

    return prune


_TUNE_KEY = ["BLOCK_M", "BLOCK_D", "M_ONE_BLOCK", "DIR_S", "DIR_X", "HAS_IMAGE_MASK", "HAS_SPATIAL_MASK"]


def autotune(kernel, configs, backward):
    if INTERPRET:
        return kernel
    return triton.autotune(configs=configs, key=_TUNE_KEY, prune_configs_by={"early_config_prune": _prune(backward)})(
        kernel
    )
