// Building blocks of the fused CPU attention kernels (bca_cpu.cpp): strided views,
// packing, the at::vec micro-GEMM, vector row/column helpers and the per-tile softmax steps.
// Included by bca_cpu.cpp only, after it has chosen the vector ISA.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace sfk {

using at::vec::Vectorized;

constexpr int64_t kTile = 64;        // tokens (keys or image queries) per packed tile
constexpr int64_t kTileFwdX = 16;    // image queries per tile in the bilateral forward's direction x
constexpr int64_t kSplitN = 256;     // image tokens per bilateral work item (backward; forward at least)
constexpr int64_t kSplitMaxN = 1024; // most image tokens per bilateral forward work item (unless M needs more)
constexpr int64_t kSplitPerSpatial = 4;  // bilateral work items span at least this many image tokens per spatial token
constexpr int64_t kQueryBlock = 64;  // query rows per block in cross attention
constexpr int64_t kTargetItems = 64; // split cross attention (and size forward items) for this many
constexpr int kRowBlock = 6;         // micro-GEMM rows (6 x 2 vectors: 12 accumulators)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Fewest image tokens in a bilateral work item, for M spatial tokens. Every item writes
// spatial-side partials of M rows (forward: m, l and acc; backward: dq_s, dk_s and dv_s), so
// items of a fixed length would make the split workspace grow as M * N (at M = 512, N = 70,000
// it was 4x the inputs, 8x with AVX-512's 16-float padding of D = 8). Items of at least
// kSplitPerSpatial * M tokens keep it a fraction of the image tensors the items read: O(N * D)
// for any M and any vector width.
inline int64_t bilateral_min_split_len(int64_t M) {
  return std::max(kSplitN, ceil_div(kSplitPerSpatial * M, kTile) * kTile);
}

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

// bool [B, Lq, Lk] per-query mask of cross attention (attn_mask), the same for every head, any
// strides (0 for a broadcast axis); absent = every (query, key) pair kept.
struct PairMaskView {
  const bool* ptr = nullptr;
  int64_t stride_b = 0, stride_q = 0, stride_k = 0, heads = 1;
};

// Which keys of one tile (L <= kTile keys) each query of one block (R <= kQueryBlock queries)
// attends to under an attn_mask, key_mask folded in: built per (query block, key tile) from
// the masks' bytes, so no [Lq, Lk] buffer ever exists. rows[r] points at query r's L flags:
// into the attn_mask itself where they already are L consecutive bytes there (unit key
// stride, no key dropped by key_mask), else into scratch; a broadcast query axis (stride 0)
// shares one row. active lists the queries that keep at least one key (in order), full[r]
// says query r keeps all L. A query without a kept key in the tile is left out of the tile's
// work: its online-softmax state would not change (the rescale is exactly 1, the sum 0) and
// its gradients get exact zeros from the tile.
struct BlockKeep {
  std::vector<const bool*> rows;
  std::vector<int64_t> active;
  std::vector<char> full;
  std::unique_ptr<bool[]> scratch;  // [kQueryBlock + 1, kTile]: gathered rows, then the key flags
  bool all_full = false;            // every query keeps every key: the unmasked path applies
  BlockKeep() : rows(kQueryBlock), full(kQueryBlock), scratch(new bool[(kQueryBlock + 1) * kTile]) {
    active.reserve(kQueryBlock);
  }
};

// Kept flags among L <= 64 bools (a byte loop was 12% of the masked forward at Lk = 1024: GCC
// did not vectorise it). AVX-512: one masked 64-byte load (bytes past L are not read) and a
// compare; else 8 bytes (each 0 or 1) at a time, counted by popcount.
inline int64_t count_kept(const bool* flags, int64_t L) {
#if defined(CPU_CAPABILITY_AVX512)
  if (L <= 64) {
    const __mmask64 in_tile = L == 64 ? ~__mmask64(0) : (__mmask64(1) << L) - 1;
    const __m512i bytes = _mm512_maskz_loadu_epi8(in_tile, flags);
    return __builtin_popcountll(_mm512_cmpneq_epi8_mask(bytes, _mm512_setzero_si512()));
  }
#endif
  int64_t n = 0, l = 0;
  for (; l + 8 <= L; l += 8) {
    uint64_t eight;
    std::memcpy(&eight, flags + l, 8);
    n += __builtin_popcountll(eight);
  }
  for (; l < L; ++l) n += flags[l] ? 1 : 0;
  return n;
}

