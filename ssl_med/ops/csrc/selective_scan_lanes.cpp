// The fused CPU selective scan's lane kernels: kLanes channels of one B/C group at a time, one channel
// per vector lane (the row kernels and the entry points are in selective_scan_cpu.cpp).
//
// With input-dependent B and C (Mamba), the channels of a group read the same B_t and C_t, and the
// token-major inputs (u, delta, z, dL/dout) and outputs hold neighbouring channels side by side. The
// row kernels put a row's N states in a vector and walk one channel at a time: every step loads its
// step size and dL/dy with a stride of `dim`, and sums y_t = <h_t, C_t> (and, backward, two more
// sums) across the vector. Here kLanes channels run together: a block's inputs at step t are one
// vector load each, B_t[n] and C_t[n] are broadcasts, and the N states of a block are N independent
// vector recurrences with no sum across lanes. The elementwise work around the recurrence (the
// per-token passes of the row kernels) runs inside the same loop over steps, so no token-major
// scratch array is written and read back. The arithmetic per element is the row kernels'; only the
// order of the sums over the N states (y, gb and gda) differs, by rounding.
//
// The gradients of B and C are sums over a group's channels. The backward keeps them per lane, in
// a (len, N, kLanes) buffer for the whole work item (every block of the item adds to it), and sums
// the lanes into the item's (len, N) partial once at the end, so no step needs a sum across lanes.

#include "selective_scan_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace ssl_med_scan {

