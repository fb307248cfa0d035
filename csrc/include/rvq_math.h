// Residual vector quantizer math shared by the CPU twin and the CUDA kernels.
//
// Distance exactly as transformers writes it:  dist = -(|e|^2 - 2 e.c) + |c|^2  (argmax),
// first index on ties, NaN treated as the largest value (as torch.max does).
#pragma once
#include "dac_fast_common.h"
#include <cmath>

namespace dac_fast {

constexpr int kCodebookDim = 8;
constexpr int kCodebookSize = 1024;

template <typename T>
DAC_HD T rvq_score(T l2, T dot, T cn2) {
  return -(l2 - T(2) * dot) + cn2;
}

// true when candidate (v, i) must replace the current best (bv, bi); indices scanned in any order
template <typename T>
DAC_HD bool rvq_better(T v, int64_t i, T bv, int64_t bi) {
  const bool vnan = v != v, bnan = bv != bv;
  if (vnan || bnan) {
    if (vnan && bnan) return i < bi;
    return vnan;
  }
  return v > bv || (v == bv && i < bi);
}

// element k of row ``code`` of one codebook (K rows of 8); NaN for a code outside [0, K): the CUDA op does not
// read the codes back to check them (no host synchronisation), so a bad code shows as a NaN row instead of
// reading out of bounds
DAC_HD float rvq_gather_element(const float* codebook, int64_t code, int64_t K, int k) {
  return (code >= 0 && code < K) ? codebook[code * kCodebookDim + k] : nanf("");
}

// dot product of two 8-vectors as a sequential chain (fast mode)
template <typename T>
DAC_HD T rvq_dot8(const T* a, const T* b) {
  T acc = T(0);
DAC_UNROLL
  for (int k = 0; k < kCodebookDim; ++k) acc = acc + a[k] * b[k];
  return acc;
}

// F.normalize of an 8-vector: x / max(||x||, 1e-12)
template <typename T>
DAC_HD void rvq_normalize8(const T* x, T* out) {
  T ss = T(0);
DAC_UNROLL
  for (int k = 0; k < kCodebookDim; ++k) ss = ss + x[k] * x[k];
  T n = std::sqrt(ss);
  if (n < T(1e-12)) n = T(1e-12);
DAC_UNROLL
  for (int k = 0; k < kCodebookDim; ++k) out[k] = x[k] / n;
}

// Fast-mode step for one time position and one codebook i:
//   e_i = E0_i + b_i - sum_{j<i} (A_ij q_j + c_ij), A_ij = W_in_i W_out_j, c_ij = W_in_i b_out_j
// (`corr` holds the already accumulated correction). Returns the normalized e in `en`.
template <typename T>
DAC_HD void rvq_fast_latent(const T* e0, const T* bin, const T* corr, T* e) {
DAC_UNROLL
  for (int k = 0; k < kCodebookDim; ++k) e[k] = (e0[k] + bin[k]) - corr[k];
}

}  // namespace dac_fast
