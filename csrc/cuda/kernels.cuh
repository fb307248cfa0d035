// The CUDA kernels of dac_fast and their launches, in one place for two builds:
//  * the real CUDA build, csrc/cuda/kernels.cu (nvcc);
//  * the test-only CPU emulation, csrc/emulation/emulation.cpp (g++ with csrc/emulation/cuda_compat.h),
//    which runs these very bodies with CUDA's blocks, threads, barriers and warp shuffles.
// Both share the grid/block arithmetic below; each defines `launch_kernel` (declared here).
// The math is in csrc/include/*_math.h, shared with the CPU twin. All indexing is int64.
//
// Shared memory is declared with DAC_SHARED_ARRAY / DAC_DYNAMIC_SHARED and only indexed (no raw
// pointers into it), so the emulation can check every access for uninitialized reads and races.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "dac_fast_ops.h"
#include "rvq_math.h"
#include "snake_math.h"

#ifndef DAC_FAST_EMULATION
#define DAC_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define DAC_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#define DAC_DEVICE_CHECK(cond, msg) ((void)0)
#endif

namespace dac_fast {
namespace kernels {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kWarp = 32;
constexpr int kPack = 8;  // 16-bit elements per 128-bit access
constexpr int kRvqFastStepsPerWarp = 4;

struct LaunchConfig {
  dim3 grid;
  dim3 block;
  size_t shared_bytes;
};

// CUDA's limits by default; the emulation tests lower them to reach the row loops and grid-stride loops
// with small inputs.
struct LaunchLimits {
  int64_t max_grid_y = 65535;
  int64_t max_blocks = 65535LL * 16;
};

// Defined by each build: the CUDA build launches on the current stream and checks the launch,
// the emulation runs the grid on CPU threads.
template <typename... Params, typename... Args>
void launch_kernel(const LaunchConfig& cfg, void (*kernel)(Params...), Args... args);

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

// ------------------------------------------------------------------------------------------- Snake
// MODE 0: y = snake(x); 1: sum = x + b, y = snake(sum); 2: y = snake(scale * x + bias)
template <typename acc_t>
struct SnakeChannel {
  acc_t alpha, inv, scale, bias;
};

template <typename acc_t, int MODE>
__device__ __forceinline__ SnakeChannel<acc_t> snake_channel(const acc_t* alpha, const acc_t* scale, const acc_t* bias,
                                                             int64_t c) {
  SnakeChannel<acc_t> ch;
  ch.alpha = alpha[c];
  ch.inv = snake_inv_alpha<acc_t>(ch.alpha);
  ch.scale = MODE == 2 ? scale[c] : acc_t(1);
  ch.bias = MODE == 2 ? bias[c] : acc_t(0);
  return ch;
}

// one element: returns y; in MODE 1 also the rounded sum in `s`
template <typename acc_t, int MODE, typename scalar_t>
__device__ __forceinline__ scalar_t snake_element(scalar_t xv, scalar_t bv, const SnakeChannel<acc_t>& ch, scalar_t& s) {
  acc_t u;
  if (MODE == 0) {
    u = static_cast<acc_t>(xv);
  } else if (MODE == 1) {
    s = static_cast<scalar_t>(static_cast<acc_t>(xv) + static_cast<acc_t>(bv));
    u = static_cast<acc_t>(s);
  } else {
    u = snake_affine<acc_t>(static_cast<acc_t>(xv), ch.scale, ch.bias);
  }
  return static_cast<scalar_t>(snake_combine<acc_t>(u, dsin(snake_arg<acc_t>(ch.alpha, u)), ch.inv));
}

template <typename acc_t, int MODE, typename scalar_t>
__device__ __forceinline__ void snake_scalar_at(const scalar_t* x, const scalar_t* xb, scalar_t* y, scalar_t* sum,
                                                int64_t idx, const SnakeChannel<acc_t>& ch) {
  scalar_t s;
  y[idx] = snake_element<acc_t, MODE>(x[idx], MODE == 1 ? xb[idx] : x[idx], ch, s);
  if (MODE == 1) sum[idx] = s;
}

// element-wise path: grid (T / (kThreads * kUnroll), min(rows, max_grid_y)), rows looped over gridDim.y
template <typename scalar_t, int MODE>
__global__ void snake_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xb,
                                 const typename AccOf<scalar_t>::type* __restrict__ alpha,
                                 const typename AccOf<scalar_t>::type* __restrict__ scale,
                                 const typename AccOf<scalar_t>::type* __restrict__ bias, scalar_t* __restrict__ y,
                                 scalar_t* __restrict__ sum, int64_t rows, int64_t C, int64_t T) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t t_base = static_cast<int64_t>(blockIdx.x) * blockDim.x * kUnroll + threadIdx.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const SnakeChannel<acc_t> ch = snake_channel<acc_t, MODE>(alpha, scale, bias, row % C);
    const int64_t base = row * T;
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t t = t_base + static_cast<int64_t>(j) * blockDim.x;
      if (t < T) {
        snake_scalar_at<acc_t, MODE>(x, xb, y, sum, base + t, ch);
      }
    }
  }
}

