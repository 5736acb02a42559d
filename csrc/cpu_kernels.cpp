// CPU kernels of the Uni-LoRA primitives.
//
// A and B are gathered (scaled) from theta_d once per call into one layer-sized buffer; all
// products are BLAS calls (at::mm_out / addmm_, i.e. MKL/OpenBLAS sgemm/dgemm) on row blocks
// that fit in L2, one chunk of blocks per thread. Low-precision activations (fp16/bf16) are
// converted block by block to fp32 because CPU BLAS has no fp16 GEMM with fp32 accumulation
// everywhere; every product then runs in fp32 (fp64 when x, theta or g is fp64) and a
// low-precision output is rounded once. Shapes are chosen for BLAS: r is tiny, so the
// products are written as (r x K) @ (K x rows) rather than (rows x K) @ (K x r), which MKL
// runs ~3x faster (measured: 6.6 us vs 19 us for 64 rows of 1024).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_simd.h"
#include "unilora.h"

namespace unilora {
namespace {

constexpr int64_t kGrain = 8192;               // elements per task of the element-wise loops
constexpr int64_t kBlockBytes = 512 * 1024;    // one row block of x (or g) in compute precision
constexpr int64_t kSimdRows = 64;              // rows per block of the SIMD forward/backward (blocks split by thread)

int64_t block_rows(int64_t width, int64_t elem_size) {
  return std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, width * elem_size), 16, 1024);
}

// Runs f(chunk, first_block, last_block) over a fixed partition of [0, nblocks) into at most
// one chunk per thread: per-chunk partial sums are then reduced in chunk order, so results do
// not depend on scheduling (only on the thread count). The caller's thread-local state (the
// dispatcher's autograd exclusion, grad mode) is carried into the workers, whose at:: calls
// would otherwise see inputs that require grad and try to record them.
template <typename F>
int64_t run_chunks(int64_t nblocks, const F& f) {
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  const at::ThreadLocalState state;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = c0; c < c1; ++c) f(c, c * nblocks / nchunks, (c + 1) * nblocks / nchunks);
  });
  return nchunks;
}

// ---- gather: dst[i] = theta[j(i)] * scale(j(i)) over the layer's flattened [A | B] ----
template <typename theta_t, typename acc_t>
void gather_into(const theta_t* theta, const Projection& pj, acc_t* dst_a, acc_t* dst_b) {
  const float* sc = pj.scales.data_ptr<float>();
  const int64_t n = pj.numel(), na = pj.numel_a(), d = pj.d;
  if (pj.hashed) {
    const float s0 = sc[0], s1 = sc[1];
    at::parallel_for(0, n, kGrain / 8, [&](int64_t b, int64_t e) {  // ~40 integer ops per element
      for (int64_t i = b; i < e; ++i) {
        const int64_t j = hashed_index(pj.offset + i, pj.hp);
        (i < na ? dst_a[i] : dst_b[i - na]) = acc_t(theta[j]) * acc_t(hashed_scale(j, pj.hp, s0, s1));
      }
    });
    return;
  }
  const int32_t* ia = pj.idx_a.data_ptr<int32_t>();
  const int32_t* ib = pj.idx_b.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  // theta and the scales are read at random and are usually out of cache by the time a layer
  // runs (the GEMMs stream far more than L3 between two steps): prefetch kAhead elements ahead
  // so the misses overlap (measured: 80 us -> 50 us for 8192 elements, d = 23,040).
  constexpr int64_t kAhead = 32;
  at::parallel_for(0, n, kGrain / 4, [&](int64_t b, int64_t e) {
    bool oob = false;
    for (int64_t i = b; i < e; ++i) {
      if (i + kAhead < e) {
        const int64_t jp = i + kAhead < na ? ia[i + kAhead] : ib[i + kAhead - na];
        if (static_cast<uint64_t>(jp) < static_cast<uint64_t>(d)) {
          __builtin_prefetch(theta + jp);
          __builtin_prefetch(sc + jp);
        }
      }
      const int64_t j = i < na ? ia[i] : ib[i - na];
      const bool out = (j < 0) | (j >= d);
      oob |= out;
      const int64_t js = out ? 0 : j;  // never read outside theta; reported below
      (i < na ? dst_a[i] : dst_b[i - na]) = acc_t(theta[js]) * acc_t(sc[js]);
    }
    if (oob) bad = true;
  });
  TORCH_CHECK(!bad, "unilora: a projection index is outside [0, d = ", d, ")");
}

