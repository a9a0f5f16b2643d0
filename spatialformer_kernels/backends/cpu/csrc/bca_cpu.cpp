// Fused CPU kernels for bilateral and cross attention (docs/design.md section 1).
//
// Algorithm. Every kernel streams the long token axis in tiles of kTile = 64 tokens (kTileFwdX
// = 16 in the bilateral forward's direction x). Each tile is read once through its strides into
// small fp32 (fp64 for float64 inputs) buffers (this is where strides and bf16/fp16 are
// handled, so callers never copy; fp32 rows with unit stride along D are used in place), and
// register-blocked micro-GEMMs written with ATen's at::vec::Vectorized run on them. Logits are
// formed transposed (keys on rows, queries on columns) so the softmax max/sum per query are
// vertical vector ops:
//   - bilateral forward: one pass over image tokens, in work items of 256 (at least 4 * M, see
//     bilateral_min_split_len) to kSplitMaxN tokens; one worker runs both directions on an item, direction x over its tiles and then
//     direction s, so each image-token tensor is read once. Direction x (image queries over the
//     M spatial keys) is a complete softmax per tile, written straight away with its LSE.
//     Direction s (spatial queries over image keys) keeps an online-softmax state
//     (max, sum, acc) per item; the worker that finishes the last item of a (batch, head)
//     merges the partials in split order.
//   - bilateral backward: the same pass (direction x, then direction s, per item); dq_x, dk_x,
//     dv_x are row-local, dq_s, dk_s, dv_s are per-item partials summed in split order.
//   - backward delta (the rowsum(P * dP) of dS = P (dP - delta)): where a row's keys are all in
//     one tile (direction x) it is formed from P and dP as the reference's softmax backward
//     does; where they are split (direction s, cross attention) it is dO . O computed by the
//     same micro-GEMM as dP. Either way a one-hot softmax (|logits| ~ 1e4) cancels exactly.
//   - cross attention: items are (batch*head, query split, key split); key splits produce
//     softmax partials (forward) or dq partials (backward), query splits dk/dv partials.
// Determinism: split boundaries depend only on the shapes (never on the thread count) and
// partials are reduced in a fixed order, so results are bitwise identical for any
// torch.set_num_threads and across runs.
// Masks: a masked key gets logit -inf. A row with no kept key gets o = 0, lse = -inf and
// zero gradients. Offsets are int64.
// Per-query masks (cross attention's attn_mask, bool [B, Lq, Lk], any strides, the same for
// every head; a key takes part for a query where key_mask and attn_mask both keep it): never
// copied or expanded. Per (query block, key tile) build_block_keep reads the block's flags
// from the mask's own bytes (pointing into it where a query's L flags are consecutive bytes
// there; a stride-0 query axis shares one row) and sorts the tile into one of three paths:
//   - no query of the block keeps a key of the tile: skipped. Exact for the online softmax
//     (an unchanged max rescales by exactly 1 and the sum adds 0) and in the backward (the
//     tile's P and dS are 0).
//   - every query keeps every key: the unmasked column form above, bit for bit.
//   - otherwise the row form (attend_tile_rows, attend_tile_rows_bwd): the block's active
//     queries (those keeping at least one key of the tile) are gathered into dense rows,
//     logits q k^T are formed with the queries on rows against the tile's k^T (packed per
//     tile), each row's flags applied along it as bytes, and both GEMMs run over the active
//     queries only. Blob-shaped masks (Mask2Former's masked cross attention: each query its
//     own ~30% region of the feature map) leave no tile of a 64-query block empty but drop
//     each query from 30-40% of the tiles, which the per-query gathering turns into skipped
//     work where a per-block test would skip nothing. The state (m, l, acc per query) is shared with the column form.
//   Extra memory: the [kQueryBlock, kTile] flags and row-form operands per worker.

// Pick the widest vector ISA the compiler targets (the build uses -march=native), and give
// ATen's vector headers a namespace of our own so nothing clashes with libtorch's copies.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2
#endif
#define CPU_CAPABILITY sfk_native

// Only the ATen pieces the kernels use, and the op registry instead of pybind11: the first-use
// build compiles this file in about a third of the time torch/extension.h would take.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "bca_cpu_kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>


namespace sfk {

// ---------------------------------------------------------------------------------------
// Bilateral attention.
// ---------------------------------------------------------------------------------------
struct BilateralShape {
  int64_t B, H, M, N, D;
};

// keep[j] for the C image tokens of a tile; false when the tile has no masked token.
inline bool tile_keep(bool* keep, const MaskView& mask, int64_t bh, int64_t n0, int64_t C) {
  if (mask.ptr == nullptr) return false;
  bool any_masked = false;
  for (int64_t j = 0; j < C; ++j) {
    keep[j] = mask.keep(bh, n0 + j);
    any_masked |= !keep[j];
  }
  return any_masked;
}

// Image tokens per bilateral forward work item, from the shapes only (never the thread count):
// bilateral_min_split_len(M), doubled up to kSplitMaxN while that still leaves kTargetItems
// items. Every item ends by writing an (m, l, acc) partial of all M spatial queries for the
// merge, and at 256 tokens per item that fixed cost was about 3% of the forward at B = 8. The
// splits of a row are then evened out (whole tiles, as many splits), so no item is much longer
// than the others at the end of the run.
inline int64_t bilateral_fwd_split_len(int64_t BH, int64_t M, int64_t N) {
  int64_t len = bilateral_min_split_len(M);
  while (len < kSplitMaxN && BH * ceil_div(N, 2 * len) >= kTargetItems) len *= 2;
  if (N <= len) return len;
  return ceil_div(ceil_div(N, ceil_div(N, len)), kTile) * kTile;  // as many splits, as even as tiles allow
}

// A work item runs direction x over all its image tokens, then direction s over the same tokens
// (each reads its own image tensors: q_x, then k_x and v_x). Apart, each direction's buffers fit
// in L1 with its own tile size: direction x in tiles of kTileFwdX = 16 image queries (its logits,
// packed q_x and output rows stay in L1 beside k_s and v_s), direction s in tiles of kTile = 64
// image keys (a longer sum in its accumulator GEMM, whose C = acc_s is loaded and stored once
// per tile). At B = 8 this forward is about 5% faster than one loop doing both directions per
// 32-token tile (interleaved A/B runs, 2 threads).
template <typename acc_t>
void bilateral_fwd_impl(const BilateralShape& sh, const at::Tensor& q_s, const at::Tensor& k_s,
                        const at::Tensor& v_s, const at::Tensor& q_x, const at::Tensor& k_x,
                        const at::Tensor& v_x, double scale, const MaskView& mask, OutPtr o_s, OutPtr o_x,
                        double* lse_s, double* lse_x) {
  const int64_t BH = sh.B * sh.H, M = sh.M, N = sh.N, D = sh.D;
  const int64_t Dp = round_up_vec<acc_t>(D), Mp = round_up_vec<acc_t>(M), Tp = round_up_vec<acc_t>(kTileFwdX);
  const int64_t split_len = bilateral_fwd_split_len(BH, M, N), nsplit = ceil_div(N, split_len);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qs = view4(q_s), ks = view4(k_s), vs = view4(v_s);
  const auto qx = view4(q_x), kx = view4(k_x), vx = view4(v_x);
  // Direction-s partials per (bh, split): rows of (m, l, acc[Dp]). The worker that writes the
  // last split of a (batch, head) merges them (in split order), so no second parallel pass.
  // Not zeroed (every slot is written before it is read): zeroing 1.8 MB at B = 8 was a serial
  // step before the parallel region.
  std::unique_ptr<acc_t[]> part(new acc_t[BH * nsplit * M * (Dp + 2)]);
  std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[BH]);
  for (int64_t bh = 0; bh < BH; ++bh) splits_done[bh].store(0);

