// Mixed batches on CPU: every sequence of rows reads its own adapter (theta_d, a row of the
// adapter table, or none), one call per layer and direction (mixed_forward_cpu,
// mixed_backward_cpu).
//
// Rows of one sequence are contiguous, so the batch is a list of segments (runs of sequences
// with one adapter). The layer's element map (theta_d index J and scale S of every element of
// [A | B]) is computed once per call and shared by all adapters: only the theta reads differ
// between them. A single row (decode) runs straight from the map (no A or B buffers: the gather
// would cost as much as the row's product); longer runs gather A and B once into thread-local
// buffers and run the SIMD loops (fp32) or BLAS on row blocks, as the single-adapter paths do.
// The backward groups segments by adapter: each adapter's dA and dB are accumulated by its own
// work units and scattered into that adapter's gradient only, in a fixed order (deterministic).
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>

#include <array>
#include <atomic>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define UNILORA_MIXED_AVX512 1
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own placeholder vectors once
// inlined (GCC bug 105593, fixed in 13), as in cpu_simd.cpp.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#endif

#include "cpu_common.h"
#include "cpu_simd.h"

namespace unilora {
namespace cpu {
namespace {

// Rows [m0, m1) that read adapter `id` (0 = theta_d, k > 0 = table row k - 1).
struct Piece {
  int64_t id, m0, m1;
};

// The batch as pieces of at most `piece_rows` rows, in row order, base rows (-1) left out.
// Sequences are read from seq_adapter (int32, CPU) and checked against the table's capacity.
std::vector<Piece> pieces_of(const at::Tensor& seq_adapter, int64_t M, int64_t capacity, int64_t piece_rows) {
  const at::Tensor ids = seq_adapter.contiguous();
  const int32_t* a = ids.data_ptr<int32_t>();
  const int64_t S = ids.numel(), T = M / S;
  std::vector<Piece> out;
  for (int64_t s = 0; s < S;) {
    const int64_t id = a[s];
    TORCH_CHECK(id >= -1 && id <= capacity, "unilora: seq_adapter[", s, "] = ", id,
                " must be -1 (base), 0 (theta_d) or 1..", capacity, " (a row of the adapter table)");
    int64_t e = s + 1;
    while (e < S && a[e] == id) ++e;  // consecutive sequences of one adapter share a gather
    if (id >= 0) {
      for (int64_t m = s * T; m < e * T; m += piece_rows) out.push_back({id, m, std::min(e * T, m + piece_rows)});
    }
    s = e;
  }
  return out;
}

// Rows per piece: a sequence, split further when there are fewer sequences than threads.
int64_t piece_rows_for(int64_t M, int64_t S) {
  const int64_t T = M / S, threads = std::max<int64_t>(1, at::get_num_threads());
  return std::max<int64_t>(1, std::min(T, (M + threads - 1) / threads));
}

// theta_d index and scale of every element of the layer's flattened [A | B].
struct ElementMap {
  at::Tensor jbuf, sbuf;
  const int32_t* J = nullptr;
  const float* S = nullptr;
};

ElementMap element_map(const Projection& pj) {
  const int64_t n = pj.numel(), na = pj.numel_a(), d = pj.d;
  ElementMap em;
  const auto opts = pj.scales.options();
  em.jbuf = at::empty({n}, opts.dtype(at::kInt));
  em.sbuf = at::empty({n}, opts.dtype(at::kFloat));
  int32_t* J = em.jbuf.data_ptr<int32_t>();
  float* S = em.sbuf.data_ptr<float>();
  const float* sc = pj.scales.data_ptr<float>();
  const int32_t* ia = pj.is_hashed ? nullptr : pj.idx_a.data_ptr<int32_t>();
  const int32_t* ib = pj.is_hashed ? nullptr : pj.idx_b.data_ptr<int32_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, n, pj.is_hashed ? kGrain / 8 : kGrain, [&](int64_t b, int64_t e) {
    bool oob = false;
    for (int64_t i = b; i < e; ++i) {
      if (pj.is_hashed) {
        const int64_t j = hashed_index(pj.offset + i, pj.hash);
        J[i] = static_cast<int32_t>(j);
        S[i] = hashed_scale(j, pj.hash, sc[0], sc[1]);
      } else {
        const int64_t j = i < na ? ia[i] : ib[i - na];
        const bool out = static_cast<uint64_t>(j) >= static_cast<uint64_t>(d);
        oob |= out;
        J[i] = out ? 0 : static_cast<int32_t>(j);  // never read outside theta; reported below
        S[i] = out ? 0.f : sc[j];
      }
    }
    if (oob) bad = true;
  });
  check_index_range(bad, d);
  em.J = J;
  em.S = S;
  return em;
}

// Where adapter `id` lives: theta_d (id 0) or row id - 1 of the table, with its dtype.
struct Source {
  const void* ptr;
  at::ScalarType type;
};

Source source_of(int64_t id, const at::Tensor& theta, const at::Tensor& table) {
  if (id == 0) return {theta.data_ptr(), theta.scalar_type()};
  return {static_cast<const char*>(table.data_ptr()) + (id - 1) * table.size(1) * table.element_size(),
          table.scalar_type()};
}

// f(const th_t* theta_of_the_adapter) with th_t the source's C++ type.
template <typename F>
void with_source(const Source& src, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src.type, "unilora_mixed_source", [&] {
    f(static_cast<const scalar_t*>(src.ptr));
  });
}

// A (r x in) and B (out x r) of one adapter, or A and B^T (r x out) when `bt`.
template <typename th_t, typename acc_t>
void gather_adapter(const th_t* th, const ElementMap& em, const Projection& pj, acc_t* A, acc_t* B, bool bt) {
  const int64_t na = pj.numel_a(), n = pj.numel(), r = pj.r, out_f = pj.out_f;
  for (int64_t i = 0; i < na; ++i) A[i] = acc_t(th[em.J[i]]) * acc_t(em.S[i]);
  for (int64_t i = na; i < n; ++i) {
    const int64_t e = i - na;
    B[bt ? (e % r) * out_f + e / r : e] = acc_t(th[em.J[i]]) * acc_t(em.S[i]);
  }
}

// One row of x in compute precision with dropout applied (row m of the flattened input).
template <typename x_t, typename acc_t>
void dropped_row(const x_t* x, int64_t m, int64_t in_f, const Dropout& dr, acc_t* dst) {
  if (!dr.active) {
    for (int64_t c = 0; c < in_f; ++c) dst[c] = acc_t(x[c]);
    return;
  }
  const acc_t s = acc_t(dr.scale);
  const uint64_t base = static_cast<uint64_t>(m) * static_cast<uint64_t>(in_f);
  for (int64_t c = 0; c < in_f; ++c) dst[c] = dropout_keep(dr.host_seed, base + c, dr.threshold) ? acc_t(x[c]) * s : acc_t(0);
}

// The element map in theta order, for the single-row path: a row reads n elements of its
// adapter's theta at random, and a decode batch has a different adapter in every row, so these
// reads would miss cache one by one. Sorted by the cache line of j (a counting sort, once per
// call), a row streams through its adapter's theta in address order instead, and the random
// accesses go to x, h and the output row, which stay in L1.
struct SortedEntry {
  int32_t j;    // theta_d index
  float s;      // its scale
  int32_t src;  // A: column c of x; B: rank k of h
  int32_t dst;  // A: rank k of h;   B: output feature o
};

struct SortedMap {
  std::vector<SortedEntry> a, b;  // A's elements, then B's, each in theta order
};

constexpr int64_t kLineShift = 4;  // 16 fp32 per 64-byte cache line

SortedMap sorted_map(const ElementMap& em, const Projection& pj) {
  const int64_t na = pj.numel_a(), n = pj.numel(), in_f = pj.in_f, r = pj.r;
  const int64_t lines = (pj.d >> kLineShift) + 1;
  SortedMap sm;
  auto sort_range = [&](int64_t e0, int64_t e1, std::vector<SortedEntry>& dst, bool is_a) {
    std::vector<int32_t> start(static_cast<size_t>(lines + 1), 0);
    for (int64_t e = e0; e < e1; ++e) ++start[(em.J[e] >> kLineShift) + 1];
    for (int64_t l = 0; l < lines; ++l) start[l + 1] += start[l];
    dst.resize(static_cast<size_t>(e1 - e0));
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t i = e - (is_a ? 0 : na);
      SortedEntry entry{em.J[e], em.S[e], static_cast<int32_t>(is_a ? i % in_f : i % r),
                        static_cast<int32_t>(is_a ? i / in_f : i / r)};
      dst[start[em.J[e] >> kLineShift]++] = entry;
    }
  };
  // A's map and B's on two threads (when there are two): this pass is serial within each.
  at::parallel_for(0, 2, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      if (t == 0) {
        sort_range(0, na, sm.a, true);
      } else {
        sort_range(na, n, sm.b, false);
      }
    }
  });
  return sm;
}