inline void build_block_keep(BlockKeep& keep, const PairMaskView& attn, const MaskView& key_mask, int64_t bh,
                             int64_t q0, int64_t R, int64_t k0, int64_t L) {
  // -- key_mask flags of the tile (none dropped: the attn_mask rows are used as they are) --
  bool* key_flags = keep.scratch.get() + kQueryBlock * kTile;
  bool keys_all = true;
  if (key_mask.ptr) {
    for (int64_t l = 0; l < L; ++l) {
      key_flags[l] = key_mask.keep(bh, k0 + l);
      keys_all &= key_flags[l];
    }
  }
  if (keys_all) std::fill(key_flags, key_flags + L, true);
  const bool* first = attn.ptr + (bh / attn.heads) * attn.stride_b + k0 * attn.stride_k;
  keep.active.clear();
  keep.all_full = true;
  int64_t kept = 0;
  for (int64_t r = 0; r < R; ++r) {
    if (r > 0 && attn.stride_q == 0) {  // every query of the block has query 0's flags
      keep.rows[r] = keep.rows[0];
    } else {
      const bool* src = first + (q0 + r) * attn.stride_q;
      bool* dst = keep.scratch.get() + r * kTile;
      if (attn.stride_k == 1 && keys_all) {
        keep.rows[r] = src;
      } else {
        if (attn.stride_k == 1)
          for (int64_t l = 0; l < L; ++l) dst[l] = src[l] && key_flags[l];
        else if (attn.stride_k == 0)
          for (int64_t l = 0; l < L; ++l) dst[l] = src[0] && key_flags[l];
        else
          for (int64_t l = 0; l < L; ++l) dst[l] = src[l * attn.stride_k] && key_flags[l];
        keep.rows[r] = dst;
      }
      kept = count_kept(keep.rows[r], L);
    }
    keep.full[r] = kept == L;
    keep.all_full &= kept == L;
    if (kept > 0) keep.active.push_back(r);
  }
  // Ask for the next tile's flags (one line per query where they are consecutive bytes): the
  // block's queries are a mask row apart (4 KB at Lk = 4096, a page each). The masked forward
  // at Lk = 1024-4096 was 2-6% faster with it (interleaved A/B runs, 1 thread).
  if (attn.stride_k == 1 && attn.stride_q != 0)
    for (int64_t r = 0; r < R; ++r) __builtin_prefetch(first + (q0 + r) * attn.stride_q + kTile);
}

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

// Ask for rows [l0, l0 + rows) of an input ahead of their use (one prefetch per cache line).
// The forward asks for the next tile's q_x at the start of a direction-x tile (its 8 x 8
// transposes stalled on the first touch of each line) and for a direction-s tile's v_x before
// its logits: the P v_x GEMM, v_x's only reader, otherwise stalled on those loads. Asking for
// v_x or k_x a whole tile ahead was no faster (each prefetch loop costs issue slots too).
inline void prefetch_rows(const View& src, int64_t bh, int64_t l0, int64_t rows, int64_t D) {
  const int64_t elem = static_cast<int64_t>(c10::elementSize(src.dtype));
  const char* first = static_cast<const char*>(src.ptr) + (src.base(bh) + l0 * src.stride_l) * elem;
  const int64_t row_bytes = ((D - 1) * src.stride_d + 1) * elem;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(first + r * src.stride_l * elem + b);
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

// dst[i * ld + r] = mul * src[r * ld_src + i] for one 8 x 8 block: the loaded rows are scaled
// (the same products as scaling after the transpose), then transposed by the usual unpack,
// shuffle and 128-bit lane permute, so the scale needs no second pass over dst.
inline void transpose_8x8_scaled(const float* src, int64_t ld_src, float* dst, int64_t ld, float mul) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const __m256 m = _mm256_set1_ps(mul);
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_mul_ps(_mm256_loadu_ps(src + i * ld_src), m);
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {  // t[2i], t[2i+1]: rows 2i, 2i+1 interleaved per 128-bit lane
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // u[4h + c]: columns c (low lane) and c + 4 (high lane) of rows 4h..4h+3
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(u[c], u[4 + c], 0x31));
  }
#else
  for (int r = 0; r < 8; ++r)
    for (int i = 0; i < 8; ++i) dst[i * ld + r] = src[r * ld_src + i] * mul;
#endif
}

