// Declarations shared by the registration file, the CPU kernels and the CUDA kernels.
#pragma once

#include <ATen/ATen.h>

#include "decode_limits.h"
#include "index_math.h"

namespace unilora {

// One layer's projection P, validated (make_projection), in the form the kernels read it.
// Element i of the layer's flattened [A (r x in, row-major), B (out x r, row-major)] reads
// theta_d[j] * scale(j) with j = idx_a/idx_b[i] ("uniform") or hashed_index(offset + i).
struct Projection {
  at::Tensor scales;        // fp32, (d,) uniform or (2,) hashed: [s(D // d), s(D // d + 1)]
  at::Tensor idx_a, idx_b;  // int32 contiguous (r, in) and (out, r); empty when hashed
  int64_t r = 0, in_f = 0, out_f = 0, d = 0;
  bool is_hashed = false;
  int64_t offset = 0;     // hashed: position of A[0, 0] in theta_D
  HashedProjection hash;  // hashed: the Feistel parameters of hashed_index

  int64_t numel_a() const { return r * in_f; }
  int64_t numel() const { return r * (in_f + out_f); }
};

// Checks (TORCH_CHECK, naming the problem) and packs the projection arguments of every op.
Projection make_projection(int64_t d, const at::Tensor& scales, const at::Tensor& idx_a, const at::Tensor& idx_b,
                           int64_t r, int64_t in_f, int64_t out_f, at::IntArrayRef hash_params);
void check_theta(const at::Tensor& theta);

// fp64 when any operand is fp64, else fp32: the precision of A, B, h and every accumulation.
at::ScalarType compute_dtype(std::initializer_list<at::ScalarType> dtypes);

// Argument checks of forward_ / backward (device-independent).
void check_forward(const at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj);
void check_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                    const at::Tensor& h, const c10::optional<at::Tensor>& grad_x, bool h_may_be_empty);

// ---- CPU (cpu_*.cpp; cpu_common.h lists which file does what) ----
at::Tensor forward_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                       const Dropout& dr);
// (deterministic is ignored: the CPU scatter is serial, hence always deterministic.)
std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                bool deterministic);
// (A, B): theta gathered through P and scaled, dtype `dtype` (fp32/fp64), two fresh tensors.
std::tuple<at::Tensor, at::Tensor> gather_cpu(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype);
// grad_theta (d,) of dtype `dtype` = P^T [dA | dB]: the scatter-add through the indices.
at::Tensor scatter_cpu(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, at::ScalarType dtype,
                       bool deterministic);

// The frozen base linear (nn.Linear; Conv1D when weight_t) and the update in one op: (out, h).
// The CPU version returns an empty h (its backward recomputes h). Calls of at least fold_min_m
// rows (< 0: none) without dropout may fold B A into W (one GEMM on W + B A; CUDA: h empty too).
std::tuple<at::Tensor, at::Tensor> linear_cpu(const at::Tensor& x, const at::Tensor& w,
                                              const c10::optional<at::Tensor>& bias, bool weight_t,
                                              const at::Tensor& theta, const Projection& pj, const Dropout& dr,
                                              int64_t fold_min_m);
// (grad_x, grad_theta) of linear: grad_x = g W + ((g B) A) * mask, grad_theta = P^T [dA | dB].
std::tuple<at::Tensor, at::Tensor> linear_backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                       bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                       const Dropout& dr, const at::Tensor& h, bool need_x,
                                                       bool need_theta, bool deterministic, int64_t fold_min_m);

// Mixed batches: row m reads the adapter of its sequence, seq_adapter[m / (M / S)] (int32 (S,)):
// -1 none, 0 theta, k > 0 row k - 1 of table (capacity, d). out (x's dtype) += drop(x) A_a^T B_a^T;
// the backward returns (grad_x or empty, grad_theta or empty, grad_table or empty).
void mixed_forward_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
                       const at::Tensor& seq_adapter, const Projection& pj, const Dropout& dr);
// (deterministic is ignored: every adapter's scatter is serial, hence always deterministic.)
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_backward_cpu(const at::Tensor& g, const at::Tensor& x,
                                                                  const at::Tensor& theta, const at::Tensor& table,
                                                                  const at::Tensor& seq_adapter, const Projection& pj,
                                                                  const Dropout& dr, bool need_x, bool need_theta,
                                                                  bool deterministic);
// Decode rows (one per sequence) whose adapters are the columns of `columns` (d, S) fp32.
void mixed_decode_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& columns, const Projection& pj);
// How many times the cpu mixed ops built a layer's element map (a cache miss): for tests.
int64_t mixed_map_builds();