// upd = (xd A^T) B^T for one row, A and B read through the sorted element map (no buffers).
// h has r * 4 slots: four interleaved partial sums per rank, so consecutive adds rarely wait on
// the same slot.
template <typename th_t, typename acc_t>
void row_update(const acc_t* xd, const th_t* th, const SortedMap& sm, const Projection& pj, acc_t* h4, acc_t* upd) {
  const int64_t r = pj.r, out_f = pj.out_f;
  std::fill(h4, h4 + 4 * r, acc_t(0));
  const SortedEntry* ea = sm.a.data();
  const int64_t na = static_cast<int64_t>(sm.a.size());
  for (int64_t i = 0; i < na; ++i) {
    const SortedEntry& e = ea[i];
    h4[e.dst * 4 + (i & 3)] += xd[e.src] * (acc_t(th[e.j]) * acc_t(e.s));
  }
  for (int64_t k = 0; k < r; ++k) h4[k] = (h4[k * 4] + h4[k * 4 + 1]) + (h4[k * 4 + 2] + h4[k * 4 + 3]);
  std::fill(upd, upd + out_f, acc_t(0));
  const SortedEntry* eb = sm.b.data();
  const int64_t nb = static_cast<int64_t>(sm.b.size());
  for (int64_t i = 0; i < nb; ++i) {
    const SortedEntry& e = eb[i];
    upd[e.dst] += h4[e.src] * (acc_t(th[e.j]) * acc_t(e.s));
  }
}

// B's element map transposed to (r x out): the AVX-512 row kernel adds h[k] B[:, k] into 16
// outputs at a time, reading 16 consecutive entries.
constexpr int64_t kGatherMaxThetaBytes = 64 * 1024;

struct TransposedB {
  std::vector<int32_t> J;
  std::vector<float> S;
};