// dst[d, r] = src[l0 + r, d] for r < rows; columns r in [rows, cols) = 0. dst is [D, ld].
template <typename acc_t>
void pack_transposed(acc_t* dst, int64_t ld, int64_t cols, const View& src, int64_t bh, int64_t l0, int64_t rows,
                     int64_t D, acc_t mul) {
  if constexpr (std::is_same_v<acc_t, float>) {
    if (src.dtype == at::kFloat && src.stride_d == 1) {
      // fp32 rows: scaled 8 x 8 register transposes, the ragged edges element by element
      const float* first = static_cast<const float*>(src.ptr) + src.base(bh) + l0 * src.stride_l;
      const int64_t r8 = rows / 8 * 8, d8 = D / 8 * 8;
      for (int64_t r = 0; r < r8; r += 8)
        for (int64_t i = 0; i < d8; i += 8)
          transpose_8x8_scaled(first + r * src.stride_l + i, src.stride_l, dst + i * ld + r, ld, mul);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = (r < r8 ? d8 : 0); i < D; ++i) dst[i * ld + r] = first[r * src.stride_l + i] * mul;
      for (int64_t i = 0; i < D; ++i)
        for (int64_t r = rows; r < cols; ++r) dst[i * ld + r] = 0.0f;
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

// Rows of an image-token tile written once and not read again by this kernel: fp32 rows
// of whole 8-float vectors at 32-byte alignment go out with streaming (non-temporal)
// stores, which skip the read-for-ownership of the destination lines; anything else takes
// the plain path. The workers fence these stores before they finish (parallel_items).
template <typename acc_t>
void store_rows_stream(OutPtr out, const acc_t* src, int64_t ld, int64_t rows, int64_t D, const acc_t* mul_rows,
                       acc_t mul) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    if (out.dtype == at::kFloat && D % 8 == 0 && reinterpret_cast<uintptr_t>(out.ptr) % 32 == 0) {
      float* o = static_cast<float*>(out.ptr);
      for (int64_t r = 0; r < rows; ++r) {
        const __m256 m = _mm256_set1_ps(mul_rows ? mul_rows[r] : mul);
        for (int64_t i = 0; i < D; i += 8)
          _mm256_stream_ps(o + r * D + i, _mm256_mul_ps(_mm256_loadu_ps(src + r * ld + i), m));
      }
      return;
    }
  }
#endif
  with_storage_type(out.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    scalar_t* o = static_cast<scalar_t*>(out.ptr);
    for (int64_t r = 0; r < rows; ++r) {
      const acc_t m = mul_rows ? mul_rows[r] : mul;
      for (int64_t i = 0; i < D; ++i) o[r * D + i] = static_cast<scalar_t>(src[r * ld + i] * m);
    }
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
// transposed A included) cost nothing; B and C rows are dense. When accumulating, c_scale
// (if given) first multiplies each row of C by c_scale[r] (the online softmax's rescale, done
// in the registers the sum starts from instead of in a separate pass over C). col_max (if
// given) is raised to the maximum of each column of C, taken from the registers as the blocks
// are stored (the softmax's column max, without a second pass over the logits).
// ---------------------------------------------------------------------------------------
// K >= 1. The first k step initialises the accumulators, which kept them in registers better
// than a zero/load-then-loop shape of this generic form did (double, and other vector ISAs;
// AVX2 float rows use gemm_block_f32x16 below).
template <typename T, int R, int NV, bool ACC>
__attribute__((always_inline)) inline void gemm_block(int64_t K, const T* A, int64_t a_rs, int64_t a_ks,
                                                      const T* B, int64_t ldb, T* C, int64_t ldc, const T* c_scale,
                                                      T* col_max) {
  using Vec = Vectorized<T>;
  constexpr int W = Vec::size();
  Vec acc[R][NV];
  {
    Vec b[NV];
    for (int v = 0; v < NV; ++v) b[v] = Vec::loadu(B + v * W);
    for (int r = 0; r < R; ++r) {
      const Vec a(A[r * a_rs]);
      for (int v = 0; v < NV; ++v) {
        if (!ACC) {
          acc[r][v] = a * b[v];
        } else {
          const Vec c = Vec::loadu(C + r * ldc + v * W);
          acc[r][v] = at::vec::fmadd(a, b[v], c_scale ? c * Vec(c_scale[r]) : c);
        }
      }
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
  if (col_max)
    for (int v = 0; v < NV; ++v) {
      Vec m = Vec::loadu(col_max + v * W);
      for (int r = 0; r < R; ++r) m = at::vec::clamp_min(acc[r][v], m);
      m.store(col_max + v * W);
    }
}

#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
// The same block for float rows of 16 columns in AVX2 registers: R x 2 accumulators started
// from 0 (or from the scaled C), fully unrolled over rows, which GCC keeps in registers from
// start to end (it moved the generic version's through the stack before and after its loop;
// the forward at B = 8 is about 4% faster with this one). Same products and order of sums.
template <int R, bool ACC>
__attribute__((always_inline)) inline void gemm_block_f32x16(int64_t K, const float* A, int64_t a_rs, int64_t a_ks,
                                                             const float* B, int64_t ldb, float* C, int64_t ldc,
                                                             const float* c_scale, float* col_max) {
  __m256 c0[R], c1[R];
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    if (ACC) {
      c0[r] = _mm256_loadu_ps(C + r * ldc);
      c1[r] = _mm256_loadu_ps(C + r * ldc + 8);
      if (c_scale) {
        const __m256 s = _mm256_broadcast_ss(c_scale + r);
        c0[r] = _mm256_mul_ps(c0[r], s);
        c1[r] = _mm256_mul_ps(c1[r], s);
      }
    } else {
      c0[r] = _mm256_setzero_ps();
      c1[r] = _mm256_setzero_ps();
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(B + k * ldb), b1 = _mm256_loadu_ps(B + k * ldb + 8);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_broadcast_ss(A + r * a_rs + k * a_ks);
      c0[r] = _mm256_fmadd_ps(a, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(a, b1, c1[r]);
    }
  }
  _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(C + r * ldc, c0[r]);
    _mm256_storeu_ps(C + r * ldc + 8, c1[r]);
  }
  if (col_max) {  // the same max as at::vec::clamp_min; a NaN logit reaches the output through exp
    __m256 m0 = _mm256_loadu_ps(col_max), m1 = _mm256_loadu_ps(col_max + 8);
    _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
      m0 = _mm256_max_ps(m0, c0[r]);
      m1 = _mm256_max_ps(m1, c1[r]);
    }
    _mm256_storeu_ps(col_max, m0);
    _mm256_storeu_ps(col_max + 8, m1);
  }
}
#endif

template <typename T, int NV, bool ACC>
inline void gemm_rows(int64_t rows, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
                      T* C, int64_t ldc, const T* c_scale, T* col_max) {
#if defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float> && NV == 2) {
    switch (rows) {
      case 6: gemm_block_f32x16<6, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 5: gemm_block_f32x16<5, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 4: gemm_block_f32x16<4, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 3: gemm_block_f32x16<3, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 2: gemm_block_f32x16<2, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      default: gemm_block_f32x16<1, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
    }
  } else
#endif
  {
    switch (rows) {
      case 6: gemm_block<T, 6, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 5: gemm_block<T, 5, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 4: gemm_block<T, 4, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 3: gemm_block<T, 3, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      case 2: gemm_block<T, 2, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
      default: gemm_block<T, 1, NV, ACC>(K, A, a_rs, a_ks, B, ldb, C, ldc, c_scale, col_max); break;
    }
  }
}

template <typename T, bool ACC>
void gemm(int64_t rows, int64_t cols, int64_t K, const T* A, int64_t a_rs, int64_t a_ks, const T* B, int64_t ldb,
          T* C, int64_t ldc, const T* c_scale = nullptr, T* col_max = nullptr) {
  constexpr int64_t W = Vectorized<T>::size();
  if (rows <= 0) return;
  if (K <= 0) {  // an empty sum: C = 0 (or unchanged, bar c_scale, when accumulating)
    for (int64_t r = 0; r < rows; ++r) {
      if (!ACC) std::fill(C + r * ldc, C + r * ldc + cols, T(0));
      else if (c_scale)
        for (int64_t j = 0; j < cols; ++j) C[r * ldc + j] *= c_scale[r];
    }
    if (col_max)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = 0; j < cols; ++j) col_max[j] = std::max(col_max[j], C[r * ldc + j]);
    return;
  }
  // Row blocks outer: a block's A values (a strided gather when A is read transposed) are used
  // for every column strip while they are in L1; B is at most a few KB per tile and stays there.
  // As few blocks as kRowBlock allows, with the rows spread evenly over them (64 rows: nine of
  // 6 and two of 5; 32 rows: 6, 6, 5, 5, 5, 5): a last block of 2 or 4 rows has too few
  // accumulators to cover the FMA latency (forward 3% and backward 2% faster at B = 8).
  const int64_t blocks = ceil_div(rows, int64_t(kRowBlock));
  const int64_t base_rows = rows / blocks, longer_blocks = rows % blocks;
  for (int64_t r = 0, b = 0, rr; r < rows; r += rr, ++b) {
    rr = base_rows + (b < longer_blocks ? 1 : 0);
    for (int64_t j = 0; j < cols; j += 2 * W) {
      const bool two = cols - j >= 2 * W;
      if (two)
        gemm_rows<T, 2, ACC>(rr, K, A + r * a_rs, a_rs, a_ks, B + j, ldb, C + r * ldc + j, ldc,
                             c_scale ? c_scale + r : nullptr, col_max ? col_max + j : nullptr);
      else
        gemm_rows<T, 1, ACC>(rr, K, A + r * a_rs, a_rs, a_ks, B + j, ldb, C + r * ldc + j, ldc,
                             c_scale ? c_scale + r : nullptr, col_max ? col_max + j : nullptr);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Vector row helpers (n is a multiple of the vector width). Horizontal reductions run
// lane by lane in a fixed order.
// ---------------------------------------------------------------------------------------
// exp(x) for every softmax step, forward and backward, where x = s - max <= 0 or x = s - lse
// (<= 0 up to rounding); x = -inf gives 0, NaN gives NaN. x = n ln(2) + r with
// n = round(x log2(e)) and |r| <= ln(2)/2 (r by one fused multiply-add, so it is accurate to
// float rounding), exp(x) = 2^n exp(r), and exp(r) is a degree-5 polynomial: a minimax fit
// with exp(0) = 1 exactly (so the max gives exactly 1 and an unchanged online-softmax max a
// rescale factor of exactly 1), relative error < 2e-7.
// Adding 1.5 * 2^23 + 127 rounds x log2(e) to an integer and leaves 127 + n in the low
// mantissa bits, which shifted into the exponent field give 2^n; x is clamped at -127 ln(2),
// where 2^n is exactly 0. Fewer operations and constants than exp_u20 at its accuracy on
// [-10, 0]. Sleef's exp for double.
template <typename T>
inline Vectorized<T> exp_nonpositive(const Vectorized<T>& x) {
  using Vec = Vectorized<T>;
  if constexpr (std::is_same_v<T, float>) {
    const Vec xc = at::vec::clamp_min(x, Vec(-88.02969f));  // -127 ln(2)
    const Vec round_bias(12583039.0f);                      // 1.5 * 2^23 + 127
    const Vec t = at::vec::fmadd(xc, Vec(1.44269504f), round_bias);
    const Vec r = at::vec::fnmadd(t - round_bias, Vec(0.693147182f), xc);
    Vec p = at::vec::fmadd(r, Vec(0.008317857f), Vec(0.041898176f));
    p = at::vec::fmadd(r, p, Vec(0.16667183f));
    p = at::vec::fmadd(r, p, Vec(0.49999148f));
    p = at::vec::fmadd(r, p, Vec(0.99999988f));
    p = at::vec::fmadd(r, p, Vec(1.0f));
    const Vectorized<int32_t> two_n = at::vec::cast<int32_t>(t) << Vectorized<int32_t>(23);
    return p * at::vec::cast<float>(two_n);
  } else {
    return x.exp();
  }
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

// S[:, j] = exp(S[:, j] - shift); return the column sums. Two chains here: each exp is work
// enough between adds, and four kept more values live than AVX2's 16 vector registers hold.
template <typename T>
inline Vectorized<T> column_exp_sum(T* S, int64_t ld, int64_t rows, int64_t j, Vectorized<T> shift) {
  using Vec = Vectorized<T>;
  Vec s0(T(0)), s1(T(0));
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) {
    T* x = S + r * ld + j;
    const Vec p0 = exp_nonpositive(Vec::loadu(x) - shift);
    const Vec p1 = exp_nonpositive(Vec::loadu(x + ld) - shift);
    p0.store(x);
    p1.store(x + ld);
    s0 = s0 + p0;
    s1 = s1 + p1;
  }
  if (r < rows) {
    const Vec p = exp_nonpositive(Vec::loadu(S + r * ld + j) - shift);
    p.store(S + r * ld + j);
    s0 = s0 + p;
  }
  return s0 + s1;
}

// ---------------------------------------------------------------------------------------
// Tile steps shared by every driver.
// ---------------------------------------------------------------------------------------

// Complete softmax of C query columns over all M keys, the column form of a full (not
// online) softmax, for direction x: s^T = k q^T [M, Cp] has the keys on rows, so the row max
// and sum of each query reduce with vector max/add over the M rows.
// K [M, Dp], QT [D, Cp] (pre-scaled), V [M, Dp]; scratch S [M, Cp], O [C, Dp];
// outputs: inv_l [Cp] (1 / sum, for the caller's store), row_max and log_sum [Cp] (the LSE
// is their sum, which the caller forms in float64, see split_lse).
template <typename T>
void attend_full_cols(int64_t C, int64_t Cp, int64_t M, int64_t D, int64_t Dp, const T* K, const T* QT, const T* V,
                      T* S, T* O, T* inv_l, T* row_max, T* log_sum) {
  using Vec = Vectorized<T>;
  // -- s^T = k q^T and its column max --
  std::fill(row_max, row_max + Cp, neg_inf<T>());
  gemm<T, false>(M, Cp, D, K, Dp, 1, QT, Cp, S, Cp, nullptr, row_max);
  for (int64_t j = 0; j < Cp; j += Vec::size()) {
    // -- p = exp(s - max), column sum --
    const Vec mx = Vec::loadu(row_max + j);
    const Vec sum = column_exp_sum(S, Cp, M, j, mx);
    (Vec(T(1)) / sum).store(inv_l + j);
    sum.log().store(log_sum + j);
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
  // -- s^T = k q^T; the new column max (taken as the blocks are stored when no key is masked) --
  if (!keep) std::copy(m, m + Mp, shift);
  gemm<T, false>(C, Mp, D, K, ldk, 1, QT, Mp, S, Mp, nullptr, keep ? nullptr : shift);
  if (keep)
    for (int64_t r = 0; r < C; ++r)
      if (!keep[r]) std::fill(S + r * Mp, S + (r + 1) * Mp, neg_inf<T>());
  for (int64_t j = 0; j < Mp; j += Vec::size()) {
    // -- new shift (0 while a column has no kept key: keeps exp(-inf - shift) = 0) --
    const Vec m_old = Vec::loadu(m + j);
    const Vec m_new = keep ? column_max(S, Mp, C, j, m_old) : Vec::loadu(shift + j);
    const Vec sh = Vec::blendv(m_new, vzero, m_new == vneg);
    // -- p = exp(s - shift), column sums --
    const Vec sum = column_exp_sum(S, Mp, C, j, sh);
    const Vec alpha = exp_nonpositive(m_old - sh);  // 0 for a column without state
    (Vec::loadu(l + j) * alpha + sum).store(l + j);
    alpha.store(shift + j);  // reuse the scratch for the per-column rescale below
    m_new.store(m + j);
  }
  // -- acc = alpha acc + p^T v --
  gemm<T, true>(M, Dp, C, S, 1, Mp, V, ldv, acc, Dp, shift);
}

// The saved LSE is float64: a float LSE at |lse| ~ 1e4 is off by up to 5e-4 (half an ulp),
// which P = exp(s - lse) turns into a relative error of P that no later step can remove.
// The backward splits it into floats hi + lo (hi the nearest float, lo the rest) and forms
// exp((s - hi) - lo): s - hi is exact near the row max, so P keeps float precision.
// A row without kept keys (lse = -inf) gets hi = +inf, lo = 0: every exp is exactly 0.
template <typename T>
inline void split_lse(double lse, T& hi, T& lo) {
  if (lse == -std::numeric_limits<double>::infinity()) {
    hi = std::numeric_limits<T>::infinity();
    lo = T(0);
    return;
  }
  hi = static_cast<T>(lse);
  lo = static_cast<T>(lse - static_cast<double>(hi));
}

// Gradients of R query rows against ALL their L keys (the row's softmax is complete here).
// Q [R, Dp] (pre-scaled), dO [R, Dp], lse_hi, lse_lo [R] (split_lse); K [L, ldk], KT [D, ldkt], VT [D, ldvt],
// bias [Lp] (0 for a key, -inf for padding); scratch P, dS [R, Lp].
// dQ [R, Dp] += dS K (unscaled: the caller multiplies by scale once);
// dK [L, Dp] += dS^T Q; dV [L, Dp] += P^T dO.
// delta = rowsum(P * dP) / rowsum(P), formed from P and dP as the reference's softmax backward
// does (not dO . O): the rounding of dP then cancels in dP - delta, exactly so for a one-hot
// row (|logits| ~ 1e4). Normalising by rowsum(P) turns a per-row factor error of the
// recomputed P (the roundings of the split LSE and of exp) into a relative error of dS.
template <typename T>
void attend_tile_bwd(int64_t R, int64_t D, int64_t Dp, const T* Q, const T* dO, const T* lse_hi, const T* lse_lo,
                     const T* K, int64_t ldk, const T* KT, int64_t ldkt, const T* VT, int64_t ldvt, const T* bias, int64_t L,
                     int64_t Lp, T* P, T* dS, T* dQ, T* dK, T* dV) {
  using Vec = Vectorized<T>;
  // -- s = q k^T, dp = do v^T --
  gemm<T, false>(R, Lp, D, Q, Dp, 1, KT, ldkt, P, Lp);
  gemm<T, false>(R, Lp, D, dO, Dp, 1, VT, ldvt, dS, Lp);
  // -- p = exp(s - lse), delta = rowsum(p dp), ds = p (dp - delta) --
  for (int64_t r = 0; r < R; ++r) {
    T* p = P + r * Lp;
    T* ds = dS + r * Lp;
    if (lse_hi[r] == std::numeric_limits<T>::infinity()) {  // row without kept keys: no gradient
      std::fill(p, p + Lp, T(0));
      std::fill(ds, ds + Lp, T(0));
      continue;
    }
    const Vec hi(lse_hi[r]), lo(lse_lo[r]);
    Vec pdp(T(0)), psum(T(0));
    for (int64_t j = 0; j < Lp; j += Vec::size()) {
      const Vec pj = exp_nonpositive((Vec::loadu(p + j) - hi) - lo + Vec::loadu(bias + j));
      pj.store(p + j);
      pdp = at::vec::fmadd(pj, Vec::loadu(ds + j), pdp);
      psum = psum + pj;
    }
    const T p_total = hsum(psum);
    const Vec vd(p_total > T(0) ? hsum(pdp) / p_total : T(0));
    for (int64_t j = 0; j < Lp; j += Vec::size())
      (Vec::loadu(p + j) * (Vec::loadu(ds + j) - vd)).store(ds + j);
  }
  // -- dq += ds k, dk += ds^T q, dv += p^T do --
  gemm<T, true>(R, Dp, L, dS, Lp, 1, K, ldk, dQ, Dp);
  gemm<T, true>(L, Dp, R, dS, 1, Lp, Q, Dp, dK, Dp);
  gemm<T, true>(L, Dp, R, P, 1, Lp, dO, Dp, dV, Dp);
}

// delta[j] = dO[j] . O[j] for M query columns, by the same micro-GEMM as the column form's
// dp^T = v do^T below (per element: the first product, then fused multiply-adds in D order),
// not a separate dot: when a softmax is one-hot (|logits| ~ 1e4), O[j] equals the winning
// v row bitwise, so dp - delta is exactly 0 there, as in the reference's softmax backward.
// O [M, ldo] rows, dOT [D, Mp]; delta [Mp] (0 for padding); scratch [W].
template <typename T>
void column_delta(int64_t M, int64_t Mp, int64_t D, const T* O, int64_t ldo, const T* dOT, T* scratch, T* delta) {
  constexpr int64_t W = Vectorized<T>::size();
  for (int64_t j = 0; j < M; ++j) {
    const int64_t j0 = j / W * W;
    gemm<T, false>(1, W, D, O + j * ldo, ldo, 1, dOT + j0, Mp, scratch, W);
    delta[j] = scratch[j - j0];
  }
  std::fill(delta + M, delta + Mp, T(0));
}

// Gradients for the column form (see attend_tile_cols): M query columns against C keys.
// K [C, ldk], V [C, ldv] tile rows; QT [D, Mp] and Q [M, Dp] (pre-scaled); dOT [D, Mp], dO [M, Dp];
// lse_hi, lse_lo [Mp] (split_lse; hi = +inf for padding), delta [Mp] (column_delta);
// keep [C] (nullptr = all kept); scratch P, dS [C, Mp].
// dQ [M, Dp] += dS^T K (unscaled); dK [C, Dp] (+)= dS Q; dV [C, Dp] (+)= P dO (+= when ACC_KV).
template <bool ACC_KV, typename T>
void attend_tile_cols_bwd(int64_t C, int64_t M, int64_t Mp, int64_t D, int64_t Dp, const T* K, int64_t ldk,
                          const T* V, int64_t ldv, const T* QT, const T* Q, const T* dOT, const T* dO,
                          const T* lse_hi, const T* lse_lo, const T* delta, const bool* keep, T* P, T* dS, T* dQ,
                          T* dK, T* dV) {
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
      const Vec pj = exp_nonpositive((Vec::loadu(p + j) - Vec::loadu(lse_hi + j)) - Vec::loadu(lse_lo + j));
      pj.store(p + j);
      (pj * (Vec::loadu(ds + j) - Vec::loadu(delta + j))).store(ds + j);
    }
  }
  // -- dq += ds^T k, dk = ds q, dv = p do --
  gemm<T, true>(M, Dp, C, dS, 1, Mp, K, ldk, dQ, Dp);
  gemm<T, ACC_KV>(C, Dp, M, dS, Mp, 1, Q, Dp, dK, Dp);
  gemm<T, ACC_KV>(C, Dp, M, P, Mp, 1, dO, Dp, dV, Dp);
}

// x[j] = fill where keep[j] is false (j < L) and for the padding j in [L, Lp). The flags are
// bytes, turned into lane masks a vector at a time (a 16-byte compare per 16 floats with
// AVX-512); scalar past the last whole vector within L, so no flag beyond L is read (a row may
// be the last bytes of the attn_mask itself).
template <typename T>
inline void select_kept(T* x, const bool* keep, int64_t L, int64_t Lp, T fill) {
  int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr int64_t W = Vectorized<T>::size();
#endif
#if defined(CPU_CAPABILITY_AVX512)
  const __m128i none = _mm_setzero_si128();
  for (; j + W <= L; j += W) {
    if constexpr (std::is_same_v<T, float>) {
      const __mmask16 k = _mm_cmpneq_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(keep + j)), none);
      _mm512_storeu_ps(x + j, _mm512_mask_blend_ps(k, _mm512_set1_ps(fill), _mm512_loadu_ps(x + j)));
    } else {
      const __mmask8 k = static_cast<__mmask8>(
          _mm_cmpneq_epi8_mask(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + j)), none));
      _mm512_storeu_pd(x + j, _mm512_mask_blend_pd(k, _mm512_set1_pd(fill), _mm512_loadu_pd(x + j)));
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256i none = _mm256_setzero_si256();
  for (; j + W <= L; j += W) {
    if constexpr (std::is_same_v<T, float>) {
      const __m256i flags = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + j)));
      const __m256 drop = _mm256_castsi256_ps(_mm256_cmpeq_epi32(flags, none));
      _mm256_storeu_ps(x + j, _mm256_blendv_ps(_mm256_loadu_ps(x + j), _mm256_set1_ps(fill), drop));
    } else {
      int32_t four;
      std::memcpy(&four, keep + j, 4);
      const __m256i flags = _mm256_cvtepu8_epi64(_mm_cvtsi32_si128(four));
      const __m256d drop = _mm256_castsi256_pd(_mm256_cmpeq_epi64(flags, none));
      _mm256_storeu_pd(x + j, _mm256_blendv_pd(_mm256_loadu_pd(x + j), _mm256_set1_pd(fill), drop));
    }
  }
