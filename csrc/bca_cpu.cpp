// Fused CPU kernels for bilateral and cross attention (DESIGN.md section 1).
//
// Algorithm. Every kernel streams the long token axis in tiles of kTile tokens, packs each
// tile once into small fp32 (fp64 for double inputs) buffers (this is where any strides and
// bf16/fp16 are read, so callers never copy), and runs register-blocked micro-GEMMs written
// with ATen's at::vec::Vectorized on the packed tiles:
//   - bilateral forward: one pass over image tokens. Direction x (image queries over the M
//     spatial keys) is a complete softmax per token, written straight away with its LSE.
//     Direction s (spatial queries over image keys) keeps an online-softmax state
//     (max, sum, acc) per work item; the items' partials are merged afterwards in split order.
//   - bilateral backward: the same pass; dq_x, dk_x, dv_x are row-local, dq_s, dk_s, dv_s
//     are per-item partials summed in split order.
//   - cross attention: items are (batch*head, query split, key split); key splits produce
//     softmax partials (forward) or dq partials (backward), query splits dk/dv partials.
// Determinism: split boundaries depend only on the shapes (never on the thread count) and
// partials are reduced in a fixed order, so results are bitwise identical for any
// torch.set_num_threads and across runs.
// Masks: a masked key gets logit -inf. A row with no kept key gets o = 0, lse = -inf and
// zero gradients. Offsets are int64.

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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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

using at::vec::Vectorized;

constexpr int64_t kTile = 64;        // tokens (keys or image queries) per packed tile
constexpr int64_t kSplitN = 256;     // image tokens per bilateral work item
constexpr int64_t kQueryBlock = 64;  // query rows per block in cross attention
constexpr int64_t kTargetItems = 64; // cross attention: split until this many work items
constexpr int kRowBlock = 6;         // micro-GEMM rows (6 x 2 vectors: 12 accumulators)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline int64_t round_up_vec(int64_t n) {
  constexpr int64_t W = Vectorized<T>::size();
  return ceil_div(n, W) * W;
}

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---------------------------------------------------------------------------------------
// Strided views of the [B, H, L, D] inputs (any strides, any float dtype). The drivers are
// compiled once per accumulation type (float, double); only these small pack/store
// helpers switch on the storage dtype, which keeps the first-use build short.
// ---------------------------------------------------------------------------------------
template <typename F>
inline void with_storage_type(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    case at::kHalf: f(c10::Half{}); break;
    default: TORCH_CHECK(false, "spatialformer_cpu: unsupported dtype ", dtype);
  }
}

struct View {
  const void* ptr;
  at::ScalarType dtype;
  int64_t stride_b, stride_h, stride_l, stride_d, heads;
  int64_t base(int64_t bh) const { return (bh / heads) * stride_b + (bh % heads) * stride_h; }
};

inline View view4(const at::Tensor& t) {
  return {t.data_ptr(), t.scalar_type(), t.stride(0), t.stride(1), t.stride(2), t.stride(3), t.size(1)};
}

// A contiguous output in its storage dtype; at(i) is element i.
struct OutPtr {
  void* ptr;
  at::ScalarType dtype;
  OutPtr at(int64_t offset) const {
    return {static_cast<char*>(ptr) + offset * static_cast<int64_t>(c10::elementSize(dtype)), dtype};
  }
};

inline OutPtr out_ptr(const at::Tensor& t) { return {t.data_ptr(), t.scalar_type()}; }

// [B, H, L] statistics (the LSEs), read with strides.
template <typename T>
struct View3 {
  const T* ptr;
  int64_t stride_b, stride_h, stride_l, heads;
  T at(int64_t bh, int64_t l) const {
    return ptr[(bh / heads) * stride_b + (bh % heads) * stride_h + l * stride_l];
  }
};

template <typename T>
View3<T> view3(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2), t.size(1)};
}

// bool [B, L] key mask; absent = every key kept.
struct MaskView {
  const bool* ptr = nullptr;
  int64_t stride_b = 0, stride_l = 0, heads = 1;
  bool keep(int64_t bh, int64_t l) const {
    return ptr == nullptr || ptr[(bh / heads) * stride_b + l * stride_l];
  }
};

// ---------------------------------------------------------------------------------------
// Packing: strided input rows -> dense acc_t tiles, zero-padded to a whole vector.
// ---------------------------------------------------------------------------------------

// dst[r, d] = mul * src[l0 + r, d] for r < rows; d in [D, ld) = 0.
template <typename acc_t>
void pack_rows(acc_t* dst, int64_t ld, const View& src, int64_t bh, int64_t l0, int64_t rows, int64_t D,
               acc_t mul) {
  with_storage_type(src.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* first = static_cast<const scalar_t*>(src.ptr) + src.base(bh) + l0 * src.stride_l;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* __restrict__ s = first + r * src.stride_l;
      acc_t* __restrict__ d = dst + r * ld;
      if (src.stride_d == 1) {
        for (int64_t i = 0; i < D; ++i) d[i] = static_cast<acc_t>(s[i]) * mul;
      } else {
        for (int64_t i = 0; i < D; ++i) d[i] = static_cast<acc_t>(s[i * src.stride_d]) * mul;
      }
      for (int64_t i = D; i < ld; ++i) d[i] = acc_t(0);
    }
  });
}

// Rows [l0, ...) of the input used in place as a GEMM operand (row stride src.stride_l),
// when they already are what packing would produce: acc_t storage, unit stride along D and
// D a whole number of vectors (Dp == D). nullptr otherwise.
template <typename acc_t>
const acc_t* direct_rows(const View& src, int64_t bh, int64_t l0, int64_t D, int64_t Dp) {
  const bool same = (std::is_same_v<acc_t, float> && src.dtype == at::kFloat) ||
                    (std::is_same_v<acc_t, double> && src.dtype == at::kDouble);
  if (!same || src.stride_d != 1 || D != Dp) return nullptr;
  return static_cast<const acc_t*>(src.ptr) + src.base(bh) + l0 * src.stride_l;
}

