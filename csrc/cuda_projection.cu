// CUDA kernels through the projection: gather (merge, export), prepare (the one launch before the
// cuBLAS paths' GEMMs: gather, dropout of x, cast of h, zeroed gradient), the theta_d gradient
// scatter-add (atomic, and a sort-based deterministic variant), the masked add of grad_x, the
// device copy of a CPU dropout seed, and the element-wise test ops that check the header against
// the Python reference bit for bit.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>

#include <algorithm>

#include "cuda_common.cuh"

namespace unilora {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// A[i] / B[i - na] = theta[j] * scale in the output's accumulation type, rounded once
// (elements tid, tid + stride, ... of the flattened [A | B]).
template <typename theta_t, typename out_t>
__device__ __forceinline__ void gather_elements(const ProjView& p, const theta_t* __restrict__ theta,
                                                out_t* __restrict__ A, out_t* __restrict__ B, int64_t tid,
                                                int64_t stride) {
  using acc_t = typename Acc<out_t>::type;
  for (int64_t e = tid; e < p.n; e += stride) {
    const int32_t i = static_cast<int32_t>(e);
    float s;
    const int32_t j = lookup(p, i, &s);
    const acc_t v = static_cast<acc_t>(theta[j]) * static_cast<acc_t>(s);
    if (i < p.na) {
      A[i] = static_cast<out_t>(v);
    } else {
      B[i - p.na] = static_cast<out_t>(v);
    }
  }
}

// xd = x * keep * scale (x rows ldx apart, xd contiguous, one dtype), elements tid, tid + stride, ...
template <typename T>
__device__ __forceinline__ void dropout_elements(const T* __restrict__ x, int64_t ldx, T* __restrict__ xd,
                                                 int64_t rows, int64_t cols, const Dropout& dr, int64_t tid,
                                                 int64_t stride) {
  using acc_t = typename Acc<T>::type;
  const int64_t n = rows * cols;
  if (tid >= n) return;
  const uint64_t seed = load_seed(dr);
  for (int64_t e = tid; e < n; e += stride) {
    const int64_t m = e / cols, c = e - m * cols;
    const bool keep = dropout_keep(seed, static_cast<uint64_t>(e), dr.threshold);
    xd[e] = keep ? static_cast<T>(static_cast<acc_t>(x[m * ldx + c]) * static_cast<acc_t>(dr.scale)) : T(0);
  }
}

template <typename theta_t, typename out_t>
__global__ void __launch_bounds__(kThreads) gather_kernel(ProjView p, const theta_t* __restrict__ theta,
                                                          out_t* __restrict__ A, out_t* __restrict__ B) {
  gather_elements(p, theta, A, B, blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x,
                  static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// The one launch before the GEMMs of the cuBLAS paths (Prepared in cuda_common.cuh): the gather,
// and where asked for the dropout of x, the cast of h to the GEMM dtype and the zeroing of the
// theta gradient, each a grid-stride loop of its own over the same threads (no dependencies).
// Min 1 block per SM: ptxas otherwise spilled 8 bytes in the fp64-output variants on sm_80.
template <typename theta_t, typename out_t>
__global__ void __launch_bounds__(kThreads, 1)
    prepare_kernel(ProjView p, const theta_t* __restrict__ theta, out_t* __restrict__ A, out_t* __restrict__ B,
                   const out_t* __restrict__ x, int64_t ldx, out_t* __restrict__ xd, int64_t rows, int64_t cols,
                   Dropout dr, const typename Acc<out_t>::type* __restrict__ h, out_t* __restrict__ hg, int64_t nh,
                   theta_t* __restrict__ grad, int64_t d) {
  const int64_t tid = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  gather_elements(p, theta, A, B, tid, stride);
  if (xd != nullptr) dropout_elements(x, ldx, xd, rows, cols, dr, tid, stride);
  if (hg != nullptr) {
    for (int64_t e = tid; e < nh; e += stride) hg[e] = static_cast<out_t>(h[e]);
  }
  if (grad != nullptr) {
    for (int64_t e = tid; e < d; e += stride) grad[e] = theta_t(0);
  }
}

// grad[j(i)] += grad_t(v[i] * scale(j(i))): the default backward (fp32/fp64 atomics; the
// order of the adds, hence the last bits, varies from run to run).
template <typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) scatter_atomic_kernel(ProjView p, const acc_t* __restrict__ dA,
                                                                  const acc_t* __restrict__ dB,
                                                                  grad_t* __restrict__ grad) {
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
    float s;
    const int32_t j = lookup(p, i, &s);
    const acc_t v = i < p.na ? dA[i] : dB[i - p.na];
    atomicAdd(grad + j, static_cast<grad_t>(v * static_cast<acc_t>(s)));
  }
}

// Flattened theta_d index of every element (hashed projection), for the deterministic scatter.
__global__ void __launch_bounds__(kThreads) flat_index_kernel(ProjView p, int32_t* __restrict__ idx) {
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
    float s;
    idx[i] = lookup(p, i, &s);
  }
}