namespace {

constexpr int N = 16, W = kLanes;

// The block's first element of a token-major (batch, dim, len) input at step t.
template <typename T>
__attribute__((always_inline)) inline const T* lane_ptr(const Rows<T>& r, int64_t b, int64_t t, int64_t d0) {
  return r.p + b * r.sb + t * r.st + d0;
}

// The block's A log2(e) (for the decays), state n of channel d0 + l at [n][l].
template <typename T>
void load_a2(const Scan<T>& s, int64_t d0, T (&a2)[N][W]) {
  for (int n = 0; n < N; ++n) {
    for (int l = 0; l < W; ++l) a2[n][l] = s.A[(d0 + l) * N + n] * T(kLog2e);
  }
}

// h <- exp(dt A) h + dt u B_t over the block, y (if given) <- <h, C_t> per lane; a (if given) keeps
// the decays. h, a: (N, W).
template <typename T>
__attribute__((always_inline)) inline void lane_step(const T (&a2)[N][W], const T* dtt, const T* dtut, const T* Bt,
                                                     const T* Ct, const T* hprev, T* h, T* a, T* y) {
  for (int n = 0; n < N; ++n) {
    const T bn = Bt[n];
    const T* hp = hprev + n * W;
    T* hn = h + n * W;
#pragma omp simd
    for (int l = 0; l < W; ++l) {
      const T decay = exp2_vec(dtt[l] * a2[n][l]);
      if (a) a[n * W + l] = decay;
      hn[l] = decay * hp[l] + dtut[l] * bn;
    }
    if (y) {
      const T cn = Ct[n];
#pragma omp simd
      for (int l = 0; l < W; ++l) y[l] += hn[l] * cn;
    }
  }
}

// The block's step sizes at token (b, t): dt = softplus(delta + bias) (or without the softplus) and
// dt * u, as prepare_steps computes them for a token's channels.
template <typename T>
__attribute__((always_inline)) inline void lane_steps(const Scan<T>& s, const T* raw, const T* ut, const T* bias,
                                                      T* dt, T* dtu) {
#pragma omp simd
  for (int l = 0; l < W; ++l) dt[l] = raw[l] + bias[l];
  if (s.softplus) {
#pragma omp simd
    for (int l = 0; l < W; ++l) dt[l] = softplus(dt[l]);
  }
#pragma omp simd
  for (int l = 0; l < W; ++l) dtu[l] = dt[l] * ut[l];
}

// The whole forward of one block, elementwise work included: per step, the block's step sizes
// dt = softplus(delta + bias) and dt * u (prepare_steps), the recurrence, and
// out = (y + D u) * silu(z) (finish_out), so each input is read and the output written once.
template <typename T>
void forward_block(const Scan<T>& s, int64_t b, int64_t d0, const TokenMajor<T>& out, T* last, T* states) {
  alignas(64) T a2[N][W], h[N][W] = {}, bias[W] = {}, skip[W] = {};
  load_a2(s, d0, a2);
  for (int l = 0; l < W; ++l) {
    if (s.bias) bias[l] = s.bias[d0 + l];
    if (s.Dskip) skip[l] = s.Dskip[d0 + l];
  }
  const int64_t len = s.len, chunks = (len + kChunk - 1) / kChunk, row0 = b * s.dim + d0;
  const T* Bt = s.b_ptr(b, d0);
  const T* Ct = s.c_ptr(b, d0);
  for (int64_t t = 0; t < len; ++t, Bt += N, Ct += N) {
    const T* ut = lane_ptr(s.u, b, t, d0);
    alignas(64) T dt[W], dtu[W], y[W] = {};
    lane_steps(s, lane_ptr(s.delta, b, t, d0), ut, bias, dt, dtu);
    lane_step(a2, dt, dtu, Bt, Ct, &h[0][0], &h[0][0], static_cast<T*>(nullptr), y);
#pragma omp simd
    for (int l = 0; l < W; ++l) y[l] += skip[l] * ut[l];
    if (s.z) {
      const T* zt = lane_ptr(s.z, b, t, d0);
#pragma omp simd
      for (int l = 0; l < W; ++l) y[l] = y[l] * zt[l] * sigmoid(zt[l]);
    }
    std::copy(y, y + W, out.token(b, t) + d0);
    if (states && ((t + 1) % kChunk == 0 || t + 1 == len)) {
      for (int l = 0; l < W; ++l) {
        for (int n = 0; n < N; ++n) states[((row0 + l) * chunks + t / kChunk) * N + n] = h[n][l];
      }
    }
  }
  for (int l = 0; l < W; ++l) {
    for (int n = 0; n < N; ++n) last[(row0 + l) * N + n] = h[n][l];
  }
}

// Per-thread buffers: a chunk's decays, states, step sizes and recurrence outputs, and the work
// item's per-lane dB and dC.
template <typename T>
struct LaneScratch {
  std::vector<T> a, h, dt, dtu, y, dB, dC;
  explicit LaneScratch(int64_t len)
      : a(kChunk * N * W), h(kChunk * N * W), dt(kChunk * W), dtu(kChunk * W), y(kChunk * W), dB(len * N * W),
        dC(len * N * W) {}
};

// The whole backward of one block: the chunks from last to first, each recomputed from its saved
// state (step sizes included), then the reverse recurrence with, per step, dL/dy from dout and the
// gate (prepare_dy) and the input gradients from gb and gda (finish_grads).
template <typename T>
void backward_block(const Scan<T>& s, int64_t b, int64_t d0, const T* states, const T* dlast, const Rows<T>& dout,
                    const LaneGrads<T>& g, LaneScratch<T>& w) {
  alignas(64) T a2[N][W], a_row[N][W], carry[N][W] = {}, dA[N][W] = {}, h0[N][W];
  alignas(64) T bias[W] = {}, skip[W] = {}, dskip[W] = {}, dbias[W] = {};
  load_a2(s, d0, a2);
  const int64_t len = s.len, chunks = (len + kChunk - 1) / kChunk, row0 = b * s.dim + d0;
  for (int l = 0; l < W; ++l) {
    if (s.bias) bias[l] = s.bias[d0 + l];
    if (s.Dskip) skip[l] = s.Dskip[d0 + l];
    for (int n = 0; n < N; ++n) {
      a_row[n][l] = s.A[(d0 + l) * N + n];
      if (dlast) carry[n][l] = dlast[(row0 + l) * N + n];  // dL/dh_{len-1} from the returned last state
    }
  }
  const auto at = [&](const Rows<T>& r, int64_t t) { return lane_ptr(r, b, t, d0); };
  const T* B0 = s.b_ptr(b, d0);
  const T* C0 = s.c_ptr(b, d0);
  T *abuf = w.a.data(), *hbuf = w.h.data();
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, m = std::min(kChunk, len - t0);
    for (int l = 0; l < W; ++l) {
      for (int n = 0; n < N; ++n) h0[n][l] = c > 0 ? states[((row0 + l) * chunks + c - 1) * N + n] : T(0);
    }
    // recompute this chunk's step sizes, decays, states and (for dz) outputs from its saved state
    const T* hp = &h0[0][0];
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = t0 + i;
      T *dt = w.dt.data() + i * W, *dtu = w.dtu.data() + i * W, *y = w.y.data() + i * W;
      lane_steps(s, at(s.delta, t), at(s.u, t), bias, dt, dtu);
      if (s.z) std::fill(y, y + W, T(0));  // the outputs only feed dz
      lane_step(a2, dt, dtu, B0 + t * N, C0 + t * N, hp, hbuf + i * N * W, abuf + i * N * W,
                s.z ? y : static_cast<T*>(nullptr));
      hp = hbuf + i * N * W;
    }
    // reverse recurrence through the chunk
    for (int64_t i = m - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const T *dt = w.dt.data() + i * W, *dtu = w.dtu.data() + i * W, *ut = at(s.u, t), *go = at(dout, t);
      const T* zt = s.z ? at(s.z, t) : nullptr;
      alignas(64) T dy[W], gb[W] = {}, gda[W] = {};
      if (zt) {
#pragma omp simd
        for (int l = 0; l < W; ++l) dy[l] = go[l] * (zt[l] * sigmoid(zt[l]));
      } else {
        std::copy(go, go + W, dy);
      }
      const T* Bt = B0 + t * N;
      const T* Ct = C0 + t * N;
      T* dBt = w.dB.data() + t * N * W;
      T* dCt = w.dC.data() + t * N * W;
      const T* ai = abuf + i * N * W;
      const T* hi = hbuf + i * N * W;
      const T* hprev = i > 0 ? hbuf + (i - 1) * N * W : &h0[0][0];
      for (int n = 0; n < N; ++n) {
        const T bn = Bt[n], cn = Ct[n];
        const int64_t o = n * W;
#pragma omp simd
        for (int l = 0; l < W; ++l) {
          const T gn = carry[n][l] + dy[l] * cn;  // dL/dh_t
          dCt[o + l] += dy[l] * hi[o + l];
          dBt[o + l] += gn * dtu[l];
          gb[l] += gn * bn;                              // dL/d(delta_t u_t)
          const T glog = gn * ai[o + l] * hprev[o + l];  // dL/d(delta_t A_n)
          dA[n][l] += glog * dt[l];
          gda[l] += glog * a_row[n][l];
          carry[n][l] = ai[o + l] * gn;
        }
      }
      // the input gradients of this step, as finish_grads computes them
      const TokenGradIn<T> in{gb, gda, ut, at(s.delta, t), bias, dt, dy, skip, go, zt, w.y.data() + i * W};
      token_grads<T>(W, s.softplus, in, g.du.token(b, t) + d0, g.ddelta.token(b, t) + d0,
                     zt ? g.dz.token(b, t) + d0 : nullptr, dskip, dbias);
    }
  }
  for (int l = 0; l < W; ++l) {
    for (int n = 0; n < N; ++n) g.dA_rows[(row0 + l) * N + n] = dA[n][l];
    g.dskip[row0 + l] = dskip[l];
    g.dbias[row0 + l] = dbias[l];
  }
}

