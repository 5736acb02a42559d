// Shared by the CUDA translation units: the projection as kernels read it, and launch helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cstdint>

#include "index_math.h"
#include "unilora.h"

namespace unilora {
namespace cuda {

// A layer's projection by value (kernel parameter): element i of the flattened [A | B]
// (0 <= i < n, n < 2^31) reads theta_d[j] * scale, (j, scale) = lookup(i).
struct ProjView {
  const int32_t* ia;    // uniform: idx_a (r x in) flattened; hashed: unused
  const int32_t* ib;    // uniform: idx_b (out x r) flattened
  const float* scales;  // uniform: (d,); hashed: (2,)
  int32_t na;           // r * in
  int32_t n;            // r * (in + out)
  int32_t d;
  bool is_hashed;
  int32_t offset;  // hashed: position of A[0, 0] in theta_D (< 2^31)
  HashedProjection hash;
};

inline ProjView make_view(const Projection& pj) {
  ProjView v{};
  v.is_hashed = pj.is_hashed;
  v.ia = pj.is_hashed ? nullptr : pj.idx_a.data_ptr<int32_t>();
  v.ib = pj.is_hashed ? nullptr : pj.idx_b.data_ptr<int32_t>();
  v.scales = pj.scales.data_ptr<float>();
  v.na = static_cast<int32_t>(pj.numel_a());
  v.n = static_cast<int32_t>(pj.numel());
  v.d = static_cast<int32_t>(pj.d);
  v.offset = static_cast<int32_t>(pj.offset);
  v.hash = pj.hash;
  return v;
}

// (theta_d index, scale) of element i. An out-of-range uniform index is a device-side assert,
// as in PyTorch's own index kernels (the host cannot check without reading the whole table).
__device__ __forceinline__ int32_t lookup(const ProjView& p, int32_t i, float* scale) {
  if (p.is_hashed) {
    const int32_t j = static_cast<int32_t>(hashed_index(static_cast<int64_t>(p.offset) + i, p.hash));
    *scale = __ldg(p.scales + (j < p.hash.rem ? 1 : 0));
    return j;
  }
  const int32_t j = i < p.na ? __ldg(p.ia + i) : __ldg(p.ib + (i - p.na));
  CUDA_KERNEL_ASSERT(j >= 0 && j < p.d && "unilora: projection index outside [0, d)");
  *scale = __ldg(p.scales + j);
  return j;
}

// The dropout seed, loaded where the kernel runs (Dropout::device_seed; never read on the host, so
// a CUDA-graph replay sees the seed drawn for it); 0 without dropout. One load per thread.
__device__ __forceinline__ uint64_t load_seed(const Dropout& dr) {
  return dr.active ? static_cast<uint64_t>(__ldg(reinterpret_cast<const long long*>(dr.device_seed))) : 0ull;
}

// a * b rounded on its own: nvcc contracts `g += a * b` into an FMA (one rounding), which the
// CPU's separate multiply and add do not do; the deterministic scatter must match it bit for bit.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Blocks for a grid-stride loop over n elements with `threads` per block.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = (n + threads - 1) / threads;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, sms * 8)));
}

// Projection kernels (cuda_projection.cu), used by the forward/backward orchestration.
// gather: A (r x in), B (out x r) in `dtype` (any float type; fp16/bf16 feed cuBLAS directly).
std::tuple<at::Tensor, at::Tensor> gather(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype);

// What the cuBLAS paths need before their GEMMs, made by ONE launch (prepare): A and B gathered in
// the GEMM dtype `gt`; xd = drop(x) (x given: gt, unit column stride); hg = h in gt (h given: the
// contiguous fp32 h of fp16/bf16 GEMMs); grad (given: theta's dtype, (d,)) zeroed for scatter_add_.
struct Prepared {
  at::Tensor A, B, xd, hg;
};
Prepared prepare(const at::Tensor& theta, const Projection& pj, at::ScalarType gt, const at::Tensor* x,
                 const Dropout& dr, const at::Tensor* h, at::Tensor* grad);
// grad (zeroed by prepare) += P^T [dA | dB]; dA, dB contiguous fp32 (fp64), one launch (atomic)
// or the sort-based fixed-order scatter (deterministic).
void scatter_add_(at::Tensor& grad, const at::Tensor& dA, const at::Tensor& dB, const Projection& pj,
                  bool deterministic);
// dst += src * keep * scale (fresh == false) or dst = src * keep * scale (fresh); dst contiguous.
void masked_add_(at::Tensor& dst, const at::Tensor& src, const Dropout& dr, bool fresh);

// W + B A (cuda_fold.cu): contiguous, in W's layout and dtype (A, B gathered in it, contiguous);
// weight_t: W is Conv1D's (in, out).
at::Tensor fold_weight(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B);

// Fused small-M forward (cuda_decode.cu): returns false when the shape or dtypes are outside it.
bool decode_forward(at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                    const Dropout& dr, at::Tensor& h);

}  // namespace cuda
}  // namespace unilora
