// The large-M schedule's orchestration, one for every device: which GEMMs run on what, in which
// dtype, around the device's own kernels (FoldDevice: gather, fold, scatter). CUDA's linear ops
// run it (cuda_ops.cu); the test ops unilora_C::_fold_linear(_backward) run it on CPU too, so the
// code CUDA runs is checked against the float64 oracle on any machine.
#include "unilora.h"

namespace unilora {

bool fold_call(int64_t M, int64_t fold_min_m, const Dropout& dr, const at::Tensor& x, at::ScalarType gemm_dtype) {
  return fold_min_m >= 0 && !dr.active && M > kDecodeMaxM && M >= fold_min_m && x.scalar_type() == gemm_dtype;
}

at::Tensor base_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t) {
  const at::Tensor wt = weight_t ? w : w.t();  // (in, out)
  return bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
}

std::tuple<at::Tensor, at::Tensor> fold_linear(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const Projection& pj, const FoldDevice& dev) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const auto [A, B] = dev.prepare(theta, pj, x.scalar_type(), nullptr);
  // one GEMM on W + B A; h has no rows: the backward folds too and recomputes h
  return {base_linear(x, dev.fold(w, weight_t, A, B), bias, weight_t), at::empty({0, pj.r}, x.options().dtype(cd))};
}

std::tuple<at::Tensor, at::Tensor> fold_linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                        bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                        bool need_x, bool need_theta, bool deterministic,
                                                        const FoldDevice& dev) {
  const at::ScalarType gt = x.scalar_type();
  const at::ScalarType cd = compute_dtype({gt, theta.scalar_type(), g.scalar_type()});
  const at::Tensor gg = g.scalar_type() == gt ? g : g.to(gt);
  at::Tensor grad_theta = at::empty({need_theta ? pj.d : 0}, theta.options());
  // A, B in x's dtype; the gradient zeroed in the same launch (CUDA: cuda::prepare)
  const auto [A, B] = dev.prepare(theta, pj, gt, need_theta ? &grad_theta : nullptr);
  at::Tensor gx = at::empty({0}, x.options());
  if (need_x) {
    const at::Tensor wf = dev.fold(w, weight_t, A, B);  // folded again: one weight of workspace at a time
    gx = at::mm(gg, weight_t ? wf.t() : wf);
  }
  if (need_theta && x.size(0) > 0) {
    const at::Tensor h = at::mm(x, A.t());  // (M, r) in x's dtype, as the split path's cast of h
    const at::Tensor gB = at::mm(gg, B);    // (M, r)
    dev.scatter_add(grad_theta, dev.mm_acc(gB.t(), x, cd), dev.mm_acc(gg.t(), h, cd), pj, deterministic);
  }
  return {gx, grad_theta};
}

}  // namespace unilora
