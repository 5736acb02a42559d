// unilora_C::linear_autograd: the fused linear op with its autograd in C++, for eager training.
//
// Through the Python autograd.Function the training step of one layer runs ~15 Python frames
// (forward and backward); right after a large GEMM the interpreter's code and data are out of
// cache, and on CPU those frames cost about as much as the whole adapter backward (docs/PERF.md).
// Here forward and backward are one C++ call each. The math is unilora_C::linear / linear_backward (called through the dispatcher, so the
// CPU or CUDA kernels run); registered in ops.cpp, fake kernel in backends/extension.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "unilora.h"

namespace unilora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_linear(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const at::Tensor& scales,
                                               const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r,
                                               at::IntArrayRef hash_params, double p,
                                               const c10::optional<at::Tensor>& seed, int64_t fold_min_m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unilora_C::linear", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&, bool,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           at::IntArrayRef, double, const c10::optional<at::Tensor>&, int64_t)>();
  return op.call(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed, fold_min_m);
}

std::tuple<at::Tensor, at::Tensor> call_linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                        bool weight_t, const at::Tensor& theta,
                                                        const at::Tensor& scales, const at::Tensor& idx_a,
                                                        const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params,
                                                        double p, const c10::optional<at::Tensor>& seed,
                                                        const at::Tensor& h, bool need_x,
                                                        bool need_theta, bool deterministic, int64_t fold_min_m) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("unilora_C::linear_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, at::IntArrayRef, double,
                           const c10::optional<at::Tensor>&, const at::Tensor&, bool, bool, bool, int64_t)>();
  return op.call(g, x, w, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed, h, need_x, need_theta,
                 deterministic, fold_min_m);
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias, bool weight_t, const at::Tensor& theta,
                            const at::Tensor& scales, const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r,
                            std::vector<int64_t> hash_params, double p, const c10::optional<at::Tensor>& seed,
                            bool deterministic, int64_t fold_min_m) {
    auto [out, h] = call_linear(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed,
                                fold_min_m);
    ctx->save_for_backward({x, w, theta, scales, idx_a, idx_b, h});
    ctx->saved_data["weight_t"] = weight_t;
    ctx->saved_data["r"] = r;
    ctx->saved_data["hash_params"] = hash_params;
    ctx->saved_data["p"] = p;
    // The seed tensor itself, never its value (no host read): the backward draws the forward's mask
    // (a seed changed in place in between would change it; UniLoRALinear draws a new one per call).
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["deterministic"] = deterministic;
    ctx->saved_data["fold_min_m"] = fold_min_m;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w = saved[1], &theta = saved[2];
    const bool weight_t = ctx->saved_data["weight_t"].toBool();
    // needs_input_grad counts tensor inputs only, and the bias only when it is given.
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const bool need_theta = ctx->needs_input_grad(has_bias ? 3 : 2);
    at::Tensor g = grads[0];
    at::Tensor gx, gw, gb, gt;
    if (need_x || need_theta) {
      const auto hash_params = ctx->saved_data["hash_params"].toIntVector();
      std::tie(gx, gt) = call_linear_backward(
          g, x, w, weight_t, theta, saved[3], saved[4], saved[5], ctx->saved_data["r"].toInt(), hash_params,
          ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toOptional<at::Tensor>(), saved[6], need_x,
          need_theta, ctx->saved_data["deterministic"].toBool(), ctx->saved_data["fold_min_m"].toInt());
    }
    if (need_w) gw = weight_t ? at::mm(x.t(), g) : at::mm(g.t(), x);  // a trainable base weight
    if (need_b) gb = g.sum(0);
    return {need_x ? gx : at::Tensor(), gw, gb, at::Tensor(), need_theta ? gt : at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           bool weight_t, const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                           const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params, double p,
                           const c10::optional<at::Tensor>& seed, bool deterministic, int64_t fold_min_m) {
  return LinearFunction::apply(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params.vec(), p, seed,
                               deterministic, fold_min_m);
}

at::Tensor linear_no_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              bool weight_t, const at::Tensor& theta, const at::Tensor& scales,
                              const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params,
                              double p, const c10::optional<at::Tensor>& seed, bool /*deterministic*/,
                              int64_t fold_min_m) {
  return std::get<0>(call_linear(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params, p, seed,
                                 fold_min_m));
}

}  // namespace unilora
