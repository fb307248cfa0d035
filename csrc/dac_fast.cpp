// dac_fast._C: operator schemas (declared once), the Python module stub, and the device-generic
// front ends that validate inputs, allocate outputs and call the CPU or CUDA kernels.
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>

#include "dac_fast_ops.h"
#include "rvq_math.h"

namespace {
// Module functions (not operators: they change allocator state, which torch.compile must not trace).
PyObject* py_buffer_cache_enter(PyObject*, PyObject*) { return PyBool_FromLong(dac_fast::buffer_cache_enter()); }
PyObject* py_buffer_cache_exit(PyObject*, PyObject*) {
  dac_fast::buffer_cache_exit();
  Py_RETURN_NONE;
}
PyObject* py_buffer_cache_bytes(PyObject*, PyObject*) { return PyLong_FromLongLong(dac_fast::buffer_cache_bytes()); }
PyMethodDef module_methods[] = {
    {"buffer_cache_enter", py_buffer_cache_enter, METH_NOARGS,
     "Start recycling freed CPU buffers (nestable); returns whether the cache is torch's CPU allocator now."},
    {"buffer_cache_exit", py_buffer_cache_exit, METH_NOARGS, "End one enter(); the outermost frees the cached buffers."},
    {"buffer_cache_bytes", py_buffer_cache_bytes, METH_NOARGS, "Bytes held in freed, cached buffers."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

extern "C" {
// `import dac_fast._C` loads this library; the operators register through TORCH_LIBRARY at load.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "dac_fast fused operators (torch.ops.dac_fast)", -1,
                                          module_methods};
  return PyModule_Create(&module_def);
}
}

namespace dac_fast {

bool poison_enabled() {
  const char* v = std::getenv("DAC_FAST_POISON");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

namespace {

Tensor new_like(const Tensor& x, at::ScalarType dtype) {
  auto out = at::empty(x.sizes(), x.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
  if (poison_enabled()) {
    if (at::isFloatingType(dtype)) out.fill_(std::numeric_limits<double>::quiet_NaN());
    else out.fill_(-1);
  }
  return out;
}

Tensor new_empty(at::IntArrayRef sizes, const Tensor& like, at::ScalarType dtype) {
  auto out = at::empty(sizes, like.options().dtype(dtype));
  if (poison_enabled()) {
    if (at::isFloatingType(dtype)) out.fill_(std::numeric_limits<double>::quiet_NaN());
    else out.fill_(-1);
  }
  return out;
}

bool is_cuda(const Tensor& t) { return t.device().is_cuda(); }

// Every tensor argument of an op on one device: the dispatcher picks the kernel from the arguments' devices
// together, so without this a mixed call would hand host pointers to a CUDA kernel (or the reverse).
void check_one_device(const char* op, std::initializer_list<std::pair<const char*, const Tensor*>> tensors) {
  const char* first_name = nullptr;
  const Tensor* first = nullptr;
  for (const auto& [name, t] : tensors) {
    if (!t->defined()) continue;
    if (first == nullptr) {
      first_name = name;
      first = t;
      continue;
    }
    TORCH_CHECK(t->device() == first->device(), "dac_fast::", op, ": all tensors must be on one device, but ", first_name,
                " is on ", first->device(), " and ", name, " is on ", t->device());
  }
}

[[noreturn]] [[maybe_unused]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "dac_fast::", op, ": this build of dac_fast._C has no CUDA kernels");
}

void check_snake_input(const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.defined(), "dac_fast::", op, ": ", name, " is undefined");
  TORCH_CHECK(x.dim() == 3, "dac_fast::", op, ": ", name, " must have shape (B, C, T), got ", x.sizes());
  auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble, "dac_fast::", op, ": ",
              name, " must be float32, float16, bfloat16 or float64, got ", dt);
}

// per-channel parameter -> contiguous fp32 (fp64 for fp64 x) vector of C elements
Tensor channel_param(const Tensor& p, const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(p.defined(), "dac_fast::", op, ": ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(p.scalar_type()), "dac_fast::", op, ": ", name, " must be floating point");
  const int64_t C = x.size(1);
  TORCH_CHECK(p.numel() == C, "dac_fast::", op, ": ", name, " must have C = ", C, " elements (shape (1, C, 1) or (C,)), got shape ",
              p.sizes());
  auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return p.reshape({C}).to(acc).contiguous();
}

void run_snake_fwd(const SnakeArgs& a) {
  if (a.x.numel() == 0) return;
  if (is_cuda(a.x)) {
#ifdef DAC_FAST_WITH_CUDA
    snake_fwd_cuda(a);
#else
    no_cuda("snake");
#endif
  } else {
    snake_fwd_cpu(a);
  }
}

}  // namespace

Tensor snake(const Tensor& x_, const Tensor& alpha) {
  check_one_device("snake", {{"x", &x_}, {"alpha", &alpha}});
  check_snake_input(x_, "snake", "x");
  SnakeArgs a;
  a.x = x_.contiguous();
  a.alpha = channel_param(alpha, a.x, "snake", "alpha");
  a.y = new_like(a.x, a.x.scalar_type());
  run_snake_fwd(a);
  return a.y;
}

std::tuple<Tensor, Tensor> add_snake(const Tensor& a_, const Tensor& b_, const Tensor& alpha) {
  check_one_device("add_snake", {{"a", &a_}, {"b", &b_}, {"alpha", &alpha}});
  check_snake_input(a_, "add_snake", "a");
  check_snake_input(b_, "add_snake", "b");
  TORCH_CHECK(a_.sizes() == b_.sizes(), "dac_fast::add_snake: a and b must have the same shape, got ", a_.sizes(), " and ",
              b_.sizes());
  TORCH_CHECK(a_.scalar_type() == b_.scalar_type(), "dac_fast::add_snake: a and b must have the same dtype, got ",
              a_.scalar_type(), " and ", b_.scalar_type());
  SnakeArgs a;
  a.x = a_.contiguous();
  a.b = b_.contiguous();
  a.alpha = channel_param(alpha, a.x, "add_snake", "alpha");
  a.y = new_like(a.x, a.x.scalar_type());
  a.sum = new_like(a.x, a.x.scalar_type());
  run_snake_fwd(a);
  return {a.sum, a.y};
}

Tensor scale_bias_snake(const Tensor& y_, const Tensor& scale, const Tensor& bias, const Tensor& alpha) {
  check_one_device("scale_bias_snake", {{"y", &y_}, {"scale", &scale}, {"bias", &bias}, {"alpha", &alpha}});
  check_snake_input(y_, "scale_bias_snake", "y");
  SnakeArgs a;
  a.x = y_.contiguous();
  a.scale = channel_param(scale, a.x, "scale_bias_snake", "scale");
  a.bias = channel_param(bias, a.x, "scale_bias_snake", "bias");
  a.alpha = channel_param(alpha, a.x, "scale_bias_snake", "alpha");
  a.y = new_like(a.x, a.x.scalar_type());
  run_snake_fwd(a);
  return a.y;
}

std::tuple<Tensor, Tensor> snake_backward(const Tensor& grad_, const Tensor& x_, const Tensor& alpha) {
  check_one_device("snake_backward", {{"grad", &grad_}, {"x", &x_}, {"alpha", &alpha}});
  check_snake_input(x_, "snake_backward", "x");
  check_snake_input(grad_, "snake_backward", "grad");
  TORCH_CHECK(grad_.sizes() == x_.sizes(), "dac_fast::snake_backward: grad has shape ", grad_.sizes(), " but x has ",
              x_.sizes());
  auto x = x_.contiguous();
  auto g = grad_.to(x.scalar_type()).contiguous();
  auto al = channel_param(alpha, x, "snake_backward", "alpha");
  auto gx = new_like(x, x.scalar_type());
  // grad_alpha accumulated in the math dtype, returned in alpha's dtype and shape
  auto ga = at::zeros({x.size(1)}, al.options());
  if (x.numel() > 0) {
    if (is_cuda(x)) {
#ifdef DAC_FAST_WITH_CUDA
      // grad_alpha's partial sums meet in atomicAdd, in whatever order the blocks finish
      at::globalContext().alertNotDeterministic("dac_fast::snake_backward on CUDA (grad_alpha is summed with atomicAdd)");
      snake_bwd_cuda(g, x, al, gx, ga);
#else
      no_cuda("snake_backward");
#endif
    } else {
      snake_bwd_cpu(g, x, al, gx, ga);
    }
  }
  return {gx, ga.to(alpha.scalar_type()).reshape(alpha.sizes())};
}

// ------------------------------------------------------------------------------------------ RVQ
namespace {

void check_rvq_weights(const Tensor& codebook, const Tensor& out_w, const Tensor& out_b, int64_t D, const char* op) {
  TORCH_CHECK(codebook.dim() == 3 && codebook.size(1) == kCodebookSize && codebook.size(2) == kCodebookDim, "dac_fast::", op,
              ": codebook must have shape (N, ", kCodebookSize, ", ", kCodebookDim, ") (the only shape the kernels support), got ",
              codebook.sizes());
  const int64_t N = codebook.size(0);
  TORCH_CHECK(out_w.dim() == 3 && out_w.size(0) == N && out_w.size(1) == D && out_w.size(2) == kCodebookDim, "dac_fast::", op,
              ": out_proj_weight must have shape (", N, ", ", D, ", ", kCodebookDim, "), got ", out_w.sizes());
  TORCH_CHECK(out_b.dim() == 2 && out_b.size(0) == N && out_b.size(1) == D, "dac_fast::", op,
              ": out_proj_bias must have shape (", N, ", ", D, "), got ", out_b.sizes());
  for (const Tensor* t : {&codebook, &out_w, &out_b}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "dac_fast::", op, ": weights must be float32, got ", t->scalar_type());
  }
}

// F.normalize(x, dim=1): x / max(||x||_2, 1e-12), the same ATen calls as torch.nn.functional
Tensor normalize_rows(const Tensor& x) {
  auto denom = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, true, std::nullopt).clamp_min(1e-12).expand_as(x);
  return at::div(x, denom);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> rvq_encode(const Tensor& z_, const Tensor& in_w, const Tensor& in_b,
                                              const Tensor& codebook, const Tensor& out_w, const Tensor& out_b,
                                              int64_t n, bool exact,
                                              const std::optional<Tensor>& normalized_codebook) {
  const char* op = "rvq_encode";
  check_one_device(op, {{"z", &z_}, {"in_proj_weight", &in_w}, {"in_proj_bias", &in_b}, {"codebook", &codebook},
                        {"out_proj_weight", &out_w}, {"out_proj_bias", &out_b}});
  // the caller's F.normalize(codebook, dim=-1), cached per weight version; else normalized here at every call
  const bool given = normalized_codebook.has_value() && normalized_codebook->defined();
  if (given) {
    check_one_device(op, {{"z", &z_}, {"normalized_codebook", &*normalized_codebook}});
    TORCH_CHECK(normalized_codebook->sizes() == codebook.sizes() &&
                    normalized_codebook->scalar_type() == codebook.scalar_type(),
                "dac_fast::rvq_encode: normalized_codebook must have the codebook's shape ", codebook.sizes(),
                " and dtype ", codebook.scalar_type(), ", got ", normalized_codebook->sizes(), " ",
                normalized_codebook->scalar_type());
  }
  TORCH_CHECK(z_.dim() == 3, "dac_fast::rvq_encode: z must have shape (B, D, T), got ", z_.sizes());
  TORCH_CHECK(z_.scalar_type() == at::kFloat, "dac_fast::rvq_encode: z must be float32, got ", z_.scalar_type());
  const int64_t B = z_.size(0), D = z_.size(1), T = z_.size(2);
  check_rvq_weights(codebook, out_w, out_b, D, op);
  const int64_t N = codebook.size(0);
  TORCH_CHECK(in_w.dim() == 3 && in_w.size(0) == N && in_w.size(1) == kCodebookDim && in_w.size(2) == D,
              "dac_fast::rvq_encode: in_proj_weight must have shape (", N, ", ", kCodebookDim, ", ", D, "), got ", in_w.sizes());
  TORCH_CHECK(in_b.dim() == 2 && in_b.size(0) == N && in_b.size(1) == kCodebookDim,
              "dac_fast::rvq_encode: in_proj_bias must have shape (", N, ", ", kCodebookDim, "), got ", in_b.sizes());
  for (const Tensor* t : {&in_w, &in_b}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "dac_fast::rvq_encode: weights must be float32, got ", t->scalar_type());
  }
  TORCH_CHECK(n >= 1 && n <= N, "dac_fast::rvq_encode: n_quantizers must be in [1, ", N, "], got ", n);
  const bool cuda = is_cuda(z_);
#ifndef DAC_FAST_WITH_CUDA
  if (cuda) no_cuda(op);
#endif
  auto z = z_.contiguous();
  auto codes = new_empty({B, n, T}, z, at::kLong);
  auto latents = new_empty({B, n * kCodebookDim, T}, z, at::kFloat);
  Tensor quantized;
  if (B * T == 0) {
    quantized = at::zeros_like(z);
    return {codes, quantized, latents};
  }

