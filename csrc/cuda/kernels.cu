// CUDA kernels of dac_fast. The math is shared with the CPU twin through csrc/include/*_math.h;
// the operator front ends (validation, output allocation, orchestration) are in csrc/dac_fast.cpp.
// Built with --fmad=false so the Snake arithmetic rounds like the CPU path. All indexing is int64.
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>

#include "dac_fast_ops.h"
#include "rvq_math.h"
#include "snake_math.h"

namespace dac_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float dsin(float v) { return sinf(v); }
__device__ __forceinline__ double dsin(double v) { return sin(v); }
__device__ __forceinline__ void dsincos(float v, float* s, float* c) { sincosf(v, s, c); }
__device__ __forceinline__ void dsincos(double v, double* s, double* c) { sincos(v, s, c); }

inline dim3 row_grid(int64_t rows, int64_t T) {
  const int64_t per_block = static_cast<int64_t>(kThreads) * kUnroll;
  const int64_t gx = (T + per_block - 1) / per_block;
  TORCH_CHECK(gx <= std::numeric_limits<int32_t>::max(), "dac_fast: T = ", T, " is too long for one launch");
  const int64_t gy = std::min<int64_t>(rows, 65535);
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

// MODE 0: snake(x); 1: s = x + b, snake(s); 2: snake(scale * x + bias)
template <typename scalar_t, int MODE>
__global__ void snake_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xb,
                                 const typename AccOf<scalar_t>::type* __restrict__ alpha,
                                 const typename AccOf<scalar_t>::type* __restrict__ scale,
                                 const typename AccOf<scalar_t>::type* __restrict__ bias, scalar_t* __restrict__ y,
                                 scalar_t* __restrict__ sum, int64_t rows, int64_t C, int64_t T) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t t_base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t c = row % C;
    const acc_t al = alpha[c];
    const acc_t inv = snake_inv_alpha<acc_t>(al);
    acc_t sc = acc_t(1), bi = acc_t(0);
    if (MODE == 2) {
      sc = scale[c];
      bi = bias[c];
    }
    const int64_t base = row * T;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t t = t_base + static_cast<int64_t>(j) * blockDim.x;
      if (t < T) {
        const int64_t idx = base + t;
        acc_t u;
        if (MODE == 0) {
          u = static_cast<acc_t>(x[idx]);
        } else if (MODE == 1) {
          const scalar_t s = static_cast<scalar_t>(static_cast<acc_t>(x[idx]) + static_cast<acc_t>(xb[idx]));
          sum[idx] = s;
          u = static_cast<acc_t>(s);
        } else {
          u = snake_affine<acc_t>(static_cast<acc_t>(x[idx]), sc, bi);
        }
        const acc_t s = dsin(snake_arg<acc_t>(al, u));
        y[idx] = static_cast<scalar_t>(snake_combine<acc_t>(u, s, inv));
      }
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t tot = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) tot += smem[w];
  }
  __syncthreads();
  return tot;  // valid in thread 0
}

template <typename scalar_t>
__global__ void snake_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 const typename AccOf<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ gx,
                                 typename AccOf<scalar_t>::type* __restrict__ galpha, int64_t rows, int64_t C, int64_t T) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t smem[kThreads / 32];
  const int64_t t_base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t c = row % C;
    const acc_t al = alpha[c];
    const acc_t inv = snake_inv_alpha<acc_t>(al);
    const int64_t base = row * T;
    acc_t part = acc_t(0);
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t t = t_base + static_cast<int64_t>(j) * blockDim.x;
      if (t < T) {
        const int64_t idx = base + t;
        const acc_t xv = static_cast<acc_t>(x[idx]);
        const acc_t gv = static_cast<acc_t>(g[idx]);
        acc_t s, co;
        dsincos(snake_arg<acc_t>(al, xv), &s, &co);
        gx[idx] = static_cast<scalar_t>(snake_grad_x<acc_t>(gv, al, s, co, inv));
        part += snake_grad_alpha_term<acc_t>(gv, xv, s, co, inv);
      }
    }
    const acc_t tot = block_sum<acc_t>(part, smem);
    if (threadIdx.x == 0) atomicAdd(galpha + c, tot);
  }
}

// one warp per row of the similarity matrix M (R, K)
__global__ void rvq_argmax_kernel(const float* __restrict__ M, const float* __restrict__ l2, const float* __restrict__ cn2,
                                  int64_t* __restrict__ codes, int64_t R, int64_t K) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (warp >= R) return;  // whole warp exits together
  const float* row = M + warp * K;
  const float l2v = l2[warp];
  float bv = std::numeric_limits<float>::quiet_NaN();
  int64_t bi = -1;
  for (int64_t k = lane; k < K; k += 32) {
    const float v = rvq_score<float>(l2v, row[k], cn2[k]);
    if (bi < 0 || rvq_better<float>(v, k, bv, bi)) {
      bv = v;
      bi = k;
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || rvq_better<float>(ov, oi, bv, bi))) {
      bv = ov;
      bi = oi;
    }
  }
  if (lane == 0) codes[warp] = bi;
}

