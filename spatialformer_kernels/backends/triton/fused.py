"""Fused Triton kernels for bilateral cross-attention (and single-direction cross-attention).

Shapes: spatial tokens q_s, k_s, v_s [B, H, M, D]; image tokens q_x, k_x, v_x [B, H, N, D].
Direction s: spatial queries q_s over image keys k_x, v_x (image_mask drops keys) -> o_s.
Direction x: image queries q_x over spatial keys k_s, v_s -> o_x.

Forward, one launch, grid (B*H, SPLITS, M_PROGRAMS): each program owns CHUNK image tokens
(the last split the rest, `split_range`) and walks them in BLOCK_N tiles (`_fwd_tile`). The
main loop runs the full tiles with no bounds check and, without a mask, no per-score select;
a partial last tile (only where N % BLOCK_N != 0) is a second, bounds-checked copy after the
loop, on TAIL_BLOCK_N rows: the smallest power of two from 16 (32 on sm_80) that holds it
(`configs.tail_block`), so N = 784's 16-token tail of 128-token tiles costs the work of 16
rows, not of 128. Where the dots take the spatial operands in registers (mma.sync, fp32's FMA
dots; not sm_90's wgmma on 64-row blocks), that copy loads them again (`TAIL_RELOADS`,
`configs.tail_reloads_spatial`, which lists the exceptions): given the loop's, Triton formed
the copy's register operands before the loop and held them through it.
  - Direction s is an online softmax over the tiles (running max, sum and an fp32
    accumulator for its BLOCK_M spatial queries). With one split the program normalises
    and writes o_s itself; else it writes its (max, sum, acc) partial and
    `_bilateral_combine_kernel` merges the SPLITS partials with LSE weights, several splits
    per step, by fixed-shape reductions (flash-decoding style split-K).
  - Direction x is complete per tile: each tile of image queries sees all M spatial keys,
    so o_x and lse_x are written at once. For M <= BLOCK_M (the usual M = 64) the spatial
    keys are loaded once per program and the softmax is a plain one (`ONE_KEY_BLOCK`); a
    larger M loops over BLOCK_M key blocks with an online softmax, and with M_PROGRAMS > 1
    tile t's direction x is done by program t % M_PROGRAMS.
  The two directions read disjoint image tensors (s: k_x, v_x; x: q_x); at large D they
  run as two launches of the same kernel to stay in registers (`fuse_directions`).
Backward, deterministic (no atomics), grid (B*H, SPLITS), one launch per direction (fused,
the live state spills): delta = rowsum(P * dP) / rowsum(P) is formed from P and dP where a
block holds all of a row's keys (direction x, M <= BLOCK_M), else as dO . O by the same dot as dP
(`_delta_like_dp`; for the spatial rows once per program where they are one block, else once
by `_spatial_delta_kernel` before the launch), so
a one-hot softmax cancels exactly as in the reference; per tile the
image-side gradients (dk_x, dv_x from direction s; dq_x from direction x) are complete and
written, and the spatial-side ones (dq_s; dk_s, dv_s) are summed per program into a
per-split fp32 partial (in registers when M <= BLOCK_M, else in the program's own slice of
the partial buffer), then reduced over splits in a fixed order (`reduce_splits`).
  With one spatial block (M <= BLOCK_M) the backward is shaped like the forward: the main
  loop runs full tiles with no bounds check and, without a mask, no per-score select
  (`_bwd_s_tile`, `_bwd_x_tile`); a partial last tile runs once, bounds-checked and on
  TAIL_BLOCK_N rows as the forward's, before the loop (after it, it raised the loop's
  registers: sm_80 spilled). dS is rounded once for
  both of its dots, and the scale multiplies the [rows, D] sums of dq and dk instead of
  every score where that is fewer multiplies (BLOCK_D < BLOCK_M) and the range allows (not
  fp16, `DS_SCALED`). Tile pointers are formed per tile (`_row_ptrs`): held across the loop
  they cost the registers that the D = 128 tiles do not have.

cross_attention uses the same kernels with one direction switched off: few queries over many
keys is direction s only (q -> q_s, k, v -> k_x, v_x, key_mask -> image_mask); many queries
over few keys is direction x only (q -> q_x, k, v -> k_s, v_s, key_mask on the M axis).

Numerics: the backward's logits are scale * q.k in fp32, rounded on their own (`mul_rn`: a
GPU compile would otherwise fuse the product with the LSE's subtraction into one FMA and
leave a one-hot row's P off by the product's rounding), exponentiated as
exp2((s - hi) * log2(e) - lo * log2(e)) from the LSE split into fp32 hi + lo (`probs`).
The forward keeps the raw dots q.k where the scale is positive (`RAW_LOGITS`; a zero or negative scale uses scale * q.k as the backward does) and
exponentiates exp2((s - max) * rate) with rate = scale * log2(e): the max is subtracted
first, so the top logit gives exactly exp2(0) = 1, and the LSE rounds scale * max to fp32
before adding log(sum), so a one-hot row's LSE is bitwise the top logit the backward
recomputes and its P is exactly 1 there even at |logits| ~ 1e4 (folding the rate into the
dots, one FMA per score, would leave the top logit off by up to half an ulp of 1e4). This
saves the per-score multiply by the scale: besides the exp, a full tile issues about 4.5
instructions per score (subtract, rate, max, sum, half a bf16 conversion). Accumulation in
fp32; fp32 inputs use IEEE dots (PyTorch's default matmul is not TF32). LSEs are natural-log
float64 (`lse_value`, `load_lse` in common.py), -inf for a query with no kept key (its output and
gradients are 0). Offsets are int64.

Limits: D in 8..256 (BLOCK_D is the next power of two >= 16, masked); any M, N >= 1 (one
spatial block holds M <= 64 at D <= 32 in 16-bit, D <= 64 in the backward, see
`block_m_for`; larger M loops over blocks, and the backward then keeps its spatial partials
in global memory); any strides
(nothing is copied). Where the fused backward would spill (fp32 at D > 64; 16-bit at
D = 256 with M > 16: `backward_supported`), the backward splits the head dim across
programs instead (wide.py, which recomputes S and dP once per
column chunk); memory stays O(B*H*(M+N)*D) plus the split workspace. No host
synchronisation: the split count comes from the cached SM count and the shapes, so launches
are CUDA-graph capturable. Tile sizes, warps and which buckets run fused are in
configs.py; the helpers shared with wide.py are in common.py.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .common import (
    capability,
    diagonal,
    dot,
    dot_into,
    dot_precision,
    exp_shifted,
    head_base,
    inverse_sum,
    key_keep,
    load_lse,
    load_rows,
    logit_rates,
    lse_value,
    mask_args,
    max_shift,
    mul_rn,
    multiple,
    online_max,
    pair_mask_args,
    probs,
    query_key_keep,
    program_head,
    reduce_splits,
    round_to,
    row_alignment,
    row_per_thread,
    row_top,
    sm_count,
    split_plan,
    split_range,
    to_max_frame,
    widen_unsigned,
)
from .configs import (
    DELTA_BLOCK_M,
    async_dots,
    backward_supported,
    block_d_for,
    block_m_for,
    cdiv,
    fma_exponent,
    fuse_directions,
    launch_meta,
    next_power_of_2,
    tail_block,
    tail_reloads_spatial,
    wgmma_rows,
)
from .wide import wide_head_bwd
from .launch import device_guard, launch


# ----------------------------------------------------------------------------------------
# jit helpers of the fused kernels (the ones wide.py shares are in common.py)
# ----------------------------------------------------------------------------------------
@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, rate, DOT_PRECISION: tl.constexpr, ASYNC_DOTS: tl.constexpr,
                         EMPTY_ROWS: tl.constexpr = True, FMA_EXP: tl.constexpr = False,
                         PARTIAL_SUMS: tl.constexpr = 0):
    """Fold one block of logits s [R, C] and values v [C, D] into (max, sum, acc); exp(logit - max)
    is exp2((s - max) * rate) (`_logits`). ASYNC_DOTS (`configs.async_dots`): the P.V dot is
    fresh and the rescaled sum added to it, so it completes within the iteration; else it
    accumulates into the rescaled sum (the sum in registers once, not twice: sm_80 spilled).
    EMPTY_ROWS: a row of the block may keep no key (`online_max`). FMA_EXP: `exp_shifted`.
    PARTIAL_SUMS (`configs.wgmma_rows`): l_i is [R, PARTIAL_SUMS], sum j over the keys
    j, j + PARTIAL_SUMS, ... of every block, added up by the caller after the last."""
    m_new, shift, alpha = online_max(m_i, tl.max(s, 1), rate, EMPTY_ROWS, FMA_EXP)
    p = exp_shifted(s, shift[:, None], rate, FMA_EXP)
    if PARTIAL_SUMS:
        R: tl.constexpr = p.shape[0]
        C: tl.constexpr = p.shape[1]
        l_i = l_i * alpha[:, None] + tl.sum(tl.reshape(p, [R, C // PARTIAL_SUMS, PARTIAL_SUMS]), 1)
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    if ASYNC_DOTS:
        acc = tl.fma(acc, alpha[:, None], dot(round_to(p, v.dtype), v, DOT_PRECISION))
    else:
        acc = dot_into(acc * alpha[:, None], round_to(p, v.dtype), v, DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _delta_like_dp(do, o, BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """delta = rowsum(dO * O) [R], taken from the diagonal of the same dot that forms
    dP = dO v^T (same operands' dtype, same reduction order per element), not from a separate
    sum: where a softmax is one-hot (|logits| ~ 1e4), O equals the winning v row bitwise, so
    dP - delta is exactly 0 there, as in the reference's softmax backward."""
    return diagonal(dot(do, tl.trans(o), DOT_PRECISION), BLOCK_R)


@triton.jit
def _attn_bwd_block(q, do, lse_hi, lse_lo, delta, k, v, keep, sm_scale, dq_acc, dk_acc, dv_acc,
                    DOT_PRECISION: tl.constexpr, DQ_FIRST: tl.constexpr,
                    DELTA_FROM_P: tl.constexpr = False, KEYS_MASKED: tl.constexpr = True,
                    DS_SCALED: tl.constexpr = True, EMPTY_ROWS: tl.constexpr = True):
    """Gradient contributions of queries q [R, D] against one block of keys k, v [C, D], added
    by the dots to dq_acc [R, D], dk_acc [C, D], dv_acc [C, D] (fp32; zeros for a fresh one):
    returns the three sums.
    DQ_FIRST: issue the dot into dq_acc before those into dk_acc and dv_acc, else after them.
    The order matters on sm_90 with ASYNC_DOTS (`configs.async_dots`): the dots into sums
    carried across the caller's loop go first, so that the wait of a fresh one, whose result
    the caller uses within the iteration, completes them too; a dot left in flight across the
    loop's back edge makes ptxas serialise every wgmma of the kernel (C7515). Without it, the
    carried sums go last (fewer registers live at once).
    KEYS_MASKED: drop the pairs where keep ([R, C] or [1, C], `query_key_keep`) is False; else
    every pair of the block takes part (keep is ignored: a full tile of an unmasked launch).
    DS_SCALED: dS carries the scale before it is rounded for the dots, and dq, dk are complete
    (fp16, whose range the unscaled dS could leave); else dq and dk still lack the factor
    scale, which the caller applies once to its [rows, D] sums instead of to every score.
    DELTA_FROM_P: the block holds every key of the rows, so delta is formed here from P and
    dP, as the reference's softmax backward does, and the `delta` argument is ignored. It is
    rowsum(P * dP), divided by rowsum(P) for fp32. The recomputed P carries a per-row factor
    error: a few 1e-7 at ordinary logits (the forward's lg2.approx of its sum, ex2.approx per
    term; the LSE itself is float64), up to half an ulp of the logit in a row that is not
    one-hot at |logits| ~ 1e4 (the backward rounds scale * q.k, the forward subtracted raw
    dots). Normalising turns it into a relative error of dS, as fp32's bound needs. A 16-bit
    dS is rounded to 2^-9 (bf16) or 2^-12 (fp16): at ordinary logits the unnormalised delta
    moves it by more than that only where dP and delta agree to about 3 (fp16) or 4 (bf16)
    significant digits. EMPTY_ROWS: a row may have P = 0 throughout (no kept key, or
    padding), whose delta is then 0."""
    # -- recompute the probabilities from the saved LSE (logits rounded as the forward's) --
    s = mul_rn(dot(q, tl.trans(k), DOT_PRECISION), sm_scale)
    if KEYS_MASKED:
        s = tl.where(keep, s, float("-inf"))
    p = probs(s, lse_hi, lse_lo)
    # -- dS = P * (dP - delta), rounded once for both of its dots --
    dp = dot(do, tl.trans(v), DOT_PRECISION)
    if DELTA_FROM_P and k.dtype != tl.float32:
        # 16-bit: dS = P dP - P delta from the products that delta sums, one FMA per score
        # instead of a subtraction and a product, and delta not normalised (see the
        # docstring). Rounding P dP (2^-24 of it) matters only where dP and delta agree to 15
        # bits, far below dS's own rounding to 16 bits; a one-hot row stays exact (its delta
        # is its P dP, P being exactly 1 and 0).
        p_dp = p * dp
        delta = tl.sum(p_dp, 1)
        ds = p_dp - p * delta[:, None]
    else:
        if DELTA_FROM_P:
            delta = tl.sum(p * dp, 1) * inverse_sum(tl.sum(p, 1), EMPTY_ROWS)
        ds = p * (dp - delta[:, None])
    if DS_SCALED:
        ds = ds * sm_scale
    ds = round_to(ds, k.dtype)
    if DQ_FIRST:
        dq_acc = dot_into(dq_acc, ds, k, DOT_PRECISION)
    dk_acc = dot_into(dk_acc, tl.trans(ds), q, DOT_PRECISION)
    dv_acc = dot_into(dv_acc, round_to(tl.trans(p), do.dtype), do, DOT_PRECISION)
    if not DQ_FIRST:
        dq_acc = dot_into(dq_acc, ds, k, DOT_PRECISION)
    return dq_acc, dk_acc, dv_acc


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------
@triton.jit
def _logits(q, k, sm_scale, DOT_PRECISION: tl.constexpr, RAW_LOGITS: tl.constexpr):
    """Forward logits of queries q [R, D] over keys k [C, D]: the raw dots q k^T where the
    scale is positive (RAW_LOGITS: the scale is folded into the exponent's rate), else
    scale * q k^T (a zero or negative scale keeps the backward's domain, where max is max)."""
    s = dot(q, tl.trans(k), DOT_PRECISION)
    if not RAW_LOGITS:
        s = mul_rn(s, sm_scale)
    return s


@triton.jit
def _tile_ptrs(base, stride_row, stride_col, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to rows 0..BLOCK_R-1 of a [rows, D] head (int64 offsets); a tile at row r0 is
    these plus r0 rows (`_load_tile`), one add per vector instead of a row-offset product."""
    rows = tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    return base + rows[:, None] * multiple(stride_row, ALIGN) + cols[None, :] * stride_col


@triton.jit
def _load_tile(tile_ptrs, r0, stride_row, rows_ok, cols_ok,
               ROWS_MASKED: tl.constexpr, COLS_MASKED: tl.constexpr, ALIGN: tl.constexpr):
    """Load the tile of rows r0.. from `_tile_ptrs` (`_masked_load`)."""
    return _masked_load(tile_ptrs + tl.cast(r0, tl.int64) * multiple(stride_row, ALIGN), rows_ok, cols_ok,
                        ROWS_MASKED, COLS_MASKED)


@triton.jit
def _row_ptrs(base, r0, stride_row, stride_col, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers to rows r0..r0+BLOCK_R-1 of a [rows, D] head (int64 offsets), formed per tile:
    a few instructions more than `_tile_ptrs`, but no tile of pointers held across a loop,
    which the backward's register budget cannot spare."""
    rows = widen_unsigned(r0 + tl.arange(0, BLOCK_R))
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    return base + rows[:, None] * widen_unsigned(multiple(stride_row, ALIGN)) + cols[None, :] * stride_col


@triton.jit
def _masked_load(ptrs, rows_ok, cols_ok, ROWS_MASKED: tl.constexpr, COLS_MASKED: tl.constexpr):
    """Load a tile, zeros outside the masks, with only the bounds checks the tile needs: a full
    tile of a D = BLOCK_D head has no predicate at all."""
    if ROWS_MASKED and COLS_MASKED:
        return tl.load(ptrs, mask=rows_ok[:, None] & cols_ok[None, :], other=0.0)
    elif ROWS_MASKED:
        return tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif COLS_MASKED:
        return tl.load(ptrs, mask=cols_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _masked_store(ptrs, value, rows_ok, cols_ok, ROWS_MASKED: tl.constexpr, COLS_MASKED: tl.constexpr):
    """`_masked_load`'s counterpart."""
    if ROWS_MASKED and COLS_MASKED:
        tl.store(ptrs, value, mask=rows_ok[:, None] & cols_ok[None, :])
    elif ROWS_MASKED:
        tl.store(ptrs, value, mask=rows_ok[:, None])
    elif COLS_MASKED:
        tl.store(ptrs, value, mask=cols_ok[None, :])
    else:
        tl.store(ptrs, value)


@triton.jit
def _fwd_tile(
    n0, n_end, pid_m, m_programs, b, row_base,
    offs_d, d_ok, D, M,
    q_x_tile, stride_qx_n, k_x_tile, stride_kx_n, v_x_tile, stride_vx_n,  # `_tile_ptrs` of the image tensors
    k_s_ptr, stride_ks_m, stride_ks_d,
    v_s_ptr, stride_vs_m, stride_vs_d,
    IMAGE_MASK, stride_im_b, stride_im_n,
    SPATIAL_MASK, stride_sm_b, stride_sm_m,
    PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k,
    O_X, LSE_X, o_x_tile,  # o_x_tile: `_tile_ptrs` of this head's O_X rows
    q_s, offs_qm, qm_ok, m_s, l_s, acc_s,  # direction s: its queries and online-softmax state
    k_once, v_once, keep_once,  # direction x with ONE_KEY_BLOCK: the spatial keys, loaded once
    sm_scale, rate, max_scale,  # `logit_rates`
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIR_S: tl.constexpr, DIR_X: tl.constexpr,
    HAS_IMAGE_MASK: tl.constexpr, HAS_SPATIAL_MASK: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, ONE_M_PROGRAM: tl.constexpr,
    ONE_KEY_BLOCK: tl.constexpr, X_KEYS_MASKED: tl.constexpr, D_MASKED: tl.constexpr,
    RAW_LOGITS: tl.constexpr, ASYNC_DOTS: tl.constexpr, TAIL: tl.constexpr, FMA_EXP: tl.constexpr,
    WGMMA_ROWS: tl.constexpr, PARTIAL_SUMS: tl.constexpr,
):
    """One BLOCK_N tile of image tokens [n0, n0 + BLOCK_N): direction x's queries (complete,
    written here) and direction s's keys (folded into (m_s, l_s, acc_s), returned). TAIL: the
    tile may run past n_end, so its rows are bounds-checked and direction s masks its keys;
    a full tile of an unmasked launch carries no per-score mask at all."""
    # Direction x's rows may keep no key only with a spatial or pair mask (padding keys leave
    # each a key). An image mask cannot empty them either, but with one the sm_80 8-warp
    # forward spilled without the selects (static gate), so it keeps them.
    X_EMPTY_ROWS: tl.constexpr = HAS_SPATIAL_MASK or HAS_PAIR_MASK or HAS_IMAGE_MASK
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    if DIR_X:
        if ONE_M_PROGRAM or (n0 // BLOCK_N) % m_programs == pid_m:
            # -- direction x: this tile of image queries over all spatial keys --
            q_x = _load_tile(q_x_tile, n0, stride_qx_n, n_ok, d_ok, TAIL, D_MASKED, ALIGN)
            if ONE_KEY_BLOCK:
                # every key in one block: a plain softmax, no running rescale
                s_x = _logits(q_x, k_once, sm_scale, DOT_PRECISION, RAW_LOGITS)
                if X_KEYS_MASKED:
                    keep_x = query_key_keep(keep_once, PAIR_MASK, b, offs_n, n_ok, tl.arange(0, BLOCK_M),
                                            stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                    s_x = tl.where(keep_x, s_x, float("-inf"))
                m_x = tl.max(s_x, 1)
                p_x = exp_shifted(s_x, max_shift(m_x, X_EMPTY_ROWS)[:, None], rate, FMA_EXP)
                l_x = tl.sum(p_x, 1)
                acc_x = dot(round_to(p_x, v_once.dtype), v_once, DOT_PRECISION)
            else:
                m_x = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
                l_x = tl.zeros([BLOCK_N], dtype=tl.float32)
                acc_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                # Spatial keys are re-read per tile (they stay in L1/L2): any M, one code path.
                for m0 in range(0, M, BLOCK_M):
                    offs_km = m0 + tl.arange(0, BLOCK_M)
                    km_ok = offs_km < M
                    km_keep = key_keep(SPATIAL_MASK, b, offs_km, km_ok, stride_sm_b, stride_sm_m, HAS_SPATIAL_MASK)
                    km_keep = query_key_keep(km_keep, PAIR_MASK, b, offs_n, n_ok, offs_km,
                                             stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                    k_blk = load_rows(k_s_ptr, offs_km, offs_d, stride_ks_m, stride_ks_d, km_ok, d_ok, ALIGN=ALIGN)
                    v_blk = load_rows(v_s_ptr, offs_km, offs_d, stride_vs_m, stride_vs_d, km_ok, d_ok, ALIGN=ALIGN)
                    s_x = tl.where(km_keep, _logits(q_x, k_blk, sm_scale, DOT_PRECISION, RAW_LOGITS), float("-inf"))
                    m_x, l_x, acc_x = _online_softmax_step(s_x, v_blk, m_x, l_x, acc_x, rate, DOT_PRECISION, ASYNC_DOTS,
                                                           X_EMPTY_ROWS, FMA_EXP)
            # -- normalise and write o_x, lse_x (rows with no kept key: 0 and -inf) --
            top_x, top_inverse_x, residual_x = row_top(m_x, rate, X_EMPTY_ROWS, FMA_EXP, O_X.dtype.element_ty)
            o_x = acc_x * inverse_sum(l_x, X_EMPTY_ROWS, top_x, top_inverse_x)[:, None]
            if WGMMA_ROWS:  # the LSE from the state moved to one row per thread
                m_x, l_x = row_per_thread(m_x, l_x)
                top_x, _, residual_x = row_top(m_x, rate, X_EMPTY_ROWS, FMA_EXP, O_X.dtype.element_ty)
            lse_x = lse_value(m_x, l_x, max_scale, X_EMPTY_ROWS, top_x, residual_x)
            rows = row_base + offs_n
            o_ptrs = o_x_tile + tl.cast(n0, tl.int64) * D
            if TAIL:
                tl.store(o_ptrs, round_to(o_x, O_X.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
                tl.store(LSE_X + rows, lse_x, mask=n_ok)
            elif D_MASKED:
                tl.store(o_ptrs, round_to(o_x, O_X.dtype.element_ty), mask=d_ok[None, :])
                tl.store(LSE_X + rows, lse_x)
            else:
                tl.store(o_ptrs, round_to(o_x, O_X.dtype.element_ty))
                tl.store(LSE_X + rows, lse_x)
    if DIR_S:
        # -- direction s: spatial queries over this tile of image keys, online softmax --
        k_x = _load_tile(k_x_tile, n0, stride_kx_n, n_ok, d_ok, TAIL, D_MASKED, ALIGN)
        v_x = _load_tile(v_x_tile, n0, stride_vx_n, n_ok, d_ok, TAIL, D_MASKED, ALIGN)
        s_s = _logits(q_s, k_x, sm_scale, DOT_PRECISION, RAW_LOGITS)
        if TAIL or HAS_IMAGE_MASK or HAS_PAIR_MASK:
            keep_n = key_keep(IMAGE_MASK, b, offs_n, n_ok, stride_im_b, stride_im_n, HAS_IMAGE_MASK)
            keep_n = query_key_keep(keep_n, PAIR_MASK, b, offs_qm, qm_ok, offs_n,
                                    stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
            s_s = tl.where(keep_n, s_s, float("-inf"))
        m_s, l_s, acc_s = _online_softmax_step(s_s, v_x, m_s, l_s, acc_s, rate, DOT_PRECISION, ASYNC_DOTS,
                                               HAS_IMAGE_MASK or HAS_PAIR_MASK, FMA_EXP, PARTIAL_SUMS)
    return m_s, l_s, acc_s


@triton.jit
def _spatial_operands(q_s_ptr, stride_qs_m, stride_qs_d, k_s_ptr, stride_ks_m, stride_ks_d, v_s_ptr, stride_vs_m,
                      stride_vs_d, offs_qm, qm_ok, offs_blk, offs_d, d_ok, M,
                      LOAD_Q: tl.constexpr, LOAD_KV: tl.constexpr, ALIGN: tl.constexpr):
    """(q_s, k_s, v_s) of a forward program: its BLOCK_M spatial queries (LOAD_Q: direction s)
    and all M spatial keys and values (LOAD_KV: direction x with one key block); 0.0 for those
    not loaded. Loaded before the main loop and, with TAIL_RELOADS, again for the partial tile."""
    q_s = 0.0
    if LOAD_Q:
        q_s = load_rows(q_s_ptr, offs_qm, offs_d, stride_qs_m, stride_qs_d, qm_ok, d_ok, ALIGN=ALIGN)
    k_s = 0.0
    v_s = 0.0
    if LOAD_KV:
        k_s = load_rows(k_s_ptr, offs_blk, offs_d, stride_ks_m, stride_ks_d, offs_blk < M, d_ok, ALIGN=ALIGN)
        v_s = load_rows(v_s_ptr, offs_blk, offs_d, stride_vs_m, stride_vs_d, offs_blk < M, d_ok, ALIGN=ALIGN)
    return q_s, k_s, v_s


@triton.jit
def partials_layout(PART, SPLITS, M, D):
    """(maxima, sums) pointers of the forward's split partials: one fp32 buffer of B * H *
    SPLITS * M rows (B * H is the grid's first axis in both kernels that use it) holding the
    unnormalised outputs [rows, D], then the running max logit per row (raw dots with
    RAW_LOGITS), then the running sum of exp(logit - max) per row. One buffer is one
    allocation per call (launch.py: each costs 2-3 us of host time)."""
    rows = tl.num_programs(0).to(tl.int64) * SPLITS * M
    return PART + rows * D, PART + rows * (D + 1)


@triton.jit(do_not_specialize=["M", "N", "CHUNK", "SPLITS"])
def _bilateral_fwd_kernel(
    Q_S, K_S, V_S,  # [B, H, M, D] each, any strides
    Q_X, K_X, V_X,  # [B, H, N, D] each, any strides
    IMAGE_MASK,  # [B, N] bool, keys of direction s (read only with HAS_IMAGE_MASK)
    SPATIAL_MASK,  # [B, M] bool, keys of direction x (read only with HAS_SPATIAL_MASK)
    PAIR_MASK,  # [B, Lq, Lk] bool per-query mask of the one direction run (read only with HAS_PAIR_MASK)
    O_X,  # [B, H, N, D] contiguous, input dtype
    LSE_X,  # [B, H, N] contiguous float64
    O_S,  # [B, H, M, D] contiguous, input dtype (written here only with ONE_SPLIT)
    LSE_S,  # [B, H, M] contiguous float64 (written here only with ONE_SPLIT)
    PART,  # fp32 partials of direction s per split, one buffer (partials_layout)
    stride_qs_b, stride_qs_h, stride_qs_m, stride_qs_d,
    stride_ks_b, stride_ks_h, stride_ks_m, stride_ks_d,
    stride_vs_b, stride_vs_h, stride_vs_m, stride_vs_d,
    stride_qx_b, stride_qx_h, stride_qx_n, stride_qx_d,
    stride_kx_b, stride_kx_h, stride_kx_n, stride_kx_d,
    stride_vx_b, stride_vx_h, stride_vx_n, stride_vx_d,
    stride_im_b, stride_im_n,
    stride_sm_b, stride_sm_m,
    stride_pm_b, stride_pm_q, stride_pm_k,
    H, M, N, D, CHUNK, SPLITS,
    sm_scale,  # scale
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DIR_S: tl.constexpr, DIR_X: tl.constexpr,
    HAS_IMAGE_MASK: tl.constexpr, HAS_SPATIAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,  # D and the row strides are multiples of this (common.row_alignment)
    TAIL_BLOCK_N: tl.constexpr,  # configs.tail_block: the partial last tile's rows, 0 for none
    ONE_M_PROGRAM: tl.constexpr = False,  # grid axis 2 is 1: direction x runs every tile here
    HAS_PAIR_MASK: tl.constexpr = False,  # cross attention only: one direction runs
    ONE_KEY_BLOCK: tl.constexpr = False,  # M <= BLOCK_M: direction x's keys are loaded once
    FULL_KEY_BLOCK: tl.constexpr = False,  # M == BLOCK_M: no padded key in that block
    RAW_LOGITS: tl.constexpr = False,  # scale > 0: logits stay raw dots, the scale is in `rate`
    D_MASKED: tl.constexpr = True,  # D < BLOCK_D: head columns are bounds-checked
    ONE_SPLIT: tl.constexpr = False,  # SPLITS == 1: direction s is complete here, no combine
    ASYNC_DOTS: tl.constexpr = False,  # configs.async_dots: no dot left in flight across an iteration
    FMA_EXP: tl.constexpr = False,  # common.exp_shifted: each term's exponent one FMA (16-bit inputs)
    TAIL_RELOADS: tl.constexpr = False,  # configs.tail_reloads_spatial: the partial tile loads its spatial operands
    WGMMA_ROWS: tl.constexpr = False,  # configs.wgmma_rows: the softmax state laid out for wgmma's rows
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tl.static_assert(not (HAS_PAIR_MASK and DIR_S and DIR_X))
    D = multiple(D, ALIGN)
    pid_bh, b, h = program_head(H)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    m_programs = tl.num_programs(2)
    q_s_ptr = head_base(Q_S, b, h, stride_qs_b, stride_qs_h, ALIGN=ALIGN)
    k_s_ptr = head_base(K_S, b, h, stride_ks_b, stride_ks_h, ALIGN=ALIGN)
    v_s_ptr = head_base(V_S, b, h, stride_vs_b, stride_vs_h, ALIGN=ALIGN)
    q_x_ptr = head_base(Q_X, b, h, stride_qx_b, stride_qx_h, ALIGN=ALIGN)
    k_x_ptr = head_base(K_X, b, h, stride_kx_b, stride_kx_h, ALIGN=ALIGN)
    v_x_ptr = head_base(V_X, b, h, stride_vx_b, stride_vx_h, ALIGN=ALIGN)
    row_base = pid_bh.to(tl.int64) * N  # row offset of this head in O_X / LSE_X
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_blk = tl.arange(0, BLOCK_M)
    n_start, n_end = split_range(split, SPLITS, CHUNK, N)
    n_full_end = n_start + (n_end - n_start) // BLOCK_N * BLOCK_N
    # exp(logit - max) = exp2((s - max) * rate): s - max first, so the row max gives exactly 1
    rate, max_scale = logit_rates(sm_scale, RAW_LOGITS)

    offs_qm = pid_m * BLOCK_M + offs_blk
    qm_ok = offs_qm < M
    m_s = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    PARTIAL_SUMS: tl.constexpr = 8 if WGMMA_ROWS else 0  # direction s's sums per row (_online_softmax_step)
    if PARTIAL_SUMS:
        l_s = tl.zeros([BLOCK_M, PARTIAL_SUMS], dtype=tl.float32)
    else:
        l_s = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_s = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_s, k_once, v_once = _spatial_operands(
        q_s_ptr, stride_qs_m, stride_qs_d, k_s_ptr, stride_ks_m, stride_ks_d, v_s_ptr, stride_vs_m, stride_vs_d,
        offs_qm, qm_ok, offs_blk, offs_d, d_ok, M, DIR_S, DIR_X and ONE_KEY_BLOCK, ALIGN)
    keep_once = 0
    if DIR_X and ONE_KEY_BLOCK:
        keep_once = key_keep(SPATIAL_MASK, b, offs_blk, offs_blk < M, stride_sm_b, stride_sm_m, HAS_SPATIAL_MASK)
    X_KEYS_MASKED: tl.constexpr = not FULL_KEY_BLOCK or HAS_SPATIAL_MASK or HAS_PAIR_MASK
    q_x_tile = _tile_ptrs(q_x_ptr, stride_qx_n, stride_qx_d, BLOCK_N, BLOCK_D, ALIGN)
    k_x_tile = _tile_ptrs(k_x_ptr, stride_kx_n, stride_kx_d, BLOCK_N, BLOCK_D, ALIGN)
    v_x_tile = _tile_ptrs(v_x_ptr, stride_vx_n, stride_vx_d, BLOCK_N, BLOCK_D, ALIGN)
    o_x_tile = _tile_ptrs(O_X + row_base * D, D, 1, BLOCK_N, BLOCK_D, ALIGN)

    for n0 in range(n_start, n_full_end, BLOCK_N):
        m_s, l_s, acc_s = _fwd_tile(
            n0, n_end, pid_m, m_programs, b, row_base, offs_d, d_ok, D, M,
            q_x_tile, stride_qx_n, k_x_tile, stride_kx_n, v_x_tile, stride_vx_n,
            k_s_ptr, stride_ks_m, stride_ks_d, v_s_ptr, stride_vs_m, stride_vs_d,
            IMAGE_MASK, stride_im_b, stride_im_n, SPATIAL_MASK, stride_sm_b, stride_sm_m,
            PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k, O_X, LSE_X, o_x_tile,
            q_s, offs_qm, qm_ok, m_s, l_s, acc_s, k_once, v_once, keep_once, sm_scale, rate, max_scale,
            BLOCK_M, BLOCK_N, BLOCK_D, DIR_S, DIR_X, HAS_IMAGE_MASK, HAS_SPATIAL_MASK, HAS_PAIR_MASK,
            DOT_PRECISION, ALIGN, ONE_M_PROGRAM, ONE_KEY_BLOCK, X_KEYS_MASKED, D_MASKED, RAW_LOGITS, ASYNC_DOTS,
            TAIL=False, FMA_EXP=FMA_EXP, WGMMA_ROWS=WGMMA_ROWS, PARTIAL_SUMS=PARTIAL_SUMS,
        )
    if TAIL_BLOCK_N:
        if n_full_end < n_end:
            # the partial last tile, on TAIL_BLOCK_N rows (its own tile pointers)
            if TAIL_RELOADS:
                # its own copies: the main loop's, taken in registers by its dots, would be
                # formed for this tile before the loop and held through it
                q_s, k_once, v_once = _spatial_operands(
                    q_s_ptr, stride_qs_m, stride_qs_d, k_s_ptr, stride_ks_m, stride_ks_d, v_s_ptr, stride_vs_m,
                    stride_vs_d, offs_qm, qm_ok, offs_blk, offs_d, d_ok, M, DIR_S, DIR_X and ONE_KEY_BLOCK, ALIGN)
            m_s, l_s, acc_s = _fwd_tile(
                n_full_end, n_end, pid_m, m_programs, b, row_base, offs_d, d_ok, D, M,
                _tile_ptrs(q_x_ptr, stride_qx_n, stride_qx_d, TAIL_BLOCK_N, BLOCK_D, ALIGN), stride_qx_n,
                _tile_ptrs(k_x_ptr, stride_kx_n, stride_kx_d, TAIL_BLOCK_N, BLOCK_D, ALIGN), stride_kx_n,
                _tile_ptrs(v_x_ptr, stride_vx_n, stride_vx_d, TAIL_BLOCK_N, BLOCK_D, ALIGN), stride_vx_n,
                k_s_ptr, stride_ks_m, stride_ks_d, v_s_ptr, stride_vs_m, stride_vs_d,
                IMAGE_MASK, stride_im_b, stride_im_n, SPATIAL_MASK, stride_sm_b, stride_sm_m,
                PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k, O_X, LSE_X,
                _tile_ptrs(O_X + row_base * D, D, 1, TAIL_BLOCK_N, BLOCK_D, ALIGN),
                q_s, offs_qm, qm_ok, m_s, l_s, acc_s, k_once, v_once, keep_once, sm_scale, rate, max_scale,
                BLOCK_M, TAIL_BLOCK_N, BLOCK_D, DIR_S, DIR_X, HAS_IMAGE_MASK, HAS_SPATIAL_MASK, HAS_PAIR_MASK,
                DOT_PRECISION, ALIGN, ONE_M_PROGRAM, ONE_KEY_BLOCK, X_KEYS_MASKED, D_MASKED, RAW_LOGITS, ASYNC_DOTS,
                TAIL=True, FMA_EXP=FMA_EXP, WGMMA_ROWS=WGMMA_ROWS, PARTIAL_SUMS=PARTIAL_SUMS,
            )

    if PARTIAL_SUMS:
        l_s = tl.sum(l_s, 1)
    if DIR_S and ONE_SPLIT:
        # -- one split holds every image key: normalise and write o_s, lse_s here --
        out_rows = pid_bh.to(tl.int64) * M + offs_qm
        top_s, top_inverse_s, residual_s = row_top(m_s, rate, True, FMA_EXP, O_S.dtype.element_ty)
        o_s = acc_s * inverse_sum(l_s, True, top_s, top_inverse_s)[:, None]
        tl.store(O_S + out_rows[:, None] * D + offs_d[None, :], round_to(o_s, O_S.dtype.element_ty),
                 mask=qm_ok[:, None] & d_ok[None, :])
        tl.store(LSE_S + out_rows, lse_value(m_s, l_s, max_scale, True, top_s, residual_s), mask=qm_ok)
    elif DIR_S:
        # -- this split's partial (max, sum, acc), merged by the combine kernel --
        l_s, acc_s = to_max_frame(l_s, acc_s, m_s, rate, True, FMA_EXP, V_X.dtype.element_ty)
        part_rows = (pid_bh.to(tl.int64) * SPLITS + split) * M + offs_qm
        part_max, part_sum = partials_layout(PART, SPLITS, M, D)
        tl.store(part_max + part_rows, m_s, mask=qm_ok)
        tl.store(part_sum + part_rows, l_s, mask=qm_ok)
        acc_ptrs = PART + part_rows[:, None] * D + offs_d[None, :]
        tl.store(acc_ptrs, acc_s, mask=qm_ok[:, None] & d_ok[None, :])


@triton.jit
def _bilateral_combine_kernel(
    PART,  # fp32 partials of direction s per split (partials_layout)
    O_S,  # [B, H, M, D] contiguous, input dtype
    LSE_S,  # [B, H, M] contiguous float64
    M, D, SPLITS,
    sm_scale,  # scale
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr,
    RAW_LOGITS: tl.constexpr = False,  # the partial maxima are raw dots (the forward's RAW_LOGITS)
    BLOCK_S: tl.constexpr = 2,  # splits merged per step, side by side
):
    """Merge the split partials of direction s, weighted by their LSEs. Grid (B*H, M blocks,
    D blocks); each step takes BLOCK_S splits at once (their max by a reduction, then their
    rescaled sums and accumulators summed over the split axis), so 66 splits cost a few steps,
    not 66 dependent ones. The reductions have a fixed shape: bitwise reproducible. Programs of
    one row block repeat the (cheap) max and sum for their own columns; the first column block
    writes the LSE."""
    D = multiple(D, ALIGN)
    rate, max_scale = logit_rates(sm_scale, RAW_LOGITS)
    pid_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(2).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    m_ok = offs_m < M
    d_ok = offs_d < D
    part_max, part_sum = partials_layout(PART, SPLITS, M, D)
    m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        ok = (offs_s < SPLITS)[:, None] & m_ok[None, :]  # [S, M]
        rows = (pid_bh.to(tl.int64) * SPLITS + offs_s)[:, None] * M + offs_m[None, :]  # [S, M]
        m_k = tl.load(part_max + rows, mask=ok, other=float("-inf"))
        l_k = tl.load(part_sum + rows, mask=ok, other=0.0)
        acc_k = tl.load(PART + rows[:, :, None] * D + offs_d[None, None, :],
                        mask=ok[:, :, None] & d_ok[None, None, :], other=0.0)  # [S, M, D]
        m_run, shift, alpha = online_max(m_run, tl.max(m_k, 0), rate)
        beta = exp_shifted(m_k, shift[None, :], rate)  # [S, M]; 0 for padding (-inf)
        l_run = l_run * alpha + tl.sum(l_k * beta, 0)
        acc = acc * alpha[:, None] + tl.sum(acc_k * beta[:, :, None], 0)
    o = acc * inverse_sum(l_run)[:, None]
    lse = lse_value(m_run, l_run, max_scale)
    out_rows = pid_bh.to(tl.int64) * M + offs_m
    tl.store(O_S + out_rows[:, None] * D + offs_d[None, :], round_to(o, O_S.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE_S + out_rows, lse, mask=m_ok & (tl.program_id(2) == 0))


COMBINE_TILE = 4096  # most partial elements (splits x rows x columns) a combine step holds
COMBINE_FEW_TILE = 2048  # the same, for the few-programs shape (4 warps, 16 columns)


def combine_shape(bh: int, m: int, block_d: int, n_sm: int, splits: int) -> tuple:
    """(grid, BLOCK_M, BLOCK_D, num_warps, BLOCK_S) of the combine, on 4 warps: 32 x BLOCK_D
    tiles when there are enough rows to fill the GPU; else 16 columns and the fewest rows per
    program (at least 2) that keep the grid within one wave, so that a few samples with many
    splits still spread over the SMs (B*H = 4, M = 64, 66 splits: 4 rows, 128 programs; 8 rows
    gave 64 programs with twice the work each). Each step merges as many splits as fit in
    the tile's elements (COMBINE_TILE, COMBINE_FEW_TILE)."""
    if bh * cdiv(m, 32) >= n_sm:
        rows, cols, tile = (16 if block_d >= 128 else 32), block_d, COMBINE_TILE
    else:
        rows, cols, tile = 2, 16, COMBINE_FEW_TILE
        while rows < 32 and bh * cdiv(m, rows) * cdiv(block_d, cols) > n_sm:
            rows *= 2
    block_s = max(2, min(next_power_of_2(splits), tile // (rows * cols)))
    return (bh, cdiv(m, rows), cdiv(block_d, cols)), rows, cols, 4, block_s


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _spatial_delta_kernel(
    O_S, DO_S,  # [B, H, M, D] each, any strides
    DELTA_S,  # [B * H, M] fp32 out
    stride_os_b, stride_os_h, stride_os_m, stride_os_d,
    stride_dos_b, stride_dos_h, stride_dos_m, stride_dos_d,
    H, M, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
):
    """delta = rowsum(dO * O) of direction s's spatial rows, once per launch (`_delta_like_dp`:
    the backward kernel's dP dots use the same BLOCK_D and operand dtypes)."""
    D = multiple(D, ALIGN)
    pid_bh, b, h = program_head(H)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    do = load_rows(head_base(DO_S, b, h, stride_dos_b, stride_dos_h, ALIGN=ALIGN), rows, offs_d, stride_dos_m, stride_dos_d,
                    rows_ok, d_ok, ALIGN=ALIGN)
    o = load_rows(head_base(O_S, b, h, stride_os_b, stride_os_h, ALIGN=ALIGN), rows, offs_d, stride_os_m, stride_os_d,
                   rows_ok, d_ok, ALIGN=ALIGN)
    delta = _delta_like_dp(do, o, BLOCK_M, DOT_PRECISION)
    tl.store(DELTA_S + (pid_bh.to(tl.int64) * M + rows), delta, mask=rows_ok)


@triton.jit
def _bwd_s_tile(
    n0, n_end, b, offs_m, m_ok, d_ok,
    k_x_ptr, stride_kx_n, stride_kx_d, v_x_ptr, stride_vx_n, stride_vx_d,  # this head's image keys, values
    DK_X, DV_X, grad_base, D,  # outputs, contiguous: this head's rows start at grad_base
    IMAGE_MASK, stride_im_b, stride_im_n,
    PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k,
    q_s, do_s, lse_hi_s, lse_lo_s, delta_s, dq_s_acc, sm_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_IMAGE_MASK: tl.constexpr, HAS_PAIR_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, D_MASKED: tl.constexpr, DS_SCALED: tl.constexpr,
    ASYNC_DOTS: tl.constexpr, TAIL: tl.constexpr,
):
    """Direction s's backward over one BLOCK_N tile of image keys [n0, n0 + BLOCK_N), all
    spatial queries in registers: dk_x, dv_x of the tile are complete and written; dq_s_acc
    gains the tile's share (returned). TAIL: the tile may run past n_end, so it is bounds-checked
    and its keys masked; a full tile of an unmasked launch carries no per-score select."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    k_x = _masked_load(_row_ptrs(k_x_ptr, n0, stride_kx_n, stride_kx_d, BLOCK_N, BLOCK_D, ALIGN), n_ok, d_ok,
                       TAIL, D_MASKED)
    v_x = _masked_load(_row_ptrs(v_x_ptr, n0, stride_vx_n, stride_vx_d, BLOCK_N, BLOCK_D, ALIGN), n_ok, d_ok,
                       TAIL, D_MASKED)
    KEYS_MASKED: tl.constexpr = TAIL or HAS_IMAGE_MASK or HAS_PAIR_MASK
    keep = 0
    if KEYS_MASKED:
        keep = key_keep(IMAGE_MASK, b, offs_n, n_ok, stride_im_b, stride_im_n, HAS_IMAGE_MASK)
        keep = query_key_keep(keep, PAIR_MASK, b, offs_m, m_ok, offs_n, stride_pm_b, stride_pm_q, stride_pm_k,
                              HAS_PAIR_MASK)
    fresh = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # dq's dot into the carried sum first with ASYNC_DOTS (`_attn_bwd_block`); else a fresh dq
    # added after the stores (at D = 128 the tile's registers allow no other order)
    dq, dk, dv = _attn_bwd_block(q_s, do_s, lse_hi_s, lse_lo_s, delta_s, k_x, v_x, keep, sm_scale,
                                 dq_s_acc if ASYNC_DOTS else tl.zeros_like(dq_s_acc), fresh, fresh, DOT_PRECISION,
                                 DQ_FIRST=True, KEYS_MASKED=KEYS_MASKED, DS_SCALED=DS_SCALED)
    if not DS_SCALED:
        dk = dk * sm_scale
    out = _row_ptrs(grad_base, n0, D, 1, BLOCK_N, BLOCK_D, ALIGN)  # offsets: both outputs share them
    _masked_store(DK_X + out, round_to(dk, DK_X.dtype.element_ty), n_ok, d_ok, TAIL, D_MASKED)
    _masked_store(DV_X + out, round_to(dv, DV_X.dtype.element_ty), n_ok, d_ok, TAIL, D_MASKED)
    if ASYNC_DOTS:
        return dq
    return dq_s_acc + dq


@triton.jit
def _bwd_x_tile(
    n0, n_end, b, offs_m, d_ok,
    q_x_ptr, stride_qx_n, stride_qx_d, do_x_ptr, stride_dox_n, stride_dox_d,  # this head's image queries, dO
    lse_x_ptr,  # this head's LSE_X rows
    DQ_X, grad_base, D,  # output, contiguous: this head's rows start at grad_base
    PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k,
    k_s, v_s, ks_keep, dk_s_acc, dv_s_acc, sm_scale,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_PAIR_MASK: tl.constexpr, KEYS_MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr, D_MASKED: tl.constexpr, DS_SCALED: tl.constexpr,
    ASYNC_DOTS: tl.constexpr, TAIL: tl.constexpr,
):
    """Direction x's backward over one BLOCK_N tile of image queries [n0, n0 + BLOCK_N) against
    all spatial keys (in registers, ks_keep their `key_keep`): dq_x of the tile is complete and
    written; (dk_s_acc, dv_s_acc) gain the tile's share (returned). KEYS_MASKED: some spatial key
    or pair is dropped (padding, a key mask, a per-query mask); padded query rows of a TAIL tile
    need no mask (their LSE makes P exactly 0)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_end
    q_x = _masked_load(_row_ptrs(q_x_ptr, n0, stride_qx_n, stride_qx_d, BLOCK_N, BLOCK_D, ALIGN), n_ok, d_ok,
                       TAIL, D_MASKED)
    do_x = _masked_load(_row_ptrs(do_x_ptr, n0, stride_dox_n, stride_dox_d, BLOCK_N, BLOCK_D, ALIGN), n_ok, d_ok,
                        TAIL, D_MASKED)
    EMPTY_ROWS: tl.constexpr = TAIL or KEYS_MASKED  # a padding row, or a row with no kept key
    lse_hi_x, lse_lo_x = load_lse(lse_x_ptr, offs_n, n_ok, EMPTY_ROWS=EMPTY_ROWS)
    keep = 0
    if KEYS_MASKED:
        keep = query_key_keep(ks_keep, PAIR_MASK, b, offs_n, n_ok, offs_m, stride_pm_b, stride_pm_q, stride_pm_k,
                              HAS_PAIR_MASK)
    dq, dk_s_acc, dv_s_acc = _attn_bwd_block(q_x, do_x, lse_hi_x, lse_lo_x, 0.0, k_s, v_s, keep, sm_scale,
                                             tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32), dk_s_acc, dv_s_acc,
                                             DOT_PRECISION, DQ_FIRST=not ASYNC_DOTS,
                                             DELTA_FROM_P=True, KEYS_MASKED=KEYS_MASKED, DS_SCALED=DS_SCALED,
                                             EMPTY_ROWS=EMPTY_ROWS)
    if not DS_SCALED:
        dq = dq * sm_scale
    _masked_store(DQ_X + _row_ptrs(grad_base, n0, D, 1, BLOCK_N, BLOCK_D, ALIGN), round_to(dq, DQ_X.dtype.element_ty),
                  n_ok, d_ok, TAIL, D_MASKED)
    return dk_s_acc, dv_s_acc


@triton.jit(do_not_specialize=["M", "N", "CHUNK", "SPLITS"])
def _bilateral_bwd_kernel(
    Q_S, K_S, V_S, O_S, DO_S,  # [B, H, M, D] each, any strides (O_S read only with M_ONE_BLOCK)
    DELTA_S,  # [B * H, M] fp32, from `_spatial_delta_kernel` (read only without M_ONE_BLOCK)
    Q_X, K_X, V_X, O_X, DO_X,  # [B, H, N, D] each, any strides
    LSE_S,  # [B, H, M] contiguous float64
    LSE_X,  # [B, H, N] contiguous float64
    IMAGE_MASK,  # [B, N] bool (read only with HAS_IMAGE_MASK)
    SPATIAL_MASK,  # [B, M] bool (read only with HAS_SPATIAL_MASK)
    PAIR_MASK,  # [B, Lq, Lk] bool per-query mask of the one direction run (read only with HAS_PAIR_MASK)
    DQ_X, DK_X, DV_X,  # [B, H, N, D] contiguous, input dtype
    PART_DQ_S, PART_DK_S, PART_DV_S,  # [B * H, SPLITS, M, D] fp32 per-split partials
    stride_qs_b, stride_qs_h, stride_qs_m, stride_qs_d,
    stride_ks_b, stride_ks_h, stride_ks_m, stride_ks_d,
    stride_vs_b, stride_vs_h, stride_vs_m, stride_vs_d,
    stride_os_b, stride_os_h, stride_os_m, stride_os_d,
    stride_dos_b, stride_dos_h, stride_dos_m, stride_dos_d,
    stride_qx_b, stride_qx_h, stride_qx_n, stride_qx_d,
    stride_kx_b, stride_kx_h, stride_kx_n, stride_kx_d,
    stride_vx_b, stride_vx_h, stride_vx_n, stride_vx_d,
    stride_ox_b, stride_ox_h, stride_ox_n, stride_ox_d,
    stride_dox_b, stride_dox_h, stride_dox_n, stride_dox_d,
    stride_im_b, stride_im_n,
    stride_sm_b, stride_sm_m,
    stride_pm_b, stride_pm_q, stride_pm_k,
    H, M, N, D, CHUNK, SPLITS,
    sm_scale,  # scale
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    M_ONE_BLOCK: tl.constexpr,
    DIR_S: tl.constexpr, DIR_X: tl.constexpr,
    HAS_IMAGE_MASK: tl.constexpr, HAS_SPATIAL_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,  # D and the row strides are multiples of this (common.row_alignment)
    TAIL_BLOCK_N: tl.constexpr,  # configs.tail_block: the partial last tile's rows (M_ONE_BLOCK), 0 for none
    HAS_PAIR_MASK: tl.constexpr = False,  # cross attention only: one direction runs
    FULL_KEY_BLOCK: tl.constexpr = False,  # M == BLOCK_M: no padded spatial row in the block
    D_MASKED: tl.constexpr = True,  # D < BLOCK_D: head columns are bounds-checked
    DS_SCALED: tl.constexpr = True,  # dS carries the scale per score (fp16); else the [rows, D] sums do
    ASYNC_DOTS: tl.constexpr = False,  # configs.async_dots: no dot left in flight across an iteration
):
    """One direction's backward (DIR_S or DIR_X), grid (B*H, SPLITS): each program walks its
    CHUNK image tokens (the last split the rest, `split_range`) in BLOCK_N tiles. With
    M_ONE_BLOCK the spatial side stays in registers and the main loop runs the full tiles only (`_bwd_s_tile`, `_bwd_x_tile`), a partial last
    tile (TAIL_BLOCK_N rows) being a bounds-checked copy run before it; a larger M loops over BLOCK_M
    spatial blocks per tile, all bounds-checked."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    tl.static_assert(DIR_S != DIR_X)
    D = multiple(D, ALIGN)
    pid_bh, b, h = program_head(H)
    split = tl.program_id(1)
    q_s_ptr = head_base(Q_S, b, h, stride_qs_b, stride_qs_h, ALIGN=ALIGN)
    k_s_ptr = head_base(K_S, b, h, stride_ks_b, stride_ks_h, ALIGN=ALIGN)
    v_s_ptr = head_base(V_S, b, h, stride_vs_b, stride_vs_h, ALIGN=ALIGN)
    o_s_ptr = head_base(O_S, b, h, stride_os_b, stride_os_h, ALIGN=ALIGN)
    do_s_ptr = head_base(DO_S, b, h, stride_dos_b, stride_dos_h, ALIGN=ALIGN)
    q_x_ptr = head_base(Q_X, b, h, stride_qx_b, stride_qx_h, ALIGN=ALIGN)
    k_x_ptr = head_base(K_X, b, h, stride_kx_b, stride_kx_h, ALIGN=ALIGN)
    v_x_ptr = head_base(V_X, b, h, stride_vx_b, stride_vx_h, ALIGN=ALIGN)
    o_x_ptr = head_base(O_X, b, h, stride_ox_b, stride_ox_h, ALIGN=ALIGN)
    do_x_ptr = head_base(DO_X, b, h, stride_dox_b, stride_dox_h, ALIGN=ALIGN)
    lse_s_ptr = LSE_S + pid_bh.to(tl.int64) * M
    lse_x_ptr = LSE_X + pid_bh.to(tl.int64) * N
    grad_base = pid_bh.to(tl.int64) * N * D  # this head's rows of DQ_X / DK_X / DV_X
    part_base = (pid_bh.to(tl.int64) * SPLITS + split) * M * D
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    offs_blk = tl.arange(0, BLOCK_M)
    n_start, n_end = split_range(split, SPLITS, CHUNK, N)

    if M_ONE_BLOCK:
        # -- the whole spatial side stays in registers for the chunk --
        m_ok = offs_blk < M
        n_full_end = n_start + (n_end - n_start) // BLOCK_N * BLOCK_N
        part_offsets = part_base + offs_blk.to(tl.int64)[:, None] * D + offs_d[None, :]
        part_ok = m_ok[:, None] & d_ok[None, :]
        if DIR_S:
            q_s = load_rows(q_s_ptr, offs_blk, offs_d, stride_qs_m, stride_qs_d, m_ok, d_ok, ALIGN=ALIGN)
            do_s = load_rows(do_s_ptr, offs_blk, offs_d, stride_dos_m, stride_dos_d, m_ok, d_ok, ALIGN=ALIGN)
            # every spatial row is here: its delta once per program, by the dot that forms dP
            o_s = load_rows(o_s_ptr, offs_blk, offs_d, stride_os_m, stride_os_d, m_ok, d_ok, ALIGN=ALIGN)
            delta_s = _delta_like_dp(do_s, o_s, BLOCK_M, DOT_PRECISION)
            lse_hi_s, lse_lo_s = load_lse(lse_s_ptr, offs_blk, m_ok)
            dq_s_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            # The partial last tile first: after the main loop it raised the loop's registers
            # (sm_80 spilled at D = 32 with a mask).
            if TAIL_BLOCK_N:
                if n_full_end < n_end:
                    dq_s_acc = _bwd_s_tile(
                        n_full_end, n_end, b, offs_blk, m_ok, d_ok, k_x_ptr, stride_kx_n, stride_kx_d,
                        v_x_ptr, stride_vx_n, stride_vx_d, DK_X, DV_X, grad_base, D, IMAGE_MASK, stride_im_b, stride_im_n,
                        PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k,
                        q_s, do_s, lse_hi_s, lse_lo_s, delta_s, dq_s_acc, sm_scale, TAIL_BLOCK_N, BLOCK_D,
                        HAS_IMAGE_MASK, HAS_PAIR_MASK, DOT_PRECISION, ALIGN, D_MASKED, DS_SCALED, ASYNC_DOTS, TAIL=True,
                    )
            for n0 in range(n_start, n_full_end, BLOCK_N):
                dq_s_acc = _bwd_s_tile(
                    n0, n_end, b, offs_blk, m_ok, d_ok, k_x_ptr, stride_kx_n, stride_kx_d,
                    v_x_ptr, stride_vx_n, stride_vx_d, DK_X, DV_X, grad_base, D, IMAGE_MASK, stride_im_b, stride_im_n,
                    PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k,
                    q_s, do_s, lse_hi_s, lse_lo_s, delta_s, dq_s_acc, sm_scale, BLOCK_N, BLOCK_D,
                    HAS_IMAGE_MASK, HAS_PAIR_MASK, DOT_PRECISION, ALIGN, D_MASKED, DS_SCALED, ASYNC_DOTS, TAIL=False,
                )
            if not DS_SCALED:
                dq_s_acc = dq_s_acc * sm_scale
            tl.store(PART_DQ_S + part_offsets, dq_s_acc, mask=part_ok)
        else:
            KEYS_MASKED: tl.constexpr = not FULL_KEY_BLOCK or HAS_SPATIAL_MASK or HAS_PAIR_MASK
            ks_keep = key_keep(SPATIAL_MASK, b, offs_blk, m_ok, stride_sm_b, stride_sm_m, HAS_SPATIAL_MASK)
            k_s = load_rows(k_s_ptr, offs_blk, offs_d, stride_ks_m, stride_ks_d, m_ok, d_ok, ALIGN=ALIGN)
            v_s = load_rows(v_s_ptr, offs_blk, offs_d, stride_vs_m, stride_vs_d, m_ok, d_ok, ALIGN=ALIGN)
            dk_s_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            dv_s_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
            if TAIL_BLOCK_N:
                if n_full_end < n_end:
                    dk_s_acc, dv_s_acc = _bwd_x_tile(
                        n_full_end, n_end, b, offs_blk, d_ok, q_x_ptr, stride_qx_n, stride_qx_d,
                        do_x_ptr, stride_dox_n, stride_dox_d, lse_x_ptr, DQ_X, grad_base, D,
                        PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k, k_s, v_s, ks_keep, dk_s_acc, dv_s_acc,
                        sm_scale, TAIL_BLOCK_N, BLOCK_D, HAS_PAIR_MASK, KEYS_MASKED, DOT_PRECISION, ALIGN, D_MASKED,
                        DS_SCALED, ASYNC_DOTS, TAIL=True,
                    )
            for n0 in range(n_start, n_full_end, BLOCK_N):
                dk_s_acc, dv_s_acc = _bwd_x_tile(
                    n0, n_end, b, offs_blk, d_ok, q_x_ptr, stride_qx_n, stride_qx_d,
                    do_x_ptr, stride_dox_n, stride_dox_d, lse_x_ptr, DQ_X, grad_base, D,
                    PAIR_MASK, stride_pm_b, stride_pm_q, stride_pm_k, k_s, v_s, ks_keep, dk_s_acc, dv_s_acc,
                    sm_scale, BLOCK_N, BLOCK_D, HAS_PAIR_MASK, KEYS_MASKED, DOT_PRECISION, ALIGN, D_MASKED,
                    DS_SCALED, ASYNC_DOTS, TAIL=False,
                )
            if not DS_SCALED:
                dk_s_acc = dk_s_acc * sm_scale
            tl.store(PART_DK_S + part_offsets, dk_s_acc, mask=part_ok)
            tl.store(PART_DV_S + part_offsets, dv_s_acc, mask=part_ok)
    else:
        # -- M > BLOCK_M: per image tile, loop over spatial blocks; their partials live in this
        # program's own slice of the split buffers (first tile stores, later tiles add: no
        # atomics). dS carries the scale here whatever DS_SCALED says. --
        for n0 in range(n_start, n_end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < n_end
            tile_ok = n_ok[:, None] & d_ok[None, :]
            out_offsets = grad_base + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
            not_first = n0 > n_start
            if DIR_X:
                q_x = load_rows(q_x_ptr, offs_n, offs_d, stride_qx_n, stride_qx_d, n_ok, d_ok, ALIGN=ALIGN)
                do_x = load_rows(do_x_ptr, offs_n, offs_d, stride_dox_n, stride_dox_d, n_ok, d_ok, ALIGN=ALIGN)
                o_x = load_rows(o_x_ptr, offs_n, offs_d, stride_ox_n, stride_ox_d, n_ok, d_ok, ALIGN=ALIGN)
                delta_x = _delta_like_dp(do_x, o_x, BLOCK_N, DOT_PRECISION)
                lse_hi_x, lse_lo_x = load_lse(lse_x_ptr, offs_n, n_ok)
                dq_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            else:
                keep_n = key_keep(IMAGE_MASK, b, offs_n, n_ok, stride_im_b, stride_im_n, HAS_IMAGE_MASK)
                k_x = load_rows(k_x_ptr, offs_n, offs_d, stride_kx_n, stride_kx_d, n_ok, d_ok, ALIGN=ALIGN)
                v_x = load_rows(v_x_ptr, offs_n, offs_d, stride_vx_n, stride_vx_d, n_ok, d_ok, ALIGN=ALIGN)
                dk_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                dv_x = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + offs_blk
                m_ok = offs_m < M
                part_offsets = part_base + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :]
                part_ok = m_ok[:, None] & d_ok[None, :]
                if DIR_S:
                    q_s = load_rows(q_s_ptr, offs_m, offs_d, stride_qs_m, stride_qs_d, m_ok, d_ok, ALIGN=ALIGN)
                    do_s = load_rows(do_s_ptr, offs_m, offs_d, stride_dos_m, stride_dos_d, m_ok, d_ok, ALIGN=ALIGN)
                    delta_s = tl.load(DELTA_S + (pid_bh.to(tl.int64) * M + offs_m), mask=m_ok, other=0.0)
                    lse_hi_s, lse_lo_s = load_lse(lse_s_ptr, offs_m, m_ok)
                    keep_mn = query_key_keep(keep_n, PAIR_MASK, b, offs_m, m_ok, offs_n,
                                             stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                    dq_c, dk_x, dv_x = _attn_bwd_block(
                        q_s, do_s, lse_hi_s, lse_lo_s, delta_s, k_x, v_x, keep_mn, sm_scale,
                        tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), dk_x, dv_x, DOT_PRECISION,
                        DQ_FIRST=not ASYNC_DOTS,
                    )
                    old = tl.load(PART_DQ_S + part_offsets, mask=part_ok & not_first, other=0.0)
                    tl.store(PART_DQ_S + part_offsets, old + dq_c, mask=part_ok)
                else:
                    km_keep = key_keep(SPATIAL_MASK, b, offs_m, m_ok, stride_sm_b, stride_sm_m, HAS_SPATIAL_MASK)
                    km_keep = query_key_keep(km_keep, PAIR_MASK, b, offs_n, n_ok, offs_m,
                                             stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                    k_blk = load_rows(k_s_ptr, offs_m, offs_d, stride_ks_m, stride_ks_d, m_ok, d_ok, ALIGN=ALIGN)
                    v_blk = load_rows(v_s_ptr, offs_m, offs_d, stride_vs_m, stride_vs_d, m_ok, d_ok, ALIGN=ALIGN)
                    fresh = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
                    dq_x, dk_c, dv_c = _attn_bwd_block(
                        q_x, do_x, lse_hi_x, lse_lo_x, delta_x, k_blk, v_blk, km_keep, sm_scale, dq_x, fresh, fresh,
                        DOT_PRECISION, DQ_FIRST=ASYNC_DOTS,
                    )
                    old = tl.load(PART_DK_S + part_offsets, mask=part_ok & not_first, other=0.0)
                    tl.store(PART_DK_S + part_offsets, old + dk_c, mask=part_ok)
                    old = tl.load(PART_DV_S + part_offsets, mask=part_ok & not_first, other=0.0)
                    tl.store(PART_DV_S + part_offsets, old + dv_c, mask=part_ok)
            # -- image-side gradients are complete for this tile --
            if DIR_X:
                tl.store(DQ_X + out_offsets, round_to(dq_x, DQ_X.dtype.element_ty), mask=tile_ok)
            else:
                tl.store(DK_X + out_offsets, round_to(dk_x, DK_X.dtype.element_ty), mask=tile_ok)
                tl.store(DV_X + out_offsets, round_to(dv_x, DV_X.dtype.element_ty), mask=tile_ok)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
# The blocks and splits depend only on sizes, the element size, the SM count and the
# directions (cached here; configs.launch_meta caches the launch config per bucket). A call
# after a signature's first does not run these launchers at all: launch.run replays what
# they recorded.
@functools.lru_cache(maxsize=1024)
def _fwd_plan(B, H, M, N, D, elem, n_sm, arch, run_s, run_x, vector_rows):
    block_d = block_d_for(D)
    block_m = block_m_for(block_d, elem, backward=False, vector_rows=vector_rows, arch=arch)
    m_programs = cdiv(M, block_m) if run_s else 1
    splits, chunk = split_plan(n_sm, B * H * m_programs, N)
    combine = (*combine_shape(B * H, M, block_d, n_sm, splits), row_alignment(D))  # its partials are contiguous
    return block_m, block_d, m_programs, splits, chunk, combine


@functools.lru_cache(maxsize=1024)
def _bwd_plan(B, H, M, N, D, elem, n_sm, arch, vector_rows):
    block_d = block_d_for(D)
    block_m = block_m_for(block_d, elem, backward=True, n_spatial=M, vector_rows=vector_rows, arch=arch)
    splits, chunk = split_plan(n_sm, B * H, N)
    return block_m, block_d, splits, chunk


def attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask=None, spatial_mask=None, run_s=True, run_x=True,
                  pair_mask=None):
    """Launch the forward; returns (o_s, o_x, lse_s, lse_x), None for a direction not run.

    q_s, k_s, v_s: [B, H, M, D]; q_x, k_x, v_x: [B, H, N, D]; image_mask: bool [B, N] on
    the keys of direction s; spatial_mask: bool [B, M] on the keys of direction x. run_s /
    run_x switch direction s (o_s) / direction x (o_x) on or off. pair_mask: bool
    [B, queries, keys] of the one direction run (cross attention's attn_mask): [B, M, N] for
    direction s, [B, N, M] for direction x.
    """
    B, H, M, D = q_s.shape
    N = q_x.shape[2]
    device, dtype = q_x.device, q_x.dtype
    elem = q_x.element_size()
    if pair_mask is not None and run_s and run_x:
        raise ValueError("a per-query mask belongs to one direction: run_s and run_x cannot both be set")
    if run_s and run_x and not fuse_directions(block_d_for(D), elem):
        o_s, _, lse_s, _ = attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, spatial_mask, True, False)
        _, o_x, _, lse_x = attention_fwd(q_s, k_s, v_s, q_x, k_x, v_x, scale, image_mask, spatial_mask, False, True)
        return o_s, o_x, lse_s, lse_x
    align = row_alignment(D, q_s, k_s, v_s, q_x, k_x, v_x)
    arch = capability(device)
    block_m, block_d, m_programs, splits, chunk, combine = _fwd_plan(
        B, H, M, N, D, elem, sm_count(device), arch, run_s, run_x, align * elem >= 16
    )
    combine_grid, combine_m, combine_d, combine_warps, combine_splits, combine_align = combine
    key_mask = (run_s and image_mask is not None) or (run_x and spatial_mask is not None)
    meta = launch_meta(block_m, block_d, elem, False, run_s and run_x, run_s, arch, pair_mask is not None, key_mask)
    tail = tail_block(N, chunk, splits, meta["BLOCK_N"], arch)
    raw_logits = scale > 0  # the scale goes into the exponent; the max of raw dots is the logits' max
    f32 = torch.float32
    o_x = lse_x = o_s = lse_s = None
    dummy = q_x  # stands in for pointers a disabled branch never touches
    part = dummy
    if run_x:
        o_x = torch.empty((B, H, N, D), device=device, dtype=dtype)
        lse_x = torch.empty((B, H, N), device=device, dtype=torch.float64)
    if run_s:
        o_s = torch.empty((B, H, M, D), device=device, dtype=dtype)
        lse_s = torch.empty((B, H, M), device=device, dtype=torch.float64)
        if splits > 1:
            part = torch.empty((B * H * splits * M * (D + 2),), device=device, dtype=f32)  # partials_layout
    image_mask, stride_im_b, stride_im_n = mask_args(image_mask, dummy)
    spatial_mask, stride_sm_b, stride_sm_m = mask_args(spatial_mask, dummy)
    pair_mask, *pair_strides = pair_mask_args(pair_mask, dummy)
    with device_guard(device):
        launch(_bilateral_fwd_kernel, (B * H, splits, m_programs),
            q_s, k_s, v_s, q_x, k_x, v_x, image_mask, spatial_mask, pair_mask,
            o_x if run_x else dummy, lse_x if run_x else dummy, o_s if run_s else dummy, lse_s if run_s else dummy,
            part,
            *q_s.stride(), *k_s.stride(), *v_s.stride(), *q_x.stride(), *k_x.stride(), *v_x.stride(),
            stride_im_b, stride_im_n, stride_sm_b, stride_sm_m, *pair_strides,
            H, M, N, D, chunk, splits, scale,
            BLOCK_M=block_m, BLOCK_D=block_d, DIR_S=run_s, DIR_X=run_x,
            HAS_IMAGE_MASK=image_mask is not dummy, HAS_SPATIAL_MASK=spatial_mask is not dummy,
            DOT_PRECISION=dot_precision(dtype), ALIGN=align, ONE_M_PROGRAM=m_programs == 1,
            HAS_PAIR_MASK=pair_mask is not dummy, ONE_KEY_BLOCK=M <= block_m, FULL_KEY_BLOCK=M == block_m,
            RAW_LOGITS=raw_logits, D_MASKED=D != block_d, TAIL_BLOCK_N=tail,
            ONE_SPLIT=splits == 1, ASYNC_DOTS=async_dots(arch, meta["num_stages"], elem),
            FMA_EXP=fma_exponent(arch, elem), WGMMA_ROWS=wgmma_rows(arch, elem, block_m, pair_mask is not dummy),
            TAIL_RELOADS=tail_reloads_spatial(
                arch, elem, run_s, run_x, block_m, block_d, meta["BLOCK_N"], meta["num_warps"], key_mask, tail),
            **meta,
        )
        if run_s and splits > 1:
            launch(_bilateral_combine_kernel, combine_grid,
                part, o_s, lse_s, M, D, splits, scale, BLOCK_M=combine_m, BLOCK_D=combine_d,
                ALIGN=combine_align, RAW_LOGITS=raw_logits, BLOCK_S=combine_splits, num_warps=combine_warps,
            )
    return o_s, o_x, lse_s, lse_x


def attention_bwd(
    do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale,
    image_mask=None, spatial_mask=None, run_s=True, run_x=True, pair_mask=None,
):
    """Launch the backward; returns (dq_s, dk_s, dv_s, dq_x, dk_x, dv_x), None for the
    gradients of a direction not run (dq_s, dk_x, dv_x come from direction s; dq_x, dk_s,
    dv_s from direction x). do_s, do_x: the output gradients. Inputs, run_s / run_x and
    pair_mask as in `attention_fwd`; do_*/o_*/lse_* of a direction not run may be None.
    Each direction is one launch writing its image-side gradients and fp32 per-split partials
    of its spatial-side ones; one split reduction then sums every partial of the call."""
    B, H, M, D = q_s.shape
    dtype = q_x.dtype
    if pair_mask is not None and run_s and run_x:
        raise ValueError("a per-query mask belongs to one direction: run_s and run_x cannot both be set")
    if not backward_supported(block_d_for(D), q_x.element_size(), M):
        # Wide heads: the head dim is split across programs (wide.py).
        dq_s = dk_s = dv_s = dq_x = dk_x = dv_x = None
        if run_s:
            dq_s, dk_x, dv_x = wide_head_bwd(do_s, q_s, k_x, v_x, o_s, scale, image_mask, True, pair_mask)
        if run_x:
            dq_x, dk_s, dv_s = wide_head_bwd(do_x, q_x, k_s, v_s, o_x, scale, spatial_mask, False, pair_mask)
        return dq_s, dk_s, dv_s, dq_x, dk_x, dv_x
    args = (q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask, spatial_mask)
    dq_x = dk_x = dv_x = None
    parts = []
    if run_s:
        dk_x, dv_x, part_dq_s = _bwd_direction(do_s, *args, True, pair_mask)
        parts.append(part_dq_s)
    if run_x:
        dq_x, part_dk_s, part_dv_s = _bwd_direction(do_x, *args, False, pair_mask)
        parts += [part_dk_s, part_dv_s]
    sums = reduce_splits(parts, (B, H, M, D), dtype)
    dq_s = sums[0] if run_s else None
    dk_s, dv_s = sums[-2:] if run_x else (None, None)
    return dq_s, dk_s, dv_s, dq_x, dk_x, dv_x


def _bwd_direction(do, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale, image_mask, spatial_mask,
                   run_s, pair_mask):
    """One direction's backward launch (direction s where run_s, else x; do its output
    gradient): (dk_x, dv_x, part_dq_s) for direction s, (dq_x, part_dk_s, part_dv_s) for x,
    the parts fp32 [B * H, SPLITS, M, D] per-split partials for `reduce_splits`."""
    run_x = not run_s
    do_s, do_x = (do, None) if run_s else (None, do)
    B, H, M, D = q_s.shape
    N = q_x.shape[2]
    device, dtype = q_x.device, q_x.dtype
    elem = q_x.element_size()
    if run_s:
        align = row_alignment(D, q_s, k_x, v_x, do_s, o_s)
    else:
        align = row_alignment(D, q_x, k_s, v_s, do_x, o_x)
    arch = capability(device)
    block_m, block_d, splits, chunk = _bwd_plan(B, H, M, N, D, elem, sm_count(device), arch, align * elem >= 16)
    key_mask = (image_mask if run_s else spatial_mask) is not None
    bucket = (block_m, block_d, elem, True, False, run_s, arch, pair_mask is not None, key_mask)
    meta = dict(launch_meta(*bucket))
    block_m = meta.pop("BLOCK_M", block_m)  # a forced config may set the spatial block too (gpu_config_sweep.py)
    one_block = M <= block_m  # the whole spatial side in registers (M_ONE_BLOCK)
    tail = tail_block(N, chunk, splits, meta["BLOCK_N"], arch) if one_block else 0
    if tail:  # with a partial last tile, some buckets launch another config (configs.TAIL_CONFIGS)
        tailed = {k: v for k, v in launch_meta(*bucket, tail=True).items() if k != "BLOCK_M"}
        if tailed["BLOCK_N"] != meta["BLOCK_N"]:  # the tail's rows were sized for meta's tile
            raise RuntimeError(f"configs.TAIL_CONFIGS: {tailed} changes its bucket's BLOCK_N {meta['BLOCK_N']}")
        meta = tailed
    f32 = torch.float32
    dummy = q_x
    zero4 = (0, 0, 0, 0)
    if run_s:  # direction s: spatial queries over image keys
        dq_x = None
        dk_x = torch.empty((B, H, N, D), device=device, dtype=dtype)
        dv_x = torch.empty((B, H, N, D), device=device, dtype=dtype)
        part_dq_s = torch.empty((B * H, splits, M, D), device=device, dtype=f32)
        part_dk_s = part_dv_s = None
        # one spatial block: the kernel forms delta itself; else `_spatial_delta_kernel` does
        delta_s = None if one_block else torch.empty((B * H, M), device=device, dtype=f32)
        image_grads = (dummy, dk_x, dv_x)
        parts = (part_dq_s, dummy, dummy)
        strides_o_s, strides_do_s, strides_o_x, strides_do_x = o_s.stride(), do_s.stride(), zero4, zero4
        o_x_arg, do_x_arg, lse_s_arg, lse_x_arg, o_s_arg, do_s_arg = dummy, dummy, lse_s, dummy, o_s, do_s
    else:  # direction x: image queries over spatial keys
        dq_x = torch.empty((B, H, N, D), device=device, dtype=dtype)
        dk_x = dv_x = None
        part_dq_s = None
        part_dk_s = torch.empty((B * H, splits, M, D), device=device, dtype=f32)
        part_dv_s = torch.empty((B * H, splits, M, D), device=device, dtype=f32)
        delta_s = None
        image_grads = (dq_x, dummy, dummy)
        parts = (dummy, part_dk_s, part_dv_s)
        strides_o_s, strides_do_s, strides_o_x, strides_do_x = zero4, zero4, o_x.stride(), do_x.stride()
        o_x_arg, do_x_arg, lse_s_arg, lse_x_arg, o_s_arg, do_s_arg = o_x, do_x, dummy, lse_x, dummy, dummy
    image_mask, stride_im_b, stride_im_n = mask_args(image_mask, dummy)
    spatial_mask, stride_sm_b, stride_sm_m = mask_args(spatial_mask, dummy)
    pair_mask, *pair_strides = pair_mask_args(pair_mask, dummy)
    with device_guard(device):
        if delta_s is not None:
            launch(_spatial_delta_kernel, (B * H, cdiv(M, DELTA_BLOCK_M)),
                o_s, do_s, delta_s, *o_s.stride(), *do_s.stride(), H, M, D,
                BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d, DOT_PRECISION=dot_precision(dtype), ALIGN=align,
            )
        launch(_bilateral_bwd_kernel, (B * H, splits),
            q_s, k_s, v_s, o_s_arg, do_s_arg, dummy if delta_s is None else delta_s, q_x, k_x, v_x, o_x_arg, do_x_arg,
            lse_s_arg, lse_x_arg, image_mask, spatial_mask, pair_mask,
            *image_grads, *parts,
            *q_s.stride(), *k_s.stride(), *v_s.stride(), *strides_o_s, *strides_do_s,
            *q_x.stride(), *k_x.stride(), *v_x.stride(), *strides_o_x, *strides_do_x,
            stride_im_b, stride_im_n, stride_sm_b, stride_sm_m, *pair_strides,
            H, M, N, D, chunk, splits, scale,
            BLOCK_M=block_m, BLOCK_D=block_d, M_ONE_BLOCK=one_block, DIR_S=run_s, DIR_X=run_x,
            HAS_IMAGE_MASK=image_mask is not dummy, HAS_SPATIAL_MASK=spatial_mask is not dummy,
            DOT_PRECISION=dot_precision(dtype), ALIGN=align, HAS_PAIR_MASK=pair_mask is not dummy,
            FULL_KEY_BLOCK=M == block_m, D_MASKED=D != block_d, TAIL_BLOCK_N=tail,
            DS_SCALED=dtype == torch.float16 or block_d >= block_m, ASYNC_DOTS=async_dots(arch, meta["num_stages"], elem),
            **meta,
        )
    if run_s:
        return dk_x, dv_x, part_dq_s
    return dq_x, part_dk_s, part_dv_s
