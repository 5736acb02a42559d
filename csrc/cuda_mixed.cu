// Mixed batches on CUDA: every row reads the adapter of its sequence (theta_d, a row of the
// adapter table, or none), one launch per layer and direction.
//
// One block per row, A and B gathered on the fly through the projection (never materialised):
//   forward   h = drop(x) A^T: the row's x staged in shared memory tile by tile (dropout drawn
//             once per element), each warp owns ranks warp, warp + 8, ... and reduces them with
//             shuffles; then a thread per output feature adds h B[o, :]^T, rounding once.
//   backward  h as above and u = g B (warp per rank over the output features); a thread per
//             column writes grad_x = (u A) * mask and adds dA = u^T drop(x) through P; then a
//             thread per element of B adds dB = g^T h. The theta gradients are atomics into
//             compute-precision buffers (theta's (d,), the table's (capacity, d)), so the
//             summation order is not fixed: deterministic mode is refused for them.
// The theta source's dtype (fp32/fp64 theta, fp32/fp64/fp16/bf16 table) is a run-time tag that
// is uniform per block, so one instantiation per activation dtype serves every table dtype.
#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_common.cuh"

namespace unilora {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRanksPerWarp = (kDecodeMaxR + kWarps - 1) / kWarps;
constexpr int kTile = 1024;  // columns of x staged in shared memory per step

enum SourceKind : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

int kind_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: TORCH_CHECK(false, "unilora: unsupported theta/table dtype ", t);
  }
}

// Element j of an adapter's theta in the compute precision.
template <typename acc_t>
__device__ __forceinline__ acc_t load_theta(const void* p, int kind, int32_t j) {
  switch (kind) {
    case kF32: return static_cast<acc_t>(__ldg(static_cast<const float*>(p) + j));
    case kF64: return static_cast<acc_t>(__ldg(static_cast<const double*>(p) + j));
    case kF16: return static_cast<acc_t>(__half2float(static_cast<const __half*>(p)[j]));
    default: return static_cast<acc_t>(__bfloat162float(static_cast<const __nv_bfloat16*>(p)[j]));
  }
}

// The adapter sources of a call, and which one row m reads.
struct Sources {
  const void* theta;
  const void* table;
  int theta_kind, table_kind;
  int64_t table_row_bytes;  // d * element size of the table
  const int32_t* seq;       // (S,)
  int64_t rows_per_seq;     // M / S
  int32_t capacity;
};

// The adapter id of row m (-1: none) and, for id >= 0, its theta pointer and dtype tag.
__device__ __forceinline__ int row_adapter(const Sources& s, int64_t m, const void** th, int* kind) {
  const int a = s.seq[m / s.rows_per_seq];
  CUDA_KERNEL_ASSERT(a >= -1 && a <= s.capacity && "unilora: seq_adapter entry outside [-1, capacity]");
  if (a == 0) {
    *th = s.theta;
    *kind = s.theta_kind;
  } else if (a > 0) {
    *th = static_cast<const char*>(s.table) + (a - 1) * s.table_row_bytes;
    *kind = s.table_kind;
  }
  return a;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// hs[k] = drop(x[m]) . A[k, :] for k < r, by the whole block (ends with __syncthreads).
template <typename x_t, typename acc_t>
__device__ void row_h(const x_t* __restrict__ xrow, int64_t m, int in_f, int r, const ProjView& p, const void* th,
                      int kind, const Dropout& dr, acc_t* xs, acc_t* hs) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const acc_t dscale = static_cast<acc_t>(dr.scale);
  const uint64_t seed = load_seed(dr);
  acc_t acc[kRanksPerWarp];
#pragma unroll
  for (int kk = 0; kk < kRanksPerWarp; ++kk) acc[kk] = acc_t(0);
  for (int c0 = 0; c0 < in_f; c0 += kTile) {
    const int c1 = min(in_f, c0 + kTile);
    __syncthreads();  // the previous tile is consumed
    for (int c = c0 + threadIdx.x; c < c1; c += kThreads) {
      acc_t v = static_cast<acc_t>(xrow[c]);
      if (dr.active) {
        const uint64_t off = static_cast<uint64_t>(m) * static_cast<uint64_t>(in_f) + c;
        v = dropout_keep(seed, off, dr.threshold) ? v * dscale : acc_t(0);
      }
      xs[c - c0] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kRanksPerWarp; ++kk) {
      const int k = warp + kk * kWarps;
      if (k < r) {
        for (int c = c0 + lane; c < c1; c += 32) {
          float s;
          const int32_t j = lookup(p, k * in_f + c, &s);
          acc[kk] += xs[c - c0] * (load_theta<acc_t>(th, kind, j) * static_cast<acc_t>(s));
        }
      }
    }
  }
#pragma unroll
  for (int kk = 0; kk < kRanksPerWarp; ++kk) {
    const int k = warp + kk * kWarps;
    const acc_t v = warp_sum(acc[kk]);  // k is warp-uniform: no divergence around the shuffles
    if (k < r && lane == 0) hs[k] = v;
  }
  __syncthreads();
}