// dst[d, r] = src[l0 + r, d] for r < rows; columns r in [rows, cols) = 0. dst is [D, ld].
template <typename acc_t>
void pack_transposed(acc_t* dst, int64_t ld, int64_t cols, const View& src, int64_t bh, int64_t l0, int64_t rows,
                     int64_t D, acc_t mul) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (src.dtype == at::kFloat && src.stride_d == 1) {
      // fp32 rows: 8 x 8 register transposes (ATen's transpose_mxn), then the scale per row
      const float* first = static_cast<const float*>(src.ptr) + src.base(bh) + l0 * src.stride_l;
      const int64_t r8 = rows / 8 * 8, d8 = D / 8 * 8;
      for (int64_t r = 0; r < r8; r += 8)
        for (int64_t i = 0; i < d8; i += 8)
          at::vec::transpose_mxn<float, 8, 8>(first + r * src.stride_l + i, src.stride_l, dst + i * ld + r, ld);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = (r < r8 ? d8 : 0); i < D; ++i) dst[i * ld + r] = first[r * src.stride_l + i];
      for (int64_t i = 0; i < D; ++i) {
        if (mul != 1.0f)
          for (int64_t r = 0; r < rows; ++r) dst[i * ld + r] *= mul;
        for (int64_t r = rows; r < cols; ++r) dst[i * ld + r] = 0.0f;
      }
      return;
    }
  }
  with_storage_type(src.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* first = static_cast<const scalar_t*>(src.ptr) + src.base(bh) + l0 * src.stride_l;
    for (int64_t r = 0; r < rows; ++r) {
      const scalar_t* s = first + r * src.stride_l;
      for (int64_t i = 0; i < D; ++i) dst[i * ld + r] = static_cast<acc_t>(s[i * src.stride_d]) * mul;
    }
  });
  for (int64_t i = 0; i < D; ++i)
    for (int64_t r = rows; r < cols; ++r) dst[i * ld + r] = acc_t(0);
}

// Write rows of acc_t results, row r times mul[r], to a contiguous output at `out`.
template <typename acc_t>
void store_rows_scaled(OutPtr out, const acc_t* src, int64_t ld, int64_t rows, int64_t D, const acc_t* mul) {
  with_storage_type(out.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = static_cast<scalar_t*>(out.ptr);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < D; ++i) o[r * D + i] = static_cast<scalar_t>(src[r * ld + i] * mul[r]);
  });
}

// Write rows of acc_t results (times mul) to a contiguous output at `out`.
template <typename acc_t>
void store_rows(OutPtr out, const acc_t* src, int64_t ld, int64_t rows, int64_t D, acc_t mul) {
  with_storage_type(out.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = static_cast<scalar_t*>(out.ptr);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < D; ++i) o[r * D + i] = static_cast<scalar_t>(src[r * ld + i] * mul);
  });
}

// ---------------------------------------------------------------------------------------
// Micro-GEMM: C[r, j] (+)= sum_k A[r * a_rs + k * a_ks] * B[k * ldb + j].
// cols is a multiple of the vector width; A is read by broadcast, so any strides (a
// transposed A included) cost nothing; B and C rows are dense.
// ---------------------------------------------------------------------------------------
// K >= 1. The first k step initialises the accumulators, so they live in registers from start
// to end (a separate zero/load-then-loop shape made GCC keep them on the stack around the
// loop, which cost about a fifth of the throughput at K = 32).
template <typename T, int R, int NV, bool ACC>
__attribute__((always_inline)) inline void gemm_block(int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                                                      const T* B, int64_t ldb, T* C, int64_t ldc) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  Vec acc[R][NV];
  {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * a_rs]);
      for (int v = 0; v < NV; ++v)
        acc[r][v] = ACC ? at::vec::fmadd(a, b[v], Vec::loadu(C + r * ldc + v * W)) : a * b[v];
    }
  }
  for (int64_t k = 1; k < K; ++k) {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * a_rs + k * a_ks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W);
}

template <typename T, int NV, bool ACC>
inline void gemm_rows(int64_t rows, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                      T* C, int64_t ldc) {
  switch (rows) {
    case 6: gemm_block<T, 6, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 5: gemm_block<T, 5, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 4: gemm_block<T, 4, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 3: gemm_block<T, 3, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    case 2: gemm_block<T, 2, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
    default: gemm_block<T, 1, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc); break;
  }
}

