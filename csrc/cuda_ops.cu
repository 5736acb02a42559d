// The `cuda` backend's forward and backward: the fused decode kernel where it applies
// (cuda_decode.cu), else one preparation launch (cuda::prepare: the gather of A and B in the GEMM
// dtype, the dropout of x, the cast of h, the zeroing of the theta gradient) and cuBLAS (at::mm /
// addmm_; fp16/bf16 products that are kept come out of cuBLAS in fp32 through mm's out_dtype),
// then the theta_d gradient scatter-add (cuda_projection.cu).
//
// Launches beside the cuBLAS GEMMs: forward 1 (decode: the fused kernel alone), else prepare, plus
// for fp16/bf16 the (M x r) cast of h that the second GEMM reads; backward prepare, the masked add
// of grad_x (dropout only), the scatter (atomic; the deterministic one adds a cat/sort). No
// memsets: prepare zeroes the gradient. fp64 mixes (gradcheck) add casts of x / g / h.
#include "cuda_common.cuh"

namespace unilora {
namespace {

// GEMM dtype of the cuBLAS path: the activations' own (fp16/bf16 products on tensor cores with
// fp32 accumulation), fp64 whenever any operand is fp64 (gradcheck-style runs).
at::ScalarType gemm_dtype(const at::Tensor& x, at::ScalarType cd) {
  return cd == at::kDouble ? at::kDouble : x.scalar_type();
}

// a b with the result in `acc` (the compute dtype): for fp16/bf16 operands cuBLAS writes its fp32
// accumulator out directly (mm.dtype), with no rounding to half precision and no cast kernel.
at::Tensor mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

// x as the GEMMs read it: itself, except when an fp64 operand makes the GEMMs fp64 (a cast) or
// the dropout of prepare needs unit column stride (a copy).
at::Tensor gemm_input(const at::Tensor& x, at::ScalarType gt, const Dropout& dr) {
  at::Tensor xg = x.scalar_type() == gt ? x : x.to(gt);
  return dr.active && xg.stride(1) != 1 ? xg.contiguous() : xg;
}

}  // namespace

at::Tensor forward_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                        const Dropout& dr) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h;
  if (cuda::decode_forward(out, x, theta, pj, dr, h)) return h;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const at::ScalarType gt = gemm_dtype(x, cd);
  const at::Tensor xg = gemm_input(x, gt, dr);
  const cuda::Prepared pr = cuda::prepare(theta, pj, gt, dr.active ? &xg : nullptr, dr, nullptr, nullptr);
  h = mm_acc(dr.active ? pr.xd : xg, pr.A.t(), cd);  // (M, r) in the compute dtype, for the backward
  if (out.scalar_type() == gt) {
    // beta = 1: cuBLAS adds into the output, no output-sized temporary (fp16/bf16: h rounded once)
    out.addmm_(h.scalar_type() == gt ? h : h.to(gt), pr.B.t());
  } else {  // an output of another dtype than x (the op allows it; layers never do it)
    out.addmm_(h.to(out.scalar_type()), pr.B.to(out.scalar_type()).t());
  }
  return h;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                 const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                 c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                 bool deterministic) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  const at::ScalarType gt = gemm_dtype(x, cd);
  const at::Tensor gg = g.scalar_type() == gt ? g : g.to(gt);  // g has x's dtype except in fp64 mixes
  // dA reads drop(x) and dB reads h, both in the GEMM dtype: prepare makes them in its launch
  // (the fp32 h of fp16/bf16 GEMMs; any other mismatch is an fp64 mix, cast here).
  at::Tensor xg, hc = h;
  bool cast_h = false;
  at::Tensor grad_theta = at::empty({need_theta ? pj.d : 0}, theta.options());
  if (need_theta) {
    xg = gemm_input(x, gt, dr);
    if (h.scalar_type() != gt) {
      cast_h = gt != at::kDouble && h.scalar_type() == at::kFloat;
      if (cast_h) {
        hc = h.contiguous();
      } else {
        hc = h.to(gt);
      }
    }
  }
  const bool drop_x = need_theta && dr.active;
  const cuda::Prepared pr = cuda::prepare(theta, pj, gt, drop_x ? &xg : nullptr, dr, cast_h ? &hc : nullptr,
                                          need_theta ? &grad_theta : nullptr);
  if (cast_h) hc = pr.hg;
  const at::Tensor gB = at::mm(gg, pr.B);  // (M, r)
  at::Tensor gx_new = at::empty({0}, x.options());
  if (need_x) {
    if (grad_x.has_value()) {
      at::Tensor gx = *grad_x;
      if (!dr.active && gx.scalar_type() == gt) {
        gx.addmm_(gB, pr.A);  // grad_x += (g B) A in place
      } else {
        cuda::masked_add_(gx, at::mm(gB, pr.A), dr, /*fresh=*/false);
      }
    } else if (!dr.active && x.scalar_type() == gt) {
      gx_new = at::mm(gB, pr.A);
    } else {
      gx_new = at::empty(x.sizes(), x.options());
      cuda::masked_add_(gx_new, at::mm(gB, pr.A), dr, /*fresh=*/true);
    }
  }
  if (need_theta) {
    const at::Tensor dA = mm_acc(gB.t(), drop_x ? pr.xd : xg, cd);  // (r, in)
    const at::Tensor dB = mm_acc(gg.t(), hc, cd);                   // (out, r)
    cuda::scatter_add_(grad_theta, dA, dB, pj, deterministic);
  }
  return {gx_new, grad_theta};
}

