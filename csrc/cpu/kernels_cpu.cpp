// CPU kernels of dac_fast: parallel over cores with at::parallel_for, inner loops written for the
// compiler's auto-vectorizer (built with -O3, AVX2/FMA on x86-64, and -ffp-contract=off so no FMA
// contraction changes the rounding). The math is in csrc/include/*_math.h, shared with CUDA.
//
// The sine: for bit-identical fp32 Snake versus eager torch, each tile's sine is computed by
// ATen's own vectorized sin kernel (at::sin_ on a per-thread buffer in cache), the very kernel
// eager torch.sin runs; the remaining arithmetic follows the eager op order exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dac_fast_ops.h"
#include "rvq_math.h"
#include "snake_math.h"

namespace dac_fast {
namespace {

constexpr int64_t kTile = 32768;  // elements per tile: buffers stay in L2

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

bool fast_sin_requested() {
  const char* v = std::getenv("DAC_FAST_SNAKE_SIN");
  return v != nullptr && std::strcmp(v, "fast") == 0;
}

// fp32 forward with the opt-in polynomial sine: one pass, no sine call per tile
template <int MODE>
void snake_fwd_fast_sin(const SnakeArgs& a) {
  const int64_t C = a.x.size(1), T = a.x.size(2), rows = a.x.size(0) * C;
  const float* x = a.x.const_data_ptr<float>();
  const float* xb = MODE == 1 ? a.b.const_data_ptr<float>() : nullptr;
  const float* alpha = a.alpha.const_data_ptr<float>();
  const float* scale = MODE == 2 ? a.scale.const_data_ptr<float>() : nullptr;
  const float* bias = MODE == 2 ? a.bias.const_data_ptr<float>() : nullptr;
  float* y = a.y.mutable_data_ptr<float>();
  float* sum = MODE == 1 ? a.sum.mutable_data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, kTile / std::max<int64_t>(T, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t c = row % C;
      const float al = alpha[c], inv = snake_inv_alpha<float>(al);
      const float sc = MODE == 2 ? scale[c] : 1.0f, bi = MODE == 2 ? bias[c] : 0.0f;
      const float* xp = x + row * T;
      float* yp = y + row * T;
      float* sp = MODE == 1 ? sum + row * T : nullptr;
      const float* bp = MODE == 1 ? xb + row * T : nullptr;
      if (MODE == 1) {
        for (int64_t i = 0; i < T; ++i) sp[i] = xp[i] + bp[i];
      }
      const float* up = MODE == 1 ? sp : xp;
      for (int64_t i = 0; i < T; ++i) {
        const float u = MODE == 2 ? snake_affine<float>(up[i], sc, bi) : up[i];
        yp[i] = snake_combine<float>(u, snake_fast_sinf(snake_arg<float>(al, u)), inv);
      }
      int big = 0;  // separate loop: both loops vectorize
      for (int64_t i = 0; i < T; ++i) {
        const float u = MODE == 2 ? snake_affine<float>(up[i], sc, bi) : up[i];
        big |= !(std::fabs(snake_arg<float>(al, u)) <= kFastSinMax);
      }
      if (big) {  // rare: huge or non-finite arguments take the exact sine
        for (int64_t i = 0; i < T; ++i) {
          const float u = MODE == 1 ? sp[i] : (MODE == 2 ? snake_affine<float>(xp[i], sc, bi) : xp[i]);
          const float v = snake_arg<float>(al, u);
          if (!(std::fabs(v) <= kFastSinMax)) yp[i] = snake_combine<float>(u, std::sin(v), inv);
        }
      }
    }
  });
}