template <typename T, bool ACC>
void gemm(int64_t rows, int64_t cols, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
          T* C, int64_t ldc) {
  constexpr int64_t W = Vectorized<T>::size();
  if (K <= 0) {  // an empty sum: C = 0 (or unchanged when accumulating)
    if (!ACC)
      for (int64_t r = 0; r < rows; ++r) std::fill(C + r * ldc, C + r * ldc + cols, T(0));
    return;
  }
  for (int64_t j = 0; j < cols; j += 2 * W) {
    const bool two = cols - j >= 2 * W;
    for (int64_t r = 0; r < rows; r += kRowBlock) {
      const int64_t rr = std::min<int64_t>(kRowBlock, rows - r);
      if (two)
        gemm_rows<T, 2, ACC>(rr, K, A + r * a_rs, a_rs, a_ks, B + j, ldb, C + r * ldc + j, ldc);
      else
        gemm_rows<T, 1, ACC>(rr, K, A + r * a_rs, a_rs, a_ks, B + j, ldb, C + r * ldc + j, ldc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Vector row helpers (n is a multiple of the vector width). Horizontal reductions run
// lane by lane in a fixed order.
// ---------------------------------------------------------------------------------------
// exp on a vector: ATen's exp_u20 for float (a short polynomial, exp(-inf) = 0, what ATen's own
// CPU flash attention uses), Sleef's exp for double.
template <typename T>
inline Vectorized<T> vexp(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, float>)
    return x.exp_u20();
  else
    return x.exp();
}

template <typename T>
inline T hsum(const Vectorized<T>& v) {
  alignas(64) T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T s = T(0);
  for (int i = 0; i < Vectorized<T>::size(); ++i) s += lanes[i];
  return s;
}

template <typename T>
inline void scale_row(T* x, int64_t n, T a) {
  using Vec = Vectorized<T>;
  const Vec va(a);
  for (int64_t i = 0; i < n; i += Vec::size()) (Vec::loadu(x + i) * va).store(x + i);
}

template <typename T>
inline void axpy_row(T* y, const T* x, int64_t n, T a) {  // y += a * x
  using Vec = Vectorized<T>;
  const Vec va(a);
  for (int64_t i = 0; i < n; i += Vec::size())
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
}

template <typename T>
inline T dot_row(const T* x, const T* y, int64_t n) {
  using Vec = Vectorized<T>;
  Vec s(T(0));
  for (int64_t i = 0; i < n; i += Vec::size()) s = at::vec::fmadd(Vec::loadu(x + i), Vec::loadu(y + i), s);
  return hsum(s);
}

// Column helpers for an [rows, ld] block, one vector of columns at j: four independent
// accumulation chains (combined in a fixed order) so the loop runs at throughput instead of
// at the latency of one max/add chain.
template <typename T>
inline Vectorized<T> column_max(const T* S, int64_t ld, int64_t rows, int64_t j, Vectorized<T> init) {
  using Vec = Vectorized<T>;
  Vec m0 = init, m1 = init, m2 = init, m3 = init;
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    m0 = at::vec::clamp_min(Vec::loadu(S + r * ld + j), m0);
    m1 = at::vec::clamp_min(Vec::loadu(S + (r + 1) * ld + j), m1);
    m2 = at::vec::clamp_min(Vec::loadu(S + (r + 2) * ld + j), m2);
    m3 = at::vec::clamp_min(Vec::loadu(S + (r + 3) * ld + j), m3);
  }
  for (; r < rows; ++r) m0 = at::vec::clamp_min(Vec::loadu(S + r * ld + j), m0);
  return at::vec::clamp_min(at::vec::clamp_min(m0, m1), at::vec::clamp_min(m2, m3));
}

// S[:, j] = exp(S[:, j] - shift); return the column sums.
template <typename T>
inline Vectorized<T> column_exp_sum(T* S, int64_t ld, int64_t rows, int64_t j, Vectorized<T> shift) {
  using Vec = Vectorized<T>;
  Vec s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {
    T* x = S + r * ld + j;
    const Vec p0 = vexp(Vec::loadu(x) - shift), p1 = vexp(Vec::loadu(x + ld) - shift);
    const Vec p2 = vexp(Vec::loadu(x + 2 * ld) - shift), p3 = vexp(Vec::loadu(x + 3 * ld) - shift);
    p0.store(x);
    p1.store(x + ld);
    p2.store(x + 2 * ld);
    p3.store(x + 3 * ld);
    s0 = s0 + p0;
    s1 = s1 + p1;
    s2 = s2 + p2;
    s3 = s3 + p3;
  }
  for (; r < rows; ++r) {
    const Vec p = vexp(Vec::loadu(S + r * ld + j) - shift);
    p.store(S + r * ld + j);
    s0 = s0 + p;
  }
  return (s0 + s1) + (s2 + s3);
}

// ---------------------------------------------------------------------------------------
// Tile steps shared by every driver.
// ---------------------------------------------------------------------------------------

// Complete softmax of C query columns over all M keys, the column form of a full (not
// online) softmax, for direction x: s^T = k q^T [M, Cp] has the keys on rows, so the row max
// and sum of each query reduce with vector max/add over the M rows.
// K [M, Dp], QT [D, Cp] (pre-scaled), V [M, Dp]; scratch S [M, Cp], O [C, Dp];
// outputs: inv_l [Cp] (1 / sum, for the caller's store) and lse [Cp].
template <typename T>
void attend_full_cols(int64_t C, int64_t Cp, int64_t M, int64_t D, int64_t Dp, const T* K, const T* QT, const T* V,
                      T* S, T* O, T* inv_l, T* lse) {
  using Vec = Vectorized<T>;
  // -- s^T = k q^T --
  gemm<T, false>(M, Cp, D, K, Dp, 1, QT, Cp, S, Cp);
  for (int64_t j = 0; j < Cp; j += Vec::size()) {
    // -- column max, p = exp(s - max), column sum --
    const Vec mx = column_max(S, Cp, M, j, Vec(neg_inf<T>()));
    const Vec sum = column_exp_sum(S, Cp, M, j, mx);
    (Vec(T(1)) / sum).store(inv_l + j);
    (mx + sum.log()).store(lse + j);
  }
  // -- o = p v (normalised by the caller's store) --
  gemm<T, false>(C, Dp, M, S, 1, Cp, V, Dp, O, Dp);
}

// Online-softmax update of M query columns with one tile of C keys: the "column" form, for
// few queries over many keys (direction s). Computing s^T = k q^T puts the keys on rows, so
// the softmax statistics are per column and reduce with plain vector max/add over rows (no
// horizontal reductions), and no key tile needs a transpose.
// K [C, ldk] (tile rows), QT [D, Mp] (pre-scaled), V [C, ldv], keep [C] (nullptr = all kept),
// S scratch [C, Mp], shift scratch [Mp]; state m [Mp], l [Mp], acc [M, Dp].
template <typename T>
void attend_tile_cols(int64_t C, int64_t M, int64_t Mp, int64_t D, int64_t Dp, const T* K, int64_t ldk, const T* QT,
                      const T* V, int64_t ldv,
                      const bool* keep, T* S, T* shift, T* m, T* l, T* acc) {
  using Vec = Vectorized<T>;
  const Vec vneg(neg_inf<T>()), vzero(T(0));
  // -- s^T = k q^T --
  gemm<T, false>(C, Mp, D, K, ldk, 1, QT, Mp, S, Mp);
  if (keep)
    for (int64_t r = 0; r < C; ++r)
      if (!keep[r]) std::fill(S + r * Mp, S + (r + 1) * Mp, neg_inf<T>());
  for (int64_t j = 0; j < Mp; j += Vec::size()) {
    // -- column max, new shift (0 while a column has no kept key: keeps exp(-inf - shift) = 0) --
    const Vec m_old = Vec::loadu(m + j);
    const Vec m_new = column_max(S, Mp, C, j, m_old);
    const Vec sh = Vec::blendv(m_new, vzero, m_new == vneg);
    // -- p = exp(s - shift), column sums --
    const Vec sum = column_exp_sum(S, Mp, C, j, sh);
    const Vec alpha = vexp(m_old - sh);  // 0 for a column without state
    (Vec::loadu(l + j) * alpha + sum).store(l + j);
    alpha.store(shift + j);  // reuse the scratch for the per-column rescale below
    m_new.store(m + j);
  }
  for (int64_t j = 0; j < M; ++j)
    if (shift[j] != T(1)) scale_row(acc + j * Dp, Dp, shift[j]);
  // -- acc += p^T v --
  gemm<T, true>(M, Dp, C, S, 1, Mp, V, ldv, acc, Dp);
}

// Gradients of R query rows against one tile of L keys.
// Q [R, Dp] (pre-scaled), dO [R, Dp], lse [R], delta [R] (= rowsum(dO * O));
// K [L, ldk], KT [D, ldkt], VT [D, ldvt], bias [Lp]; scratch P, dS [R, Lp].
// dQ [R, Dp] += dS K (unscaled: the caller multiplies by scale once);
// dK [L, Dp] += dS^T Q; dV [L, Dp] += P^T dO.
template <typename T>
void attend_tile_bwd(int64_t R, int64_t D, int64_t Dp, const T* Q, const T* dO, const T* lse, const T* delta,
                     const T* K, int64_t ldk, const T* KT, int64_t ldkt, const T* VT, int64_t ldvt, const T* bias,
                     int64_t L, int64_t Lp, T* P, T* dS, T* dQ, T* dK, T* dV) {
  using Vec = Vectorized<T>;
  // -- s = q k^T, dp = do v^T --
  gemm<T, false>(R, Lp, D, Q, Dp, 1, KT, ldkt, P, Lp);
  gemm<T, false>(R, Lp, D, dO, Dp, 1, VT, ldvt, dS, Lp);
  // -- p = exp(s - lse), ds = p (dp - delta) --
  for (int64_t r = 0; r < R; ++r) {
    T* p = P + r * Lp;
    T* ds = dS + r * Lp;
    if (lse[r] == neg_inf<T>()) {  // row without kept keys: no gradient
      std::fill(p, p + Lp, T(0));
      std::fill(ds, ds + Lp, T(0));
      continue;
    }
    const Vec vl(lse[r]), vd(delta[r]);
    for (int64_t j = 0; j < Lp; j += Vec::size()) {
      const Vec pj = vexp(Vec::loadu(p + j) + Vec::loadu(bias + j) - vl);
      pj.store(p + j);
      (pj * (Vec::loadu(ds + j) - vd)).store(ds + j);
    }
  }
  // -- dq += ds k, dk += ds^T q, dv += p^T do --
  gemm<T, true>(R, Dp, L, dS, Lp, 1, K, ldk, dQ, Dp);
  gemm<T, true>(L, Dp, R, dS, 1, Lp, Q, Dp, dK, Dp);
  gemm<T, true>(L, Dp, R, P, 1, Lp, dO, Dp, dV, Dp);
}

// Gradients for the column form (see attend_tile_cols): M query columns against C keys.
// K [C, ldk], V [C, ldv] tile rows; QT [D, Mp] and Q [M, Dp] (pre-scaled); dOT [D, Mp], dO [M, Dp];
// lse_safe [Mp] (+inf for a column without kept keys, and for padding), delta [Mp];
// keep [C] (nullptr = all kept); scratch P, dS [C, Mp].
// dQ [M, Dp] += dS^T K (unscaled); dK [C, Dp] (+)= dS Q; dV [C, Dp] (+)= P dO (+= when ACC_KV).
template <bool ACC_KV, typename T>
void attend_tile_cols_bwd(int64_t C, int64_t M, int64_t Mp, int64_t D, int64_t Dp, const T* K, int64_t ldk,
                          const T* V, int64_t ldv, const T* QT, const T* Q, const T* dOT, const T* dO,
                          const T* lse_safe, const T* delta, const bool* keep, T* P, T* dS, T* dQ, T* dK, T* dV) {
  using Vec = Vectorized<T>;
  // -- s^T = k q^T, dp^T = v do^T --
  gemm<T, false>(C, Mp, D, K, ldk, 1, QT, Mp, P, Mp);
  gemm<T, false>(C, Mp, D, V, ldv, 1, dOT, Mp, dS, Mp);
  // -- p = exp(s - lse), ds = p (dp - delta) --
  for (int64_t r = 0; r < C; ++r) {
    T* p = P + r * Mp;
    T* ds = dS + r * Mp;
    if (keep && !keep[r]) {
      std::fill(p, p + Mp, T(0));
      std::fill(ds, ds + Mp, T(0));
      continue;
    }
    for (int64_t j = 0; j < Mp; j += Vec::size()) {
      const Vec pj = vexp(Vec::loadu(p + j) - Vec::loadu(lse_safe + j));
      pj.store(p + j);
      (pj * (Vec::loadu(ds + j) - Vec::loadu(delta + j))).store(ds + j);
    }
  }
  // -- dq += ds^T k, dk = ds q, dv = p do --
  gemm<T, true>(M, Dp, C, dS, 1, Mp, K, ldk, dQ, Dp);
  gemm<T, ACC_KV>(C, Dp, M, dS, Mp, 1, Q, Dp, dK, Dp);
  gemm<T, ACC_KV>(C, Dp, M, P, Mp, 1, dO, Dp, dV, Dp);
}

// Merge softmax partials part[bh][split][row] = (m, l, acc[Dp]) in split order for the
// flat rows idx in [begin, end) (idx = bh * rows + row); write o (contiguous [BH, rows, D])
// and lse (contiguous [BH, rows]). acc: scratch [Dp].
template <typename acc_t, typename lse_t>
void combine_rows(const acc_t* part, int64_t nsplit, int64_t rows, int64_t D, int64_t Dp, OutPtr out, lse_t* lse,
                  int64_t begin, int64_t end, acc_t* acc) {
  const int64_t stride_row = Dp + 2;
  for (int64_t idx = begin; idx < end; ++idx) {
    const int64_t bh = idx / rows, row = idx % rows;
    const acc_t* first = part + (bh * nsplit * rows + row) * stride_row;
    acc_t gm = neg_inf<acc_t>();
    for (int64_t sp = 0; sp < nsplit; ++sp) gm = std::max(gm, first[sp * rows * stride_row]);
    std::fill(acc, acc + Dp, acc_t(0));
    if (gm == neg_inf<acc_t>()) {
      store_rows(out.at(idx * D), acc, Dp, 1, D, acc_t(0));
      lse[idx] = neg_inf<lse_t>();
      continue;
    }
    acc_t l = 0;
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      const acc_t* p = first + sp * rows * stride_row;
      if (p[0] == neg_inf<acc_t>()) continue;
      const acc_t w = std::exp(p[0] - gm);
      l += w * p[1];
      axpy_row(acc, p + 2, Dp, w);
    }
    store_rows(out.at(idx * D), acc, Dp, 1, D, acc_t(1) / l);
    lse[idx] = static_cast<lse_t>(gm + std::log(l));
  }
}

template <typename acc_t, typename lse_t>
void combine_partials(const acc_t* part, int64_t BH, int64_t nsplit, int64_t rows, int64_t D, int64_t Dp,
                      OutPtr out, lse_t* lse) {
  at::parallel_for(0, BH * rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(Dp);
    combine_rows(part, nsplit, rows, D, Dp, out, lse, begin, end, acc.data());
  });
}