// ---- scatter: grad[j(i)] += scale(j(i)) * [dA | dB][i], one pass, serial adds (deterministic) ----
template <typename acc_t, typename grad_t>
void scatter_into(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, grad_t* grad) {
  const int64_t n = pj.numel(), na = pj.numel_a(), d = pj.d, r = pj.r, in_f = pj.in_f;
  const float* sc = pj.scales.data_ptr<float>();
  const acc_t* a = dA.data_ptr<acc_t>();
  const auto sa = dA.strides();
  const acc_t* bp = dB.data_ptr<acc_t>();
  const auto sb = dB.strides();
  // Phase 1 (parallel): the scaled value of every element and, for the hashed projection, its
  // theta_d index, into layer-sized buffers.
  at::Tensor vals = at::empty({n}, dA.options());
  at::Tensor jbuf = pj.hashed ? at::empty({n}, dA.options().dtype(at::kInt)) : at::Tensor();
  acc_t* v = vals.data_ptr<acc_t>();
  int32_t* jh = pj.hashed ? jbuf.data_ptr<int32_t>() : nullptr;
  const int32_t* ia = pj.hashed ? nullptr : pj.idx_a.data_ptr<int32_t>();
  const int32_t* ib = pj.hashed ? nullptr : pj.idx_b.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, pj.hashed ? kGrain / 8 : kGrain, [&](int64_t b, int64_t e) {
    bool oob = false;
    for (int64_t i = b; i < e; ++i) {
      const acc_t g = i < na ? a[(i / in_f) * sa[0] + (i % in_f) * sa[1]]
                             : bp[((i - na) / r) * sb[0] + ((i - na) % r) * sb[1]];
      float s;
      if (jh) {
        const int64_t j = hashed_index(pj.offset + i, pj.hp);
        jh[i] = static_cast<int32_t>(j);
        s = hashed_scale(j, pj.hp, sc[0], sc[1]);
      } else {
        const int64_t j = i < na ? ia[i] : ib[i - na];
        const bool out = (j < 0) | (j >= d);
        oob |= out;
        s = out ? 0.f : sc[j];
      }
      v[i] = g * acc_t(s);
    }
    if (oob) bad = true;
  });
  TORCH_CHECK(!bad, "unilora: a projection index is outside [0, d = ", d, ")");
  // Phase 2 (serial): indices collide, so the adds run in element order.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = jh ? jh[i] : (i < na ? ia[i] : ib[i - na]);
    grad[j] += static_cast<grad_t>(v[i]);
  }
}

// (theta_d index, scale) of element i of the flattened [A | B]; an out-of-range uniform index
// sets `bad` (reported by the caller) and reads element 0 instead of memory outside theta.
// Holds copies, not a reference to the Projection, so the hot loops keep them in registers.
struct Lookup {
  const float* sc;
  const int32_t* ia;
  const int32_t* ib;
  int64_t na, d, offset;
  bool hashed;
  HashedProjection hp;
  explicit Lookup(const Projection& p)
      : sc(p.scales.data_ptr<float>()),
        ia(p.hashed ? nullptr : p.idx_a.data_ptr<int32_t>()),
        ib(p.hashed ? nullptr : p.idx_b.data_ptr<int32_t>()),
        na(p.numel_a()),
        d(p.d),
        offset(p.offset),
        hashed(p.hashed),
        hp(p.hp) {}
  int64_t operator()(int64_t i, float* s, bool* bad) const {
    if (hashed) {
      const int64_t j = hashed_index(offset + i, hp);
      *s = hashed_scale(j, hp, sc[0], sc[1]);
      return j;
    }
    int64_t j = i < na ? ia[i] : ib[i - na];
    const bool out = static_cast<uint64_t>(j) >= static_cast<uint64_t>(d);
    *bad |= out;
    j = out ? 0 : j;
    *s = sc[j];
    return j;
  }
};

constexpr int64_t kSmallM = 4;  // up to this many rows (no dropout), forward_small beats BLAS
constexpr int64_t kSmallGrain = 2048;  // layer elements per thread below which waking one costs more

constexpr int64_t kLanes = 4;  // independent partial sums per row in partial_h
constexpr int64_t kMaxDecodeR = 64;  // decode_linear keeps h (MM x r) on the stack

// hp[m * r + k] = sum over columns [lo, hi) of x[m, c] * A[k, c], A read from theta through the
// projection, for the MM rows of x (MM a compile-time row count: the accumulators live in
// registers); kLanes independent partial sums per row (an FP add chain through one accumulator
// would cost its latency per element).
template <int64_t MM, typename x_t, typename theta_t, typename acc_t>
void partial_h(const x_t* xp, int64_t ldx, const theta_t* th, const Lookup& lookup, int64_t r, int64_t in_f,
               int64_t lo, int64_t hi, acc_t* hp, bool* bad) {
  for (int64_t k = 0; k < r; ++k) {
    acc_t acc[kLanes][MM] = {};
    int64_t c = lo;
    for (; c + kLanes <= hi; c += kLanes) {
      for (int64_t u = 0; u < kLanes; ++u) {
        float s;
        const int64_t j = lookup(k * in_f + c + u, &s, bad);
        const acc_t a = acc_t(th[j]) * acc_t(s);
        for (int64_t m = 0; m < MM; ++m) acc[u][m] += acc_t(xp[m * ldx + c + u]) * a;
      }
    }
    for (; c < hi; ++c) {
      float s;
      const int64_t j = lookup(k * in_f + c, &s, bad);
      const acc_t a = acc_t(th[j]) * acc_t(s);
      for (int64_t m = 0; m < MM; ++m) acc[0][m] += acc_t(xp[m * ldx + c]) * a;
    }
    for (int64_t m = 0; m < MM; ++m) hp[m * r + k] = (acc[0][m] + acc[1][m]) + (acc[2][m] + acc[3][m]);
  }
}