TransposedB transposed_b(const ElementMap& em, const Projection& pj) {
  const int64_t na = pj.numel_a(), r = pj.r, out_f = pj.out_f;
  TransposedB tb;
  tb.J.resize(static_cast<size_t>(r * out_f));
  tb.S.resize(static_cast<size_t>(r * out_f));
  for (int64_t o = 0; o < out_f; ++o) {
    for (int64_t k = 0; k < r; ++k) {
      tb.J[k * out_f + o] = em.J[na + o * r + k];
      tb.S[k * out_f + o] = em.S[na + o * r + k];
    }
  }
  return tb;
}

// ---- the maps of a layer, built once ---------------------------------------------------------
// The element, sorted and transposed maps depend only on the layer's projection (its index and
// scale tensors, shapes and hash parameters), so they are kept per projection and reused while
// those tensors keep their storage and version. The sorted and transposed maps are built on
// first need. Bounded by bytes (least recently used first out).
struct LayerMaps {
  ElementMap em;
  std::once_flag sm_once, tb_once;
  SortedMap sm;
  TransposedB tb;

  const SortedMap& sorted(const Projection& pj) {
    std::call_once(sm_once, [&] { sm = sorted_map(em, pj); });
    return sm;
  }
  const TransposedB& transposed(const Projection& pj) {
    std::call_once(tb_once, [&] { tb = transposed_b(em, pj); });
    return tb;
  }
};

constexpr size_t kMapKeyLen = 3 * 4 + 14;
using MapKey = std::array<int64_t, kMapKeyLen>;
constexpr int64_t kMapCacheBytes = int64_t(256) << 20;

struct MapEntry {
  std::shared_ptr<LayerMaps> maps;
  // Weak references keep the storages' addresses (in the key) from being reused while the entry lives.
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  int64_t bytes;
  std::list<MapKey>::iterator lru;
};

std::mutex g_map_mutex;
std::map<MapKey, MapEntry> g_maps;
std::list<MapKey> g_map_lru;  // most recently used first
int64_t g_map_bytes = 0;
std::atomic<int64_t> g_map_builds{0};

std::shared_ptr<LayerMaps> build_maps(const Projection& pj) {
  g_map_builds.fetch_add(1, std::memory_order_relaxed);
  auto maps = std::make_shared<LayerMaps>();
  maps->em = element_map(pj);
  return maps;
}

// This projection's maps: cached, or built (and cached unless a tensor has no version counter).
std::shared_ptr<LayerMaps> layer_maps(const Projection& pj) {
  MapKey key{};
  size_t i = 0;
  bool cacheable = true;
  std::vector<c10::weak_intrusive_ptr<c10::StorageImpl>> storages;
  for (const at::Tensor* t : {&pj.scales, &pj.idx_a, &pj.idx_b}) {
    if (!t->defined()) {
      i += 4;
      continue;
    }
    if (t->is_inference()) {  // no version counter: a write could not be seen
      cacheable = false;
      break;
    }
    const c10::Storage& st = t->storage();
    key[i++] = static_cast<int64_t>(reinterpret_cast<intptr_t>(st.unsafeGetStorageImpl()));
    key[i++] = static_cast<int64_t>(reinterpret_cast<intptr_t>(t->data_ptr()));
    key[i++] = t->numel();
    key[i++] = t->_version();
    storages.push_back(st.getWeakStorageImpl());
  }
  if (!cacheable) return build_maps(pj);
  i = 12;
  for (int64_t v : {pj.r, pj.in_f, pj.out_f, pj.d, int64_t(pj.is_hashed), pj.offset, pj.hash.D, pj.hash.d,
                    pj.hash.rem, int64_t(pj.hash.half), int64_t(pj.hash.keys[0]), int64_t(pj.hash.keys[1]),
                    int64_t(pj.hash.keys[2]), int64_t(pj.hash.keys[3])}) {
    key[i++] = v;
  }
  {
    std::lock_guard<std::mutex> lock(g_map_mutex);
    auto it = g_maps.find(key);
    if (it != g_maps.end()) {
      g_map_lru.splice(g_map_lru.begin(), g_map_lru, it->second.lru);
      return it->second.maps;
    }
  }
  std::shared_ptr<LayerMaps> maps = build_maps(pj);  // outside the lock: other layers go on meanwhile
  const int64_t n = pj.numel();
  const int64_t bytes = n * int64_t(sizeof(int32_t) + sizeof(float) + sizeof(SortedEntry)) +
                        pj.r * pj.out_f * int64_t(sizeof(int32_t) + sizeof(float));
  std::lock_guard<std::mutex> lock(g_map_mutex);
  auto it = g_maps.find(key);
  if (it != g_maps.end()) return it->second.maps;  // another thread built it too
  while (!g_map_lru.empty() && g_map_bytes + bytes > kMapCacheBytes) {
    auto last = g_maps.find(g_map_lru.back());
    g_map_bytes -= last->second.bytes;
    g_maps.erase(last);
    g_map_lru.pop_back();
  }
  g_map_lru.push_front(key);
  g_maps.emplace(key, MapEntry{maps, std::move(storages), bytes, g_map_lru.begin()});
  g_map_bytes += bytes;
  return maps;
}

