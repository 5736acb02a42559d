// Index, scale and dropout-mask math shared by the CPU kernels and the CUDA kernels.
//
// Every function here is the C++ twin of a Python reference and must agree with it bit for bit
// (tests/test_extension.py checks that through the _hashed_index / _philox_randint test ops):
//   * hashed projection: unilora_kernels/projection.py (feistel_*, hashed_index, hashed_scale_of)
//   * dropout mask:      unilora_kernels/philox.py (philox_randint, fold31, keep_threshold)
// All arithmetic is on uint32 (wrap-around is the intended mod 2^32), so host and device agree.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UNILORA_HD __host__ __device__ __forceinline__
#define UNILORA_UNROLL _Pragma("unroll")
#else
#define UNILORA_HD inline
#define UNILORA_UNROLL
#endif

namespace unilora {

// ---- hashed projection: idx(i) = pi_key(i) mod d, pi a 4-round Feistel bijection of [0, D) ----
constexpr uint32_t kFeistelRounds = 4;
constexpr uint32_t kFeistelMul1 = 0x9E3779B1u;
constexpr uint32_t kFeistelMul2 = 0x85EBCA6Bu;
constexpr uint32_t kFeistelKeySalt = 0x9E3779B9u;

// Everything a kernel needs to map a position of theta_D to (theta_d index, scale).
struct HashedProjection {
  int64_t D = 0;       // length of theta_D (< 2^31, checked on the host)
  int64_t d = 1;       // length of theta_d
  int64_t rem = 0;     // D % d: columns j < rem are hit once more than the others
  uint32_t half = 1;   // Feistel half width in bits (4**half >= D, half <= 16)
  uint32_t keys[kFeistelRounds] = {0, 0, 0, 0};
};

// Smallest h >= 1 with 4**h >= D (projection.feistel_half_bits).
inline uint32_t feistel_half_bits(int64_t D) {
  uint32_t bits = 1;
  while (bits < 63 && (int64_t(1) << bits) < D) ++bits;  // ceil(log2(D)), at least 1
  uint32_t half = (bits + 1) / 2;
  return half < 1 ? 1 : half;
}

inline HashedProjection make_hashed_projection(int64_t D, int64_t d, int64_t key) {
  HashedProjection hash;
  hash.D = D;
  hash.d = d;
  hash.rem = D % d;
  hash.half = feistel_half_bits(D);
  const uint64_t k = static_cast<uint64_t>(key);
  const uint32_t lo = static_cast<uint32_t>(k), hi = static_cast<uint32_t>(k >> 32);
  for (uint32_t r = 0; r < kFeistelRounds; ++r) {
    hash.keys[r] = ((r % 2 == 0) ? lo : hi) ^ (kFeistelKeySalt * (r + 1));  // uint32 wrap, as & MASK32
  }
  return hash;
}

UNILORA_HD uint32_t feistel_round(uint32_t x, uint32_t k, uint32_t half_mask) {
  x ^= k;
  x *= kFeistelMul1;
  x ^= x >> 16;
  x *= kFeistelMul2;
  x ^= x >> 13;
  return x & half_mask;
}

// One pass of the keyed bijection of [0, 4**half); half <= 16, so everything fits in uint32.
UNILORA_HD uint32_t feistel_permute(uint32_t v, const HashedProjection& hash) {
  const uint32_t half_mask = (1u << hash.half) - 1u;
  uint32_t left = v >> hash.half, right = v & half_mask;
UNILORA_UNROLL
  for (uint32_t r = 0; r < kFeistelRounds; ++r) {
    const uint32_t next = left ^ feistel_round(right, hash.keys[r], half_mask);
    left = right;
    right = next;
  }
  return (left << hash.half) | right;
}

// theta_d index of theta_D position i (0 <= i < D); cycle-walking keeps pi inside [0, D).
// (32-bit remainder: v < 2^32 and d < 2^31; a 64-bit one is a slow subroutine call on GPUs.)
UNILORA_HD int64_t hashed_index(int64_t i, const HashedProjection& hash) {
  uint32_t v = feistel_permute(static_cast<uint32_t>(i), hash);
  while (static_cast<int64_t>(v) >= hash.D) v = feistel_permute(v, hash);
  return static_cast<int64_t>(v % static_cast<uint32_t>(hash.d));
}

// Scale of column j: scales2 = [s(D // d), s(D // d + 1)].
UNILORA_HD float hashed_scale(int64_t j, const HashedProjection& hash, float s0, float s1) {
  return j < hash.rem ? s1 : s0;
}

// ---- dropout: Philox4x32-10 as triton's tl.randint(seed, int64 offset) ----
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

UNILORA_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// First 32-bit output of Philox4x32-10 for counter (off_lo, off_hi, 0, 0), key (seed_lo, seed_hi).
UNILORA_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
UNILORA_UNROLL
  for (int i = 0; i < kPhiloxRounds; ++i) {
    uint32_t hi_a, hi_b;
    const uint32_t lo_b = mulhilo32(c2, kPhiloxRoundB, &hi_b);
    const uint32_t lo_a = mulhilo32(c0, kPhiloxRoundA, &hi_a);
    const uint32_t n0 = hi_b ^ c1 ^ k0, n2 = hi_a ^ c3 ^ k1;
    c0 = n0;
    c1 = lo_b;
    c2 = n2;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// int32 bit pattern folded onto [0, 2^31): x < 0 ? ~x : x (as tl.rand does before scaling).
UNILORA_HD int64_t fold31(uint32_t r) {
  const int32_t x = static_cast<int32_t>(r);
  return x < 0 ? static_cast<int64_t>(~x) : static_cast<int64_t>(x);
}

// Element `offset` of the flattened (M, in) input is kept iff this is true.
UNILORA_HD bool dropout_keep(uint64_t seed, uint64_t offset, int64_t threshold) {
  return fold31(philox_randint(seed, offset)) >= threshold;
}

// philox.keep_threshold: min(2^31, round-half-even(p * 2^31)); p * 2^31 is exact in double.
inline int64_t keep_threshold(double p) {
  const double t = std::nearbyint(p * 2147483648.0);
  return t >= 2147483648.0 ? (int64_t(1) << 31) : static_cast<int64_t>(t);
}

// philox.keep_scale: inverted-dropout scale of the kept elements (0 when everything is dropped).
inline double keep_scale(double p) { return p >= 1.0 ? 0.0 : 1.0 / (1.0 - p); }

// Dropout parameters as kernels take them. The seed is a one-element int64 tensor (Seeds in
// backends/__init__.py): CPU ops read its value on the host into host_seed; CUDA ops never read it
// on the host (that would sync, and a CUDA-graph replay must see the seed drawn for that replay):
// their kernels load it through device_seed (cuda::load_seed).
struct Dropout {
  bool active = false;
  uint64_t host_seed = 0;                 // CPU kernels only
  const int64_t* device_seed = nullptr;   // CUDA kernels only: device memory, valid while active
  int64_t threshold = 0;
  double scale = 1.0;
};

// p and the keep rule; the op fills in the seed (ops.cpp, dropout_arg).
inline Dropout make_dropout(double p) {
  Dropout dr;
  dr.active = p > 0.0;
  dr.threshold = keep_threshold(p);
  dr.scale = keep_scale(p);
  return dr;
}

}  // namespace unilora
