// Fused selective scan (Mamba's S6) for the CPU: one pass per element forward, one recompute and one
// reverse pass per element backward.
//
// Semantics are those of mamba-ssm's `selective_scan_fn` (see ssl_med/ops/selective_scan.py):
//
//     delta_t <- softplus(delta_t + delta_bias)                        (both optional)
//     h_t      = exp(delta_t A) * h_{t-1} + delta_t u_t B_t            h_{-1} = 0, h_t in R^N
//     out_t    = (<h_t, C_t> + D u_t) * silu(z_t)                      (D and z optional)
//
// Layout (prepared by the Python wrapper, ssl_med/ops/selective_scan_fused.py): u, delta, z and dout
// are (batch, dim, len) with any strides; out and the gradients of u, delta and z are token-major
// (transposed views of (batch, len, dim) tensors, Mamba's layout); A is (dim, N); B and C are
// each either constant (dim, N) or input-dependent (batch, G, len, N) with channel d reading group
// d / (dim / G); D and delta_bias are (dim,). Everything is float32 or float64 (one dtype).
//
// Work split: every (batch, channel) row is an independent recurrence, so rows run in parallel
// (at::parallel_for, OpenMP in torch's CPU builds) and the N states of a row are one short vector
// (`#pragma omp simd`; N = 16 is compiled as a constant so the states live in registers). With
// input-dependent B and C and N = 16 (Mamba), the lane kernels of selective_scan_lanes.cpp run 16
// channels of a group at once instead, a channel per vector lane. The float32 exponential is a
// branch-free polynomial that vectorises with the rest of the step.
// The elementwise work around the recurrence (the softplus of the step sizes, dt * u, the D skip,
// the silu(z) gate and their derivatives) runs in passes over tokens, vectorised over channels
// (selective_scan_tokens.cpp).
//
// Backward follows the recipe of mamba-ssm's CUDA kernel: the forward keeps the state at the end of
// every kChunk steps; the backward walks the chunks from last to first, recomputes the chunk's
// decays and states from the saved state into a small buffer (kChunk x N, in L1), and runs the
// reverse recurrence g_t = C_t dy_t + exp(delta_{t+1} A) g_{t+1} through it. Gradients of the
// input-dependent B and C are sums over the channels of a group; each parallel work item owns a
// block of channels inside one group and a private partial sum, reduced after the parallel loop,
// so there are no atomics and the result does not depend on scheduling.

#include "selective_scan_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <optional>
#include <vector>

