// The fused small-M (decode) forward: out += drop(x) A^T B^T for M <= 16 rows in ONE launch,
// A and B gathered from theta_d on the fly (never materialised).
//
// A decode step moves well under a megabyte per layer, so its cost is launches and memory
// latency, not bandwidth. The kernel is cooperative (all blocks co-resident, grid.sync()):
//   phase 1  h partials: warp units of (128 columns of x) x (4 ranks); each lane gathers A for
//            its columns, multiplies by the M rows of x (dropout mask applied on the fly),
//            and the unit's M x 4 sums are reduced across the warp with shuffles and written
//            to a small workspace, one slot per (column chunk, rank, row);
//   phase 1b h = the sum of the partials in chunk order (deterministic), written to h (M x r);
//   phase 2  every block loads h into shared memory; a thread per output feature o gathers
//            B[o, :] and adds h B[o, :]^T into the M outputs of column o (coalesced over o),
//            rounding once to the output dtype.
// The partition depends only on the shape, so results are bit-reproducible run to run.
#include <cooperative_groups.h>

#include <array>
#include <atomic>

#include "cuda_common.cuh"

namespace unilora {
namespace cuda {
namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRanksPerUnit = 4;  // rows of A per phase-1 unit: M x 4 fp32 accumulators per lane
constexpr int kColsPerUnit = 128;  // 4 columns per lane amortise the warp reduction

template <typename T, int MB>
__global__ void __launch_bounds__(kThreads, 1)
    decode_kernel(const T* __restrict__ x, int64_t ldx, T* __restrict__ out, float* __restrict__ h,
                  float* __restrict__ ws, const float* __restrict__ theta, ProjView p, Dropout dr, int M, int in_f,
                  int out_f, int r, int n_chunks) {
  cg::grid_group grid = cg::this_grid();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const float dscale = static_cast<float>(dr.scale);
  const uint64_t seed = load_seed(dr);

  // ---- phase 1: partial h over (column chunk, 4 ranks) units, one unit per warp at a time ----
  const int n_kg = (r + kRanksPerUnit - 1) / kRanksPerUnit;
  const int units = n_chunks * n_kg;
  // Unit u goes to warp (u / gridDim.x) of block (u % gridDim.x): consecutive units land on
  // different SMs.
  for (int u = warp * gridDim.x + blockIdx.x; u < units; u += kWarps * gridDim.x) {
    const int chunk = u / n_kg;
    const int k0 = (u - chunk * n_kg) * kRanksPerUnit;
    float acc[MB][kRanksPerUnit];
#pragma unroll
    for (int m = 0; m < MB; ++m) {
#pragma unroll
      for (int kk = 0; kk < kRanksPerUnit; ++kk) acc[m][kk] = 0.f;
    }
    const int c_end = min(in_f, (chunk + 1) * kColsPerUnit);
    for (int c = chunk * kColsPerUnit + lane; c < c_end; c += 32) {
      float xv[MB];
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        float v = 0.f;
        if (m < M) {
          v = static_cast<float>(x[m * ldx + c]);
          if (dr.active) {
            const uint64_t off = static_cast<uint64_t>(m) * static_cast<uint64_t>(in_f) + c;
            v = dropout_keep(seed, off, dr.threshold) ? v * dscale : 0.f;
          }
        }
        xv[m] = v;
      }
#pragma unroll
      for (int kk = 0; kk < kRanksPerUnit; ++kk) {
        const int k = k0 + kk;
        if (k < r) {
          float s;
          const int32_t j = lookup(p, k * in_f + c, &s);
          const float a = __ldg(theta + j) * s;
#pragma unroll
          for (int m = 0; m < MB; ++m) acc[m][kk] = fmaf(xv[m], a, acc[m][kk]);
        }
      }
    }
    // Warp reduction (M is uniform across the warp, so the guards do not diverge).
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < M) {
#pragma unroll
        for (int kk = 0; kk < kRanksPerUnit; ++kk) {
          float v = acc[m][kk];
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
          acc[m][kk] = v;
        }
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < MB; ++m) {
#pragma unroll
        for (int kk = 0; kk < kRanksPerUnit; ++kk) {
          const int k = k0 + kk;
          if (m < M && k < r) ws[(static_cast<int64_t>(chunk) * r + k) * M + m] = acc[m][kk];
        }
      }
    }
  }
  grid.sync();

  // ---- phase 1b: h[m, k] = sum over chunks of the partials, in chunk order ----
  for (int e = blockIdx.x * kThreads + threadIdx.x; e < M * r; e += gridDim.x * kThreads) {
    const int m = e / r, k = e - m * r;
    float s = 0.f;
    for (int ch = 0; ch < n_chunks; ++ch) s += __ldcg(ws + (static_cast<int64_t>(ch) * r + k) * M + m);
    h[e] = s;
  }
  grid.sync();

  // ---- phase 2: out[m, o] += h[m, :] . B[o, :], one output feature per thread ----
  __shared__ float sh[kDecodeMaxM * kDecodeMaxR];
  for (int e = threadIdx.x; e < M * r; e += kThreads) sh[e] = __ldcg(h + e);  // written by other blocks
  __syncthreads();
  for (int o = blockIdx.x * kThreads + threadIdx.x; o < out_f; o += gridDim.x * kThreads) {
    float acc[MB];
#pragma unroll
    for (int m = 0; m < MB; ++m) acc[m] = 0.f;
    for (int k = 0; k < r; ++k) {
      float s;
      const int32_t j = lookup(p, p.na + o * r + k, &s);
      const float b = __ldg(theta + j) * s;
#pragma unroll
      for (int m = 0; m < MB; ++m) {
        if (m < M) acc[m] = fmaf(sh[m * r + k], b, acc[m]);
      }
    }
#pragma unroll
    for (int m = 0; m < MB; ++m) {
      if (m < M) {
        T* po = out + static_cast<int64_t>(m) * out_f + o;
        *po = static_cast<T>(static_cast<float>(*po) + acc[m]);
      }
    }
  }
}

