// Shared pieces of the fused CPU selective scan (selective_scan_cpu.cpp): vectorisable scalar
// functions, the view of a strided (batch, dim, len) input and the problem description.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace ssl_med_scan {

constexpr int64_t kChunk = 64;   // steps per recomputed chunk in the backward
constexpr int kMaxState = 256;   // largest N of the generic (runtime-N) path

// ---------------------------------------------------------------------------------------------
// scalar helpers
// ---------------------------------------------------------------------------------------------

// exp(x) for float32 without branches, so a loop over N vectorises: x = k ln2 + r with k an integer
// and |r| <= ln2 / 2, exp(r) from its degree-7 Taylor polynomial (truncation ~5e-9 relative, below
// float32 rounding), 2^k written into the exponent bits. Inputs are clamped to [-88, 88]: below,
// the result is 0 (the true value is under 2^-126); above, float32 overflows anyway.
__attribute__((always_inline)) inline float exp_vec(float x) {
  x = std::max(x, -88.0f);
  x = std::min(x, 88.0f);
  float k = x * 1.44269504088896341f;
  k = (k + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick)
  // ln2 split into a short high part (exact product with k) and the remainder
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440054690583e-4f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// float64 keeps the library functions: it is the dtype of the parity tests, not of training.
__attribute__((always_inline)) inline double exp_vec(double x) { return std::exp(x); }

// 2^x for float32 without branches, the decays' form exp(dt A) = 2^(dt A log2(e)) with log2(e) folded
// into A once per row: x = k + r with k the nearest integer, so r in [-1/2, 1/2] is exact and needs
// no split-constant reduction; 2^r from Cephes' degree-6 exp2f polynomial (relative error ~2e-7,
// float32 rounding), 2^k written into the exponent bits. Clamped to [-126, 126] as exp_vec.
__attribute__((always_inline)) inline float exp2_vec(float x) {
  x = std::max(x, -126.0f);
  x = std::min(x, 126.0f);
  const float k = (x + 12582912.0f) - 12582912.0f;  // round to nearest integer (1.5 * 2^23 trick)
  const float r = x - k;
  float p = 1.535336188319500e-4f;
  p = p * r + 1.339887440266574e-3f;
  p = p * r + 9.618437357674640e-3f;
  p = p * r + 5.550332471162809e-2f;
  p = p * r + 2.402264791363012e-1f;
  p = p * r + 6.931472028550421e-1f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

__attribute__((always_inline)) inline double exp2_vec(double x) { return std::exp2(x); }

// log2(e), folded into A so that a decay is exp2_vec(dt * A * log2(e)).
constexpr double kLog2e = 1.4426950408889634;

// log(1 + e) for e in [0, 1] without branches: 2 atanh(s) with s = e / (2 + e) <= 1/3, summed to the
// s^15 term (truncation below 2e-9 relative), accurate for tiny e where 1 + e would round.
__attribute__((always_inline)) inline float log1p_unit(float e) {
  const float s = e / (2.0f + e), s2 = s * s;
  float p = 1.0f / 15.0f;
  p = p * s2 + 1.0f / 13.0f;
  p = p * s2 + 1.0f / 11.0f;
  p = p * s2 + 1.0f / 9.0f;
  p = p * s2 + 1.0f / 7.0f;
  p = p * s2 + 1.0f / 5.0f;
  p = p * s2 + 1.0f / 3.0f;
  p = p * s2 + 1.0f;
  return 2.0f * s * p;
}

// torch's softplus (beta 1, threshold 20) and its derivative (the logistic function), so results
// match F.softplus; the float32 forms are branch-free (softplus(x) = max(x, 0) + log1p(exp(-|x|))).
__attribute__((always_inline)) inline float softplus(float x) {
  return std::max(x, 0.0f) + log1p_unit(exp_vec(-std::abs(x)));
}
__attribute__((always_inline)) inline double softplus(double x) {
  return x > 20.0 ? x : std::log1p(std::exp(x));
}
__attribute__((always_inline)) inline float sigmoid(float x) { return 1.0f / (1.0f + exp_vec(-x)); }
__attribute__((always_inline)) inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
__attribute__((always_inline)) inline float softplus_grad(float x) { return sigmoid(x); }
__attribute__((always_inline)) inline double softplus_grad(double x) { return x > 20.0 ? 1.0 : sigmoid(x); }

// The input gradients of `count` adjacent channels at one token, from what the reverse recurrence
// leaves: gb = dL/d(dt u) and gda = dL/d(dt) through the decays. Writes ddelta (through the softplus
// when `softplus`, raw = delta before it), du, and dz when z is given (go = dL/dout, y = the
// recurrence's output), and adds this token's terms to the D and delta_bias gradients dskip, dbias.
// du may alias gb and ddelta gda (each element is read before it is written).
template <typename T>
struct TokenGradIn {
  const T *gb, *gda, *u, *raw, *bias, *dt, *dy, *skip, *go, *z, *y;
};
template <typename T>
__attribute__((always_inline)) inline void token_grads(int64_t count, bool softplus, const TokenGradIn<T>& in,
                                                       T* du, T* ddelta, T* dz, T* dskip, T* dbias) {
#pragma omp simd
  for (int64_t d = 0; d < count; ++d) ddelta[d] = in.gda[d] + in.gb[d] * in.u[d];
  if (softplus) {
#pragma omp simd
    for (int64_t d = 0; d < count; ++d) ddelta[d] *= softplus_grad(in.raw[d] + in.bias[d]);
  }
#pragma omp simd
  for (int64_t d = 0; d < count; ++d) {
    du[d] = in.dy[d] * in.skip[d] + in.gb[d] * in.dt[d];
    dskip[d] += in.dy[d] * in.u[d];
    dbias[d] += ddelta[d];
  }
  if (in.z) {
#pragma omp simd
    for (int64_t d = 0; d < count; ++d) {
      const T sg = sigmoid(in.z[d]);
      dz[d] = in.go[d] * (in.y[d] + in.skip[d] * in.u[d]) * sg * (T(1) + in.z[d] * (T(1) - sg));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// problem description shared by the row kernels
// ---------------------------------------------------------------------------------------------
// A (batch, dim, len) input with any strides (u, delta, z and dout may be transposed views, as Mamba's
// projections produce them: saving views instead of contiguous copies keeps no second copy alive).
template <typename T>
struct Rows {
  const T* p = nullptr;
  int64_t sb = 0, sd = 0, st = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) : p(t.data_ptr<T>()), sb(t.stride(0)), sd(t.stride(1)), st(t.stride(2)) {}
  explicit operator bool() const { return p != nullptr; }
  // the dim channels of token (b, t) as a contiguous array: the input itself, or its copy in buf
  const T* token(int64_t b, int64_t t, int64_t dim, T* buf) const {
    const T* r = p + b * sb + t * st;
    if (sd == 1) return r;
    for (int64_t d = 0; d < dim; ++d) buf[d] = r[d * sd];
    return buf;
  }
};

// Per-thread copies of one token's channels of the strided inputs (used where they are not contiguous).
template <typename T>
struct TokenBuffers {
  std::vector<T> u, raw, z, dout;
  explicit TokenBuffers(int64_t dim) : u(dim), raw(dim), z(dim), dout(dim) {}
};

// Token-major (batch, len, dim) work arrays of the row kernels; row (b, d) reads element t at
// (b * len + t) * dim + d, i.e. with stride dim from row(b, d).
template <typename T>
struct TokenMajor {
  T* p;
  int64_t len, dim;
  T* row(int64_t b, int64_t d) const { return p + b * len * dim + d; }
  T* token(int64_t b, int64_t t) const { return p + (b * len + t) * dim; }
};

template <typename T>
struct Scan {
  int64_t batch, dim, len, nstate;
  Rows<T> u, delta, z;  // z optional (empty)
  const T* A;
  const T* Bm;
  const T* Cm;
  const T* Dskip;  // nullable
  const T* bias;   // nullable
  bool softplus;
  bool b_var, c_var;
  int64_t b_groups, c_groups;

  // first element of B (or C) for row (b, d), and its stride between time steps
  const T* b_ptr(int64_t b, int64_t d) const {
    return b_var ? Bm + (b * b_groups + d / (dim / b_groups)) * len * nstate : Bm + d * nstate;
  }
  const T* c_ptr(int64_t b, int64_t d) const {
    return c_var ? Cm + (b * c_groups + d / (dim / c_groups)) * len * nstate : Cm + d * nstate;
  }
  int64_t b_step() const { return b_var ? nstate : 0; }
  int64_t c_step() const { return c_var ? nstate : 0; }
};

// ---------------------------------------------------------------------------------------------
// per-token passes of the row kernels (selective_scan_tokens.cpp)
// ---------------------------------------------------------------------------------------------
// Step sizes dt = softplus(delta + bias) (or without the softplus) and dt * u for every token.
template <typename T>
void prepare_steps(const Scan<T>& s, TokenMajor<T> dt, TokenMajor<T> dtu);

// out <- (y + D u) * silu(z) in place, every token (out holds the recurrence's y).
template <typename T>
void finish_out(const Scan<T>& s, TokenMajor<T> out);

// dL/dy of the recurrence: dout * silu(z) (or dout), every token.
template <typename T>
void prepare_dy(const Scan<T>& s, const Rows<T>& dout, TokenMajor<T> dy);

// The per-token input gradients from what the row kernels leave in du (gb = dL/d(dt u)) and
// ddelta (dL/d(dt) through the decays); the D and delta_bias gradients per batch item into
// dskip_part and dbias_part (batch, dim).
template <typename T>
void finish_grads(const Scan<T>& s, const Rows<T>& dout, TokenMajor<T> dt, TokenMajor<T> dy, TokenMajor<T> y,
                  TokenMajor<T> du, TokenMajor<T> ddelta, TokenMajor<T> dz, T* dskip_part, T* dbias_part);

// ---------------------------------------------------------------------------------------------
// the backward's split into parallel work items
// ---------------------------------------------------------------------------------------------
// Channels of one parallel work item: item -> (b, fine group, block) with every block inside a
// single group of each input-dependent B/C ("fine group" = the gcd of their group sizes) and
// block edges on multiples of `unit` (kLanes for the lane kernels, 1 for the row kernels).
struct Blocks {
  int64_t fine_size, fine_groups, per_group, items, unit;
  // batch item b and channels [d0, d1) of work item it
  void range(int64_t it, int64_t& b, int64_t& d0, int64_t& d1) const {
    b = it / (fine_groups * per_group);
    const int64_t fg = (it / per_group) % fine_groups, k = it % per_group, units = fine_size / unit;
    d0 = fg * fine_size + k * units / per_group * unit;
    d1 = fg * fine_size + (k + 1) * units / per_group * unit;
  }
};

// ---------------------------------------------------------------------------------------------
// lane kernels (selective_scan_lanes.cpp): kLanes channels of one B/C group at a time
// ---------------------------------------------------------------------------------------------
constexpr int kLanes = 16;

// The lane kernels take N = 16, input-dependent B and C whose groups are whole multiples of kLanes
// channels, and token-major (batch, dim, len) inputs (stride 1 between channels), as Mamba lays them
// out; lanes_take (selective_scan_cpu.cpp) decides, and the row kernels take the rest.

// The whole forward (prepare_steps, the recurrence of forward_row, finish_out) for every row: the
// output into out, the last state into last (batch, dim, N) and, when states is given, the state
// at every kChunk-th step.
template <typename T>
void forward_lanes_all(const Scan<T>& s, const TokenMajor<T>& out, T* last, T* states);

// Where the lane backward writes: du, ddelta and dz token-major; dA per row (batch, dim, N); dB and
// dC per work item (items, len, N); the D and delta_bias gradients per row (batch, dim).
template <typename T>
struct LaneGrads {
  TokenMajor<T> du, ddelta, dz;
  T *dA_rows, *dB_part, *dC_part, *dskip, *dbias;
};

// The whole backward (prepare_steps, prepare_dy, the recurrence of backward_row, finish_grads) over
// the work items of p (unit kLanes); dout token-major.
template <typename T>
void backward_lanes_all(const Scan<T>& s, const Blocks& p, const T* states, const T* dlast, const Rows<T>& dout,
                        const LaneGrads<T>& g);

}  // namespace ssl_med_scan