// Min 1 block per SM: with the seed loaded in row_h, ptxas otherwise kept the fp32 variants at 48
// registers with 12-byte spills (sm_80 and sm_90).
template <typename x_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1) mixed_forward_kernel(const x_t* __restrict__ x, int64_t ldx,
                                                                  x_t* __restrict__ out, Sources src, ProjView p,
                                                                  Dropout dr, int in_f, int out_f, int r) {
  const int64_t m = blockIdx.x;
  const void* th = nullptr;
  int kind = 0;
  if (row_adapter(src, m, &th, &kind) < 0) return;  // the whole block leaves: no barrier is skipped
  __shared__ acc_t xs[kTile];
  __shared__ acc_t hs[kDecodeMaxR];
  row_h(x + m * ldx, m, in_f, r, p, th, kind, dr, xs, hs);
  x_t* orow = out + m * out_f;
  for (int o = threadIdx.x; o < out_f; o += kThreads) {
    acc_t acc = acc_t(0);
    for (int k = 0; k < r; ++k) {
      float s;
      const int32_t j = lookup(p, p.na + o * r + k, &s);
      acc += hs[k] * (load_theta<acc_t>(th, kind, j) * static_cast<acc_t>(s));
    }
    orow[o] = static_cast<x_t>(static_cast<acc_t>(orow[o]) + acc);
  }
}

// Min 1 block per SM: ptxas otherwise kept the fp64 variants at 64 registers and spilled.
template <typename x_t, typename acc_t>
__global__ void __launch_bounds__(kThreads, 1)
    mixed_backward_kernel(const x_t* __restrict__ g, int64_t ldg, const x_t* __restrict__ x, int64_t ldx,
                          x_t* __restrict__ gx, acc_t* __restrict__ gtheta, acc_t* __restrict__ gtable, int64_t d,
                          Sources src, ProjView p, Dropout dr, int in_f, int out_f, int r, bool need_x,
                          bool need_theta) {
  const int64_t m = blockIdx.x;
  const void* th = nullptr;
  int kind = 0;
  const int a = row_adapter(src, m, &th, &kind);
  if (a < 0) return;  // grad_x rows of base sequences stay zero
  __shared__ acc_t xs[kTile];
  __shared__ acc_t hs[kDecodeMaxR];
  __shared__ acc_t us[kDecodeMaxR];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const x_t* grow = g + m * ldg;
  const x_t* xrow = x + m * ldx;
  if (need_theta) row_h(xrow, m, in_f, r, p, th, kind, dr, xs, hs);
  // u = g B: a warp per rank, lanes over the output features.
  for (int k = warp; k < r; k += kWarps) {
    acc_t acc = acc_t(0);
    for (int o = lane; o < out_f; o += 32) {
      float s;
      const int32_t j = lookup(p, p.na + o * r + k, &s);
      acc += static_cast<acc_t>(grow[o]) * (load_theta<acc_t>(th, kind, j) * static_cast<acc_t>(s));
    }
    acc = warp_sum(acc);
    if (lane == 0) us[k] = acc;
  }
  __syncthreads();
  acc_t* grad = a == 0 ? gtheta : gtable + (a - 1) * d;
  const acc_t dscale = static_cast<acc_t>(dr.scale);
  const uint64_t seed = load_seed(dr);
  // grad_x[m, c] = (u A[:, c]) * mask and dA[:, c] += u x[m, c] * mask, one column per thread.
  for (int c = threadIdx.x; c < in_f; c += kThreads) {
    acc_t keep = acc_t(1);
    if (dr.active) {
      const uint64_t off = static_cast<uint64_t>(m) * static_cast<uint64_t>(in_f) + c;
      keep = dropout_keep(seed, off, dr.threshold) ? dscale : acc_t(0);
    }
    const acc_t xd = static_cast<acc_t>(xrow[c]) * keep;
    acc_t t = acc_t(0);
    for (int k = 0; k < r; ++k) {
      float s;
      const int32_t j = lookup(p, k * in_f + c, &s);
      if (need_x) t += us[k] * (load_theta<acc_t>(th, kind, j) * static_cast<acc_t>(s));
      if (need_theta) atomicAdd(grad + j, static_cast<acc_t>(s) * (us[k] * xd));
    }
    if (need_x) gx[m * in_f + c] = static_cast<x_t>(t * keep);
  }
  if (!need_theta) return;
  // dB[o, k] += g[m, o] h[k], one element of B per thread.
  for (int e = threadIdx.x; e < out_f * r; e += kThreads) {
    const int o = e / r, k = e - o * r;
    float s;
    const int32_t j = lookup(p, p.na + e, &s);
    atomicAdd(grad + j, static_cast<acc_t>(s) * (static_cast<acc_t>(grow[o]) * hs[k]));
  }
}