// Write final rows of an online-softmax state.
template <typename acc_t, typename lse_t>
void finalize_rows(const acc_t* m, const acc_t* l, acc_t* acc, int64_t rows, int64_t D, int64_t Dp, OutPtr out,
                   lse_t* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    if (m[r] == neg_inf<acc_t>()) {  // no kept key: acc is 0, so o = 0
      lse[r] = neg_inf<lse_t>();
      continue;
    }
    scale_row(acc + r * Dp, Dp, acc_t(1) / l[r]);
    lse[r] = static_cast<lse_t>(m[r] + std::log(l[r]));
  }
  store_rows(out, acc, Dp, rows, D, acc_t(1));
}

// Work items handed out dynamically: each of at::get_num_threads() workers allocates its
// scratch once and takes the next item index until none is left. Every item writes only its
// own outputs and partial slots, so which thread runs it never changes a bit of the result;
// taking items dynamically (rather than in fixed halves) keeps both cores busy when another
// process steals one of them for a while.
template <typename Worker>
void parallel_items(int64_t n, const Worker& worker) {
  std::atomic<int64_t> counter{0};
  const auto next_item = [&]() -> int64_t {
    const int64_t item = counter.fetch_add(1, std::memory_order_relaxed);
    return item < n ? item : -1;
  };
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(n, at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(next_item);
  });
}

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

