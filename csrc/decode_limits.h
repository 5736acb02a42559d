// The decode limits: the largest M the fused decode kernels take, and the largest r. Defined once,
// in unilora_kernels/backends/policy.py (DECODE_MAX_M, DECODE_MAX_R); setup.py and CMakeLists.txt
// read them from there and pass them as macros; build_metadata() reports them. The CPU decode
// paths' row limit (cpu::kSmallM) is defined here; build_metadata() reports it as cpu_small_m.
#pragma once

#include <cstdint>

#if !defined(UNILORA_DECODE_MAX_M) || !defined(UNILORA_DECODE_MAX_R)
#error "UNILORA_DECODE_MAX_M / UNILORA_DECODE_MAX_R undefined: build through setup.py or CMakeLists.txt, which pass DECODE_MAX_M / DECODE_MAX_R of unilora_kernels/backends/policy.py"
#endif

namespace unilora {
constexpr int64_t kDecodeMaxM = UNILORA_DECODE_MAX_M;
constexpr int64_t kDecodeMaxR = UNILORA_DECODE_MAX_R;
namespace cpu {
// Up to this many rows (no dropout) the CPU decode paths beat BLAS, and linear keeps h (M x r).
constexpr int64_t kSmallM = 4;
}  // namespace cpu
}  // namespace unilora
