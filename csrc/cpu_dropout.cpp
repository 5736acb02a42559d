// Dropout on row blocks of x for the CPU BLAS paths: the Philox keep mask of index_math.h,
// drawn per element of the flattened (M, in) input, so every backend drops the same elements.
#include <ATen/Dispatch.h>

#include "cpu_common.h"

namespace unilora {
namespace cpu {
namespace {

// buf (rows x cols, contiguous, first row = row m0 of the input) *= keep * scale; the keep mask
// is saved to `mask` when given.
template <typename T>
void apply_dropout(T* buf, int64_t rows, int64_t cols, int64_t m0, const Dropout& dr, uint8_t* mask) {
  const T s = static_cast<T>(dr.scale);
  for (int64_t i = 0; i < rows; ++i) {
    const uint64_t base = static_cast<uint64_t>(m0 + i) * static_cast<uint64_t>(cols);
    T* row = buf + i * cols;
    uint8_t* mrow = mask ? mask + i * cols : nullptr;
    for (int64_t c = 0; c < cols; ++c) {
      const bool keep = dropout_keep(dr.host_seed, base + c, dr.threshold);
      row[c] = keep ? row[c] * s : T(0);
      if (mrow) mrow[c] = keep;
    }
  }
}

template <typename T>
void apply_mask(T* buf, int64_t n, const uint8_t* mask, double scale) {
  const T s = static_cast<T>(scale);
  for (int64_t i = 0; i < n; ++i) buf[i] = mask[i] ? buf[i] * s : T(0);
}

}  // namespace

at::Tensor input_block(const at::Tensor& x, int64_t m0, int64_t rows, at::Tensor& buf, const Dropout& dr,
                       uint8_t* mask) {
  at::Tensor xb = x.narrow(0, m0, rows);
  if (x.scalar_type() == buf.scalar_type() && !dr.active) return xb;
  at::Tensor v = buf.narrow(0, 0, rows);
  v.copy_(xb);
  if (dr.active) {
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "unilora_dropout", [&] {
      apply_dropout(v.data_ptr<scalar_t>(), rows, x.size(1), m0, dr, mask);
    });
  }
  return v;
}

void drop_rows(const at::Tensor& block, int64_t m0, const Dropout& dr, const uint8_t* mask) {
  AT_DISPATCH_FLOATING_TYPES(block.scalar_type(), "unilora_mask", [&] {
    if (mask != nullptr) {
      apply_mask(block.data_ptr<scalar_t>(), block.numel(), mask, dr.scale);
    } else {
      apply_dropout(block.data_ptr<scalar_t>(), block.size(0), block.size(1), m0, dr, nullptr);
    }
  });
}

}  // namespace cpu
}  // namespace unilora
