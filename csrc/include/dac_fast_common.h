// Shared definitions for the dac_fast kernels: host/device qualifiers usable from plain C++.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DAC_HD __host__ __device__ __forceinline__
#else
#define DAC_HD inline
#endif

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DAC_UNROLL _Pragma("unroll")
#elif defined(__clang__)
#define DAC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define DAC_UNROLL _Pragma("GCC unroll 8")
#else
#define DAC_UNROLL
#endif
