// Depthwise k^d convolution over a 2D or 3D token grid for the CPU (ViL v2's grid conv), forward and
// backward, registered next to the selective scan as ssl_med_scan::grid_conv_fwd / grid_conv_bwd:
//
//     out[b, p, c] = bias[c] + sum_{taps k} w[c, k] x[b, p + offset_k, c]      (x = 0 outside the grid)
//
// x is (batch, tokens, channels) with the tokens in raster order of the grid (last axis fastest)
// and the channels contiguous (stride 1; any batch and token strides), as the ViL layer holds its
// tokens; the taps are the k^d offsets in raster order with zero padding k / 2 (nn.Conv2d/3d's
// `padding=k // 2`, weight (channels, 1, k, k[, k]) flattened to (channels, k^d)). out, dout and dx
// are (batch, tokens, channels) too, so no layout change happens on either side.
//
// Why not nn.Conv3d: on the few-token grids of the demo crops (2^3, 2x2, 4x4) PyTorch's depthwise
// convolution backward took milliseconds per call (2^3 grid, 44 x 96 channels: ~8 ms forward +
// backward); here every step is a vector multiply-add over the channels. A table of each token's
// neighbour per tap (-1 outside the grid) is built once per call; the backward's dx uses the mirrored
// tap (offset_{K-1-k} = -offset_k), so every output row is written by one work item, and dw/dbias
// are summed per batch item before summing over the batch (independent of the thread count).

#include "selective_scan_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace {

using namespace ssl_med_scan;

// neighbour[p * taps + k]: token index of p's neighbour at tap k, or -1 outside the grid.
std::vector<int64_t> neighbours(at::IntArrayRef grid, int64_t kernel) {
  int64_t size[3] = {1, 1, 1}, ext[3] = {1, 1, 1};
  const int64_t nd = static_cast<int64_t>(grid.size());
  for (int64_t i = 0; i < nd; ++i) {
    size[3 - nd + i] = grid[i];
    ext[3 - nd + i] = kernel;
  }
  const int64_t tokens = size[0] * size[1] * size[2], taps = ext[0] * ext[1] * ext[2];
  std::vector<int64_t> nb(tokens * taps);
  for (int64_t p = 0; p < tokens; ++p) {
    const int64_t pz = p / (size[1] * size[2]), py = (p / size[2]) % size[1], px = p % size[2];
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t qz = pz + k / (ext[1] * ext[2]) - ext[0] / 2;
      const int64_t qy = py + (k / ext[2]) % ext[1] - ext[1] / 2;
      const int64_t qx = px + k % ext[2] - ext[2] / 2;
      const bool inside = qz >= 0 && qz < size[0] && qy >= 0 && qy < size[1] && qx >= 0 && qx < size[2];
      nb[p * taps + k] = inside ? (qz * size[1] + qy) * size[2] + qx : -1;
    }
  }
  return nb;
}

template <typename T>
struct GridConv {
  int64_t batch, tokens, chans, taps;
  const T* x;
  int64_t xb, xn;  // batch and token strides of x (channels: 1)
  const T* w;      // transposed weight (taps, chans)
  const T* bias;   // nullable
  const int64_t* nb;
  const T* xrow(int64_t b, int64_t p) const { return x + b * xb + p * xn; }
};

template <typename T>
void forward_all(const GridConv<T>& c, T* out) {
  const int64_t C = c.chans;
  at::parallel_for(0, c.batch * c.tokens, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / c.tokens, p = i % c.tokens;
      T* o = out + i * C;
      for (int64_t ch = 0; ch < C; ++ch) o[ch] = c.bias ? c.bias[ch] : T(0);
      for (int64_t k = 0; k < c.taps; ++k) {
        const int64_t q = c.nb[p * c.taps + k];
        if (q < 0) continue;
        const T* xq = c.xrow(b, q);
        const T* wk = c.w + k * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) o[ch] += wk[ch] * xq[ch];
      }
    }
  });
}

