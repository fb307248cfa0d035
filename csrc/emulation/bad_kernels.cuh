// Deliberately wrong kernels, compiled only into the emulation test build: the tests prove that the
// emulation fails each of them (instead of hanging or passing) with a message naming the fault.
#pragma once

namespace dac_fast {
namespace bad_kernels {

// half of the block waits at a barrier the other half never reaches
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// lane 31 of each warp waits at __syncthreads while its warp waits for it in a shuffle: a deadlock
__global__ void shuffle_deadlock_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 == 31) __syncthreads();
  else v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// the last thread reads a shared slot nobody wrote
__global__ void uninitialized_shared_kernel(float* out) {
  DAC_SHARED_ARRAY(float, s, 65);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x + 1];
}

// reads a neighbour's shared slot without the barrier in between
__global__ void missing_barrier_kernel(float* out) {
  DAC_SHARED_ARRAY(float, s, 64);
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

// off-by-one bound: writes out[n] (out has n = 100 elements, the grid 128 threads)
__global__ void out_of_bounds_kernel(float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i <= n) out[i] = 1.0f;
}

}  // namespace bad_kernels
}  // namespace dac_fast