Sources make_sources(const at::Tensor& theta, const at::Tensor& table, const at::Tensor& seq, int64_t M) {
  Sources s{};
  s.theta = theta.data_ptr();
  s.table = table.data_ptr();
  s.theta_kind = kind_of(theta.scalar_type());
  s.table_kind = kind_of(table.scalar_type());
  s.table_row_bytes = table.size(1) * table.element_size();
  s.seq = seq.data_ptr<int32_t>();
  s.rows_per_seq = M / seq.numel();
  s.capacity = static_cast<int32_t>(table.size(0));
  return s;
}

void check_rank(const Projection& pj) {
  TORCH_CHECK(pj.r <= kDecodeMaxR, "unilora: the cuda mixed-batch kernels take r <= ", kDecodeMaxR, ", got r = ",
              pj.r, " (use the triton or reference backend)");
  TORCH_CHECK(pj.in_f < (int64_t(1) << 31) && pj.out_f < (int64_t(1) << 31), "unilora: layer too wide");
}

// f(x_t{}, acc_t{}) for x's dtype and the compute precision (fp64 when any operand is).
template <typename F>
void dispatch_mixed(at::ScalarType xt, at::ScalarType cd, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "unilora_mixed_cuda", [&] {
    using x_t = scalar_t;
    if (cd == at::kDouble) {
      f(x_t{}, double{});
    } else if constexpr (!std::is_same<x_t, double>::value) {
      f(x_t{}, float{});
    }
  });
}

}  // namespace
}  // namespace cuda

void mixed_forward_cuda(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
                        const at::Tensor& seq_adapter, const Projection& pj, const Dropout& dr) {
  using namespace cuda;
  check_rank(pj);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0);
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor seq = seq_adapter.contiguous();
  const Sources src = make_sources(theta, table, seq, M);
  const ProjView p = make_view(pj);
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), table.scalar_type()});
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_mixed(x.scalar_type(), cd, [&](auto xv, auto av) {
    using x_t = decltype(xv);
    using acc_t = decltype(av);
    mixed_forward_kernel<x_t, acc_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
        xs.data_ptr<x_t>(), xs.stride(0), out.data_ptr<x_t>(), src, p, dr, static_cast<int>(pj.in_f),
        static_cast<int>(pj.out_f), static_cast<int>(pj.r));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_backward_cuda(const at::Tensor& g, const at::Tensor& x,
                                                                   const at::Tensor& theta, const at::Tensor& table,
                                                                   const at::Tensor& seq_adapter, const Projection& pj,
                                                                   const Dropout& dr, bool need_x, bool need_theta,
                                                                   bool deterministic) {
  using namespace cuda;
  check_rank(pj);
  TORCH_CHECK(!(need_theta && deterministic),
              "unilora: the cuda mixed-batch backward adds theta/table gradients with atomics and has no "
              "deterministic mode; turn off torch.use_deterministic_algorithms / UNILORA_DETERMINISTIC for it, or run "
              "the cpu or reference backend");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), d = pj.d;
  const at::ScalarType cd =
      compute_dtype({x.scalar_type(), g.scalar_type(), theta.scalar_type(), table.scalar_type()});
  const auto opts = x.options().dtype(cd);
  at::Tensor gx = need_x ? at::zeros({M, pj.in_f}, x.options()) : at::empty({0}, x.options());
  at::Tensor acc_theta = need_theta ? at::zeros({d}, opts) : at::empty({0}, opts);
  at::Tensor acc_table = need_theta ? at::zeros({table.size(0), d}, opts) : at::empty({0}, opts);
  if (need_x || need_theta) {
    const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
    const at::Tensor gs = (g.stride(1) == 1 ? g : g.contiguous()).to(x.scalar_type());
    const at::Tensor seq = seq_adapter.contiguous();
    const Sources src = make_sources(theta, table, seq, M);
    const ProjView p = make_view(pj);
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_mixed(x.scalar_type(), cd, [&](auto xv, auto av) {
      using x_t = decltype(xv);
      using acc_t = decltype(av);
      mixed_backward_kernel<x_t, acc_t><<<static_cast<unsigned>(M), kThreads, 0, stream>>>(
          gs.data_ptr<x_t>(), gs.stride(0), xs.data_ptr<x_t>(), xs.stride(0),
          need_x ? gx.data_ptr<x_t>() : nullptr, need_theta ? acc_theta.data_ptr<acc_t>() : nullptr,
          need_theta ? acc_table.data_ptr<acc_t>() : nullptr, d, src, p, dr, static_cast<int>(pj.in_f),
          static_cast<int>(pj.out_f), static_cast<int>(pj.r), need_x, need_theta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  at::Tensor gtheta = !need_theta ? at::empty({0}, theta.options())
                      : acc_theta.scalar_type() == theta.scalar_type() ? acc_theta
                                                                       : acc_theta.to(theta.scalar_type());
  at::Tensor gtable = !need_theta ? at::empty({0}, table.options())
                      : acc_table.scalar_type() == table.scalar_type() ? acc_table
                                                                       : acc_table.to(table.scalar_type());
  return {gx, gtheta, gtable};
}

}  // namespace unilora