#endif
  for (; j < L; ++j)
    if (!keep[j]) x[j] = fill;
  for (; j < Lp; ++j) x[j] = fill;
}

// Reduce one row of n values (n a multiple of the vector width) with op (max or sum), for the
// row form's per-query statistics: four independent vector chains, then ATen's log-step
// in-register reduction (a lane-by-lane loop, 16 dependent scalar steps per row, was slower).
template <typename T, typename Op>
inline T reduce_row(const T* x, int64_t n, T init, const Op& op) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  Vec r0(init), r1(init), r2(init), r3(init);
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    r0 = op(r0, Vec::loadu(x + j));
    r1 = op(r1, Vec::loadu(x + j + W));
    r2 = op(r2, Vec::loadu(x + j + 2 * W));
    r3 = op(r3, Vec::loadu(x + j + 3 * W));
  }
  for (; j < n; j += W) r0 = op(r0, Vec::loadu(x + j));
  return at::vec::vec_reduce_all<T>(op, op(op(r0, r1), op(r2, r3)));
}

// Copy rows idx[0..n) of src [*, ld] to dense rows of dst [n, ld].
template <typename T>
inline void gather_rows(T* dst, const T* src, int64_t ld, const int64_t* idx, int64_t n) {
  for (int64_t a = 0; a < n; ++a) std::copy(src + idx[a] * ld, src + (idx[a] + 1) * ld, dst + a * ld);
}

