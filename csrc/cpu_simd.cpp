// Hand-vectorised CPU loops (see cpu_simd.h for what each computes and why it exists).
//
// The loops are written once, as templates over an ISA-traits type (Avx2, Avx512: the vector
// type, its width, load/store/fma/hsum and how a row's tail is done), and instantiated inside
// one entry function per ISA that carries the ISA's target attribute and inlines them all
// (`flatten`): GCC and clang cannot give a template a target that depends on its parameter.
#include "cpu_simd.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define UNILORA_SIMD_X86 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wuninitialized on their own "undefined" placeholder vectors
// once inlined (GCC bug 105593, fixed in 13): not a problem of this code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// The ISA-generic templates pass vectors to the traits' functions; compiled on their own (for the
// baseline ISA) that would be a different ABI, but they only ever run inlined into an entry below.
#pragma GCC diagnostic ignored "-Wpsabi"
// Compiled for AVX2+FMA (AVX-512F) whatever the build's -march; only called after available()
// (avx512()).
#define UNILORA_AVX2 __attribute__((target("avx2,fma")))
#define UNILORA_AVX512 __attribute__((target("avx512f,fma")))
// An ISA entry: everything it calls is inlined into it, so compiled for its target.
#define UNILORA_ENTRY __attribute__((flatten))
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

