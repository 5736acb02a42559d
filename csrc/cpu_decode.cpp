// Decode-sized calls on CPU (M <= kSmallM rows, no dropout): the update straight from the
// projection indices (forward_small), and the fp32 nn.Linear decode step fused with its base
// GEMV (decode_linear). At these sizes the fixed costs of gathered buffers and BLAS calls
// exceed the work.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <atomic>
#include <vector>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {
namespace cpu {
namespace {

constexpr int64_t kSmallGrain = 16384;  // layer elements per thread below which waking one costs more
constexpr int64_t kLanes = 4;          // independent partial sums per row in partial_h

// (theta_d index, scale) of element i of the flattened [A | B]; an out-of-range uniform index
// sets `bad` (reported by the caller) and reads element 0 instead of memory outside theta.
// Holds copies, not a reference to the Projection, so the hot loops keep them in registers.
struct Lookup {
  const float* sc;
  const int32_t* ia;
  const int32_t* ib;
  int64_t na, d, offset;
  bool is_hashed;
  HashedProjection hash;
  explicit Lookup(const Projection& p)
      : sc(p.scales.data_ptr<float>()),
        ia(p.is_hashed ? nullptr : p.idx_a.data_ptr<int32_t>()),
        ib(p.is_hashed ? nullptr : p.idx_b.data_ptr<int32_t>()),
        na(p.numel_a()),
        d(p.d),
        offset(p.offset),
        is_hashed(p.is_hashed),
        hash(p.hash) {}
  int64_t operator()(int64_t i, float* s, bool* bad) const {
    if (is_hashed) {
      const int64_t j = hashed_index(offset + i, hash);
      *s = hashed_scale(j, hash, sc[0], sc[1]);
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

// h_part[m * r + k] = sum over columns [lo, hi) of x[m, c] * A[k, c], A read from theta through
// the projection, for the MM rows of x (MM a compile-time row count: the accumulators live in
// registers); kLanes independent partial sums per row (an FP add chain through one accumulator
// would cost its latency per element).
template <int64_t MM, typename x_t, typename theta_t, typename acc_t>
void partial_h(const x_t* xp, int64_t ldx, const theta_t* th, const Lookup& lookup, int64_t r, int64_t in_f,
               int64_t lo, int64_t hi, acc_t* h_part, bool* bad) {
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
    for (int64_t m = 0; m < MM; ++m) h_part[m * r + k] = (acc[0][m] + acc[1][m]) + (acc[2][m] + acc[3][m]);
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

// out += x A^T B^T for MM <= kSmallM rows straight from the indices.
// h = x A^T splits the columns of A into one chunk per thread, whose partial sums are added in
// chunk order; the update then splits the output features between threads.
template <int64_t MM, typename x_t, typename out_t, typename theta_t, typename acc_t>
void forward_small_rows(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
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
  check_index_range(any_bad, pj.d);
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
  check_index_range(any_bad, pj.d);
}

// The whole decode step of an fp32 nn.Linear, out = x W^T + bias + (x A^T) B^T, in one parallel
// region: each thread takes a column chunk of A (partial h) and a row chunk of W, whose base
// GEMV (SIMD) it computes while it gathers the matching rows of B; the rank-r update is then
// added serially (out_f * r * MM multiply-adds). One thread wake-up instead of two, the base
// output is never re-read by another thread, and the B gather overlaps the weight stream.
template <int64_t MM>
void decode_linear_rows(const at::Tensor& x, const at::Tensor& w, const float* bias, const at::Tensor& theta,
                        const Projection& pj, at::Tensor& out, float* h_out) {
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
  check_index_range(any_bad, pj.d);
  float* h = h_out;  // M x r, kept for the backward (decode_backward)
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
void forward_small_dispatch(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
                            acc_t* h) {
  static_assert(kSmallM == 4, "forward_small_dispatch takes 1..4 rows");
  switch (x.size(0)) {
    case 1: return forward_small_rows<1, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    case 2: return forward_small_rows<2, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    case 3: return forward_small_rows<3, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
    default: return forward_small_rows<4, x_t, out_t, theta_t, acc_t>(x, out, theta, pj, h);
  }
}

}  // namespace

void forward_small(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
                   const at::Tensor& h) {
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unilora_small_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "unilora_small_out", [&] {
      using out_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_small_theta", [&] {
        using theta_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "unilora_small", [&] {
          forward_small_dispatch<x_t, out_t, theta_t, scalar_t>(xs, out, theta, pj, h.data_ptr<scalar_t>());
        });
      });
    });
  });
}