  parallel_items(BH * nsplit, [&](const auto& next_item) {
    // spatial side of one (batch, head): q_s^T (scaled), k_s, v_s
    std::vector<acc_t> qt_sp(D * Mp), k_sp(M * Dp), v_sp(M * Dp);
    // direction x, one tile of image queries: q_x^T (scaled), logits, output rows, statistics
    std::vector<acc_t> qt_t(D * Tp), s_x(M * Tp), o_t(kTileFwdX * Dp), inv_l(Tp), row_max(Tp), log_sum(Tp);
    // direction s, one tile of image keys: k_x, v_x rows (when not read in place), logits, mask
    std::vector<acc_t> k_t(kTile * Dp), v_t(kTile * Dp), s_s(kTile * Mp);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> shift(Mp), m_s(Mp), l_s(Mp), acc_s(M * Dp), merged(Dp);
    int64_t packed_bh = -1;
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / nsplit, sp = item % nsplit;
      if (bh != packed_bh) {
        pack_transposed(qt_sp.data(), Mp, Mp, qs, bh, 0, M, D, sc);
        pack_rows(k_sp.data(), Dp, ks, bh, 0, M, D, acc_t(1));
        pack_rows(v_sp.data(), Dp, vs, bh, 0, M, D, acc_t(1));
        packed_bh = bh;
      }
      const int64_t n_begin = sp * split_len, n_end = std::min(N, n_begin + split_len);
      // -- direction x: image queries over all M spatial keys, complete per tile --
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTileFwdX) {
        const int64_t C = std::min(kTileFwdX, n_end - n0), Cp = round_up_vec<acc_t>(C);
        pack_transposed(qt_t.data(), Cp, Cp, qx, bh, n0, C, D, sc);
        if (n0 + kTileFwdX < n_end)  // the next tile's q_x, which the next pack_transposed reads first
          prefetch_rows(qx, bh, n0 + kTileFwdX, std::min(kTileFwdX, n_end - n0 - kTileFwdX), D);
        attend_full_cols(C, Cp, M, D, Dp, k_sp.data(), qt_t.data(), v_sp.data(), s_x.data(), o_t.data(),
                         inv_l.data(), row_max.data(), log_sum.data());
        store_rows_stream(o_x.at((bh * N + n0) * D), o_t.data(), Dp, C, D, inv_l.data(), acc_t(1));
        for (int64_t r = 0; r < C; ++r)
          lse_x[bh * N + n0 + r] = static_cast<double>(row_max[r]) + static_cast<double>(log_sum[r]);
      }
      // -- direction s: spatial queries, online softmax over this item's image keys --
      std::fill(m_s.begin(), m_s.end(), neg_inf<acc_t>());
      std::fill(l_s.begin(), l_s.end(), acc_t(0));
      std::fill(acc_s.begin(), acc_s.end(), acc_t(0));
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
        const int64_t C = std::min(kTile, n_end - n0);
        const acc_t* k_rows = direct_rows<acc_t>(kx, bh, n0, D, Dp);
        const acc_t* v_rows = direct_rows<acc_t>(vx, bh, n0, D, Dp);
        if (!k_rows) pack_rows(k_t.data(), Dp, kx, bh, n0, C, D, acc_t(1));
        if (v_rows)
          prefetch_rows(vx, bh, n0, C, D);  // read in place by the tile's last GEMM
        else
          pack_rows(v_t.data(), Dp, vx, bh, n0, C, D, acc_t(1));
        const bool masked = tile_keep(keep.get(), mask, bh, n0, C);
        attend_tile_cols(C, M, Mp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kx.stride_l : Dp, qt_sp.data(),
                         v_rows ? v_rows : v_t.data(), v_rows ? vx.stride_l : Dp, masked ? keep.get() : nullptr,
                         s_s.data(), shift.data(), m_s.data(), l_s.data(), acc_s.data());
      }
      acc_t* p = part.get() + (bh * nsplit + sp) * M * (Dp + 2);
      for (int64_t r = 0; r < M; ++r) {
        p[r * (Dp + 2)] = m_s[r];
        p[r * (Dp + 2) + 1] = l_s[r];
        std::copy(acc_s.begin() + r * Dp, acc_s.begin() + (r + 1) * Dp, p + r * (Dp + 2) + 2);
      }
      if (splits_done[bh].fetch_add(1, std::memory_order_acq_rel) == nsplit - 1)
        combine_rows(part.get(), nsplit, M, D, Dp, o_s, lse_s, bh * M, (bh + 1) * M, merged.data());
    }
  });
  if (nsplit == 0) combine_partials(part.get(), BH, nsplit, M, D, Dp, o_s, lse_s);  // N = 0: o_s = 0
}

