// Per-row loops over one tile of logits S (row-major, contiguous rows), the only
// elementwise work of the fused CPU kernel. Generic scalar versions for any T
// (used for float64 and for tails), AVX2+FMA versions for float.
//
// Every exponential is exp(S_ij − shift) with one shift per tile (the tile's
// max), so one exp per element serves both the row softmax and the column
// softmax; the caller detects the rare rows/columns where that shared shift
// would underflow and recomputes them exactly (see semclip_cpu.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEMCLIP_HAVE_AVX2 1
#endif

namespace semclip {

// ---------------------------------------------------------------------------
// Scalar reference versions (any T).

template <typename T>
inline T max_of(const T* x, int64_t n) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// Σ_j exp(s_j − shift)·w_j over the row; adds exp(s_j − shift) to col_sum[j] for j < n_query.
template <typename T>
inline T row_exp_sums(const T* s, const T* w, int64_t n, int64_t n_query, T shift, T* col_sum) {
  T acc = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T e = std::exp(s[j] - shift);
    acc += e * w[j];
    if (j < n_query) col_sum[j] += e;
  }
  return acc;
}

// g_j = exp(s_j − shift)·(u·w_j + v_j): the gradient of the logits; returns Σ_j g_j·s_j (for dτ). An entry
// left out of the partitions holds s_j = −inf: g_j = 0 and it adds nothing to the sum (not 0·(−inf)).
template <typename T>
inline double row_grad_logits(const T* s, const T* w, const T* v, int64_t n, T shift, T u, T* g) {
  double dot = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T gj = std::exp(s[j] - shift) * (u * w[j] + v[j]);
    g[j] = gj;
    if (gj != 0) dot += static_cast<double>(gj) * s[j];
  }
  return dot;
}

#ifdef SEMCLIP_HAVE_AVX2
// ---------------------------------------------------------------------------
// float, 8 lanes.

// exp(x) to ~1 ulp (Cephes polynomial on [−ln2/2, ln2/2], 2^n through the exponent bits).
// x < −87.3 gives 0 (no denormals), NaN stays NaN (max/min return their second operand on NaN).
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3365447505531f);
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 keep = _mm256_cmp_ps(x, lo, _CMP_NLT_UQ);  // x >= lo, or NaN
  x = _mm256_min_ps(hi, _mm256_max_ps(lo, x));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 r2 = _mm256_mul_ps(r, r);
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0f));
  __m256i n = _mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127));
  const __m256 pow2n = _mm256_castsi256_ps(_mm256_slli_epi32(n, 23));
  return _mm256_and_ps(keep, _mm256_mul_ps(y, pow2n));
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <>
inline float max_of<float>(const float* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
  }
  m0 = _mm256_max_ps(m0, m1);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m0);
  float m = -INFINITY;
  for (float lane : lanes) m = std::max(m, lane);
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <>
inline float row_exp_sums<float>(const float* s, const float* w, int64_t n, int64_t n_query, float shift,
                                 float* col_sum) {
  const __m256 vshift = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  float tail = 0.0f;
  int64_t j = 0;
  // Query columns: the row sum and the column sums share each exponential.
  for (; j + 8 <= n_query; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vshift));
    acc = _mm256_fmadd_ps(e, _mm256_loadu_ps(w + j), acc);
    _mm256_storeu_ps(col_sum + j, _mm256_add_ps(_mm256_loadu_ps(col_sum + j), e));
  }
  for (; j < n_query; ++j) {
    const float e = std::exp(s[j] - shift);
    tail += e * w[j];
    col_sum[j] += e;
  }
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vshift));
    acc = _mm256_fmadd_ps(e, _mm256_loadu_ps(w + j), acc);
  }
  for (; j < n; ++j) tail += std::exp(s[j] - shift) * w[j];
  return hsum8(acc) + tail;
}

template <>
inline double row_grad_logits<float>(const float* s, const float* w, const float* v, int64_t n, float shift,
                                     float u, float* g) {
  const __m256 vshift = _mm256_set1_ps(shift);
  const __m256 vu = _mm256_set1_ps(u);
  const __m256 zero = _mm256_setzero_ps();
  __m256 dot = _mm256_setzero_ps();
  double tail = 0.0;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 sj = _mm256_loadu_ps(s + j);
    const __m256 e = exp8(_mm256_sub_ps(sj, vshift));
    const __m256 gj = _mm256_mul_ps(e, _mm256_fmadd_ps(vu, _mm256_loadu_ps(w + j), _mm256_loadu_ps(v + j)));
    _mm256_storeu_ps(g + j, gj);
    // g_j = 0 multiplies s_j = 0 instead (a left-out entry's −inf would give NaN); NaN g_j stays.
    dot = _mm256_fmadd_ps(gj, _mm256_and_ps(_mm256_cmp_ps(gj, zero, _CMP_NEQ_UQ), sj), dot);
  }
  for (; j < n; ++j) {
    const float gj = std::exp(s[j] - shift) * (u * w[j] + v[j]);
    g[j] = gj;
    if (gj != 0) tail += static_cast<double>(gj) * s[j];
  }
  return static_cast<double>(hsum8(dot)) + tail;
}
#endif  // SEMCLIP_HAVE_AVX2

}  // namespace semclip