  if (exact) {
    // transformers' arithmetic, op for op, for everything that is not the (B*T, K) distance matrix:
    // the same ATen convolutions and normalizations on the same layouts. Fused: distance formula +
    // argmax (from the same GEMM), and the residual/quantized update.
    quantized = new_like(z, at::kFloat);
    Tensor residual = z;
    Tensor next_residual = n > 1 ? at::empty_like(z) : Tensor();
    auto idx_flat = at::empty({B * T}, z.options().dtype(at::kLong));
    for (int64_t i = 0; i < n; ++i) {
      auto projected = at::conv1d(residual, in_w[i].unsqueeze(-1), in_b[i]);  // (B, 8, T)
      latents.narrow(1, i * kCodebookDim, kCodebookDim).copy_(projected);
      auto enc = normalize_rows(projected.permute({0, 2, 1}).reshape({B * T, kCodebookDim}));
      auto cbn = given ? normalized_codebook->select(0, i) : normalize_rows(codebook[i]);
      auto l2 = enc.pow(2).sum(1).contiguous();
      auto cn2 = cbn.pow(2).sum(1).contiguous();
      if (cuda) {
#ifdef DAC_FAST_WITH_CUDA
        rvq_argmax_cuda(enc.contiguous(), cbn.contiguous(), l2, cn2, idx_flat);
#endif
      } else {
        rvq_argmax_cpu(enc.contiguous(), cbn.contiguous(), l2, cn2, idx_flat);
      }
      auto indices = idx_flat.view({B, T});
      codes.select(1, i).copy_(indices);
      auto q = at::embedding(codebook[i], indices).transpose(1, 2);
      // transformers' straight-through step, evaluated in eval mode too: q' = p + (q - p) (it rounds)
      auto qst = projected + (q - projected);
      auto out = at::conv1d(qst, out_w[i].unsqueeze(-1), out_b[i]).contiguous();
      const bool last = i == n - 1;
      Tensor r_out = last ? Tensor() : next_residual;
      if (cuda) {
#ifdef DAC_FAST_WITH_CUDA
        rvq_update_cuda(residual, out, r_out, quantized, i == 0);
#endif
      } else {
        rvq_update_cpu(residual, out, r_out, quantized, i == 0);
      }
      if (!last) {
        if (i == 0) {
          residual = next_residual;
          next_residual = n > 2 ? at::empty_like(z) : Tensor();
        } else {
          std::swap(residual, next_residual);
        }
      }
    }
    return {codes, quantized, latents};
  }