// dst[t, n] = sum over lanes of lanes[t, n, :], for len * N entries.
template <typename T>
void sum_lanes(const std::vector<T>& lanes, T* dst) {
  for (size_t i = 0; i < lanes.size() / W; ++i) {
    T sum = T(0);
#pragma omp simd reduction(+ : sum)
    for (int l = 0; l < W; ++l) sum += lanes[i * W + l];
    dst[i] = sum;
  }
}

}  // namespace

template <typename T>
void forward_lanes_all(const Scan<T>& s, const TokenMajor<T>& out, T* last, T* states) {
  const int64_t blocks = s.dim / W;
  at::parallel_for(0, s.batch * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) forward_block(s, i / blocks, (i % blocks) * W, out, last, states);
  });
}

template <typename T>
void backward_lanes_all(const Scan<T>& s, const Blocks& p, const T* states, const T* dlast, const Rows<T>& dout,
                        const LaneGrads<T>& g) {
  at::parallel_for(0, p.items, 1, [&](int64_t begin, int64_t end) {
    LaneScratch<T> work(s.len);
    for (int64_t it = begin; it < end; ++it) {
      int64_t b, d0, d1;
      p.range(it, b, d0, d1);
      std::fill(work.dB.begin(), work.dB.end(), T(0));
      std::fill(work.dC.begin(), work.dC.end(), T(0));
      for (int64_t d = d0; d < d1; d += W) backward_block(s, b, d, states, dlast, dout, g, work);
      sum_lanes(work.dB, g.dB_part + it * s.len * N);
      sum_lanes(work.dC, g.dC_part + it * s.len * N);
    }
  });
}

template void forward_lanes_all<float>(const Scan<float>&, const TokenMajor<float>&, float*, float*);
template void forward_lanes_all<double>(const Scan<double>&, const TokenMajor<double>&, double*, double*);
template void backward_lanes_all<float>(const Scan<float>&, const Blocks&, const float*, const float*,
                                        const Rows<float>&, const LaneGrads<float>&);
template void backward_lanes_all<double>(const Scan<double>&, const Blocks&, const double*, const double*,
                                         const Rows<double>&, const LaneGrads<double>&);

}  // namespace ssl_med_scan
