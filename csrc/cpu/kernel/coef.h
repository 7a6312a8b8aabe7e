// Per-class coefficients (Note [Row statistics]): which ones a kernel uses
// (Coef), where they come from (CoefSource) and their vector loads.
#pragma once

#include "common/xent_math.h"
#include "cpu/kernel/vec.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using math::acc_type;  // Note [Accumulation dtype] (common/xent_math.h)

enum class Coef {
  kNone,        // no coefficient sum needed (plain cross-entropy)
  kOnes,        // label smoothing without weight: coef = 1
  kWeight,      // label smoothing with weight: coef = w_c
  kProb,        // probability target: coef = q_c
  kProbWeight,  // probability target with weight: coef = w_c q_c
};

constexpr bool uses_target(Coef k) {
  return k == Coef::kProb || k == Coef::kProbWeight;
}
constexpr bool uses_weight(Coef k) {
  return k == Coef::kWeight || k == Coef::kProbWeight;
}

// Where a chunk's coefficients come from: `q` (probability target, same
// layout as the logits chunk it goes with) and/or `w` (class weights).
template <typename T>
struct CoefSource {
  using acc_t = acc_type<T>;
  const T* q = nullptr;
  const acc_t* w = nullptr;
  acc_t q_scale = 1;  // q = target * q_scale + q_shift (label smoothing)
  acc_t q_shift = 0;
};

template <typename T, Coef kCoef>
struct CoefLoader {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;

  static void load(const CoefSource<T>& src, int64_t i, V& a, V& b) {
    if constexpr (kCoef == Coef::kOnes) {
      a = V(acc_t(1));
      b = a;
    } else {
      if constexpr (uses_target(kCoef)) {
        IO::load(src.q + i, a, b);
        const V scale(src.q_scale), shift(src.q_shift);
        a = at::vec::fmadd(a, scale, shift);
        b = at::vec::fmadd(b, scale, shift);
      } else {
        a = V(acc_t(1));
        b = a;
      }
      if constexpr (uses_weight(kCoef)) {
        a = a * V::loadu(src.w + i);
        b = b * V::loadu(src.w + i + V::size());
      }
    }
  }

  // Partial: lanes past n are zero.
  static void load(const CoefSource<T>& src, int64_t i, int64_t n, V& a, V& b) {
    const int64_t na = std::min<int64_t>(n, V::size());
    const int64_t nb = std::max<int64_t>(n - V::size(), 0);
    if constexpr (kCoef == Coef::kOnes) {
      a = V::set(V(acc_t(0)), V(acc_t(1)), na);
      b = V::set(V(acc_t(0)), V(acc_t(1)), nb);
    } else {
      if constexpr (uses_target(kCoef)) {
        IO::load(src.q + i, n, a, b);
        const V scale(src.q_scale), shift(src.q_shift);
        a = V::set(V(acc_t(0)), at::vec::fmadd(a, scale, shift), na);
        b = V::set(V(acc_t(0)), at::vec::fmadd(b, scale, shift), nb);
      } else {
        a = V::set(V(acc_t(0)), V(acc_t(1)), na);
        b = V::set(V(acc_t(0)), V(acc_t(1)), nb);
      }
      if constexpr (uses_weight(kCoef)) {
        a = a * V::loadu(src.w + i, na);
        b = b * (nb > 0 ? V::loadu(src.w + i + V::size(), nb) : V(acc_t(0)));
      }
    }
  }

  // Class c of npos <= kStep adjacent rows (the column walks), whose target
  // rows start at q with classes qc apart. Partial: lanes past npos are
  // computed and dropped.
  static void load_column(const CoefSource<T>& src, const T* q, int64_t qc, int64_t c, int64_t npos, V& a, V& b) {
    a = V(acc_t(1));
    b = a;
    if constexpr (uses_target(kCoef)) {
      load_upto(q + c * qc, npos, a, b);
      a = at::vec::fmadd(a, V(src.q_scale), V(src.q_shift));
      b = at::vec::fmadd(b, V(src.q_scale), V(src.q_shift));
    }
    if constexpr (uses_weight(kCoef)) {
      a = a * V(src.w[c]);
      b = b * V(src.w[c]);
    }
  }
};

// The same coefficients for data gathered into accumulation-type scratch:
// the weights and smoothing carry over, the gatherer points q at its copy.
template <typename T>
CoefSource<acc_type<T>> gathered_source(const CoefSource<T>& src) {
  CoefSource<acc_type<T>> gathered;
  gathered.w = src.w;
  gathered.q_scale = src.q_scale;
  gathered.q_shift = src.q_shift;
  return gathered;
}

// Class weights only (index targets).
template <typename T>
CoefSource<T> weight_source(const at::Tensor& weight) {
  CoefSource<T> src;
  src.w = weight.defined() ? weight.data_ptr<acc_type<T>>() : nullptr;
  return src;
}

// Class weights and q = target * (1 - eps) + eps / C (probability targets).
template <typename T>
CoefSource<T> prob_source(const at::Tensor& weight, double label_smoothing, int64_t C) {
  using acc_t = acc_type<T>;
  CoefSource<T> src = weight_source<T>(weight);
  const math::SmoothedTarget<acc_t> q = math::smoothed_target<acc_t>(static_cast<acc_t>(label_smoothing), C);
  src.q_scale = q.scale;
  src.q_shift = q.shift;
  return src;
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