// dx[q] = sum_k w[k] g[q - offset_k] (the mirrored tap's neighbour); dw[k] += g[p] x[p + offset_k].
template <typename T>
void backward_all(const GridConv<T>& c, const T* g, int64_t gb, int64_t gn, T* dx, T* dw_part, T* db_part) {
  const int64_t C = c.chans, K = c.taps;
  at::parallel_for(0, c.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* dw = dw_part + b * K * C;
      T* db = db_part + b * C;
      std::fill(dw, dw + K * C, T(0));
      std::fill(db, db + C, T(0));
      for (int64_t p = 0; p < c.tokens; ++p) {
        const T* gp = g + b * gb + p * gn;
        T* o = dx + (b * c.tokens + p) * C;
#pragma omp simd
        for (int64_t ch = 0; ch < C; ++ch) {
          db[ch] += gp[ch];
          o[ch] = T(0);
        }
        for (int64_t k = 0; k < K; ++k) {
          const int64_t q = c.nb[p * K + k];
          if (q < 0) continue;  // q = p + offset_k: g[q] reaches dx[p] through tap K - 1 - k
          const T* xq = c.xrow(b, q);
          const T* gq = g + b * gb + q * gn;
          const T* wm = c.w + (K - 1 - k) * C;
          T* dwk = dw + k * C;
#pragma omp simd
          for (int64_t ch = 0; ch < C; ++ch) {
            dwk[ch] += gp[ch] * xq[ch];
            o[ch] += wm[ch] * gq[ch];
          }
        }
      }
    }
  });
}

void check(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::IntArrayRef grid,
           int64_t kernel) {
  TORCH_CHECK(x.device().is_cpu(), "the fused grid conv runs on the CPU");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "float32 or float64 only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be (batch, tokens, channels) with contiguous channels");
  TORCH_CHECK(grid.size() == 2 || grid.size() == 3, "the grid must be 2D or 3D");
  TORCH_CHECK(kernel >= 1 && kernel % 2 == 1, "the kernel size must be odd");
  int64_t tokens = 1, taps = 1;
  for (int64_t s : grid) {
    tokens *= s;
    taps *= kernel;
  }
  TORCH_CHECK(x.size(1) == tokens, "x must hold the grid's tokens");
  TORCH_CHECK(w.dim() == 2 && w.size(0) == x.size(2) && w.size(1) == taps, "weight must be (channels, k^d)");
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "weight must have x's dtype");
  if (bias) {
    TORCH_CHECK(bias->is_contiguous() && bias->dim() == 1 && bias->size(0) == x.size(2), "bias must be (channels,)");
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias must have x's dtype");
  }
}

template <typename T>
GridConv<T> describe(const at::Tensor& x, const at::Tensor& wt, const std::optional<at::Tensor>& bias,
                     const std::vector<int64_t>& nb) {
  return GridConv<T>{x.size(0), x.size(1), x.size(2), wt.size(0), x.data_ptr<T>(), x.stride(0), x.stride(1),
                     wt.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr, nb.data()};
}

at::Tensor grid_conv_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                         at::IntArrayRef grid, int64_t kernel) {
  check(x, w, bias, grid, kernel);
  const std::vector<int64_t> nb = neighbours(grid, kernel);
  at::Tensor wt = w.t().contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    forward_all<T>(describe<T>(x, wt, bias, nb), out.data_ptr<T>());
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return out;
}

std::vector<at::Tensor> grid_conv_bwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                                      at::IntArrayRef grid, int64_t kernel, const at::Tensor& dout) {
  check(x, w, bias, grid, kernel);
  TORCH_CHECK(dout.sizes() == x.sizes() && dout.scalar_type() == x.scalar_type() && dout.stride(2) == 1,
              "dout must be like x, with contiguous channels");
  const std::vector<int64_t> nb = neighbours(grid, kernel);
  at::Tensor wt = w.t().contiguous();
  const int64_t batch = x.size(0), chans = x.size(2), taps = w.size(1);
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor dw_part = at::empty({batch, taps, chans}, x.options());
  at::Tensor db_part = at::empty({batch, chans}, x.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    backward_all<T>(describe<T>(x, wt, bias, nb), dout.data_ptr<T>(), dout.stride(0), dout.stride(1),
                    dx.data_ptr<T>(), dw_part.data_ptr<T>(), db_part.data_ptr<T>());
  };
  if (x.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return {dx, dw_part.sum(0).t().contiguous(), db_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ssl_med_scan, m) {
  m.def("grid_conv_fwd(Tensor x, Tensor weight, Tensor? bias, int[] grid, int kernel) -> Tensor");
  m.def("grid_conv_bwd(Tensor x, Tensor weight, Tensor? bias, int[] grid, int kernel, Tensor dout) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(ssl_med_scan, CPU, m) {
  m.impl("grid_conv_fwd", &grid_conv_fwd);
  m.impl("grid_conv_bwd", &grid_conv_bwd);
}
