"""Launch configurations of the fused Triton kernels (fused.py).

Which tile sizes, warps and stages a launch uses per shape bucket (`launch_config`), which
buckets have a fused backward at all (`backward_supported`), and when the forward fuses both
directions. Nothing is tuned at run time: a launch looks its config up (the measured table
`MEASURED_CONFIGS`, else the first candidate of `configs_for`), so the first call costs no
benchmarking and is safe inside CUDA-graph capture. Candidates were filtered with the static
check (python -m spatialformer_kernels.backends.triton.static_check): every kept config
compiles for sm_80 and sm_90 without spills. benchmarks/gpu_config_sweep.py times the
candidates (and a wider grid) on a GPU; its results fill MEASURED_CONFIGS.
"""
from __future__ import annotations

import contextlib
import functools
import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# BLOCK_M (spatial rows per block) is fixed per head-dim bucket and dtype size; a launch
# picks the image tile BLOCK_N and the warps. Stages follow D (2 up to D = 64; beyond, a
# second stage only adds shared memory). Budgets and exclusions below were set from the
# static check: every kept config compiles for sm_80 and sm_90 without spills.
FWD_CONFIGS = [
    triton.Config({"BLOCK_N": bn}, num_warps=w)
    for bn in (16, 32, 64, 128)
    for w in (4, 8)
]
# Backward tiles stop at 64 tokens: at 128 the s-direction backward spills at every D.
BWD_CONFIGS = [c for c in FWD_CONFIGS if c.kwargs["BLOCK_N"] <= 64]
# Candidates kept per shape bucket (the largest tiles that fit). A GPU launch without a
# measured entry runs the first; the interpreter runs the last (the smaller tile, so the tests
# exercise multi-tile loops on small shapes).
MAX_TUNED_CONFIGS = 2
# Image tokens per split are a multiple of the largest tile, so tiles never straddle splits.
CHUNK_ALIGN = 128
# A split gets at least this many image tokens, so a large batch is not over-split.
MIN_SPLIT_TOKENS = 256
# Spatial rows per program of `_spatial_delta_kernel` (a [16, 16] diagonal block per program).
DELTA_BLOCK_M = 16
# Most (query, key) pairs per tile of a launch with a per-query mask (`configs_for`): with the
# full-tile loop of the forward, 64 x 64 tiles spilled 500-870 bytes on sm_80 and sm_90 (the
# static gate); 64 x 32 tiles use 96 registers on sm_90.
PAIR_MASK_TILE = 2048
# Fewest rows of a partial last tile (`tail_sizes`), by arch: on sm_80 the 16-row tail of the
# masked D = 16 direction-x forward spilled 16 bytes (the static gate), 32 rows do not.
TAIL_MIN_ROWS = {80: 32, 90: 16}
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


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints (triton.cdiv is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n >= 1, on the host (as cdiv)."""
    return 1 << (n - 1).bit_length()


def tail_sizes(block_n: int, arch: int) -> list[int]:
    """The partial-last-tile sizes a launch with BLOCK_N tiles may take (`tail_block`): powers
    of two from TAIL_MIN_ROWS[arch] up to BLOCK_N."""
    smallest = min(TAIL_MIN_ROWS.get(arch, 16), block_n)
    return [1 << k for k in range(smallest.bit_length() - 1, block_n.bit_length())]


def split_lengths(n_tokens: int, chunk: int, splits: int) -> list[int]:
    """Image tokens per split (`common.split_plan`): CHUNK each, the last split running to the
    end of the tokens (fewer than CHUNK, or more: cls224-stage1's 3,136 tokens split as 1,536
    and 1,600, 12 tiles and 12 and a half)."""
    return [chunk] * (splits - 1) + [n_tokens - (splits - 1) * chunk]


@functools.lru_cache(maxsize=1024)  # the launchers call it per call: uncached, 1-2 us more per launcher call
def tail_block(n_tokens: int, chunk: int, splits: int, block_n: int, arch: int) -> int:
    """The tile of a split's partial last tile (the kernels' TAIL_BLOCK_N), or 0 where every
    split holds whole BLOCK_N tiles: the smallest of `tail_sizes` that holds the longest
    remainder of a split (the last split's, as CHUNK is a multiple of BLOCK_N).
    The tail's dots and softmax are then sized to its tokens, not to a full tile: at
    N = 784 the 16-token tail of 128-token tiles was modelled at 1311 sm_90 instructions per
    warp, more than a whole tile's 1047, and costs 447 on 16 rows."""
    return tail_rows(max(length % block_n for length in split_lengths(n_tokens, chunk, splits)), block_n, arch)


def tail_rows(remainder: int, block_n: int, arch: int) -> int:
    """The rows a partial tile of `remainder` tokens runs on (the smallest of `tail_sizes`
    that holds it), 0 for none."""
    return 0 if remainder == 0 else next(t for t in tail_sizes(block_n, arch) if t >= remainder)


def block_d_for(head_dim: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot needs >= 16)."""
    return max(16, next_power_of_2(head_dim))


def num_stages_for(block_d: int) -> int:
    return 2 if block_d <= 64 else 1


def block_m_for(block_d: int, elem_bytes: int, backward: bool, n_spatial: int = 0, vector_rows: bool = True,
                arch: int = 90) -> int:
    """Spatial rows per block, fixed per head-dim bucket. In the backward, M <= this cap
    keeps the spatial side and its gradients in registers for the whole chunk; a larger M
    loops over blocks of half the size (the loop also carries the image-side gradients).
    vector_rows: the rows load 16 bytes at a time (common.row_alignment)."""
    cap = {16: 64, 32: 64, 64: 32, 128: 32, 256: 16}[block_d]
    if block_d in (64, 128) and elem_bytes == 2 and vector_rows and arch >= 90 and (not backward or n_spatial <= 64):
        # 4 warps each own 16 of 64 rows (`whole_rows`); 32 rows left 8 warps duplicating
        # 4x (D = 40 to 128). Rows loaded 2 bytes at a time need more registers, and on
        # sm_80 the 64-row tiles spill: those keep 32 rows. The backward takes 64 rows when M
        # fits in one block (the looped blocks of a larger M are not in the static gate):
        # with 32, M = 64 looped over 16-row blocks on 8 warps (8x duplicated rows, the
        # partials re-read per image tile), on an H200 3-5x slower at D = 40 to 96
        # (benchmarks/results/gpu-check-h200/bwd-block-m-h200.jsonl).
        cap = 64
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
    # the backward's 64-row blocks at D = 96 / 128 on 64-token tiles and 4 warps: 18-60 bytes
    # on the H200 (Triton 3.6), 172-484 bytes in the static gate (Triton 3.8)
    (True, True, False, 64, 128, 2, 64, 4),
    (True, False, True, 64, 128, 2, 64, 4),
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
    # 64-row blocks at D = 64 (16-bit forward), 128-token tiles on 4 warps: the fused
    # forward and direction x spill on sm_80 and sm_90 in the static gate.
    (False, True, True, 64, 64, 2, 128, 4),
    (False, False, True, 64, 64, 2, 128, 4),
})

# Like MEASURED_SPILLS, for one architecture only (compute capability as 80, 90): e.g. the
# whole-row 4-warp tiles of the D = 32 fused forward compile without spills for sm_90 but
# spill on sm_80 in the static gate (with a mask: 128-token tiles 40 bytes, 64-token tiles
# 16 bytes), where the 8-warp tiles stay in registers.
SPILLS_ON_ARCH = {
    80: frozenset({
        (False, True, True, 64, 32, 2, 128, 4),
        (False, True, True, 64, 32, 2, 64, 4),
        (False, True, True, 64, 16, 2, 128, 4),  # the fused forward at D = 16: 72 bytes on sm_80
        (False, True, False, 64, 32, 2, 128, 4),  # direction s with an image mask: 24-76 bytes on sm_80
        (False, True, False, 64, 32, 2, 64, 4),  # and 16 bytes at 64 tokens
    }),
    90: frozenset({
        (False, False, True, 16, 256, 2, 32, 8),  # direction x at D = 256: 28 bytes on sm_90
    }),
}


def whole_rows(block_m: int, block_n: int, num_warps: int) -> bool:
    """Whether each warp gets rows of its own in every 16-bit dot: an MMA layout puts 16 rows
    per warp along M, and the dots' M is BLOCK_M (direction s) or BLOCK_N (direction x), so
    more warps than min(BLOCK_M, BLOCK_N) / 16 compute the same rows twice (and the softmax
    work on them twice)."""
    return 16 * num_warps <= min(block_m, block_n)


def configs_for(block_m, block_d, elem_bytes, backward, both, dir_s=True, arch=90, pair_mask=False):
    """The candidate configs of one shape bucket, best first (also used by the static check).

    pair_mask: the launch reads a per-query mask (cross attention's attn_mask), a BLOCK_M x
    BLOCK_N tile of flags per key tile held in registers: tiles above PAIR_MASK_TILE pairs
    are left out (at 64 x 128 on 4 warps the D = 32 forward spilled 512 bytes on sm_90).

    16-bit: configs whose warps all own rows (`whole_rows`) come first, largest tile first;
    their registers are not estimated (the static check compiles the launched config for
    sm_80 and sm_90 and fails on a spill, which MEASURED_SPILLS then records). The others
    must pass the register estimate. fp32 (FMA dots): small tiles on 8 warps only."""
    own_rows, others = [], []
    dirs = (True, True) if both else (dir_s, not dir_s)
    for config in BWD_CONFIGS if backward else FWD_CONFIGS:
        bn, w = config.kwargs["BLOCK_N"], config.num_warps
        key = (backward, *dirs, block_m, block_d, elem_bytes, bn, w)
        if key in MEASURED_SPILLS or key in SPILLS_ON_ARCH.get(arch, ()):
            continue
        kept = triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=num_stages_for(block_d))
        if pair_mask and block_m * bn > PAIR_MASK_TILE:
            continue
        if elem_bytes == 4:
            # fp32 dots run on FMA units whose operand layouts replicate the reduction axis
            # across threads: only small tiles on 8 warps stay in registers.
            if bn <= 32 and w == 8:
                others.append(kept)
            continue
        if bn * block_d > 8192 or (bn == 16 and block_d < 128):
            continue  # 16-token tiles only where a wider one would not fit
        if whole_rows(block_m, bn, w):
            own_rows.append(kept)
            continue
        if w == 8 and bn * block_d < 2048:
            continue  # too little work per tile for 8 warps
        budget = REGISTER_BUDGET if w == 8 else REGISTER_BUDGET_4_WARPS
        if _live_words_per_thread(block_m, bn, block_d, elem_bytes, w, backward, both) <= budget:
            others.append(kept)
    order = lambda c: (-c.kwargs["BLOCK_N"], c.num_warps)  # noqa: E731
    kept = sorted(own_rows, key=order) + sorted(others, key=order)
    if not kept:
        kept = [triton.Config({"BLOCK_N": FALLBACK_BLOCK_N}, num_warps=FALLBACK_WARPS, num_stages=num_stages_for(block_d))]
    return kept[:MAX_TUNED_CONFIGS]


# (arch, backward, DIR_S, DIR_X, BLOCK_M, BLOCK_D, element bytes) -> (BLOCK_N, num_warps,
# num_stages), measured best on a GPU of that architecture by benchmarks/gpu_config_sweep.py
# (benchmarks/results/gpu-check-h200/config-sweep-h200.jsonl: an H200, bf16, CUDA-graph time
# at cls224-stage1 / cls224-stage2 / det800x1344-stage1; fp16 shares the 2-byte buckets). Each
# entry is compiled by the static check like any launch.
MEASURED_CONFIGS: dict = {
    # bilateral forward, D = 32: a third stage, 41 / 26 / 33 us against 49 / 30 / 39 us for the
    # first candidate (128-token tiles on 4 warps, 2 stages); bitwise the same outputs
    (90, False, True, True, 64, 32, 2): (128, 4, 3),
    # direction-x backward, D = 32: one stage, 60 / 33 / 45 us against 67 / 36 / 49 us
    (90, True, False, True, 64, 32, 2): (64, 4, 1),
    # direction-x backward, D = 40 to 64: one stage, 79.7 us against 84.2 us at cls224-stage1, D = 64
    (90, True, False, True, 64, 64, 2): (64, 4, 1),
    # the backward at D = 72 to 128, 64-row blocks (bwd-block-m-h200.jsonl, cls224-stage1,
    # D = 96): 32-token tiles on 4 warps and one stage, direction s 171 us, direction x 188 us,
    # against 204 / 217 us for 64-token tiles on 8 warps and two stages (and 614 / 963 us for
    # the 16-row blocks before). Since the backward's full-tile loop they compile without
    # spills with a key mask too (the static gate; direction x on two stages does not)
    (90, True, True, False, 64, 128, 2): (32, 4, 1),
    (90, True, False, True, 64, 128, 2): (32, 4, 1),
}

# Like MEASURED_CONFIGS, for launches that read no key mask (nor a per-query mask), looked up
# first: configs measured faster that spill only when the mask code is compiled in.
UNMASKED_MEASURED_CONFIGS: dict = {
    # direction x at D = 72 to 128 on two stages: 172 us against 188 us on one (the same
    # sweep); with a key mask it spills (24-28 bytes in the static gate)
    (90, True, False, True, 64, 128, 2): (32, 4, 2),
}

# Like MEASURED_CONFIGS, for one-block backward launches that run a split's partial last tile
# (TAIL_BLOCK_N > 0, `tail_block`), looked up first: buckets whose config cannot also hold the
# partial-tile code. Each keeps its bucket's BLOCK_N (the tail's rows were sized for it).
TAIL_CONFIGS: dict = {
    # direction-x backward, D = 72 to 128: the 4-warp loop runs at 248-255 registers, and
    # with the partial-tile code (at 16 or 32 rows, with or without a key mask) ptxas
    # serialises its wgmma on 2 stages (C7515) and spills up to 108 bytes on 1 at some of
    # them. 8 warps on one stage compile in 169-180 registers with neither (the static
    # gate), at more instructions per tile (the dots whose rows are the 32 tokens run 4x).
    (90, True, False, True, 64, 128, 2): (32, 8, 1),
}

_forced: dict = {"fwd": None, "bwd": None, "bwd_s": None, "bwd_x": None}
generation = 0  # counts the changes of _forced (launch.py drops its plans when it moves)


@contextlib.contextmanager
def forced_config(pass_: str, config: triton.Config):
    """Make every `pass_` launch use `config` (benchmarks/gpu_config_sweep.py, tests): "fwd", "bwd"
    (both backward directions), or "bwd_s" / "bwd_x" (one direction, before "bwd"). A backward
    config may also set BLOCK_M, the spatial rows per block (M <= BLOCK_M: one block). Entry
    and exit count as config changes (`generation`: launch plans made before are dropped)."""
    global generation
    saved = _forced[pass_]
    _forced[pass_] = config
    generation += 1
    try:
        yield
    finally:
        _forced[pass_] = saved
        generation += 1


def _forced_for(backward: bool, dir_s: bool):
    if not backward:
        return _forced["fwd"]
    return _forced["bwd_s" if dir_s else "bwd_x"] or _forced["bwd"]


def launch_config(block_m, block_d, elem_bytes, backward, both, dir_s=True, arch=90, pair_mask=False,
                  key_mask=False, tail=False) -> triton.Config:
    """The config a launch of one shape bucket uses on `arch`: a forced one (forced_config),
    else the measured tables' entry, else the first candidate (the interpreter: the last).
    pair_mask / key_mask: the launch reads a per-query mask / a key mask; tail: it runs a
    partial last tile (`tail_config`)."""
    forced = _forced_for(backward, dir_s)
    if forced is not None:
        return forced
    return _chosen(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask, key_mask, tail)


def bucket_key(arch, backward, both, dir_s, block_m, block_d, elem_bytes) -> tuple:
    """The measured tables' key: (arch, backward, DIR_S, DIR_X, BLOCK_M, BLOCK_D, element bytes)."""
    dirs = (True, True) if both else (dir_s, not dir_s)
    return (arch, backward, *dirs, block_m, block_d, elem_bytes)


def gpu_config(block_m, block_d, elem_bytes, backward, both, dir_s=True, arch=90, pair_mask=False,
               key_mask=False, tail=False) -> triton.Config:
    """The config a GPU of `arch` launches for a bucket: with a partial last tile its
    TAIL_CONFIGS entry, else the measured entry (without any mask, UNMASKED_MEASURED_CONFIGS
    first), else the first candidate."""
    key = bucket_key(arch, backward, both, dir_s, block_m, block_d, elem_bytes)
    measured = TAIL_CONFIGS.get(key) if tail else None
    if measured is None and not pair_mask:
        measured = (None if key_mask else UNMASKED_MEASURED_CONFIGS.get(key)) or MEASURED_CONFIGS.get(key)
    if measured is not None:
        bn, warps, stages = measured
        return triton.Config({"BLOCK_N": bn}, num_warps=warps, num_stages=stages)
    return configs_for(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask)[0]


@functools.lru_cache(maxsize=None)
def _chosen(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask=False, key_mask=False,
            tail=False) -> triton.Config:
    if INTERPRET:  # the smaller tile: the tests' small shapes still loop over several tiles
        return configs_for(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask)[-1]
    return gpu_config(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask, key_mask, tail)


def async_dots(arch: int, num_stages: int, elem_bytes: int) -> bool:
    """Whether a launch's loop runs its dots asynchronously: wgmma (sm_90, 16-bit operands; fp32
    dots are IEEE FMA chains) in a loop that Triton pipelines (num_stages >= 2), where it may
    leave a dot's wait to the next iteration. A dot into a loop-carried sum left in flight
    across the back edge makes ptxas serialise every wgmma of the kernel (C7515), so the
    kernels then order their dots so that each one completes within its iteration (fused.py,
    the ASYNC_DOTS constexpr)."""
    return arch >= 90 and num_stages >= 2 and elem_bytes == 2


def fma_exponent(arch: int, elem_bytes: int) -> bool:
    """Whether the forward forms each exponent as one FMA (`common.exp_shifted`, the FMA_EXP
    constexpr): 16-bit inputs (fp32 keeps its exact two-step exponent) on sm_90 (on sm_80 the
    masked D = 16 direction-x forward's partial-tile variants spilled 12 and 28 bytes with
    it: the static gate)."""
    return arch >= 90 and elem_bytes == 2


def wgmma_rows(arch: int, elem_bytes: int, block_m: int, pair_mask: bool) -> bool:
    """Whether the forward lays out its softmax state for wgmma's accumulator layout (the
    WGMMA_ROWS constexpr): sm_90's 16-bit launches on 64-row blocks. There a thread holds two
    of every eight key columns of its rows, and each row sits in the four threads of a quad, so
    (1) direction s keeps eight partial sums per row (sum j over keys j, j + 8, ...), each tile's
    terms added within the thread, the shuffles paid once after the last tile, and (2)
    direction x moves each tile's (max, sum) to one row per thread before the float64 LSE
    (`common.row_per_thread`). On sm_80 the 8-warp forwards (mma.sync, 128 registers for two
    CTAs per SM) spilled 12-48 bytes with either (the static gate); fp32's FMA dots lay their
    columns out otherwise; with a per-query mask the scores follow its flag tile's layout and
    the partial sums went through shared memory (m2f512-s8: 986 -> 1120 instructions per 64
    tokens)."""
    return arch >= 90 and elem_bytes == 2 and block_m >= 64 and not pair_mask


# Forward launches whose partial last tile keeps the main loop's spatial operands although
# the loop's dots take them in registers (`tail_reloads_spatial`): with the reload ptxas gave
# them fewer registers for one more CTA per SM and spilled 28 and 32 bytes (the static gate;
# without it they hold 255 and 211 registers, no spill). (arch, DIR_S, DIR_X, BLOCK_M,
# BLOCK_D, element bytes, BLOCK_N, num_warps, key mask, TAIL_BLOCK_N)
TAIL_RELOAD_SPILLS = frozenset({
    (80, False, True, 64, 32, 2, 128, 4, True, 32),
    (80, True, True, 32, 64, 2, 32, 8, True, 32),
})


def tail_reloads_spatial(arch, elem_bytes, dir_s, dir_x, block_m, block_d, block_n, num_warps, key_mask,
                         tail) -> bool:
    """Whether the forward's partial last tile loads the spatial operands (q_s; direction x's
    keys and values) again instead of taking the main loop's (the TAIL_RELOADS constexpr).

    Where the dots take them in registers (mma.sync on sm_80, fp32's FMA dots, blocks of fewer
    than 64 rows), Triton forms the tail's register copy before the loop and holds it through
    the loop, so a partial tile raised the whole kernel's registers. Against the same launch
    without the partial-tile code (`static_check --full`): fp32 at D = 128 with a 32-row tail,
    255 registers and 2.2 KB of spills on sm_90 against 80 (77 with the reload), 13.5 KB at
    D = 256; bf16 on sm_80 at D = 64 with both directions, 204 registers against 128 (128 with
    the reload: two CTAs per SM, not one); bf16 on sm_90 at D = 256, 205 against 122 (128).
    Where the loop had also used the hoisted copy, it reads its operands per tile again: on an
    A100 (modelled, B64 H2 M64 N3120 bf16) the forward 214 -> 219 us at D = 32 and
    768 -> 780 us at D = 64 (the model credits no occupancy beyond 8 warps per SM).

    sm_90's 16-bit launches on 64-row blocks keep the loop's: their main-loop dots are wgmma,
    which reads the operands from shared memory, and although the tail's direction-x dots (16
    or 32 rows) take the keys in registers, reloading raised their registers (125-168 to
    133-252 over the gate's compiles, one CTA per SM fewer in 67 of 232). So do the launches in
    TAIL_RELOAD_SPILLS."""
    if not tail or (arch >= 90 and elem_bytes == 2 and block_m >= 64):
        return False
    key = (arch, dir_s, dir_x, block_m, block_d, elem_bytes, block_n, num_warps, key_mask, tail)
    return key not in TAIL_RELOAD_SPILLS


def launch_meta(block_m, block_d, elem_bytes, backward, both, dir_s=True, arch=90, pair_mask=False,
                key_mask=False, tail=False) -> dict:
    """The launch keywords (BLOCK_N, num_warps, num_stages) of `launch_config`."""
    if _forced_for(backward, dir_s) is not None:
        return _meta(launch_config(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask, key_mask))
    return _chosen_meta(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask, key_mask, tail)


@functools.lru_cache(maxsize=None)
def _chosen_meta(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask=False, key_mask=False,
                 tail=False) -> dict:
    return _meta(_chosen(block_m, block_d, elem_bytes, backward, both, dir_s, arch, pair_mask, key_mask, tail))


def _meta(config: triton.Config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
