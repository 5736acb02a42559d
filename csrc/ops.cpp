// The registration file: schemas of the unilora_C ops, their argument checks, and the CPU and
// CUDA implementations. Fake (meta) kernels and autograd are registered from Python
// (unilora_kernels/backends/extension.py), as torch.library recommends for C++ ops.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "unilora.h"

namespace unilora {

namespace {
constexpr int64_t kInt32Limit = int64_t(1) << 31;

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}
}  // namespace

at::ScalarType compute_dtype(std::initializer_list<at::ScalarType> dtypes) {
  for (auto t : dtypes) {
    if (t == at::kDouble) return at::kDouble;
  }
  return at::kFloat;
}

void check_theta(const at::Tensor& theta) {
  TORCH_CHECK(theta.dim() == 1 && (theta.scalar_type() == at::kFloat || theta.scalar_type() == at::kDouble),
              "unilora: theta_d must be a 1-D float32 (or float64) tensor, got ", theta.scalar_type(), " of shape ",
              theta.sizes());
  // A non-contiguous theta_d would need a d-length copy: the memory rules forbid it.
  TORCH_CHECK(theta.is_contiguous(), "unilora: theta_d must be contiguous");
  TORCH_CHECK(theta.size(0) > 0, "unilora: theta_d is empty");
}

Projection make_projection(int64_t d, const at::Tensor& scales, const at::Tensor& idx_a, const at::Tensor& idx_b,
                           int64_t r, int64_t in_f, int64_t out_f, at::IntArrayRef hash_params) {
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kFloat && scales.is_contiguous(),
              "unilora: scales must be a contiguous 1-D float32 tensor, got ", scales.scalar_type(), " ",
              scales.sizes());
  TORCH_CHECK(r > 0 && in_f > 0 && out_f > 0, "unilora: r, in_features and out_features must be positive, got r=",
              r, ", in=", in_f, ", out=", out_f);
  TORCH_CHECK(d > 0 && d < kInt32Limit, "unilora: theta_d length d = ", d, " must be in [1, 2^31)");
  Projection pj;
  pj.scales = scales;
  pj.r = r;
  pj.in_f = in_f;
  pj.out_f = out_f;
  pj.d = d;
  TORCH_CHECK(r * (in_f + out_f) < kInt32Limit, "unilora: the layer has r*(in+out) = ", r * (in_f + out_f),
              " LoRA parameters; at most 2^31 - 1 are supported");
  if (!hash_params.empty()) {
    TORCH_CHECK(hash_params.size() == 3, "unilora: hash_params must be [D, offset, key], got ", hash_params.size(), " values");
    const int64_t D = hash_params[0], offset = hash_params[1];
    TORCH_CHECK(D > 0 && D < kInt32Limit, "unilora: hashed projection D = ", D, " must be in [1, 2^31)");
    TORCH_CHECK(offset >= 0 && offset + pj.numel() <= D, "unilora: hashed projection slice [", offset, ", ",
                offset + pj.numel(), ") does not fit D = ", D);
    TORCH_CHECK(scales.numel() == 2, "unilora: the hashed projection takes 2 scales, got ", scales.numel());
    pj.is_hashed = true;
    pj.offset = offset;
    pj.hash = make_hashed_projection(D, d, hash_params[2]);
    return pj;
  }
  TORCH_CHECK(scales.numel() == d, "unilora: scales has ", scales.numel(), " entries but theta_d has d = ", d);
  const std::pair<const at::Tensor*, std::array<int64_t, 2>> idx[] = {{&idx_a, {r, in_f}}, {&idx_b, {out_f, r}}};
  const char* names[] = {"idx_a", "idx_b"};
  for (int i = 0; i < 2; ++i) {
    const at::Tensor& t = *idx[i].first;
    TORCH_CHECK(t.scalar_type() == at::kInt, "unilora: ", names[i], " must be int32, got ", t.scalar_type());
    TORCH_CHECK(t.dim() == 2 && t.size(0) == idx[i].second[0] && t.size(1) == idx[i].second[1], "unilora: ",
                names[i], " has shape ", t.sizes(), ", expected [", idx[i].second[0], ", ", idx[i].second[1],
                "] for r=", r, ", in=", in_f, ", out=", out_f);
    TORCH_CHECK(t.is_contiguous(), "unilora: ", names[i], " must be contiguous");
    TORCH_CHECK(t.device() == scales.device(), "unilora: ", names[i], " is on ", t.device(), " but scales on ",
                scales.device());
  }
  pj.idx_a = idx_a;
  pj.idx_b = idx_b;
  return pj;
}

static void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "unilora: ", name, " is on ", t.device(), " but theta_d on ",
              ref.device());
}

