// Snake family math shared by the CPU twin (csrc/cpu/kernels_cpu.cpp) and the CUDA kernels
// (csrc/cuda/kernels.cu). Everything here is plain arithmetic on scalars (float or double);
// the CPU side calls these inside loops the compiler vectorizes, the GPU side per thread.
//
// Forward, in the exact order transformers evaluates it (so that fp32 results are bit-identical
// on CPU when `s` is the same sine):  y = x + (1 / (alpha + 1e-9)) * (s * s),  s = sin(alpha * x).
// Built with -ffp-contract=off (CPU) and --fmad=false (CUDA): no FMA contraction changes rounding.
#pragma once
#include "dac_fast_common.h"
#include <cmath>

namespace dac_fast {

// 1 / (alpha + 1e-9), computed as torch does for a float tensor plus a Python float:
// the scalar is first rounded to the tensor's dtype.
template <typename T>
DAC_HD T snake_inv_alpha(T alpha) {
  return T(1) / (alpha + T(1e-9));
}

// argument of the sine
template <typename T>
DAC_HD T snake_arg(T alpha, T x) {
  return alpha * x;
}

// y from x, s = sin(alpha * x) and inv = 1 / (alpha + 1e-9)
template <typename T>
DAC_HD T snake_combine(T x, T s, T inv) {
  return x + inv * (s * s);
}

// Backward. With s = sin(alpha x), c = cos(alpha x), inv = 1/(alpha+eps):
//   dy/dx     = 1 + inv * 2 s c * alpha
//   dy/dalpha = inv * 2 s c * x - inv^2 * s^2
template <typename T>
DAC_HD T snake_grad_x(T g, T alpha, T s, T c, T inv) {
  return g * (T(1) + inv * (T(2) * s * c) * alpha);
}

template <typename T>
DAC_HD T snake_grad_alpha_term(T g, T x, T s, T c, T inv) {
  return g * (inv * (T(2) * s * c) * x - inv * inv * (s * s));
}

// Epilogue inputs: plain, residual add (a + b), per-channel affine (scale * y + bias).
template <typename T>
DAC_HD T snake_affine(T y, T scale, T bias) {
  return y * scale + bias;
}

// Opt-in fast sine (DAC_FAST_SNAKE_SIN=fast, CPU): Cody-Waite reduction by pi/2 and Cephes'
// minimax polynomials, branch-free so loops vectorize; about 2 ulp for |v| <= kFastSinMax, larger
// arguments are recomputed with std::sin by the caller. NOT bit-identical to torch.sin.
constexpr float kFastSinMax = 8192.0f;

DAC_HD float snake_fast_sinf(float v) {
  const float k = floorf(v * 0.636619772367581343f + 0.5f);  // nearest multiple of pi/2
  float r = v - k * 1.5703125f;
  r = r - k * 4.837512969970703125e-4f;
  r = r - k * 7.54978995489188216e-8f;
  const float z = r * r;
  const float sp = r + r * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * (-1.9515295891e-4f)));
  const float cp = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const int q = static_cast<int>(k) & 3;
  const float m = (q & 1) ? cp : sp;
  return (q & 2) ? -m : m;
}

}  // namespace dac_fast
