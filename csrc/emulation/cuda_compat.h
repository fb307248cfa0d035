// Test-only CPU emulation of the CUDA execution model: just enough of CUDA's device-side language for
// csrc/cuda/kernels.cuh to compile with g++ and run as CUDA would run it (see runtime.cpp):
//  * every thread of a block is a real std::thread, so barriers and shuffles really synchronize;
//  * __syncthreads is a block barrier that fails on divergence (some threads finished the block while
//    others wait) and on a timeout (deadlock) instead of hanging;
//  * __shfl_*_sync exchange values among the lanes named in the mask, which must all arrive;
//  * shared memory is poisoned before each block and every access is checked: reading a word no thread
//    wrote in this block, or one another thread wrote (or writing one another thread read or wrote)
//    since the last __syncthreads, fails the launch;
//  * atomics are serialized.
// Not emulated: the memory model beyond barriers, warp scheduling, performance, device math precision.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#define DAC_FAST_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

extern thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

// Run `body` as the kernel of a launch<<<grid, block, shared_bytes>>>; throws std::runtime_error
// with the first failure (bad launch shape, deadlock, divergence, shared-memory error, device check).
void run(dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);
void set_timeout_ms(int64_t ms);  // how long a thread may wait at a barrier or shuffle

[[noreturn]] void device_fail(const char* what);

// shared memory
struct Region;
Region* shared_region(size_t bytes, bool dynamic);
unsigned char* region_data(Region* r);
size_t region_bytes(Region* r);
void check_read(Region* r, size_t offset, size_t bytes);
void check_write(Region* r, size_t offset, size_t bytes);

template <typename T>
struct SharedRef {
  Region* r;
  size_t off;
  operator T() const {
    check_read(r, off, sizeof(T));
    T v;
    std::memcpy(&v, region_data(r) + off, sizeof(T));
    return v;
  }
  SharedRef& operator=(T v) {
    check_write(r, off, sizeof(T));
    std::memcpy(region_data(r) + off, &v, sizeof(T));
    return *this;
  }
  SharedRef& operator=(const SharedRef& o) { return *this = static_cast<T>(o); }
  SharedRef& operator+=(T v) { return *this = static_cast<T>(*this) + v; }
};

// a typed view of a shared-memory region: indexing and offsets only, every access checked
template <typename T>
struct Shared {
  Region* r;
  int64_t base;  // elements
  SharedRef<T> operator[](int64_t i) const {
    const int64_t e = base + i;
    if (e < 0 || static_cast<size_t>(e + 1) * sizeof(T) > region_bytes(r)) device_fail("shared memory index out of bounds");
    return SharedRef<T>{r, static_cast<size_t>(e) * sizeof(T)};
  }
  Shared operator+(int64_t i) const { return Shared{r, base + i}; }
};

template <typename T>
Shared<T> shared_array(int64_t n) {
  return Shared<T>{shared_region(static_cast<size_t>(n) * sizeof(T), false), 0};
}
template <typename T>
Shared<T> dynamic_shared() {
  return Shared<T>{shared_region(0, true), 0};
}

// warp exchange: every lane in `mask` passes its value and receives src_lane's
uint64_t warp_exchange(unsigned mask, uint64_t value, int src_lane, const char* op);
int lane_id();
void barrier();
void atomic_lock();
void atomic_unlock();

template <typename T>
T shuffle(unsigned mask, T v, int src, const char* op) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a type wider than 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_exchange(mask, bits, src, op);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace emu

#define DAC_SHARED_ARRAY(T, name, n) const auto name = ::emu::shared_array<T>(n)
#define DAC_DYNAMIC_SHARED(T, name) const auto name = ::emu::dynamic_shared<T>()
#define DAC_DEVICE_CHECK(cond, msg) ((cond) ? (void)0 : ::emu::device_fail(msg))

inline void __syncthreads() { emu::barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)emu::warp_exchange(mask, 0, emu::lane_id(), "__syncwarp"); }

template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  if (width != 32) emu::device_fail("__shfl_sync: only width 32 is emulated");
  return emu::shuffle(mask, v, src & 31, "__shfl_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  if (width != 32) emu::device_fail("__shfl_xor_sync: only width 32 is emulated");
  return emu::shuffle(mask, v, (emu::lane_id() ^ lane_mask) & 31, "__shfl_xor_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  if (width != 32) emu::device_fail("__shfl_down_sync: only width 32 is emulated");
  const int src = emu::lane_id() + static_cast<int>(delta);
  return emu::shuffle(mask, v, src < 32 ? src : emu::lane_id(), "__shfl_down_sync");
}

template <typename T>
T atomicAdd(T* address, T v) {
  emu::atomic_lock();
  const T old = *address;
  *address = old + v;
  emu::atomic_unlock();
  return old;
}