template <typename acc_t>
void bilateral_bwd_impl(const BilateralShape& sh, const at::Tensor& do_s, const at::Tensor& do_x,
                        const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& v_s, const at::Tensor& q_x,
                        const at::Tensor& k_x, const at::Tensor& v_x, const at::Tensor& o_s, const at::Tensor& lse_s,
                        const at::Tensor& lse_x, double scale, const MaskView& mask,
                        OutPtr dq_s, OutPtr dk_s, OutPtr dv_s, OutPtr dq_x, OutPtr dk_x, OutPtr dv_x) {
  const int64_t BH = sh.B * sh.H, M = sh.M, N = sh.N, D = sh.D;
  const int64_t Dp = round_up_vec<acc_t>(D), Mp = round_up_vec<acc_t>(M), Tp = round_up_vec<acc_t>(kTile);
  const int64_t split_len = bilateral_min_split_len(M), nsplit = ceil_div(N, split_len);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qs = view4(q_s), ks = view4(k_s), vs = view4(v_s);
  const auto qx = view4(q_x), kx = view4(k_x), vx = view4(v_x);
  const auto dos = view4(do_s), dox = view4(do_x);
  const acc_t* no_rows = nullptr;  // one multiplier for every row
  const auto os = view4(o_s);  // (o_x is not read: direction x forms delta from P and dP)
  const auto ls = view3<double>(lse_s), lx = view3<double>(lse_x);
  // Per item: dq_s, dk_s, dv_s partials [M, Dp] each; the worker that writes the last split
  // of a (batch, head) sums them in split order.
  std::vector<acc_t> part(BH * nsplit * 3 * M * Dp);
  std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[BH]);
  for (int64_t bh = 0; bh < BH; ++bh) splits_done[bh].store(0);
  const auto reduce_spatial = [&](int64_t bh, acc_t* sum) {
    std::fill(sum, sum + 3 * M * Dp, acc_t(0));
    for (int64_t sp = 0; sp < nsplit; ++sp)
      axpy_row(sum, part.data() + (bh * nsplit + sp) * 3 * M * Dp, 3 * M * Dp, acc_t(1));
    store_rows(dq_s.at(bh * M * D), sum, Dp, M, D, sc);
    store_rows(dk_s.at(bh * M * D), sum + M * Dp, Dp, M, D, acc_t(1));
    store_rows(dv_s.at(bh * M * D), sum + 2 * M * Dp, Dp, M, D, acc_t(1));
  };

  parallel_items(BH * nsplit, [&](const auto& next_item) {
    // spatial side of one (batch, head)
    std::vector<acc_t> q_sp(M * Dp), qt_sp(D * Mp), k_sp(M * Dp), kt_sp(D * Mp), vt_sp(D * Mp), do_sp(M * Dp),
        dot_sp(D * Mp), o_sp(M * Dp), lse_hi_sp(Mp), lse_lo_sp(Mp), delta_sp(Mp), bias_sp(Mp), delta_scratch(Tp);
    // one tile of image tokens
    std::vector<acc_t> q_t(kTile * Dp), k_t(kTile * Dp), v_t(kTile * Dp), do_t(kTile * Dp), lse_hi_t(kTile),
        lse_lo_t(kTile);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> p_x(kTile * Mp), ds_x(kTile * Mp), dq_t(kTile * Dp), dk_t(kTile * Dp), dv_t(kTile * Dp);
    std::vector<acc_t> p_s(kTile * Mp), ds_s(kTile * Mp), sum;
    for (int64_t j = 0; j < Mp; ++j) bias_sp[j] = j < M ? acc_t(0) : neg_inf<acc_t>();
    int64_t packed_bh = -1;
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / nsplit, sp = item % nsplit;
      if (bh != packed_bh) {
        pack_rows(q_sp.data(), Dp, qs, bh, 0, M, D, sc);
        pack_transposed(qt_sp.data(), Mp, Mp, qs, bh, 0, M, D, sc);
        pack_rows(k_sp.data(), Dp, ks, bh, 0, M, D, acc_t(1));
        pack_transposed(kt_sp.data(), Mp, Mp, ks, bh, 0, M, D, acc_t(1));
        pack_transposed(vt_sp.data(), Mp, Mp, vs, bh, 0, M, D, acc_t(1));
        pack_rows(do_sp.data(), Dp, dos, bh, 0, M, D, acc_t(1));
        pack_transposed(dot_sp.data(), Mp, Mp, dos, bh, 0, M, D, acc_t(1));
        pack_rows(o_sp.data(), Dp, os, bh, 0, M, D, acc_t(1));
        column_delta(M, Mp, D, o_sp.data(), Dp, dot_sp.data(), delta_scratch.data(), delta_sp.data());
        for (int64_t r = 0; r < Mp; ++r)  // padding columns: as a row without kept keys
          split_lse(r < M ? ls.at(bh, r) : neg_inf<double>(), lse_hi_sp[r], lse_lo_sp[r]);
        packed_bh = bh;
      }
      acc_t* dq_sp = part.data() + (bh * nsplit + sp) * 3 * M * Dp;
      acc_t* dk_sp = dq_sp + M * Dp;
      acc_t* dv_sp = dk_sp + M * Dp;
      std::fill(dq_sp, dq_sp + 3 * M * Dp, acc_t(0));
      const int64_t n_begin = sp * split_len, n_end = std::min(N, n_begin + split_len);
      // As in the forward, direction x runs over the item's tiles first, then direction s over
      // the same tiles: each reads its own image tensors (q_x, do_x, lse_x; then k_x, v_x), and
      // apart their buffers stay in cache better (the backward 2.5-4% faster at B = 8).
      // -- direction x (row form, all M spatial keys at once): dq_x row-local, dk_s / dv_s
      // into this item's partials --
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
        const int64_t C = std::min(kTile, n_end - n0);
        pack_rows(q_t.data(), Dp, qx, bh, n0, C, D, sc);
        pack_rows(do_t.data(), Dp, dox, bh, n0, C, D, acc_t(1));
        for (int64_t r = 0; r < C; ++r) split_lse(lx.at(bh, n0 + r), lse_hi_t[r], lse_lo_t[r]);
        std::fill(dq_t.begin(), dq_t.begin() + C * Dp, acc_t(0));
        attend_tile_bwd(C, D, Dp, q_t.data(), do_t.data(), lse_hi_t.data(), lse_lo_t.data(), k_sp.data(), Dp,
                        kt_sp.data(), Mp, vt_sp.data(), Mp, bias_sp.data(), M, Mp, p_x.data(), ds_x.data(), dq_t.data(),
                        dk_sp, dv_sp);
        store_rows_stream(dq_x.at((bh * N + n0) * D), dq_t.data(), Dp, C, D, no_rows, sc);
      }
      // -- direction s (column form): dk_x / dv_x row-local, dq_s into this item's partial --
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kTile) {
        const int64_t C = std::min(kTile, n_end - n0);
        const acc_t* k_rows = direct_rows<acc_t>(kx, bh, n0, D, Dp);
        const acc_t* v_rows = direct_rows<acc_t>(vx, bh, n0, D, Dp);
        if (!k_rows) pack_rows(k_t.data(), Dp, kx, bh, n0, C, D, acc_t(1));
        if (!v_rows) pack_rows(v_t.data(), Dp, vx, bh, n0, C, D, acc_t(1));
        const bool masked = tile_keep(keep.get(), mask, bh, n0, C);
        attend_tile_cols_bwd<false>(C, M, Mp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kx.stride_l : Dp,
                                    v_rows ? v_rows : v_t.data(), v_rows ? vx.stride_l : Dp, qt_sp.data(),
                                    q_sp.data(), dot_sp.data(), do_sp.data(), lse_hi_sp.data(), lse_lo_sp.data(),
                                    delta_sp.data(), masked ? keep.get() : nullptr, p_s.data(), ds_s.data(), dq_sp,
                                    dk_t.data(), dv_t.data());
        store_rows_stream(dk_x.at((bh * N + n0) * D), dk_t.data(), Dp, C, D, no_rows, acc_t(1));
        store_rows_stream(dv_x.at((bh * N + n0) * D), dv_t.data(), Dp, C, D, no_rows, acc_t(1));
      }
      // -- ordered reduction of the spatial-side partials, once all splits of bh are in --
      if (splits_done[bh].fetch_add(1, std::memory_order_acq_rel) == nsplit - 1) {
        if (sum.empty()) sum.resize(3 * M * Dp);
        reduce_spatial(bh, sum.data());
      }
    }
  });
  if (nsplit == 0) {  // N = 0: no image token, so the spatial gradients are 0
    std::vector<acc_t> sum(3 * M * Dp);
    for (int64_t bh = 0; bh < BH; ++bh) reduce_spatial(bh, sum.data());
  }
}