// ---- ISA traits ----------------------------------------------------------------------------
// kMaskedTail: a row's last partial vector is one masked vector (AVX-512: Mask, tail_mask,
// load_tail, store_tail), else scalar code.
// kAxpyK: columns of r per pass of axpys (AVX2's 16 registers hold MR row vectors and MR
// coefficients for one; AVX-512's 32 hold them for four).
// dots_k(MR): columns of r per pass of dots (MR x k accumulators, MR row vectors and one
// matrix vector must fit the registers: no spills).
struct Avx2 {
  using Vec = __m256;
  static constexpr int64_t kWidth = 8;
  static constexpr bool kMaskedTail = false;
  static constexpr int kAxpyK = 1;
  static constexpr int dots_k(int mr) { return mr >= 3 ? 2 : 4; }
  UNILORA_AVX2 static inline Vec zero() { return _mm256_setzero_ps(); }
  UNILORA_AVX2 static inline Vec set1(float v) { return _mm256_set1_ps(v); }
  UNILORA_AVX2 static inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
  UNILORA_AVX2 static inline void store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  UNILORA_AVX2 static inline Vec fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  UNILORA_AVX2 static inline float hsum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

struct Avx512 {
  using Vec = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kWidth = 16;
  static constexpr bool kMaskedTail = true;
  static constexpr int kAxpyK = 4;
  static constexpr int dots_k(int) { return 4; }
  UNILORA_AVX512 static inline Vec zero() { return _mm512_setzero_ps(); }
  UNILORA_AVX512 static inline Vec set1(float v) { return _mm512_set1_ps(v); }
  UNILORA_AVX512 static inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
  UNILORA_AVX512 static inline void store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  UNILORA_AVX512 static inline Vec fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  // Sum of the 16 lanes (folding halves; GCC 12's _mm512_reduce_add_ps warns under -Wall).
  UNILORA_AVX512 static inline float hsum(Vec v) {
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 s = _mm512_castps512_ps128(v);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // The first `left` (< 16) lanes.
  UNILORA_AVX512 static inline Mask tail_mask(int64_t left) { return static_cast<Mask>((1u << left) - 1u); }
  UNILORA_AVX512 static inline Vec load_tail(Mask mk, const float* p) { return _mm512_maskz_loadu_ps(mk, p); }
  UNILORA_AVX512 static inline void store_tail(Mask mk, float* p, Vec v) { _mm512_mask_storeu_ps(p, mk, v); }
};

// Rows [0, rows) of a matrix (row stride ld) that the next block of rows will read: the loop over
// the columns of the current block calls touch(i) once per 16 floats (one 64-byte line) and
// fetches that line of each next row into L2. At 1024 features a row is a 4 KB page, and the
// hardware prefetchers stop at page boundaries, so without this each block of rows starts with
// misses to memory. One block ahead is enough.
struct Ahead {
  const float* p = nullptr;
  int64_t ld = 0;
  int rows = 0;
  inline void touch(int64_t i) const {
    for (int m = 0; m < rows; ++m) _mm_prefetch(reinterpret_cast<const char*>(p + m * ld + i), _MM_HINT_T1);
  }
};

template <int N>
using Int = std::integral_constant<int, N>;

// Where one step of a loop below reads and writes: whole vectors (FullLanes), or the first
// lanes of a row's last partial vector (TailLanes, ISAs with kMaskedTail only).
template <class V>
struct FullLanes {
  typename V::Vec load(const float* p) const { return V::load(p); }
  void store(float* p, typename V::Vec v) const { V::store(p, v); }
};
template <class V>
struct TailLanes {
  typename V::Mask mask;
  typename V::Vec load(const float* p) const { return V::load_tail(mask, p); }
  void store(float* p, typename V::Vec v) const { V::store_tail(mask, p, v); }
};

// f(k, Int<KN>()) for k = 0, KMAX, 2 KMAX, ... < kn, KN = min(KMAX, kn - k): the columns of r
// in groups whose width is a compile-time constant (accumulators in registers).
template <int KMAX, typename F>
inline void column_groups(int64_t kn, const F& f) {
  static_assert(KMAX >= 1 && KMAX <= 4, "column groups of 1 to 4");
  for (int64_t k = 0; k < kn; k += KMAX) {
    switch (std::min<int64_t>(KMAX, kn - k)) {
      case 4: if constexpr (KMAX >= 4) f(k, Int<4>()); break;
      case 3: if constexpr (KMAX >= 3) f(k, Int<3>()); break;
      case 2: if constexpr (KMAX >= 2) f(k, Int<2>()); break;
      default: f(k, Int<1>()); break;
    }
  }
}

// step(lanes, i) over the vectors of a row of n floats: whole vectors, touching pf once per
// 64-byte line, then on ISAs with kMaskedTail the last partial vector. Returns where the
// scalar tail (of the other ISAs) starts.
template <class V, class Step>
inline int64_t over_vectors(int64_t n, const Ahead& pf, const Step& step) {
  int64_t i = 0;
  for (; i + V::kWidth <= n; i += V::kWidth) {
    if ((i & 15) == 0) pf.touch(i);
    step(FullLanes<V>(), i);
  }
  if constexpr (V::kMaskedTail) {
    if (i < n) step(TailLanes<V>{V::tail_mask(n - i)}, i);
    i = n;
  }
  return i;
}

// out[m * ldo + k] = rows[m, :n] . mat[k, :n] for m < MR, k < KN (mat rows n apart).
// MR x KN independent accumulators: each loaded vector feeds several FMAs. Full vectors, then
// the tail (masked memory ops cost more on some CPUs).
template <class V, int MR, int KN>
inline void dots(const float* rows, int64_t ld, const float* mat, int64_t n, float* out, int64_t ldo,
                 const Ahead& pf) {
  typename V::Vec acc[MR][KN];
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) acc[m][k] = V::zero();
  const int64_t tail = over_vectors<V>(n, pf, [&](const auto& lanes, int64_t i) {
    typename V::Vec xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = lanes.load(rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      const typename V::Vec av = lanes.load(mat + k * n + i);
      for (int m = 0; m < MR; ++m) acc[m][k] = V::fma(xv[m], av, acc[m][k]);
    }
  });
  for (int m = 0; m < MR; ++m) {
    for (int k = 0; k < KN; ++k) {
      float t = V::hsum(acc[m][k]);
      for (int64_t j = tail; j < n; ++j) t += rows[m * ld + j] * mat[k * n + j];
      out[m * ldo + k] = t;
    }
  }
}

// out[m * ldo + k] = rows[m] . mat[k] for all k < kn; the next rows prefetched on the first pass.
template <class V, int MR>
inline void dots_all(const float* rows, int64_t ld, const float* mat, int64_t kn, int64_t n, float* out,
                     int64_t ldo, const Ahead& pf = Ahead()) {
  const Ahead none;
  column_groups<V::dots_k(MR)>(kn, [&](int64_t k, auto kw) {
    dots<V, MR, decltype(kw)::value>(rows, ld, mat + k * n, n, out + k, ldo, k == 0 ? pf : none);
  });
}

// dst[k, :n] += sum_m coef[m * ldc + k] * rows[m, :n] for k < KN (dst rows n apart).
template <class V, int MR, int KN>
inline void axpys(const float* rows, int64_t ld, const float* coef, int64_t ldc, float* dst, int64_t n,
                  const Ahead& pf) {
  typename V::Vec c[MR][KN];
  for (int m = 0; m < MR; ++m)
    for (int k = 0; k < KN; ++k) c[m][k] = V::set1(coef[m * ldc + k]);
  const int64_t tail = over_vectors<V>(n, pf, [&](const auto& lanes, int64_t i) {
    typename V::Vec xv[MR];
    for (int m = 0; m < MR; ++m) xv[m] = lanes.load(rows + m * ld + i);
    for (int k = 0; k < KN; ++k) {
      typename V::Vec v = lanes.load(dst + k * n + i);
      for (int m = 0; m < MR; ++m) v = V::fma(c[m][k], xv[m], v);
      lanes.store(dst + k * n + i, v);
    }
  });
  for (int64_t i = tail; i < n; ++i) {
    for (int k = 0; k < KN; ++k) {
      float v = dst[k * n + i];
      for (int m = 0; m < MR; ++m) v += coef[m * ldc + k] * rows[m * ld + i];
      dst[k * n + i] = v;
    }
  }
}

// dst[k, :n] += sum_m coef[m * ldc + k] * rows[m, :n] for all k < kn.
template <class V, int MR>
inline void axpys_all(const float* rows, int64_t ld, const float* coef, int64_t ldc, int64_t kn, float* dst,
                      int64_t n, const Ahead& pf = Ahead()) {
  const Ahead none;
  column_groups<V::kAxpyK>(kn, [&](int64_t k, auto kw) {
    axpys<V, MR, decltype(kw)::value>(rows, ld, coef + k, ldc, dst + k * n, n, k == 0 ? pf : none);
  });
}

// gx[m, :n] (= or +=) sum_k u[m * r + k] * A[k, :n] for m < MR.
template <class V, int MR>
inline void grad_rows(const float* u, const float* A, int64_t r, int64_t n, float* gx, int64_t ldgx, bool add) {
  const int64_t tail = over_vectors<V>(n, Ahead(), [&](const auto& lanes, int64_t i) {
    typename V::Vec v[MR];
    for (int m = 0; m < MR; ++m) v[m] = add ? lanes.load(gx + m * ldgx + i) : V::zero();
    for (int64_t k = 0; k < r; ++k) {
      const typename V::Vec a = lanes.load(A + k * n + i);
      for (int m = 0; m < MR; ++m) v[m] = V::fma(V::set1(u[m * r + k]), a, v[m]);
    }
    for (int m = 0; m < MR; ++m) lanes.store(gx + m * ldgx + i, v[m]);
  });
  for (int64_t i = tail; i < n; ++i) {
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
template <class V, int MR>
inline void backward_rows(const AdapterBackward& a, int64_t m, float* hbuf, float* ubuf, int ahead) {
  const float* xr = a.x + m * a.ldx;
  const float* gr = a.g + m * a.ldg;
  Ahead px{xr + MR * a.ldx, a.ldx, ahead}, pg{gr + MR * a.ldg, a.ldg, ahead};
  if (a.dBT != nullptr) {
    const float* h_rows = hbuf;
    int64_t ldh = a.r;
    if (a.h != nullptr) {
      h_rows = a.h + m * a.ldh;
      ldh = a.ldh;
    } else {
      dots_all<V, MR>(xr, a.ldx, a.A, a.r, a.in_f, hbuf, a.r, px);
      px.rows = 0;
    }
    axpys_all<V, MR>(gr, a.ldg, h_rows, ldh, a.r, a.dBT, a.out_f, pg);
    pg.rows = 0;
  }
  if (a.dA == nullptr && a.gx == nullptr) return;
  dots_all<V, MR>(gr, a.ldg, a.BT, a.r, a.out_f, ubuf, a.r, pg);
  if (a.dA != nullptr) axpys_all<V, MR>(xr, a.ldx, ubuf, a.r, a.r, a.dA, a.in_f, px);
  if (a.gx != nullptr) grad_rows<V, MR>(ubuf, a.A, a.r, a.in_f, a.gx + m * a.ldgx, a.ldgx, a.gx_add);
}

constexpr int64_t kRowStep = 4;  // rows per step of the forward and backward loops

template <class V>
inline void backward_loop(const AdapterBackward& a, int64_t m0, int64_t m1, float* hbuf, float* ubuf) {
  for (int64_t m = m0; m < m1; m += kRowStep) {
    const int64_t rows = std::min<int64_t>(kRowStep, m1 - m);
    const int ahead = static_cast<int>(std::min<int64_t>(kRowStep, std::max<int64_t>(0, m1 - m - kRowStep)));
    switch (rows) {
      case 4: backward_rows<V, 4>(a, m, hbuf, ubuf, ahead); break;
      case 3: backward_rows<V, 3>(a, m, hbuf, ubuf, ahead); break;
      case 2: backward_rows<V, 2>(a, m, hbuf, ubuf, ahead); break;
      default: backward_rows<V, 1>(a, m, hbuf, ubuf, ahead); break;
    }
  }
}

// The update of MR rows: h = x A^T (stored), out += h B^T.
template <class V, int MR>
inline void forward_rows(const AdapterForward& a, int64_t m) {
  float* h_rows = a.h + m * a.r;
  dots_all<V, MR>(a.x + m * a.ldx, a.ldx, a.A, a.r, a.in_f, h_rows, a.r);
  grad_rows<V, MR>(h_rows, a.BT, a.r, a.out_f, a.out + m * a.ldo, a.ldo, true);
}

template <class V>
inline void forward_loop(const AdapterForward& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; m += kRowStep) {
    switch (std::min<int64_t>(kRowStep, m1 - m)) {
      case 4: forward_rows<V, 4>(a, m); break;
      case 3: forward_rows<V, 3>(a, m); break;
      case 2: forward_rows<V, 2>(a, m); break;
      default: forward_rows<V, 1>(a, m); break;
    }
  }
}

// out[m * ldo + o] = bias[o] + w[o, :] . x[m, :] for m < MM, o in [o0, o1).
template <class V, int MM>
inline void gemv(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t n, const float* bias, float* out,
                 int64_t ldo, int64_t o0, int64_t o1) {
  static_assert(!V::kMaskedTail, "gemv's tails are scalar");
  using Vec = typename V::Vec;
  constexpr int kRows = MM <= 2 ? 4 : 2;  // weight rows per step: kRows x MM accumulators in registers
  for (int64_t o = o0; o < o1; o += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, o1 - o));
    Vec acc[kRows][MM];
    for (int q = 0; q < kRows; ++q)
      for (int m = 0; m < MM; ++m) acc[q][m] = V::zero();
    int64_t i = 0;
    if (rows == kRows) {
      for (; i + V::kWidth <= n; i += V::kWidth) {
        Vec xv[MM];
        for (int m = 0; m < MM; ++m) xv[m] = V::load(x + m * ldx + i);
        for (int q = 0; q < kRows; ++q) {
          const Vec wv = V::load(w + (o + q) * ldw + i);
          for (int m = 0; m < MM; ++m) acc[q][m] = V::fma(wv, xv[m], acc[q][m]);
        }
      }
    } else {
      for (; i + V::kWidth <= n; i += V::kWidth) {
        for (int q = 0; q < rows; ++q) {
          const Vec wv = V::load(w + (o + q) * ldw + i);
          for (int m = 0; m < MM; ++m) acc[q][m] = V::fma(wv, V::load(x + m * ldx + i), acc[q][m]);
        }
      }
    }
    for (int q = 0; q < rows; ++q) {
      const float* wr = w + (o + q) * ldw;
      for (int m = 0; m < MM; ++m) {
        float t = V::hsum(acc[q][m]);
        for (int64_t j = i; j < n; ++j) t += wr[j] * x[m * ldx + j];
        out[m * ldo + o + q] = (bias != nullptr ? bias[o + q] : 0.f) + t;
      }
    }
  }
}