template <typename scalar_t, int MODE>  // MODE 0: snake(x); 1: snake(x + b); 2: snake(scale * x + bias)
void snake_fwd_kernel(const SnakeArgs& a) {
  using acc_t = typename AccOf<scalar_t>::type;
  // Flat tiles of kTile elements over the contiguous (B, C, T) buffer (a tile may span rows, so
  // short rows do not multiply the per-tile cost of the sine call).
  const int64_t C = a.x.size(1), T = a.x.size(2);
  const int64_t total = a.x.numel();
  const int64_t ntiles = (total + kTile - 1) / kTile;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* xb = MODE == 1 ? a.b.const_data_ptr<scalar_t>() : nullptr;
  const acc_t* alpha = a.alpha.const_data_ptr<acc_t>();
  const acc_t* scale = MODE == 2 ? a.scale.const_data_ptr<acc_t>() : nullptr;
  const acc_t* bias = MODE == 2 ? a.bias.const_data_ptr<acc_t>() : nullptr;
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  scalar_t* sum = MODE == 1 ? a.sum.mutable_data_ptr<scalar_t>() : nullptr;
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;

  if constexpr (std::is_same<scalar_t, float>::value) {
    if (fast_sin_requested()) {
      snake_fwd_fast_sin<MODE>(a);
      return;
    }
  }
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t cap = std::min<int64_t>(kTile, total);
    at::Tensor buf_t = at::empty({cap}, at::TensorOptions().dtype(acc_dtype));
    acc_t* buf = buf_t.mutable_data_ptr<acc_t>();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t f0 = tile * kTile;
      const int64_t len = std::min<int64_t>(kTile, total - f0);
      // pass 1: argument of the sine, row segment by row segment
      for (int64_t f = f0; f < f0 + len;) {
        const int64_t row = f / T;
        const int64_t seg = std::min<int64_t>((row + 1) * T, f0 + len) - f;
        const int64_t c = row % C;
        const acc_t al = alpha[c];
        const scalar_t* xp = x + f;
        acc_t* bp = buf + (f - f0);
        if (MODE == 0) {
          for (int64_t i = 0; i < seg; ++i) bp[i] = snake_arg<acc_t>(al, static_cast<acc_t>(xp[i]));
        } else if (MODE == 1) {
          const scalar_t* xbp = xb + f;
          scalar_t* sp = sum + f;
          for (int64_t i = 0; i < seg; ++i) {
            const scalar_t s = static_cast<scalar_t>(static_cast<acc_t>(xp[i]) + static_cast<acc_t>(xbp[i]));
            sp[i] = s;
            bp[i] = snake_arg<acc_t>(al, static_cast<acc_t>(s));
          }
        } else {
          const acc_t sc = scale[c], bi = bias[c];
          for (int64_t i = 0; i < seg; ++i) bp[i] = snake_arg<acc_t>(al, snake_affine<acc_t>(static_cast<acc_t>(xp[i]), sc, bi));
        }
        f += seg;
      }
      // ATen's vectorized sine, the kernel eager torch.sin runs
      (len == cap ? buf_t : buf_t.narrow(0, 0, len)).sin_();
      // pass 2: combine
      for (int64_t f = f0; f < f0 + len;) {
        const int64_t row = f / T;
        const int64_t seg = std::min<int64_t>((row + 1) * T, f0 + len) - f;
        const int64_t c = row % C;
        const acc_t inv = snake_inv_alpha<acc_t>(alpha[c]);
        const acc_t* bp = buf + (f - f0);
        scalar_t* yp = y + f;
        if (MODE == 0) {
          const scalar_t* xp = x + f;
          for (int64_t i = 0; i < seg; ++i) yp[i] = static_cast<scalar_t>(snake_combine<acc_t>(static_cast<acc_t>(xp[i]), bp[i], inv));
        } else if (MODE == 1) {
          const scalar_t* sp = sum + f;
          for (int64_t i = 0; i < seg; ++i) yp[i] = static_cast<scalar_t>(snake_combine<acc_t>(static_cast<acc_t>(sp[i]), bp[i], inv));
        } else {
          const acc_t sc = scale[c], bi = bias[c];
          const scalar_t* xp = x + f;
          for (int64_t i = 0; i < seg; ++i)
            yp[i] = static_cast<scalar_t>(snake_combine<acc_t>(snake_affine<acc_t>(static_cast<acc_t>(xp[i]), sc, bi), bp[i], inv));
        }
        f += seg;
      }
    }
  });
}