void check_forward(const at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == pj.in_f, "unilora: x must be 2-D (M, ", pj.in_f, "), got ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), "unilora: x must be float16/bfloat16/float32/float64, got ",
              x.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == pj.out_f, "unilora: out must be (",
              x.size(0), ", ", pj.out_f, "), got ", out.sizes());
  TORCH_CHECK(is_float(out.scalar_type()), "unilora: out must be a float tensor, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "unilora: out must be contiguous (it is updated in place)");
  check_same_device(x, "x", theta);
  check_same_device(out, "out", theta);
}

void check_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                    const at::Tensor& h, const c10::optional<at::Tensor>& grad_x, bool h_may_be_empty) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == pj.in_f, "unilora: x must be 2-D (M, ", pj.in_f, "), got ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), "unilora: x must be a float tensor, got ", x.scalar_type());
  const int64_t M = x.size(0);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == M && g.size(1) == pj.out_f, "unilora: grad_out must be (", M, ", ",
              pj.out_f, "), got ", g.sizes());
  TORCH_CHECK(is_float(g.scalar_type()), "unilora: grad_out must be a float tensor, got ", g.scalar_type());
  TORCH_CHECK(h.dim() == 2 && (h.size(0) == M || (h_may_be_empty && h.size(0) == 0)) && h.size(1) == pj.r,
              "unilora: h must be (", M, ", ", pj.r, ")", h_may_be_empty ? " or (0, r)" : "", ", got ", h.sizes());
  TORCH_CHECK(h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble,
              "unilora: h must be float32 or float64, got ", h.scalar_type());
  check_same_device(x, "x", theta);
  check_same_device(g, "grad_out", theta);
  check_same_device(h, "h", theta);
  if (grad_x.has_value()) {
    const at::Tensor& gx = *grad_x;
    TORCH_CHECK(gx.dim() == 2 && gx.size(0) == M && gx.size(1) == pj.in_f, "unilora: grad_x must be (", M, ", ",
                pj.in_f, "), got ", gx.sizes());
    TORCH_CHECK(is_float(gx.scalar_type()), "unilora: grad_x must be a float tensor, got ", gx.scalar_type());
    TORCH_CHECK(gx.is_contiguous(), "unilora: grad_x must be contiguous (it is updated in place)");
    check_same_device(gx, "grad_x", theta);
  }
}

namespace {

void check_dropout(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "unilora: dropout probability must be in [0, 1], got ", p);
}

// The Dropout of an op on x's device from its seed argument (Seeds, backends/__init__.py): None
// when p == 0 (then ignored), else a one-element int64 tensor. A CPU op reads the value here; a
// CUDA op never reads it on the host: its kernels load it through dr.device_seed. A CPU seed
// given to a CUDA op is copied to the device first (stream-ordered, no host sync; refused during
// graph capture, see cuda::device_seed); `keep` holds that copy until the kernels are enqueued.
Dropout dropout_arg(double p, const c10::optional<at::Tensor>& seed, const at::Tensor& x, at::Tensor& keep) {
  Dropout dr = make_dropout(p);
  if (!dr.active) return dr;
  TORCH_CHECK(seed.has_value() && seed->defined(), "unilora: dropout p = ", p,
              " > 0 needs a seed (a one-element int64 tensor)");
  const at::Tensor& s = *seed;
  TORCH_CHECK(s.scalar_type() == at::kLong && s.numel() == 1,
              "unilora: the dropout seed must be a one-element int64 tensor, got ", s.scalar_type(), " of shape ",
              s.sizes());
  if (x.is_cpu()) {
    TORCH_CHECK(s.is_cpu(), "unilora: a CPU op reads its dropout seed on the host, so it must be a CPU tensor; got "
                "one on ", s.device());
    dr.host_seed = static_cast<uint64_t>(*s.const_data_ptr<int64_t>());
    return dr;
  }
#ifdef UNILORA_WITH_CUDA
  keep = cuda::device_seed(s, x);
  dr.device_seed = keep.const_data_ptr<int64_t>();
  return dr;
#else
  TORCH_CHECK(false, "unilora: ops on ", x.device(), " tensors are not built");
#endif
}

// ---- op implementations: argument checks, then the device's kernels ----
Projection layer_projection(const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                            const at::Tensor& idx_b, int64_t r, int64_t in_f, int64_t out_f, at::IntArrayRef hash_params) {
  check_theta(theta);
  check_same_device(scales, "scales", theta);
  return make_projection(theta.size(0), scales, idx_a, idx_b, r, in_f, out_f, hash_params);
}

int64_t features(const at::Tensor& t) { return t.dim() == 2 ? t.size(1) : -1; }

using ForwardFn = at::Tensor (*)(at::Tensor, const at::Tensor&, const at::Tensor&, const Projection&, const Dropout&);

