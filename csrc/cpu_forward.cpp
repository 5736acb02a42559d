// The CPU update out += (x A^T) B^T, with h = x A^T returned for the backward.
//
// A and B are gathered (scaled) from theta_d once per call into one layer-sized buffer; all
// products are BLAS calls (at::mm_out / addmm_, i.e. MKL/OpenBLAS sgemm/dgemm) on row blocks
// that fit in L2, one chunk of blocks per thread. Low-precision activations (fp16/bf16) are
// converted block by block to fp32 because CPU BLAS has no fp16 GEMM with fp32 accumulation
// everywhere; every product then runs in fp32 (fp64 when x, theta or g is fp64) and a
// low-precision output is rounded once. Shapes are chosen for BLAS: r is tiny, so the
// products are written as (r x K) @ (K x rows) rather than (rows x K) @ (K x r), which MKL
// runs several times faster. fp32 calls with unit column strides take the SIMD loops instead,
// and decode-sized calls the paths of cpu_decode.cpp.
#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {

at::Tensor forward_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const Projection& pj,
                       const Dropout& dr) {
  using namespace cpu;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type()});
  const int64_t M = x.size(0), r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  const auto opts = x.options().dtype(cd);
  at::Tensor h = at::empty({M, r}, opts);
  if (M <= kSmallM && !dr.active) {
    forward_small(x, out, theta, pj, h);
    return h;
  }
  const auto [A, B] = gather_cpu(theta, pj, cd);
  if (cd == at::kFloat && x.scalar_type() == cd && out.scalar_type() == cd && !dr.active && x.stride(1) == 1 &&
      out.stride(1) == 1 && simd::available()) {
    simd_adapter_forward(x, A, B, out, h);  // one pass per x row: BLAS runs these r-wide products slowly
    return h;
  }
  const at::Tensor Bt = B.t();
  const bool out_direct = out.scalar_type() == cd;
  const int64_t mb = block_rows(std::max(in_f, out_f), at::elementSize(cd));
  run_chunks((M + mb - 1) / mb, [&](int64_t, int64_t b0, int64_t b1) {
    at::Tensor xbuf = at::empty({mb, in_f}, opts);  // used only for casts / dropout
    at::Tensor hT = at::empty({r, mb}, opts);
    at::Tensor tbuf = out_direct ? at::Tensor() : at::empty({mb, out_f}, opts);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t m0 = b * mb, rows = std::min(mb, M - m0);
      const at::Tensor xb = input_block(x, m0, rows, xbuf, dr, nullptr);
      at::Tensor hTb = hT.narrow(1, 0, rows);
      at::mm_out(hTb, A, xb.t());  // h^T = A x^T: (r x in) @ (in x rows)
      at::Tensor hb = h.narrow(0, m0, rows);
      hb.copy_(hTb.t());
      at::Tensor ob = out.narrow(0, m0, rows);
      if (out_direct) {
        ob.addmm_(hb, Bt);  // out += h B^T, beta = 1: no output-sized temporary
      } else {
        at::Tensor tb = tbuf.narrow(0, 0, rows);
        at::mm_out(tb, hb, Bt);
        ob.add_(tb);  // one rounding to the low-precision output
      }
    }
  });
  return h;
}

}  // namespace unilora
