// Hand-vectorised loops of the CPU backend, for the products BLAS runs badly here: the ones
// with a dimension of r (~4) and the M <= 4 decode GEMV fused with the update. Pointer-level
// and single-threaded: callers (cpu_adapter_simd.cpp, cpu_decode.cpp, cpu_fold.cpp) split rows
// between threads.
//
// x86-64 builds carry an AVX2+FMA version (and AVX-512 loops for the update and backward) selected at run
// time (the package is built for the baseline ISA, so the compiler would emit SSE2 only);
// `available()` / `avx512()` say what runs here.
// Elsewhere, or with UNILORA_CPU_SIMD=0, callers use their BLAS path instead.
#pragma once

#include <cstdint>

namespace unilora {
namespace simd {

// True when the AVX2+FMA kernels can run on this CPU and UNILORA_CPU_SIMD is not "0".
bool available();
// True when adapter_forward / adapter_backward use their AVX-512 loops: available(), the CPU has AVX-512F, and
// UNILORA_CPU_SIMD is not "avx2" (which keeps every kernel on AVX2, e.g. to test that path).
bool avx512();

// out[p, :Q] = w[p, :Q] + sum_k s[p * s_rs + k * s_cs] * R[k, :Q] for p in [p0, p1): the fold
// W + B A (s = B, R = A) or, for the (in, out) layout, W + A^T B^T (s = A^T, R = B^T).
// R is (r x Q) row-major. Any ISA (the compiler vectorises it; no reductions).
void fold_rows(const float* w, int64_t ldw, const float* s, int64_t s_rs, int64_t s_cs, const float* R,
               int64_t r, int64_t Q, float* out, int64_t ldo, int64_t p0, int64_t p1);
void fold_rows(const double* w, int64_t ldw, const double* s, int64_t s_rs, int64_t s_cs, const double* R,
               int64_t r, int64_t Q, double* out, int64_t ldo, int64_t p0, int64_t p1);

// The adapter's backward over rows [m0, m1) of x (M x in) and g (M x out), fp32, unit column
// stride: with h = x A^T (or the given h) and u = g B,
//   dA (r x in)   += u^T x          (when dA)
//   dBT (r x out) += h^T g          (when dBT)
//   gx[m, :]  (=, or += when gx_add) u[m] A   (when gx)
// dA, dBT and gx rows must not be written by another thread meanwhile. Needs available().
struct AdapterBackward {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* g = nullptr;
  int64_t ldg = 0;
  const float* h = nullptr;  // (M x r) with row stride ldh, or nullptr: computed from x
  int64_t ldh = 0;
  const float* A = nullptr;   // (r x in) row-major
  const float* BT = nullptr;  // (r x out) row-major
  int64_t r = 0, in_f = 0, out_f = 0;
  float* dA = nullptr;
  float* dBT = nullptr;
  float* gx = nullptr;
  int64_t ldgx = 0;
  bool gx_add = false;
};
void adapter_backward(const AdapterBackward& a, int64_t m0, int64_t m1);

// The update over rows [m0, m1), fp32, unit column strides: h[m] = x[m] A^T (stored, h is
// (M x r) contiguous) and out[m, :] += h[m] B^T. Needs available().
struct AdapterForward {
  const float* x = nullptr;
  int64_t ldx = 0;
  const float* A = nullptr;   // (r x in) row-major
  const float* BT = nullptr;  // (r x out) row-major
  int64_t r = 0, in_f = 0, out_f = 0;
  float* out = nullptr;
  int64_t ldo = 0;
  float* h = nullptr;
};
void adapter_forward(const AdapterForward& a, int64_t m0, int64_t m1);

// out[m, o] = bias[o] + w[o, :] . x[m, :] for m < mm (<= 4) and o in [o0, o1); w is (out x in)
// with row stride ldw; bias may be nullptr. Needs available().
void gemv_rows(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t mm, int64_t in_f,
               const float* bias, float* out, int64_t ldo, int64_t o0, int64_t o1);

}  // namespace simd
}  // namespace unilora
