// Hand-vectorised CPU loops (see cpu_simd.h for what each computes and why it exists).
//
// Measured at in = out = 1024, r = 4, 2 threads (AMD EPYC): MKL runs the (r x K) @ (K x rows)
// products of the backward at ~13 GFLOP/s (80 us per 4 x 1024 x 128 block) and the fold
// W + B A (K = r) in ~1 ms, where one pass over the data takes ~0.16 ms (data in cache).
#include "cpu_simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define UNILORA_SIMD_X86 1
#include <immintrin.h>
// GCC 12's AVX-512 headers trip -Wuninitialized on their own "undefined" placeholder vectors
// once inlined (GCC bug 105593, fixed in 13): not a problem of this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// Compiled for AVX2+FMA (AVX-512F) whatever the build's -march; only called after available()
// (avx512()).
#define UNILORA_AVX2 __attribute__((target("avx2,fma")))
#define UNILORA_AVX512 __attribute__((target("avx512f,fma")))
// The fold has no reductions: the compiler vectorises one body per ISA, picked at load time.
#define UNILORA_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define UNILORA_CLONES
#endif

namespace unilora {
namespace simd {

namespace {
bool env_is(const char* value) {
  const char* env = std::getenv("UNILORA_CPU_SIMD");
  return env != nullptr && std::strcmp(env, value) == 0;
}
}  // namespace

bool available() {
#ifdef UNILORA_SIMD_X86
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return cpu && !env_is("0");
#else
  return false;
#endif
}

bool avx512() {
#ifdef UNILORA_SIMD_X86
  static const bool cpu = __builtin_cpu_supports("avx512f");
  return cpu && available() && !env_is("avx2");
#else
  return false;
#endif
}

// ---- fold -----------------------------------------------------------------------------------
namespace {

// The update row is summed first (in a row buffer that stays in L1) and added to w once, so w's
// large entries round it once.
template <typename T>
inline __attribute__((always_inline)) void fold_body(const T* __restrict w, int64_t ldw, const T* __restrict s,
                                                     int64_t s_rs, int64_t s_cs, const T* __restrict R, int64_t r,
                                                     int64_t Q, T* __restrict out, int64_t ldo, int64_t p0,
                                                     int64_t p1) {
  std::vector<T> row(static_cast<size_t>(Q));
  T* __restrict t = row.data();
  for (int64_t p = p0; p < p1; ++p) {
    if (p + 1 < p1) {  // the next rows of w and out: each row starts a new page (see Ahead below)
      const char* nw = reinterpret_cast<const char*>(w + (p + 1) * ldw);
      const char* no = reinterpret_cast<const char*>(out + (p + 1) * ldo);
      for (int64_t b = 0; b < Q * static_cast<int64_t>(sizeof(T)); b += 64) {
        __builtin_prefetch(nw + b, 0, 2);
        __builtin_prefetch(no + b, 1, 2);
      }
    }
    const T* sp = s + p * s_rs;
    const T s0 = sp[0];
    for (int64_t q = 0; q < Q; ++q) t[q] = s0 * R[q];
    for (int64_t k = 1; k < r; ++k) {
      const T sk = sp[k * s_cs];
      const T* Rk = R + k * Q;
      for (int64_t q = 0; q < Q; ++q) t[q] += sk * Rk[q];
    }
    const T* wr = w + p * ldw;
    T* o = out + p * ldo;
    for (int64_t q = 0; q < Q; ++q) o[q] = wr[q] + t[q];
  }
}

}  // namespace

UNILORA_CLONES void fold_rows(const float* w, int64_t ldw, const float* s, int64_t s_rs, int64_t s_cs,
                              const float* R, int64_t r, int64_t Q, float* out, int64_t ldo, int64_t p0, int64_t p1) {
  fold_body(w, ldw, s, s_rs, s_cs, R, r, Q, out, ldo, p0, p1);
}

UNILORA_CLONES void fold_rows(const double* w, int64_t ldw, const double* s, int64_t s_rs, int64_t s_cs,
                              const double* R, int64_t r, int64_t Q, double* out, int64_t ldo, int64_t p0,
                              int64_t p1) {
  fold_body(w, ldw, s, s_rs, s_cs, R, r, Q, out, ldo, p0, p1);
}

#ifdef UNILORA_SIMD_X86
namespace {

// Rows [0, rows) of a matrix (row stride ld) that the next block of rows will read: the loop over
// the columns of the current block calls touch(i) once per 16 floats (one 64-byte line) and
// fetches that line of each next row into L2. At 1024 features a row is a 4 KB page, and the
// hardware prefetchers stop at page boundaries, so without this each block of rows starts with
// misses to memory. Measured after a cache flush at 2048 x 1024, 2 threads: theta's gradient
// (gather, adapter backward, scatter) 14% faster with AVX-512, 10% with AVX2, with the next
// block of rows prefetched (one block ahead: as good as two, better than four or eight); the
// fold with its next row prefetched, 0.57 -> 0.50 ms (medians of 60 paired calls).
struct Ahead {
  const float* p = nullptr;
  int64_t ld = 0;
  int rows = 0;
  inline void touch(int64_t i) const {
    for (int m = 0; m < rows; ++m) _mm_prefetch(reinterpret_cast<const char*>(p + m * ld + i), _MM_HINT_T1);
  }
};

UNILORA_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// out[m * ldo + kk] = rows[m, :n] . mat[kk, :n] for m < MR, kk < KN (mat rows n apart).
// MR x KN independent accumulators: each loaded vector feeds several FMAs.
template <int MR, int KN>
UNILORA_AVX2 void dots(const float* rows, int64_t ld, const float* mat, int64_t n, float* out, int64_t ldo,
                       const Ahead& pf = Ahead()) {
  __m256 acc[MR][KN];
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) acc[m][k] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if ((i & 15) == 0) pf.touch(i);
    __m256 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm256_loadu_ps(rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      const __m256 av = _mm256_loadu_ps(mat + k * n + i);
      for (int m = 0; m < MR; ++m) acc[m][k] = _mm256_fmadd_ps(xv[m], av, acc[m][k]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int k = 0; k < KN; ++k) {
      float t = hsum(acc[m][k]);
      for (int64_t j = i; j < n; ++j) t += rows[m * ld + j] * mat[k * n + j];
      out[m * ldo + k] = t;
    }
  }
}

// out[m * ldo + k] = rows[m] . mat[k] for all k < kn, KMAX at a time: MR x KMAX accumulators,
// MR row vectors and one matrix vector must fit the 16 ymm registers (no spills).
template <int MR>
UNILORA_AVX2 void dots_all(const float* rows, int64_t ld, const float* mat, int64_t kn, int64_t n, float* out,
                           int64_t ldo, const Ahead& pf = Ahead()) {
  constexpr int KMAX = MR >= 3 ? 2 : 4;
  const Ahead none;
  int64_t k = 0;
  for (; k + KMAX <= kn; k += KMAX) dots<MR, KMAX>(rows, ld, mat + k * n, n, out + k, ldo, k == 0 ? pf : none);
  for (; k + 2 <= kn; k += 2) dots<MR, 2>(rows, ld, mat + k * n, n, out + k, ldo, k == 0 ? pf : none);
  if (k < kn) dots<MR, 1>(rows, ld, mat + k * n, n, out + k, ldo, k == 0 ? pf : none);
}

// dst[k, :n] += sum_m coef[m * ldc + k] * rows[m, :n] for k < kn (dst rows n apart).
template <int MR>
UNILORA_AVX2 void axpys(const float* rows, int64_t ld, const float* coef, int64_t ldc, int64_t kn, float* dst,
                        int64_t n, const Ahead& pf = Ahead()) {
  const Ahead none;
  for (int64_t k = 0; k < kn; ++k) {
    const Ahead& p = k == 0 ? pf : none;  // the next rows once, on the first pass
    __m256 c[MR];
    for (int m = 0; m < MR; ++m) c[m] = _mm256_set1_ps(coef[m * ldc + k]);
    float* d = dst + k * n;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      if ((i & 15) == 0) p.touch(i);
      __m256 v = _mm256_loadu_ps(d + i);
      for (int m = 0; m < MR; ++m) v = _mm256_fmadd_ps(c[m], _mm256_loadu_ps(rows + m * ld + i), v);
      _mm256_storeu_ps(d + i, v);
    }
    for (; i < n; ++i) {
      float v = d[i];
      for (int m = 0; m < MR; ++m) v += coef[m * ldc + k] * rows[m * ld + i];
      d[i] = v;
    }
  }
}

// gx[m, :n] (= or +=) sum_k u[m * r + k] * A[k, :n] for m < MR.
template <int MR>
UNILORA_AVX2 void grad_rows(const float* u, const float* A, int64_t r, int64_t n, float* gx, int64_t ldgx, bool add) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v[MR];
    for (int m = 0; m < MR; ++m) v[m] = add ? _mm256_loadu_ps(gx + m * ldgx + i) : _mm256_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m256 a = _mm256_loadu_ps(A + k * n + i);
      for (int m = 0; m < MR; ++m) v[m] = _mm256_fmadd_ps(_mm256_broadcast_ss(u + m * r + k), a, v[m]);
    }
    for (int m = 0; m < MR; ++m) _mm256_storeu_ps(gx + m * ldgx + i, v[m]);
  }
  for (; i < n; ++i) {
    for (int m = 0; m < MR; ++m) {
      float v = add ? gx[m * ldgx + i] : 0.f;
      for (int64_t k = 0; k < r; ++k) v += u[m * r + k] * A[k * n + i];
      gx[m * ldgx + i] = v;
    }
  }
}

