// Fused selective scan (Mamba's S6) for the CPU: one pass per element forward, one recompute and one
// reverse pass per element backward.
//
// Semantics are those of mamba-ssm's `selective_scan_fn` (see ssl_med/ops/selective_scan.py):
//
//     delta_t <- softplus(delta_t + delta_bias)                        (both optional)
//     h_t      = exp(delta_t A) * h_{t-1} + delta_t u_t B_t            h_{-1} = 0, h_t in R^N
//     out_t    = (<h_t, C_t> + D u_t) * silu(z_t)                      (D and z optional)
//
// Layout (prepared by the Python wrapper, ssl_med/ops/selective_scan_fused.py): u, delta, z are
// (batch, dim, len) with any strides, out and the gradients contiguous; A is (dim, N); B and C are
// each either constant (dim, N) or input-dependent (batch, G, len, N) with channel d reading group
// d / (dim / G); D and delta_bias are (dim,). Everything is float32 or float64 (one dtype).
//
// Work split: every (batch, channel) row is an independent recurrence, so rows run in parallel
// (at::parallel_for, OpenMP in torch's CPU builds) and the N states of a row are one short vector
// (`#pragma omp simd`; N = 16 is compiled as a constant so the states live in registers). The
// float32 exponential is a branch-free polynomial that vectorises with the rest of the step.
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
template <typename T, int NC>
void forward_row(const Scan<T>& s, int64_t b, int64_t d, T* out, T* last, T* states, RowBuffers<T>& w) {
  const int N = NC > 0 ? NC : static_cast<int>(s.nstate);
  T h[NC > 0 ? NC : kMaxState];
  T a_row[NC > 0 ? NC : kMaxState];
  for (int n = 0; n < N; ++n) {
    h[n] = T(0);
    a_row[n] = s.A[d * N + n];
  }
  const int64_t r = s.row(b, d), len = s.len;
  const T* u = s.u.load(b, d, len, w.u.data());
  const T* Bt = s.b_ptr(b, d);
  const T* Ct = s.c_ptr(b, d);
  const int64_t bs = s.b_step(), cs = s.c_step();
  T* o = out + r;
  T* dtbuf = w.dt.data();
  step_sizes(s.delta.load(b, d, len, w.raw.data()), s.bias ? s.bias[d] : T(0), s.softplus, dtbuf, len);
  for (int64_t t = 0; t < len; ++t, Bt += bs, Ct += cs) {
    const T dt = dtbuf[t], dtu = dt * u[t];
    T y = T(0);
#pragma omp simd reduction(+ : y)
    for (int n = 0; n < N; ++n) {
      h[n] = exp_vec(dt * a_row[n]) * h[n] + dtu * Bt[n];
      y += h[n] * Ct[n];
    }
    o[t] = y;
    if (states && ((t + 1) % kChunk == 0 || t + 1 == len)) {
      std::memcpy(states + (t / kChunk) * N, h, N * sizeof(T));
    }
  }
  std::memcpy(last, h, N * sizeof(T));
  const T skip = s.Dskip ? s.Dskip[d] : T(0);
  if (s.z) {
    const T* z = s.z.load(b, d, len, w.z.data());
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) o[t] = (o[t] + skip * u[t]) * z[t] * sigmoid(z[t]);
  } else if (s.Dskip) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) o[t] += skip * u[t];
  }
}

// ---------------------------------------------------------------------------------------------
// backward: one row (b, d); chunks from last to first, recompute then reverse
// ---------------------------------------------------------------------------------------------
template <typename T>
struct RowGrads {
  T* du;
  T* ddelta;
  T* dz;        // nullable
  T* dA;        // (N) for this row
  T* dskip;     // scalar for this row
  T* dbias;     // scalar for this row
  T* dB;        // first element for this row: (len, N) partial or (N) accumulator
  int64_t dbs;  // its stride between time steps (N or 0)
  T* dC;
  int64_t dcs;
};

// Per-thread buffers: a chunk's decays and states, and the row's step sizes and gate.
template <typename T>
struct Scratch {
  std::vector<T> a, h, y, gate;
  RowBuffers<T> rows;
  Scratch(int64_t n, int64_t len) : a(kChunk * n), h(kChunk * n), y(kChunk), gate(len), rows(len) {}
};