// ---------------------------------------------------------------------------------------
// Cross attention.
// ---------------------------------------------------------------------------------------

// Work split for cross attention, from the shapes only (never the thread count): query
// splits are whole blocks of kQueryBlock rows, key splits whole tiles of kTile keys. Split
// queries first (free in the forward), then keys, until there are kTargetItems items.
struct CrossPlan {
  int64_t q_len, nqs, k_len, nks;
};

inline CrossPlan plan_cross(int64_t BH, int64_t Lq, int64_t Lk) {
  const int64_t nqb = std::max<int64_t>(1, ceil_div(Lq, kQueryBlock));
  const int64_t nkt = std::max<int64_t>(1, ceil_div(Lk, kTile));
  int64_t nqs = 1, nks = 1;
  while (BH * nqs * nks < kTargetItems) {
    if (ceil_div(nqb, nqs) >= 2)
      nqs *= 2;
    else if (ceil_div(nkt, nks) >= 8)  // keep at least 4 tiles (256 keys) per key split
      nks *= 2;
    else
      break;
  }
  const int64_t q_blocks = ceil_div(nqb, nqs), k_tiles = ceil_div(nkt, nks);
  return {q_blocks * kQueryBlock, ceil_div(nqb, q_blocks), k_tiles * kTile, ceil_div(nkt, k_tiles)};
}

// The backward's split, also from the shapes only. Unlike the forward's, neither direction is
// free: a query split leaves dk and dv partials (2 Lk rows per split) to sum, a key split dq
// partials (Lq rows). Where Lq < 2 Lk keys are split first: at Lq = 100, Lk = 4096 (B*H = 16)
// the query-first plan's dk/dv partials were 33 MB per call, and allocating, zeroing and
// summing them made the backward about 4.5x the forward.
inline CrossPlan plan_cross_bwd(int64_t BH, int64_t Lq, int64_t Lk) {
  if (Lq >= 2 * Lk) return plan_cross(BH, Lq, Lk);
  const int64_t nqb = std::max<int64_t>(1, ceil_div(Lq, kQueryBlock));
  const int64_t nkt = std::max<int64_t>(1, ceil_div(Lk, kTile));
  int64_t nqs = 1, nks = 1;
  while (BH * nqs * nks < kTargetItems) {
    if (ceil_div(nkt, nks) >= 8)  // at least 4 tiles per key split, as plan_cross
      nks *= 2;
    else if (ceil_div(nqb, nqs) >= 2)
      nqs *= 2;
    else
      break;
  }
  const int64_t q_blocks = ceil_div(nqb, nqs), k_tiles = ceil_div(nkt, nks);
  return {q_blocks * kQueryBlock, ceil_div(nqb, q_blocks), k_tiles * kTile, ceil_div(nkt, k_tiles)};
}