template <ForwardFn impl>
at::Tensor forward_op(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& scales,
                      const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params,
                      double p, const c10::optional<at::Tensor>& seed) {
  check_dropout(p);
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, features(x), features(out), hash_params);
  check_forward(out, x, theta, pj);
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  if (x.size(0) == 0) return at::empty({0, r}, x.options().dtype(cd));
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  return impl(out, x, theta, pj, dr);
}

using BackwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                          const Projection&, const Dropout&, const at::Tensor&,
                                                          c10::optional<at::Tensor>, bool, bool, bool);

template <BackwardFn impl>
std::tuple<at::Tensor, at::Tensor> backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                               const at::Tensor& scales, const at::Tensor& idx_a,
                                               const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params, double p,
                                               const c10::optional<at::Tensor>& seed, const at::Tensor& h,
                                               c10::optional<at::Tensor> grad_x,
                                               bool need_x, bool need_theta, bool deterministic) {
  check_dropout(p);
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, features(x), features(g), hash_params);
  check_backward(g, x, theta, pj, h, grad_x, false);
  if (x.size(0) == 0) {  // nothing flows back; keep the output contract
    at::Tensor gx = need_x && !grad_x.has_value() ? at::zeros_like(x, at::MemoryFormat::Contiguous)
                                                  : at::empty({0}, x.options());
    at::Tensor gt = need_theta ? at::zeros_like(theta) : at::empty({0}, theta.options());
    return {gx, gt};
  }
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  return impl(g, x, theta, pj, dr, h, std::move(grad_x), need_x, need_theta, deterministic);
}

template <std::tuple<at::Tensor, at::Tensor> (*gather)(const at::Tensor&, const Projection&, at::ScalarType)>
std::tuple<at::Tensor, at::Tensor> lora_matrices_op(const at::Tensor& theta, const at::Tensor& scales,
                                                    const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r,
                                                    int64_t in_f, int64_t out_f, at::IntArrayRef hash_params) {
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, in_f, out_f, hash_params);
  return gather(theta, pj, theta.scalar_type());
}

using ScatterFn = at::Tensor (*)(const at::Tensor&, const at::Tensor&, const Projection&, at::ScalarType, bool);

template <ScatterFn impl>
at::Tensor scatter_op(const at::Tensor& dA, const at::Tensor& dB, const at::Tensor& scales, const at::Tensor& idx_a,
                      const at::Tensor& idx_b, int64_t d, at::IntArrayRef hash_params, at::ScalarType dtype,
                      bool deterministic) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "unilora: grad_theta dtype must be float32 or float64");
  TORCH_CHECK(dA.dim() == 2 && dB.dim() == 2, "unilora: grad_a and grad_b must be 2-D, got ", dA.sizes(), " and ",
              dB.sizes());
  const Projection pj = make_projection(d, scales, idx_a, idx_b, dA.size(0), dA.size(1), dB.size(0), hash_params);
  TORCH_CHECK(dB.size(1) == pj.r, "unilora: grad_b must be (", pj.out_f, ", ", pj.r, "), got ", dB.sizes());
  TORCH_CHECK(dA.scalar_type() == dB.scalar_type() &&
                  (dA.scalar_type() == at::kFloat || dA.scalar_type() == at::kDouble),
              "unilora: grad_a and grad_b must both be float32 or both float64, got ", dA.scalar_type(), " and ",
              dB.scalar_type());
  check_same_device(dA, "grad_a", scales);
  check_same_device(dB, "grad_b", scales);
  return impl(dA, dB, pj, dtype, deterministic);
}

// ---- the fused linear op: frozen base layer + update ----
void check_linear_weight(const at::Tensor& x, const at::Tensor& w, bool weight_t, const at::Tensor& theta) {
  TORCH_CHECK(w.dim() == 2, "unilora: weight must be 2-D, got ", w.sizes());
  TORCH_CHECK(x.dim() == 2, "unilora: x must be 2-D (M, in), got ", x.sizes());
  const int64_t in_w = weight_t ? w.size(0) : w.size(1);
  TORCH_CHECK(x.size(1) == in_w, "unilora: x has ", x.size(1), " features but the weight expects ", in_w);
  TORCH_CHECK(w.scalar_type() == x.scalar_type(), "unilora: x is ", x.scalar_type(), " but the weight is ",
              w.scalar_type());
  check_same_device(w, "weight", theta);
}

int64_t weight_out(const at::Tensor& w, bool weight_t) { return w.dim() == 2 ? w.size(weight_t ? 1 : 0) : -1; }