// h[i] = sum of the nchunks partial h's, in chunk order (deterministic for a thread count).
template <typename acc_t>
void reduce_parts(const std::vector<acc_t>& part, int64_t nchunks, int64_t n, acc_t* h) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t v = part[i];
    for (int64_t ch = 1; ch < nchunks; ++ch) v += part[ch * n + i];
    h[i] = v;
  }
}

// Threads that split a layer of `work` elements, none with less than kSmallGrain of it.
int64_t small_chunks(int64_t work) {
  return std::clamp<int64_t>(work / kSmallGrain, 1, std::max<int64_t>(1, at::get_num_threads()));
}

// out += x A^T B^T for MM <= kSmallM rows straight from the indices: at M = 1 the fixed costs
// of buffers and BLAS calls exceed the work (measured: ~10 us of ~20 us at in = out = 1024).
// h = x A^T splits the columns of A into one chunk per thread, whose partial sums are added in
// chunk order; the update then splits the output features between threads.
template <int64_t MM, typename x_t, typename out_t, typename theta_t, typename acc_t>
void forward_small(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
                   acc_t* h) {
  const int64_t ldx = x.stride(0), in_f = pj.in_f, out_f = pj.out_f, r = pj.r, na = pj.numel_a();
  const x_t* xp = x.data_ptr<x_t>();
  out_t* op = out.data_ptr<out_t>();
  const theta_t* th = theta.data_ptr<theta_t>();
  const Lookup lookup(pj);
  std::atomic<bool> any_bad{false};
  const int64_t nchunks = small_chunks(na);
  std::vector<acc_t> part(static_cast<size_t>(nchunks * MM * r), acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    bool bad = false;
    for (int64_t ch = c0; ch < c1; ++ch) {
      partial_h<MM>(xp, ldx, th, lookup, r, in_f, ch * in_f / nchunks, (ch + 1) * in_f / nchunks,
                    part.data() + ch * MM * r, &bad);
    }
    if (bad) any_bad = true;
  });
  TORCH_CHECK(!any_bad, "unilora: a projection index is outside [0, d = ", pj.d, ")");
  reduce_parts(part, nchunks, MM * r, h);
  at::parallel_for(0, out_f, std::max<int64_t>(1, kSmallGrain / r), [&](int64_t o0, int64_t o1) {
    bool bad = false;
    for (int64_t o = o0; o < o1; ++o) {
      acc_t acc[MM] = {};
      for (int64_t k = 0; k < r; ++k) {
        float s;
        const int64_t j = lookup(na + o * r + k, &s, &bad);
        const acc_t b = acc_t(th[j]) * acc_t(s);
        for (int64_t m = 0; m < MM; ++m) acc[m] += h[m * r + k] * b;
      }
      for (int64_t m = 0; m < MM; ++m) op[m * out_f + o] = static_cast<out_t>(acc_t(op[m * out_f + o]) + acc[m]);
    }
    if (bad) any_bad = true;
  });
  TORCH_CHECK(!any_bad, "unilora: a projection index is outside [0, d = ", pj.d, ")");
}