// Online-softmax update with one tile of L keys under an attn_mask, the "row" form, for a
// query block whose queries keep only some keys of the tile (see BlockKeep): the A active
// queries are gathered into dense rows, so both GEMMs run over those queries only and a query
// that keeps no key of the tile costs nothing. Queries on rows lets each one's keep flags
// apply as consecutive bytes along its row (select_kept), and A needs no padding to a whole
// vector (the column form's GEMMs would pad the gathered queries to one).
// Q [R, Dp] the block's rows (pre-scaled), KT [D, Lp] (the tile's keys, transposed, zero past
// L), V [L, ldv]; scratch Qa, O_a [A, Dp], S [A, Lp], stat [2 * Ap]; state m, l [R], acc [R, Dp].
template <typename T>
void attend_tile_rows(int64_t L, int64_t Lp, int64_t D, int64_t Dp, const T* Q, const T* KT, const T* V, int64_t ldv,
                      const BlockKeep& keep, T* Qa, T* O_a, T* S, T* stat, T* m, T* l, T* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t* active = keep.active.data();
  const int64_t A = static_cast<int64_t>(keep.active.size()), Ap = ceil_div(A, W) * W;
  T* alpha = stat;          // [Ap] m_old - shift, then the rescale exp(m_old - shift)
  T* row_stat = stat + Ap;  // [A] the tile's max of s per query, then the shift, then the sum of p
  // -- s = q k^T for the active queries, keys dropped for a query at -inf --
  gather_rows(Qa, Q, Dp, active, A);
  gemm<T, false>(A, Lp, D, Qa, Dp, 1, KT, Lp, S, Lp);
  // Short passes over the rows (max; shift; exp and sum) instead of one loop doing all three
  // per row: each row's reductions are latency chains, which out-of-order execution overlaps
  // across rows only when a loop body is short (the masked forward 3-7% faster).
  // (clamp_min, as column_max: a NaN logit reaches the output through exp, not through the max)
  for (int64_t a = 0; a < A; ++a) {
    T* s = S + a * Lp;
    if (!keep.full[active[a]] || L < Lp) select_kept(s, keep.rows[active[a]], L, Lp, neg_inf<T>());
    row_stat[a] = reduce_row(s, Lp, neg_inf<T>(), [](const Vec& x, const Vec& y) { return at::vec::clamp_min(x, y); });
  }
  // -- new max and shift (0 while a query has no kept key, as attend_tile_cols) --
  for (int64_t a = 0; a < A; ++a) {
    const int64_t r = active[a];
    const T m_new = std::max(m[r], row_stat[a]);
    const T shift = m_new == neg_inf<T>() ? T(0) : m_new;
    alpha[a] = m[r] - shift;
    m[r] = m_new;
    row_stat[a] = shift;
  }
  std::fill(alpha + A, alpha + Ap, T(0));
  for (int64_t j = 0; j < Ap; j += W) exp_nonpositive(Vec::loadu(alpha + j)).store(alpha + j);
  // -- p = exp(s - shift), its sum --
  for (int64_t a = 0; a < A; ++a) {
    T* s = S + a * Lp;
    const Vec shift(row_stat[a]);
    Vec sum0(T(0)), sum1(T(0));
    int64_t j = 0;
    for (; j + 2 * W <= Lp; j += 2 * W) {
      const Vec p0 = exp_nonpositive(Vec::loadu(s + j) - shift);
      const Vec p1 = exp_nonpositive(Vec::loadu(s + j + W) - shift);
      p0.store(s + j);
      p1.store(s + j + W);
      sum0 = sum0 + p0;
      sum1 = sum1 + p1;
    }
    if (j < Lp) {
      const Vec p0 = exp_nonpositive(Vec::loadu(s + j) - shift);
      p0.store(s + j);
      sum0 = sum0 + p0;
    }
    row_stat[a] = at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return x + y; }, sum0 + sum1);
  }
  // -- o = p v for the tile; acc = alpha acc + o, l = alpha l + sum --
  gemm<T, false>(A, Dp, L, S, Lp, 1, V, ldv, O_a, Dp);
  for (int64_t a = 0; a < A; ++a) {
    const int64_t r = active[a];
    l[r] = l[r] * alpha[a] + row_stat[a];
    T* acc_r = acc + r * Dp;
    const Vec va(alpha[a]);
    for (int64_t j = 0; j < Dp; j += W)
      at::vec::fmadd(Vec::loadu(acc_r + j), va, Vec::loadu(O_a + a * Dp + j)).store(acc_r + j);
  }
}