// Deterministic scatter over the elements sorted (stably) by theta_d index: the first thread of
// each run of equal j adds the run's values in element order, so every grad[j] gets exactly the
// sequence of adds the CPU backend's serial scatter performs (bit-identical given dA, dB).
template <typename acc_t, typename grad_t>
__global__ void __launch_bounds__(kThreads) scatter_sorted_kernel(ProjView p, const int32_t* __restrict__ sorted_j,
                                                                  const int64_t* __restrict__ order,
                                                                  const acc_t* __restrict__ dA,
                                                                  const acc_t* __restrict__ dB,
                                                                  grad_t* __restrict__ grad) {
  for (int32_t t = blockIdx.x * blockDim.x + threadIdx.x; t < p.n; t += gridDim.x * blockDim.x) {
    const int32_t j = sorted_j[t];
    if (t > 0 && sorted_j[t - 1] == j) continue;  // not the head of its run
    const acc_t s = static_cast<acc_t>(p.is_hashed ? __ldg(p.scales + (j < p.hash.rem ? 1 : 0)) : __ldg(p.scales + j));
    grad_t g = grad[j];
    for (int32_t u = t; u < p.n && sorted_j[u] == j; ++u) {
      const int32_t i = static_cast<int32_t>(order[u]);
      const acc_t v = i < p.na ? dA[i] : dB[i - p.na];
      g += static_cast<grad_t>(mul_rn(v, s));
    }
    grad[j] = g;
  }
}

// dst (+)= src * keep * scale, computed in fp32 (fp64) and rounded once to dst's dtype.
template <typename D, typename S>
__global__ void __launch_bounds__(kThreads) masked_add_kernel(D* __restrict__ dst, const S* __restrict__ src,
                                                              int64_t n, Dropout dr, bool fresh) {
  using acc_t = typename Acc<S>::type;
  const uint64_t seed = load_seed(dr);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool keep = !dr.active || dropout_keep(seed, static_cast<uint64_t>(e), dr.threshold);
    const acc_t v = keep ? static_cast<acc_t>(src[e]) * static_cast<acc_t>(dr.scale) : acc_t(0);
    dst[e] = fresh ? static_cast<D>(v) : static_cast<D>(static_cast<acc_t>(dst[e]) + v);
  }
}

__global__ void __launch_bounds__(kThreads) hashed_index_kernel(const int64_t* __restrict__ pos,
                                                                int64_t* __restrict__ out, int64_t n,
                                                                HashedProjection hash) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = hashed_index(pos[e], hash);
  }
}