// The whole decode step of an fp32 nn.Linear, out = x W^T + bias + (x A^T) B^T, in one parallel
// region: each thread takes a column chunk of A (partial h) and a row chunk of W, whose base
// GEMV (SIMD) it computes while it gathers the matching rows of B; the rank-r update is then
// added serially (out_f * r * MM multiply-adds). One thread wake-up instead of two, the base
// output is never re-read by another thread, and the B gather overlaps the weight stream.
template <int64_t MM>
void decode_linear(const at::Tensor& x, const at::Tensor& w, const float* bias, const at::Tensor& theta,
                   const Projection& pj, at::Tensor& out) {
  RECORD_FUNCTION("unilora_cpu::decode_linear", std::vector<c10::IValue>());  // a named range in torch.profiler
  const int64_t ldx = x.stride(0), ldw = w.stride(0), in_f = pj.in_f, out_f = pj.out_f, r = pj.r;
  const int64_t na = pj.numel_a();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* th = theta.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Lookup lookup(pj);
  std::atomic<bool> any_bad{false};
  const int64_t nchunks = small_chunks(in_f * out_f);
  std::vector<float> part(static_cast<size_t>(nchunks * MM * r), 0.f);
  std::vector<float> bbuf(static_cast<size_t>(out_f * r));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    bool bad = false;
    for (int64_t ch = c0; ch < c1; ++ch) {
      partial_h<MM>(xp, ldx, th, lookup, r, in_f, ch * in_f / nchunks, (ch + 1) * in_f / nchunks,
                    part.data() + ch * MM * r, &bad);
      const int64_t o0 = ch * out_f / nchunks, o1 = (ch + 1) * out_f / nchunks;
      simd::gemv_rows(wp, ldw, xp, ldx, MM, in_f, bias, op, out_f, o0, o1);
      for (int64_t i = na + o0 * r; i < na + o1 * r; ++i) {
        float s;
        const int64_t j = lookup(i, &s, &bad);
        bbuf[i - na] = th[j] * s;
      }
    }
    if (bad) any_bad = true;
  });
  TORCH_CHECK(!any_bad, "unilora: a projection index is outside [0, d = ", pj.d, ")");
  float h[MM * kMaxDecodeR];
  reduce_parts(part, nchunks, MM * r, h);
  for (int64_t o = 0; o < out_f; ++o) {
    const float* b = bbuf.data() + o * r;
    for (int64_t m = 0; m < MM; ++m) {
      float acc = 0.f;
      for (int64_t k = 0; k < r; ++k) acc += h[m * r + k] * b[k];
      op[m * out_f + o] += acc;
    }
  }
}

template <typename x_t, typename out_t, typename theta_t, typename acc_t>
void forward_small_rows(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
                        acc_t* h) {
  static_assert(kSmallM == 4, "forward_small_rows dispatches 1..4 rows");
  switch (x.size(0)) {
    case 1: return forward_small<1, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    case 2: return forward_small<2, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    case 3: return forward_small<3, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    default: return forward_small<4, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
  }
}

// In place on a contiguous (rows x cols) block whose first row is row m0 of the flattened input:
// buf *= keep * scale; keep mask saved to `mask` when given.
template <typename T>
void apply_dropout(T* buf, int64_t rows, int64_t cols, int64_t m0, const Dropout& dr, uint8_t* mask) {
  const T s = static_cast<T>(dr.scale);
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t base = static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(cols);
    T* row = buf + i * cols;
    uint8_t* mrow = mask ? mask + i * cols : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      const bool keep = dropout_keep(dr.seed, base + c, dr.threshold);
      row[c] = keep ? row[c] * s : T(0);
      if (mrow) mrow[c] = keep;
    }
  }
}

template <typename T>
void apply_mask(T* buf, int64_t n, const uint8_t* mask, double scale) {
  const T s = static_cast<T>(scale);
  for (int64_t i = 0; i < n; ++i) buf[i] = mask[i] ? buf[i] * s : T(0);
}

// x rows [m0, m0 + rows) in compute precision with dropout applied: a view of x itself when
// nothing needs changing (BLAS reads any row stride), else the thread's block buffer.
at::Tensor input_block(const at::Tensor& x, int64_t m0, int64_t rows, at::Tensor& buf, const Dropout& dr,
                       uint8_t* mask) {
  at::Tensor xb = x.narrow(0, m0, rows);
  if (x.scalar_type() == buf.scalar_type() && !dr.active) return xb;
  at::Tensor v = buf.narrow(0, 0, rows);
  v.copy_(xb);
  if (dr.active) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "unilora_dropout", [&] {
      apply_dropout(v.data_ptr<scalar_t>(), rows, x.size(1), m0, dr, mask);
    });
  }
  return v;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_cpu(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype) {
  RECORD_FUNCTION("unilora_cpu::gather", std::vector<c10::IValue>());  // a named range in torch.profiler
  const auto opts = theta.options().dtype(dtype);
  at::Tensor A = at::empty({pj.r, pj.in_f}, opts), B = at::empty({pj.out_f, pj.r}, opts);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_gather_theta", [&] {
    using theta_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dtype, "unilora_gather", [&] {
      gather_into<theta_t, scalar_t>(theta.data_ptr<theta_t>(), pj, A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>());
    });
  });
  return {A, B};
}

at::Tensor scatter_cpu(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, at::ScalarType dtype,
                       bool /*deterministic*/) {
  RECORD_FUNCTION("unilora_cpu::scatter", std::vector<c10::IValue>());  // a named range in torch.profiler
  at::Tensor grad = at::zeros({pj.d}, dA.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dA.scalar_type(), "unilora_scatter", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dtype, "unilora_scatter_grad", [&] {
      scatter_into<acc_t, scalar_t>(dA, dB, pj, grad.data_ptr<scalar_t>());
    });
  });
  return grad;
}