template <typename T>
struct alignas(16) Pack8 {
  T v[kPack];
};

template <typename T>
__device__ __forceinline__ Pack8<T> load_pack(const T* p) {
  DAC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "misaligned 128-bit load");
  return *reinterpret_cast<const Pack8<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack8<T>& v) {
  DAC_DEVICE_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "misaligned 128-bit store");
  *reinterpret_cast<Pack8<T>*>(p) = v;
}

// elements before the first 16-byte boundary of a row (at most kPack - 1, at most T)
template <typename T>
__device__ __forceinline__ int64_t pack_head(const T* row, int64_t T_len) {
  const int64_t mis = static_cast<int64_t>(reinterpret_cast<uintptr_t>(row) % 16) / static_cast<int64_t>(sizeof(T));
  const int64_t head = mis == 0 ? 0 : kPack - mis;
  return head < T_len ? head : T_len;
}

// 16-bit path with 128-bit loads and stores: per row a scalar head up to the first 16-byte boundary,
// 8-element packs over a grid-stride loop, a scalar tail. The host picks it only when every pointer has
// x's alignment modulo 16 bytes, so one head length fits all arrays of a row.
template <typename scalar_t, int MODE>
__global__ void snake_fwd_pack_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ xb,
                                      const float* __restrict__ alpha, const float* __restrict__ scale,
                                      const float* __restrict__ bias, scalar_t* __restrict__ y, scalar_t* __restrict__ sum,
                                      int64_t rows, int64_t C, int64_t T) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const SnakeChannel<float> ch = snake_channel<float, MODE>(alpha, scale, bias, row % C);
    const int64_t base = row * T;
    const int64_t head = pack_head(x + base, T);
    const int64_t packs = (T - head) / kPack;
    const int64_t tail = head + packs * kPack;
    // scalar head and tail, fewer than kPack elements each: the grid's first threads
    if (tid < head) snake_scalar_at<float, MODE>(x, xb, y, sum, base + tid, ch);
    if (tail + tid < T) snake_scalar_at<float, MODE>(x, xb, y, sum, base + tail + tid, ch);
    for (int64_t p = tid; p < packs; p += stride) {
      const int64_t idx = base + head + p * kPack;
      const Pack8<scalar_t> xv = load_pack(x + idx);
      const Pack8<scalar_t> bv = MODE == 1 ? load_pack(xb + idx) : xv;
      Pack8<scalar_t> yv, sv;
#pragma unroll
      for (int k = 0; k < kPack; ++k) yv.v[k] = snake_element<float, MODE>(xv.v[k], bv.v[k], ch, sv.v[k]);
      store_pack(y + idx, yv);
      if (MODE == 1) store_pack(sum + idx, sv);
    }
  }
}

// sum of v over the block; the result is valid in thread 0. smem: one slot per warp.
template <typename acc_t, typename SharedSlots>
__device__ __forceinline__ acc_t block_sum(acc_t v, SharedSlots smem) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  acc_t tot = acc_t(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < static_cast<int>(blockDim.x / kWarp); ++w) tot += smem[w];
  }
  __syncthreads();  // smem is rewritten for the next row
  return tot;
}