// The checks of a linear op's forward arguments, and its layer's projection.
Projection linear_projection(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                             bool weight_t, const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                             const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params) {
  check_linear_weight(x, w, weight_t, theta);
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, x.size(1), weight_out(w, weight_t), hash_params);
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == pj.out_f && bias->scalar_type() == x.scalar_type(),
                "unilora: bias must be (", pj.out_f, ",) of x's dtype, got ", bias->scalar_type(), " ", bias->sizes());
    check_same_device(*bias, "bias", theta);
  }
  check_same_device(x, "x", theta);
  return pj;
}

using LinearFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                        const c10::optional<at::Tensor>&, bool, const at::Tensor&,
                                                        const Projection&, const Dropout&, int64_t);

template <LinearFn impl>
std::tuple<at::Tensor, at::Tensor> linear_op(const at::Tensor& x, const at::Tensor& w,
                                             const c10::optional<at::Tensor>& bias, bool weight_t,
                                             const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                                             const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params, double p,
                                             const c10::optional<at::Tensor>& seed, int64_t fold_min_m) {
  check_dropout(p);
  const Projection pj = linear_projection(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params);
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  return impl(x, w, bias, weight_t, theta, pj, dr, fold_min_m);
}

// The shared large-M schedule (fold_schedule.cpp) on one device's kernels, whatever the rows: the
// test ops _fold_linear / _fold_linear_backward (CUDA's linear ops run the same code above their
// threshold).
template <const FoldDevice& dev>
std::tuple<at::Tensor, at::Tensor> fold_linear_op(const at::Tensor& x, const at::Tensor& w,
                                                  const c10::optional<at::Tensor>& bias, bool weight_t,
                                                  const at::Tensor& theta, const at::Tensor& scales,
                                                  const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r,
                                                  at::IntArrayRef hash_params) {
  const Projection pj = linear_projection(x, w, bias, weight_t, theta, scales, idx_a, idx_b, r, hash_params);
  return fold_linear(x, w, bias, weight_t, theta, pj, dev);
}

template <const FoldDevice& dev>
std::tuple<at::Tensor, at::Tensor> fold_linear_backward_op(const at::Tensor& g, const at::Tensor& x,
                                                           const at::Tensor& w, bool weight_t, const at::Tensor& theta,
                                                           const at::Tensor& scales, const at::Tensor& idx_a,
                                                           const at::Tensor& idx_b, int64_t r,
                                                           at::IntArrayRef hash_params, bool need_x, bool need_theta,
                                                           bool deterministic) {
  check_linear_weight(x, w, weight_t, theta);
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, x.size(1), weight_out(w, weight_t), hash_params);
  const at::Tensor no_h = at::empty({0, r}, x.options().dtype(compute_dtype({x.scalar_type(), theta.scalar_type()})));
  check_backward(g, x, theta, pj, no_h, c10::nullopt, true);
  return fold_linear_backward(g, x, w, weight_t, theta, pj, need_x, need_theta, deterministic, dev);
}

using LinearBackwardFn = std::tuple<at::Tensor, at::Tensor> (*)(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, bool, const at::Tensor&,
                                                                const Projection&, const Dropout&, const at::Tensor&,
                                                                bool, bool, bool, int64_t);

template <LinearBackwardFn impl>
std::tuple<at::Tensor, at::Tensor> linear_backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                      bool weight_t, const at::Tensor& theta, const at::Tensor& scales,
                                                      const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r,
                                                      at::IntArrayRef hash_params, double p,
                                                      const c10::optional<at::Tensor>& seed, const at::Tensor& h,
                                                      bool need_x, bool need_theta, bool deterministic,
                                                      int64_t fold_min_m) {
  check_dropout(p);
  check_linear_weight(x, w, weight_t, theta);
  const Projection pj = layer_projection(theta, scales, idx_a, idx_b, r, x.size(1), weight_out(w, weight_t), hash_params);
  check_backward(g, x, theta, pj, h, c10::nullopt, true);
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  return impl(g, x, w, weight_t, theta, pj, dr, h, need_x, need_theta, deterministic, fold_min_m);
}

// ---- mixed batches: one adapter per sequence (seq_adapter), theta or a row of the table ----
void check_mixed(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table, const at::Tensor& seq_adapter) {
  TORCH_CHECK(table.dim() == 2 && table.size(1) == theta.size(0), "unilora: table must be (capacity, d = ",
              theta.size(0), "), got ", table.sizes());
  TORCH_CHECK(is_float(table.scalar_type()), "unilora: table must be float16/bfloat16/float32/float64, got ",
              table.scalar_type());
  TORCH_CHECK(table.is_contiguous(), "unilora: table must be contiguous");
  check_same_device(table, "table", theta);
  TORCH_CHECK(seq_adapter.dim() == 1 && seq_adapter.scalar_type() == at::kInt,
              "unilora: seq_adapter must be a 1-D int32 tensor, got ", seq_adapter.scalar_type(), " of shape ",
              seq_adapter.sizes());
  check_same_device(seq_adapter, "seq_adapter", theta);
  const int64_t M = x.size(0), S = seq_adapter.size(0);
  TORCH_CHECK(S > 0 ? M % S == 0 : M == 0, "unilora: x has ", M, " rows, not a multiple of the ", S,
              " sequences of seq_adapter");
}