at::Tensor forward_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                       const Dropout& dr) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const int64_t M = x.size(0), r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  const auto opts = x.options().dtype(cd);
  at::Tensor h = at::empty({M, r}, opts);
  if (M <= kSmallM && !dr.active) {
    const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unilora_small_x", [&] {
      using x_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unilora_small_out", [&] {
        using out_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_small_theta", [&] {
          using theta_t = scalar_t;
          AT_DISPATCH_FLOATING_TYPES(cd, "unilora_small", [&] {
            forward_small_rows<x_t, out_t, theta_t, scalar_t>(xs, out, theta, pj, h.data_ptr<scalar_t>());
          });
        });
      });
    });
    return h;
  }
  const auto [A, B] = gather_cpu(theta, pj, cd);
  if (cd == at::kFloat && x.scalar_type() == cd && out.scalar_type() == cd && !dr.active && x.stride(1) == 1 &&
      out.stride(1) == 1 && simd::available()) {
    // One pass per x row: h = x A^T, out += h B^T (BLAS runs these r-wide products slowly).
    RECORD_FUNCTION("unilora_cpu::adapter_forward_simd", std::vector<c10::IValue>());
    const at::Tensor BT = B.t().contiguous();
    simd::AdapterForward a;
    a.x = x.data_ptr<float>();
    a.ldx = x.stride(0);
    a.A = A.data_ptr<float>();
    a.BT = BT.data_ptr<float>();
    a.r = r;
    a.in_f = in_f;
    a.out_f = out_f;
    a.out = out.data_ptr<float>();
    a.ldo = out.stride(0);
    a.h = h.data_ptr<float>();
    run_chunks((M + kSimdRows - 1) / kSimdRows, [&](int64_t, int64_t b0, int64_t b1) {
      simd::adapter_forward(a, b0 * kSimdRows, std::min(M, b1 * kSimdRows));
    });
    return h;
  }
  const at::Tensor Bt = B.t();
  const bool out_direct = out.scalar_type() == cd;
  const int64_t mb = block_rows(std::max(in_f, out_f), at::elementSize(cd));
  run_chunks((M + mb - 1) / mb, [&](int64_t, int64_t b0, int64_t b1) {
    at::Tensor xbuf = at::empty({mb, in_f}, opts);  // used only for casts / dropout
    at::Tensor hT = at::empty({r, mb}, opts);
    at::Tensor tbuf = out_direct ? at::Tensor() : at::empty({mb, out_f}, opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * mb, rows = std::min(mb, M - m0);
      const at::Tensor xb = input_block(x, m0, rows, xbuf, dr, nullptr);
      at::Tensor hTb = hT.narrow(1, 0, rows);
      at::mm_out(hTb, A, xb.t());  // h^T = A x^T: (r x in) @ (in x rows)
      at::Tensor hb = h.narrow(0, m0, rows);
      hb.copy_(hTb.t());
      at::Tensor ob = out.narrow(0, m0, rows);
      if (out_direct) {
        ob.addmm_(hb, Bt);  // out += h B^T, beta = 1: no output-sized temporary
      } else {
        at::Tensor tb = tbuf.narrow(0, 0, rows);
        at::mm_out(tb, hb, Bt);
        ob.add_(tb);  // one rounding to the low-precision output
      }
    }
  });
  return h;
}

namespace {

// The SIMD adapter backward (fp32, unit column strides) over rows [m0, m1): one pass over each
// x and g row computes h (unless given), u = g B, dB^T += h^T g, dA += u^T x (into partial c of
// accA / accBT, one per thread chunk) and grad_x (+)= u A (when gx is defined). Returns the
// number of chunks used.
int64_t simd_backward_rows(const at::Tensor& g, const at::Tensor& x, const at::Tensor& h, const at::Tensor& A,
                           const at::Tensor& BT, const Projection& pj, const at::Tensor& accA,
                           const at::Tensor& accBT, const at::Tensor& gx, bool gx_add, int64_t m0, int64_t m1) {
  RECORD_FUNCTION("unilora_cpu::adapter_backward_simd", std::vector<c10::IValue>());
  const int64_t nblocks = (m1 - m0 + kSimdRows - 1) / kSimdRows;
  return run_chunks(nblocks, [&](int64_t c, int64_t b0, int64_t b1) {
    simd::AdapterBackward a;
    a.x = x.data_ptr<float>();
    a.ldx = x.stride(0);
    a.g = g.data_ptr<float>();
    a.ldg = g.stride(0);
    if (h.defined()) {
      a.h = h.data_ptr<float>();
      a.ldh = h.stride(0);
    }
    a.A = A.data_ptr<float>();
    a.BT = BT.data_ptr<float>();
    a.r = pj.r;
    a.in_f = pj.in_f;
    a.out_f = pj.out_f;
    if (accA.defined()) {
      a.dA = accA[c].data_ptr<float>();
      a.dBT = accBT[c].data_ptr<float>();
    }
    if (gx.defined()) {
      a.gx = gx.data_ptr<float>();
      a.ldgx = gx.stride(0);
      a.gx_add = gx_add;
    }
    simd::adapter_backward(a, m0 + b0 * kSimdRows, std::min(m1, m0 + b1 * kSimdRows));
  });
}

// grad_theta = P^T [dA | dB] from the per-chunk partials (summed in chunk order).
at::Tensor theta_grad(const at::Tensor& accA, const at::Tensor& accBT, int64_t nchunks, const Projection& pj,
                      const at::Tensor& theta) {
  const at::Tensor dA = nchunks == 1 ? accA[0] : accA.narrow(0, 0, nchunks).sum(0);
  const at::Tensor dBT = nchunks == 1 ? accBT[0] : accBT.narrow(0, 0, nchunks).sum(0);
  return scatter_cpu(dA, dBT.t(), pj, theta.scalar_type(), true);
}

}  // namespace