// MR rows starting at row m: h and u in registers-sized buffers, then the three accumulations.
// The x and g rows (MR x 4 KB at in = out = 1024) stay in L1 between the dots and the axpys.
// The first pass over the block's x (g) rows also prefetches the next `ahead` rows of x (g).
template <int MR>
UNILORA_AVX2 void backward_rows(const AdapterBackward& a, int64_t m, float* hbuf, float* ubuf, int ahead) {
  const float* xr = a.x + m * a.ldx;
  const float* gr = a.g + m * a.ldg;
  Ahead px{xr + MR * a.ldx, a.ldx, ahead}, pg{gr + MR * a.ldg, a.ldg, ahead};
  if (a.dBT != nullptr) {
    const float* hp = hbuf;
    int64_t ldh = a.r;
    if (a.h != nullptr) {
      hp = a.h + m * a.ldh;
      ldh = a.ldh;
    } else {
      dots_all<MR>(xr, a.ldx, a.A, a.r, a.in_f, hbuf, a.r, px);
      px.rows = 0;
    }
    axpys<MR>(gr, a.ldg, hp, ldh, a.r, a.dBT, a.out_f, pg);
    pg.rows = 0;
  }
  if (a.dA == nullptr && a.gx == nullptr) return;
  dots_all<MR>(gr, a.ldg, a.BT, a.r, a.out_f, ubuf, a.r, pg);
  if (a.dA != nullptr) axpys<MR>(xr, a.ldx, ubuf, a.r, a.r, a.dA, a.in_f, px);
  if (a.gx != nullptr) grad_rows<MR>(ubuf, a.A, a.r, a.in_f, a.gx + m * a.ldgx, a.ldgx, a.gx_add);
}