template <typename acc_t>
void cross_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                    const MaskView& mask, const PairMaskView& attn, OutPtr out, double* lse) {
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t Dp = round_up_vec<acc_t>(D), Tp = round_up_vec<acc_t>(kTile);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qv = view4(q), kv = view4(k), vv = view4(v);
  const CrossPlan plan = plan_cross(BH, Lq, Lk);
  std::vector<acc_t> part(plan.nks > 1 ? BH * plan.nks * Lq * (Dp + 2) : 0);

  // Column form (as direction s of the bilateral kernel): per query block q^T is packed once,
  // key tiles are read as rows (in place for fp32), softmax statistics per query column.
  // With an attn_mask, a tile that some query of the block keeps only in part takes the row
  // form over the block's active queries instead (attend_tile_rows; see the header comment).
  const int64_t Qp = round_up_vec<acc_t>(kQueryBlock);
  parallel_items(BH * plan.nqs * plan.nks, [&](const auto& next_item) {
    std::vector<acc_t> qt_b(D * Qp), k_t(kTile * Dp), v_t(kTile * Dp), s(kTile * Qp), shift(Qp);
    std::vector<acc_t> m(Qp), l(Qp), acc(kQueryBlock * Dp);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    // the row form's operands: the block's q rows, the tile's k^T, the gathered active queries
    const int64_t row_buffers = attn.ptr ? 1 : 0;
    std::vector<acc_t> q_b(row_buffers * kQueryBlock * Dp), kt_t(row_buffers * D * Tp),
        q_a(row_buffers * kQueryBlock * Dp), o_a(row_buffers * kQueryBlock * Dp), s_rows(row_buffers * kQueryBlock * Tp),
        stat(row_buffers * 2 * Qp);
    BlockKeep block_keep;
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / (plan.nqs * plan.nks);
      const int64_t qs = (item / plan.nks) % plan.nqs, ks = item % plan.nks;
      const int64_t q_end = std::min(Lq, (qs + 1) * plan.q_len), k_end = std::min(Lk, (ks + 1) * plan.k_len);
      for (int64_t q0 = qs * plan.q_len; q0 < q_end; q0 += kQueryBlock) {
        const int64_t R = std::min(kQueryBlock, q_end - q0), Rp = round_up_vec<acc_t>(R);
        pack_transposed(qt_b.data(), Rp, Rp, qv, bh, q0, R, D, sc);
        if (attn.ptr) pack_rows(q_b.data(), Dp, qv, bh, q0, R, D, sc);
        std::fill(m.begin(), m.end(), neg_inf<acc_t>());
        std::fill(l.begin(), l.end(), acc_t(0));
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k0 = ks * plan.k_len; k0 < k_end; k0 += kTile) {
          const int64_t L = std::min(kTile, k_end - k0);
          const acc_t* v_rows = direct_rows<acc_t>(vv, bh, k0, D, Dp);
          if (attn.ptr) {
            build_block_keep(block_keep, attn, mask, bh, q0, R, k0, L);
            if (block_keep.active.empty()) continue;  // no query keeps a key here: no state changes
            if (!block_keep.all_full) {
              const int64_t Lp = round_up_vec<acc_t>(L);
              pack_transposed(kt_t.data(), Lp, Lp, kv, bh, k0, L, D, acc_t(1));
              if (!v_rows) pack_rows(v_t.data(), Dp, vv, bh, k0, L, D, acc_t(1));
              attend_tile_rows(L, Lp, D, Dp, q_b.data(), kt_t.data(), v_rows ? v_rows : v_t.data(),
                               v_rows ? vv.stride_l : Dp, block_keep, q_a.data(), o_a.data(), s_rows.data(),
                               stat.data(), m.data(), l.data(), acc.data());
              continue;
            }
            // every query keeps every key of the tile (key_mask included): the unmasked path
          }
          const acc_t* k_rows = direct_rows<acc_t>(kv, bh, k0, D, Dp);
          if (!k_rows) pack_rows(k_t.data(), Dp, kv, bh, k0, L, D, acc_t(1));
          if (!v_rows) pack_rows(v_t.data(), Dp, vv, bh, k0, L, D, acc_t(1));
          const bool masked = !attn.ptr && tile_keep(keep.get(), mask, bh, k0, L);
          attend_tile_cols(L, R, Rp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kv.stride_l : Dp, qt_b.data(),
                           v_rows ? v_rows : v_t.data(), v_rows ? vv.stride_l : Dp, masked ? keep.get() : nullptr,
                           s.data(), shift.data(), m.data(), l.data(), acc.data());
        }
        if (plan.nks == 1) {
          finalize_rows(m.data(), l.data(), acc.data(), R, D, Dp, out.at((bh * Lq + q0) * D), lse + bh * Lq + q0);
        } else {
          acc_t* p = part.data() + ((bh * plan.nks + ks) * Lq + q0) * (Dp + 2);
          for (int64_t r = 0; r < R; ++r) {
            p[r * (Dp + 2)] = m[r];
            p[r * (Dp + 2) + 1] = l[r];
            std::copy(acc.begin() + r * Dp, acc.begin() + (r + 1) * Dp, p + r * (Dp + 2) + 2);
          }
        }
      }
    }
  });
  if (plan.nks > 1) combine_partials(part.data(), BH, plan.nks, Lq, D, Dp, out, lse);
}

