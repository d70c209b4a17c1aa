// The elementwise work of the sigmoid pair loss, one row of a tile at a time: generic scalar code for any T
// (float64, and tails), AVX2+FMA for float. One exponential per pair serves the loss and its gradient:
//
//   l = S + b,  x = s·l,  e = exp(−|x|),  softplus(x) = max(x, 0) + log1p(e),
//   σ(x) = 1/(1 + e) for x ≥ 0, e/(1 + e) below,  g = s·a·σ(x)   (dL/dl of the pair)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "tile_math.h"

namespace semclip {

// What one row contributes: the weighted loss, and (with gradients) Σ g·S (for dτ), Σ g (for db) and the
// largest |g| (for the filter; NaN-free rows only: a NaN reaches `loss`, which the caller checks).
struct SigmoidRowSums {
  double loss = 0, grad_dot = 0, grad_sum = 0;
  double grad_max = 0;
};

// S: τ·<A_i, C_j> for the row's n columns; w: the columns' weights; s: ±1 per column (−1 on the row's positives).
// Writes g (if not null).
template <typename T>
inline SigmoidRowSums sigmoid_row_scalar(const T* S, const T* w, const T* s, int64_t n, T bias, T* g) {
  SigmoidRowSums sums;
  for (int64_t j = 0; j < n; ++j) {
    const T x = s[j] * (S[j] + bias);
    const T e = std::exp(-std::abs(x));
    sums.loss += double(w[j] * (std::max(x, T(0)) + std::log1p(e)));
    if (g) {
      const T sigma = (x >= 0 ? T(1) : e) / (T(1) + e);
      const T gj = s[j] * w[j] * sigma;
      g[j] = gj;
      sums.grad_dot += double(gj) * S[j];
      sums.grad_sum += gj;
      sums.grad_max = std::max(sums.grad_max, double(std::abs(gj)));
    }
  }
  return sums;
}

template <typename T>
inline SigmoidRowSums sigmoid_row(const T* S, const T* w, const T* s, int64_t n, T bias, T* g) {
  return sigmoid_row_scalar(S, w, s, n, bias, g);
}

#ifdef SEMCLIP_HAVE_AVX2
// log1p(e) for 0 ≤ e ≤ 1 (NaN stays NaN), Cephes logf's polynomial: with f = e (e ≤ √2 − 1) or
// f = (e − 1)/2 plus ln 2 (then 1 + e = 2·(1 + f)), 1 + f lies in [√2/2, √2] and
// log(1 + f) = f − f²/2 + f³·P(f). No rounding of 1 + e: exact for tiny e, where log(1 + e) would return 0.
inline __m256 log1p_unit8(__m256 e) {
  const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
  const __m256 big = _mm256_cmp_ps(e, _mm256_set1_ps(0.41421356237f), _CMP_GT_OQ);
  const __m256 f = _mm256_blendv_ps(e, _mm256_mul_ps(_mm256_sub_ps(e, one), half), big);
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_add_ps(y, _mm256_and_ps(big, _mm256_set1_ps(-2.12194440e-4f)));  // ln 2, low part
  y = _mm256_fnmadd_ps(half, z, y);
  return _mm256_add_ps(_mm256_add_ps(f, y), _mm256_and_ps(big, _mm256_set1_ps(0.693359375f)));  // ln 2, high
}

inline double hsum8_double(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  double acc = 0;
  for (float lane : lanes) acc += lane;
  return acc;
}

template <>
inline SigmoidRowSums sigmoid_row<float>(const float* S, const float* w, const float* s, int64_t n, float bias,
                                         float* g) {
  const __m256 vbias = _mm256_set1_ps(bias), zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 loss = zero, dot = zero, sum = zero, gmax = zero;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 Sj = _mm256_loadu_ps(S + j), sj = _mm256_loadu_ps(s + j), wj = _mm256_loadu_ps(w + j);
    const __m256 x = _mm256_mul_ps(sj, _mm256_add_ps(Sj, vbias));
    const __m256 ax = _mm256_and_ps(x, abs_mask);
    const __m256 e = exp8(_mm256_sub_ps(zero, ax));
    // max(0, x): the second operand is returned for NaN, so a NaN logit stays NaN in the loss.
    const __m256 softplus = _mm256_add_ps(_mm256_max_ps(zero, x), log1p_unit8(e));
    loss = _mm256_fmadd_ps(wj, softplus, loss);
    if (g) {
      const __m256 numerator = _mm256_blendv_ps(e, one, _mm256_cmp_ps(x, zero, _CMP_GE_OQ));
      const __m256 magnitude = _mm256_mul_ps(wj, _mm256_div_ps(numerator, _mm256_add_ps(one, e)));
      const __m256 gj = _mm256_mul_ps(sj, magnitude);
      _mm256_storeu_ps(g + j, gj);
      dot = _mm256_fmadd_ps(gj, Sj, dot);
      sum = _mm256_add_ps(sum, gj);
      gmax = _mm256_max_ps(gmax, magnitude);
    }
  }
  SigmoidRowSums sums = sigmoid_row_scalar<float>(S + j, w + j, s + j, n - j, bias, g ? g + j : nullptr);
  sums.loss += hsum8_double(loss);
  if (g) {
    sums.grad_dot += hsum8_double(dot);
    sums.grad_sum += hsum8_double(sum);
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, gmax);
    for (float lane : lanes) sums.grad_max = std::max(sums.grad_max, double(lane));
  }
  return sums;
}
#endif  // SEMCLIP_HAVE_AVX2

}  // namespace semclip
