// Loads and stores of two accumulation vectors' worth of T (VecIO), lane
// reductions in a fixed order, and prefetching.
#pragma once

#ifndef CPU_CAPABILITY
#error "cpu/kernel/*.h must be compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;

template <typename T, typename Enable = void>
struct VecIO {
  // fp32 and fp64: T is the accumulation type.
  using V = Vectorized<T>;
  static constexpr int64_t kStep = 2 * V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
  }
  static void load_any_order(const T* p, V& a, V& b) {
    load(p, a, b);
  }
  // n < kStep elements; lanes past n are zero.
  static void load(const T* p, int64_t n, V& a, V& b) {
    const int64_t na = std::min<int64_t>(n, V::size());
    a = V::loadu(p, na);
    b = n > V::size() ? V::loadu(p + V::size(), n - V::size()) : V(T(0));
  }
  static void store(T* p, const V& a, const V& b) {
    a.store(p);
    b.store(p + V::size());
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    a.store(p, std::min<int64_t>(n, V::size()));
    if (n > V::size()) {
      b.store(p + V::size(), n - V::size());
    }
  }
};

template <typename T>
struct VecIO<T, std::enable_if_t<at::vec::is_reduced_floating_point_v<T>>> {
  using V = Vectorized<float>;
  using VT = Vectorized<T>;
  static_assert(VT::size() == 2 * V::size(), "a reduced-precision vector holds two float vectors");
  static constexpr int64_t kStep = VT::size();
  static void load(const T* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p));
  }
  // Note [Widening in any order]
  // The kStep values of p widened to float, in an order of lanes that is not
  // p's: for a pass that only takes their maximum. A bf16 is the top half of
  // its float, so the odd elements are the loaded bits with the low halves
  // cleared and the even ones the bits shifted up by 16: one in-lane
  // instruction per vector, where convert_to_float's ordered widening takes
  // an extract, two cross-lane zero-extensions and two shifts. The sums keep
  // the ordered widening: their order fixes their rounding (Note [Recomputed
  // equals fused]). fp16 has no such shortcut.
  static void load_any_order(const T* p, V& a, V& b) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m512i bits = _mm512_loadu_si512(p);
      a = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
      b = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      a = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
      b = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
      return;
    }
#endif
    load(p, a, b);
  }
  static void load(const T* p, int64_t n, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<T>(VT::loadu(p, n));
  }
  static void store(T* p, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p);
  }
  static void store(T* p, int64_t n, const V& a, const V& b) {
    at::vec::convert_from_float<T>(a, b).store(p, n);
  }
};

// n <= kStep elements of T, as the column walks' tiles take them: whole
// vectors when n == kStep, else lanes past n are computed and dropped (zero
// when loaded).
template <typename T, typename V>
void load_upto(const T* p, int64_t n, V& a, V& b) {
  if (n == VecIO<T>::kStep) {
    VecIO<T>::load(p, a, b);
  } else {
    VecIO<T>::load(p, n, a, b);
  }
}

template <typename T, typename V>
void store_upto(T* p, int64_t n, const V& a, const V& b) {
  if (n == VecIO<T>::kStep) {
    VecIO<T>::store(p, a, b);
  } else {
    VecIO<T>::store(p, n, a, b);
  }
}

template <typename acc_t>
acc_t lane_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) {
    // nan-propagating, like at::vec::maximum
    m = (m != m || m > lanes[i]) ? m : lanes[i];
  }
  return m;
}

// Sums lanes in a fixed order (determinism).
template <typename acc_t>
acc_t lane_sum(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t s = lanes[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) {
    s += lanes[i];
  }
  return s;
}

// Note [Prefetch]
// The forward's max pass streams a chunk from DRAM, then its exp pass
// computes from L1 while the memory system idles: the hardware prefetcher
// sees no misses to follow. Prefetching the memory one chunk ahead during the
// exp pass (chunk_stats) overlaps the next chunk's DRAM read with this
// chunk's arithmetic (rows are usually adjacent, so "one chunk ahead" is
// usually what comes next). A prefetch never faults, so running past the
// tensor is harmless. Every 64-byte line of a step gets its own prefetch: one
// per step would cover only every other line of fp32 (a step is 128 bytes;
// bf16's is one line).
template <typename T>
inline void prefetch_step(const T* p) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t k = 0; k < static_cast<int64_t>(VecIO<T>::kStep); k += kLine) {
    __builtin_prefetch(p + k, 0, 3);
  }
#endif
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