template <typename acc_t>
void cross_bwd_impl(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& o, const at::Tensor& lse_in, double scale, const MaskView& mask,
                    const PairMaskView& attn, OutPtr dq, OutPtr dk, OutPtr dv) {
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t Dp = round_up_vec<acc_t>(D), Tp = round_up_vec<acc_t>(kTile);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qv = view4(q), kv = view4(k), vv = view4(v);
  const auto dov = view4(d_o), ov = view4(o);
  const auto lv = view3<double>(lse_in);
  const CrossPlan plan = plan_cross_bwd(BH, Lq, Lk);
  // dq partials per key split [nks, BH, Lq, Dp]; dk/dv partials per query split [nqs, BH, Lk, 2, Dp].
  std::vector<acc_t> dq_part(plan.nks > 1 ? plan.nks * BH * Lq * Dp : 0);
  std::vector<acc_t> dkv_part(plan.nqs > 1 ? plan.nqs * BH * Lk * 2 * Dp : 0);

  const int64_t Qp = round_up_vec<acc_t>(kQueryBlock);
  parallel_items(BH * plan.nqs * plan.nks, [&](const auto& next_item) {
    // one query block: q (scaled) as rows and transposed, do as rows and transposed
    std::vector<acc_t> q_b(kQueryBlock * Dp), qt_b(D * Qp), do_b(kQueryBlock * Dp), dot_b(D * Qp),
        o_b(kQueryBlock * Dp), lse_hi(Qp), lse_lo(Qp), delta(Qp), delta_scratch(Qp), dq_b(kQueryBlock * Dp);
    // P and dS: [kTile, Qp] in the column form, [active queries, Tp] in the row form
    const int64_t p_size = std::max(kTile * Qp, kQueryBlock * Tp);
    std::vector<acc_t> k_t(kTile * Dp), v_t(kTile * Dp), p(p_size), ds(p_size);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> dk_loc(plan.k_len * Dp), dv_loc(plan.k_len * Dp);
    // the row form's operands (attn_mask): the tile's k^T and v^T, the gathered active queries
    const int64_t row_buffers = attn.ptr ? 1 : 0;
    std::vector<acc_t> kt_t(row_buffers * D * Tp), vt_t(row_buffers * D * Tp), q_a(row_buffers * kQueryBlock * Dp),
        do_a(row_buffers * kQueryBlock * Dp), dq_a(row_buffers * kQueryBlock * Dp);
    BlockKeep block_keep;
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / (plan.nqs * plan.nks);
      const int64_t qs = (item / plan.nks) % plan.nqs, ks = item % plan.nks;
      const int64_t q_end = std::min(Lq, (qs + 1) * plan.q_len);
      const int64_t k_begin = ks * plan.k_len, k_end = std::min(Lk, (ks + 1) * plan.k_len);
      std::fill(dk_loc.begin(), dk_loc.end(), acc_t(0));
      std::fill(dv_loc.begin(), dv_loc.end(), acc_t(0));
      for (int64_t q0 = qs * plan.q_len; q0 < q_end; q0 += kQueryBlock) {
        const int64_t R = std::min(kQueryBlock, q_end - q0), Rp = round_up_vec<acc_t>(R);
        pack_rows(q_b.data(), Dp, qv, bh, q0, R, D, sc);
        pack_transposed(qt_b.data(), Rp, Rp, qv, bh, q0, R, D, sc);
        pack_rows(do_b.data(), Dp, dov, bh, q0, R, D, acc_t(1));
        pack_transposed(dot_b.data(), Rp, Rp, dov, bh, q0, R, D, acc_t(1));
        pack_rows(o_b.data(), Dp, ov, bh, q0, R, D, acc_t(1));
        column_delta(R, Rp, D, o_b.data(), Dp, dot_b.data(), delta_scratch.data(), delta.data());
        for (int64_t r = 0; r < Rp; ++r)  // padding columns: as a row without kept keys
          split_lse(r < R ? lv.at(bh, q0 + r) : neg_inf<double>(), lse_hi[r], lse_lo[r]);
        std::fill(dq_b.begin(), dq_b.end(), acc_t(0));
        for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
          const int64_t L = std::min(kTile, k_end - k0);
          const acc_t* k_rows = direct_rows<acc_t>(kv, bh, k0, D, Dp);
          if (attn.ptr) {
            build_block_keep(block_keep, attn, mask, bh, q0, R, k0, L);
            if (block_keep.active.empty()) continue;  // no query keeps a key here: all gradients 0
            if (!block_keep.all_full) {
              const int64_t Lp = round_up_vec<acc_t>(L);
              if (!k_rows) pack_rows(k_t.data(), Dp, kv, bh, k0, L, D, acc_t(1));
              pack_transposed(kt_t.data(), Lp, Lp, kv, bh, k0, L, D, acc_t(1));
              pack_transposed(vt_t.data(), Lp, Lp, vv, bh, k0, L, D, acc_t(1));
              attend_tile_rows_bwd(L, Lp, D, Dp, q_b.data(), do_b.data(), lse_hi.data(), lse_lo.data(), delta.data(),
                                   k_rows ? k_rows : k_t.data(), k_rows ? kv.stride_l : Dp, kt_t.data(), vt_t.data(),
                                   block_keep, q_a.data(), do_a.data(), dq_a.data(), p.data(), ds.data(), dq_b.data(),
                                   dk_loc.data() + (k0 - k_begin) * Dp, dv_loc.data() + (k0 - k_begin) * Dp);
              continue;
            }
            // every query keeps every key of the tile (key_mask included): the unmasked path
          }
          const acc_t* v_rows = direct_rows<acc_t>(vv, bh, k0, D, Dp);
          if (!k_rows) pack_rows(k_t.data(), Dp, kv, bh, k0, L, D, acc_t(1));
          if (!v_rows) pack_rows(v_t.data(), Dp, vv, bh, k0, L, D, acc_t(1));
          const bool masked = !attn.ptr && tile_keep(keep.get(), mask, bh, k0, L);
          attend_tile_cols_bwd<true>(L, R, Rp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kv.stride_l : Dp,
                                     v_rows ? v_rows : v_t.data(), v_rows ? vv.stride_l : Dp, qt_b.data(), q_b.data(),
                                     dot_b.data(), do_b.data(), lse_hi.data(), lse_lo.data(), delta.data(),
                                     masked ? keep.get() : nullptr, p.data(), ds.data(), dq_b.data(),
                                     dk_loc.data() + (k0 - k_begin) * Dp, dv_loc.data() + (k0 - k_begin) * Dp);
        }
        if (plan.nks == 1)
          store_rows(dq.at((bh * Lq + q0) * D), dq_b.data(), Dp, R, D, sc);
        else
          std::copy(dq_b.begin(), dq_b.begin() + R * Dp, dq_part.begin() + ((ks * BH + bh) * Lq + q0) * Dp);
      }
      const int64_t nk = k_end - k_begin;
      if (plan.nqs == 1) {
        store_rows(dk.at((bh * Lk + k_begin) * D), dk_loc.data(), Dp, nk, D, acc_t(1));
        store_rows(dv.at((bh * Lk + k_begin) * D), dv_loc.data(), Dp, nk, D, acc_t(1));
      } else {
        acc_t* dst = dkv_part.data() + ((qs * BH + bh) * Lk + k_begin) * 2 * Dp;
        for (int64_t r = 0; r < nk; ++r) {
          std::copy(dk_loc.begin() + r * Dp, dk_loc.begin() + (r + 1) * Dp, dst + r * 2 * Dp);
          std::copy(dv_loc.begin() + r * Dp, dv_loc.begin() + (r + 1) * Dp, dst + r * 2 * Dp + Dp);
        }
      }
    }
  });
  // -- ordered reductions of the split partials --
  if (plan.nks > 1) {
    at::parallel_for(0, BH * Lq, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(Dp);
      for (int64_t row = begin; row < end; ++row) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t ks = 0; ks < plan.nks; ++ks)
          axpy_row(sum.data(), dq_part.data() + (ks * BH * Lq + row) * Dp, Dp, acc_t(1));
        store_rows(dq.at(row * D), sum.data(), Dp, 1, D, sc);
      }
    });
  }
  if (plan.nqs > 1) {
    at::parallel_for(0, BH * Lk, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(2 * Dp);
      for (int64_t row = begin; row < end; ++row) {
        std::fill(sum.begin(), sum.end(), acc_t(0));
        for (int64_t qs = 0; qs < plan.nqs; ++qs)
          axpy_row(sum.data(), dkv_part.data() + (qs * BH * Lk + row) * 2 * Dp, 2 * Dp, acc_t(1));
        store_rows(dk.at(row * D), sum.data(), Dp, 1, D, acc_t(1));
        store_rows(dv.at(row * D), sum.data() + Dp, Dp, 1, D, acc_t(1));
      }
    });
  }
}