// one element of the backward: writes grad_x, returns the element's grad_alpha term
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t snake_bwd_element(scalar_t gv_, scalar_t xv_, acc_t al, acc_t inv, scalar_t& gx) {
  const acc_t xv = static_cast<acc_t>(xv_), gv = static_cast<acc_t>(gv_);
  acc_t s, co;
  dsincos(snake_arg<acc_t>(al, xv), &s, &co);
  gx = static_cast<scalar_t>(snake_grad_x<acc_t>(gv, al, s, co, inv));
  return snake_grad_alpha_term<acc_t>(gv, xv, s, co, inv);
}

template <typename scalar_t>
__global__ void snake_bwd_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                 const typename AccOf<scalar_t>::type* __restrict__ alpha, scalar_t* __restrict__ gx,
                                 typename AccOf<scalar_t>::type* __restrict__ galpha, int64_t rows, int64_t C, int64_t T) {
  using acc_t = typename AccOf<scalar_t>::type;
  DAC_SHARED_ARRAY(acc_t, smem, kThreads / kWarp);
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
      if (t < T) part += snake_bwd_element<acc_t>(g[base + t], x[base + t], al, inv, gx[base + t]);
    }
    const acc_t tot = block_sum<acc_t>(part, smem);
    if (threadIdx.x == 0) atomicAdd(galpha + c, tot);
  }
}

// 16-bit backward with 128-bit loads and stores; the row layout of snake_fwd_pack_kernel
template <typename scalar_t>
__global__ void snake_bwd_pack_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                      const float* __restrict__ alpha, scalar_t* __restrict__ gx, float* __restrict__ galpha,
                                      int64_t rows, int64_t C, int64_t T) {
  DAC_SHARED_ARRAY(float, smem, kThreads / kWarp);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t c = row % C;
    const float al = alpha[c];
    const float inv = snake_inv_alpha<float>(al);
    const int64_t base = row * T;
    const int64_t head = pack_head(x + base, T);
    const int64_t packs = (T - head) / kPack;
    const int64_t tail = head + packs * kPack;
    float part = 0.0f;
    if (tid < head) part += snake_bwd_element<float>(g[base + tid], x[base + tid], al, inv, gx[base + tid]);
    if (tail + tid < T) part += snake_bwd_element<float>(g[base + tail + tid], x[base + tail + tid], al, inv, gx[base + tail + tid]);
    for (int64_t p = tid; p < packs; p += stride) {
      const int64_t idx = base + head + p * kPack;
      const Pack8<scalar_t> gv = load_pack(g + idx), xv = load_pack(x + idx);
      Pack8<scalar_t> out;
#pragma unroll
      for (int k = 0; k < kPack; ++k) part += snake_bwd_element<float>(gv.v[k], xv.v[k], al, inv, out.v[k]);
      store_pack(gx + idx, out);
    }
    const float tot = block_sum<float>(part, smem);
    if (threadIdx.x == 0) atomicAdd(galpha + c, tot);
  }
}

// --------------------------------------------------------------------------------------------- RVQ
// Reduce each lane's best (value, index) over the warp; every lane ends with the same winner
// (rvq_better is a strict total order). bi < 0: the lane saw no candidate.
__device__ __forceinline__ void warp_best(float& bv, int64_t& bi) {
  for (int o = kWarp / 2; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
    const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
    if (oi >= 0 && (bi < 0 || rvq_better<float>(ov, oi, bv, bi))) {
      bv = ov;
      bi = oi;
    }
  }
}

