// Declarations shared by the operator front ends (csrc/dac_fast.cpp), the CPU kernels
// (csrc/cpu/kernels_cpu.cpp) and the CUDA kernels (csrc/cuda/kernels.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>

namespace dac_fast {

using at::Tensor;

// ---- front ends: validate, allocate outputs (poisoned when DAC_FAST_POISON=1), dispatch by device
Tensor snake(const Tensor& x, const Tensor& alpha);
std::tuple<Tensor, Tensor> snake_backward(const Tensor& grad, const Tensor& x, const Tensor& alpha);
std::tuple<Tensor, Tensor> add_snake(const Tensor& a, const Tensor& b, const Tensor& alpha);
Tensor scale_bias_snake(const Tensor& y, const Tensor& scale, const Tensor& bias, const Tensor& alpha);
std::tuple<Tensor, Tensor, Tensor> rvq_encode(const Tensor& z, const Tensor& in_w, const Tensor& in_b,
                                              const Tensor& codebook, const Tensor& out_w, const Tensor& out_b,
                                              int64_t n_quantizers, bool exact,
                                              const std::optional<Tensor>& normalized_codebook);
Tensor rvq_decode(const Tensor& codes, const Tensor& codebook, const Tensor& out_w, const Tensor& out_b);

// The front ends above as one device key's implementations (they dispatch to that device's kernels);
// called from the TORCH_LIBRARY_IMPL block of each device's translation unit.
void register_front_ends(torch::Library& m);

bool poison_enabled();

// csrc/cpu/buffer_cache.cpp: recycle CPU buffers by size during an inference call (see there)
bool buffer_cache_enter();
void buffer_cache_exit();
int64_t buffer_cache_bytes();

// ---- device kernels. All tensors contiguous, validated by the front ends.
// Snake family forward: u = x (b, scale, bias undefined) | x + b | scale * x + bias; y = snake(u);
// `sum` (defined only in add mode) receives u. alpha/scale/bias: fp32 (fp64 for fp64 x), C elements.
struct SnakeArgs {
  Tensor x, b, scale, bias, alpha;  // b/scale/bias may be undefined
  Tensor y, sum;                    // sum may be undefined
};
void snake_fwd_cpu(const SnakeArgs& a);
void snake_bwd_cpu(const Tensor& g, const Tensor& x, const Tensor& alpha, const Tensor& gx, const Tensor& galpha);
// rows of normalized latents enc (R, 8), normalized codebook cbn (K, 8), l2 (R), cn2 (K) -> codes (R)
void rvq_argmax_cpu(const Tensor& enc, const Tensor& cbn, const Tensor& l2, const Tensor& cn2, const Tensor& codes);
// r_out = r_in - o (skipped when r_out undefined); q = (first ? 0 : q) + o
void rvq_update_cpu(const Tensor& r_in, const Tensor& o, const Tensor& r_out, const Tensor& q, bool first);
// fast mode: all codebooks per time step
struct RvqFastArgs {
  Tensor e0;      // (B, n*8, T) in-projections of z without bias
  Tensor in_b;    // (n, 8)
  Tensor A;       // (n, n, 8, 8)  A[i][j] = W_in_i W_out_j
  Tensor c;       // (n, n, 8)     W_in_i b_out_j
  Tensor cbn;     // (n, K, 8) normalized codebooks
  Tensor cbnT;    // (n, 8, K) same, transposed (CPU vector layout)
  Tensor cn2;     // (n, K)
  Tensor cb;      // (n, K, 8) raw codebooks
  Tensor codes;   // (B, n, T) int64 out
  Tensor latents; // (B, n*8, T) out
  Tensor Q;       // (B, n*8, T) out: raw codebook vectors
};
void rvq_fast_cpu(const RvqFastArgs& a);
// Q[b, 8i+k, t] = cb[i, codes[b,i,t], k]
void rvq_gather_cpu(const Tensor& codes, const Tensor& cb, const Tensor& Q);

#ifdef DAC_FAST_WITH_CUDA
void snake_fwd_cuda(const SnakeArgs& a);
void snake_bwd_cuda(const Tensor& g, const Tensor& x, const Tensor& alpha, const Tensor& gx, const Tensor& galpha);
void rvq_argmax_cuda(const Tensor& enc, const Tensor& cbn, const Tensor& l2, const Tensor& cn2, const Tensor& codes);
void rvq_update_cuda(const Tensor& r_in, const Tensor& o, const Tensor& r_out, const Tensor& q, bool first);
void rvq_fast_cuda(const RvqFastArgs& a);
void rvq_gather_cuda(const Tensor& codes, const Tensor& cb, const Tensor& Q);
#endif

}  // namespace dac_fast
