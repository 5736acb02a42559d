// The `cuda` backend's forward and backward: the fused decode kernel where it applies
// (cuda_decode.cu), else the gather kernel and cuBLAS (through at::mm / addmm_), then the
// theta_d gradient scatter-add (cuda_projection.cu).
#include "cuda_common.cuh"

namespace unilora {
namespace {

// GEMM dtype of the cuBLAS path: the activations' own (fp16/bf16 products on tensor cores with
// fp32 accumulation), fp64 whenever any operand is fp64 (gradcheck-style runs).
at::ScalarType gemm_dtype(const at::Tensor& x, at::ScalarType cd) {
  return cd == at::kDouble ? at::kDouble : x.scalar_type();
}

// x in the GEMM dtype with dropout applied (the dropout kernel wants unit column stride).
at::Tensor dropped_input(const at::Tensor& x, at::ScalarType gt, const Dropout& dr) {
  at::Tensor xg = x.scalar_type() == gt ? x : x.to(gt);
  if (!dr.active) return xg;
  return cuda::dropout(xg.stride(1) == 1 ? xg : xg.contiguous(), dr);
}

}  // namespace

at::Tensor forward_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                        const Dropout& dr) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor h;
  if (cuda::decode_forward(out, x, theta, pj, dr, h)) return h;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const at::ScalarType gt = gemm_dtype(x, cd);
  const auto [A, B] = cuda::gather(theta, pj, gt);
  const at::Tensor hg = at::mm(dropped_input(x, gt, dr), A.t());  // (M, r)
  h = hg.scalar_type() == cd ? hg : hg.to(cd);
  if (out.scalar_type() == gt) {
    out.addmm_(hg, B.t());  // beta = 1: cuBLAS adds into the output, no output-sized temporary
  } else {
    out.addmm_(h.to(out.scalar_type()), B.to(out.scalar_type()).t());
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
  const auto [A, B] = cuda::gather(theta, pj, gt);
  const at::Tensor gg = g.scalar_type() == gt ? g : g.to(gt);
  const at::Tensor gB = at::mm(gg, B);  // (M, r)
  at::Tensor gx_new = at::empty({0}, x.options());
  if (need_x) {
    if (grad_x.has_value()) {
      at::Tensor gx = *grad_x;
      if (!dr.active && gx.scalar_type() == gt) {
        gx.addmm_(gB, A);  // grad_x += (g B) A in place
      } else {
        cuda::masked_add_(gx, at::mm(gB, A), dr, /*fresh=*/false);
      }
    } else if (!dr.active && x.scalar_type() == gt) {
      gx_new = at::mm(gB, A);
    } else {
      gx_new = at::empty(x.sizes(), x.options());
      cuda::masked_add_(gx_new, at::mm(gB, A), dr, /*fresh=*/true);
    }
  }
  at::Tensor grad_theta = at::empty({0}, theta.options());
  if (need_theta) {
    const at::Tensor dA = at::mm(gB.t(), dropped_input(x, gt, dr)).to(cd);  // (r, in)
    const at::Tensor dB = at::mm(gg.t(), h.to(gt)).to(cd);                  // (out, r)
    grad_theta = scatter_cuda(dA, dB, pj, theta.scalar_type(), deterministic);
  }
  return {gx_new, grad_theta};
}

std::tuple<at::Tensor, at::Tensor> linear_cuda(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const Projection& pj, const Dropout& dr) {
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor wt = weight_t ? w : w.t();  // (in, out): exactly nn.Linear's / Conv1D's addmm
  at::Tensor out = bias.has_value() ? at::addmm(*bias, x, wt) : at::mm(x, wt);
  if (x.size(0) == 0) return {out, at::empty({0, pj.r}, x.options().dtype(at::kFloat))};
  at::Tensor h = forward_cuda(out, x, theta, pj, dr);
  return {out, h};
}

std::tuple<at::Tensor, at::Tensor> linear_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& w, bool weight_t, const at::Tensor& theta,
                                                        const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                        bool need_x, bool need_theta, bool deterministic) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(h.size(0) == x.size(0), "unilora: the CUDA backward needs h from the forward");
  at::Tensor gx = need_x ? at::mm(g, weight_t ? w.t() : w) : at::empty({0}, x.options());
  at::Tensor gt = need_theta ? at::zeros_like(theta) : at::empty({0}, theta.options());
  if (x.size(0) > 0 && (need_x || need_theta)) {
    gt = std::get<1>(backward_cuda(g, x, theta, pj, dr, h, need_x ? c10::optional<at::Tensor>(gx) : c10::nullopt,
                                   need_x, need_theta, deterministic));
    if (!need_theta) gt = at::empty({0}, theta.options());
  }
  return {gx, gt};
}

}  // namespace unilora