namespace {
std::tuple<at::Tensor, at::Tensor> backward_gathered(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                     const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                     c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                     const at::Tensor& A, const at::Tensor& B);
}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                bool /*deterministic*/) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  const auto [A, B] = gather_cpu(theta, pj, cd);
  return backward_gathered(g, x, theta, pj, dr, h, std::move(grad_x), need_x, need_theta, A, B);
}

namespace {

// backward_cpu with A and B (compute dtype) already gathered.
std::tuple<at::Tensor, at::Tensor> backward_gathered(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                     const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                     c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                     const at::Tensor& A, const at::Tensor& B) {
  const at::ScalarType cd = A.scalar_type();
  const at::Tensor Bt = B.t();
  const int64_t M = x.size(0), r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  const auto opts = x.options().dtype(cd);
  // An empty h (the fused linear op does not keep one) is recomputed block by block from the
  // x block the dA product reads anyway.
  const bool recompute_h = need_theta && h.size(0) != M;
  const at::Tensor hc = recompute_h || h.scalar_type() == cd ? h : h.to(cd);
  const bool fresh_gx = need_x && !grad_x.has_value();
  at::Tensor gx;
  if (need_x) gx = fresh_gx ? at::empty({M, in_f}, x.options()) : *grad_x;
  const bool gx_direct = need_x && gx.scalar_type() == cd && !dr.active;
  const bool simd_path = cd == at::kFloat && x.scalar_type() == cd && g.scalar_type() == cd && !dr.active &&
                         x.stride(1) == 1 && g.stride(1) == 1 && (recompute_h || !need_theta || hc.stride(1) == 1) &&
                         (!need_x || gx.stride(1) == 1) && simd::available();
  const int64_t mb = simd_path ? kSimdRows : block_rows(std::max(in_f, out_f), at::elementSize(cd));
  const int64_t nblocks = (M + mb - 1) / mb;
  const int64_t nchunks_max = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  // Per-chunk partial dA (r x in) and dB^T (r x out): layer-sized, reduced in chunk order below.
  at::Tensor accA = need_theta ? at::zeros({nchunks_max, r, in_f}, opts) : at::Tensor();
  at::Tensor accBT = need_theta ? at::zeros({nchunks_max, r, out_f}, opts) : at::Tensor();
  int64_t nchunks;
  if (simd_path) {
    nchunks = simd_backward_rows(g, x, need_theta && !recompute_h ? hc : at::Tensor(), A, B.t().contiguous(), pj,
                                 accA, accBT, need_x ? gx : at::Tensor(), !fresh_gx, 0, M);
  } else {
    nchunks = run_chunks(nblocks, [&](int64_t c, int64_t b0, int64_t b1) {
      at::Tensor gbuf = at::empty({mb, out_f}, opts);
      at::Tensor xbuf = at::empty({mb, in_f}, opts);
      at::Tensor gBT = at::empty({r, mb}, opts);
      at::Tensor hT = recompute_h ? at::empty({r, mb}, opts) : at::Tensor();
      at::Tensor tbuf = need_x && !gx_direct ? at::empty({mb, in_f}, opts) : at::Tensor();
      at::Tensor mask = dr.active ? at::empty({mb, in_f}, x.options().dtype(at::kByte)) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * mb, rows = std::min(mb, M - m0);
        at::Tensor gb = g.narrow(0, m0, rows);
        if (g.scalar_type() != cd) {
          gbuf.narrow(0, 0, rows).copy_(gb);
          gb = gbuf.narrow(0, 0, rows);
        }
        at::Tensor gBTb = gBT.narrow(1, 0, rows);
        at::mm_out(gBTb, Bt, gb.t());  // (g B)^T = B^T g^T: (r x out) @ (out x rows)
        bool have_mask = false;
        if (need_theta) {
          const at::Tensor xb = input_block(x, m0, rows, xbuf, dr, dr.active ? mask.data_ptr<uint8_t>() : nullptr);
          have_mask = dr.active;
          at::Tensor hTb;
          if (recompute_h) {
            hTb = hT.narrow(1, 0, rows);
            at::mm_out(hTb, A, xb.t());  // h^T = A drop(x)^T
          } else {
            hTb = hc.narrow(0, m0, rows).t();
          }
          accBT[c].addmm_(hTb, gb);  // dB^T += h^T g
          accA[c].addmm_(gBTb, xb);                         // dA += (g B)^T drop(x)
        }
        if (need_x) {
          at::Tensor gxb = gx.narrow(0, m0, rows);
          if (gx_direct) {
            if (fresh_gx) {
              at::mm_out(gxb, gBTb.t(), A);
            } else {
              gxb.addmm_(gBTb.t(), A);  // grad_x += (g B) A in place
            }
            continue;
          }
          at::Tensor tb = tbuf.narrow(0, 0, rows);
          at::mm_out(tb, gBTb.t(), A);
          if (dr.active) {
            AT_DISPATCH_FLOATING_TYPES(cd, "unilora_mask", [&] {
              if (have_mask) {
                apply_mask(tb.data_ptr<scalar_t>(), rows * in_f, mask.data_ptr<uint8_t>(), dr.scale);
              } else {
                apply_dropout(tb.data_ptr<scalar_t>(), rows, in_f, m0, dr, nullptr);
              }
            });
          }
          if (fresh_gx) {
            gxb.copy_(tb);
          } else {
            gxb.add_(tb);
          }
        }
      }
    });
  }
  const at::Tensor grad_theta = need_theta ? theta_grad(accA, accBT, nchunks, pj, theta) : at::empty({0}, theta.options());
  at::Tensor gx_out = fresh_gx ? gx : at::empty({0}, x.options());
  return {gx_out, grad_theta};
}