std::tuple<at::Tensor, at::Tensor> linear_cuda(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const Projection& pj, const Dropout& dr,
                                               int64_t fold_min_m) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const int64_t M = x.size(0);
  if (fold_call(M, fold_min_m, dr, x, gemm_dtype(x, cd))) {
    return fold_linear(x, w, bias, weight_t, theta, pj, kFoldCuda);  // the large-M schedule (fold_schedule.cpp)
  }
  at::Tensor out = base_linear(x, w, bias, weight_t);
  if (M == 0) return {out, at::empty({0, pj.r}, x.options().dtype(cd))};
  at::Tensor h = forward_cuda(out, x, theta, pj, dr);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& w, bool weight_t, const at::Tensor& theta,
                                                        const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                        bool need_x, bool need_theta, bool deterministic,
                                                        int64_t /*fold_min_m: h says what the forward did*/) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  if (M == 0 || !(need_x || need_theta)) {
    at::Tensor gx = need_x ? at::mm(g, weight_t ? w.t() : w) : at::empty({0}, x.options());
    return {gx, need_theta ? at::zeros_like(theta) : at::empty({0}, theta.options())};
  }
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  if (h.size(0) == 0) {  // the forward folded (fold_call); no dropout then
    TORCH_CHECK(!dr.active && x.scalar_type() == gemm_dtype(x, cd),
                "unilora: the CUDA backward needs h from the forward (an h of 0 rows is the fold schedule's: "
                "no dropout, GEMMs in x's dtype)");
    return fold_linear_backward(g, x, w, weight_t, theta, pj, need_x, need_theta, deterministic, kFoldCuda);
  }
  TORCH_CHECK(h.size(0) == M, "unilora: the CUDA backward needs h from the forward");
  at::Tensor gx = need_x ? at::mm(g, weight_t ? w.t() : w) : at::empty({0}, x.options());
  // backward_cuda adds the update's grad_x into gx in place; its grad_theta is empty unless asked for
  at::Tensor gt = std::get<1>(backward_cuda(g, x, theta, pj, dr, h,
                                            need_x ? c10::optional<at::Tensor>(gx) : c10::nullopt, need_x,
                                            need_theta, deterministic));
  return {gx, gt};
}

}  // namespace unilora