template <typename acc_t, typename lse_t>
void bilateral_fwd_impl(const BilateralShape& sh, const at::Tensor& q_s, const at::Tensor& k_s,
                        const at::Tensor& v_s, const at::Tensor& q_x, const at::Tensor& k_x,
                        const at::Tensor& v_x, double scale, const MaskView& mask, OutPtr o_s, OutPtr o_x,
                        lse_t* lse_s, lse_t* lse_x) {
  const int64_t BH = sh.B * sh.H, M = sh.M, N = sh.N, D = sh.D;
  const int64_t Dp = round_up_vec<acc_t>(D), Mp = round_up_vec<acc_t>(M), Tp = round_up_vec<acc_t>(kTile);
  const int64_t nsplit = ceil_div(N, kSplitN);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qs = view4(q_s), ks = view4(k_s), vs = view4(v_s);
  const auto qx = view4(q_x), kx = view4(k_x), vx = view4(v_x);
  // Direction-s partials per (bh, split): rows of (m, l, acc[Dp]). The worker that writes the
  // last split of a (batch, head) merges them (in split order), so no second parallel pass.
  std::vector<acc_t> part(BH * nsplit * M * (Dp + 2));
  std::unique_ptr<std::atomic<int64_t>[]> splits_done(new std::atomic<int64_t>[BH]);
  for (int64_t bh = 0; bh < BH; ++bh) splits_done[bh].store(0);

  parallel_items(BH * nsplit, [&](const auto& next_item) {
    // spatial side of one (batch, head): q_s^T (scaled), k_s, v_s
    std::vector<acc_t> qt_sp(D * Mp), k_sp(M * Dp), v_sp(M * Dp);
    // one tile of image tokens: q_x^T (scaled), k_x, v_x rows
    std::vector<acc_t> qt_t(D * Tp), k_t(kTile * Dp), v_t(kTile * Dp);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> s_x(M * Tp), o_t(kTile * Dp), inv_l(Tp), lse_t_(Tp);
    std::vector<acc_t> s_s(kTile * Mp), shift(Mp), m_s(Mp), l_s(Mp), acc_s(M * Dp), merged(Dp);
    int64_t packed_bh = -1;
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / nsplit, sp = item % nsplit;
      if (bh != packed_bh) {
        pack_transposed(qt_sp.data(), Mp, Mp, qs, bh, 0, M, D, sc);
        pack_rows(k_sp.data(), Dp, ks, bh, 0, M, D, acc_t(1));
        pack_rows(v_sp.data(), Dp, vs, bh, 0, M, D, acc_t(1));
        packed_bh = bh;
      }
      std::fill(m_s.begin(), m_s.end(), neg_inf<acc_t>());
      std::fill(l_s.begin(), l_s.end(), acc_t(0));
      std::fill(acc_s.begin(), acc_s.end(), acc_t(0));
      const int64_t n_end = std::min(N, (sp + 1) * kSplitN);
      for (int64_t n0 = sp * kSplitN; n0 < n_end; n0 += kTile) {
        const int64_t C = std::min(kTile, n_end - n0), Cp = round_up_vec<acc_t>(C);
        pack_transposed(qt_t.data(), Cp, Cp, qx, bh, n0, C, D, sc);
        const acc_t* k_rows = direct_rows<acc_t>(kx, bh, n0, D, Dp);
        const acc_t* v_rows = direct_rows<acc_t>(vx, bh, n0, D, Dp);
        if (!k_rows) pack_rows(k_t.data(), Dp, kx, bh, n0, C, D, acc_t(1));
        if (!v_rows) pack_rows(v_t.data(), Dp, vx, bh, n0, C, D, acc_t(1));
        const bool masked = tile_keep(keep.get(), mask, bh, n0, C);
        // -- direction x: image queries over all M spatial keys, complete per tile --
        attend_full_cols(C, Cp, M, D, Dp, k_sp.data(), qt_t.data(), v_sp.data(), s_x.data(), o_t.data(),
                         inv_l.data(), lse_t_.data());
        store_rows_scaled(o_x.at((bh * N + n0) * D), o_t.data(), Dp, C, D, inv_l.data());
        for (int64_t r = 0; r < C; ++r) lse_x[bh * N + n0 + r] = static_cast<lse_t>(lse_t_[r]);
        // -- direction s: spatial queries, online softmax over this tile of image keys --
        attend_tile_cols(C, M, Mp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kx.stride_l : Dp, qt_sp.data(),
                         v_rows ? v_rows : v_t.data(), v_rows ? vx.stride_l : Dp, masked ? keep.get() : nullptr,
                         s_s.data(), shift.data(), m_s.data(), l_s.data(), acc_s.data());
      }
      acc_t* p = part.data() + (bh * nsplit + sp) * M * (Dp + 2);
      for (int64_t r = 0; r < M; ++r) {
        p[r * (Dp + 2)] = m_s[r];
        p[r * (Dp + 2) + 1] = l_s[r];
        std::copy(acc_s.begin() + r * Dp, acc_s.begin() + (r + 1) * Dp, p + r * (Dp + 2) + 2);
      }
      if (splits_done[bh].fetch_add(1, std::memory_order_acq_rel) == nsplit - 1)
        combine_rows(part.data(), nsplit, M, D, Dp, o_s, lse_s, bh * M, (bh + 1) * M, merged.data());
    }
  });
  if (nsplit == 0) combine_partials(part.data(), BH, nsplit, M, D, Dp, o_s, lse_s);  // N = 0: o_s = 0
}