// fp32 nn.Linear layers (unit column stride: the SIMD GEMV reads rows) at M <= kSmallM rows
// without dropout, when the AVX2 kernels run here.
bool use_decode_linear(int64_t M, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t, const at::Tensor& theta, const Projection& pj, const Dropout& dr) {
  const auto f32 = at::kFloat;
  return M >= 1 && M <= kSmallM && !weight_t && !dr.active && pj.r <= kDecodeMaxR && x.scalar_type() == f32 &&
         x.stride(1) == 1 && w.scalar_type() == f32 && w.stride(1) == 1 && theta.scalar_type() == f32 &&
         (!bias.has_value() || (bias->scalar_type() == f32 && bias->is_contiguous())) && simd::available();
}

at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& theta, const Projection& pj, at::Tensor& h) {
  static_assert(kSmallM == 4, "decode_linear takes 1..4 rows");
  at::Tensor out = at::empty({x.size(0), pj.out_f}, x.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* hp = h.data_ptr<float>();
  switch (x.size(0)) {
    case 1: decode_linear_rows<1>(x, w, bp, theta, pj, out, hp); break;
    case 2: decode_linear_rows<2>(x, w, bp, theta, pj, out, hp); break;
    case 3: decode_linear_rows<3>(x, w, bp, theta, pj, out, hp); break;
    default: decode_linear_rows<4>(x, w, bp, theta, pj, out, hp); break;
  }
  return out;
}

// The fused linear's backward at M <= kSmallM rows (fp32, no dropout, r <= kDecodeMaxR): with the
// forward's h, a pass over B for gB = g B and dB, one over A for grad_x += gB A and dA, each
// element's theta index looked up once per pass and its gradient added serially (deterministic).
// Below a handful of rows the gathered-buffer + BLAS path costs more in fixed work than the math.
bool use_decode_backward(int64_t M, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& theta, const Projection& pj, const Dropout& dr) {
  const auto f32 = at::kFloat;
  return M >= 1 && M <= kSmallM && !dr.active && g.scalar_type() == f32 && x.scalar_type() == f32 &&
         w.scalar_type() == f32 && theta.scalar_type() == f32 && pj.r <= kDecodeMaxR;
}

namespace {

// One table lookup per element, uniform projection: element e of idx (idx_a or idx_b).
struct UniformGet {
  const int32_t* idx;
  const float* sc;
  int64_t d;
  int64_t operator()(int64_t e, float* s, bool* bad) const {
    int64_t j = idx[e];
    const bool out = static_cast<uint64_t>(j) >= static_cast<uint64_t>(d);
    *bad |= out;
    j = out ? 0 : j;
    *s = sc[j];
    return j;
  }
};

// Hashed projection: element e of A (base 0) or B (base numel_a) through the hash.
struct HashedGet {
  const Lookup* lookup;
  int64_t base;
  int64_t operator()(int64_t e, float* s, bool* bad) const { return (*lookup)(base + e, s, bad); }
};

// decode_backward for MM rows: h = x A^T given (the forward's) or recomputed in a pass over A;
// then one pass over B for gB = g B and dB = g^T h, one over A for grad_x += gB A and dA = gB^T x.
template <int64_t MM, typename Get>
void decode_backward_rows(const float* gp, int64_t ldg, int64_t gs, const float* xp, int64_t ldx, int64_t xs,
                          const float* th, const Get& get_a, const Get& get_b, const float* h_in, int64_t r,
                          int64_t in_f, int64_t out_f, float* gxp, float* gtp, bool* bad) {
  double gb[MM * kDecodeMaxR] = {}, h[MM * kDecodeMaxR] = {};  // use_decode_backward: r <= kDecodeMaxR
  if (h_in != nullptr) {
    for (int64_t e = 0; e < MM * r; ++e) h[e] = h_in[e];
  } else if (gtp != nullptr) {
    for (int64_t i = 0; i < r; ++i) {
      for (int64_t k = 0; k < in_f; ++k) {
        float s;
        const int64_t j = get_a(i * in_f + k, &s, bad);
        const double a = double(th[j]) * double(s);
        for (int64_t m = 0; m < MM; ++m) h[m * r + i] += double(xp[m * ldx + k * xs]) * a;
      }
    }
  }
  for (int64_t n = 0; n < out_f; ++n) {
    double gn[MM];
    for (int64_t m = 0; m < MM; ++m) gn[m] = gp[m * ldg + n * gs];
    for (int64_t i = 0; i < r; ++i) {
      float s;
      const int64_t j = get_b(n * r + i, &s, bad);
      const double b = double(th[j]) * double(s);
      double db = 0.0;
      for (int64_t m = 0; m < MM; ++m) {
        gb[m * r + i] += gn[m] * b;
        db += gn[m] * h[m * r + i];
      }
      if (gtp != nullptr) gtp[j] += float(db * double(s));
    }
  }
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t k = 0; k < in_f; ++k) {
      float s;
      const int64_t j = get_a(i * in_f + k, &s, bad);
      const double a = double(th[j]) * double(s);
      double da = 0.0;
      for (int64_t m = 0; m < MM; ++m) {
        if (gxp != nullptr) gxp[m * in_f + k] += float(gb[m * r + i] * a);
        da += gb[m * r + i] * double(xp[m * ldx + k * xs]);
      }
      if (gtp != nullptr) gtp[j] += float(da * double(s));
    }
  }
}