// The update of MR rows: h = x A^T (stored), out += h B^T.
template <int MR>
UNILORA_AVX2 void forward_rows(const AdapterForward& a, int64_t m) {
  float* hp = a.h + m * a.r;
  dots_all<MR>(a.x + m * a.ldx, a.ldx, a.A, a.r, a.in_f, hp, a.r);
  grad_rows<MR>(hp, a.BT, a.r, a.out_f, a.out + m * a.ldo, a.ldo, true);
}

template <int MM>
UNILORA_AVX2 void gemv_impl(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t n, const float* bias,
                            float* out, int64_t ldo, int64_t o0, int64_t o1) {
  constexpr int kRows = MM <= 2 ? 4 : 2;  // weight rows per step: kRows x MM accumulators in registers
  int64_t o = o0;
  for (; o < o1; o += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, o1 - o));
    __m256 acc[kRows][MM];
    for (int q = 0; q < kRows; ++q)
      for (int m = 0; m < MM; ++m) acc[q][m] = _mm256_setzero_ps();
    int64_t i = 0;
    if (rows == kRows) {
      for (; i + 8 <= n; i += 8) {
        __m256 xv[MM];
        for (int m = 0; m < MM; ++m) xv[m] = _mm256_loadu_ps(x + m * ldx + i);
        for (int q = 0; q < kRows; ++q) {
          const __m256 wv = _mm256_loadu_ps(w + (o + q) * ldw + i);
          for (int m = 0; m < MM; ++m) acc[q][m] = _mm256_fmadd_ps(wv, xv[m], acc[q][m]);
        }
      }
    } else {
      for (; i + 8 <= n; i += 8) {
        for (int q = 0; q < rows; ++q) {
          const __m256 wv = _mm256_loadu_ps(w + (o + q) * ldw + i);
          for (int m = 0; m < MM; ++m) acc[q][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + i), acc[q][m]);
        }
      }
    }
    for (int q = 0; q < rows; ++q) {
      const float* wr = w + (o + q) * ldw;
      for (int m = 0; m < MM; ++m) {
        float t = hsum(acc[q][m]);
        for (int64_t j = i; j < n; ++j) t += wr[j] * x[m * ldx + j];
        out[m * ldo + o + q] = (bias != nullptr ? bias[o + q] : 0.f) + t;
      }
    }
  }
}

}  // namespace