namespace {

using namespace ssl_med_scan;

// ---------------------------------------------------------------------------------------------
// forward: one row (b, d), one pass over its len x N elements
// ---------------------------------------------------------------------------------------------
// Step sizes and dt * u come token-major from prepare_steps; y (before D and the gate) goes
// token-major into out.
template <typename T, int NC>
void forward_row(const Scan<T>& s, int64_t b, int64_t d, const TokenMajor<T>& dts, const TokenMajor<T>& dtus,
                 const TokenMajor<T>& out, T* last, T* states) {
  const int N = NC > 0 ? NC : static_cast<int>(s.nstate);
  T h[NC > 0 ? NC : kMaxState];
  T a2_row[NC > 0 ? NC : kMaxState];  // A log2(e): decays are exp2_vec(dt * a2)
  for (int n = 0; n < N; ++n) {
    h[n] = T(0);
    a2_row[n] = s.A[d * N + n] * T(kLog2e);
  }
  const int64_t len = s.len, step = s.dim;
  const T* Bt = s.b_ptr(b, d);
  const T* Ct = s.c_ptr(b, d);
  const int64_t bs = s.b_step(), cs = s.c_step();
  const T *dt = dts.row(b, d), *dtu = dtus.row(b, d);
  T* o = out.row(b, d);
  for (int64_t t = 0; t < len; ++t, Bt += bs, Ct += cs) {
    const T dtt = dt[t * step], dtut = dtu[t * step];
    T y = T(0);
#pragma omp simd reduction(+ : y)
    for (int n = 0; n < N; ++n) {
      h[n] = exp2_vec(dtt * a2_row[n]) * h[n] + dtut * Bt[n];
      y += h[n] * Ct[n];
    }
    o[t * step] = y;
    if (states && ((t + 1) % kChunk == 0 || t + 1 == len)) {
      std::memcpy(states + (t / kChunk) * N, h, N * sizeof(T));
    }
  }
  std::memcpy(last, h, N * sizeof(T));
}

// ---------------------------------------------------------------------------------------------
// backward: one row (b, d); chunks from last to first, recompute then reverse
// ---------------------------------------------------------------------------------------------
// What a row reads and writes, token-major: dt, dt * u and dL/dy in; y (when needed for dz),
// gb = dL/d(dt u) (into du) and dL/d(dt) through the decays (into ddelta) out; finish_grads
// turns them into the input gradients.
template <typename T>
struct RowIO {
  TokenMajor<T> dt, dtu, dy, y, gb, gdt;
  bool keep_y;
};

template <typename T>
struct RowGrads {
  T* dA;        // (N) for this row
  T* dB;        // first element for this row: (len, N) partial or (N) accumulator
  int64_t dbs;  // its stride between time steps (N or 0)
  T* dC;
  int64_t dcs;
};

// Per-thread buffers: a chunk's decays and states.
template <typename T>
struct Scratch {
  std::vector<T> a, h;
  explicit Scratch(int64_t n) : a(kChunk * n), h(kChunk * n) {}
};

template <typename T, int NC>
void backward_row(const Scan<T>& s, int64_t b, int64_t d, const T* states, const T* dlast, const RowIO<T>& io,
                  const RowGrads<T>& g, Scratch<T>& w) {
  const int N = NC > 0 ? NC : static_cast<int>(s.nstate);
  T a_row[NC > 0 ? NC : kMaxState], carry[NC > 0 ? NC : kMaxState];
  T dA_acc[NC > 0 ? NC : kMaxState], h0[NC > 0 ? NC : kMaxState], a2_row[NC > 0 ? NC : kMaxState];
  for (int n = 0; n < N; ++n) {
    a_row[n] = s.A[d * N + n];
    a2_row[n] = a_row[n] * T(kLog2e);
    carry[n] = dlast ? dlast[n] : T(0);  // dL/dh_{len-1} from the returned last state
    dA_acc[n] = T(0);
  }
  const int64_t len = s.len, step = s.dim;
  const T *dt = io.dt.row(b, d), *dtu = io.dtu.row(b, d), *dy = io.dy.row(b, d);
  T *y = io.y.row(b, d), *gbs = io.gb.row(b, d), *gdts = io.gdt.row(b, d);
  const T* B0 = s.b_ptr(b, d);
  const T* C0 = s.c_ptr(b, d);
  const int64_t bs = s.b_step(), cs = s.c_step();
  T *abuf = w.a.data(), *hbuf = w.h.data();

  const int64_t chunks = (len + kChunk - 1) / kChunk;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, m = std::min(kChunk, len - t0);
    for (int n = 0; n < N; ++n) h0[n] = c > 0 ? states[(c - 1) * N + n] : T(0);
    // recompute this chunk's decays and states from the saved state at its start
    const T* hp = h0;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = t0 + i;
      const T dtt = dt[t * step], dtut = dtu[t * step];
      const T* Bt = B0 + t * bs;
      const T* Ct = C0 + t * cs;
      T* ai = abuf + i * N;
      T* hi = hbuf + i * N;
      T yt = T(0);
#pragma omp simd reduction(+ : yt)
      for (int n = 0; n < N; ++n) {
        ai[n] = exp2_vec(dtt * a2_row[n]);
        hi[n] = ai[n] * hp[n] + dtut * Bt[n];
        yt += hi[n] * Ct[n];
      }
      if (io.keep_y) y[t * step] = yt;
      hp = hi;
    }
    // reverse recurrence through the chunk
    for (int64_t i = m - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const T dtt = dt[t * step], dyt = dy[t * step], dtut = dtu[t * step];
      const T* Bt = B0 + t * bs;
      const T* Ct = C0 + t * cs;
      T* dBt = g.dB + t * g.dbs;
      T* dCt = g.dC + t * g.dcs;
      const T* ai = abuf + i * N;
      const T* hi = hbuf + i * N;
      const T* hprev = i > 0 ? hbuf + (i - 1) * N : h0;
      T gb = T(0), gda = T(0);
#pragma omp simd reduction(+ : gb, gda)
      for (int n = 0; n < N; ++n) {
        const T gn = carry[n] + dyt * Ct[n];  // dL/dh_t
        dCt[n] += dyt * hi[n];
        dBt[n] += gn * dtut;
        gb += gn * Bt[n];                        // dL/d(delta_t u_t)
        const T glog = gn * ai[n] * hprev[n];    // dL/d(delta_t A_n)
        dA_acc[n] += glog * dtt;
        gda += glog * a_row[n];
        carry[n] = ai[n] * gn;
      }
      gbs[t * step] = gb;
      gdts[t * step] = gda;
    }
  }
  for (int n = 0; n < N; ++n) g.dA[n] = dA_acc[n];
}