// one warp per row of the similarity matrix M (R, K)
__global__ void rvq_argmax_kernel(const float* __restrict__ M, const float* __restrict__ l2, const float* __restrict__ cn2,
                                  int64_t* __restrict__ codes, int64_t R, int64_t K) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (warp >= R) return;  // whole warp exits together
  const float* row = M + warp * K;
  const float l2v = l2[warp];
  float bv = std::numeric_limits<float>::quiet_NaN();
  int64_t bi = -1;
  for (int64_t k = lane; k < K; k += kWarp) {
    const float v = rvq_score<float>(l2v, row[k], cn2[k]);
    if (bi < 0 || rvq_better<float>(v, k, bv, bi)) {
      bv = v;
      bi = k;
    }
  }
  warp_best(bv, bi);
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

// Fast mode: one warp per time step (b, t), all codebooks in sequence. Per codebook the block stages
// it in shared memory, each warp takes its time steps, the lanes split the K entries and agree on the
// best one by shuffles; lanes 0..7 write the chosen vector. Earlier codebooks' vectors are read back
// from Q (written by this block before the __syncthreads that starts the codebook).
__global__ void rvq_fast_kernel(const float* __restrict__ e0, const float* __restrict__ inb, const float* __restrict__ A,
                                const float* __restrict__ cc, const float* __restrict__ cbn, const float* __restrict__ cn2,
                                const float* __restrict__ cb, int64_t* __restrict__ codes, float* __restrict__ lat,
                                float* __restrict__ Q, int64_t B, int64_t n, int64_t T) {
  constexpr int D8 = kCodebookDim, K = kCodebookSize;
  DAC_DYNAMIC_SHARED(float, sm);
  auto s_cbn = sm;           // K * 8
  auto s_cn2 = sm + K * D8;  // K
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t warps = blockDim.x / kWarp;
  const int64_t first_step = static_cast<int64_t>(blockIdx.x) * warps * kRvqFastStepsPerWarp;
  const int64_t block_end = first_step + warps * kRvqFastStepsPerWarp;
  const int64_t end_step = block_end < B * T ? block_end : B * T;
  for (int64_t i = 0; i < n; ++i) {
    __syncthreads();  // the previous codebook's reads of shared memory and writes of Q are done
    for (int k = threadIdx.x; k < K * D8; k += blockDim.x) s_cbn[k] = cbn[i * K * D8 + k];
    for (int k = threadIdx.x; k < K; k += blockDim.x) s_cn2[k] = cn2[i * K + k];
    __syncthreads();
    for (int64_t bt = first_step + warp; bt < end_step; bt += warps) {
      const int64_t b = bt / T, t = bt % T;
      const int64_t col = b * n * D8 * T + t;  // Q/lat/e0 element (b, 0, t); channel c adds c * T
      float e0v[D8], corr[D8], e[D8], en[D8], qj[D8];
#pragma unroll
      for (int k = 0; k < D8; ++k) {
        e0v[k] = e0[col + (i * D8 + k) * T];
        corr[k] = 0.0f;
      }
      for (int64_t j = 0; j < i; ++j) {
#pragma unroll
        for (int k = 0; k < D8; ++k) qj[k] = Q[col + (j * D8 + k) * T];
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
      float bv = 0.0f;
      int64_t bi = -1;
      for (int k = lane; k < K; k += kWarp) {
        float ck[D8];
#pragma unroll
        for (int d = 0; d < D8; ++d) ck[d] = s_cbn[k * D8 + d];
        const float v = rvq_score<float>(l2, rvq_dot8<float>(en, ck), s_cn2[k]);
        if (bi < 0 || rvq_better<float>(v, k, bv, bi)) {
          bv = v;
          bi = k;
        }
      }
      warp_best(bv, bi);
      if (lane == 0) codes[(b * n + i) * T + t] = bi;
      if (lane < D8) {
        float e_lane = e[0];
#pragma unroll
        for (int k = 1; k < D8; ++k) e_lane = lane == k ? e[k] : e_lane;  // no local-memory indexing
        Q[col + (i * D8 + lane) * T] = cb[(i * K + bi) * D8 + lane];
        lat[col + (i * D8 + lane) * T] = e_lane;
      }
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
    Q[idx] = rvq_gather_element(cb + i * K * kCodebookDim, codes[bi * T + t], K, k);
  }
}

// ---------------------------------------------------------------------------------- launch shapes
inline LaunchConfig row_launch(int64_t rows, int64_t per_row_blocks, const LaunchLimits& lim) {
  TORCH_CHECK(per_row_blocks <= std::numeric_limits<int32_t>::max(), "dac_fast: a row is too long for one launch");
  const int64_t gy = std::min<int64_t>(rows, lim.max_grid_y);
  return {dim3(static_cast<unsigned>(per_row_blocks), static_cast<unsigned>(gy), 1), dim3(kThreads, 1, 1), 0};
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline LaunchConfig flat_launch(int64_t n, const LaunchLimits& lim) {
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kThreads), lim.max_blocks));
  return {dim3(static_cast<unsigned>(blocks), 1, 1), dim3(kThreads, 1, 1), 0};
}