  // fast mode: one GEMM for all in-projections of z, 8x8 corrections per earlier codebook,
  // per-time-step argmax over all codebooks in one kernel, one GEMM for the reconstruction.
  RvqFastArgs a;
  auto Win = in_w.narrow(0, 0, n);                                      // (n, 8, D)
  auto Wout = out_w.narrow(0, 0, n);                                    // (n, D, 8)
  a.e0 = at::matmul(Win.reshape({n * kCodebookDim, D}), z).contiguous();  // (B, n*8, T)
  a.in_b = in_b.narrow(0, 0, n).contiguous();
  a.A = at::matmul(Win.unsqueeze(1), Wout.unsqueeze(0)).contiguous();                       // (n, n, 8, 8)
  a.c = at::matmul(Win.unsqueeze(1), out_b.narrow(0, 0, n).unsqueeze(-1).unsqueeze(0)).squeeze(-1).contiguous();  // (n, n, 8)
  auto cb = codebook.narrow(0, 0, n).contiguous();
  auto cbn = given ? normalized_codebook->narrow(0, 0, n)
                   : cb / at::linalg_vector_norm(cb, 2, at::IntArrayRef{2}, true, std::nullopt).clamp_min(1e-12);
  a.cbn = cbn.contiguous();
  a.cbnT = cbn.transpose(1, 2).contiguous();
  a.cn2 = cbn.pow(2).sum(2).contiguous();
  a.cb = cb;
  a.codes = codes;
  a.latents = latents;
  a.Q = new_empty({B, n * kCodebookDim, T}, z, at::kFloat);
  if (cuda) {
#ifdef DAC_FAST_WITH_CUDA
    rvq_fast_cuda(a);
#endif
  } else {
    rvq_fast_cpu(a);
  }
  auto Wcat = Wout.permute({1, 0, 2}).reshape({D, n * kCodebookDim});
  quantized = at::matmul(Wcat, a.Q).add_(out_b.narrow(0, 0, n).sum(0).view({1, D, 1}));
  return {codes, quantized, latents};
}

Tensor rvq_decode(const Tensor& codes_, const Tensor& codebook, const Tensor& out_w, const Tensor& out_b) {
  check_one_device("rvq_decode", {{"codes", &codes_}, {"codebook", &codebook}, {"out_proj_weight", &out_w},
                                  {"out_proj_bias", &out_b}});
  TORCH_CHECK(codes_.dim() == 3, "dac_fast::rvq_decode: codes must have shape (B, n, T), got ", codes_.sizes());
  TORCH_CHECK(!at::isFloatingType(codes_.scalar_type()) && codes_.scalar_type() != at::kBool,
              "dac_fast::rvq_decode: codes must be an integer tensor, got ", codes_.scalar_type());
  TORCH_CHECK(out_w.dim() == 3, "dac_fast::rvq_decode: out_proj_weight must have shape (N, D, 8), got ", out_w.sizes());
  const int64_t D = out_w.size(1);
  check_rvq_weights(codebook, out_w, out_b, D, "rvq_decode");
  const int64_t B = codes_.size(0), n = codes_.size(1), T = codes_.size(2), N = codebook.size(0);
  TORCH_CHECK(n >= 1 && n <= N, "dac_fast::rvq_decode: codes has ", n, " codebooks but the quantizer has ", N);
  auto codes = codes_.to(at::kLong).contiguous();
  if (codes.numel() > 0 && !is_cuda(codes)) {
    // on the CPU reading the bounds costs nothing; on CUDA it would be a host synchronisation, so there bad codes
    // give NaN rows instead (rvq_gather_element) and DacModel checks the range in its one batched read
    auto bounds = at::stack({codes.min(), codes.max()}).cpu();
    auto mn = bounds[0].item<int64_t>(), mx = bounds[1].item<int64_t>();
    TORCH_CHECK(mn >= 0 && mx < kCodebookSize, "dac_fast::rvq_decode: codes must be in [0, ", kCodebookSize, "), got values in [",
                mn, ", ", mx, "]");
  }
  auto Q = new_empty({B, n * kCodebookDim, T}, codebook, at::kFloat);
  auto cb = codebook.narrow(0, 0, n).contiguous();
  if (codes.numel() > 0) {
    if (is_cuda(codes)) {
#ifdef DAC_FAST_WITH_CUDA
      rvq_gather_cuda(codes, cb, Q);
#else
      no_cuda("rvq_decode");
#endif
    } else {
      rvq_gather_cpu(codes, cb, Q);
    }
  }
  auto Wcat = out_w.narrow(0, 0, n).permute({1, 0, 2}).reshape({D, n * kCodebookDim});
  return at::matmul(Wcat, Q).add_(out_b.narrow(0, 0, n).sum(0).view({1, D, 1}));
}

void register_front_ends(torch::Library& m) {
  m.impl("snake", &snake);
  m.impl("snake_backward", &snake_backward);
  m.impl("add_snake", &add_snake);
  m.impl("scale_bias_snake", &scale_bias_snake);
  m.impl("rvq_encode", &rvq_encode);
  m.impl("rvq_decode", &rvq_decode);
}

}  // namespace dac_fast

TORCH_LIBRARY(dac_fast, m) {
  m.def("snake(Tensor x, Tensor alpha) -> Tensor");
  m.def("snake_backward(Tensor grad, Tensor x, Tensor alpha) -> (Tensor, Tensor)");
  m.def("add_snake(Tensor a, Tensor b, Tensor alpha) -> (Tensor, Tensor)");
  m.def("scale_bias_snake(Tensor y, Tensor scale, Tensor bias, Tensor alpha) -> Tensor");
  m.def(
      "rvq_encode(Tensor z, Tensor in_proj_weight, Tensor in_proj_bias, Tensor codebook, Tensor out_proj_weight, "
      "Tensor out_proj_bias, int n_quantizers, bool exact, Tensor? normalized_codebook=None) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("rvq_decode(Tensor codes, Tensor codebook, Tensor out_proj_weight, Tensor out_proj_bias) -> Tensor");
}
