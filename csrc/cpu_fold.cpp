// Folding the update into the base weight on CPU: W' = W + B A, for the fused linear at large M.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {
namespace cpu {
namespace {

// Weights over this many bytes get a fresh buffer (their GEMM dwarfs the page faults); the
// buffer kept is at most that large, one per thread that folds.
constexpr int64_t kMaxFoldScratch = int64_t(64) << 20;
constexpr int64_t kFoldMaxR = 16;  // above this the fold's r multiply-adds per element favour a GEMM

// A (P x Q) buffer for W + B A, contiguous, valid until this thread's next fold. Reused because
// a fresh layer-sized allocation comes from mmap and every page of it faults on first touch.
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

}  // namespace

// Both give x W'^T up to fp32 rounding; folding moves 2*in*out elements (read W, write W')
// instead of M*(in + 2*out) (read x, read and write the output). The row threshold is the
// caller's (policy.fold_min_m: M >= max(in, out) on CPU); fp32/fp64 only (these loops) and never
// with dropout (the mask applies to the adapter's input only).
bool fold_into_weight(int64_t M, const at::Tensor& x, const at::Tensor& w, at::ScalarType cd, const Dropout& dr,
                      int64_t fold_min_m) {
  return fold_min_m >= 0 && !dr.active && x.scalar_type() == cd && w.scalar_type() == cd && M > kSmallM &&
         M >= fold_min_m;  // decode sizes keep h (linear_cpu)
}

// One streaming pass (simd::fold_rows) where addmm with K = r is several times slower and
// needs a copy of W; the GEMM for r > kFoldMaxR or a strided weight.
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

}  // namespace cpu
}  // namespace unilora

namespace unilora {
namespace {

// The CPU side of the shared large-M schedule (fold_schedule.cpp), for the test ops that check on
// CPU the code CUDA runs: the same steps, with CPU kernels.
std::tuple<at::Tensor, at::Tensor> cpu_prepare(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype,
                                               at::Tensor* grad) {
  const auto [A, B] = gather_cpu(theta, pj, compute_dtype({dtype, theta.scalar_type()}));
  if (grad != nullptr) grad->zero_();
  return {A.to(dtype).contiguous(), B.to(dtype).contiguous()};
}

at::Tensor cpu_fold(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B) {
  if (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) {
    return cpu::folded_weight(w, weight_t, A, B).clone();  // the thread's fold buffer is reused by the next fold
  }
  // fp16/bf16: products and sum in fp32, rounded once, as the CUDA kernel does
  const at::Tensor a = A.to(at::kFloat), b = B.to(at::kFloat);
  const at::Tensor delta = weight_t ? at::mm(a.t(), b.t()) : at::mm(b, a);
  return (w.to(at::kFloat) + delta).to(w.scalar_type()).contiguous();
}

void cpu_scatter_add(at::Tensor& grad, const at::Tensor& dA, const at::Tensor& dB, const Projection& pj,
                     bool deterministic) {
  grad.add_(scatter_cpu(dA.contiguous(), dB.contiguous(), pj, grad.scalar_type(), deterministic));
}

at::Tensor cpu_mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a.to(acc), b.to(acc));
}

}  // namespace

const FoldDevice kFoldCpu{cpu_prepare, cpu_fold, cpu_scatter_add, cpu_mm_acc};

}  // namespace unilora
