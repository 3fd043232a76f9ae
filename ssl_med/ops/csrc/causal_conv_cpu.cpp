// Causal depthwise conv1d with an optional SiLU for the CPU (the short convolution of a Mamba
// branch), forward and backward, registered next to the selective scan as ssl_med_scan::conv_fwd
// and ssl_med_scan::conv_bwd:
//
//     pre[b, d, t] = bias[d] + sum_{k < K} w[d, k] x[b, d, t - K + 1 + k]        (x = 0 for t < 0)
//     out          = silu(pre)   (or pre without the activation)
//
// x, out, dout and dx are (batch, dim, len) with any strides; out and dx are token-major
// (stride(1) == 1, a transposed (batch, len, dim) tensor) when x is, as Mamba's projections lay x
// out, and contiguous otherwise. Batch items run in parallel (at::parallel_for); inside
// one, the loop walks time and, innermost, the channels, which are contiguous in a token-major
// view, so every step is a few vector multiply-adds over `dim` channels. The backward recomputes
// `pre` (K multiply-adds) instead of saving it, walks time backwards with the last K rows of
// dL/dpre in a ring buffer, and sums the weight and bias gradients per batch item before summing
// over the batch, so the result does not depend on the number of threads.

#include "selective_scan_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace {

using namespace ssl_med_scan;

// Element strides of a (batch, dim, len) tensor.
struct Strides {
  int64_t b, d, t;
  explicit Strides(const at::Tensor& x) : b(x.stride(0)), d(x.stride(1)), t(x.stride(2)) {}
};

template <typename T>
struct Conv {
  int64_t batch, dim, len, width;
  const T* x;
  Strides xs;
  const T* w;     // transposed weight (width, dim): tap k of channel d at w[k * dim + d]
  const T* bias;  // nullable
  bool silu;
};

// pre[d] for batch item b at time t, all channels; x's channel stride is 1 when Unit.
template <typename T, bool Unit>
inline void pre_row(const Conv<T>& c, int64_t b, int64_t t, T* pre) {
  const int64_t sd = Unit ? 1 : c.xs.d;
  for (int64_t d = 0; d < c.dim; ++d) pre[d] = c.bias ? c.bias[d] : T(0);
  for (int64_t k = 0; k < c.width; ++k) {
    const int64_t tt = t - c.width + 1 + k;
    if (tt < 0) continue;
    const T* xr = c.x + b * c.xs.b + tt * c.xs.t;
    const T* wk = c.w + k * c.dim;
#pragma omp simd
    for (int64_t d = 0; d < c.dim; ++d) pre[d] += wk[d] * xr[d * sd];
  }
}

template <typename T, bool Unit>
void forward_all(const Conv<T>& c, T* out, Strides os) {
  at::parallel_for(0, c.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pre(c.dim);
    const int64_t sd = Unit ? 1 : os.d;
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t t = 0; t < c.len; ++t) {
        pre_row<T, Unit>(c, b, t, pre.data());
        T* o = out + b * os.b + t * os.t;
        if (c.silu) {
#pragma omp simd
          for (int64_t d = 0; d < c.dim; ++d) o[d * sd] = pre[d] * sigmoid(pre[d]);
        } else {
#pragma omp simd
          for (int64_t d = 0; d < c.dim; ++d) o[d * sd] = pre[d];
        }
      }
    }
  });
}