// ---------------------------------------------------------------------------------------
// Entry points: kernel-level checks, then dtype dispatch. The public API validates first
// (spatialformer_kernels/validation.py); these checks guard direct calls.
// ---------------------------------------------------------------------------------------
void check_input(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, name, " must have rank 4 [B, H, L, D], got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " has dtype ", t.scalar_type(), " but the inputs are ",
              like.scalar_type());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              name, " has unsupported dtype ", t.scalar_type());
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

void check_lse(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kDouble, name, " must be a float64 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  check_shape(t, name, expected);
}

MaskView check_mask(const c10::optional<at::Tensor>& mask, const char* name, int64_t B, int64_t L, int64_t H) {
  MaskView view;
  view.heads = H;
  if (!mask.has_value()) return view;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), name, " must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, name, " must have dtype bool, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == L, name, " must have shape [", B, ", ", L, "], got ",
              m.sizes());
  view.ptr = m.data_ptr<bool>();
  view.stride_b = m.stride(0);
  view.stride_l = m.stride(1);
  return view;
}

// attn_mask: bool [B, Lq, Lk] with any strides (a broadcast view is read as it is, never copied).
PairMaskView check_attn_mask(const c10::optional<at::Tensor>& mask, int64_t B, int64_t Lq, int64_t Lk, int64_t H) {
  PairMaskView view;
  view.heads = H;
  if (!mask.has_value()) return view;
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.device().is_cpu(), "attn_mask must be a CPU tensor, got ", m.device());
  TORCH_CHECK(m.scalar_type() == at::kBool, "attn_mask must have dtype bool, got ", m.scalar_type());
  TORCH_CHECK(m.dim() == 3 && m.size(0) == B && m.size(1) == Lq && m.size(2) == Lk,
              "attn_mask must have shape [B, Lq, Lk] = [", B, ", ", Lq, ", ", Lk, "], got ", m.sizes());
  view.ptr = m.data_ptr<bool>();
  view.stride_b = m.stride(0);
  view.stride_q = m.stride(1);
  view.stride_k = m.stride(2);
  return view;
}

void check_scale(double scale) { TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale); }

BilateralShape check_bilateral(const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& v_s,
                               const at::Tensor& q_x, const at::Tensor& k_x, const at::Tensor& v_x) {
  check_input(q_s, "q_s", q_s);
  check_input(k_s, "k_s", q_s);
  check_input(v_s, "v_s", q_s);
  check_input(q_x, "q_x", q_s);
  check_input(k_x, "k_x", q_s);
  check_input(v_x, "v_x", q_s);
  BilateralShape sh{q_s.size(0), q_s.size(1), q_s.size(2), q_x.size(2), q_s.size(3)};
  TORCH_CHECK(sh.D >= 1, "head dim D must be >= 1, got ", sh.D);
  check_shape(k_s, "k_s", q_s.sizes());
  check_shape(v_s, "v_s", q_s.sizes());
  check_shape(q_x, "q_x", {sh.B, sh.H, sh.N, sh.D});
  check_shape(k_x, "k_x", q_x.sizes());
  check_shape(v_x, "v_x", q_x.sizes());
  return sh;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bilateral_fwd(
    const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& v_s, const at::Tensor& q_x,
    const at::Tensor& k_x, const at::Tensor& v_x, double scale, const c10::optional<at::Tensor>& image_mask) {
  const BilateralShape sh = check_bilateral(q_s, k_s, v_s, q_x, k_x, v_x);
  check_scale(scale);
  const MaskView mask = check_mask(image_mask, "image_mask", sh.B, sh.N, sh.H);
  auto o_s = at::empty({sh.B, sh.H, sh.M, sh.D}, q_s.options());
  auto o_x = at::empty({sh.B, sh.H, sh.N, sh.D}, q_s.options());
  auto lse_s = at::empty({sh.B, sh.H, sh.M}, q_s.options().dtype(at::kDouble));
  auto lse_x = at::empty({sh.B, sh.H, sh.N}, q_s.options().dtype(at::kDouble));
  if (q_s.scalar_type() == at::kDouble)
    bilateral_fwd_impl<double>(sh, q_s, k_s, v_s, q_x, k_x, v_x, scale, mask, out_ptr(o_s), out_ptr(o_x),
                                       lse_s.data_ptr<double>(), lse_x.data_ptr<double>());
  else
    bilateral_fwd_impl<float>(sh, q_s, k_s, v_s, q_x, k_x, v_x, scale, mask, out_ptr(o_s), out_ptr(o_x),
                                      lse_s.data_ptr<double>(), lse_x.data_ptr<double>());
  return {o_s, o_x, lse_s, lse_x};
}

std::vector<at::Tensor> bilateral_bwd(const at::Tensor& do_s, const at::Tensor& do_x, const at::Tensor& q_s,
                                      const at::Tensor& k_s, const at::Tensor& v_s, const at::Tensor& q_x,
                                      const at::Tensor& k_x, const at::Tensor& v_x, const at::Tensor& o_s,
                                      const at::Tensor& o_x, const at::Tensor& lse_s, const at::Tensor& lse_x,
                                      double scale, const c10::optional<at::Tensor>& image_mask) {
  const BilateralShape sh = check_bilateral(q_s, k_s, v_s, q_x, k_x, v_x);
  check_scale(scale);
  check_input(do_s, "do_s", q_s);
  check_input(o_s, "o_s", q_s);
  check_input(do_x, "do_x", q_s);
  check_input(o_x, "o_x", q_s);
  check_shape(do_s, "do_s", q_s.sizes());
  check_shape(o_s, "o_s", q_s.sizes());
  check_shape(do_x, "do_x", q_x.sizes());
  check_shape(o_x, "o_x", q_x.sizes());
  check_lse(lse_s, "lse_s", {sh.B, sh.H, sh.M});
  check_lse(lse_x, "lse_x", {sh.B, sh.H, sh.N});
  const MaskView mask = check_mask(image_mask, "image_mask", sh.B, sh.N, sh.H);
  std::vector<at::Tensor> grads;
  for (const at::Tensor* t : {&q_s, &k_s, &v_s, &q_x, &k_x, &v_x})
    grads.push_back(at::empty(t->sizes(), t->options().memory_format(at::MemoryFormat::Contiguous)));
  OutPtr g[6];
  for (int i = 0; i < 6; ++i) g[i] = out_ptr(grads[i]);
  if (q_s.scalar_type() == at::kDouble)
    bilateral_bwd_impl<double>(sh, do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, lse_s, lse_x, scale,
                                       mask, g[0], g[1], g[2], g[3], g[4], g[5]);
  else
    bilateral_bwd_impl<float>(sh, do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, lse_s, lse_x, scale,
                                      mask, g[0], g[1], g[2], g[3], g[4], g[5]);
  return grads;
}

void check_cross(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_input(q, "q", q);
  check_input(k, "k", q);
  check_input(v, "v", q);
  TORCH_CHECK(q.size(3) >= 1, "head dim D must be >= 1, got ", q.size(3));
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "k must have shape [B, H, Lk, D] matching q ", q.sizes(), ", got ", k.sizes());
  check_shape(v, "v", k.sizes());
}