template <typename Get>
void decode_backward_dispatch(int64_t M, const float* gp, int64_t ldg, int64_t gs, const float* xp, int64_t ldx,
                              int64_t xs, const float* th, const Get& get_a, const Get& get_b, const float* h_in,
                              const Projection& pj, float* gxp, float* gtp, bool* bad) {
  static_assert(kSmallM == 4, "decode_backward takes 1..4 rows");
  const int64_t r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  switch (M) {
    case 1: return decode_backward_rows<1>(gp, ldg, gs, xp, ldx, xs, th, get_a, get_b, h_in, r, in_f, out_f, gxp, gtp, bad);
    case 2: return decode_backward_rows<2>(gp, ldg, gs, xp, ldx, xs, th, get_a, get_b, h_in, r, in_f, out_f, gxp, gtp, bad);
    case 3: return decode_backward_rows<3>(gp, ldg, gs, xp, ldx, xs, th, get_a, get_b, h_in, r, in_f, out_f, gxp, gtp, bad);
    default: return decode_backward_rows<4>(gp, ldg, gs, xp, ldx, xs, th, get_a, get_b, h_in, r, in_f, out_f, gxp, gtp, bad);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> decode_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                   const at::Tensor& h, bool need_x, bool need_theta) {
  const int64_t M = x.size(0);
  // Any strides: sum().backward() hands in an expanded g (strides 0, 0).
  at::Tensor gx = need_x ? at::mm(g, weight_t ? w.t() : w) : at::empty({0}, x.options());
  at::Tensor gt = at::empty({need_theta ? pj.d : 0}, theta.options());
  if (!need_x && !need_theta) return {gx, gt};
  float* gtp = need_theta ? gt.data_ptr<float>() : nullptr;
  if (gtp != nullptr) std::fill_n(gtp, pj.d, 0.f);
  // The forward's h when it kept one (linear_cpu at M <= kSmallM), as fp32 rows.
  const at::Tensor hc = h.size(0) == M && h.scalar_type() == at::kFloat ? h.contiguous() : at::Tensor();
  const float* h_in = hc.defined() ? hc.const_data_ptr<float>() : nullptr;
  const float* gp = g.const_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  const float* th = theta.const_data_ptr<float>();
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  bool bad = false;
  if (pj.is_hashed) {
    const Lookup lookup(pj);
    const HashedGet ga{&lookup, 0}, gb{&lookup, pj.numel_a()};
    decode_backward_dispatch(M, gp, g.stride(0), g.stride(1), xp, x.stride(0), x.stride(1), th, ga, gb, h_in, pj,
                             gxp, gtp, &bad);
  } else {
    const float* sc = pj.scales.const_data_ptr<float>();
    const UniformGet ga{pj.idx_a.const_data_ptr<int32_t>(), sc, pj.d}, gb{pj.idx_b.const_data_ptr<int32_t>(), sc, pj.d};
    decode_backward_dispatch(M, gp, g.stride(0), g.stride(1), xp, x.stride(0), x.stride(1), th, ga, gb, h_in, pj,
                             gxp, gtp, &bad);
  }
  check_index_range(bad, pj.d);
  return {gx, gt};
}

}  // namespace cpu
}  // namespace unilora