// Fold the update into the base weight (W' = W + B A, one GEMM with K = r) instead of adding
// (x A^T) B^T to the output? Both give x W'^T up to fp32 rounding; folding moves 2*in*out
// elements (read W, write W') instead of M*(in + 2*out) (read x, read and write the output),
// so it wins once M >= max(in, out). fp32/fp64 only (a bf16 W' would round the update away)
// and never with dropout (the mask applies to the adapter's input only).
bool fold_into_weight(int64_t M, const at::Tensor& x, const at::Tensor& w, at::ScalarType cd, const Dropout& dr,
                      const Projection& pj) {
  return !dr.active && x.scalar_type() == cd && w.scalar_type() == cd && M >= std::max(pj.in_f, pj.out_f);
}

// A (P x Q) buffer for W + B A, contiguous, valid until this thread's next fold. Reused because
// a fresh layer-sized allocation comes from mmap and every page of it faults on first touch:
// measured in a training step, 0.89 ms per 1024 x 1024 fp32 fold with a fresh buffer, 0.35-0.49 ms
// with a reused one (0.16 ms with the data in cache).
// Weights over kMaxFoldScratch bytes get a fresh buffer (their GEMM dwarfs the faults); the
// buffer kept is at most that large, one per thread that folds.
constexpr int64_t kMaxFoldScratch = int64_t(64) << 20;

at::Tensor fold_scratch(const at::Tensor& w) {
  const int64_t n = w.numel();
  if (n * static_cast<int64_t>(w.element_size()) > kMaxFoldScratch) return at::empty(w.sizes(), w.options());
  thread_local at::Tensor buf;
  if (!buf.defined() || buf.scalar_type() != w.scalar_type() || buf.numel() < n) {
    buf = at::Tensor();  // release the old one first
    buf = at::empty({n}, w.options());
  }
  return buf.narrow(0, 0, n).view(w.sizes());
}

constexpr int64_t kFoldMaxR = 16;  // above this the fold's r multiply-adds per element favour a GEMM

