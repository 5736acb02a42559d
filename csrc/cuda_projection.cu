// CUDA kernels through the projection: gather (merge, export, the cuBLAS paths), the theta_d
// gradient scatter-add (atomic, and a sort-based deterministic variant), dropout, and the
// element-wise test ops that check the header against the Python reference bit for bit.
#include <ATen/Dispatch.h>

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

// A[i] / B[i - na] = theta[j] * scale in the output's accumulation type, rounded once.
template <typename theta_t, typename out_t>
__global__ void __launch_bounds__(kThreads) gather_kernel(ProjView p, const theta_t* __restrict__ theta,
                                                          out_t* __restrict__ A, out_t* __restrict__ B) {
  using acc_t = typename Acc<out_t>::type;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += gridDim.x * blockDim.x) {
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

template <typename T>
__global__ void __launch_bounds__(kThreads) dropout_kernel(const T* __restrict__ x, int64_t ldx, T* __restrict__ xd,
                                                           int64_t rows, int64_t cols, Dropout dr) {
  using acc_t = typename Acc<T>::type;
  const int64_t n = rows * cols;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t m = e / cols, c = e - m * cols;
    const bool keep = dropout_keep(dr.seed, static_cast<uint64_t>(e), dr.threshold);
    xd[e] = keep ? static_cast<T>(static_cast<acc_t>(x[m * ldx + c]) * static_cast<acc_t>(dr.scale)) : T(0);
  }
}

// dst (+)= src * keep * scale, computed in fp32 (fp64) and rounded once to dst's dtype.
template <typename D, typename S>
__global__ void __launch_bounds__(kThreads) masked_add_kernel(D* __restrict__ dst, const S* __restrict__ src,
                                                              int64_t n, Dropout dr, bool fresh) {
  using acc_t = typename Acc<S>::type;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool keep = !dr.active || dropout_keep(dr.seed, static_cast<uint64_t>(e), dr.threshold);
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

at::Tensor dropout(const at::Tensor& x, const Dropout& dr) {
  TORCH_INTERNAL_ASSERT(x.dim() == 2 && x.stride(1) == 1);
  at::Tensor xd = at::empty(x.sizes(), x.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unilora_dropout", [&] {
    dropout_kernel<scalar_t><<<grid_for(x.numel(), kThreads), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x.stride(0), xd.data_ptr<scalar_t>(), x.size(0), x.size(1), dr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return xd;
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

at::Tensor scatter_cuda(const at::Tensor& dA, const at::Tensor& dB, const Projection& pj, at::ScalarType dtype,
                        bool deterministic) {
  const c10::cuda::CUDAGuard guard(dA.device());
  using cuda::kThreads;
  const at::Tensor a = dA.contiguous(), b = dB.contiguous();
  at::Tensor grad = at::zeros({pj.d}, dA.options().dtype(dtype));
  const cuda::ProjView p = cuda::make_view(pj);
  auto stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = cuda::grid_for(p.n, kThreads);
  if (!deterministic) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unilora_scatter", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(dtype, "unilora_scatter_grad", [&] {
        cuda::scatter_atomic_kernel<acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
            p, a.data_ptr<acc_t>(), b.data_ptr<acc_t>(), grad.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return grad;
  }
  // Deterministic: the layer's indices (layer-sized), stably sorted, then one run per thread.
  at::Tensor idx;
  if (pj.is_hashed) {
    idx = at::empty({p.n}, dA.options().dtype(at::kInt));
    cuda::flat_index_kernel<<<blocks, kThreads, 0, stream>>>(p, idx.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    idx = at::cat({pj.idx_a.reshape(-1), pj.idx_b.reshape(-1)});
  }
  const auto [sorted_j, order] = at::sort(idx, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unilora_scatter_det", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(dtype, "unilora_scatter_det_grad", [&] {
      cuda::scatter_sorted_kernel<acc_t, scalar_t><<<blocks, kThreads, 0, stream>>>(
          p, sorted_j.data_ptr<int32_t>(), order.data_ptr<int64_t>(), a.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
          grad.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
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
