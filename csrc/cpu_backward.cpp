// The CPU backward of the update: grad_x (+)= ((g B) A) * mask and grad_theta = P^T [dA | dB]
// with dA = (g B)^T drop(x), dB = g^T h. BLAS on row blocks (as cpu_forward.cpp), or one SIMD
// pass per row block for fp32 without dropout. Per-chunk partial dA / dB^T are reduced in chunk
// order, so the result does not depend on scheduling.
#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {
namespace cpu {
namespace {

// grad_theta = P^T [dA | dB] from the per-chunk partials (summed in chunk order).
at::Tensor theta_grad(const at::Tensor& accA, const at::Tensor& accBT, int64_t nchunks, const Projection& pj,
                      const at::Tensor& theta) {
  const at::Tensor dA = nchunks == 1 ? accA[0] : accA.narrow(0, 0, nchunks).sum(0);
  const at::Tensor dBT = nchunks == 1 ? accBT[0] : accBT.narrow(0, 0, nchunks).sum(0);
  return scatter_cpu(dA, dBT.t(), pj, theta.scalar_type(), true);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> backward_gathered(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                     const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                     c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                     const at::Tensor& A, const at::Tensor& B) {
  const at::ScalarType cd = A.scalar_type();
  const at::Tensor Bt = B.t();
  const int64_t M = x.size(0), r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  const auto opts = x.options().dtype(cd);
  // An empty h (the fused linear op does not keep one) is recomputed block by block from the
  // x block the dA product reads anyway.
  const bool recompute_h = need_theta && h.size(0) != M;
  const at::Tensor hc = recompute_h || h.scalar_type() == cd ? h : h.to(cd);
  const bool fresh_gx = need_x && !grad_x.has_value();
  at::Tensor gx;
  if (need_x) gx = fresh_gx ? at::empty({M, in_f}, x.options()) : *grad_x;
  const bool gx_direct = need_x && gx.scalar_type() == cd && !dr.active;
  const bool simd_path = cd == at::kFloat && x.scalar_type() == cd && g.scalar_type() == cd && !dr.active &&
                         x.stride(1) == 1 && g.stride(1) == 1 && (recompute_h || !need_theta || hc.stride(1) == 1) &&
                         (!need_x || gx.stride(1) == 1) && simd::available();
  const int64_t mb = simd_path ? kSimdRows : block_rows(std::max(in_f, out_f), at::elementSize(cd));
  const int64_t nblocks = (M + mb - 1) / mb;
  const int64_t nchunks_max = std::max<int64_t>(1, std::min<int64_t>(nblocks, at::get_num_threads()));
  // Per-chunk partial dA (r x in) and dB^T (r x out): layer-sized, reduced in chunk order below.
  at::Tensor accA = need_theta ? at::zeros({nchunks_max, r, in_f}, opts) : at::Tensor();
  at::Tensor accBT = need_theta ? at::zeros({nchunks_max, r, out_f}, opts) : at::Tensor();
  int64_t nchunks;
  if (simd_path) {
    nchunks = simd_adapter_backward(g, x, need_theta && !recompute_h ? hc : at::Tensor(), A, B.t().contiguous(), pj,
                                    accA, accBT, need_x ? gx : at::Tensor(), !fresh_gx, 0, M);
  } else {
    nchunks = run_chunks(nblocks, [&](int64_t c, int64_t b0, int64_t b1) {
      at::Tensor gbuf = at::empty({mb, out_f}, opts);
      at::Tensor xbuf = at::empty({mb, in_f}, opts);
      at::Tensor gBT = at::empty({r, mb}, opts);
      at::Tensor hT = recompute_h ? at::empty({r, mb}, opts) : at::Tensor();
      at::Tensor tbuf = need_x && !gx_direct ? at::empty({mb, in_f}, opts) : at::Tensor();
      at::Tensor mask = dr.active ? at::empty({mb, in_f}, x.options().dtype(at::kByte)) : at::Tensor();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t m0 = b * mb, rows = std::min(mb, M - m0);
        at::Tensor gb = g.narrow(0, m0, rows);
        if (g.scalar_type() != cd) {
          gbuf.narrow(0, 0, rows).copy_(gb);
          gb = gbuf.narrow(0, 0, rows);
        }
        at::Tensor gBTb = gBT.narrow(1, 0, rows);
        at::mm_out(gBTb, Bt, gb.t());  // (g B)^T = B^T g^T: (r x out) @ (out x rows)
        bool have_mask = false;
        if (need_theta) {
          const at::Tensor xb = input_block(x, m0, rows, xbuf, dr, dr.active ? mask.data_ptr<uint8_t>() : nullptr);
          have_mask = dr.active;
          at::Tensor hTb;
          if (recompute_h) {
            hTb = hT.narrow(1, 0, rows);
            at::mm_out(hTb, A, xb.t());  // h^T = A drop(x)^T
          } else {
            hTb = hc.narrow(0, m0, rows).t();
          }
          accBT[c].addmm_(hTb, gb);   // dB^T += h^T g
          accA[c].addmm_(gBTb, xb);   // dA += (g B)^T drop(x)
        }
        if (need_x) {
          at::Tensor gxb = gx.narrow(0, m0, rows);
          if (gx_direct) {
            if (fresh_gx) {
              at::mm_out(gxb, gBTb.t(), A);
            } else {
              gxb.addmm_(gBTb.t(), A);  // grad_x += (g B) A in place
            }
            continue;
          }
          at::Tensor tb = tbuf.narrow(0, 0, rows);
          at::mm_out(tb, gBTb.t(), A);
          if (dr.active) drop_rows(tb, m0, dr, have_mask ? mask.data_ptr<uint8_t>() : nullptr);
          if (fresh_gx) {
            gxb.copy_(tb);
          } else {
            gxb.add_(tb);
          }
        }
      }
    });
  }
  const at::Tensor grad_theta =
      need_theta ? theta_grad(accA, accBT, nchunks, pj, theta) : at::empty({0}, theta.options());
  at::Tensor gx_out = fresh_gx ? gx : at::empty({0}, x.options());
  return {gx_out, grad_theta};
}

}  // namespace cpu

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta,
                                                const Projection& pj, const Dropout& dr, const at::Tensor& h,
                                                c10::optional<at::Tensor> grad_x, bool need_x, bool need_theta,
                                                bool /*deterministic*/) {
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), g.scalar_type()});
  const auto [A, B] = gather_cpu(theta, pj, cd);
  return cpu::backward_gathered(g, x, theta, pj, dr, h, std::move(grad_x), need_x, need_theta, A, B);
}

}  // namespace unilora