std::tuple<at::Tensor, at::Tensor> cross_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                             double scale, const c10::optional<at::Tensor>& key_mask,
                                             const c10::optional<at::Tensor>& attn_mask) {
  check_cross(q, k, v);
  check_scale(scale);
  const MaskView mask = check_mask(key_mask, "key_mask", k.size(0), k.size(2), k.size(1));
  const PairMaskView attn = check_attn_mask(attn_mask, q.size(0), q.size(2), k.size(2), q.size(1));
  auto o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kDouble));
  if (q.scalar_type() == at::kDouble)
    cross_fwd_impl<double>(q, k, v, scale, mask, attn, out_ptr(o), lse.data_ptr<double>());
  else
    cross_fwd_impl<float>(q, k, v, scale, mask, attn, out_ptr(o), lse.data_ptr<double>());
  return {o, lse};
}

std::vector<at::Tensor> cross_bwd(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, double scale,
                                  const c10::optional<at::Tensor>& key_mask,
                                  const c10::optional<at::Tensor>& attn_mask) {
  check_cross(q, k, v);
  check_scale(scale);
  check_input(d_o, "do", q);
  check_input(o, "o", q);
  check_shape(d_o, "do", q.sizes());
  check_shape(o, "o", q.sizes());
  check_lse(lse, "lse", {q.size(0), q.size(1), q.size(2)});
  const MaskView mask = check_mask(key_mask, "key_mask", k.size(0), k.size(2), k.size(1));
  const PairMaskView attn = check_attn_mask(attn_mask, q.size(0), q.size(2), k.size(2), q.size(1));
  const auto contiguous = at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> grads{at::empty(q.sizes(), q.options().memory_format(contiguous)),
                                at::empty(k.sizes(), k.options().memory_format(contiguous)),
                                at::empty(v.sizes(), v.options().memory_format(contiguous))};
  if (q.scalar_type() == at::kDouble)
    cross_bwd_impl<double>(d_o, q, k, v, o, lse, scale, mask, attn, out_ptr(grads[0]), out_ptr(grads[1]),
                           out_ptr(grads[2]));
  else
    cross_bwd_impl<float>(d_o, q, k, v, o, lse, scale, mask, attn, out_ptr(grads[0]), out_ptr(grads[1]),
                          out_ptr(grads[2]));
  return grads;
}

// Which vector ISA this build uses (for the build log and the tests).
std::string vector_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

}  // namespace sfk

// Registered in a namespace of their own; the public ops (torch.ops.spatialformer.*) call
// these from spatialformer_kernels/backends/cpu/__init__.py. A build for another vector ISA (the
// tests load one per ISA the CPU runs) names its own namespace with -DSFK_OPS_NAMESPACE=...;
// the extra macro level expands that name before TORCH_LIBRARY pastes it.
#ifndef SFK_OPS_NAMESPACE
#define SFK_OPS_NAMESPACE spatialformer_cpu
#endif
#define SFK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
SFK_TORCH_LIBRARY(SFK_OPS_NAMESPACE, m) {
  m.def(
      "bilateral_fwd(Tensor q_s, Tensor k_s, Tensor v_s, Tensor q_x, Tensor k_x, Tensor v_x, float scale, "
      "Tensor? image_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      &sfk::bilateral_fwd);
  m.def(
      "bilateral_bwd(Tensor do_s, Tensor do_x, Tensor q_s, Tensor k_s, Tensor v_s, Tensor q_x, Tensor k_x, "
      "Tensor v_x, Tensor o_s, Tensor o_x, Tensor lse_s, Tensor lse_x, float scale, Tensor? image_mask) -> Tensor[]",
      &sfk::bilateral_bwd);
  m.def(
      "cross_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_mask, Tensor? attn_mask=None) -> (Tensor, Tensor)",
      &sfk::cross_fwd);
  m.def(
      "cross_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale, Tensor? key_mask, "
      "Tensor? attn_mask=None) -> Tensor[]",
      &sfk::cross_bwd);
  m.def("vector_isa() -> str", &sfk::vector_isa);
}