// ---------------------------------------------------------------------------------------------
// argument checks and the Scan description
// ---------------------------------------------------------------------------------------------
void check_bc(const at::Tensor& M, const at::Tensor& u, int64_t nstate, const char* name) {
  TORCH_CHECK(M.is_contiguous(), name, " must be contiguous");
  if (M.dim() == 2) {
    TORCH_CHECK(M.size(0) == u.size(1) && M.size(1) == nstate, name, " must be (dim, N)");
  } else {
    TORCH_CHECK(M.dim() == 4 && M.size(0) == u.size(0) && M.size(2) == u.size(2) && M.size(3) == nstate,
                name, " must be (dim, N) or (batch, G, len, N)");
    TORCH_CHECK(u.size(1) % M.size(1) == 0, name, ": groups must divide the channels");
  }
}

void check_row_vector(const std::optional<at::Tensor>& t, const at::Tensor& u, const char* name) {
  if (!t) return;
  TORCH_CHECK(t->is_contiguous() && t->dim() == 1 && t->size(0) == u.size(1), name, " must be (dim,)");
  TORCH_CHECK(t->scalar_type() == u.scalar_type(), name, " must have u's dtype");
}

template <typename T>
Scan<T> describe(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                 const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
                 const std::optional<at::Tensor>& bias, bool softplus) {
  TORCH_CHECK(u.device().is_cpu(), "the fused selective scan runs on the CPU");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(), "u and delta must be (batch, dim, len)");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == u.size(1) && A.is_contiguous(), "A must be contiguous (dim, N)");
  const int64_t nstate = A.size(1);
  TORCH_CHECK(nstate >= 1 && nstate <= kMaxState, "N must be in [1, ", kMaxState, "]");
  for (const at::Tensor* t : {&delta, &A, &B, &C}) {
    TORCH_CHECK(t->scalar_type() == u.scalar_type(), "all inputs must have u's dtype");
  }
  check_bc(B, u, nstate, "B");
  check_bc(C, u, nstate, "C");
  check_row_vector(D, u, "D");
  check_row_vector(bias, u, "delta_bias");
  if (z) {
    TORCH_CHECK(z->sizes() == u.sizes() && z->scalar_type() == u.scalar_type(),
                "z must be (batch, dim, len) with u's dtype");
  }
  Scan<T> s;
  s.batch = u.size(0);
  s.dim = u.size(1);
  s.len = u.size(2);
  s.nstate = nstate;
  s.u = Rows<T>(u);
  s.delta = Rows<T>(delta);
  s.A = A.data_ptr<T>();
  s.Bm = B.data_ptr<T>();
  s.Cm = C.data_ptr<T>();
  s.Dskip = D ? D->data_ptr<T>() : nullptr;
  s.z = z ? Rows<T>(*z) : Rows<T>();
  s.bias = bias ? bias->data_ptr<T>() : nullptr;
  s.softplus = softplus;
  s.b_var = B.dim() == 4;
  s.c_var = C.dim() == 4;
  s.b_groups = s.b_var ? B.size(1) : s.dim;
  s.c_groups = s.c_var ? C.size(1) : s.dim;
  return s;
}

// ---------------------------------------------------------------------------------------------
// entry points
// ---------------------------------------------------------------------------------------------
// Whether the lane kernels take this call: N = 16, input-dependent B and C with groups of whole
// multiples of kLanes channels, and u, delta, z (and the backward's dout) token-major.
bool lanes_take(const at::Tensor& u, const at::Tensor& delta, const std::optional<at::Tensor>& z,
                const at::Tensor& B, const at::Tensor& C, int64_t nstate, const at::Tensor* dout = nullptr) {
  const int64_t dim = u.size(1);
  const auto token_major = [](const at::Tensor& t) { return t.stride(1) == 1; };
  const auto lane_groups = [&](const at::Tensor& M) { return M.dim() == 4 && (dim / M.size(1)) % kLanes == 0; };
  return nstate == 16 && lane_groups(B) && lane_groups(C) && token_major(u) && token_major(delta) &&
         (!z || token_major(*z)) && (!dout || token_major(*dout));
}

// A token-major (batch, len, dim) tensor, returned as its (batch, dim, len) view.
at::Tensor token_major(const at::Tensor& like, int64_t batch, int64_t dim, int64_t len) {
  return at::empty({batch, len, dim}, like.options());
}

template <typename T>
TokenMajor<T> tokens_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.size(1), t.size(2)};
}

