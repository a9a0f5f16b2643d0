"""Triton backward for wide heads: one direction of bilateral attention with the head dim split.

Serves the buckets where `configs.backward_supported` is False (fp32 at
BLOCK_D 128 and 256; 16-bit at BLOCK_D 256 with M above one spatial block): there every
tile of the fused backward holds [*, BLOCK_D] operands and accumulators that spill. Here
no [*, BLOCK_D]-wide tile is ever live.

Shapes as in fused.py: spatial tokens [B, H, M, D], image tokens
[B, H, N, D]. One launch per direction:
  - direction s: spatial queries q_s over image keys k_x, v_x (optional image mask [B, N]);
  - direction x: image queries q_x over spatial keys k_s, v_s (optional spatial mask [B, M];
    cross_attention's many-queries shape).

Three launches per direction, each forming the logits S = q k^T with the same loop over
BLOCK_DC-wide column chunks of the head dim (`_chunked_logits`; only [*, BLOCK_DC] operand
tiles and the [rows, keys] logit tile are live):
  1. `_bilateral_wide_lse_kernel`: the softmax statistics (max, sum) of every query row
     from this S, per split of the keys, merged over the splits in a fixed order into a
     float64 LSE (as the forward's; `load_lse` splits it into fp32 hi + lo). The forward's
     LSE is not used: the forward forms S with one full-width dot, whose rounding differs
     from the chunked sum by ~ulp(|S|); at |logits| ~ 1e4 that makes P of a one-hot row
     1 +- 5e-4 instead of exactly 1 (dv off by as much; measured at D = 96). With its own
     LSE, P = exp(S - LSE) is exactly 1 there, as in the reference.
  2. `_bilateral_wide_delta_kernel`: delta_i = sum_d dO_id O_id as the diagonal of dO O^T,
     with the same chunk loop and dot calls as dP = dO v^T. Where the softmax is one-hot,
     O_i equals the value row v_j bitwise, so delta_i equals dP_ij bitwise and dS is
     exactly 0, as in PyTorch's softmax backward (a rowsum of dO * O cancels only to
     rounding, which dq = dS k then multiplies by |k|).
  3. `_bilateral_wide_bwd_kernel`, grid (B*H, SPLITS, D_CHUNKS): a program owns CHUNK image
     tokens (the last split the rest; walked in BLOCK_N tiles) and one column chunk c of the head dim; per image tile
     it loops over all spatial blocks of BLOCK_M rows, recomputes S and dP = dO v^T (chunk
     loop), P = exp(scale * S - LSE), dS = P * (dP - delta) * scale, and the column chunk c
     of the gradients: dq[:, c] = dS k[:, c], dk[:, c] = dS^T q[:, c], dv[:, c] = P^T dO[:, c].
     Image-side gradients (dk_x, dv_x in direction s; dq_x in direction x) are complete per
     tile and written in the input dtype. Spatial-side ones (dq_s; dk_s, dv_s) go to fp32
     per-split partials [B*H, SPLITS, M, D]: each program read-modify-writes only its own
     (split, column chunk) slice (the first tile stores), and the launcher sums the splits
     in a fixed order, so two runs are bitwise equal and nothing is atomic.

Cost: S and dP are recomputed once per column chunk, so their FLOPs (and the reads of q,
k, v, dO, mostly from L2) grow by D_CHUNKS = ceil(D / BLOCK_DC), plus one more S for the
statistics: against the fused backward's 5 M N D multiply-adds, (2 D_CHUNKS + 3 + 1) M N D,
e.g. 2x at D_CHUNKS = 3 (fp32, D = 96) and 4x at D_CHUNKS = 8 (fp32 and 16-bit, D = 256). The spatial partials are re-read and re-written per image tile (they
stay in L2). Memory: the gradients, LSE and delta rows [B*H, Lq], and the split workspace
(fp32 partials [B*H, SPLITS, M, D] and statistics [B*H, SPLITS, Lq]); never O(M*N).
Offsets are int64; fp32 dots are IEEE; any M, N, strides; a query with no kept key gets
zero gradients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E,
    diagonal,
    dot,
    dot_precision,
    exp_shifted,
    head_base,
    key_keep,
    pair_mask_args,
    query_key_keep,
    load_lse,
    load_rows,
    mask_args,
    online_max,
    probs,
    program_head,
    reduce_splits,
    round_to,
    sm_count,
    split_plan,
    split_range,
)
from .configs import block_d_for, cdiv
from .launch import device_guard, launch


# ----------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------
class WideConfig(NamedTuple):
    BLOCK_M: int  # spatial rows per block
    BLOCK_N: int  # image tokens per tile
    BLOCK_DC: int  # head-dim columns per chunk
    num_warps: int


# One config per (element bytes, BLOCK_D, direction s?), compiled spill-free for sm_80 and
# sm_90 by the static check (python -m spatialformer_kernels.backends.triton.static_check),
# on the launches as Triton's run-time binder specialises them. Not autotuned: a direction's
# three passes must share the tile shapes and the chunk width, and the grid depends on them.
# Alternatives that spill on sm_80 or sm_90: fp32 with BLOCK_DC 64 or BLOCK_M 32 and BLOCK_N
# 32; fp32 direction s on 8 warps (ptxas caps it at 128 registers) and direction x on 4 warps;
# 16-bit with BLOCK_DC 64 (direction x's gradient kernel on both archs and direction s's
# statistics kernel on sm_90, seen once the check compiled as the run-time launch does), with
# BLOCK_M 32, BLOCK_DC 128, or on 4 warps. Both dtypes therefore use 32-column chunks.
WIDE_CONFIGS = {
    (4, 128, True): WideConfig(16, 32, 32, 4),
    (4, 128, False): WideConfig(16, 32, 32, 8),
    (4, 256, True): WideConfig(16, 32, 32, 4),
    (4, 256, False): WideConfig(16, 32, 32, 8),
    (2, 256, True): WideConfig(16, 32, 32, 8),
    (2, 256, False): WideConfig(16, 32, 32, 8),
}


def wide_config(block_d: int, elem_bytes: int, queries_are_spatial: bool) -> WideConfig:
    """The config of a bucket and direction (narrower buckets, used only by direct calls,
    borrow the smallest served bucket's)."""
    served = WIDE_CONFIGS.get((elem_bytes, block_d, queries_are_spatial))
    return served or WIDE_CONFIGS[(elem_bytes, 128 if elem_bytes == 4 else 256, queries_are_spatial)]


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _chunked_logits(
    q_ptr, k_ptr, v_ptr, do_ptr, rows_q, q_ok, rows_k, k_ok,
    stride_q_l, stride_q_d, stride_k_l, stride_k_d, stride_v_l, stride_v_d, stride_do_l, stride_do_d,
    D,
    R: tl.constexpr, C: tl.constexpr, BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    WITH_DP: tl.constexpr = True,
):
    """S = q k^T and (WITH_DP) dP = dO v^T, [R, C] fp32, of query rows over key rows,
    accumulated over BLOCK_DC-wide column chunks in increasing order. Every kernel here forms
    S with this loop, so the statistics pass and the gradient pass see the same S bitwise."""
    s = tl.zeros([R, C], dtype=tl.float32)
    dp = tl.zeros([R, C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_DC):
        cols = d0 + tl.arange(0, BLOCK_DC)
        cols_ok = cols < D
        q = load_rows(q_ptr, rows_q, cols, stride_q_l, stride_q_d, q_ok, cols_ok)
        k = load_rows(k_ptr, rows_k, cols, stride_k_l, stride_k_d, k_ok, cols_ok)
        s += dot(q, tl.trans(k), DOT_PRECISION)
        if WITH_DP:
            do = load_rows(do_ptr, rows_q, cols, stride_do_l, stride_do_d, q_ok, cols_ok)
            v = load_rows(v_ptr, rows_k, cols, stride_v_l, stride_v_d, k_ok, cols_ok)
            dp += dot(do, tl.trans(v), DOT_PRECISION)
    return s, dp


@triton.jit
def _probs_and_dscores(s, dp, keep, lse_hi, lse_lo, delta, sm_scale):
    """P = exp(scale * S - lse) and dS = P * (dP - delta) * scale, [R, C] fp32; keep [R, C] or
    [1, C] (`query_key_keep`)."""
    s = tl.where(keep, s * sm_scale, float("-inf"))
    p = probs(s, lse_hi, lse_lo)
    ds = p * (dp - delta[:, None]) * sm_scale
    return p, ds


@triton.jit(do_not_specialize=["LQ", "LK", "CHUNK", "SPLITS"])
def _bilateral_wide_lse_kernel(
    Q,  # [B, H, Lq, D] any strides: queries
    K,  # [B, H, Lk, D] any strides: keys
    KEY_MASK,  # [B, Lk] bool (read only with HAS_MASK)
    PAIR_MASK,  # [B, Lq, Lk] bool (read only with HAS_PAIR_MASK)
    PART_MAX,  # [B * H, SPLITS, Lq] fp32 out: max logit over the split's keys
    PART_SUM,  # [B * H, SPLITS, Lq] fp32 out: sum of exp(logit - max) over them
    stride_q_b, stride_q_h, stride_q_l, stride_q_d,
    stride_k_b, stride_k_h, stride_k_l, stride_k_d,
    stride_mask_b, stride_mask_l,
    stride_pm_b, stride_pm_q, stride_pm_k,
    H, LQ, LK, D, CHUNK, SPLITS,
    sm_scale,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_DC: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_PAIR_MASK: tl.constexpr = False,
):
    """Softmax statistics of BLOCK_R query rows over one split of the keys, from the S of
    `_chunked_logits` (grid (B*H, SPLITS, row blocks))."""
    pid_bh, b, h = program_head(H)
    split = tl.program_id(1)
    q_ptr = head_base(Q, b, h, stride_q_b, stride_q_h)
    k_ptr = head_base(K, b, h, stride_k_b, stride_k_h)
    rows = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < LQ
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_start, k_end = split_range(split, SPLITS, CHUNK, LK)
    for k0 in range(k_start, k_end, BLOCK_C):
        keys = k0 + tl.arange(0, BLOCK_C)
        keep = key_keep(KEY_MASK, b, keys, keys < k_end, stride_mask_b, stride_mask_l, HAS_MASK)
        s, _ = _chunked_logits(
            q_ptr, k_ptr, k_ptr, q_ptr, rows, rows_ok, keys, keep,
            stride_q_l, stride_q_d, stride_k_l, stride_k_d, stride_k_l, stride_k_d, stride_q_l, stride_q_d,
            D, BLOCK_R, BLOCK_C, BLOCK_DC, DOT_PRECISION, WITH_DP=False,
        )
        keep_rk = query_key_keep(keep, PAIR_MASK, b, rows, rows_ok, keys, stride_pm_b, stride_pm_q, stride_pm_k,
                                 HAS_PAIR_MASK)
        s = tl.where(keep_rk, s * sm_scale, float("-inf"))
        m_i, shift, alpha = online_max(m_i, tl.max(s, 1), LOG2E)
        l_i = l_i * alpha + tl.sum(exp_shifted(s, shift[:, None], LOG2E), 1)
    out = (pid_bh.to(tl.int64) * SPLITS + split) * LQ + rows
    tl.store(PART_MAX + out, m_i, mask=rows_ok)
    tl.store(PART_SUM + out, l_i, mask=rows_ok)


@triton.jit
def _bilateral_wide_delta_kernel(
    O, DO,  # [B, H, Lq, D] each, any strides: outputs and their gradients of one direction
    DELTA,  # [B * H, Lq] fp32 out
    stride_o_b, stride_o_h, stride_o_l, stride_o_d,
    stride_do_b, stride_do_h, stride_do_l, stride_do_d,
    H, LQ, D,
    BLOCK_R: tl.constexpr, BLOCK_DC: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """delta = diag(dO O^T) per query row: `_chunked_logits` with dO in place of q and O in
    place of k runs the same chunk loop and dots as its dP = dO v^T."""
    pid_bh, b, h = program_head(H)
    o_ptr = head_base(O, b, h, stride_o_b, stride_o_h)
    do_ptr = head_base(DO, b, h, stride_do_b, stride_do_h)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rows_ok = rows < LQ
    dp, _ = _chunked_logits(
        do_ptr, o_ptr, o_ptr, do_ptr, rows, rows_ok, rows, rows_ok,
        stride_do_l, stride_do_d, stride_o_l, stride_o_d, stride_o_l, stride_o_d, stride_do_l, stride_do_d,
        D, BLOCK_R, BLOCK_R, BLOCK_DC, DOT_PRECISION, WITH_DP=False,
    )
    delta = diagonal(dp, BLOCK_R)
    tl.store(DELTA + (pid_bh.to(tl.int64) * LQ + rows.to(tl.int64)), delta, mask=rows_ok)


@triton.jit(do_not_specialize=["M", "N", "CHUNK", "SPLITS"])
def _bilateral_wide_bwd_kernel(
    Q, DO,  # [B, H, Lq, D] each, any strides: queries and output gradients
    K, V,  # [B, H, Lk, D] each, any strides: keys and values
    LSE,  # [B * H, Lq] float64 from the statistics pass (natural log, -inf: no kept key)
    DELTA,  # [B * H, Lq] fp32 from _bilateral_wide_delta_kernel
    KEY_MASK,  # [B, Lk] bool (read only with HAS_MASK)
    PAIR_MASK,  # [B, Lq, Lk] bool (read only with HAS_PAIR_MASK)
    D_IMAGE_A, D_IMAGE_B,  # [B, H, N, D] contiguous, input dtype: dk_x, dv_x (s) or dq_x, unused (x)
    PART_A, PART_B,  # [B * H, SPLITS, M, D] fp32 partials: dq_s, unused (s) or dk_s, dv_s (x)
    stride_q_b, stride_q_h, stride_q_l, stride_q_d,
    stride_do_b, stride_do_h, stride_do_l, stride_do_d,
    stride_k_b, stride_k_h, stride_k_l, stride_k_d,
    stride_v_b, stride_v_h, stride_v_l, stride_v_d,
    stride_mask_b, stride_mask_l,
    stride_pm_b, stride_pm_q, stride_pm_k,
    H, M, N, D, CHUNK, SPLITS,
    sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
    QUERIES_SPATIAL: tl.constexpr,  # True: direction s (Lq = M, Lk = N); False: direction x
    HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_PAIR_MASK: tl.constexpr = False,
):
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_DC >= 16)
    pid_bh, b, h = program_head(H)
    split = tl.program_id(1)
    q_ptr = head_base(Q, b, h, stride_q_b, stride_q_h)
    do_ptr = head_base(DO, b, h, stride_do_b, stride_do_h)
    k_ptr = head_base(K, b, h, stride_k_b, stride_k_h)
    v_ptr = head_base(V, b, h, stride_v_b, stride_v_h)
    if QUERIES_SPATIAL:
        n_queries = M
    else:
        n_queries = N
    lse_ptr = LSE + pid_bh.to(tl.int64) * n_queries
    delta_ptr = DELTA + pid_bh.to(tl.int64) * n_queries
    part_base = (pid_bh.to(tl.int64) * SPLITS + split) * M * D
    dt = Q.dtype.element_ty
    # -- this program's column chunk of the gradients --
    offs_c = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    c_ok = offs_c < D
    n_start, n_end = split_range(split, SPLITS, CHUNK, N)

    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        not_first = n0 > n_start  # the first tile stores the partials, later tiles add
        if QUERIES_SPATIAL:
            keep_n = key_keep(KEY_MASK, b, offs_n, n_ok, stride_mask_b, stride_mask_l, HAS_MASK)
            k_img = load_rows(k_ptr, offs_n, offs_c, stride_k_l, stride_k_d, n_ok, c_ok)
        else:
            lse_hi_n, lse_lo_n = load_lse(lse_ptr, offs_n, n_ok)
            delta_n = tl.load(delta_ptr + offs_n.to(tl.int64), mask=n_ok, other=0.0)
            q_img = load_rows(q_ptr, offs_n, offs_c, stride_q_l, stride_q_d, n_ok, c_ok)
            do_img = load_rows(do_ptr, offs_n, offs_c, stride_do_l, stride_do_d, n_ok, c_ok)
        grad_a = tl.zeros([BLOCK_N, BLOCK_DC], dtype=tl.float32)
        grad_b = tl.zeros([BLOCK_N, BLOCK_DC], dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            part_offsets = part_base + offs_m.to(tl.int64)[:, None] * D + offs_c[None, :]
            part_ok = m_ok[:, None] & c_ok[None, :]
            if QUERIES_SPATIAL:
                # -- direction s: spatial queries [BLOCK_M] over this tile of image keys --
                s, dp = _chunked_logits(
                    q_ptr, k_ptr, v_ptr, do_ptr, offs_m, m_ok, offs_n, keep_n,
                    stride_q_l, stride_q_d, stride_k_l, stride_k_d, stride_v_l, stride_v_d, stride_do_l, stride_do_d,
                    D, BLOCK_M, BLOCK_N, BLOCK_DC, DOT_PRECISION,
                )
                lse_hi_m, lse_lo_m = load_lse(lse_ptr, offs_m, m_ok)
                delta_m = tl.load(delta_ptr + offs_m.to(tl.int64), mask=m_ok, other=0.0)
                keep_mn = query_key_keep(keep_n, PAIR_MASK, b, offs_m, m_ok, offs_n,
                                         stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                p, ds = _probs_and_dscores(s, dp, keep_mn, lse_hi_m, lse_lo_m, delta_m, sm_scale)
                q_sp = load_rows(q_ptr, offs_m, offs_c, stride_q_l, stride_q_d, m_ok, c_ok)
                do_sp = load_rows(do_ptr, offs_m, offs_c, stride_do_l, stride_do_d, m_ok, c_ok)
                grad_a += dot(round_to(tl.trans(ds), dt), q_sp, DOT_PRECISION)  # dk_x
                grad_b += dot(round_to(tl.trans(p), dt), do_sp, DOT_PRECISION)  # dv_x
                dq_sp = dot(round_to(ds, dt), k_img, DOT_PRECISION)
                old = tl.load(PART_A + part_offsets, mask=part_ok & not_first, other=0.0)
                tl.store(PART_A + part_offsets, old + dq_sp, mask=part_ok)
            else:
                # -- direction x: this tile of image queries over spatial keys [BLOCK_M] --
                keep_m = key_keep(KEY_MASK, b, offs_m, m_ok, stride_mask_b, stride_mask_l, HAS_MASK)
                s, dp = _chunked_logits(
                    q_ptr, k_ptr, v_ptr, do_ptr, offs_n, n_ok, offs_m, keep_m,
                    stride_q_l, stride_q_d, stride_k_l, stride_k_d, stride_v_l, stride_v_d, stride_do_l, stride_do_d,
                    D, BLOCK_N, BLOCK_M, BLOCK_DC, DOT_PRECISION,
                )
                keep_nm = query_key_keep(keep_m, PAIR_MASK, b, offs_n, n_ok, offs_m,
                                         stride_pm_b, stride_pm_q, stride_pm_k, HAS_PAIR_MASK)
                p, ds = _probs_and_dscores(s, dp, keep_nm, lse_hi_n, lse_lo_n, delta_n, sm_scale)
                k_sp = load_rows(k_ptr, offs_m, offs_c, stride_k_l, stride_k_d, m_ok, c_ok)
                grad_a += dot(round_to(ds, dt), k_sp, DOT_PRECISION)  # dq_x
                dk_sp = dot(round_to(tl.trans(ds), dt), q_img, DOT_PRECISION)
                dv_sp = dot(round_to(tl.trans(p), dt), do_img, DOT_PRECISION)
                old = tl.load(PART_A + part_offsets, mask=part_ok & not_first, other=0.0)
                tl.store(PART_A + part_offsets, old + dk_sp, mask=part_ok)
                old = tl.load(PART_B + part_offsets, mask=part_ok & not_first, other=0.0)
                tl.store(PART_B + part_offsets, old + dv_sp, mask=part_ok)

        # -- the image-side gradients of this tile are complete --
        out_offsets = (pid_bh.to(tl.int64) * N + offs_n)[:, None] * D + offs_c[None, :]
        out_ok = n_ok[:, None] & c_ok[None, :]
        tl.store(D_IMAGE_A + out_offsets, round_to(grad_a, D_IMAGE_A.dtype.element_ty), mask=out_ok)
        if QUERIES_SPATIAL:
            tl.store(D_IMAGE_B + out_offsets, round_to(grad_b, D_IMAGE_B.dtype.element_ty), mask=out_ok)


# ----------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------
def wide_head_bwd(do, q, k, v, o, scale, key_mask, queries_are_spatial, pair_mask=None):
    """Gradients (dq, dk, dv) of one direction, queries q over keys k, v, with the head dim
    split into column chunks (module docstring).

    queries_are_spatial=True (direction s): q, o, do [B, H, M, D]; k, v [B, H, N, D];
    key_mask bool [B, N] or None. False (direction x): q, o, do [B, H, N, D]; k, v
    [B, H, M, D]; key_mask bool [B, M] or None. pair_mask: bool [B, Lq, Lk] or None (cross
    attention's per-query mask). Any strides; the gradients come back
    contiguous in the inputs' dtype. The forward's LSE is not needed: it is recomputed
    from this backward's own logits (module docstring).

        dq_s, dk_x, dv_x = wide_head_bwd(do_s, q_s, k_x, v_x, o_s, scale, image_mask, True)
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    M, N = (Lq, Lk) if queries_are_spatial else (Lk, Lq)
    device, dtype = q.device, q.dtype
    cfg = wide_config(block_d_for(D), q.element_size(), queries_are_spatial)
    n_sm = sm_count(device)
    precision = dot_precision(dtype)
    f32 = torch.float32
    # the query and key blocks of the gradient kernel, which the other passes repeat
    block_q, block_k = (cfg.BLOCK_M, cfg.BLOCK_N) if queries_are_spatial else (cfg.BLOCK_N, cfg.BLOCK_M)
    q_blocks = cdiv(Lq, block_q)
    key_mask, stride_mask_b, stride_mask_l = mask_args(key_mask, q)
    has_mask = key_mask is not q
    pair_mask, *pair_strides = pair_mask_args(pair_mask, q)
    has_pair_mask = pair_mask is not q

    # -- softmax statistics from the chunked logits: per-split partials, merged in order --
    if queries_are_spatial:
        lse_splits, lse_chunk = split_plan(n_sm, B * H * q_blocks, N)
    else:
        lse_splits, lse_chunk = 1, M
    part_max = torch.empty((B * H, lse_splits, Lq), device=device, dtype=f32)
    part_sum = torch.empty((B * H, lse_splits, Lq), device=device, dtype=f32)
    delta = torch.empty((B * H, Lq), device=device, dtype=f32)
    with device_guard(device):
        launch(_bilateral_wide_lse_kernel, (B * H, lse_splits, q_blocks),
            q, k, key_mask, pair_mask, part_max, part_sum, *q.stride(), *k.stride(), stride_mask_b, stride_mask_l,
            *pair_strides, H, Lq, Lk, D, lse_chunk, lse_splits, scale,
            BLOCK_R=block_q, BLOCK_C=block_k, BLOCK_DC=cfg.BLOCK_DC, HAS_MASK=has_mask,
            DOT_PRECISION=precision, HAS_PAIR_MASK=has_pair_mask, num_warps=cfg.num_warps, num_stages=1,
        )
        launch(_bilateral_wide_delta_kernel, (B * H, q_blocks),
            o, do, delta, *o.stride(), *do.stride(), H, Lq, D,
            BLOCK_R=block_q, BLOCK_DC=cfg.BLOCK_DC, DOT_PRECISION=precision, num_warps=cfg.num_warps, num_stages=1,
        )
    # float64, as the forward's (an fp32 LSE is off by up to 5e-4 at |logits| ~ 1e4). A split
    # without kept keys has sum 0 and term -inf; a row with none anywhere gets lse = -inf.
    terms = part_max.double() + torch.log(part_sum.double())
    lse = torch.where(part_sum > 0, terms, float("-inf")).logsumexp(dim=1)

    # -- gradients, one column chunk per program --
    d_chunks = cdiv(D, cfg.BLOCK_DC)
    splits, chunk = split_plan(n_sm, B * H * d_chunks, N)
    image_a = torch.empty((B, H, N, D), device=device, dtype=dtype)
    part_a = torch.empty((B * H, splits, M, D), device=device, dtype=f32)
    if queries_are_spatial:
        image_b, part_b = torch.empty((B, H, N, D), device=device, dtype=dtype), part_a
    else:
        image_b, part_b = image_a, torch.empty((B * H, splits, M, D), device=device, dtype=f32)
    with device_guard(device):
        launch(_bilateral_wide_bwd_kernel, (B * H, splits, d_chunks),
            q, do, k, v, lse, delta, key_mask, pair_mask, image_a, image_b, part_a, part_b,
            *q.stride(), *do.stride(), *k.stride(), *v.stride(), stride_mask_b, stride_mask_l, *pair_strides,
            H, M, N, D, chunk, splits, scale,
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_DC=cfg.BLOCK_DC,
            QUERIES_SPATIAL=queries_are_spatial, HAS_MASK=has_mask,
            DOT_PRECISION=precision, HAS_PAIR_MASK=has_pair_mask, num_warps=cfg.num_warps, num_stages=1,
        )

    if queries_are_spatial:
        (dq,) = reduce_splits([part_a], (B, H, M, D), dtype)
        return dq, image_a, image_b
    dk, dv = reduce_splits([part_a, part_b], (B, H, M, D), dtype)
    return image_a, dk, dv