inline LaunchConfig rvq_argmax_launch(int64_t R) {
  const int64_t blocks = ceil_div(R, kThreads / kWarp);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dac_fast::rvq_encode: too many rows");
  return {dim3(static_cast<unsigned>(blocks), 1, 1), dim3(kThreads, 1, 1), 0};
}

inline LaunchConfig rvq_fast_launch(int64_t steps) {
  const int64_t blocks = ceil_div(steps, (kThreads / kWarp) * kRvqFastStepsPerWarp);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dac_fast::rvq_encode: too many time steps");
  return {dim3(static_cast<unsigned>(blocks), 1, 1), dim3(kThreads, 1, 1),
          sizeof(float) * (kCodebookSize * kCodebookDim + kCodebookSize)};
}

// 128-bit path only for 16-bit types, and only when all arrays share x's alignment modulo 16 bytes
template <typename scalar_t>
bool packs_fit(const void* x, std::initializer_list<const void*> others) {
  if (sizeof(scalar_t) != 2) return false;
  for (const void* p : others) {
    if (p != nullptr && (reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(x)) % 16 != 0) return false;
  }
  return true;
}

// ------------------------------------------------------------------------ launches (tensor level)
// Inputs as validated by the front ends in csrc/dac_fast.cpp; empty inputs launch nothing (CUDA
// rejects a grid with a zero dimension).
template <typename scalar_t, int MODE>
void launch_snake_fwd_mode(const SnakeArgs& a, const LaunchLimits& lim) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t C = a.x.size(1), T = a.x.size(2), rows = a.x.size(0) * C;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* xb = MODE == 1 ? a.b.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* al = a.alpha.const_data_ptr<acc_t>();
  const acc_t* sc = MODE == 2 ? a.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bi = MODE == 2 ? a.bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  scalar_t* s = MODE == 1 ? a.sum.mutable_data_ptr<scalar_t>() : nullptr;
  if constexpr (sizeof(scalar_t) == 2) {
    if (packs_fit<scalar_t>(x, {xb, y, s})) {
      const int64_t per_row = std::min<int64_t>(ceil_div(ceil_div(T, kPack), kThreads), lim.max_blocks);
      launch_kernel(row_launch(rows, per_row, lim), snake_fwd_pack_kernel<scalar_t, MODE>, x, xb, al, sc, bi, y, s, rows, C, T);
      return;
    }
  }
  launch_kernel(row_launch(rows, ceil_div(T, kThreads * kUnroll), lim), snake_fwd_kernel<scalar_t, MODE>, x, xb, al, sc, bi,
                y, s, rows, C, T);
}

inline void launch_snake_fwd(const SnakeArgs& a, const LaunchLimits& lim = {}) {
  if (a.x.numel() == 0) return;
  const int mode = a.b.defined() ? 1 : (a.scale.defined() ? 2 : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dac_fast_snake_fwd_cuda", [&] {
    if (mode == 0) launch_snake_fwd_mode<scalar_t, 0>(a, lim);
    else if (mode == 1) launch_snake_fwd_mode<scalar_t, 1>(a, lim);
    else launch_snake_fwd_mode<scalar_t, 2>(a, lim);
  });
}