#ifdef UNILORA_MIXED_AVX512
// upd = (xd A^T) B^T for one fp32 row and an fp32 theta, with AVX-512 gathers: 16 elements of A
// (or of B^T) per instruction where the scalar loops read one. Needs simd::avx512().
__attribute__((target("avx512f"))) void row_update_avx512(const float* xd, const float* th, const ElementMap& em,
                                                          const TransposedB& tb, int64_t r, int64_t in_f,
                                                          int64_t out_f, float* h, float* upd) {
  for (int64_t k = 0; k < r; ++k) {
    const int32_t* J = em.J + k * in_f;
    const float* S = em.S + k * in_f;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 32 <= in_f; c += 32) {
      const __m512 t0 = _mm512_i32gather_ps(_mm512_loadu_si512(J + c), th, 4);
      const __m512 t1 = _mm512_i32gather_ps(_mm512_loadu_si512(J + c + 16), th, 4);
      acc0 = _mm512_fmadd_ps(_mm512_mul_ps(t0, _mm512_loadu_ps(S + c)), _mm512_loadu_ps(xd + c), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_mul_ps(t1, _mm512_loadu_ps(S + c + 16)), _mm512_loadu_ps(xd + c + 16), acc1);
    }
    for (; c < in_f; c += 16) {
      const __mmask16 m = in_f - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (in_f - c)) - 1);
      const __m512i j = _mm512_maskz_loadu_epi32(m, J + c);
      const __m512 t = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, j, th, 4);
      acc0 = _mm512_fmadd_ps(_mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, S + c)), _mm512_maskz_loadu_ps(m, xd + c),
                             acc0);
    }
    h[k] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  }
  for (int64_t o = 0; o < out_f; o += 16) {
    const __mmask16 m = out_f - o >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (out_f - o)) - 1);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < r; ++k) {
      const __m512i j = _mm512_maskz_loadu_epi32(m, tb.J.data() + k * out_f + o);
      const __m512 t = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, j, th, 4);
      acc = _mm512_fmadd_ps(_mm512_mul_ps(t, _mm512_maskz_loadu_ps(m, tb.S.data() + k * out_f + o)),
                            _mm512_set1_ps(h[k]), acc);
    }
    _mm512_mask_storeu_ps(upd + o, m, acc);
  }
}
#endif

// The forward of one thread's pieces [p0, p1), x_t / out_t the activation types, acc_t the
// compute type.
template <typename x_t, typename out_t, typename acc_t>
void forward_pieces(const std::vector<Piece>& pieces, int64_t p0, int64_t p1, const at::Tensor& x, at::Tensor& out,
                    const at::Tensor& theta, const at::Tensor& table, const ElementMap& em, const SortedMap& sm,
                    const TransposedB& tb, const Projection& pj, const Dropout& dr) {
  const int64_t r = pj.r, in_f = pj.in_f, out_f = pj.out_f;
  const auto opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const x_t* xp = x.data_ptr<x_t>();
  const int64_t ldx = x.stride(0);
  out_t* op = out.data_ptr<out_t>();
  // fp32 end to end: the SIMD loops of the single-adapter path (h = x A^T, out += h B^T).
  const bool simd_path = std::is_same<x_t, float>::value && std::is_same<out_t, float>::value &&
                         std::is_same<acc_t, float>::value && x.stride(1) == 1 && simd::available();
  std::vector<acc_t> row(static_cast<size_t>(in_f + 4 * r + out_f));
  at::Tensor A, B, hbuf, xbuf, tbuf;
  int64_t gathered = -1;  // adapter whose A and B the buffers hold
  for (int64_t p = p0; p < p1;) {
    // The run of this thread's pieces with one adapter.
    int64_t q = p + 1;
    while (q < p1 && pieces[q].id == pieces[p].id && pieces[q].m0 == pieces[q - 1].m1) ++q;
    const int64_t id = pieces[p].id, m_begin = pieces[p].m0, m_end = pieces[q - 1].m1;
    const Source src = source_of(id, theta, table);
    const bool gathers = std::is_same<acc_t, float>::value && src.type == at::kFloat && !tb.J.empty();
    if (m_end - m_begin == 1 && (gathers || !sm.a.empty())) {  // decode: straight from the element map
      acc_t* xd = row.data();
      acc_t* h = xd + in_f;
      acc_t* upd = h + 4 * r;
      dropped_row(xp + m_begin * ldx, m_begin, in_f, dr, xd);
#ifdef UNILORA_MIXED_AVX512
      if constexpr (std::is_same<acc_t, float>::value) {
        if (gathers) {
          row_update_avx512(xd, static_cast<const float*>(src.ptr), em, tb, r, in_f, out_f, h, upd);
        } else {
          with_source(src, [&](auto th) { row_update(xd, th, sm, pj, h, upd); });
        }
      } else {
        with_source(src, [&](auto th) { row_update(xd, th, sm, pj, h, upd); });
      }
#else
      with_source(src, [&](auto th) { row_update(xd, th, sm, pj, h, upd); });
#endif
      out_t* orow = op + m_begin * out_f;
      for (int64_t o = 0; o < out_f; ++o) orow[o] = static_cast<out_t>(acc_t(orow[o]) + upd[o]);
      p = q;
      continue;
    }
    if (!A.defined()) {
      A = at::empty({r, in_f}, opts);
      B = at::empty({simd_path ? r : out_f, simd_path ? out_f : r}, opts);
    }
    if (gathered != id) {
      with_source(src, [&](auto th) { gather_adapter(th, em, pj, A.data_ptr<acc_t>(), B.data_ptr<acc_t>(), simd_path); });
      gathered = id;
    }
    const int64_t mb = simd_path ? kSimdRows : block_rows(std::max(in_f, out_f), sizeof(acc_t));
    const int64_t need_rows = std::min(mb, m_end - m_begin);
    if (!xbuf.defined() || xbuf.size(0) < need_rows) {
      xbuf = at::empty({need_rows, in_f}, opts);  // casts and dropout only
      hbuf = at::empty({need_rows, r}, opts);
    }
    for (int64_t m0 = m_begin; m0 < m_end; m0 += mb) {
      const int64_t rows = std::min(mb, m_end - m0);
      const at::Tensor xb = input_block(x, m0, rows, xbuf, dr, nullptr);
      if (simd_path) {
        simd::AdapterForward a;
        a.x = xb.data_ptr<float>();
        a.ldx = xb.stride(0);
        a.A = A.data_ptr<float>();
        a.BT = B.data_ptr<float>();
        a.r = r;
        a.in_f = in_f;
        a.out_f = out_f;
        a.out = out.data_ptr<float>() + m0 * out_f;
        a.ldo = out_f;
        a.h = hbuf.data_ptr<float>();
        simd::adapter_forward(a, 0, rows);
        continue;
      }
      at::Tensor hb = hbuf.narrow(0, 0, rows);
      at::mm_out(hb, xb, A.t());
      at::Tensor ob = out.narrow(0, m0, rows);
      if (out.scalar_type() == hb.scalar_type()) {
        ob.addmm_(hb, B.t());
      } else {
        if (!tbuf.defined() || tbuf.size(0) < rows) tbuf = at::empty({rows, out_f}, opts);
        at::Tensor tb = tbuf.narrow(0, 0, rows);
        at::mm_out(tb, hb, B.t());
        ob.add_(tb);  // one rounding to the low-precision output
      }
    }
    p = q;
  }
}