// The backward loops again for AVX-512: 32 zmm registers hold 4 rows x 4 columns of r at once,
// so the rank-r updates run with every k in registers (i outer) and tails are masked loads.
// Measured at 2048 x 1024, r = 4, 2 threads (AMD EPYC), data in cache: 0.45-0.6 ms against
// 0.7-1.0 ms for AVX2. (With x and g coming from DRAM, as in the layer benchmark on that VM,
// both took ~1.1 ms, bound by memory; with the next rows prefetched (Ahead) 0.85-1.0 ms.)
namespace z {
// Calls below name z:: explicitly: an Ahead argument (declared in the enclosing namespace) makes
// argument-dependent lookup see the AVX2 templates of the same names as well.

// Sum of the 16 lanes (folding halves; GCC 12's _mm512_reduce_add_ps warns under -Wall).
UNILORA_AVX512 inline float hsum16(__m512 v) {
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
  v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
  __m128 s = _mm512_castps512_ps128(v);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

UNILORA_AVX512 inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
}

// out[m * ldo + k] = rows[m, :n] . mat[k, :n] for m < MR, k < KN.
template <int MR, int KN>
UNILORA_AVX512 void dots(const float* rows, int64_t ld, const float* mat, int64_t n, float* out, int64_t ldo,
                         const Ahead& pf = Ahead()) {
  __m512 acc[MR][KN];
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) acc[m][k] = _mm512_setzero_ps();
  // Full vectors, then one masked tail (masked memory ops cost more on some CPUs).
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    pf.touch(i);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      const __m512 av = _mm512_loadu_ps(mat + k * n + i);
      for (int m = 0; m < MR; ++m) acc[m][k] = _mm512_fmadd_ps(xv[m], av, acc[m][k]);
    }
  }
  if (i < n) {
    const __mmask16 mk = tail_mask(n - i);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      const __m512 av = _mm512_maskz_loadu_ps(mk, mat + k * n + i);
      for (int m = 0; m < MR; ++m) acc[m][k] = _mm512_fmadd_ps(xv[m], av, acc[m][k]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) out[m * ldo + k] = hsum16(acc[m][k]);
}

// dst[k, :n] += sum_m coef[m * ldc + k] * rows[m, :n] for k < KN.
template <int MR, int KN>
UNILORA_AVX512 void axpys(const float* rows, int64_t ld, const float* coef, int64_t ldc, float* dst, int64_t n,
                          const Ahead& pf = Ahead()) {
  __m512 c[MR][KN];
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) c[m][k] = _mm512_set1_ps(coef[m * ldc + k]);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    pf.touch(i);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_loadu_ps(rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      __m512 v = _mm512_loadu_ps(dst + k * n + i);
      for (int m = 0; m < MR; ++m) v = _mm512_fmadd_ps(c[m][k], xv[m], v);
      _mm512_storeu_ps(dst + k * n + i, v);
    }
  }
  if (i < n) {
    const __mmask16 mk = tail_mask(n - i);
    __m512 xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = _mm512_maskz_loadu_ps(mk, rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      __m512 v = _mm512_maskz_loadu_ps(mk, dst + k * n + i);
      for (int m = 0; m < MR; ++m) v = _mm512_fmadd_ps(c[m][k], xv[m], v);
      _mm512_mask_storeu_ps(dst + k * n + i, mk, v);
    }
  }
}