template <typename T, int NC>
void backward_row(const Scan<T>& s, int64_t b, int64_t d, const T* states, const T* dout, const T* dlast,
                  const RowGrads<T>& g, Scratch<T>& w) {
  const int N = NC > 0 ? NC : static_cast<int>(s.nstate);
  T a_row[NC > 0 ? NC : kMaxState], carry[NC > 0 ? NC : kMaxState];
  T dA_acc[NC > 0 ? NC : kMaxState], h0[NC > 0 ? NC : kMaxState];
  for (int n = 0; n < N; ++n) {
    a_row[n] = s.A[d * N + n];
    carry[n] = dlast ? dlast[n] : T(0);  // dL/dh_{len-1} from the returned last state
    dA_acc[n] = T(0);
  }
  const int64_t r = s.row(b, d), len = s.len;
  const T* u = s.u.load(b, d, len, w.rows.u.data());
  const T* raw = s.delta.load(b, d, len, w.rows.raw.data());
  const T* z = s.z ? s.z.load(b, d, len, w.rows.z.data()) : nullptr;
  const T* go = dout + r;
  const T* B0 = s.b_ptr(b, d);
  const T* C0 = s.c_ptr(b, d);
  const int64_t bs = s.b_step(), cs = s.c_step();
  const T skip = s.Dskip ? s.Dskip[d] : T(0);
  const T bias = s.bias ? s.bias[d] : T(0);
  T dskip_acc = T(0);
  T *abuf = w.a.data(), *hbuf = w.h.data(), *ybuf = w.y.data(), *dtbuf = w.rows.dt.data();
  T* gate = w.gate.data();
  step_sizes(raw, bias, s.softplus, dtbuf, len);
  if (z) {
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) gate[t] = sigmoid(z[t]);
  }

  const int64_t chunks = (len + kChunk - 1) / kChunk;
  for (int64_t c = chunks - 1; c >= 0; --c) {
    const int64_t t0 = c * kChunk, m = std::min(kChunk, len - t0);
    for (int n = 0; n < N; ++n) h0[n] = c > 0 ? states[(c - 1) * N + n] : T(0);
    // recompute this chunk's decays and states from the saved state at its start
    const T* hp = h0;
    for (int64_t i = 0; i < m; ++i) {
      const int64_t t = t0 + i;
      const T dt = dtbuf[t], dtu = dt * u[t];
      const T* Bt = B0 + t * bs;
      const T* Ct = C0 + t * cs;
      T* ai = abuf + i * N;
      T* hi = hbuf + i * N;
      T y = T(0);
#pragma omp simd reduction(+ : y)
      for (int n = 0; n < N; ++n) {
        ai[n] = exp_vec(dt * a_row[n]);
        hi[n] = ai[n] * hp[n] + dtu * Bt[n];
        y += hi[n] * Ct[n];
      }
      ybuf[i] = y;
      hp = hi;
    }
    // reverse recurrence through the chunk
    for (int64_t i = m - 1; i >= 0; --i) {
      const int64_t t = t0 + i;
      const T dt = dtbuf[t], ut = u[t];
      T dy = go[t];
      if (z) {
        const T zt = z[t], sg = gate[t];
        g.dz[t] = dy * (ybuf[i] + skip * ut) * sg * (T(1) + zt * (T(1) - sg));
        dy *= zt * sg;
      }
      dskip_acc += dy * ut;
      const T dtu = dt * ut;
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
        const T gn = carry[n] + dy * Ct[n];  // dL/dh_t
        dCt[n] += dy * hi[n];
        dBt[n] += gn * dtu;
        gb += gn * Bt[n];                        // dL/d(delta_t u_t)
        const T glog = gn * ai[n] * hprev[n];    // dL/d(delta_t A_n)
        dA_acc[n] += glog * dt;
        gda += glog * a_row[n];
        carry[n] = ai[n] * gn;
      }
      g.du[t] = dy * skip + gb * dt;
      g.ddelta[t] = gda + gb * ut;  // dL/d(step size); through the softplus below
    }
  }
  T dbias_acc = T(0);
  if (s.softplus) {
#pragma omp simd reduction(+ : dbias_acc)
    for (int64_t t = 0; t < len; ++t) {
      g.ddelta[t] *= softplus_grad(raw[t] + bias);
      dbias_acc += g.ddelta[t];
    }
  } else {
#pragma omp simd reduction(+ : dbias_acc)
    for (int64_t t = 0; t < len; ++t) dbias_acc += g.ddelta[t];
  }
  for (int n = 0; n < N; ++n) g.dA[n] = dA_acc[n];
  *g.dskip = dskip_acc;
  *g.dbias = dbias_acc;
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
template <typename T, int NC>
void forward_all(const Scan<T>& s, T* out, T* last, T* states) {
  const int64_t chunks = (s.len + kChunk - 1) / kChunk;
  at::parallel_for(0, s.batch * s.dim, 1, [&](int64_t begin, int64_t end) {
    RowBuffers<T> rows(s.len);
    for (int64_t r = begin; r < end; ++r) {
      T* st = states ? states + r * chunks * s.nstate : nullptr;
      forward_row<T, NC>(s, r / s.dim, r % s.dim, out, last + r * s.nstate, st, rows);
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
  at::Tensor out = at::empty(u.sizes(), u.options());
  at::Tensor last = at::empty({batch, dim, nstate}, u.options());
  at::Tensor states = at::empty({save_states ? batch : 0, dim, chunks, nstate}, u.options());
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Scan<T> s = describe<T>(u, delta, A, B, C, D, z, bias, softplus);
    T* st = save_states ? states.data_ptr<T>() : nullptr;
    if (nstate == 16) {
      forward_all<T, 16>(s, out.data_ptr<T>(), last.data_ptr<T>(), st);
    } else {
      forward_all<T, 0>(s, out.data_ptr<T>(), last.data_ptr<T>(), st);
    }
  };
  if (u.scalar_type() == at::kFloat) run(float{}); else run(double{});
  return {out, last, states};
}

// Channels of one parallel work item: item -> (b, fine group, block) with every block inside a
// single group of each input-dependent B/C ("fine group" = the gcd of their group sizes).
struct Blocks {
  int64_t fine_size, fine_groups, per_group, items;
};

Blocks plan_blocks(int64_t batch, int64_t dim, bool b_var, int64_t b_groups, bool c_var, int64_t c_groups) {
  int64_t fine = dim;
  if (b_var) fine = std::gcd(fine, dim / b_groups);
  if (c_var) fine = std::gcd(fine, dim / c_groups);
  const int64_t fine_groups = dim / fine;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t want = (threads + batch * fine_groups - 1) / (batch * fine_groups);
  const int64_t per_group = std::clamp<int64_t>(want, 1, fine);
  return {fine, fine_groups, per_group, batch * fine_groups * per_group};
}

template <typename T, int NC>
void backward_all(const Scan<T>& s, const Blocks& p, const T* states, const T* dout, const T* dlast,
                  T* du, T* ddelta, T* dz, T* dA_rows, T* dskip_rows, T* dbias_rows, T* dB_part, T* dC_part) {
  const int64_t chunks = (s.len + kChunk - 1) / kChunk;
  const int64_t N = s.nstate;
  at::parallel_for(0, p.items, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> work(N, s.len);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / (p.fine_groups * p.per_group);
      const int64_t fg = (it / p.per_group) % p.fine_groups;
      const int64_t k = it % p.per_group;
      const int64_t d0 = fg * p.fine_size + k * p.fine_size / p.per_group;
      const int64_t d1 = fg * p.fine_size + (k + 1) * p.fine_size / p.per_group;
      for (int64_t d = d0; d < d1; ++d) {
        const int64_t r = b * s.dim + d;
        RowGrads<T> g;
        g.du = du + r * s.len;
        g.ddelta = ddelta + r * s.len;
        g.dz = dz ? dz + r * s.len : nullptr;
        g.dA = dA_rows + r * N;
        g.dskip = dskip_rows + r;
        g.dbias = dbias_rows + r;
        g.dB = s.b_var ? dB_part + it * s.len * N : dB_part + r * N;
        g.dbs = s.b_var ? N : 0;
        g.dC = s.c_var ? dC_part + it * s.len * N : dC_part + r * N;
        g.dcs = s.c_var ? N : 0;
        backward_row<T, NC>(s, b, d, states + r * chunks * N, dout, dlast ? dlast + r * N : nullptr, g, work);
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
  TORCH_CHECK(dout.sizes() == u.sizes() && dout.is_contiguous() && dout.scalar_type() == u.scalar_type(),
              "dout must be contiguous (batch, dim, len)");
  if (dlast) {
    TORCH_CHECK(dlast->is_contiguous() && dlast->sizes() == at::IntArrayRef({batch, dim, nstate}),
                "dlast must be contiguous (batch, dim, N)");
  }
  const bool b_var = B.dim() == 4, c_var = C.dim() == 4;
  const int64_t b_groups = b_var ? B.size(1) : dim, c_groups = c_var ? C.size(1) : dim;
  const Blocks p = plan_blocks(batch, dim, b_var, b_groups, c_var, c_groups);
  const auto opt = u.options();
  at::Tensor du = at::empty(u.sizes(), opt), ddelta = at::empty(u.sizes(), opt);
  at::Tensor dz = z ? at::empty(u.sizes(), opt) : at::empty({0}, opt);
  at::Tensor dA_rows = at::empty({batch, dim, nstate}, opt);
  at::Tensor dskip_rows = at::empty({batch, dim}, opt), dbias_rows = at::empty({batch, dim}, opt);
  at::Tensor dB_part = b_var ? at::zeros({p.items, len, nstate}, opt) : at::zeros({batch, dim, nstate}, opt);
  at::Tensor dC_part = c_var ? at::zeros({p.items, len, nstate}, opt) : at::zeros({batch, dim, nstate}, opt);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    Scan<T> s = describe<T>(u, delta, A, B, C, D, z, bias, softplus);
    auto call = [&](auto kernel) {
      kernel(s, p, states.data_ptr<T>(), dout.data_ptr<T>(), dlast ? dlast->data_ptr<T>() : nullptr,
             du.data_ptr<T>(), ddelta.data_ptr<T>(), z ? dz.data_ptr<T>() : nullptr, dA_rows.data_ptr<T>(),
             dskip_rows.data_ptr<T>(), dbias_rows.data_ptr<T>(), dB_part.data_ptr<T>(), dC_part.data_ptr<T>());
    };
    if (nstate == 16) call(backward_all<T, 16>); else call(backward_all<T, 0>);
  };
  if (u.scalar_type() == at::kFloat) run(float{}); else run(double{});
  at::Tensor dB = reduce_partial(dB_part, b_var, b_groups, p, batch, len, nstate);
  at::Tensor dC = reduce_partial(dC_part, c_var, c_groups, p, batch, len, nstate);
  return {du, ddelta, dA_rows.sum(0), dB, dC, dskip_rows.sum(0), dz, dbias_rows.sum(0)};
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