// W + B A in the weight's layout ((out, in), or (in, out) for Conv1D), contiguous: a view of this
// thread's fold buffer (fold_scratch), valid until its next fold. One streaming pass
// (simd::fold_rows, ~0.16 ms at 1024 x 1024 with the data in cache) where addmm with K = r takes
// ~0.7 ms plus a copy of W (measured, MKL, 2 threads).
at::Tensor folded_weight(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B) {
  RECORD_FUNCTION("unilora_cpu::fold", std::vector<c10::IValue>());  // a named range in torch.profiler
  const int64_t r = A.size(0);
  if (r > kFoldMaxR || w.stride(1) != 1) return weight_t ? at::addmm(w, A.t(), B.t()) : at::addmm(w, B, A);
  at::Tensor out = fold_scratch(w);
  // row p of the result: w[p] + sum_k s[p, k] R[k]; Linear: s = B, R = A; Conv1D: s = A^T, R = B^T
  const at::Tensor R = weight_t ? B.t().contiguous() : A;
  const int64_t P = w.size(0), Q = w.size(1), s_rs = weight_t ? 1 : r, s_cs = weight_t ? A.size(1) : 1;
  const at::Tensor& S = weight_t ? A : B;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "unilora_fold", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* sp = S.data_ptr<scalar_t>();
    const scalar_t* rp = R.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, std::max<int64_t>(1, kGrain / Q), [&](int64_t p0, int64_t p1) {
      simd::fold_rows(wp, w.stride(0), sp, s_rs, s_cs, rp, r, Q, op, Q, p0, p1);
    });
  });
  return out;
}

// decode_linear takes fp32 nn.Linear layers (unit column stride: its SIMD GEMV reads rows) at
// M <= kSmallM rows without dropout, when the AVX2 kernels run here.
bool use_decode_linear(int64_t M, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t, const at::Tensor& theta, const Projection& pj, const Dropout& dr) {
  const auto f32 = at::kFloat;
  return M >= 1 && M <= kSmallM && !weight_t && !dr.active && pj.r <= kMaxDecodeR && x.scalar_type() == f32 &&
         x.stride(1) == 1 && w.scalar_type() == f32 && w.stride(1) == 1 && theta.scalar_type() == f32 &&
         (!bias.has_value() || (bias->scalar_type() == f32 && bias->is_contiguous())) && simd::available();
}

// Exactly what nn.Linear (F.linear -> addmm) or transformers' Conv1D computes on 2-D x.
at::Tensor base_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t) {
  const at::Tensor wt = weight_t ? w : w.t();  // (in, out)
  return bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> linear_cpu(const at::Tensor& x, const at::Tensor& w,
                                              const c10::optional<at::Tensor>& bias, bool weight_t,
                                              const at::Tensor& theta, const Projection& pj, const Dropout& dr) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const int64_t M = x.size(0);
  at::Tensor out;
  if (use_decode_linear(M, x, w, bias, weight_t, theta, pj, dr)) {
    out = at::empty({M, pj.out_f}, x.options());
    const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
    switch (M) {
      case 1: decode_linear<1>(x, w, bp, theta, pj, out); break;
      case 2: decode_linear<2>(x, w, bp, theta, pj, out); break;
      case 3: decode_linear<3>(x, w, bp, theta, pj, out); break;
      default: decode_linear<4>(x, w, bp, theta, pj, out); break;
    }
  } else if (fold_into_weight(M, x, w, cd, dr, pj)) {
    const auto [A, B] = gather_cpu(theta, pj, cd);
    out = base_linear(x, folded_weight(w, weight_t, A, B), bias, weight_t);
  } else {
    out = base_linear(x, w, bias, weight_t);
    if (M > 0) forward_cpu(out, x, theta, pj, dr);
  }
  // No h: the backward recomputes it from the x rows it reads for dA anyway.
  return {out, at::empty({0, pj.r}, x.options().dtype(cd))};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                       bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                       const Dropout& dr, const at::Tensor& h, bool need_x,
                                                       bool need_theta, bool /*deterministic: always*/) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  const int64_t M = x.size(0);
  const bool fold = need_x && g.scalar_type() == cd && fold_into_weight(M, x, w, cd, dr, pj);
  const bool adapter_x = need_x && !fold;
  const bool adapter = M > 0 && (adapter_x || need_theta);
  at::Tensor A, B;
  if (fold || adapter) std::tie(A, B) = gather_cpu(theta, pj, cd);  // once for the fold and the adapter
  at::Tensor gx = at::empty({0}, x.options());
  at::Tensor gt = at::empty({0}, theta.options());
  if (fold && need_theta) {
    // theta's gradient first, while the x rows the forward GEMM just read are likely still cached
    gt = std::get<1>(backward_gathered(g, x, theta, pj, dr, h, c10::nullopt, false, true, A, B));
  }
  if (need_x) {
    // grad_x = g W (g W^T for Conv1D), with W' = W + B A when folding
    const at::Tensor wx = fold ? folded_weight(w, weight_t, A, B) : w;
    gx = at::mm(g, weight_t ? wx.t() : wx);
  }
  if (adapter && !(fold && need_theta)) {
    gt = std::get<1>(backward_gathered(g, x, theta, pj, dr, h, adapter_x ? c10::optional<at::Tensor>(gx) : c10::nullopt,
                                       adapter_x, need_theta, A, B));
  } else if (need_theta && M == 0) {
    gt = at::zeros_like(theta);
  }
  return {gx, gt};
}

}  // namespace unilora
