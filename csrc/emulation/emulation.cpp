// Test-only build of the CUDA kernels (csrc/cuda/kernels.cuh) on the CPU emulation of the CUDA
// execution model (cuda_compat.h, runtime.cpp). Built by tests/test_cuda_emulation.py with
// torch.utils.cpp_extension.load; never shipped. Registers torch.ops.dac_fast_emu.*: one op per kernel
// launch of kernels.cuh, taking the inputs the front ends of csrc/dac_fast.cpp pass to the CUDA entry
// points, plus bad_kernel(name) for the negative tests.
//
// Outputs are allocated inside a guard band poisoned with 0xff bytes (NaN / -1): unwritten outputs
// show up as NaN or -1, writes outside an output fail the op.
#include "cuda_compat.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "../cuda/kernels.cuh"
#include "bad_kernels.cuh"

namespace dac_fast {
namespace kernels {

template <typename... Params, typename... Args>
void launch_kernel(const LaunchConfig& cfg, void (*kernel)(Params...), Args... args) {
  emu::run(cfg.grid, cfg.block, cfg.shared_bytes, [&] { kernel(args...); });
}

}  // namespace kernels

namespace emulation {
namespace {

using at::Tensor;
constexpr int64_t kGuard = 64;  // elements on each side; 128 bytes for 16-bit types keeps 16-byte alignment

struct Guarded {
  Tensor buf, view;
};

Guarded guarded_empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (int64_t s : sizes) n *= s;
  Guarded g;
  g.buf = at::empty({n + 2 * kGuard}, opt);
  g.buf.view(at::kByte).fill_(255);
  g.view = g.buf.narrow(0, kGuard, n).view(sizes);
  return g;
}

Guarded guarded_copy(const Tensor& t) {
  Guarded g = guarded_empty(t.sizes(), t.options());
  g.view.copy_(t);
  return g;
}

void check_guard(const Guarded& g, const char* name) {
  const int64_t n = g.view.numel();
  const bool intact = g.buf.narrow(0, 0, kGuard).view(at::kByte).eq(255).all().item<bool>() &&
                      g.buf.narrow(0, kGuard + n, kGuard).view(at::kByte).eq(255).all().item<bool>();
  TORCH_CHECK(intact, "CUDA emulation: the kernel wrote outside its output `", name, "`");
}

kernels::LaunchLimits limits(int64_t max_grid_y, int64_t max_blocks) {
  kernels::LaunchLimits lim;
  if (max_grid_y > 0) lim.max_grid_y = max_grid_y;
  if (max_blocks > 0) lim.max_blocks = max_blocks;
  return lim;
}

std::tuple<Tensor, Tensor> snake_fwd(const Tensor& x, const std::optional<Tensor>& b, const std::optional<Tensor>& scale,
                                     const std::optional<Tensor>& bias, const Tensor& alpha, int64_t max_grid_y,
                                     int64_t max_blocks) {
  SnakeArgs a;
  a.x = x;
  if (b) a.b = *b;
  if (scale) a.scale = *scale;
  if (bias) a.bias = *bias;
  a.alpha = alpha;
  Guarded y = guarded_empty(x.sizes(), x.options()), sum = guarded_empty(b ? x.sizes() : at::IntArrayRef{0}, x.options());
  a.y = y.view;
  if (b) a.sum = sum.view;
  kernels::launch_snake_fwd(a, limits(max_grid_y, max_blocks));
  check_guard(y, "y");
  check_guard(sum, "sum");
  return {y.view, sum.view};
}

std::tuple<Tensor, Tensor> snake_bwd(const Tensor& g, const Tensor& x, const Tensor& alpha, int64_t max_grid_y,
                                     int64_t max_blocks) {
  Guarded gx = guarded_empty(x.sizes(), x.options());
  Guarded ga = guarded_empty({x.size(1)}, alpha.options());
  ga.view.zero_();
  kernels::launch_snake_bwd(g, x, alpha, gx.view, ga.view, limits(max_grid_y, max_blocks));
  check_guard(gx, "grad_x");
  check_guard(ga, "grad_alpha");
  return {gx.view, ga.view};
}

Tensor rvq_argmax(const Tensor& enc, const Tensor& cbn, const Tensor& l2, const Tensor& cn2) {
  Guarded codes = guarded_empty({enc.size(0)}, enc.options().dtype(at::kLong));
  kernels::launch_rvq_argmax(enc, cbn, l2, cn2, codes.view);
  check_guard(codes, "codes");
  return codes.view;
}

std::tuple<Tensor, Tensor> rvq_update(const Tensor& r_in, const Tensor& o, const Tensor& q, bool first, bool write_residual,
                                      int64_t max_blocks) {
  Guarded r_out = guarded_empty(write_residual ? o.sizes() : at::IntArrayRef{0}, o.options());
  Guarded q_out = guarded_copy(q);  // read and written in place
  kernels::launch_rvq_update(r_in, o, write_residual ? r_out.view : Tensor(), q_out.view, first, limits(0, max_blocks));
  check_guard(r_out, "r_out");
  check_guard(q_out, "q");
  return {r_out.view, q_out.view};
}

std::tuple<Tensor, Tensor, Tensor> rvq_fast(const Tensor& e0, const Tensor& in_b, const Tensor& A, const Tensor& c,
                                            const Tensor& cbn, const Tensor& cn2, const Tensor& cb) {
  const int64_t B = e0.size(0), n = in_b.size(0), T = e0.size(2);
  Guarded codes = guarded_empty({B, n, T}, e0.options().dtype(at::kLong));
  Guarded latents = guarded_empty(e0.sizes(), e0.options()), Q = guarded_empty(e0.sizes(), e0.options());
  RvqFastArgs a;
  a.e0 = e0;
  a.in_b = in_b;
  a.A = A;
  a.c = c;
  a.cbn = cbn;
  a.cn2 = cn2;
  a.cb = cb;
  a.codes = codes.view;
  a.latents = latents.view;
  a.Q = Q.view;
  kernels::launch_rvq_fast(a);
  check_guard(codes, "codes");
  check_guard(latents, "latents");
  check_guard(Q, "Q");
  return {codes.view, latents.view, Q.view};
}

Tensor rvq_gather(const Tensor& codes, const Tensor& cb, int64_t max_blocks) {
  Guarded Q = guarded_empty({codes.size(0), codes.size(1) * kCodebookDim, codes.size(2)}, cb.options());
  kernels::launch_rvq_gather(codes, cb, Q.view, limits(0, max_blocks));
  check_guard(Q, "Q");
  return Q.view;
}

Tensor bad_kernel(const std::string& name) {
  using kernels::LaunchConfig;
  const LaunchConfig one_block{dim3(1), dim3(64), 0};
  Guarded out = guarded_empty({100}, at::TensorOptions().dtype(at::kFloat));
  float* p = out.view.mutable_data_ptr<float>();
  if (name == "divergent_barrier") kernels::launch_kernel(one_block, bad_kernels::divergent_barrier_kernel, p);
  else if (name == "shuffle_deadlock") kernels::launch_kernel(one_block, bad_kernels::shuffle_deadlock_kernel, p);
  else if (name == "uninitialized_shared") kernels::launch_kernel(one_block, bad_kernels::uninitialized_shared_kernel, p);
  else if (name == "missing_barrier") kernels::launch_kernel(one_block, bad_kernels::missing_barrier_kernel, p);
  else if (name == "out_of_bounds") kernels::launch_kernel(LaunchConfig{dim3(2), dim3(64), 0}, bad_kernels::out_of_bounds_kernel, p, int64_t{100});
  else TORCH_CHECK(false, "bad_kernel: unknown kernel ", name);
  check_guard(out, "out");
  return out.view;
}

void set_timeout_ms(int64_t ms) { emu::set_timeout_ms(ms); }

}  // namespace
}  // namespace emulation
}  // namespace dac_fast