// dx[t] = sum_k w[k] g[t + K - 1 - k] and dw[k] = sum_t g[t] x[t - K + 1 + k], with g = dL/dpre,
// walking t from the end; g of the last K steps sits in `ring` (row t at slot t % K).
template <typename T, bool Unit>
void backward_all(const Conv<T>& c, const T* dout, Strides gs, T* dx, Strides dxs, T* dw_part, T* db_part) {
  const int64_t K = c.width, dim = c.dim;
  at::parallel_for(0, c.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> pre(dim), ring(K * dim), acc(dim);
    const int64_t gd = Unit ? 1 : gs.d, xd = Unit ? 1 : c.xs.d, od = Unit ? 1 : dxs.d;
    for (int64_t b = begin; b < end; ++b) {
      T* dw = dw_part + b * K * dim;  // (K, dim)
      T* db = db_part + b * dim;
      std::fill(dw, dw + K * dim, T(0));
      std::fill(db, db + dim, T(0));
      for (int64_t t = c.len - 1; t >= 0; --t) {
        T* g = ring.data() + (t % K) * dim;
        const T* go = dout + b * gs.b + t * gs.t;
        if (c.silu) {
          pre_row<T, Unit>(c, b, t, pre.data());
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) {
            const T s = sigmoid(pre[d]);
            g[d] = go[d * gd] * s * (T(1) + pre[d] * (T(1) - s));
          }
        } else {
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) g[d] = go[d * gd];
        }
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) db[d] += g[d];
        for (int64_t k = 0; k < K; ++k) {  // dw[k] from x at t - K + 1 + k
          const int64_t tt = t - K + 1 + k;
          if (tt < 0) continue;
          const T* xr = c.x + b * c.xs.b + tt * c.xs.t;
          T* dwk = dw + k * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) dwk[d] += g[d] * xr[d * xd];
        }
        // dx[t] from g at t .. t + K - 1 (tap K - 1 - j meets g[t + j])
        std::fill(acc.begin(), acc.end(), T(0));
        for (int64_t j = 0; j < K && t + j < c.len; ++j) {
          const T* gj = ring.data() + ((t + j) % K) * dim;
          const T* wk = c.w + (K - 1 - j) * dim;
#pragma omp simd
          for (int64_t d = 0; d < dim; ++d) acc[d] += wk[d] * gj[d];
        }
        T* o = dx + b * dxs.b + t * dxs.t;
#pragma omp simd
        for (int64_t d = 0; d < dim; ++d) o[d * od] = acc[d];
      }
    }
  });
}

template <typename T>
Conv<T> describe(const at::Tensor& x, const at::Tensor& wt, const std::optional<at::Tensor>& bias, bool silu) {
  return Conv<T>{x.size(0), x.size(1), x.size(2), wt.size(0), x.data_ptr<T>(), Strides(x),
                 wt.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, silu};
}

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu(), "the fused causal conv runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(x.dim() == 3, "x must be (batch, dim, len)");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(1) && w.size(1) >= 1, "weight must be (dim, width)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == x.size(1), "bias must be (dim,)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype");
  }
}

// A new (batch, dim, len) tensor, token-major when x is.
at::Tensor like(const at::Tensor& x) {
  if (x.stride(1) == 1 && x.size(1) > 1) return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
  return at::empty(x.sizes(), x.options());
}

at::Tensor conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, bool silu) {
  check(x, w, bias);
  at::Tensor wt = w.t().contiguous();
  at::Tensor out = like(x);
  const bool unit = x.stride(1) == 1 && out.stride(1) == 1;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Conv<T> c = describe<T>(x, wt, bias, silu);
    if (unit) forward_all<T, true>(c, out.data_ptr<T>(), Strides(out));
    else forward_all<T, false>(c, out.data_ptr<T>(), Strides(out));
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return out;
}

std::vector<at::Tensor> conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                 bool silu, const at::Tensor& dout) {
  check(x, w, bias);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type(), "dout must be like x");
  at::Tensor wt = w.t().contiguous();
  at::Tensor dx = like(x);
  const int64_t batch = x.size(0), dim = x.size(1), width = w.size(1);
  at::Tensor dw_part = at::empty({batch, width, dim}, x.options());
  at::Tensor db_part = at::empty({batch, dim}, x.options());
  const bool unit = x.stride(1) == 1 && dx.stride(1) == 1 && dout.stride(1) == 1;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Conv<T> c = describe<T>(x, wt, bias, silu);
    T *pdx = dx.data_ptr<T>(), *pw = dw_part.data_ptr<T>(), *pb = db_part.data_ptr<T>();
    if (unit) backward_all<T, true>(c, dout.data_ptr<T>(), Strides(dout), pdx, Strides(dx), pw, pb);
    else backward_all<T, false>(c, dout.data_ptr<T>(), Strides(dout), pdx, Strides(dx), pw, pb);
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return {dx, dw_part.sum(0).t().contiguous(), db_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_med_scan, m) {
  m.def("conv_fwd(Tensor x, Tensor weight, Tensor? bias, bool silu) -> Tensor");
  m.def("conv_bwd(Tensor x, Tensor weight, Tensor? bias, bool silu, Tensor dout) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_med_scan, CPU, m) {
  m.impl("conv_fwd", &conv_fwd);
  m.impl("conv_bwd", &conv_bwd);
}