// Largest co-resident grid of one instantiation on the current device (cached per device).
template <typename T, int MB>
int max_coresident_blocks(int device, int sms) {
  static std::array<std::atomic<int>, 64> cache{};
  if (device < 0 || device >= 64) device = 0;
  int cached = cache[device].load(std::memory_order_relaxed);
  if (cached == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_kernel<T, MB>, kThreads, 0));
    cached = std::max(1, per_sm) * sms;
    cache[device].store(cached, std::memory_order_relaxed);
  }
  return cached;
}

template <typename T, int MB>
void launch(at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const ProjView& p, const Dropout& dr,
            at::Tensor& h, int M, int in_f, int out_f, int r) {
  const int device = x.get_device();
  const cudaDeviceProp* props = at::cuda::getCurrentDeviceProperties();
  const int n_chunks = (in_f + kColsPerUnit - 1) / kColsPerUnit;
  const int units = n_chunks * ((r + kRanksPerUnit - 1) / kRanksPerUnit);
  const int want = std::max({(units + kWarps - 1) / kWarps, (out_f + kThreads - 1) / kThreads, 1});
  const int grid = std::min(want, max_coresident_blocks<T, MB>(device, props->multiProcessorCount));
  at::Tensor ws = at::empty({static_cast<int64_t>(n_chunks) * r * M}, x.options().dtype(at::kFloat));

  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;  // all blocks co-resident: grid.sync() is legal
  attr[0].val.cooperative = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_kernel<T, MB>, x.data_ptr<T>(), x.stride(0), out.data_ptr<T>(),
                                    h.data_ptr<float>(), ws.data_ptr<float>(), theta.data_ptr<float>(), p, dr, M,
                                    in_f, out_f, r, n_chunks));
}

template <typename T>
void launch_bucket(at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const ProjView& p,
                   const Dropout& dr, at::Tensor& h, int M, int in_f, int out_f, int r) {
  // M rounded up to a power of two: the row loops unroll over a compile-time bound.
  if (M <= 1) return launch<T, 1>(out, x, theta, p, dr, h, M, in_f, out_f, r);
  if (M <= 2) return launch<T, 2>(out, x, theta, p, dr, h, M, in_f, out_f, r);
  if (M <= 4) return launch<T, 4>(out, x, theta, p, dr, h, M, in_f, out_f, r);
  if (M <= 8) return launch<T, 8>(out, x, theta, p, dr, h, M, in_f, out_f, r);
  return launch<T, 16>(out, x, theta, p, dr, h, M, in_f, out_f, r);
}

}  // namespace

bool decode_forward(at::Tensor& out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                    const Dropout& dr, at::Tensor& h) {
  const int64_t M = x.size(0);
  const at::ScalarType t = x.scalar_type();
  const bool dtype_ok = (t == at::kHalf || t == at::kBFloat16 || t == at::kFloat) && out.scalar_type() == t &&
                        theta.scalar_type() == at::kFloat;
  if (M < 1 || M > kDecodeMaxM || pj.r > kDecodeMaxR || !dtype_ok) return false;
  if (!at::cuda::getCurrentDeviceProperties()->cooperativeLaunch) return false;
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();  // at most 16 rows
  h = at::empty({M, pj.r}, x.options().dtype(at::kFloat));
  const ProjView p = make_view(pj);
  const int m = static_cast<int>(M), in_f = static_cast<int>(pj.in_f), out_f = static_cast<int>(pj.out_f),
            r = static_cast<int>(pj.r);
  if (t == at::kHalf) {
    launch_bucket<at::Half>(out, xs, theta, p, dr, h, m, in_f, out_f, r);
  } else if (t == at::kBFloat16) {
    launch_bucket<at::BFloat16>(out, xs, theta, p, dr, h, m, in_f, out_f, r);
  } else {
    launch_bucket<float>(out, xs, theta, p, dr, h, m, in_f, out_f, r);
  }
  return true;
}

}  // namespace cuda
}  // namespace unilora
