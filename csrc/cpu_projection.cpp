// Gather and scatter through the projection on CPU: A and B from theta_d (gather_cpu), and
// grad_theta = P^T [dA | dB] (scatter_cpu).
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <atomic>

#include "cpu_common.h"

namespace unilora {
namespace cpu {
namespace {

// dst[i] = theta[j(i)] * scale(j(i)) over the layer's flattened [A | B].
template <typename theta_t, typename acc_t>
void gather_into(const theta_t* theta, const Projection& pj, acc_t* dst_a, acc_t* dst_b) {
  const float* sc = pj.scales.data_ptr<float>();
  const int64_t n = pj.numel(), na = pj.numel_a(), d = pj.d;
  if (pj.is_hashed) {
    const float s0 = sc[0], s1 = sc[1];
    at::parallel_for(0, n, kGrain / 8, [&](int64_t b, int64_t e) {  // ~40 integer ops per element
      for (int64_t i = b; i < e; ++i) {
        const int64_t j = hashed_index(pj.offset + i, pj.hash);
        (i < na ? dst_a[i] : dst_b[i - na]) = acc_t(theta[j]) * acc_t(hashed_scale(j, pj.hash, s0, s1));
      }
    });
    return;
  }
  const int32_t* ia = pj.idx_a.data_ptr<int32_t>();
  const int32_t* ib = pj.idx_b.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  // theta and the scales are read at random and are usually out of cache by the time a layer
  // runs (the GEMMs stream far more than L3 between two steps): prefetch kAhead elements ahead
  // so the misses overlap.
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
  check_index_range(bad, d);
}

// grad[j(i)] += scale(j(i)) * [dA | dB][i], one pass, serial adds (deterministic).
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
  at::Tensor jbuf = pj.is_hashed ? at::empty({n}, dA.options().dtype(at::kInt)) : at::Tensor();
  acc_t* v = vals.data_ptr<acc_t>();
  int32_t* jh = pj.is_hashed ? jbuf.data_ptr<int32_t>() : nullptr;
  const int32_t* ia = pj.is_hashed ? nullptr : pj.idx_a.data_ptr<int32_t>();
  const int32_t* ib = pj.is_hashed ? nullptr : pj.idx_b.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, pj.is_hashed ? kGrain / 8 : kGrain, [&](int64_t b, int64_t e) {
    bool oob = false;
    for (int64_t i = b; i < e; ++i) {
      const acc_t g = i < na ? a[(i / in_f) * sa[0] + (i % in_f) * sa[1]]
                             : bp[((i - na) / r) * sb[0] + ((i - na) % r) * sb[1]];
      float s;
      if (jh) {
        const int64_t j = hashed_index(pj.offset + i, pj.hash);
        jh[i] = static_cast<int32_t>(j);
        s = hashed_scale(j, pj.hash, sc[0], sc[1]);
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
  check_index_range(bad, d);
  // Phase 2 (serial): indices collide, so the adds run in element order.
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = jh ? jh[i] : (i < na ? ia[i] : ib[i - na]);
    grad[j] += static_cast<grad_t>(v[i]);
  }
}

}  // namespace
}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> gather_cpu(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype) {
  RECORD_FUNCTION("unilora_cpu::gather", std::vector<c10::IValue>());  // a named range in torch.profiler
  const auto opts = theta.options().dtype(dtype);
  at::Tensor A = at::empty({pj.r, pj.in_f}, opts), B = at::empty({pj.out_f, pj.r}, opts);
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_gather_theta", [&] {
    using theta_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dtype, "unilora_gather", [&] {
      cpu::gather_into<theta_t, scalar_t>(theta.data_ptr<theta_t>(), pj, A.data_ptr<scalar_t>(),
                                          B.data_ptr<scalar_t>());
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
      cpu::scatter_into<acc_t, scalar_t>(dA, dB, pj, grad.data_ptr<scalar_t>());
    });
  });
  return grad;
}

}  // namespace unilora
