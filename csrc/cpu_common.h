// What the CPU kernel files (cpu_*.cpp) share: block sizes, the chunked parallel loop, dropout
// on row blocks, and the functions one of them calls in another. Internal to the CPU backend:
// the ops see only the *_cpu entry points of unilora.h.
//
//   cpu_projection.cpp  gather (A, B from theta) and scatter (grad_theta) through the projection
//   cpu_decode.cpp      M <= 4 rows straight from the indices, and the fused decode linear
//   cpu_forward.cpp     the update out += (x A^T) B^T: BLAS row blocks or the SIMD loops
//   cpu_backward.cpp    grad_x and grad_theta of the update: BLAS row blocks or the SIMD loops
//   cpu_adapter_simd.cpp  tensors -> the pointer-level loops of cpu_simd.h, split between threads
//   cpu_dropout.cpp     dropout (Philox mask) on row blocks of x
//   cpu_fold.cpp        W + B A in the weight's layout, in a per-thread buffer; kFoldCpu (fold_schedule.cpp)
//   cpu_linear.cpp      the fused base linear + update (linear_cpu, linear_backward_cpu)
//   cpu_mixed.cpp       mixed batches: one adapter per sequence (mixed_forward_cpu, mixed_backward_cpu)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>

#include "unilora.h"

namespace unilora {
namespace cpu {

constexpr int64_t kGrain = 8192;             // elements per task of the element-wise loops
constexpr int64_t kBlockBytes = 512 * 1024;  // one row block of x (or g) in compute precision
constexpr int64_t kSimdRows = 64;            // rows per block of the SIMD forward/backward (blocks split by thread)

// Rows of a block of `width` elements each that fit kBlockBytes (16 to 1024).
inline int64_t block_rows(int64_t width, int64_t elem_size) {
  return std::clamp<int64_t>(kBlockBytes / std::max<int64_t>(1, width * elem_size), 16, 1024);
}

// Runs f(chunk, first_block, last_block) over a fixed partition of [0, nblocks) into at most
// one chunk per thread: per-chunk partial sums are then reduced in chunk order, so results do
// not depend on scheduling (only on the thread count). The caller's thread-local state (the
// dispatcher's autograd exclusion, grad mode) is carried into the workers, whose at:: calls
// would otherwise see inputs that require grad and try to record them. Returns the chunk count.
template <typename F>
int64_t run_chunks(int64_t nblocks, const F& f) {
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  const at::ThreadLocalState state;
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t c = c0; c < c1; ++c) f(c, c * nblocks / nchunks, (c + 1) * nblocks / nchunks);
  });
  return nchunks;
}

// The error of an out-of-range uniform projection index (the loops read element 0 instead).
inline void check_index_range(bool any_out_of_range, int64_t d) {
  TORCH_CHECK(!any_out_of_range, "unilora: a projection index is outside [0, d = ", d, ")");
}

// ---- cpu_dropout.cpp ----
// x rows [m0, m0 + rows) in compute precision (buf's dtype) with dropout applied: a view of x
// itself when nothing needs changing (BLAS reads any row stride), else the thread's block buffer
// `buf`. The keep mask is saved to `mask` (rows x in, one byte each) when given.
at::Tensor input_block(const at::Tensor& x, int64_t m0, int64_t rows, at::Tensor& buf, const Dropout& dr,
                       uint8_t* mask);
// In place on a contiguous block whose first row is row m0 of the flattened input: the dropout
// mask of those rows (drawn again), or the mask saved by input_block when `mask` is given.
void drop_rows(const at::Tensor& block, int64_t m0, const Dropout& dr, const uint8_t* mask);

// ---- cpu_decode.cpp ----
// out += x A^T B^T and h = x A^T for 1 <= M <= kSmallM rows, no dropout, straight from the indices.
void forward_small(const at::Tensor& x, at::Tensor& out, const at::Tensor& theta, const Projection& pj,
                   const at::Tensor& h);
// Whether decode_linear takes this call: fp32 nn.Linear at M <= kSmallM without dropout.
bool use_decode_linear(int64_t M, const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                       bool weight_t, const at::Tensor& theta, const Projection& pj, const Dropout& dr);
// Whether decode_backward takes this call: fp32 at M <= kSmallM without dropout (any strides).
bool use_decode_backward(int64_t M, const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                         const at::Tensor& theta, const Projection& pj, const Dropout& dr);
// (grad_x = g W + gB A, grad_theta) of the fused linear, straight from the indices (serial,
// deterministic); h: the forward's fp32 h = x A^T (M x r), or no rows (then recomputed).
std::tuple<at::Tensor, at::Tensor> decode_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& w,
                                                   bool weight_t, const at::Tensor& theta, const Projection& pj,
                                                   const at::Tensor& h, bool need_x, bool need_theta);
// x W^T + bias + (x A^T) B^T in one parallel region (needs use_decode_linear); h (M x r fp32,
// contiguous) gets h = x A^T.
at::Tensor decode_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                         const at::Tensor& theta, const Projection& pj, at::Tensor& h);

// ---- cpu_adapter_simd.cpp (fp32, unit column strides, simd::available()) ----
// h = x A^T (stored into h, M x r contiguous) and out += h B^T, one pass per x row.
void simd_adapter_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, at::Tensor& out,
                          at::Tensor& h);
// The adapter backward over rows [m0, m1): h (recomputed when undefined), u = g B,
// dB^T += h^T g and dA += u^T x into partial c of accA / accBT (one per thread chunk, when
// defined), grad_x (+= when gx_add) u A when gx is defined. Returns the number of chunks used.
int64_t simd_adapter_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& h, const at::Tensor& A,
                              const at::Tensor& BT, const Projection& pj, const at::Tensor& accA,
                              const at::Tensor& accBT, const at::Tensor& gx, bool gx_add, int64_t m0, int64_t m1);

// ---- cpu_backward.cpp ----
// backward_cpu with A and B (compute dtype) already gathered.
std::tuple<at::Tensor, at::Tensor> backward_gathered(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                     const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                     c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                     const at::Tensor& A, const at::Tensor& B);

// ---- cpu_fold.cpp ----
// Whether the fused linear folds the update into the base weight (W' = W + B A).
bool fold_into_weight(int64_t M, const at::Tensor& x, const at::Tensor& w, at::ScalarType cd, const Dropout& dr,
                      int64_t fold_min_m);
// W + B A in the weight's layout, contiguous: a view of this thread's fold buffer, valid until
// this thread's next fold.
at::Tensor folded_weight(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B);

}  // namespace cpu
}  // namespace unilora