template <int MR>
UNILORA_AVX512 void dots_all(const float* rows, int64_t ld, const float* mat, int64_t kn, int64_t n, float* out,
                             int64_t ldo, const Ahead& pf = Ahead()) {
  const Ahead none;
  for (int64_t k = 0; k < kn; k += 4) {
    const Ahead& p = k == 0 ? pf : none;  // the next rows once, on the first pass
    switch (std::min<int64_t>(4, kn - k)) {
      case 4: z::dots<MR, 4>(rows, ld, mat + k * n, n, out + k, ldo, p); break;
      case 3: z::dots<MR, 3>(rows, ld, mat + k * n, n, out + k, ldo, p); break;
      case 2: z::dots<MR, 2>(rows, ld, mat + k * n, n, out + k, ldo, p); break;
      default: z::dots<MR, 1>(rows, ld, mat + k * n, n, out + k, ldo, p); break;
    }
  }
}

template <int MR>
UNILORA_AVX512 void axpys_all(const float* rows, int64_t ld, const float* coef, int64_t ldc, int64_t kn, float* dst,
                              int64_t n, const Ahead& pf = Ahead()) {
  const Ahead none;
  for (int64_t k = 0; k < kn; k += 4) {
    const Ahead& p = k == 0 ? pf : none;
    switch (std::min<int64_t>(4, kn - k)) {
      case 4: z::axpys<MR, 4>(rows, ld, coef + k, ldc, dst + k * n, n, p); break;
      case 3: z::axpys<MR, 3>(rows, ld, coef + k, ldc, dst + k * n, n, p); break;
      case 2: z::axpys<MR, 2>(rows, ld, coef + k, ldc, dst + k * n, n, p); break;
      default: z::axpys<MR, 1>(rows, ld, coef + k, ldc, dst + k * n, n, p); break;
    }
  }
}

// gx[m, :n] (= or +=) sum_k u[m * r + k] * A[k, :n] for m < MR.
template <int MR>
UNILORA_AVX512 void grad_rows(const float* u, const float* A, int64_t r, int64_t n, float* gx, int64_t ldgx,
                              bool add) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = tail_mask(n - i);
    __m512 v[MR];
    for (int m = 0; m < MR; ++m) v[m] = add ? _mm512_maskz_loadu_ps(mk, gx + m * ldgx + i) : _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512 a = _mm512_maskz_loadu_ps(mk, A + k * n + i);
      for (int m = 0; m < MR; ++m) v[m] = _mm512_fmadd_ps(_mm512_set1_ps(u[m * r + k]), a, v[m]);
    }
    for (int m = 0; m < MR; ++m) _mm512_mask_storeu_ps(gx + m * ldgx + i, mk, v[m]);
  }
}

// Same steps (and prefetches) as the AVX2 backward_rows.
template <int MR>
UNILORA_AVX512 void backward_rows(const AdapterBackward& a, int64_t m, float* hbuf, float* ubuf, int ahead) {
  const float* xr = a.x + m * a.ldx;
  const float* gr = a.g + m * a.ldg;
  Ahead px{xr + MR * a.ldx, a.ldx, ahead}, pg{gr + MR * a.ldg, a.ldg, ahead};
  if (a.dBT != nullptr) {
    const float* hp = hbuf;
    int64_t ldh = a.r;
    if (a.h != nullptr) {
      hp = a.h + m * a.ldh;
      ldh = a.ldh;
    } else {
      z::dots_all<MR>(xr, a.ldx, a.A, a.r, a.in_f, hbuf, a.r, px);
      px.rows = 0;
    }
    z::axpys_all<MR>(gr, a.ldg, hp, ldh, a.r, a.dBT, a.out_f, pg);
    pg.rows = 0;
  }
  if (a.dA == nullptr && a.gx == nullptr) return;
  z::dots_all<MR>(gr, a.ldg, a.BT, a.r, a.out_f, ubuf, a.r, pg);
  if (a.dA != nullptr) z::axpys_all<MR>(xr, a.ldx, ubuf, a.r, a.r, a.dA, a.in_f, px);
  if (a.gx != nullptr) grad_rows<MR>(ubuf, a.A, a.r, a.in_f, a.gx + m * a.ldgx, a.ldgx, a.gx_add);
}