template <typename scalar_t>
void snake_bwd_kernel(const at::Tensor& g_, const at::Tensor& x_, const at::Tensor& alpha_, const at::Tensor& gx_,
                      const at::Tensor& galpha_) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t C = x_.size(1), T = x_.size(2), rows = x_.size(0) * C;
  const int64_t tiles_per_row = (T + kTile - 1) / kTile;
  const int64_t ntiles = rows * tiles_per_row;
  const scalar_t* x = x_.const_data_ptr<scalar_t>();
  const scalar_t* g = g_.const_data_ptr<scalar_t>();
  const acc_t* alpha = alpha_.const_data_ptr<acc_t>();
  scalar_t* gx = gx_.mutable_data_ptr<scalar_t>();
  std::vector<double> partial(ntiles, 0.0);
  const auto acc_dtype = std::is_same<acc_t, double>::value ? at::kDouble : at::kFloat;

  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = std::min<int64_t>(kTile, T);
    at::Tensor s_t = at::empty({n0}, at::TensorOptions().dtype(acc_dtype));
    at::Tensor c_t = at::empty({n0}, at::TensorOptions().dtype(acc_dtype));
    acc_t* sb = s_t.mutable_data_ptr<acc_t>();
    acc_t* cbuf = c_t.mutable_data_ptr<acc_t>();
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t row = tile / tiles_per_row;
      const int64_t t0 = (tile % tiles_per_row) * kTile;
      const int64_t len = std::min<int64_t>(kTile, T - t0);
      const int64_t c = row % C;
      const int64_t base = row * T + t0;
      const acc_t al = alpha[c];
      const acc_t inv = snake_inv_alpha<acc_t>(al);
      for (int64_t i = 0; i < len; ++i) {
        const acc_t v = snake_arg<acc_t>(al, static_cast<acc_t>(x[base + i]));
        sb[i] = v;
        cbuf[i] = v;
      }
      (len == n0 ? s_t : s_t.narrow(0, 0, len)).sin_();
      (len == n0 ? c_t : c_t.narrow(0, 0, len)).cos_();
      // 8 partial sums so the reduction vectorizes without reassociation flags
      acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 8 <= len; i += 8) {
        for (int k = 0; k < 8; ++k) {
          const acc_t gv = static_cast<acc_t>(g[base + i + k]);
          const acc_t xv = static_cast<acc_t>(x[base + i + k]);
          gx[base + i + k] = static_cast<scalar_t>(snake_grad_x<acc_t>(gv, al, sb[i + k], cbuf[i + k], inv));
          part[k] += snake_grad_alpha_term<acc_t>(gv, xv, sb[i + k], cbuf[i + k], inv);
        }
      }
      for (; i < len; ++i) {
        const acc_t gv = static_cast<acc_t>(g[base + i]);
        const acc_t xv = static_cast<acc_t>(x[base + i]);
        gx[base + i] = static_cast<scalar_t>(snake_grad_x<acc_t>(gv, al, sb[i], cbuf[i], inv));
        part[i & 7] += snake_grad_alpha_term<acc_t>(gv, xv, sb[i], cbuf[i], inv);
      }
      double tot = 0.0;
      for (int k = 0; k < 8; ++k) tot += static_cast<double>(part[k]);
      partial[tile] = tot;
    }
  });
  // deterministic per-channel reduction of the tile partials
  acc_t* ga = galpha_.mutable_data_ptr<acc_t>();
  const int64_t B = x_.size(0);
  for (int64_t c = 0; c < C; ++c) {
    double tot = 0.0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t row = b * C + c;
      for (int64_t k = 0; k < tiles_per_row; ++k) tot += partial[row * tiles_per_row + k];
    }
    ga[c] = static_cast<acc_t>(tot);
  }
}