// Gradients for the row form (see attend_tile_rows): the A active queries of a block against
// one tile of L keys. Q [R, Dp] (pre-scaled), dO [R, Dp], lse_hi, lse_lo, delta [R] (as for
// attend_tile_cols_bwd); K [L, ldk] tile rows, KT, VT [D, Lp] (transposed, zero past L);
// scratch Qa, dOa, dQa [A, Dp], P, dS [A, Lp].
// dQ [R, Dp] += dS K (unscaled); dK [L, Dp] += dS^T Q; dV [L, Dp] += P^T dO.
template <typename T>
void attend_tile_rows_bwd(int64_t L, int64_t Lp, int64_t D, int64_t Dp, const T* Q, const T* dO, const T* lse_hi,
                          const T* lse_lo, const T* delta, const T* K, int64_t ldk, const T* KT, const T* VT,
                          const BlockKeep& keep, T* Qa, T* dOa, T* dQa, T* P, T* dS, T* dQ, T* dK, T* dV) {
  using Vec = Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const int64_t* active = keep.active.data();
  const int64_t A = static_cast<int64_t>(keep.active.size());
  // -- s = q k^T, dp = do v^T for the active queries --
  gather_rows(Qa, Q, Dp, active, A);
  gather_rows(dOa, dO, Dp, active, A);
  gemm<T, false>(A, Lp, D, Qa, Dp, 1, KT, Lp, P, Lp);
  gemm<T, false>(A, Lp, D, dOa, Dp, 1, VT, Lp, dS, Lp);
  // -- p = exp(s - lse), ds = p (dp - delta); 0 for a dropped key --
  for (int64_t a = 0; a < A; ++a) {
    const int64_t r = active[a];
    T* p = P + a * Lp;
    T* ds = dS + a * Lp;
    if (lse_hi[r] == std::numeric_limits<T>::infinity()) {  // no kept key at all (lse = -inf): no gradient
      std::fill(p, p + Lp, T(0));
      std::fill(ds, ds + Lp, T(0));
      continue;
    }
    const Vec hi(lse_hi[r]), lo(lse_lo[r]), dl(delta[r]);
    for (int64_t j = 0; j < Lp; j += W) {
      const Vec pj = exp_nonpositive((Vec::loadu(p + j) - hi) - lo);
      pj.store(p + j);
      (pj * (Vec::loadu(ds + j) - dl)).store(ds + j);
    }
    if (!keep.full[r] || L < Lp) {
      select_kept(p, keep.rows[r], L, Lp, T(0));
      select_kept(ds, keep.rows[r], L, Lp, T(0));
    }
  }
  // -- dq += ds k, dk += ds^T q, dv += p^T do --
  gemm<T, false>(A, Dp, L, dS, Lp, 1, K, ldk, dQa, Dp);
  for (int64_t a = 0; a < A; ++a) axpy_row(dQ + active[a] * Dp, dQa + a * Dp, Dp, T(1));
  gemm<T, true>(L, Dp, A, dS, 1, Lp, Qa, Dp, dK, Dp);
  gemm<T, true>(L, Dp, A, P, 1, Lp, dOa, Dp, dV, Dp);
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
    for (int64_t sp = 0; sp < nsplit; ++sp) {
      // NaN in any split's max propagates to the row (std::max would drop it and zero the row).
      const acc_t m_split = first[sp * rows * stride_row];
      if (std::isnan(m_split) || m_split > gm) gm = m_split;
    }
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
    lse[idx] = static_cast<lse_t>(gm) + static_cast<lse_t>(std::log(l));
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
    lse[r] = static_cast<lse_t>(m[r]) + static_cast<lse_t>(std::log(l[r]));
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
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
    _mm_sfence();  // order this worker's streaming stores before the region ends
#endif
  });
}

}  // namespace sfk
