// Snake family math shared by the CPU twin (csrc/cpu/kernels_cpu.cpp) and the CUDA kernels
// (csrc/cuda/kernels.cu). Everything here is plain arithmetic on scalars (float or double);
// the CPU side calls these inside loops the compiler vectorizes, the GPU side per thread.
//
// Forward, in the exact order transformers evaluates it (so that fp32 results are bit-identical
// on CPU when `s` is the same sine):  y = x + (1 / (alpha + 1e-9)) * (s * s),  s = sin(alpha * x).
// Built with -ffp-contract=off (CPU) and --fmad=false (CUDA): no FMA contraction changes rounding.
#pragma once
#include "dac_fast_common.h"

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

}  // namespace dac_fast