__global__ void rvq_update_kernel(const float* __restrict__ r_in, const float* __restrict__ o, float* __restrict__ r_out,
                                  float* __restrict__ q, bool first, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float ov = o[i];
    if (r_out != nullptr) r_out[i] = r_in[i] - ov;
    q[i] = first ? 0.0f + ov : q[i] + ov;
  }
}

// fast mode: one thread per time step (b, t), all codebooks in sequence; codebook i in shared memory
__global__ void rvq_fast_kernel(const float* __restrict__ e0, const float* __restrict__ inb, const float* __restrict__ A,
                                const float* __restrict__ cc, const float* __restrict__ cbn, const float* __restrict__ cn2,
                                const float* __restrict__ cb, int64_t* __restrict__ codes, float* __restrict__ lat,
                                float* __restrict__ Q, int64_t B, int64_t n, int64_t T) {
  constexpr int D8 = kCodebookDim, K = kCodebookSize;
  extern __shared__ float sm[];
  float* s_cbn = sm;            // K * 8
  float* s_cn2 = sm + K * D8;   // K
  const int64_t bt = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = bt < B * T;
  const int64_t b = active ? bt / T : 0, t = active ? bt % T : 0;
  for (int64_t i = 0; i < n; ++i) {
    __syncthreads();
    for (int k = threadIdx.x; k < K * D8; k += blockDim.x) s_cbn[k] = cbn[i * K * D8 + k];
    for (int k = threadIdx.x; k < K; k += blockDim.x) s_cn2[k] = cn2[i * K + k];
    __syncthreads();
    if (!active) continue;
    float e0v[D8], corr[D8], e[D8], en[D8], qj[D8];
#pragma unroll
    for (int k = 0; k < D8; ++k) {
      e0v[k] = e0[(b * n * D8 + i * D8 + k) * T + t];
      corr[k] = 0.0f;
    }
    for (int64_t j = 0; j < i; ++j) {
#pragma unroll
      for (int k = 0; k < D8; ++k) qj[k] = Q[(b * n * D8 + j * D8 + k) * T + t];
      const float* Aij = A + ((i * n + j) * D8) * D8;
      const float* cij = cc + (i * n + j) * D8;
#pragma unroll
      for (int r = 0; r < D8; ++r) corr[r] += rvq_dot8<float>(Aij + r * D8, qj) + cij[r];
    }
    rvq_fast_latent<float>(e0v, inb + i * D8, corr, e);
    rvq_normalize8<float>(e, en);
    float l2 = 0.0f;
#pragma unroll
    for (int k = 0; k < D8; ++k) l2 += en[k] * en[k];
    float bv = rvq_score<float>(l2, rvq_dot8<float>(en, s_cbn), s_cn2[0]);
    int64_t bi = 0;
    for (int k = 1; k < K; ++k) {
      const float v = rvq_score<float>(l2, rvq_dot8<float>(en, s_cbn + k * D8), s_cn2[k]);
      if (rvq_better<float>(v, k, bv, bi)) {
        bv = v;
        bi = k;
      }
    }
    codes[(b * n + i) * T + t] = bi;
    const float* row = cb + (i * K + bi) * D8;
#pragma unroll
    for (int k = 0; k < D8; ++k) {
      Q[(b * n * D8 + i * D8 + k) * T + t] = row[k];
      lat[(b * n * D8 + i * D8 + k) * T + t] = e[k];
    }
  }
}

__global__ void rvq_gather_kernel(const int64_t* __restrict__ codes, const float* __restrict__ cb, float* __restrict__ Q,
                                  int64_t n, int64_t T, int64_t K, int64_t total) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    // Q is (B, n, 8, T)
    const int64_t t = idx % T;
    const int64_t k = (idx / T) % kCodebookDim;
    const int64_t bi = idx / (T * kCodebookDim);  // b * n + i
    const int64_t i = bi % n;
    const int64_t code = codes[bi * T + t];
    Q[idx] = cb[(i * K + code) * kCodebookDim + k];
  }
}

inline unsigned flat_blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(b, 65535LL * 16)));
}

}  // namespace