template <int MR>
UNILORA_AVX512 void forward_rows(const AdapterForward& a, int64_t m) {
  float* hp = a.h + m * a.r;
  z::dots_all<MR>(a.x + m * a.ldx, a.ldx, a.A, a.r, a.in_f, hp, a.r);
  grad_rows<MR>(hp, a.BT, a.r, a.out_f, a.out + m * a.ldo, a.ldo, true);
}

}  // namespace z

void adapter_backward(const AdapterBackward& a, int64_t m0, int64_t m1) {
  constexpr int kMR = 4;  // rows per step
  std::vector<float> hbuf(static_cast<size_t>(kMR * a.r)), ubuf(static_cast<size_t>(kMR * a.r));
  const bool wide = avx512();
  for (int64_t m = m0; m < m1; m += kMR) {
    const int64_t rows = std::min<int64_t>(kMR, m1 - m);
    const int ahead = static_cast<int>(std::min<int64_t>(kMR, std::max<int64_t>(0, m1 - m - kMR)));  // next block
    if (wide) {
      switch (rows) {
        case 4: z::backward_rows<4>(a, m, hbuf.data(), ubuf.data(), ahead); break;
        case 3: z::backward_rows<3>(a, m, hbuf.data(), ubuf.data(), ahead); break;
        case 2: z::backward_rows<2>(a, m, hbuf.data(), ubuf.data(), ahead); break;
        default: z::backward_rows<1>(a, m, hbuf.data(), ubuf.data(), ahead); break;
      }
      continue;
    }
    switch (rows) {
      case 4: backward_rows<4>(a, m, hbuf.data(), ubuf.data(), ahead); break;
      case 3: backward_rows<3>(a, m, hbuf.data(), ubuf.data(), ahead); break;
      case 2: backward_rows<2>(a, m, hbuf.data(), ubuf.data(), ahead); break;
      default: backward_rows<1>(a, m, hbuf.data(), ubuf.data(), ahead); break;
    }
  }
}

void adapter_forward(const AdapterForward& a, int64_t m0, int64_t m1) {
  const bool wide = avx512();
  for (int64_t m = m0; m < m1; m += 4) {
    const int64_t rows = std::min<int64_t>(4, m1 - m);
    if (wide) {
      switch (rows) {
        case 4: z::forward_rows<4>(a, m); break;
        case 3: z::forward_rows<3>(a, m); break;
        case 2: z::forward_rows<2>(a, m); break;
        default: z::forward_rows<1>(a, m); break;
      }
      continue;
    }
    switch (rows) {
      case 4: forward_rows<4>(a, m); break;
      case 3: forward_rows<3>(a, m); break;
      case 2: forward_rows<2>(a, m); break;
      default: forward_rows<1>(a, m); break;
    }
  }
}

void gemv_rows(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t mm, int64_t in_f, const float* bias,
               float* out, int64_t ldo, int64_t o0, int64_t o1) {
  switch (mm) {
    case 1: return gemv_impl<1>(w, ldw, x, ldx, in_f, bias, out, ldo, o0, o1);
    case 2: return gemv_impl<2>(w, ldw, x, ldx, in_f, bias, out, ldo, o0, o1);
    case 3: return gemv_impl<3>(w, ldw, x, ldx, in_f, bias, out, ldo, o0, o1);
    default: return gemv_impl<4>(w, ldw, x, ldx, in_f, bias, out, ldo, o0, o1);
  }
}

#else  // no AVX2 kernels in this build: available() is false and callers never get here

void adapter_backward(const AdapterBackward&, int64_t, int64_t) { std::abort(); }
void adapter_forward(const AdapterForward&, int64_t, int64_t) { std::abort(); }
void gemv_rows(const float*, int64_t, const float*, int64_t, int64_t, int64_t, const float*, float*, int64_t, int64_t,
               int64_t) {
  std::abort();
}

#endif

}  // namespace simd
}  // namespace unilora