// argmax over K of rvq_score(l2[r], M[r][k], cn2[k]) with first index on ties (lane-blocked)
inline int64_t argmax_row(const float* M, float l2, const float* cn2, int64_t K) {
  constexpr int L = 16;
  float best[L];
  int32_t bidx[L];
  for (int k = 0; k < L; ++k) {
    best[k] = -std::numeric_limits<float>::infinity();
    bidx[k] = k;
  }
  bool has_nan = false;
  int64_t k0 = 0;
  for (; k0 + L <= K; k0 += L) {
    for (int k = 0; k < L; ++k) {
      const float v = rvq_score<float>(l2, M[k0 + k], cn2[k0 + k]);
      has_nan |= (v != v);
      const bool upd = v > best[k];
      best[k] = upd ? v : best[k];
      bidx[k] = upd ? static_cast<int32_t>(k0 + k) : bidx[k];
    }
  }
  if (has_nan || k0 < K) {  // rare: exact scalar scan with torch.max's NaN semantics
    float bv = rvq_score<float>(l2, M[0], cn2[0]);
    int64_t bi = 0;
    for (int64_t k = 1; k < K; ++k) {
      const float v = rvq_score<float>(l2, M[k], cn2[k]);
      if (rvq_better<float>(v, k, bv, bi)) {
        bv = v;
        bi = k;
      }
    }
    return bi;
  }
  float bv = best[0];
  int64_t bi = bidx[0];
  for (int k = 1; k < L; ++k)
    if (rvq_better<float>(best[k], bidx[k], bv, bi)) {
      bv = best[k];
      bi = bidx[k];
    }
  return bi;
}

}  // namespace

// ----------------------------------------------------------------------------------- entry points
void snake_fwd_cpu(const SnakeArgs& a) {
  const int mode = a.b.defined() ? 1 : (a.scale.defined() ? 2 : 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dac_fast_snake_fwd_cpu", [&] {
    if (mode == 0) snake_fwd_kernel<scalar_t, 0>(a);
    else if (mode == 1) snake_fwd_kernel<scalar_t, 1>(a);
    else snake_fwd_kernel<scalar_t, 2>(a);
  });
}

void snake_bwd_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& gx,
                   const at::Tensor& galpha) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dac_fast_snake_bwd_cpu",
                                  [&] { snake_bwd_kernel<scalar_t>(g, x, alpha, gx, galpha); });
}

void rvq_argmax_cpu(const at::Tensor& enc, const at::Tensor& cbn, const at::Tensor& l2, const at::Tensor& cn2,
                    const at::Tensor& codes) {
  // The similarity GEMM is ATen's own (at::mm on row blocks; each output element is the same
  // dot product as in the full matrix product of the reference), the distance formula and the
  // argmax are fused over a block that stays in cache. Blocks have at least kMinRows rows:
  // BLAS takes a different small-matrix path for a handful of rows.
  constexpr int64_t kRows = 256, kMinRows = 128;
  const int64_t R = enc.size(0), K = cbn.size(0);
  const at::Tensor cbt = cbn.t();
  const float* l2p = l2.const_data_ptr<float>();
  const float* cn2p = cn2.const_data_ptr<float>();
  int64_t* out = codes.mutable_data_ptr<int64_t>();
  int64_t nblocks = std::max<int64_t>(1, R / kRows);
  // the last block absorbs the remainder so no block is smaller than kMinRows (unless R is)
  auto block_range = [&](int64_t blk, int64_t& r0, int64_t& r1) {
    r0 = blk * kRows;
    r1 = blk == nblocks - 1 ? R : r0 + kRows;
  };
  (void)kMinRows;
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      int64_t r0, r1;
      block_range(blk, r0, r1);
      at::Tensor M = at::mm(enc.narrow(0, r0, r1 - r0), cbt);
      const float* Mp = M.const_data_ptr<float>();
      for (int64_t r = r0; r < r1; ++r) out[r] = argmax_row(Mp + (r - r0) * K, l2p[r], cn2p, K);
    }
  });
}

void rvq_update_cpu(const at::Tensor& r_in, const at::Tensor& o, const at::Tensor& r_out, const at::Tensor& q, bool first) {
  const int64_t n = o.numel();
  const float* ri = r_in.const_data_ptr<float>();
  const float* op = o.const_data_ptr<float>();
  float* ro = r_out.defined() ? r_out.mutable_data_ptr<float>() : nullptr;
  float* qp = q.mutable_data_ptr<float>();
  at::parallel_for(0, n, 32768, [&](int64_t b, int64_t e) {
    if (ro) for (int64_t i = b; i < e; ++i) ro[i] = ri[i] - op[i];
    if (first) for (int64_t i = b; i < e; ++i) qp[i] = 0.0f + op[i];
    else for (int64_t i = b; i < e; ++i) qp[i] = qp[i] + op[i];
  });
}