template <typename scalar_t>
void launch_snake_bwd_typed(const at::Tensor& g, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& gx,
                            const at::Tensor& galpha, const LaunchLimits& lim) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t C = x.size(1), T = x.size(2), rows = x.size(0) * C;
  const scalar_t* gp = g.const_data_ptr<scalar_t>();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const acc_t* al = alpha.const_data_ptr<acc_t>();
  scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
  acc_t* gap = galpha.mutable_data_ptr<acc_t>();
  if constexpr (sizeof(scalar_t) == 2) {
    if (packs_fit<scalar_t>(xp, {gp, gxp})) {
      const int64_t per_row = std::min<int64_t>(ceil_div(ceil_div(T, kPack), kThreads), lim.max_blocks);
      launch_kernel(row_launch(rows, per_row, lim), snake_bwd_pack_kernel<scalar_t>, gp, xp, al, gxp, gap, rows, C, T);
      return;
    }
  }
  launch_kernel(row_launch(rows, ceil_div(T, kThreads * kUnroll), lim), snake_bwd_kernel<scalar_t>, gp, xp, al, gxp, gap, rows,
                C, T);
}

inline void launch_snake_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& gx,
                             const at::Tensor& galpha, const LaunchLimits& lim = {}) {
  if (x.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dac_fast_snake_bwd_cuda",
                                  [&] { launch_snake_bwd_typed<scalar_t>(g, x, alpha, gx, galpha, lim); });
}

// codes[r] = argmax_k score(l2[r], enc[r] . cbn[k], cn2[k]); the similarity GEMM is the reference's (enc @ cbn^T)
inline void launch_rvq_argmax(const at::Tensor& enc, const at::Tensor& cbn, const at::Tensor& l2, const at::Tensor& cn2,
                              const at::Tensor& codes) {
  const int64_t R = enc.size(0), K = cbn.size(0);
  if (R == 0) return;
  const at::Tensor M = enc.mm(cbn.t()).contiguous();
  launch_kernel(rvq_argmax_launch(R), rvq_argmax_kernel, M.const_data_ptr<float>(), l2.const_data_ptr<float>(),
                cn2.const_data_ptr<float>(), codes.mutable_data_ptr<int64_t>(), R, K);
}

inline void launch_rvq_update(const at::Tensor& r_in, const at::Tensor& o, const at::Tensor& r_out, const at::Tensor& q,
                              bool first, const LaunchLimits& lim = {}) {
  const int64_t n = o.numel();
  if (n == 0) return;
  launch_kernel(flat_launch(n, lim), rvq_update_kernel, r_in.const_data_ptr<float>(), o.const_data_ptr<float>(),
                r_out.defined() ? r_out.mutable_data_ptr<float>() : nullptr, q.mutable_data_ptr<float>(), first, n);
}

inline void launch_rvq_fast(const RvqFastArgs& a) {
  const int64_t B = a.codes.size(0), n = a.codes.size(1), T = a.codes.size(2);
  if (B * T == 0) return;
  launch_kernel(rvq_fast_launch(B * T), rvq_fast_kernel, a.e0.const_data_ptr<float>(), a.in_b.const_data_ptr<float>(),
                a.A.const_data_ptr<float>(), a.c.const_data_ptr<float>(), a.cbn.const_data_ptr<float>(),
                a.cn2.const_data_ptr<float>(), a.cb.const_data_ptr<float>(), a.codes.mutable_data_ptr<int64_t>(),
                a.latents.mutable_data_ptr<float>(), a.Q.mutable_data_ptr<float>(), B, n, T);
}

inline void launch_rvq_gather(const at::Tensor& codes, const at::Tensor& cb, const at::Tensor& Q, const LaunchLimits& lim = {}) {
  const int64_t total = Q.numel();
  if (total == 0) return;
  launch_kernel(flat_launch(total, lim), rvq_gather_kernel, codes.const_data_ptr<int64_t>(), cb.const_data_ptr<float>(),
                Q.mutable_data_ptr<float>(), codes.size(1), codes.size(2), cb.size(1), total);
}

}  // namespace kernels
}  // namespace dac_fast