// ---- fold_schedule.cpp: the large-M schedule (W + B A folded, one GEMM each way) on any device ----
// Exactly what nn.Linear (addmm with W^T) or transformers' Conv1D (addmm with W, weight_t) computes on 2-D x.
at::Tensor base_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t);
// Whether a linear call folds: fold_min_m >= 0 rows or more (policy.fold_min_m), no dropout,
// above decode sizes, GEMMs in x's own dtype.
bool fold_call(int64_t M, int64_t fold_min_m, const Dropout& dr, const at::Tensor& x, at::ScalarType gemm_dtype);
// The kernels a device brings to the schedule.
struct FoldDevice {
  // (A, B) gathered in `dtype`, contiguous; zeroes *grad ((d,), theta's dtype) when given
  std::tuple<at::Tensor, at::Tensor> (*prepare)(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype,
                                                at::Tensor* grad);
  // W + B A in W's dtype and layout (weight_t: Conv1D's (in, out)), contiguous
  at::Tensor (*fold)(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B);
  // grad += P^T [dA | dB] (dA, dB in the compute dtype)
  void (*scatter_add)(at::Tensor& grad, const at::Tensor& dA, const at::Tensor& dB, const Projection& pj,
                      bool deterministic);
  // a b with the result in `acc` (fp32 for fp16/bf16 operands, without a rounding to them)
  at::Tensor (*mm_acc)(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc);
};
// (out, h of 0 rows) and (grad_x or empty, grad_theta or empty) of the folded call.
std::tuple<at::Tensor, at::Tensor> fold_linear(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const Projection& pj, const FoldDevice& dev);
std::tuple<at::Tensor, at::Tensor> fold_linear_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                        bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                        bool need_x, bool need_theta, bool deterministic,
                                                        const FoldDevice& dev);
// The devices' kernels for it: CPU (cpu_fold.cpp; for the test ops) and CUDA (cuda_fold.cu).
extern const FoldDevice kFoldCpu;
#ifdef UNILORA_WITH_CUDA
extern const FoldDevice kFoldCuda;
#endif

// ---- autograd.cpp: unilora_C::linear_autograd, the output of `linear` with autograd in C++ ----
at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                           bool weight_t, const at::Tensor& theta, const at::Tensor& scales, const at::Tensor& idx_a,
                           const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params, double p,
                           const c10::optional<at::Tensor>& seed, bool deterministic, int64_t fold_min_m);
// Below autograd (inference mode): the output alone.
at::Tensor linear_no_autograd(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                              bool weight_t, const at::Tensor& theta, const at::Tensor& scales,
                              const at::Tensor& idx_a, const at::Tensor& idx_b, int64_t r, at::IntArrayRef hash_params,
                              double p, const c10::optional<at::Tensor>& seed, bool deterministic,
                              int64_t fold_min_m);

#ifdef UNILORA_WITH_CUDA
// ---- CUDA (cuda_*.cu) ----
at::Tensor forward_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                        const Dropout& dr);
std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                 const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                 c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                 bool deterministic);
std::tuple<at::Tensor, at::Tensor> gather_cuda(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype);
at::Tensor scatter_cuda(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, at::ScalarType dtype,
                        bool deterministic);
std::tuple<at::Tensor, at::Tensor> linear_cuda(const at::Tensor& x, const at::Tensor& w,
                                               const c10::optional<at::Tensor>& bias, bool weight_t,
                                               const at::Tensor& theta, const Projection& pj, const Dropout& dr,
                                               int64_t fold_min_m);
// (an h of 0 rows for M > 0: the forward folded; the backward folds too and recomputes h)
std::tuple<at::Tensor, at::Tensor> linear_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                        const at::Tensor& w, bool weight_t, const at::Tensor& theta,
                                                        const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                        bool need_x, bool need_theta, bool deterministic,
                                                        int64_t fold_min_m);
// Mixed batches (cuda_mixed.cu): a block per row; the backward adds with fp32 atomics and
// refuses deterministic mode when asked for theta gradients.
void mixed_forward_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
                        const at::Tensor& seq_adapter, const Projection& pj, const Dropout& dr);
std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                                   const at::Tensor& theta, const at::Tensor& table,
                                                                   const at::Tensor& seq_adapter, const Projection& pj,
                                                                   const Dropout& dr, bool need_x, bool need_theta,
                                                                   bool deterministic);
at::Tensor hashed_index_cuda(const at::Tensor& positions, const HashedProjection& hash);
at::Tensor philox_randint_cuda(const at::Tensor& offsets, uint64_t seed);
namespace cuda {
// The dropout seed of a CUDA op on x's device: a CUDA seed as it is (on x's device), a CPU seed
// copied there without a host sync (refused during graph capture: the copy would not replay).
at::Tensor device_seed(const at::Tensor& seed, const at::Tensor& x);
}  // namespace cuda
#endif

}  // namespace unilora