// ---- the ISA entries: the templates above, instantiated and inlined per target ----
UNILORA_AVX2 UNILORA_ENTRY void backward_avx2(const AdapterBackward& a, int64_t m0, int64_t m1, float* hbuf,
                                              float* ubuf) {
  backward_loop<Avx2>(a, m0, m1, hbuf, ubuf);
}
UNILORA_AVX512 UNILORA_ENTRY void backward_avx512(const AdapterBackward& a, int64_t m0, int64_t m1, float* hbuf,
                                                  float* ubuf) {
  backward_loop<Avx512>(a, m0, m1, hbuf, ubuf);
}
UNILORA_AVX2 UNILORA_ENTRY void forward_avx2(const AdapterForward& a, int64_t m0, int64_t m1) {
  forward_loop<Avx2>(a, m0, m1);
}
UNILORA_AVX512 UNILORA_ENTRY void forward_avx512(const AdapterForward& a, int64_t m0, int64_t m1) {
  forward_loop<Avx512>(a, m0, m1);
}
UNILORA_AVX2 UNILORA_ENTRY void gemv_avx2(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t mm,
                                          int64_t n, const float* bias, float* out, int64_t ldo, int64_t o0,
                                          int64_t o1) {
  switch (mm) {
    case 1: return gemv<Avx2, 1>(w, ldw, x, ldx, n, bias, out, ldo, o0, o1);
    case 2: return gemv<Avx2, 2>(w, ldw, x, ldx, n, bias, out, ldo, o0, o1);
    case 3: return gemv<Avx2, 3>(w, ldw, x, ldx, n, bias, out, ldo, o0, o1);
    default: return gemv<Avx2, 4>(w, ldw, x, ldx, n, bias, out, ldo, o0, o1);
  }
}

}  // namespace

void adapter_backward(const AdapterBackward& a, int64_t m0, int64_t m1) {
  std::vector<float> hbuf(static_cast<size_t>(kRowStep * a.r)), ubuf(static_cast<size_t>(kRowStep * a.r));
  if (avx512()) {
    backward_avx512(a, m0, m1, hbuf.data(), ubuf.data());
  } else {
    backward_avx2(a, m0, m1, hbuf.data(), ubuf.data());
  }
}

void adapter_forward(const AdapterForward& a, int64_t m0, int64_t m1) {
  if (avx512()) {
    forward_avx512(a, m0, m1);
  } else {
    forward_avx2(a, m0, m1);
  }
}

void gemv_rows(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t mm, int64_t in_f, const float* bias,
               float* out, int64_t ldo, int64_t o0, int64_t o1) {
  gemv_avx2(w, ldw, x, ldx, mm, in_f, bias, out, ldo, o0, o1);
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