template <typename T, int NC>
void forward_all(const Scan<T>& s, const TokenMajor<T>& dt, const TokenMajor<T>& dtu, const TokenMajor<T>& out,
                 T* last, T* states) {
  const int64_t chunks = (s.len + kChunk - 1) / kChunk;
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* st = states ? states + r * chunks * s.nstate : nullptr;
      forward_row<T, NC>(s, r / s.dim, r % s.dim, dt, dtu, out, last + r * s.nstate, st);
    }
  });
}

std::vector<at::Tensor> scan_fwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, bool save_states) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, "float32 or float64 only");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1);
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  at::Tensor out = token_major(u, batch, dim, len);
  at::Tensor last = at::empty({batch, dim, nstate}, u.options());
  at::Tensor states = at::empty({save_states ? batch : 0, dim, chunks, nstate}, u.options());
  const bool lanes = lanes_take(u, delta, z, B, C, nstate);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Scan<T> s = describe<T>(u, delta, A, B, C, D, z, bias, softplus);
    T* st = save_states ? states.data_ptr<T>() : nullptr;
    if (lanes) {
      forward_lanes_all(s, tokens_of<T>(out), last.data_ptr<T>(), st);
      return;
    }
    at::Tensor dt = token_major(u, batch, dim, len), dtu = token_major(u, batch, dim, len);
    prepare_steps(s, tokens_of<T>(dt), tokens_of<T>(dtu));
    auto rows = nstate == 16 ? forward_all<T, 16> : forward_all<T, 0>;
    rows(s, tokens_of<T>(dt), tokens_of<T>(dtu), tokens_of<T>(out), last.data_ptr<T>(), st);
    finish_out(s, tokens_of<T>(out));
  };
  if (u.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return {out.transpose(1, 2), last, states};
}

Blocks plan_blocks(int64_t batch, int64_t dim, bool b_var, int64_t b_groups, bool c_var, int64_t c_groups,
                   int64_t unit) {
  int64_t fine = dim;
  if (b_var) fine = std::gcd(fine, dim / b_groups);
  if (c_var) fine = std::gcd(fine, dim / c_groups);
  const int64_t fine_groups = dim / fine;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (threads + batch * fine_groups - 1) / (batch * fine_groups);
  const int64_t per_group = std::clamp<int64_t>(want, 1, fine / unit);
  return {fine, fine_groups, per_group, batch * fine_groups * per_group, unit};
}

template <typename T, int NC>
void backward_all(const Scan<T>& s, const Blocks& p, const T* states, const T* dlast, const RowIO<T>& io,
                  T* dA_rows, T* dB_part, T* dC_part) {
  const int64_t chunks = (s.len + kChunk - 1) / kChunk;
  const int64_t N = s.nstate;
  at::parallel_for(0, p.items, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> work(N);
    for (int64_t it = begin; it < end; ++it) {
      int64_t b, d0, d1;
      p.range(it, b, d0, d1);
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t r = b * s.dim + d;
        RowGrads<T> g;
        g.dA = dA_rows + r * N;
        g.dB = s.b_var ? dB_part + it * s.len * N : dB_part + r * N;
        g.dbs = s.b_var ? N : 0;
        g.dC = s.c_var ? dC_part + it * s.len * N : dC_part + r * N;
        g.dcs = s.c_var ? N : 0;
        backward_row<T, NC>(s, b, d, states + r * chunks * N, dlast ? dlast + r * N : nullptr, io, g, work);
      }
    }
  });
}

// Sum of the per-item partial gradients of B or C into its own layout.
at::Tensor reduce_partial(const at::Tensor& part, bool var, int64_t groups, const Blocks& p, int64_t batch,
                          int64_t len, int64_t nstate) {
  if (!var) return part.sum(0);  // (batch, dim, N) -> (dim, N)
  at::Tensor per_fine = part.view({batch, p.fine_groups, p.per_group, len, nstate}).sum(2);
  return per_fine.view({batch, groups, p.fine_groups / groups, len, nstate}).sum(2);
}

