// Per-row results to outputs: the deterministic sum of row losses, row
// buffers, and writing losses.
#pragma once

#include "common/xent_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Note [Deterministic reduction]
// Row losses are summed in fixed blocks of kReduceBlock rows (blocks in
// parallel) and the block sums sequentially, all in double. Inside a block,
// kReduceLanes partial sums take every kReduceLanes-th value and are added
// together in a fixed tree at the end: one chain of dependent adds would cost
// an add latency per row (a visible share of the forward at C = 10), and the
// lanes vectorize. The grouping never depends on the thread count, so 'mean'
// and 'sum' are bitwise identical for any number of threads, and the double
// accumulator keeps the sum of up to millions of fp32 row losses exact to
// fp32 precision.
constexpr int64_t kReduceBlock = 1024;
constexpr int64_t kReduceLanes = 8;

template <typename acc_t>
double deterministic_sum(const acc_t* values, int64_t n) {
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> block_sum(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kReduceBlock;
      const int64_t hi = std::min(n, lo + kReduceBlock);
      double lane[kReduceLanes] = {};
      int64_t i = lo;
      for (; i + kReduceLanes <= hi; i += kReduceLanes) {
        for (int64_t j = 0; j < kReduceLanes; ++j) {
          lane[j] += static_cast<double>(values[i + j]);
        }
      }
      for (int64_t j = 0; i < hi; ++i, ++j) {
        lane[j] += static_cast<double>(values[i]);
      }
      for (int64_t width = kReduceLanes / 2; width > 0; width /= 2) {
        for (int64_t j = 0; j < width; ++j) {
          lane[j] += lane[j + width];
        }
      }
      block_sum[b] = lane[0];
    }
  });
  double total = 0.0;
  for (double s : block_sum) {
    total += s;
  }
  return total;
}

// Note [Uninitialized row buffers]
// Per-row scratch (row weights, row losses) is written in full by parallel
// loops before anything reads it. A std::vector would zero it first, on one
// thread: for a million rows 8 MB of memset and the page faults of fresh
// memory, serial work that showed at two threads. Left uninitialized, the
// pages are first touched by the parallel writers.
template <typename U>
std::unique_ptr<U[]> row_buffer(int64_t n) {
  return std::unique_ptr<U[]>(new U[static_cast<size_t>(n)]);
}

// Writes 'none' row losses, of the input's dtype T or of the accumulation
// dtype, as the loss tensor is (Note [Loss dtype]).
template <typename T>
void write_rows(const at::Tensor& loss, const math::acc_type<T>* row_loss, int64_t R) {
  using acc_t = math::acc_type<T>;
  const auto write = [&](auto* out) {
    using Out = std::remove_pointer_t<decltype(out)>;
    at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        out[r] = static_cast<Out>(row_loss[r]);
      }
    });
  };
  if (loss.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    write(loss.data_ptr<T>());
  } else {
    write(loss.data_ptr<acc_t>());
  }
}

// The reduced loss, rounded once from double to the loss's dtype.
template <typename T>
void write_scalar(const at::Tensor& loss, double value) {
  if (loss.scalar_type() == c10::CppTypeToScalarType<T>::value) {
    *loss.data_ptr<T>() = static_cast<T>(value);
  } else {
    *loss.data_ptr<math::acc_type<T>>() = static_cast<math::acc_type<T>>(value);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