template <typename acc_t, typename lse_t>
void bilateral_bwd_impl(const BilateralShape& sh, const at::Tensor& do_s, const at::Tensor& do_x,
                        const at::Tensor& q_s, const at::Tensor& k_s, const at::Tensor& v_s, const at::Tensor& q_x,
                        const at::Tensor& k_x, const at::Tensor& v_x, const at::Tensor& o_s, const at::Tensor& o_x,
                        const at::Tensor& lse_s, const at::Tensor& lse_x, double scale, const MaskView& mask,
                        OutPtr dq_s, OutPtr dk_s, OutPtr dv_s, OutPtr dq_x, OutPtr dk_x, OutPtr dv_x) {
  const int64_t BH = sh.B * sh.H, M = sh.M, N = sh.N, D = sh.D;
  const int64_t Dp = round_up_vec<acc_t>(D), Mp = round_up_vec<acc_t>(M), Tp = round_up_vec<acc_t>(kTile);
  const int64_t nsplit = ceil_div(N, kSplitN);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qs = view4(q_s), ks = view4(k_s), vs = view4(v_s);
  const auto qx = view4(q_x), kx = view4(k_x), vx = view4(v_x);
  const auto dos = view4(do_s), dox = view4(do_x);
  const auto os = view4(o_s), ox = view4(o_x);
  const auto ls = view3<lse_t>(lse_s), lx = view3<lse_t>(lse_x);
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
        dot_sp(D * Mp), o_row(Dp), lse_safe_sp(Mp), delta_sp(Mp), bias_sp(Mp);
    // one tile of image tokens
    std::vector<acc_t> q_t(kTile * Dp), k_t(kTile * Dp), v_t(kTile * Dp), do_t(kTile * Dp), lse_t_(kTile),
        delta_t(kTile);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> p_x(kTile * Tp), ds_x(kTile * Tp), dq_t(kTile * Dp), dk_t(kTile * Dp), dv_t(kTile * Dp);
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
        for (int64_t r = 0; r < Mp; ++r) {
          if (r >= M) {
            lse_safe_sp[r] = std::numeric_limits<acc_t>::infinity();
            delta_sp[r] = acc_t(0);
            continue;
          }
          pack_rows(o_row.data(), Dp, os, bh, r, 1, D, acc_t(1));
          delta_sp[r] = dot_row(do_sp.data() + r * Dp, o_row.data(), Dp);
          const acc_t lse = static_cast<acc_t>(ls.at(bh, r));
          // a row without kept keys has lse = -inf; +inf makes its p = exp(s - lse) exactly 0
          lse_safe_sp[r] = lse == neg_inf<acc_t>() ? std::numeric_limits<acc_t>::infinity() : lse;
        }
        packed_bh = bh;
      }
      acc_t* dq_sp = part.data() + (bh * nsplit + sp) * 3 * M * Dp;
      acc_t* dk_sp = dq_sp + M * Dp;
      acc_t* dv_sp = dk_sp + M * Dp;
      std::fill(dq_sp, dq_sp + 3 * M * Dp, acc_t(0));
      const int64_t n_end = std::min(N, (sp + 1) * kSplitN);
      for (int64_t n0 = sp * kSplitN; n0 < n_end; n0 += kTile) {
        const int64_t C = std::min(kTile, n_end - n0);
        pack_rows(q_t.data(), Dp, qx, bh, n0, C, D, sc);
        const acc_t* k_rows = direct_rows<acc_t>(kx, bh, n0, D, Dp);
        const acc_t* v_rows = direct_rows<acc_t>(vx, bh, n0, D, Dp);
        if (!k_rows) pack_rows(k_t.data(), Dp, kx, bh, n0, C, D, acc_t(1));
        if (!v_rows) pack_rows(v_t.data(), Dp, vx, bh, n0, C, D, acc_t(1));
        pack_rows(do_t.data(), Dp, dox, bh, n0, C, D, acc_t(1));
        for (int64_t r = 0; r < C; ++r) {
          pack_rows(o_row.data(), Dp, ox, bh, n0 + r, 1, D, acc_t(1));
          delta_t[r] = dot_row(do_t.data() + r * Dp, o_row.data(), Dp);
          lse_t_[r] = static_cast<acc_t>(lx.at(bh, n0 + r));
        }
        const bool masked = tile_keep(keep.get(), mask, bh, n0, C);
        // -- direction x (row form): dq_x row-local, dk_s / dv_s into this item's partials --
        std::fill(dq_t.begin(), dq_t.begin() + C * Dp, acc_t(0));
        for (int64_t j0 = 0; j0 < M; j0 += kTile) {
          const int64_t L = std::min(kTile, M - j0), Lp = std::min(Tp, Mp - j0);
          attend_tile_bwd(C, D, Dp, q_t.data(), do_t.data(), lse_t_.data(), delta_t.data(), k_sp.data() + j0 * Dp,
                          Dp, kt_sp.data() + j0, Mp, vt_sp.data() + j0, Mp, bias_sp.data() + j0, L, Lp,
                          p_x.data(), ds_x.data(), dq_t.data(), dk_sp + j0 * Dp, dv_sp + j0 * Dp);
        }
        store_rows(dq_x.at((bh * N + n0) * D), dq_t.data(), Dp, C, D, sc);
        // -- direction s (column form): dk_x / dv_x row-local, dq_s into this item's partial --
        attend_tile_cols_bwd<false>(C, M, Mp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kx.stride_l : Dp,
                             v_rows ? v_rows : v_t.data(), v_rows ? vx.stride_l : Dp, qt_sp.data(), q_sp.data(), dot_sp.data(),
                             do_sp.data(), lse_safe_sp.data(), delta_sp.data(), masked ? keep.get() : nullptr,
                             p_s.data(), ds_s.data(), dq_sp, dk_t.data(), dv_t.data());
        store_rows(dk_x.at((bh * N + n0) * D), dk_t.data(), Dp, C, D, acc_t(1));
        store_rows(dv_x.at((bh * N + n0) * D), dv_t.data(), Dp, C, D, acc_t(1));
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

template <typename acc_t, typename lse_t>
void cross_fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                    const MaskView& mask, OutPtr out, lse_t* lse) {
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t Dp = round_up_vec<acc_t>(D), Tp = round_up_vec<acc_t>(kTile);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qv = view4(q), kv = view4(k), vv = view4(v);
  const CrossPlan plan = plan_cross(BH, Lq, Lk);
  std::vector<acc_t> part(plan.nks > 1 ? BH * plan.nks * Lq * (Dp + 2) : 0);

  // Column form (as direction s of the bilateral kernel): per query block q^T is packed once,
  // key tiles are read as rows (in place for fp32), softmax statistics per query column.
  const int64_t Qp = round_up_vec<acc_t>(kQueryBlock);
  parallel_items(BH * plan.nqs * plan.nks, [&](const auto& next_item) {
    std::vector<acc_t> qt_b(D * Qp), k_t(kTile * Dp), v_t(kTile * Dp), s(kTile * Qp), shift(Qp);
    std::vector<acc_t> m(Qp), l(Qp), acc(kQueryBlock * Dp);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    for (int64_t item = next_item(); item >= 0; item = next_item()) {
      const int64_t bh = item / (plan.nqs * plan.nks);
      const int64_t qs = (item / plan.nks) % plan.nqs, ks = item % plan.nks;
      const int64_t q_end = std::min(Lq, (qs + 1) * plan.q_len), k_end = std::min(Lk, (ks + 1) * plan.k_len);
      for (int64_t q0 = qs * plan.q_len; q0 < q_end; q0 += kQueryBlock) {
        const int64_t R = std::min(kQueryBlock, q_end - q0), Rp = round_up_vec<acc_t>(R);
        pack_transposed(qt_b.data(), Rp, Rp, qv, bh, q0, R, D, sc);
        std::fill(m.begin(), m.end(), neg_inf<acc_t>());
        std::fill(l.begin(), l.end(), acc_t(0));
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t k0 = ks * plan.k_len; k0 < k_end; k0 += kTile) {
          const int64_t L = std::min(kTile, k_end - k0);
          const acc_t* k_rows = direct_rows<acc_t>(kv, bh, k0, D, Dp);
          const acc_t* v_rows = direct_rows<acc_t>(vv, bh, k0, D, Dp);
          if (!k_rows) pack_rows(k_t.data(), Dp, kv, bh, k0, L, D, acc_t(1));
          if (!v_rows) pack_rows(v_t.data(), Dp, vv, bh, k0, L, D, acc_t(1));
          const bool masked = tile_keep(keep.get(), mask, bh, k0, L);
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

template <typename acc_t, typename lse_t>
void cross_bwd_impl(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& o, const at::Tensor& lse_in, double scale, const MaskView& mask,
                    OutPtr dq, OutPtr dk, OutPtr dv) {
  const int64_t BH = q.size(0) * q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  const int64_t Dp = round_up_vec<acc_t>(D), Tp = round_up_vec<acc_t>(kTile);
  const acc_t sc = static_cast<acc_t>(scale);
  const auto qv = view4(q), kv = view4(k), vv = view4(v);
  const auto dov = view4(d_o), ov = view4(o);
  const auto lv = view3<lse_t>(lse_in);
  const CrossPlan plan = plan_cross(BH, Lq, Lk);
  // dq partials per key split [nks, BH, Lq, Dp]; dk/dv partials per query split [nqs, BH, Lk, 2, Dp].
  std::vector<acc_t> dq_part(plan.nks > 1 ? plan.nks * BH * Lq * Dp : 0);
  std::vector<acc_t> dkv_part(plan.nqs > 1 ? plan.nqs * BH * Lk * 2 * Dp : 0);

  const int64_t Qp = round_up_vec<acc_t>(kQueryBlock);
  parallel_items(BH * plan.nqs * plan.nks, [&](const auto& next_item) {
    // one query block: q (scaled) as rows and transposed, do as rows and transposed
    std::vector<acc_t> q_b(kQueryBlock * Dp), qt_b(D * Qp), do_b(kQueryBlock * Dp), dot_b(D * Qp), o_row(Dp),
        lse_safe(Qp), delta(Qp), dq_b(kQueryBlock * Dp);
    std::vector<acc_t> k_t(kTile * Dp), v_t(kTile * Dp), p(kTile * Qp), ds(kTile * Qp);
    std::unique_ptr<bool[]> keep(new bool[kTile]);
    std::vector<acc_t> dk_loc(plan.k_len * Dp), dv_loc(plan.k_len * Dp);
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
        for (int64_t r = 0; r < Rp; ++r) {
          if (r >= R) {
            lse_safe[r] = std::numeric_limits<acc_t>::infinity();
            delta[r] = acc_t(0);
            continue;
          }
          pack_rows(o_row.data(), Dp, ov, bh, q0 + r, 1, D, acc_t(1));
          delta[r] = dot_row(do_b.data() + r * Dp, o_row.data(), Dp);
          const acc_t lse = static_cast<acc_t>(lv.at(bh, q0 + r));
          // no kept key: lse = -inf; +inf makes p = exp(s - lse) exactly 0
          lse_safe[r] = lse == neg_inf<acc_t>() ? std::numeric_limits<acc_t>::infinity() : lse;
        }
        std::fill(dq_b.begin(), dq_b.end(), acc_t(0));
        for (int64_t k0 = k_begin; k0 < k_end; k0 += kTile) {
          const int64_t L = std::min(kTile, k_end - k0);
          const acc_t* k_rows = direct_rows<acc_t>(kv, bh, k0, D, Dp);
          const acc_t* v_rows = direct_rows<acc_t>(vv, bh, k0, D, Dp);
          if (!k_rows) pack_rows(k_t.data(), Dp, kv, bh, k0, L, D, acc_t(1));
          if (!v_rows) pack_rows(v_t.data(), Dp, vv, bh, k0, L, D, acc_t(1));
          const bool masked = tile_keep(keep.get(), mask, bh, k0, L);
          attend_tile_cols_bwd<true>(L, R, Rp, D, Dp, k_rows ? k_rows : k_t.data(), k_rows ? kv.stride_l : Dp,
                                     v_rows ? v_rows : v_t.data(), v_rows ? vv.stride_l : Dp, qt_b.data(), q_b.data(),
                                     dot_b.data(), do_b.data(), lse_safe.data(), delta.data(),
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
        for (int64_t ks = 0; ks < plan.nks; ++ks) axpy_row(sum.data(), dq_part.data() + (ks * BH * Lq + row) * Dp, Dp, acc_t(1));
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
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor, got ",
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
  auto lse_s = at::empty({sh.B, sh.H, sh.M}, q_s.options().dtype(at::kFloat));
  auto lse_x = at::empty({sh.B, sh.H, sh.N}, q_s.options().dtype(at::kFloat));
  if (q_s.scalar_type() == at::kDouble)
    bilateral_fwd_impl<double, float>(sh, q_s, k_s, v_s, q_x, k_x, v_x, scale, mask, out_ptr(o_s), out_ptr(o_x),
                                      lse_s.data_ptr<float>(), lse_x.data_ptr<float>());
  else
    bilateral_fwd_impl<float, float>(sh, q_s, k_s, v_s, q_x, k_x, v_x, scale, mask, out_ptr(o_s), out_ptr(o_x),
                                     lse_s.data_ptr<float>(), lse_x.data_ptr<float>());
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
  if (q_s.scalar_type() == at::kDouble) {
    // float64: the float32 LSEs of the backend contract would cap the gradients' precision,
    // so recompute them in float64 (one extra forward; float64 is for checking, not speed).
    const auto opts = q_s.options().memory_format(at::MemoryFormat::Contiguous);
    auto o_s64 = at::empty({sh.B, sh.H, sh.M, sh.D}, opts), o_x64 = at::empty({sh.B, sh.H, sh.N, sh.D}, opts);
    auto ls64 = at::empty({sh.B, sh.H, sh.M}, opts), lx64 = at::empty({sh.B, sh.H, sh.N}, opts);
    bilateral_fwd_impl<double, double>(sh, q_s, k_s, v_s, q_x, k_x, v_x, scale, mask, out_ptr(o_s64),
                                       out_ptr(o_x64), ls64.data_ptr<double>(), lx64.data_ptr<double>());
    bilateral_bwd_impl<double, double>(sh, do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, ls64, lx64, scale,
                                       mask, g[0], g[1], g[2], g[3], g[4], g[5]);
  } else {
    bilateral_bwd_impl<float, float>(sh, do_s, do_x, q_s, k_s, v_s, q_x, k_x, v_x, o_s, o_x, lse_s, lse_x, scale,
                                     mask, g[0], g[1], g[2], g[3], g[4], g[5]);
  }
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
                                             double scale, const c10::optional<at::Tensor>& key_mask) {
  check_cross(q, k, v);
  check_scale(scale);
  const MaskView mask = check_mask(key_mask, "key_mask", k.size(0), k.size(2), k.size(1));
  auto o = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kDouble)
    cross_fwd_impl<double, float>(q, k, v, scale, mask, out_ptr(o), lse.data_ptr<float>());
  else
    cross_fwd_impl<float, float>(q, k, v, scale, mask, out_ptr(o), lse.data_ptr<float>());
  return {o, lse};
}

std::vector<at::Tensor> cross_bwd(const at::Tensor& d_o, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, double scale,
                                  const c10::optional<at::Tensor>& key_mask) {
  check_cross(q, k, v);
  check_scale(scale);
  check_input(d_o, "do", q);
  check_input(o, "o", q);
  check_shape(d_o, "do", q.sizes());
  check_shape(o, "o", q.sizes());
  check_lse(lse, "lse", {q.size(0), q.size(1), q.size(2)});
  const MaskView mask = check_mask(key_mask, "key_mask", k.size(0), k.size(2), k.size(1));
  const auto contiguous = at::MemoryFormat::Contiguous;
  std::vector<at::Tensor> grads{at::empty(q.sizes(), q.options().memory_format(contiguous)),
                                at::empty(k.sizes(), k.options().memory_format(contiguous)),
                                at::empty(v.sizes(), v.options().memory_format(contiguous))};
  if (q.scalar_type() == at::kDouble) {
    // float64: recompute the LSE in float64 (see bilateral_bwd).
    auto o64 = at::empty(q.sizes(), q.options().memory_format(contiguous));
    auto lse64 = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
    cross_fwd_impl<double, double>(q, k, v, scale, mask, out_ptr(o64), lse64.data_ptr<double>());
    cross_bwd_impl<double, double>(d_o, q, k, v, o, lse64, scale, mask, out_ptr(grads[0]), out_ptr(grads[1]),
                                   out_ptr(grads[2]));
  } else {
    cross_bwd_impl<float, float>(d_o, q, k, v, o, lse, scale, mask, out_ptr(grads[0]), out_ptr(grads[1]),
                                 out_ptr(grads[2]));
  }
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
// these from spatialformer_kernels/ops/cpu_backend.py.
TORCH_LIBRARY(spatialformer_cpu, m) {
  m.def(
      "bilateral_fwd(Tensor q_s, Tensor k_s, Tensor v_s, Tensor q_x, Tensor k_x, Tensor v_x, float scale, "
      "Tensor? image_mask) -> (Tensor, Tensor, Tensor, Tensor)",
      &sfk::bilateral_fwd);
  m.def(
      "bilateral_bwd(Tensor do_s, Tensor do_x, Tensor q_s, Tensor k_s, Tensor v_s, Tensor q_x, Tensor k_x, "
      "Tensor v_x, Tensor o_s, Tensor o_x, Tensor lse_s, Tensor lse_x, float scale, Tensor? image_mask) -> Tensor[]",
      &sfk::bilateral_bwd);
  m.def("cross_fwd(Tensor q, Tensor k, Tensor v, float scale, Tensor? key_mask) -> (Tensor, Tensor)",
        &sfk::cross_fwd);
  m.def(
      "cross_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, float scale, Tensor? key_mask) "
      "-> Tensor[]",
      &sfk::cross_bwd);
  m.def("vector_isa() -> str", &sfk::vector_isa);
}