std::vector<at::Tensor> scan_bwd(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                                 const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                                 bool softplus, const at::Tensor& states, const at::Tensor& dout,
                                 const std::optional<at::Tensor>& dlast) {
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble, "float32 or float64 only");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2), nstate = A.size(1);
  const int64_t chunks = (len + kChunk - 1) / kChunk;
  TORCH_CHECK(states.is_contiguous() && states.sizes() == at::IntArrayRef({batch, dim, chunks, nstate}),
              "states must come from the forward with save_states=True");
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.scalar_type() == u.scalar_type(),
              "dout must be (batch, dim, len) with u's dtype");
  if (dlast) {
    TORCH_CHECK(dlast->is_contiguous() && dlast->sizes() == at::IntArrayRef({batch, dim, nstate}),
                "dlast must be contiguous (batch, dim, N)");
  }
  const bool b_var = B.dim() == 4, c_var = C.dim() == 4;
  const int64_t b_groups = b_var ? B.size(1) : dim, c_groups = c_var ? C.size(1) : dim;
  const bool lanes = lanes_take(u, delta, z, B, C, nstate, &dout);
  const Blocks p = plan_blocks(batch, dim, b_var, b_groups, c_var, c_groups, lanes ? kLanes : 1);
  const auto opt = u.options();
  // gradients token-major; scratch: step sizes, dt * u, dL/dy, and y when dz needs it
  at::Tensor du = token_major(u, batch, dim, len), ddelta = token_major(u, batch, dim, len);
  at::Tensor dz = z ? token_major(u, batch, dim, len) : at::empty({0}, opt);
  at::Tensor scratch = at::empty({lanes ? 0 : z ? 4 : 3, batch, len, dim}, opt);  // the lane kernels need none
  at::Tensor dA_rows = at::empty({batch, dim, nstate}, opt);
  at::Tensor dskip_part = at::empty({batch, dim}, opt), dbias_part = at::empty({batch, dim}, opt);
  at::Tensor dB_part = b_var ? at::zeros({p.items, len, nstate}, opt) : at::zeros({batch, dim, nstate}, opt);
  at::Tensor dC_part = c_var ? at::zeros({p.items, len, nstate}, opt) : at::zeros({batch, dim, nstate}, opt);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Scan<T> s = describe<T>(u, delta, A, B, C, D, z, bias, softplus);
    const Rows<T> go(dout);
    if (lanes) {
      const LaneGrads<T> g{tokens_of<T>(du), tokens_of<T>(ddelta), z ? tokens_of<T>(dz) : TokenMajor<T>{nullptr, 0, 0},
                           dA_rows.data_ptr<T>(), dB_part.data_ptr<T>(), dC_part.data_ptr<T>(),
                           dskip_part.data_ptr<T>(), dbias_part.data_ptr<T>()};
      backward_lanes_all(s, p, states.data_ptr<T>(), dlast ? dlast->data_ptr<T>() : nullptr, go, g);
      return;
    }
    const RowIO<T> io{tokens_of<T>(scratch[0]), tokens_of<T>(scratch[1]), tokens_of<T>(scratch[2]),
                      tokens_of<T>(scratch[z ? 3 : 2]), tokens_of<T>(du), tokens_of<T>(ddelta), z.has_value()};
    prepare_steps(s, io.dt, io.dtu);
    prepare_dy(s, go, io.dy);
    auto rows = nstate == 16 ? backward_all<T, 16> : backward_all<T, 0>;
    rows(s, p, states.data_ptr<T>(), dlast ? dlast->data_ptr<T>() : nullptr, io, dA_rows.data_ptr<T>(),
         dB_part.data_ptr<T>(), dC_part.data_ptr<T>());
    finish_grads(s, go, io.dt, io.dy, io.y, io.gb, io.gdt, z ? tokens_of<T>(dz) : io.y, dskip_part.data_ptr<T>(),
                 dbias_part.data_ptr<T>());
  };
  if (u.scalar_type() == at::kFloat) run(float{}); else run(double{});
  at::Tensor dB = reduce_partial(dB_part, b_var, b_groups, p, batch, len, nstate);
  at::Tensor dC = reduce_partial(dC_part, c_var, c_groups, p, batch, len, nstate);
  return {du.transpose(1, 2), ddelta.transpose(1, 2), dA_rows.sum(0), dB, dC, dskip_part.sum(0),
          z ? dz.transpose(1, 2) : at::empty({0}, opt), dbias_part.sum(0)};
}

}  // namespace

TORCH_LIBRARY(ssl_med_scan, m) {
  m.def("fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "bool softplus, bool save_states) -> Tensor[]");
  m.def("bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
        "bool softplus, Tensor states, Tensor dout, Tensor? dlast) -> Tensor[]");
}

// CPU kernels only: torch.compile gets the shapes from the fake kernels registered in Python.
TORCH_LIBRARY_IMPL(ssl_med_scan, CPU, m) {
  m.impl("fwd", &scan_fwd);
  m.impl("bwd", &scan_bwd);
}
