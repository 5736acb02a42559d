// From tensors to the pointer-level SIMD loops of cpu_simd.h: the adapter's forward and
// backward over blocks of kSimdRows rows, blocks split between threads (run_chunks).
#include <ATen/record_function.h>

#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {
namespace cpu {

void simd_adapter_forward(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B, at::Tensor& out,
                          at::Tensor& h) {
  RECORD_FUNCTION("unilora_cpu::adapter_forward_simd", std::vector<c10::IValue>());
  const int64_t M = x.size(0);
  const at::Tensor BT = B.t().contiguous();
  simd::AdapterForward a;
  a.x = x.data_ptr<float>();
  a.ldx = x.stride(0);
  a.A = A.data_ptr<float>();
  a.BT = BT.data_ptr<float>();
  a.r = A.size(0);
  a.in_f = A.size(1);
  a.out_f = BT.size(1);
  a.out = out.data_ptr<float>();
  a.ldo = out.stride(0);
  a.h = h.data_ptr<float>();
  run_chunks((M + kSimdRows - 1) / kSimdRows, [&](int64_t, int64_t b0, int64_t b1) {
    simd::adapter_forward(a, b0 * kSimdRows, std::min(M, b1 * kSimdRows));
  });
}

int64_t simd_adapter_backward(const at::Tensor& g, const at::Tensor& x, const at::Tensor& h, const at::Tensor& A,
                              const at::Tensor& BT, const Projection& pj, const at::Tensor& accA,
                              const at::Tensor& accBT, const at::Tensor& gx, bool gx_add, int64_t m0, int64_t m1) {
  RECORD_FUNCTION("unilora_cpu::adapter_backward_simd", std::vector<c10::IValue>());
  const int64_t nblocks = (m1 - m0 + kSimdRows - 1) / kSimdRows;
  return run_chunks(nblocks, [&](int64_t c, int64_t b0, int64_t b1) {
    simd::AdapterBackward a;
    a.x = x.data_ptr<float>();
    a.ldx = x.stride(0);
    a.g = g.data_ptr<float>();
    a.ldg = g.stride(0);
    if (h.defined()) {
      a.h = h.data_ptr<float>();
      a.ldh = h.stride(0);
    }
    a.A = A.data_ptr<float>();
    a.BT = BT.data_ptr<float>();
    a.r = pj.r;
    a.in_f = pj.in_f;
    a.out_f = pj.out_f;
    if (accA.defined()) {
      a.dA = accA[c].data_ptr<float>();
      a.dBT = accBT[c].data_ptr<float>();
    }
    if (gx.defined()) {
      a.gx = gx.data_ptr<float>();
      a.ldgx = gx.stride(0);
      a.gx_add = gx_add;
    }
    simd::adapter_backward(a, m0 + b0 * kSimdRows, std::min(m1, m0 + b1 * kSimdRows));
  });
}

}  // namespace cpu
}  // namespace unilora
