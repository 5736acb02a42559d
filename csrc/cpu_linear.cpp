// The fused base linear + update on CPU (linear_cpu, linear_backward_cpu): the decode step,
// the fold W + B A at large M, or the base GEMM followed by the update.
#include "cpu_common.h"

namespace unilora {

std::tuple<at::Tensor, at::Tensor> linear_cpu(const at::Tensor& x, const at::Tensor& w,
                                              const c10::optional<at::Tensor>& bias, bool weight_t,
                                              const at::Tensor& theta, const Projection& pj, const Dropout& dr,
                                              int64_t fold_min_m) {
  using namespace cpu;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const int64_t M = x.size(0);
  at::Tensor out, h;
  // h = drop(x) A^T is kept for the backward at decode sizes only (M x r, no extra pass there);
  // above them the backward recomputes it from the x rows it reads for dA anyway (h has 0 rows).
  if (use_decode_linear(M, x, w, bias, weight_t, theta, pj, dr)) {
    h = at::empty({M, pj.r}, x.options().dtype(cd));
    out = decode_linear(x, w, bias, theta, pj, h);
  } else if (fold_into_weight(M, x, w, cd, dr, fold_min_m)) {
    const auto [A, B] = gather_cpu(theta, pj, cd);
    out = base_linear(x, folded_weight(w, weight_t, A, B), bias, weight_t);
  } else {
    out = base_linear(x, w, bias, weight_t);
    if (M > 0) {
      at::Tensor hx = forward_cpu(out, x, theta, pj, dr);
      if (M <= kSmallM) h = hx;
    }
  }
  if (!h.defined()) h = at::empty({0, pj.r}, x.options().dtype(cd));
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                       bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                       const Dropout& dr, const at::Tensor& h, bool need_x,
                                                       bool need_theta, bool /*deterministic: always*/,
                                                       int64_t fold_min_m) {
  using namespace cpu;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  const int64_t M = x.size(0);
  if (use_decode_backward(M, g, x, w, theta, pj, dr)) return decode_backward(g, x, w, weight_t, theta, pj, h, need_x, need_theta);
  const bool fold = need_x && g.scalar_type() == cd && fold_into_weight(M, x, w, cd, dr, fold_min_m);
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
