// CUDA build of the dac_fast kernels. The kernel bodies and their launch shapes are in kernels.cuh,
// shared with the test-only CPU emulation (csrc/emulation); this file adds the device guard, the
// stream and the launch itself. The operator front ends are in csrc/dac_fast.cpp.
// Built with --fmad=false so the Snake arithmetic rounds like the CPU path.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "kernels.cuh"

namespace dac_fast {
namespace kernels {

template <typename... Params, typename... Args>
void launch_kernel(const LaunchConfig& cfg, void (*kernel)(Params...), Args... args) {
  kernel<<<cfg.grid, cfg.block, cfg.shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace kernels

void snake_fwd_cuda(const SnakeArgs& a) {
  c10::cuda::CUDAGuard guard(a.x.device());
  kernels::launch_snake_fwd(a);
}

void snake_bwd_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& gx,
                    const at::Tensor& galpha) {
  c10::cuda::CUDAGuard guard(x.device());
  kernels::launch_snake_bwd(g, x, alpha, gx, galpha);
}

void rvq_argmax_cuda(const at::Tensor& enc, const at::Tensor& cbn, const at::Tensor& l2, const at::Tensor& cn2,
                     const at::Tensor& codes) {
  c10::cuda::CUDAGuard guard(enc.device());
  kernels::launch_rvq_argmax(enc, cbn, l2, cn2, codes);
}

void rvq_update_cuda(const at::Tensor& r_in, const at::Tensor& o, const at::Tensor& r_out, const at::Tensor& q, bool first) {
  c10::cuda::CUDAGuard guard(o.device());
  kernels::launch_rvq_update(r_in, o, r_out, q, first);
}

void rvq_fast_cuda(const RvqFastArgs& a) {
  c10::cuda::CUDAGuard guard(a.e0.device());
  kernels::launch_rvq_fast(a);
}

void rvq_gather_cuda(const at::Tensor& codes, const at::Tensor& cb, const at::Tensor& Q) {
  c10::cuda::CUDAGuard guard(codes.device());
  kernels::launch_rvq_gather(codes, cb, Q);
}

}  // namespace dac_fast

TORCH_LIBRARY_IMPL(dac_fast, CUDA, m) { dac_fast::register_front_ends(m); }