__global__ void __launch_bounds__(kThreads) philox_kernel(const int64_t* __restrict__ off, int64_t* __restrict__ out,
                                                          int64_t n, uint64_t seed) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[e] = philox_randint(seed, static_cast<uint64_t>(off[e]));
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype) {
  const auto opts = theta.options().dtype(dtype);
  at::Tensor A = at::empty({pj.r, pj.in_f}, opts), B = at::empty({pj.out_f, pj.r}, opts);
  const ProjView p = make_view(pj);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_gather_theta", [&] {
    using theta_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unilora_gather", [&] {
      gather_kernel<theta_t, scalar_t><<<grid_for(p.n, kThreads), kThreads, 0, stream>>>(
          p, theta.data_ptr<theta_t>(), A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {A, B};
}

Prepared prepare(const at::Tensor& theta, const Projection& pj, at::ScalarType gt, const at::Tensor* x,
                 const Dropout& dr, const at::Tensor* h, at::Tensor* grad) {
  const auto opts = theta.options().dtype(gt);
  Prepared pr;
  pr.A = at::empty({pj.r, pj.in_f}, opts);
  pr.B = at::empty({pj.out_f, pj.r}, opts);
  const ProjView p = make_view(pj);
  int64_t rows = 0, cols = 0, ldx = 0, nh = 0;
  if (x != nullptr) {
    TORCH_INTERNAL_ASSERT(dr.active && x->dim() == 2 && x->stride(1) == 1 && x->scalar_type() == gt);
    rows = x->size(0);
    cols = x->size(1);
    ldx = x->stride(0);
    pr.xd = at::empty({rows, cols}, opts);
  }
  const at::ScalarType acc = gt == at::kDouble ? at::kDouble : at::kFloat;
  if (h != nullptr) {
    TORCH_INTERNAL_ASSERT(h->is_contiguous() && h->scalar_type() == acc && gt != acc);
    nh = h->numel();
    pr.hg = at::empty(h->sizes(), opts);
  }
  int64_t d = 0;
  if (grad != nullptr) {
    TORCH_INTERNAL_ASSERT(grad->is_contiguous() && grad->scalar_type() == theta.scalar_type());
    d = grad->numel();
  }
  const int64_t work = std::max({static_cast<int64_t>(p.n), rows * cols, nh, d});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "unilora_prepare_theta", [&] {
    using theta_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gt, "unilora_prepare", [&] {
      using acc_t = typename Acc<scalar_t>::type;
      prepare_kernel<theta_t, scalar_t><<<grid_for(work, kThreads), kThreads, 0, stream>>>(
          p, theta.data_ptr<theta_t>(), pr.A.data_ptr<scalar_t>(), pr.B.data_ptr<scalar_t>(),
          x != nullptr ? x->data_ptr<scalar_t>() : nullptr, ldx,
          x != nullptr ? pr.xd.data_ptr<scalar_t>() : nullptr, rows, cols, dr,
          h != nullptr ? h->data_ptr<acc_t>() : nullptr, h != nullptr ? pr.hg.data_ptr<scalar_t>() : nullptr, nh,
          grad != nullptr ? grad->data_ptr<theta_t>() : nullptr, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return pr;
}

void masked_add_(at::Tensor& dst, const at::Tensor& src, const Dropout& dr, bool fresh) {
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && src.is_contiguous() && dst.numel() == src.numel());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "unilora_masked_add_dst", [&] {
    using dst_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.scalar_type(), "unilora_masked_add", [&] {
      masked_add_kernel<dst_t, scalar_t><<<grid_for(dst.numel(), kThreads), kThreads, 0, stream>>>(
          dst.data_ptr<dst_t>(), src.data_ptr<scalar_t>(), dst.numel(), dr, fresh);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda

std::tuple<at::Tensor, at::Tensor> gather_cuda(const at::Tensor& theta, const Projection& pj, at::ScalarType dtype) {
  const c10::cuda::CUDAGuard guard(theta.device());
  return cuda::gather(theta, pj, dtype);
}

namespace cuda {

void scatter_add_(at::Tensor& grad, const at::Tensor& dA, const at::Tensor& dB, const Projection& pj,
                  bool deterministic) {
  TORCH_INTERNAL_ASSERT(grad.is_contiguous() && grad.numel() == pj.d);
  const at::Tensor a = dA.contiguous(), b = dB.contiguous();
  const ProjView p = make_view(pj);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = grid_for(p.n, kThreads);
  if (!deterministic) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unilora_scatter", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "unilora_scatter_grad", [&] {
        scatter_atomic_kernel<acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
            p, a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), grad.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return;
  }
  // Deterministic: the layer's indices (layer-sized), stably sorted, then one run per thread.
  at::Tensor idx;
  if (pj.is_hashed) {
    idx = at::empty({p.n}, dA.options().dtype(at::kInt));
    flat_index_kernel<<<blocks, kThreads, 0, stream>>>(p, idx.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    idx = at::cat({pj.idx_a.reshape(-1), pj.idx_b.reshape(-1)});
  }
  const auto [sorted_j, order] = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unilora_scatter_det", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "unilora_scatter_det_grad", [&] {
      scatter_sorted_kernel<acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          p, sorted_j.data_ptr<int32_t>(), order.data_ptr<int64_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
          grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor device_seed(const at::Tensor& seed, const at::Tensor& x) {
  if (seed.is_cuda()) {
    TORCH_CHECK(seed.device() == x.device(), "unilora: the dropout seed is on ", seed.device(), " but x on ",
                x.device());
    return seed;
  }
  TORCH_CHECK(seed.is_cpu(), "unilora: the dropout seed must be a CPU or CUDA tensor, got one on ", seed.device());
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "unilora: a CPU dropout seed cannot be used during CUDA-graph capture (its copy to the GPU would "
              "not be replayed): draw the seed on the device, e.g. torch.randint(0, 2**62, (1,), device='cuda')");
  return seed.to(x.options().dtype(at::kLong), /*non_blocking=*/true);
}

}  // namespace cuda

at::Tensor scatter_cuda(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, at::ScalarType dtype,
                        bool deterministic) {
  const c10::cuda::CUDAGuard guard(dA.device());
  at::Tensor grad = at::zeros({pj.d}, dA.options().dtype(dtype));
  cuda::scatter_add_(grad, dA, dB, pj, deterministic);
  return grad;
}

at::Tensor hashed_index_cuda(const at::Tensor& positions, const HashedProjection& hash) {
  const c10::cuda::CUDAGuard guard(positions.device());
  at::Tensor out = at::empty_like(positions);
  if (positions.numel() == 0) return out;
  cuda::hashed_index_kernel<<<cuda::grid_for(positions.numel(), cuda::kThreads), cuda::kThreads, 0,
                              at::cuda::getCurrentCUDAStream()>>>(positions.data_ptr<int64_t>(),
                                                                 out.data_ptr<int64_t>(), positions.numel(), hash);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor philox_randint_cuda(const at::Tensor& offsets, uint64_t seed) {
  const c10::cuda::CUDAGuard guard(offsets.device());
  at::Tensor out = at::empty_like(offsets);
  if (offsets.numel() == 0) return out;
  cuda::philox_kernel<<<cuda::grid_for(offsets.numel(), cuda::kThreads), cuda::kThreads, 0,
                        at::cuda::getCurrentCUDAStream()>>>(offsets.data_ptr<int64_t>(), out.data_ptr<int64_t>(),
                                                           offsets.numel(), seed);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace unilora