TORCH_LIBRARY(dac_fast_emu, m) {
  using namespace dac_fast::emulation;
  m.def("snake_fwd(Tensor x, Tensor? b, Tensor? scale, Tensor? bias, Tensor alpha, int max_grid_y=0, int max_blocks=0) -> (Tensor, Tensor)",
        &snake_fwd);
  m.def("snake_bwd(Tensor grad, Tensor x, Tensor alpha, int max_grid_y=0, int max_blocks=0) -> (Tensor, Tensor)", &snake_bwd);
  m.def("rvq_argmax(Tensor enc, Tensor cbn, Tensor l2, Tensor cn2) -> Tensor", &rvq_argmax);
  m.def("rvq_update(Tensor r_in, Tensor o, Tensor q, bool first, bool write_residual, int max_blocks=0) -> (Tensor, Tensor)",
        &rvq_update);
  m.def("rvq_fast(Tensor e0, Tensor in_b, Tensor A, Tensor c, Tensor cbn, Tensor cn2, Tensor cb) -> (Tensor, Tensor, Tensor)",
        &rvq_fast);
  m.def("rvq_gather(Tensor codes, Tensor cb, int max_blocks=0) -> Tensor", &rvq_gather);
  m.def("bad_kernel(str name) -> Tensor", &bad_kernel);
  m.def("set_timeout_ms(int ms) -> ()", &set_timeout_ms);
}