// Per-adapter work of the backward: pieces [p0, p1) of `order` (all of one adapter).
struct Unit {
  int64_t id, p0, p1;
  int64_t slot;  // -1: the unit is its adapter's only one and scatters itself; else its partial slot
};

// grad[J[i]] += S[i] * v[i] over the layer's [dA | dB] (serial: indices collide), in element
// order; v holds dB^T (r x out) instead of dB when `bt` (the SIMD loops' layout).
template <typename acc_t>
void scatter_adapter(const acc_t* v, const ElementMap& em, const Projection& pj, bool bt, acc_t* grad) {
  const int64_t na = pj.numel_a(), n = pj.numel(), r = pj.r, out_f = pj.out_f;
  for (int64_t i = 0; i < na; ++i) grad[em.J[i]] += acc_t(em.S[i]) * v[i];
  for (int64_t i = na; i < n; ++i) {
    const int64_t e = i - na;
    grad[em.J[i]] += acc_t(em.S[i]) * v[bt ? na + (e % r) * out_f + e / r : i];
  }
}

}  // namespace
}  // namespace cpu

int64_t mixed_map_builds() { return cpu::g_map_builds.load(std::memory_order_relaxed); }

void mixed_forward_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& theta, const at::Tensor& table,
                       const at::Tensor& seq_adapter, const Projection& pj, const Dropout& dr) {
  using namespace cpu;
  RECORD_FUNCTION("unilora_cpu::mixed_forward", std::vector<c10::IValue>());
  const int64_t M = x.size(0);
  const std::vector<Piece> pieces = pieces_of(seq_adapter, M, table.size(0), piece_rows_for(M, seq_adapter.numel()));
  if (pieces.empty()) return;
  const std::shared_ptr<LayerMaps> maps = layer_maps(pj);
  const ElementMap& em = maps->em;
  const at::ScalarType cd = compute_dtype({x.scalar_type(), theta.scalar_type(), table.scalar_type()});
  // Single-row pieces read A and B through the maps: fp32 sources by AVX-512 gathers (B's map
  // transposed), the others through the sorted map. Each map is built only when some piece
  // needs it (it costs a pass over n).
  bool gathers = false, sorted = false;
#ifdef UNILORA_MIXED_AVX512
  // Gathers win while an adapter's theta stays in L1/L2 for its row; a larger theta misses on
  // each gather, and the sorted map's streaming reads win.
  const bool can_gather = cd == at::kFloat && simd::avx512() && pj.d * 4 <= kGatherMaxThetaBytes;
#else
  const bool can_gather = false;
#endif
  for (const Piece& pc : pieces) {
    if (pc.m1 - pc.m0 != 1) continue;
    const bool f32 = (pc.id == 0 ? theta.scalar_type() : table.scalar_type()) == at::kFloat;
    (can_gather && f32 ? gathers : sorted) = true;
  }
  static const SortedMap kNoSorted;
  static const TransposedB kNoTransposed;
  const SortedMap& sm = sorted ? maps->sorted(pj) : kNoSorted;
  const TransposedB& tb = gathers ? maps->transposed(pj) : kNoTransposed;
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t npieces = static_cast<int64_t>(pieces.size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "unilora_mixed_x", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(cd, "unilora_mixed_forward", [&] {
      using acc_t = scalar_t;
      // out has x's dtype (checked by the op).
      run_chunks(npieces, [&](int64_t, int64_t p0, int64_t p1) {
        forward_pieces<x_t, x_t, acc_t>(pieces, p0, p1, xs, out, theta, table, em, sm, tb, pj, dr);
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_backward_cpu(const at::Tensor& g, const at::Tensor& x,
                                                                  const at::Tensor& theta, const at::Tensor& table,
                                                                  const at::Tensor& seq_adapter, const Projection& pj,
                                                                  const Dropout& dr, bool need_x, bool need_theta,
                                                                  bool /*deterministic*/) {
  using namespace cpu;
  RECORD_FUNCTION("unilora_cpu::mixed_backward", std::vector<c10::IValue>());
  const int64_t M = x.size(0), r = pj.r, in_f = pj.in_f, out_f = pj.out_f, n = pj.numel(), d = pj.d;
  const int64_t capacity = table.size(0);
  const at::ScalarType cd =
      compute_dtype({x.scalar_type(), g.scalar_type(), theta.scalar_type(), table.scalar_type()});
  const auto opts = x.options().dtype(cd);
  at::Tensor gx = need_x ? at::zeros({M, in_f}, x.options()) : at::empty({0}, x.options());
  at::Tensor gtheta = need_theta ? at::zeros({d}, theta.options()) : at::empty({0}, theta.options());
  at::Tensor gtable = need_theta ? at::zeros({capacity, d}, table.options()) : at::empty({0}, table.options());
  if (!need_x && !need_theta) return {gx, gtheta, gtable};
  std::vector<Piece> pieces = pieces_of(seq_adapter, M, capacity, piece_rows_for(M, seq_adapter.numel()));
  if (pieces.empty()) return {gx, gtheta, gtable};
  const std::shared_ptr<LayerMaps> maps = layer_maps(pj);
  const ElementMap& em = maps->em;
  // Pieces grouped by adapter (stable: row order within an adapter), then split into units:
  // one per adapter, or several per adapter when there are fewer adapters than threads.
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.id < b.id; });
  std::vector<std::pair<int64_t, int64_t>> groups;  // [first, last) piece of each adapter
  for (size_t p = 0; p < pieces.size(); ++p) {
    if (p == 0 || pieces[p].id != pieces[p - 1].id) groups.push_back({int64_t(p), int64_t(p)});
    groups.back().second = int64_t(p) + 1;
  }
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ngroups = static_cast<int64_t>(groups.size());
  const int64_t split = ngroups >= threads ? 1 : (threads + ngroups - 1) / ngroups;
  std::vector<Unit> units;
  int64_t nslots = 0;
  for (const auto& [f, l] : groups) {
    const int64_t parts = std::min(split, l - f);
    for (int64_t u = 0; u < parts; ++u) {
      units.push_back({pieces[f].id, f + u * (l - f) / parts, f + (u + 1) * (l - f) / parts, parts == 1 ? -1 : nslots++});
    }
  }
  // Gradient rows in the compute dtype: the outputs themselves when their dtype is cd, else
  // accumulators cast at the end (one d-length row per adapter in use).
  std::vector<int64_t> used_table_rows;
  for (const auto& [f, l] : groups) {
    if (pieces[f].id > 0) used_table_rows.push_back(pieces[f].id - 1);
  }
  at::Tensor acc_theta, acc_table;
  if (need_theta) {
    acc_theta = gtheta.scalar_type() == cd ? gtheta : at::zeros({d}, opts);
    acc_table = gtable.scalar_type() == cd ? gtable
                                           : at::zeros({static_cast<int64_t>(used_table_rows.size()), d}, opts);
  }
  std::vector<int64_t> table_slot(static_cast<size_t>(capacity + 1), -1);
  for (size_t i = 0; i < used_table_rows.size(); ++i) {
    table_slot[used_table_rows[i]] = gtable.scalar_type() == cd ? used_table_rows[i] : int64_t(i);
  }
  at::Tensor slots = need_theta && nslots > 0 ? at::zeros({nslots, n}, opts) : at::Tensor();
  const at::Tensor xs = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor gs = g.stride(1) == 1 ? g : g.contiguous();
  // fp32 end to end: the SIMD loops of the single-adapter backward (h, u = g B, dA, dB^T and
  // grad_x in one pass per row block); dropout goes through a masked copy of the x block.
  const bool simd_path = cd == at::kFloat && x.scalar_type() == cd && g.scalar_type() == cd && simd::available();
  const int64_t mb = simd_path ? kSimdRows : block_rows(std::max(in_f, out_f), at::elementSize(cd));

  AT_DISPATCH_FLOATING_TYPES(cd, "unilora_mixed_backward", [&] {
    using acc_t = scalar_t;
    auto grad_row = [&](int64_t id) -> acc_t* {
      if (id == 0) return acc_theta.data_ptr<acc_t>();
      return acc_table.data_ptr<acc_t>() + table_slot[id - 1] * d;
    };
    const int64_t nunits = static_cast<int64_t>(units.size());
    const at::ThreadLocalState state;
    at::parallel_for(0, nunits, 1, [&](int64_t u0, int64_t u1) {
      at::ThreadLocalStateGuard guard(state);
      at::Tensor A = at::empty({r, in_f}, opts), B = at::empty({out_f, r}, opts);
      at::Tensor dAB = need_theta ? at::empty({n}, opts) : at::Tensor();
      at::Tensor xbuf = at::empty({mb, in_f}, opts), gbuf = at::empty({mb, out_f}, opts);
      at::Tensor ubuf = at::empty({mb, r}, opts), hbuf = at::empty({mb, r}, opts);
      at::Tensor tbuf = need_x ? at::empty({mb, in_f}, opts) : at::Tensor();
      at::Tensor mask = dr.active && need_x ? at::empty({mb, in_f}, x.options().dtype(at::kByte)) : at::Tensor();
      for (int64_t ui = u0; ui < u1; ++ui) {
        const Unit& unit = units[ui];
        with_source(source_of(unit.id, theta, table), [&](auto th) {
          gather_adapter(th, em, pj, A.data_ptr<acc_t>(), B.data_ptr<acc_t>(), simd_path);
        });
        at::Tensor dAB_u = !need_theta ? at::Tensor() : unit.slot >= 0 ? slots[unit.slot] : dAB.zero_();
        if (simd_path) {
          simd::AdapterBackward a;
          a.A = A.data_ptr<float>();
          a.BT = B.data_ptr<float>();  // gathered as B^T (r x out)
          a.r = r;
          a.in_f = in_f;
          a.out_f = out_f;
          if (need_theta) {
            a.dA = dAB_u.data_ptr<float>();
            a.dBT = a.dA + r * in_f;
          }
          for (int64_t p = unit.p0; p < unit.p1; ++p) {
            for (int64_t m0 = pieces[p].m0; m0 < pieces[p].m1; m0 += mb) {
              const int64_t rows = std::min(mb, pieces[p].m1 - m0);
              uint8_t* mk = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
              const at::Tensor xb = input_block(xs, m0, rows, xbuf, dr, mk);  // x itself without dropout
              a.x = xb.data_ptr<float>();
              a.ldx = xb.stride(0);
              a.g = gs.data_ptr<float>() + m0 * gs.stride(0);
              a.ldg = gs.stride(0);
              if (need_x) {
                a.gx = gx.data_ptr<float>() + m0 * in_f;
                a.ldgx = in_f;
              }
              simd::adapter_backward(a, 0, rows);
              if (need_x && dr.active) drop_rows(gx.narrow(0, m0, rows), m0, dr, mk);
            }
          }
          if (need_theta && unit.slot < 0) scatter_adapter(dAB_u.data_ptr<acc_t>(), em, pj, true, grad_row(unit.id));
          continue;
        }
        at::Tensor dA = need_theta ? dAB_u.narrow(0, 0, r * in_f).view({r, in_f}) : at::Tensor();
        at::Tensor dB = need_theta ? dAB_u.narrow(0, r * in_f, out_f * r).view({out_f, r}) : at::Tensor();
        for (int64_t p = unit.p0; p < unit.p1; ++p) {
          for (int64_t m0 = pieces[p].m0; m0 < pieces[p].m1; m0 += mb) {
            const int64_t rows = std::min(mb, pieces[p].m1 - m0);
            uint8_t* mk = mask.defined() ? mask.data_ptr<uint8_t>() : nullptr;
            const at::Tensor xb = input_block(xs, m0, rows, xbuf, dr, mk);
            const at::Tensor gb_raw = gs.narrow(0, m0, rows);
            at::Tensor gb = gb_raw;
            if (gs.scalar_type() != cd) {
              gb = gbuf.narrow(0, 0, rows);
              gb.copy_(gb_raw);
            }
            at::Tensor ub = ubuf.narrow(0, 0, rows);
            at::mm_out(ub, gb, B);  // u = g B (rows x r)
            if (need_x) {
              at::Tensor tb = tbuf.narrow(0, 0, rows);
              at::mm_out(tb, ub, A);  // u A (rows x in)
              if (dr.active) drop_rows(tb, m0, dr, mk);
              gx.narrow(0, m0, rows).copy_(tb);
            }
            if (need_theta) {
              at::Tensor hb = hbuf.narrow(0, 0, rows);
              at::mm_out(hb, xb, A.t());   // h = drop(x) A^T
              dA.addmm_(ub.t(), xb);       // dA += u^T drop(x)
              dB.addmm_(gb.t(), hb);       // dB += g^T h
            }
          }
        }
        if (need_theta && unit.slot < 0) scatter_adapter(dAB_u.data_ptr<acc_t>(), em, pj, simd_path, grad_row(unit.id));
      }
    });
    if (need_theta && nslots > 0) {
      // Adapters split between units: their partials summed in unit order, then scattered.
      for (size_t i = 0; i < units.size();) {
        size_t j = i + 1;
        while (j < units.size() && units[j].id == units[i].id) ++j;
        if (units[i].slot >= 0) {
          at::Tensor total = slots[units[i].slot];
          for (size_t k = i + 1; k < j; ++k) total.add_(slots[units[k].slot]);
          scatter_adapter(total.data_ptr<acc_t>(), em, pj, simd_path, grad_row(units[i].id));
        }
        i = j;
      }
    }
  });
  if (need_theta) {
    if (acc_theta.data_ptr() != gtheta.data_ptr()) gtheta.copy_(acc_theta);
    if (acc_table.data_ptr() != gtable.data_ptr() && !used_table_rows.empty()) {
      const at::Tensor rows = at::tensor(used_table_rows, x.options().dtype(at::kLong));
      gtable.index_copy_(0, rows, acc_table.to(gtable.scalar_type()));
    }
  }
  return {gx, gtheta, gtable};
}


// ---- decode from adapter columns ----------------------------------------------------------
// One row per sequence, every sequence's adapter a column of `columns` (d, S) fp32 (zeros for a
// base row): each theta read serves a block of sequences at once (contiguous floats of one row
// of `columns`), so the random accesses of the row-by-row path become one streamed line per
// element, and the products vectorise across sequences.
namespace {

// w sequences, 16 at a time: h = A x then o = B h. Column s of `cols` (row stride S) is sequence s's
// adapter; xt (K, w) and ot (N, w) hold the block's inputs and outputs with the sequences as lanes.
#ifdef UNILORA_MIXED_AVX512
// Sc[e] * cols[J[e]] * v over 16 lanes (a lambda would not inherit the target attribute).
__attribute__((target("avx512f"), always_inline)) inline __m512 decode_term(const float* cols, const int32_t* J,
                                                                           const float* Sc, int64_t S, int64_t e,
                                                                           __mmask16 mk, const float* v) {
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(Sc[e]), _mm512_maskz_loadu_ps(mk, cols + J[e] * S)),
                       _mm512_maskz_loadu_ps(mk, v));
}

__attribute__((target("avx512f")))
void decode_columns_avx512(const float* xt, const float* cols, float* ot, float* h, const int32_t* J, const float* Sc,
                           int64_t S, int64_t w, int64_t K, int64_t N, int64_t R) {
  for (int64_t c0 = 0; c0 < w; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, w - c0);
    const __mmask16 mk = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1u);
    const float* cc = cols + c0;
    for (int64_t i = 0; i < R; ++i) {
      __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();  // two chains hide the add latency
      int64_t k = 0;
      for (; k + 1 < K; k += 2) {
        acc0 = _mm512_add_ps(acc0, decode_term(cc, J, Sc, S, i * K + k, mk, xt + k * w + c0));
        acc1 = _mm512_add_ps(acc1, decode_term(cc, J, Sc, S, i * K + k + 1, mk, xt + (k + 1) * w + c0));
      }
      if (k < K) acc0 = _mm512_add_ps(acc0, decode_term(cc, J, Sc, S, i * K + k, mk, xt + k * w + c0));
      _mm512_storeu_ps(h + i * 16, _mm512_add_ps(acc0, acc1));
    }
    for (int64_t o = 0; o < N; ++o) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < R; ++i) {
        acc = _mm512_add_ps(acc, decode_term(cc, J, Sc, S, R * K + o * R + i, mk, h + i * 16));
      }
      _mm512_mask_storeu_ps(ot + o * w + c0, mk, acc);
    }
  }
}
#endif