// theta of a mixed batch: like every adapter of the table, any float dtype (read into the
// compute dtype; its gradient comes back in its own dtype).
Projection mixed_projection(const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                            const at::Tensor& idx_b, int64_t r, int64_t in_f, int64_t out_f,
                            at::IntArrayRef hash_params) {
  TORCH_CHECK(theta.dim() == 1 && is_float(theta.scalar_type()),
              "unilora: theta_d must be a 1-D float16/bfloat16/float32/float64 tensor, got ", theta.scalar_type(),
              " of shape ", theta.sizes());
  TORCH_CHECK(theta.is_contiguous(), "unilora: theta_d must be contiguous");
  TORCH_CHECK(theta.size(0) > 0, "unilora: theta_d is empty");
  check_same_device(scales, "scales", theta);
  return make_projection(theta.size(0), scales, idx_a, idx_b, r, in_f, out_f, hash_params);
}

using MixedForwardFn = void (*)(at::Tensor, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const Projection&, const Dropout&);

template <MixedForwardFn impl>
void mixed_forward_op(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
                      const at::Tensor& seq_adapter, const at::Tensor& scales, const at::Tensor& idx_a,
                      const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params, double p,
                      const c10::optional<at::Tensor>& seed) {
  check_dropout(p);
  const Projection pj = mixed_projection(theta, scales, idx_a, idx_b, r, features(x), features(out), hash_params);
  check_forward(out, x, theta, pj);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "unilora: out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  check_mixed(x, theta, table, seq_adapter);
  if (x.size(0) == 0) return;
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  impl(out, x, theta, table, seq_adapter, pj, dr);
}

// Decode rows from adapter columns (one row per sequence): columns is (d, S) fp32, column s the
// adapter of row s (zeros for a base row); CPU only (extension.py keeps the columns per batch).
void mixed_decode_op(at::Tensor out, const at::Tensor& x, const at::Tensor& columns, const at::Tensor& scales,
                     const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params) {
  TORCH_CHECK(columns.dim() == 2 && columns.scalar_type() == at::kFloat && columns.is_contiguous(),
              "unilora: columns must be a contiguous (d, S) float32 tensor, got ", columns.scalar_type(), " ",
              columns.sizes());
  TORCH_CHECK(columns.size(0) > 0 && columns.size(1) > 0, "unilora: columns must be (d, S) with d, S > 0, got ",
              columns.sizes());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == columns.size(1), "unilora: x must be (S = ", columns.size(1),
              ", in), one row per sequence, got ", x.sizes());
  check_same_device(x, "x", columns);
  const Projection pj = make_projection(columns.size(0), scales, idx_a, idx_b, r, features(x), features(out),
                                        hash_params);
  check_forward(out, x, columns.select(1, 0), pj);
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "unilora: out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  mixed_decode_cpu(out, x, columns, pj);
}

// The decode columns of a batch (extension.decode_columns keeps them per batch): (d, S) fp32, column s
// the adapter of sequence s (zeros for -1), or an empty tensor when the batch has so few runs of one
// adapter (runs * lanes <= S) that gathering once per run costs less. The ids are read here, on the
// host, where the CPU op runs: Python never reads the tensor.
at::Tensor decode_columns_op(const at::Tensor& theta, const at::Tensor& table, const at::Tensor& seq_adapter,
                             int64_t lanes) {
  TORCH_CHECK(theta.dim() == 1 && is_float(theta.scalar_type()) && theta.size(0) > 0,
              "unilora: theta_d must be a non-empty 1-D float tensor, got ", theta.scalar_type(), " ", theta.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) == theta.size(0) && is_float(table.scalar_type()),
              "unilora: table must be a float (capacity, d = ", theta.size(0), ") tensor, got ", table.scalar_type(),
              " ", table.sizes());
  TORCH_CHECK(seq_adapter.dim() == 1 && seq_adapter.scalar_type() == at::kInt && seq_adapter.size(0) > 0,
              "unilora: seq_adapter must be a non-empty 1-D int32 tensor, got ", seq_adapter.scalar_type(), " ",
              seq_adapter.sizes());
  TORCH_CHECK(lanes > 0, "unilora: lanes must be positive, got ", lanes);
  check_same_device(table, "table", theta);
  check_same_device(seq_adapter, "seq_adapter", theta);
  const at::Tensor seq = seq_adapter.contiguous();
  const int32_t* ids = seq.const_data_ptr<int32_t>();
  const int64_t S = seq.size(0), capacity = table.size(0);
  int64_t runs = 1;
  int32_t lo = ids[0], hi = ids[0];
  for (int64_t s = 1; s < S; ++s) {
    runs += ids[s] != ids[s - 1];
    lo = std::min(lo, ids[s]);
    hi = std::max(hi, ids[s]);
  }
  TORCH_CHECK_VALUE(lo >= -1 && hi <= capacity, "seq_adapter ids must lie in [-1, ", capacity, "], got [", lo, ", ",
                    hi, "]");
  if (runs * lanes <= S) return at::empty({0, 0}, theta.options().dtype(at::kFloat));
  const at::Tensor idx = seq.to(at::kLong);
  const at::Tensor rows = capacity > 0 ? table.index_select(0, (idx - 1).clamp_min(0)) : theta.unsqueeze(0);
  const at::Tensor cols =
      at::where((idx == 0).unsqueeze(1), theta.unsqueeze(0), rows).to(at::kFloat) * (idx >= 0).unsqueeze(1);
  return cols.t().contiguous();
}

using MixedBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor> (*)(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const Projection&,
    const Dropout&, bool, bool, bool);

template <MixedBackwardFn impl>
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_backward_op(
    const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
    const at::Tensor& seq_adapter, const at::Tensor& scales, const at::Tensor& idx_a, const at::Tensor& idx_b,
    int64_t r, at::IntArrayRef hash_params, double p, const c10::optional<at::Tensor>& seed, bool need_x,
    bool need_theta, bool deterministic) {
  check_dropout(p);
  const Projection pj = mixed_projection(theta, scales, idx_a, idx_b, r, features(x), features(g), hash_params);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == pj.in_f, "unilora: x must be 2-D (M, ", pj.in_f, "), got ", x.sizes());
  TORCH_CHECK(is_float(x.scalar_type()), "unilora: x must be float16/bfloat16/float32/float64, got ",
              x.scalar_type());
  TORCH_CHECK(g.dim() == 2 && g.size(0) == x.size(0) && g.size(1) == pj.out_f, "unilora: grad_out must be (",
              x.size(0), ", ", pj.out_f, "), got ", g.sizes());
  TORCH_CHECK(is_float(g.scalar_type()), "unilora: grad_out must be a float tensor, got ", g.scalar_type());
  check_same_device(x, "x", theta);
  check_same_device(g, "grad_out", theta);
  check_mixed(x, theta, table, seq_adapter);
  if (x.size(0) == 0) {
    return {need_x ? at::zeros_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options()),
            need_theta ? at::zeros_like(theta) : at::empty({0}, theta.options()),
            need_theta ? at::zeros_like(table) : at::empty({0}, table.options())};
  }
  at::Tensor seed_keep;
  const Dropout dr = dropout_arg(p, seed, x, seed_keep);
  return impl(g, x, theta, table, seq_adapter, pj, dr, need_x, need_theta, deterministic);
}

// ---- bit-exactness test ops: the header's functions over a tensor of int64 arguments ----
HashedProjection test_hashed_projection(const at::Tensor& positions, int64_t D, int64_t d, int64_t key) {
  TORCH_CHECK(positions.scalar_type() == at::kLong, "unilora: positions must be int64");
  TORCH_CHECK(D > 0 && D < kInt32Limit && d > 0, "unilora: need 0 < D < 2^31 and d > 0, got D=", D, ", d=", d);
  if (positions.numel() > 0) {
    TORCH_CHECK(positions.min().item<int64_t>() >= 0 && positions.max().item<int64_t>() < D,
                "unilora: positions must lie in [0, D)");
  }
  return make_hashed_projection(D, d, key);
}

at::Tensor hashed_index_op_cpu(const at::Tensor& positions, int64_t D, int64_t d, int64_t key) {
  const HashedProjection hash = test_hashed_projection(positions, D, d, key);
  at::Tensor pos = positions.contiguous();
  at::Tensor out = at::empty_like(pos);
  const int64_t* src = pos.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, pos.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = hashed_index(src[i], hash);
  });
  return out;
}

at::Tensor philox_op_cpu(const at::Tensor& offsets, int64_t seed) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "unilora: offsets must be int64");
  at::Tensor off = offsets.contiguous();
  at::Tensor out = at::empty_like(off);
  const int64_t* src = off.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, off.numel(), 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) dst[i] = philox_randint(uint64_t(seed), uint64_t(src[i]));
  });
  return out;
}

#ifdef UNILORA_WITH_CUDA
at::Tensor hashed_index_op_cuda(const at::Tensor& positions, int64_t D, int64_t d, int64_t key) {
  return hashed_index_cuda(positions.contiguous(), test_hashed_projection(positions, D, d, key));
}

