// The fused CPU selective scan's per-token passes: the elementwise work around the row kernels'
// recurrence (the softplus of the step sizes, dt * u, the D skip, the silu(z) gate and their
// derivatives), in passes over tokens with the channels innermost, contiguous in the token-major
// layout. Vectorised over channels a pass costs the same for any sequence length, where inside a
// row it ran on a handful of steps (DINO's local crops: 5 tokens) and cost as much as the
// recurrence itself. The lane kernels (selective_scan_lanes.cpp) do this work inside their blocks.

#include "selective_scan_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace ssl_med_scan {

namespace {

// fn(b, t, buffers) for every token (b, t), parallel over tokens; one set of gather buffers per thread.
template <typename T, typename Fn>
void for_each_token(const Scan<T>& s, Fn&& fn) {
  at::parallel_for(0, s.batch * s.len, 1, [&](int64_t begin, int64_t end) {
    TokenBuffers<T> w(s.dim);
    for (int64_t i = begin; i < end; ++i) fn(i / s.len, i % s.len, w);
  });
}

}  // namespace

// Step sizes dt = softplus(delta + bias) (or without the softplus) and dt * u for every token.
template <typename T>
void prepare_steps(const Scan<T>& s, TokenMajor<T> dt, TokenMajor<T> dtu) {
  const int64_t dim = s.dim;
  for_each_token(s, [&](int64_t b, int64_t t, TokenBuffers<T>& w) {
    const T* u = s.u.token(b, t, dim, w.u.data());
    const T* raw = s.delta.token(b, t, dim, w.raw.data());
    T* dtt = dt.token(b, t);
    T* dtut = dtu.token(b, t);
    if (s.softplus) {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dtt[d] = softplus(raw[d] + (s.bias ? s.bias[d] : T(0)));
    } else {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dtt[d] = raw[d] + (s.bias ? s.bias[d] : T(0));
    }
#pragma omp simd
    for (int64_t d = 0; d < dim; ++d) dtut[d] = dtt[d] * u[d];
  });
}

// out <- (y + D u) * silu(z) in place, every token (out holds the recurrence's y).
template <typename T>
void finish_out(const Scan<T>& s, TokenMajor<T> out) {
  const int64_t dim = s.dim;
  for_each_token(s, [&](int64_t b, int64_t t, TokenBuffers<T>& w) {
    const T* u = s.u.token(b, t, dim, w.u.data());
    T* o = out.token(b, t);
    if (s.Dskip) {
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] += s.Dskip[d] * u[d];
    }
    if (s.z) {
      const T* z = s.z.token(b, t, dim, w.z.data());
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) o[d] = o[d] * z[d] * sigmoid(z[d]);
    }
  });
}

// dL/dy of the recurrence: dout * silu(z) (or dout), every token.
template <typename T>
void prepare_dy(const Scan<T>& s, const Rows<T>& dout, TokenMajor<T> dy) {
  const int64_t dim = s.dim;
  for_each_token(s, [&](int64_t b, int64_t t, TokenBuffers<T>& w) {
    const T* go = dout.token(b, t, dim, w.dout.data());
    T* dyt = dy.token(b, t);
    if (s.z) {
      const T* z = s.z.token(b, t, dim, w.z.data());
#pragma omp simd
      for (int64_t d = 0; d < dim; ++d) dyt[d] = go[d] * (z[d] * sigmoid(z[d]));
    } else {
      std::copy(go, go + dim, dyt);
    }
  });
}

// The per-token gradients, from what the row kernels leave: du holds gb = dL/d(dt u) and ddelta
// holds dL/d(dt) through the decays; y is the recurrence's output (when z is given). Sums of the
// D and delta_bias gradients go per batch item into dskip_part and dbias_part (batch, dim).
template <typename T>
void finish_grads(const Scan<T>& s, const Rows<T>& dout, TokenMajor<T> dt, TokenMajor<T> dy, TokenMajor<T> y,
                  TokenMajor<T> du, TokenMajor<T> ddelta, TokenMajor<T> dz, T* dskip_part, T* dbias_part) {
  const int64_t dim = s.dim;
  at::parallel_for(0, s.batch, 1, [&](int64_t begin, int64_t end) {
    TokenBuffers<T> w(dim);
    // absent D and delta_bias read as zeros, so the loops below have no branches and vectorise
    const std::vector<T> zeros(dim, T(0));
    const T* skip = s.Dskip ? s.Dskip : zeros.data();
    const T* bias = s.bias ? s.bias : zeros.data();
    for (int64_t b = begin; b < end; ++b) {
      T* dskip = dskip_part + b * dim;
      T* dbias = dbias_part + b * dim;
      std::fill(dskip, dskip + dim, T(0));
      std::fill(dbias, dbias + dim, T(0));
      for (int64_t t = 0; t < s.len; ++t) {
        T *dut = du.token(b, t), *ddt = ddelta.token(b, t);
        const TokenGradIn<T> in{dut, ddt, s.u.token(b, t, dim, w.u.data()), s.delta.token(b, t, dim, w.raw.data()),
                                bias, dt.token(b, t), dy.token(b, t), skip,
                                s.z ? dout.token(b, t, dim, w.dout.data()) : nullptr,
                                s.z ? s.z.token(b, t, dim, w.z.data()) : nullptr, y.token(b, t)};
        token_grads(dim, s.softplus, in, dut, ddt, s.z ? dz.token(b, t) : nullptr, dskip, dbias);
      }
    }
  });
}

template void prepare_steps<float>(const Scan<float>&, TokenMajor<float>, TokenMajor<float>);
template void prepare_steps<double>(const Scan<double>&, TokenMajor<double>, TokenMajor<double>);
template void finish_out<float>(const Scan<float>&, TokenMajor<float>);
template void finish_out<double>(const Scan<double>&, TokenMajor<double>);
template void prepare_dy<float>(const Scan<float>&, const Rows<float>&, TokenMajor<float>);
template void prepare_dy<double>(const Scan<double>&, const Rows<double>&, TokenMajor<double>);
template void finish_grads<float>(const Scan<float>&, const Rows<float>&, TokenMajor<float>, TokenMajor<float>,
                                  TokenMajor<float>, TokenMajor<float>, TokenMajor<float>, TokenMajor<float>, float*,
                                  float*);
template void finish_grads<double>(const Scan<double>&, const Rows<double>&, TokenMajor<double>, TokenMajor<double>,
                                   TokenMajor<double>, TokenMajor<double>, TokenMajor<double>, TokenMajor<double>,
                                   double*, double*);

}  // namespace ssl_med_scan