void decode_columns_scalar(const float* xt, const float* cols, float* ot, float* h, const int32_t* J, const float* Sc,
                           int64_t S, int64_t w, int64_t K, int64_t N, int64_t R) {
  for (int64_t s = 0; s < w; ++s) {
    for (int64_t i = 0; i < R; ++i) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += Sc[i * K + k] * cols[J[i * K + k] * S + s] * xt[k * w + s];
      h[i] = acc;
    }
    for (int64_t o = 0; o < N; ++o) {
      float acc = 0.f;
      for (int64_t i = 0; i < R; ++i) acc += Sc[R * K + o * R + i] * cols[J[R * K + o * R + i] * S + s] * h[i];
      ot[o * w + s] = acc;
    }
  }
}

}  // namespace

void mixed_decode_cpu(at::Tensor out, const at::Tensor& x, const at::Tensor& columns, const Projection& pj) {
#ifdef UNILORA_MIXED_AVX512
  const bool avx512 = simd::avx512();  // the one ISA choice of the cpu backend (UNILORA_CPU_SIMD)
#else
  const bool avx512 = false;
#endif
  // The kernel in the name, so a profile (and a test) shows which ISA ran.
  RECORD_FUNCTION(avx512 ? "unilora_cpu::mixed_decode_avx512" : "unilora_cpu::mixed_decode",
                  std::vector<c10::IValue>());
  const int64_t S = x.size(0), K = pj.in_f, N = pj.out_f, R = pj.r;
  if (S == 0) return;
  const std::shared_ptr<cpu::LayerMaps> maps = cpu::layer_maps(pj);
  const cpu::ElementMap& em = maps->em;
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const bool direct = out.scalar_type() == at::kFloat;  // else through an fp32 (N, S) buffer
  at::Tensor ot = direct ? at::Tensor() : at::empty({N, S}, xf.options());
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t block = std::max<int64_t>(16, ((S + threads - 1) / threads + 15) / 16 * 16);
  const float* X = xf.data_ptr<float>();
  const float* C = columns.data_ptr<float>();
  at::parallel_for(0, (S + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> h(static_cast<size_t>(R * 16)), xt(static_cast<size_t>(K * block)),
        ob(static_cast<size_t>(N * block));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s0 = b * block, w = std::min(block, S - s0);
      // This block's rows of x as columns (K, w), and its outputs as (N, w): the lanes are sequences.
      for (int64_t s = 0; s < w; ++s) {
        const float* xr = X + (s0 + s) * K;
        for (int64_t k = 0; k < K; ++k) xt[k * w + s] = xr[k];
      }
#ifdef UNILORA_MIXED_AVX512
      if (avx512) {
        decode_columns_avx512(xt.data(), C + s0, ob.data(), h.data(), em.J, em.S, S, w, K, N, R);
      } else
#endif
        decode_columns_scalar(xt.data(), C + s0, ob.data(), h.data(), em.J, em.S, S, w, K, N, R);
      for (int64_t s = 0; s < w; ++s) {
        if (direct) {
          float* orow = out.data_ptr<float>() + (s0 + s) * N;
          for (int64_t o = 0; o < N; ++o) orow[o] += ob[o * w + s];
        } else {
          float* orow = ot.data_ptr<float>();
          for (int64_t o = 0; o < N; ++o) orow[o * S + s0 + s] = ob[o * w + s];
        }
      }
    }
  });
  (void)avx512;
  if (!direct) out.add_(ot.t().to(out.scalar_type()));
}

}  // namespace unilora