void snake_fwd_cuda(const SnakeArgs& a) {
  c10::cuda::CUDAGuard guard(a.x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = a.x.size(1), T = a.x.size(2), rows = a.x.size(0) * C;
  const dim3 grid = row_grid(rows, T);
  const int mode = a.b.defined() ? 1 : (a.scale.defined() ? 2 : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dac_fast_snake_fwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    const scalar_t* x = a.x.const_data_ptr<scalar_t>();
    const scalar_t* xb = mode == 1 ? a.b.const_data_ptr<scalar_t>() : nullptr;
    const acc_t* al = a.alpha.const_data_ptr<acc_t>();
    const acc_t* sc = mode == 2 ? a.scale.const_data_ptr<acc_t>() : nullptr;
    const acc_t* bi = mode == 2 ? a.bias.const_data_ptr<acc_t>() : nullptr;
    scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
    scalar_t* s = mode == 1 ? a.sum.mutable_data_ptr<scalar_t>() : nullptr;
    if (mode == 0)
      snake_fwd_kernel<scalar_t, 0><<<grid, kThreads, 0, stream>>>(x, xb, al, sc, bi, y, s, rows, C, T);
    else if (mode == 1)
      snake_fwd_kernel<scalar_t, 1><<<grid, kThreads, 0, stream>>>(x, xb, al, sc, bi, y, s, rows, C, T);
    else
      snake_fwd_kernel<scalar_t, 2><<<grid, kThreads, 0, stream>>>(x, xb, al, sc, bi, y, s, rows, C, T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void snake_bwd_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& gx,
                    const at::Tensor& galpha) {
  c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t C = x.size(1), T = x.size(2), rows = x.size(0) * C;
  const dim3 grid = row_grid(rows, T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dac_fast_snake_bwd_cuda", [&] {
    using acc_t = typename AccOf<scalar_t>::type;
    snake_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), alpha.const_data_ptr<acc_t>(),
        gx.mutable_data_ptr<scalar_t>(), galpha.mutable_data_ptr<acc_t>(), rows, C, T);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rvq_argmax_cuda(const at::Tensor& enc, const at::Tensor& cbn, const at::Tensor& l2, const at::Tensor& cn2,
                     const at::Tensor& codes) {
  c10::cuda::CUDAGuard guard(enc.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  // the same GEMM as the reference (cuBLAS), then distance + argmax fused
  const at::Tensor M = enc.mm(cbn.t()).contiguous();
  const int64_t R = enc.size(0), K = cbn.size(0);
  const int64_t warps_per_block = kThreads / 32;
  const int64_t blocks = (R + warps_per_block - 1) / warps_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dac_fast::rvq_encode: too many rows");
  rvq_argmax_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      M.const_data_ptr<float>(), l2.const_data_ptr<float>(), cn2.const_data_ptr<float>(), codes.mutable_data_ptr<int64_t>(),
      R, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rvq_update_cuda(const at::Tensor& r_in, const at::Tensor& o, const at::Tensor& r_out, const at::Tensor& q, bool first) {
  c10::cuda::CUDAGuard guard(o.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = o.numel();
  rvq_update_kernel<<<flat_blocks(n), kThreads, 0, stream>>>(
      r_in.const_data_ptr<float>(), o.const_data_ptr<float>(), r_out.defined() ? r_out.mutable_data_ptr<float>() : nullptr,
      q.mutable_data_ptr<float>(), first, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rvq_fast_cuda(const RvqFastArgs& a) {
  c10::cuda::CUDAGuard guard(a.e0.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = a.codes.size(0), n = a.codes.size(1), T = a.codes.size(2);
  constexpr int threads = 128;
  const int64_t blocks = (B * T + threads - 1) / threads;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dac_fast::rvq_encode: too many time steps");
  const size_t smem = sizeof(float) * (kCodebookSize * kCodebookDim + kCodebookSize);
  rvq_fast_kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
      a.e0.const_data_ptr<float>(), a.in_b.const_data_ptr<float>(), a.A.const_data_ptr<float>(), a.c.const_data_ptr<float>(),
      a.cbn.const_data_ptr<float>(), a.cn2.const_data_ptr<float>(), a.cb.const_data_ptr<float>(),
      a.codes.mutable_data_ptr<int64_t>(), a.latents.mutable_data_ptr<float>(), a.Q.mutable_data_ptr<float>(), B, n, T);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rvq_gather_cuda(const at::Tensor& codes, const at::Tensor& cb, const at::Tensor& Q) {
  c10::cuda::CUDAGuard guard(codes.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = Q.numel();
  rvq_gather_kernel<<<flat_blocks(total), kThreads, 0, stream>>>(codes.const_data_ptr<int64_t>(), cb.const_data_ptr<float>(),
                                                                Q.mutable_data_ptr<float>(), codes.size(1), codes.size(2),
                                                                cb.size(1), total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dac_fast

TORCH_LIBRARY_IMPL(dac_fast, CUDA, m) { dac_fast::register_front_ends(m); }