void rvq_fast_cpu(const RvqFastArgs& a) {
  const int64_t B = a.codes.size(0), n = a.codes.size(1), T = a.codes.size(2);
  const int64_t K = a.cbn.size(1);
  constexpr int D8 = kCodebookDim;
  const float* e0 = a.e0.const_data_ptr<float>();
  const float* inb = a.in_b.const_data_ptr<float>();
  const float* A = a.A.const_data_ptr<float>();
  const float* cc = a.c.const_data_ptr<float>();
  const float* cbnT = a.cbnT.const_data_ptr<float>();
  const float* cn2 = a.cn2.const_data_ptr<float>();
  const float* cb = a.cb.const_data_ptr<float>();
  int64_t* codes = a.codes.mutable_data_ptr<int64_t>();
  float* lat = a.latents.mutable_data_ptr<float>();
  float* Q = a.Q.mutable_data_ptr<float>();
  at::parallel_for(0, B * T, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> score(K);
    std::vector<float> qs(n * D8);
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      for (int64_t i = 0; i < n; ++i) {
        float e0v[D8], corr[D8], e[D8], en[D8];
        for (int k = 0; k < D8; ++k) {
          e0v[k] = e0[(b * n * D8 + i * D8 + k) * T + t];
          corr[k] = 0.0f;
        }
        for (int64_t j = 0; j < i; ++j) {
          const float* Aij = A + ((i * n + j) * D8) * D8;
          const float* cij = cc + (i * n + j) * D8;
          for (int r = 0; r < D8; ++r) corr[r] += rvq_dot8<float>(Aij + r * D8, &qs[j * D8]) + cij[r];
        }
        rvq_fast_latent<float>(e0v, inb + i * D8, corr, e);
        rvq_normalize8<float>(e, en);
        float l2 = 0.0f;
        for (int k = 0; k < D8; ++k) l2 += en[k] * en[k];
        const float* ct = cbnT + i * D8 * K;
        const float* c2 = cn2 + i * K;
        for (int64_t k = 0; k < K; ++k) {
          float acc = 0.0f;
          for (int d = 0; d < D8; ++d) acc += en[d] * ct[d * K + k];
          score[k] = acc;
        }
        const int64_t idx = argmax_row(score.data(), l2, c2, K);
        codes[(b * n + i) * T + t] = idx;
        const float* row = cb + (i * K + idx) * D8;
        for (int k = 0; k < D8; ++k) {
          qs[i * D8 + k] = row[k];
          Q[(b * n * D8 + i * D8 + k) * T + t] = row[k];
          lat[(b * n * D8 + i * D8 + k) * T + t] = e[k];
        }
      }
    }
  });
}

void rvq_gather_cpu(const at::Tensor& codes_, const at::Tensor& cb_, const at::Tensor& Q_) {
  const int64_t B = codes_.size(0), n = codes_.size(1), T = codes_.size(2), K = cb_.size(1);
  const int64_t* codes = codes_.const_data_ptr<int64_t>();
  const float* cb = cb_.const_data_ptr<float>();
  float* Q = Q_.mutable_data_ptr<float>();
  at::parallel_for(0, B * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bi = begin; bi < end; ++bi) {
      const int64_t i = bi % n;
      const int64_t* cp = codes + bi * T;
      float* qp = Q + bi * kCodebookDim * T;
      const float* cbi = cb + i * K * kCodebookDim;
      for (int64_t t = 0; t < T; ++t) {
        for (int k = 0; k < kCodebookDim; ++k) qp[k * T + t] = rvq_gather_element(cbi, cp[t], K, k);
      }
    }
  });
}

}  // namespace dac_fast

TORCH_LIBRARY_IMPL(dac_fast, CPU, m) { dac_fast::register_front_ends(m); }