at::Tensor philox_op_cuda(const at::Tensor& offsets, int64_t seed) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, "unilora: offsets must be int64");
  return philox_randint_cuda(offsets.contiguous(), uint64_t(seed));
}
#endif

}  // namespace
}  // namespace unilora

TORCH_LIBRARY(unilora_C, m) {
  // out += drop(x) A^T B^T in place; returns h = drop(x) A^T (M x r, fp32; fp64 if x or theta is).
  m.def(
      "forward_(Tensor(a!) out, Tensor x, Tensor theta, Tensor scales, Tensor idx_a, Tensor idx_b, int r, "
      "int[] hash_params, float p, Tensor? seed) -> Tensor");
  // (grad_x, grad_theta). grad_x: ((g B) A) * mask, added into the given grad_x in place (then the
  // first output is empty) or returned in x's dtype; grad_theta: P^T [dA | dB], theta's dtype.
  // An output that was not asked for (need_x / need_theta false) is empty.
  m.def(
      "backward(Tensor grad_out, Tensor x, Tensor theta, Tensor scales, Tensor idx_a, Tensor idx_b, int r, "
      "int[] hash_params, float p, Tensor? seed, Tensor h, Tensor(a!)? grad_x, bool need_x, bool need_theta, "
      "bool deterministic) -> (Tensor, Tensor)");
  // Dense A (r x in) and B (out x r) in theta's dtype (merge, export); differentiable in theta.
  m.def(
      "lora_matrices(Tensor theta, Tensor scales, Tensor idx_a, Tensor idx_b, int r, int in_features, "
      "int out_features, int[] hash_params) -> (Tensor, Tensor)");
  // P^T [grad_a | grad_b]: the scatter-add through the projection, into a fresh (d,) tensor.
  m.def(
      "scatter_grad(Tensor grad_a, Tensor grad_b, Tensor scales, Tensor idx_a, Tensor idx_b, int d, "
      "int[] hash_params, ScalarType dtype, bool deterministic) -> Tensor");
  // The frozen base linear (nn.Linear; transformers' Conv1D when weight_t) and the update on 2-D x:
  // (out, h). h may be empty ((0, r): the CPU backward recomputes it from x). Calls of at least
  // fold_min_m rows (-1: none; the layer plans pass policy.fold_min_m) without dropout may run one
  // GEMM on W + B A (CUDA: above decode sizes, h empty and the backward folds too).
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias, bool weight_t, Tensor theta, Tensor scales, Tensor idx_a, "
      "Tensor idx_b, int r, int[] hash_params, float p, Tensor? seed, int fold_min_m=-1) -> (Tensor, Tensor)");
  // Its backward: (grad_x = g W + ((g B) A) * mask, grad_theta); unrequested outputs are empty.
  m.def(
      "linear_backward(Tensor grad_out, Tensor x, Tensor weight, bool weight_t, Tensor theta, Tensor scales, "
      "Tensor idx_a, Tensor idx_b, int r, int[] hash_params, float p, Tensor? seed, Tensor h, bool need_x, bool need_theta, "
      "bool deterministic, int fold_min_m=-1) -> (Tensor, Tensor)");
  // The output of `linear`, differentiable in x, weight, bias and theta with its autograd in C++
  // (csrc/autograd.cpp): the eager training path of UniLoRALinear on the compiled backends.
  m.def(
      "linear_autograd(Tensor x, Tensor weight, Tensor? bias, bool weight_t, Tensor theta, Tensor scales, "
      "Tensor idx_a, Tensor idx_b, int r, int[] hash_params, float p, Tensor? seed, bool deterministic, "
      "int fold_min_m=-1) -> Tensor");
  // Mixed batches: row m runs the adapter of its sequence seq_adapter[m / (M / S)] (int32 (S,), on x's
  // device): -1 none, 0 theta, k > 0 row k - 1 of table (capacity, d). out (x's dtype) += drop(x) A_a^T B_a^T.
  m.def(
      "mixed_forward_(Tensor(a!) out, Tensor x, Tensor theta, Tensor table, Tensor seq_adapter, Tensor scales, "
      "Tensor idx_a, Tensor idx_b, int r, int[] hash_params, float p, Tensor? seed) -> ()");
  // Decode rows (one per sequence) whose adapters are the columns of `columns` (d, S) fp32 (CPU).
  m.def(
      "mixed_decode_(Tensor(a!) out, Tensor x, Tensor columns, Tensor scales, Tensor idx_a, Tensor idx_b, int r, "
      "int[] hash_params) -> ()");
  // The (d, S) fp32 adapter columns of a decode batch, or an empty tensor when too few runs (CPU).
  m.def("decode_columns(Tensor theta, Tensor table, Tensor seq_adapter, int lanes) -> Tensor");
  // Its backward, the update alone: (grad_x in x's dtype, zero on base rows; grad_theta (d,); grad_table
  // (capacity, d)), each in its tensor's dtype; an output that was not asked for is empty.
  m.def(
      "mixed_backward(Tensor grad_out, Tensor x, Tensor theta, Tensor table, Tensor seq_adapter, Tensor scales, "
      "Tensor idx_a, Tensor idx_b, int r, int[] hash_params, float p, Tensor? seed, bool need_x, bool need_theta, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
  // Test ops: the large-M schedule CUDA's linear ops run above fold_min_m (fold_schedule.cpp), on any
  // device's kernels and any rows: (out, h of 0 rows) and (grad_x or empty, grad_theta or empty).
  m.def(
      "_fold_linear(Tensor x, Tensor weight, Tensor? bias, bool weight_t, Tensor theta, Tensor scales, "
      "Tensor idx_a, Tensor idx_b, int r, int[] hash_params) -> (Tensor, Tensor)");
  m.def(
      "_fold_linear_backward(Tensor grad_out, Tensor x, Tensor weight, bool weight_t, Tensor theta, "
      "Tensor scales, Tensor idx_a, Tensor idx_b, int r, int[] hash_params, bool need_x, bool need_theta, "
      "bool deterministic) -> (Tensor, Tensor)");
  // Test ops: the header's index and dropout functions, element-wise over int64 tensors.
  m.def("_hashed_index(Tensor positions, int D, int d, int key) -> Tensor");
  m.def("_philox_randint(Tensor offsets, int seed) -> Tensor");
  // Test op: how many element maps the cpu mixed ops have built (each layer's is built once and kept).
  m.def("_mixed_map_builds() -> int", [] { return unilora::mixed_map_builds(); });
}

