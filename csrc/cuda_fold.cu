// The large-M schedule's fold on CUDA: W' = W + B A in one memory-bound launch, for one GEMM on
// W' (forward x W'^T, backward g W'). A (r x in) and B (out x r) come gathered by cuda::prepare in
// the GEMM dtype; products and the sum run in the accumulation type and round once to W's dtype.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>

#include "cuda_common.cuh"

namespace unilora {
namespace cuda {
namespace {

constexpr int kFoldThreads = 256;

// Element e of the (P x Q) result (row-major) is W's stored (p, q): (n, k) of nn.Linear's
// (out, in), (k, n) of Conv1D's (in, out). W is read at p * ws0 + q * ws1 (any strides).
template <typename T>
__global__ void fold_kernel(const T* __restrict__ w, int64_t ws0, int64_t ws1, const T* __restrict__ A,
                            const T* __restrict__ B, T* __restrict__ out, int64_t P, int64_t Q, int64_t K, int r,
                            bool weight_t) {
  using acc_t = at::acc_type<T, true>;
  const int64_t n_el = P * Q;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n_el;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = e / Q, q = e - p * Q;
    const int64_t n = weight_t ? q : p, k = weight_t ? p : q;
    acc_t acc = static_cast<acc_t>(w[p * ws0 + q * ws1]);
    for (int i = 0; i < r; ++i) {
      acc += static_cast<acc_t>(B[n * r + i]) * static_cast<acc_t>(A[i * K + k]);
    }
    out[e] = static_cast<T>(acc);
  }
}

}  // namespace

at::Tensor fold_weight(const at::Tensor& w, bool weight_t, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.scalar_type() == w.scalar_type() && B.scalar_type() == w.scalar_type() && A.is_contiguous() &&
                  B.is_contiguous(),
              "unilora: fold_weight needs contiguous A and B of the weight's dtype");
  // A fresh contiguous W' from the caching allocator: each layer's fold reuses the block the
  // previous one freed, so the workspace is one layer's weight at a time.
  at::Tensor out = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t P = w.size(0), Q = w.size(1), n_el = P * Q;
  if (n_el == 0) return out;
  const int r = static_cast<int>(A.size(0));
  const int64_t K = A.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "unilora_fold_cuda", [&] {
    fold_kernel<scalar_t><<<grid_for(n_el, kFoldThreads), kFoldThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        w.data_ptr<scalar_t>(), w.stride(0), w.stride(1), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(), P, Q, K, r, weight_t);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace cuda
}  // namespace unilora

namespace unilora {
namespace {

std::tuple<at::Tensor, at::Tensor> cuda_prepare(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype,
                                                at::Tensor* grad) {
  const cuda::Prepared pr = cuda::prepare(theta, pj, dtype, nullptr, Dropout{}, nullptr, grad);  // one launch
  return {pr.A, pr.B};
}

void cuda_scatter_add(at::Tensor& grad, const at::Tensor& dA, const at::Tensor& dB, const Projection& pj,
                      bool deterministic) {
  cuda::scatter_add_(grad, dA, dB, pj, deterministic);
}

// fp16/bf16 operands: cuBLAS writes its fp32 accumulator out directly (mm's out dtype)
at::Tensor cuda_mm_acc(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc) {
  return a.scalar_type() == acc ? at::mm(a, b) : at::mm(a, b, acc);
}

}  // namespace

const FoldDevice kFoldCuda{cuda_prepare, cuda::fold_weight, cuda_scatter_add, cuda_mm_acc};

}  // namespace unilora