TORCH_LIBRARY_IMPL(unilora_C, CPU, m) {
  m.impl("forward_", &unilora::forward_op<&unilora::forward_cpu>);
  m.impl("backward", &unilora::backward_op<&unilora::backward_cpu>);
  m.impl("lora_matrices", &unilora::lora_matrices_op<&unilora::gather_cpu>);
  m.impl("scatter_grad", &unilora::scatter_op<&unilora::scatter_cpu>);
  m.impl("linear", &unilora::linear_op<&unilora::linear_cpu>);
  m.impl("linear_backward", &unilora::linear_backward_op<&unilora::linear_backward_cpu>);
  m.impl("mixed_forward_", &unilora::mixed_forward_op<&unilora::mixed_forward_cpu>);
  m.impl("mixed_backward", &unilora::mixed_backward_op<&unilora::mixed_backward_cpu>);
  m.impl("mixed_decode_", &unilora::mixed_decode_op);
  m.impl("decode_columns", &unilora::decode_columns_op);
  m.impl("_fold_linear", &unilora::fold_linear_op<unilora::kFoldCpu>);
  m.impl("_fold_linear_backward", &unilora::fold_linear_backward_op<unilora::kFoldCpu>);
  m.impl("_hashed_index", &unilora::hashed_index_op_cpu);
  m.impl("_philox_randint", &unilora::philox_op_cpu);
}

TORCH_LIBRARY_IMPL(unilora_C, Autograd, m) { m.impl("linear_autograd", &unilora::linear_autograd); }
TORCH_LIBRARY_IMPL(unilora_C, CompositeExplicitAutograd, m) {
  m.impl("linear_autograd", &unilora::linear_no_autograd);
}

#ifdef UNILORA_WITH_CUDA
TORCH_LIBRARY_IMPL(unilora_C, CUDA, m) {
  m.impl("forward_", &unilora::forward_op<&unilora::forward_cuda>);
  m.impl("backward", &unilora::backward_op<&unilora::backward_cuda>);
  m.impl("lora_matrices", &unilora::lora_matrices_op<&unilora::gather_cuda>);
  m.impl("scatter_grad", &unilora::scatter_op<&unilora::scatter_cuda>);
  m.impl("linear", &unilora::linear_op<&unilora::linear_cuda>);
  m.impl("linear_backward", &unilora::linear_backward_op<&unilora::linear_backward_cuda>);
  m.impl("mixed_forward_", &unilora::mixed_forward_op<&unilora::mixed_forward_cuda>);
  m.impl("mixed_backward", &unilora::mixed_backward_op<&unilora::mixed_backward_cuda>);
  m.impl("_fold_linear", &unilora::fold_linear_op<unilora::kFoldCuda>);
  m.impl("_fold_linear_backward", &unilora::fold_linear_backward_op<unilora::kFoldCuda>);
  m.impl("_hashed_index", &unilora::hashed_index_op_cuda);
  m.impl("_philox_randint", &unilora::philox_op_cuda);
}
#endif
