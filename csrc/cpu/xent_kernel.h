// The CPU cross-entropy kernels: one algorithm, written once on raw pointers
// with at::vec::Vectorized and at::parallel_for.
//
// This header is included only by csrc/cpu/xent_kernel_{default,avx2,avx512}.cpp,
// each compiled with its own ISA flags and -DCPU_CAPABILITY=<ISA>, so the
// vector code below becomes three copies picked at run time (xent_cpu.cpp).
// Everything here has internal linkage except the one kernels_<ISA>() table.
#pragma once

#ifndef CPU_CAPABILITY
#error "xent_kernel.h must be compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

#include "common/xent_math.h"
#include "cpu/xent_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using math::RowStats;

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
// Note [Accumulation dtype]
// fp32 for fp32/bf16/fp16 logits, fp64 for fp64. bf16/fp16 are widened in
// registers as they are loaded and narrowed as they are stored: no fp32 copy
// of the logits or of the gradient is ever materialized.
template <typename T>
using acc_type = typename AccType<T>::type;

// Note [Chunks]
// A row is processed in chunks of kChunk classes: a max pass then an exp-sum
// pass over the same chunk, which is still in L1 (8 KB of fp32), so each logit
// is read from memory once. Chunks are merged with math::merge in chunk order,
// whatever thread computed them, so results are bitwise independent of the
// thread count. Long rows with few of them are split across threads by chunk.
constexpr int64_t kChunk = 2048;

// Rows per task when parallelizing: about this many elements per task.
constexpr int64_t kGrainElements = 32768;

// ---------------------------------------------------------------------------
// Loads and stores of two accumulation vectors' worth of T.

template <typename T, typename Enable = void>
struct VecIO {
  // fp32 and fp64: T is the accumulation type.
  using V = Vectorized<T>;
  static constexpr int64_t kStep = 2 * V::size();
  static void load(const T* p, V& a, V& b) {
    a = V::loadu(p);
    b = V::loadu(p + V::size());
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

// Note [Fast exp]
// exp is the only transcendental per element, in the forward and again in the
// backward, and Sleef's expf (Vectorized::exp) runs at about 0.75 G/s per core
// on the Zen 3 this was tuned on, which left the kernels compute-bound at a
// third of memory bandwidth. This is Cephes' single-precision expf
// (Cody-Waite reduction x = n ln2 + r with ln2 in two parts, |r| <= ln2/2, a
// degree-7 polynomial, 2^n built in the exponent bits): about 1 ulp in ~20
// vector instructions. Domain: the kernels only take exp(x - max) and
// exp(x - lse), so x <= ~0; inputs above ln(FLT_MAX) saturate instead of
// giving inf. Inputs below ln(FLT_MIN), -inf included, give exactly 0 (the
// true result would be subnormal: an absolute error under 1.2e-38), so -inf
// logits get exactly zero probability and gradient, as in torch. nan stays
// nan (clamp propagates it). fp64 keeps Sleef's exp: accuracy is the point.
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using VI = Vectorized<int32_t>;
  const V lowest(-87.33654475f);  // ln(FLT_MIN)
  const V highest(88.72283935f);  // ln(FLT_MAX)
  const V xc = at::vec::clamp(x, lowest, highest);
  const V n = (xc * V(1.44269504088896341f)).round();
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V p = V(1.9875691500e-4f);
  p = at::vec::fmadd(p, r, V(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, V(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, V(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, V(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, V(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + V(1.0f));
  const VI biased = at::vec::convert_to_int_of_same_size(n) + VI(127);
  const V two_to_n = at::vec::cast<float>(biased << VI(23));
  return V::blendv(p * two_to_n, V(0.0f), x < lowest);
}

inline Vectorized<float> vexp(const Vectorized<float>& x) {
  return fast_exp(x);
}

inline Vectorized<double> vexp(const Vectorized<double>& x) {
  return x.exp();
}

// ---------------------------------------------------------------------------
// Per-class coefficients (Note [Row statistics]).

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

  static acc_t scalar(const CoefSource<T>& src, int64_t i) {
    acc_t c = 1;
    if constexpr (uses_target(kCoef)) {
      c = static_cast<acc_t>(src.q[i]) * src.q_scale + src.q_shift;
    }
    if constexpr (uses_weight(kCoef)) {
      c *= src.w[i];
    }
    return c;
  }
};

// ---------------------------------------------------------------------------
// Forward: statistics of one contiguous chunk of a row.

template <typename T, Coef kCoef>
RowStats<acc_type<T>> chunk_stats(const T* x, const CoefSource<T>& coef, int64_t n) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const V neg_inf(math::neg_inf<acc_t>());
  const V zero(acc_t(0));

  const int64_t n_full = n - n % kStep;
  const int64_t tail = n - n_full;
  const int64_t tail_a = std::min<int64_t>(tail, V::size());
  const int64_t tail_b = std::max<int64_t>(tail - V::size(), 0);

  // Pass 1: the maximum.
  V m0 = neg_inf, m1 = neg_inf;
  V xa, xb;
  for (int64_t i = 0; i < n_full; i += kStep) {
    IO::load(x + i, xa, xb);
    m0 = at::vec::maximum(m0, xa);
    m1 = at::vec::maximum(m1, xb);
  }
  if (tail > 0) {
    IO::load(x + n_full, tail, xa, xb);
    m0 = at::vec::maximum(m0, V::set(neg_inf, xa, tail_a));
    m1 = at::vec::maximum(m1, V::set(neg_inf, xb, tail_b));
  }
  const acc_t ref = lane_max(at::vec::maximum(m0, m1));

  // Pass 2: exp-sum and coefficient sums, from L1.
  const V shift(math::accumulation_shift(ref));
  V s0 = zero, s1 = zero, t0 = zero, t1 = zero, c0 = zero, c1 = zero;
  V ca, cb;
  for (int64_t i = 0; i < n_full; i += kStep) {
    IO::load(x + i, xa, xb);
    const V da = xa - shift;
    const V db = xb - shift;
    s0 = s0 + vexp(da);
    s1 = s1 + vexp(db);
    if constexpr (kCoef != Coef::kNone) {
      CoefLoader<T, kCoef>::load(coef, i, ca, cb);
      t0 = at::vec::fmadd(ca, da, t0);
      t1 = at::vec::fmadd(cb, db, t1);
      c0 = c0 + ca;
      c1 = c1 + cb;
    }
  }
  if (tail > 0) {
    IO::load(x + n_full, tail, xa, xb);
    const V da = xa - shift;
    const V db = xb - shift;
    s0 = s0 + V::set(zero, vexp(da), tail_a);
    s1 = s1 + V::set(zero, vexp(db), tail_b);
    if constexpr (kCoef != Coef::kNone) {
      CoefLoader<T, kCoef>::load(coef, n_full, tail, ca, cb);
      t0 = t0 + V::set(zero, ca * da, tail_a);
      t1 = t1 + V::set(zero, cb * db, tail_b);
      c0 = c0 + ca;
      c1 = c1 + cb;
    }
  }
  RowStats<acc_t> st;
  st.ref = ref;
  st.sum_exp = lane_sum(s0 + s1);
  st.coef_dot = kCoef == Coef::kNone ? acc_t(0) : lane_sum(t0 + t1);
  st.coef_sum = kCoef == Coef::kNone ? acc_t(0) : lane_sum(c0 + c1);
  return st;
}

// A row of the canonical (N, C, K) view: its first logit, the class stride,
// and the matching probability-target row (if any).
template <typename T>
struct RowView {
  const T* x;
  int64_t x_stride;
  const T* q = nullptr;
  int64_t q_stride = 1;
};

// Scratch for gathering strided chunks into contiguous accumulation-dtype
// buffers (see Note [Strided class dim]).
template <typename acc_t>
struct Scratch {
  acc_t x[kChunk];
  acc_t q[kChunk];
  acc_t g[kChunk];
};

// Note [Strided class dim]
// When the class dimension is not contiguous (transposed 2-D input, (N, C, d)
// input, sliced classes) a chunk is gathered into a small contiguous fp32/fp64
// buffer and the same vector code runs on it. That keeps one definition of the
// math for every layout; channels-last and ordinary (N, C) inputs need no
// gather because their class stride is 1.
template <typename T, Coef kCoef>
RowStats<acc_type<T>> row_chunk_stats(
    const RowView<T>& row,
    const CoefSource<T>& coef,
    int64_t c_begin,
    int64_t len,
    Scratch<acc_type<T>>& scratch) {
  using acc_t = acc_type<T>;
  const bool contiguous = row.x_stride == 1 && (!uses_target(kCoef) || row.q_stride == 1);
  CoefSource<T> chunk_coef = coef;
  if (uses_weight(kCoef)) {
    chunk_coef.w = coef.w + c_begin;
  }
  if (contiguous) {
    if (uses_target(kCoef)) {
      chunk_coef.q = row.q + c_begin;
    }
    return chunk_stats<T, kCoef>(row.x + c_begin, chunk_coef, len);
  }
  for (int64_t i = 0; i < len; ++i) {
    scratch.x[i] = static_cast<acc_t>(row.x[(c_begin + i) * row.x_stride]);
  }
  CoefSource<acc_t> gathered;
  gathered.w = chunk_coef.w;
  gathered.q_scale = coef.q_scale;
  gathered.q_shift = coef.q_shift;
  if (uses_target(kCoef)) {
    for (int64_t i = 0; i < len; ++i) {
      scratch.q[i] = static_cast<acc_t>(row.q[(c_begin + i) * row.q_stride]);
    }
    gathered.q = scratch.q;
  }
  return chunk_stats<acc_t, kCoef>(scratch.x, gathered, len);
}

template <typename acc_t>
RowStats<acc_t> empty_stats() {
  return {math::neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

int64_t num_chunks(int64_t C) {
  return C == 0 ? 0 : (C + kChunk - 1) / kChunk;
}

int64_t chunk_len(int64_t C, int64_t chunk) {
  return std::min<int64_t>(kChunk, C - chunk * kChunk);
}

// Calls finish(r, stats) for every row r in [0, R), with stats accumulated
// over the whole row. Rows run in parallel; when rows are few and long, their
// chunks run in parallel too and are merged afterwards, in the same order as
// the sequential path, so both give identical bits.
template <typename T, Coef kCoef, typename RowOf, typename CoefOf, typename Finish>
void for_each_row_stats(int64_t R, int64_t C, const RowOf& row_of, const CoefOf& coef_of, const Finish& finish) {
  using acc_t = acc_type<T>;
  const int64_t chunks = num_chunks(C);
  const bool split_rows = chunks > 1 && R < 4 * static_cast<int64_t>(at::get_num_threads());
  if (!split_rows) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      for (int64_t r = begin; r < end; ++r) {
        const RowView<T> row = row_of(r);
        const CoefSource<T> coef = coef_of(r, row);
        RowStats<acc_t> st = empty_stats<acc_t>();
        for (int64_t c = 0; c < chunks; ++c) {
          math::merge(st, row_chunk_stats<T, kCoef>(row, coef, c * kChunk, chunk_len(C, c), scratch));
        }
        finish(r, st);
      }
    });
    return;
  }
  std::vector<RowStats<acc_t>> partial(static_cast<size_t>(R * chunks));
  at::parallel_for(0, R * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks;
      const int64_t c = item % chunks;
      const RowView<T> row = row_of(r);
      partial[item] = row_chunk_stats<T, kCoef>(row, coef_of(r, row), c * kChunk, chunk_len(C, c), scratch);
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    RowStats<acc_t> st = empty_stats<acc_t>();
    for (int64_t c = 0; c < chunks; ++c) {
      math::merge(st, partial[r * chunks + c]);
    }
    finish(r, st);
  }
}

// Note [Deterministic reduction]
// Row losses are summed in fixed blocks of kReduceBlock rows (sequentially
// inside a block, blocks in parallel) and the block sums sequentially, all in
// double. The grouping never depends on the thread count, so 'mean' and
// 'sum' are bitwise identical for any number of threads, and the double
// accumulator keeps the sum of up to millions of fp32 row losses exact to
// fp32 precision.
constexpr int64_t kReduceBlock = 1024;

template <typename acc_t>
double deterministic_sum(const acc_t* values, int64_t n) {
  const int64_t blocks = (n + kReduceBlock - 1) / kReduceBlock;
  std::vector<double> block_sum(static_cast<size_t>(blocks), 0.0);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t lo = b * kReduceBlock;
      const int64_t hi = std::min(n, lo + kReduceBlock);
      double s = 0.0;
      for (int64_t i = lo; i < hi; ++i) {
        s += static_cast<double>(values[i]);
      }
      block_sum[b] = s;
    }
  });
  double total = 0.0;
  for (double s : block_sum) {
    total += s;
  }
  return total;
}

// Writes 'none' row losses.
template <typename T>
void write_rows(const at::Tensor& loss, const acc_type<T>* row_loss, int64_t R) {
  T* out = loss.data_ptr<T>();
  at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      out[r] = static_cast<T>(row_loss[r]);
    }
  });
}

template <typename T>
void write_scalar(const at::Tensor& loss, double value) {
  *loss.data_ptr<T>() = static_cast<T>(value);
}

// ---------------------------------------------------------------------------
// Index targets.

template <typename T>
CoefSource<T> weight_source(const at::Tensor& weight) {
  CoefSource<T> src;
  src.w = weight.defined() ? weight.data_ptr<acc_type<T>>() : nullptr;
  return src;
}

template <typename T, Coef kCoef>
void index_forward_typed(const IndexForwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const int64_t N = input.size(0), C = input.size(1), K = input.size(2);
  const int64_t R = N * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const int64_t tn = args.target.stride(0), tk = args.target.stride(1);
  const T* x = input.data_ptr<T>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* w = args.weight.defined() ? args.weight.data_ptr<acc_t>() : nullptr;
  const bool smoothing = args.label_smoothing > 0;
  const acc_t eps = static_cast<acc_t>(args.label_smoothing);
  const int64_t ignore_index = args.ignore_index;
  double* lse = args.lse.data_ptr<double>();
  const CoefSource<T> coef = weight_source<T>(args.weight);

  // 'none', or no smoothing: the row loss. Reduced with smoothing: the nll
  // part, with the smoothing part in row_smooth (math::reduced_smoothed_loss).
  const bool reduce = args.reduction != kReductionNone;
  std::vector<acc_t> row_loss(static_cast<size_t>(R));
  std::vector<acc_t> row_smooth(static_cast<size_t>(reduce && smoothing ? R : 0));
  for_each_row_stats<T, kCoef>(
      R, C,
      [&](int64_t r) {
        return RowView<T>{x + (r / K) * sn + (r % K) * sk, sc};
      },
      [&](int64_t, const RowView<T>&) { return coef; },
      [&](int64_t r, const RowStats<acc_t>& st) {
        lse[r] = math::log_sum_exp(st.ref, st.sum_exp);
        const int64_t y = target[(r / K) * tn + (r % K) * tk];
        if (y == ignore_index) {
          // torch selects rather than multiplies: an ignored row is exactly 0
          // even when its logits hold a nan.
          row_loss[r] = acc_t(0);
          if (!row_smooth.empty()) {
            row_smooth[r] = acc_t(0);
          }
          return;
        }
        const acc_t x_y = static_cast<acc_t>(x[(r / K) * sn + (r % K) * sk + y * sc]);
        const acc_t w_y = w ? w[y] : acc_t(1);
        if (row_smooth.empty()) {
          row_loss[r] = math::index_row_loss(st, x_y, w_y, eps, C, smoothing);
        } else {
          row_loss[r] = math::index_row_nll(st, x_y, w_y);
          row_smooth[r] = math::index_row_smooth(st);
        }
      });

  // Σ w[y] over non-ignored rows: the weighted mean's denominator.
  std::vector<acc_t> row_weight(static_cast<size_t>(R));
  at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = target[(r / K) * tn + (r % K) * tk];
      row_weight[r] = y == ignore_index ? acc_t(0) : (w ? w[y] : acc_t(1));
    }
  });
  const double total_weight = deterministic_sum(row_weight.data(), R);
  *args.total_weight.data_ptr<acc_t>() = static_cast<acc_t>(total_weight);

  if (!reduce) {
    write_rows<T>(args.loss, row_loss.data(), R);
    return;
  }
  const double denominator = args.reduction == kReductionMean ? total_weight : 1.0;
  const double nll_sum = deterministic_sum(row_loss.data(), R);
  write_scalar<T>(args.loss, smoothing
      ? math::reduced_smoothed_loss(nll_sum, deterministic_sum(row_smooth.data(), R), denominator, args.label_smoothing, C)
      : nll_sum / denominator);
}

// Upstream gradient of row r: per-row for 'none', the scalar otherwise.
template <typename T>
struct GradOut {
  using acc_t = acc_type<T>;
  const T* per_row = nullptr;
  int64_t sn = 0, sk = 0, K = 1;
  acc_t scalar = 0;

  GradOut(const at::Tensor& grad_loss, int64_t reduction, int64_t K_, double scale) : K(K_) {
    if (reduction == kReductionNone) {
      per_row = grad_loss.data_ptr<T>();
      sn = grad_loss.stride(0);
      sk = grad_loss.stride(1);
    } else {
      scalar = static_cast<acc_t>(static_cast<double>(*grad_loss.data_ptr<T>()) * scale);
    }
  }
  acc_t operator()(int64_t r) const {
    return per_row ? static_cast<acc_t>(per_row[(r / K) * sn + (r % K) * sk]) : scalar;
  }
};

// grad_c = a * softmax_c - d * coef_c over one contiguous chunk (the -b at the
// target class is applied by the caller).
template <typename T, Coef kCoef>
void chunk_grad(
    const T* x,
    T* grad,
    const CoefSource<T>& coef,
    int64_t n,
    acc_type<T> a,
    acc_type<T> d,
    math::SplitLse<acc_type<T>> lse) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const V va(a), vd(d), hi(lse.hi), lo(lse.lo);
  V xa, xb, ca, cb;
  const auto grad_of = [&](const V& xv, const V& cv) {
    const V p = vexp((xv - hi) - lo);
    if constexpr (kCoef == Coef::kNone) {
      return va * p;
    } else {
      return va * p - vd * cv;
    }
  };
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    IO::load(x + i, xa, xb);
    if constexpr (kCoef != Coef::kNone) {
      CoefLoader<T, kCoef>::load(coef, i, ca, cb);
    }
    IO::store(grad + i, grad_of(xa, ca), grad_of(xb, cb));
  }
  if (i < n) {
    IO::load(x + i, n - i, xa, xb);
    if constexpr (kCoef != Coef::kNone) {
      CoefLoader<T, kCoef>::load(coef, i, n - i, ca, cb);
    }
    IO::store(grad + i, n - i, grad_of(xa, ca), grad_of(xb, cb));
  }
}

// One chunk of one row's input gradient, any strides (Note [Strided class dim]).
template <typename T, Coef kCoef>
void row_chunk_grad(
    const RowView<T>& row,
    T* grad_row,
    int64_t grad_stride,
    const CoefSource<T>& coef,
    int64_t c_begin,
    int64_t len,
    acc_type<T> a,
    acc_type<T> d,
    math::SplitLse<acc_type<T>> lse,
    Scratch<acc_type<T>>& scratch) {
  using acc_t = acc_type<T>;
  CoefSource<T> chunk_coef = coef;
  if (uses_weight(kCoef)) {
    chunk_coef.w = coef.w + c_begin;
  }
  const bool contiguous =
      row.x_stride == 1 && grad_stride == 1 && (!uses_target(kCoef) || row.q_stride == 1);
  if (contiguous) {
    if (uses_target(kCoef)) {
      chunk_coef.q = row.q + c_begin;
    }
    chunk_grad<T, kCoef>(row.x + c_begin, grad_row + c_begin, chunk_coef, len, a, d, lse);
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    scratch.x[i] = static_cast<acc_t>(row.x[(c_begin + i) * row.x_stride]);
  }
  CoefSource<acc_t> gathered;
  gathered.w = chunk_coef.w;
  gathered.q_scale = coef.q_scale;
  gathered.q_shift = coef.q_shift;
  if (uses_target(kCoef)) {
    for (int64_t i = 0; i < len; ++i) {
      scratch.q[i] = static_cast<acc_t>(row.q[(c_begin + i) * row.q_stride]);
    }
    gathered.q = scratch.q;
  }
  chunk_grad<acc_t, kCoef>(scratch.x, scratch.g, gathered, len, a, d, lse);
  for (int64_t i = 0; i < len; ++i) {
    grad_row[(c_begin + i) * grad_stride] = static_cast<T>(scratch.g[i]);
  }
}

// Parallel over (row, chunk) items: every gradient element is independent, so
// any split gives the same bits; short rows get many rows per task.
template <typename Body>
void for_each_row_chunk(int64_t R, int64_t C, const Body& body) {
  const int64_t chunks = num_chunks(C);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(std::min(C, kChunk), 1));
  at::parallel_for(0, R * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      body(item / chunks, item % chunks);
    }
  });
}

template <typename T, Coef kCoef>
void index_backward_typed(const IndexBackwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const int64_t N = input.size(0), C = input.size(1), K = input.size(2);
  const int64_t R = N * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const int64_t tn = args.target.stride(0), tk = args.target.stride(1);
  const at::Tensor& grad_input = args.grad_input;
  const int64_t gn = grad_input.stride(0), gc = grad_input.stride(1), gk = grad_input.stride(2);
  const T* x = input.data_ptr<T>();
  T* grad = grad_input.data_ptr<T>();
  const int64_t* target = args.target.data_ptr<int64_t>();
  const acc_t* w = args.weight.defined() ? args.weight.data_ptr<acc_t>() : nullptr;
  const double* lse = args.lse.data_ptr<double>();
  const acc_t eps = static_cast<acc_t>(args.label_smoothing);
  const CoefSource<T> coef = weight_source<T>(args.weight);

  const double scale = args.reduction == kReductionMean
      ? 1.0 / static_cast<double>(*args.total_weight.data_ptr<acc_t>())
      : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, K, scale);
  double weight_sum = static_cast<double>(C);
  if (w) {
    weight_sum = 0.0;
    for (int64_t c = 0; c < C; ++c) {
      weight_sum += static_cast<double>(w[c]);
    }
  }

  for_each_row_chunk(R, C, [&](int64_t r, int64_t chunk) {
    const int64_t n = r / K, k = r % K;
    const int64_t y = target[n * tn + k * tk];
    const bool valid = y != args.ignore_index;
    const acc_t w_y = valid && w ? w[y] : acc_t(1);
    const math::GradCoefs<acc_t> gc_ = math::index_grad_coefs<acc_t>(
        grad_out(r), valid, w_y, static_cast<acc_t>(weight_sum), eps, C);
    const RowView<T> row{x + n * sn + k * sk, sc};
    T* grad_row = grad + n * gn + k * gk;
    const int64_t c_begin = chunk * kChunk;
    const int64_t len = chunk_len(C, chunk);
    if (gc_.a == 0 && gc_.b == 0 && gc_.d == 0 && std::isfinite(lse[r])) {
      for (int64_t i = 0; i < len; ++i) {
        grad_row[(c_begin + i) * gc] = T(0);
      }
      return;
    }
    const math::SplitLse<acc_t> split = math::split_lse<acc_t>(lse[r]);
    Scratch<acc_t> scratch;
    row_chunk_grad<T, kCoef>(row, grad_row, gc, coef, c_begin, len, gc_.a, gc_.d, split, scratch);
    if (valid && y >= c_begin && y < c_begin + len) {
      // The one-hot term, added to the element the vector loop wrote.
      const acc_t x_y = static_cast<acc_t>(row.x[y * sc]);
      const acc_t p_y = std::exp((x_y - split.hi) - split.lo);
      const acc_t coef_y = kCoef == Coef::kNone ? acc_t(0) : (w ? w[y] : acc_t(1));
      grad_row[y * gc] = static_cast<T>(gc_.a * p_y - gc_.d * coef_y - gc_.b);
    }
  });
}

// ---------------------------------------------------------------------------
// Probability targets.

template <typename T>
CoefSource<T> prob_source(const at::Tensor& weight, double label_smoothing, int64_t C) {
  using acc_t = acc_type<T>;
  CoefSource<T> src = weight_source<T>(weight);
  const math::SmoothedTarget<acc_t> q = math::smoothed_target<acc_t>(static_cast<acc_t>(label_smoothing), C);
  src.q_scale = q.scale;
  src.q_shift = q.shift;
  return src;
}

template <typename T, Coef kCoef>
void prob_forward_typed(const ProbForwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const at::Tensor& target = args.target;
  const int64_t N = input.size(0), C = input.size(1), K = input.size(2);
  const int64_t R = N * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const int64_t qn = target.stride(0), qc = target.stride(1), qk = target.stride(2);
  const T* x = input.data_ptr<T>();
  const T* q = target.data_ptr<T>();
  double* lse = args.lse.data_ptr<double>();
  acc_t* coef_sum = args.coef_sum.data_ptr<acc_t>();
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);

  std::vector<acc_t> row_loss(static_cast<size_t>(R));
  for_each_row_stats<T, kCoef>(
      R, C,
      [&](int64_t r) {
        const int64_t n = r / K, k = r % K;
        return RowView<T>{x + n * sn + k * sk, sc, q + n * qn + k * qk, qc};
      },
      [&](int64_t, const RowView<T>&) { return coef; },
      [&](int64_t r, const RowStats<acc_t>& st) {
        lse[r] = math::log_sum_exp(st.ref, st.sum_exp);
        coef_sum[r] = st.coef_sum;
        row_loss[r] = math::prob_row_loss(st);
      });
  if (args.reduction == kReductionNone) {
    write_rows<T>(args.loss, row_loss.data(), R);
    return;
  }
  // torch's mean divides by the number of rows N * d1 * ... * dk, not by weights.
  const double denominator = args.reduction == kReductionMean ? static_cast<double>(R) : 1.0;
  write_scalar<T>(args.loss, deterministic_sum(row_loss.data(), R) / denominator);
}

// grad_target_c = e * w_c * (x_c - lse) with e = -grad * (1 - eps).
template <typename T, Coef kCoef>
void prob_backward_typed(const ProbBackwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const at::Tensor& target = args.target;
  const int64_t N = input.size(0), C = input.size(1), K = input.size(2);
  const int64_t R = N * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const int64_t qn = target.stride(0), qc = target.stride(1), qk = target.stride(2);
  const T* x = input.data_ptr<T>();
  const T* q = target.data_ptr<T>();
  const double* lse = args.lse.data_ptr<double>();
  const acc_t* coef_sum = args.coef_sum.data_ptr<acc_t>();
  const acc_t* w = args.weight.defined() ? args.weight.data_ptr<acc_t>() : nullptr;
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);
  const double scale = args.reduction == kReductionMean ? 1.0 / static_cast<double>(R) : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, K, scale);
  const bool want_input = args.grad_input.defined();
  const bool want_target = args.grad_target.defined();
  T* gi = want_input ? args.grad_input.data_ptr<T>() : nullptr;
  T* gt = want_target ? args.grad_target.data_ptr<T>() : nullptr;
  const int64_t gin = want_input ? args.grad_input.stride(0) : 0;
  const int64_t gic = want_input ? args.grad_input.stride(1) : 0;
  const int64_t gik = want_input ? args.grad_input.stride(2) : 0;
  const int64_t gtn = want_target ? args.grad_target.stride(0) : 0;
  const int64_t gtc = want_target ? args.grad_target.stride(1) : 0;
  const int64_t gtk = want_target ? args.grad_target.stride(2) : 0;

  for_each_row_chunk(R, C, [&](int64_t r, int64_t chunk) {
    const int64_t n = r / K, k = r % K;
    const acc_t s = grad_out(r);
    const RowView<T> row{x + n * sn + k * sk, sc, q + n * qn + k * qk, qc};
    const int64_t c_begin = chunk * kChunk;
    const int64_t len = chunk_len(C, chunk);
    const math::SplitLse<acc_t> split = math::split_lse<acc_t>(lse[r]);
    Scratch<acc_t> scratch;
    if (want_input) {
      row_chunk_grad<T, kCoef>(row, gi + n * gin + k * gik, gic, coef, c_begin, len, s * coef_sum[r], s, split, scratch);
    }
    if (want_target) {
      // Rare (targets that require grad): a scalar loop is enough.
      const acc_t e = -s * coef.q_scale;
      T* grad_row = gt + n * gtn + k * gtk;
      for (int64_t c = c_begin; c < c_begin + len; ++c) {
        const acc_t xc = static_cast<acc_t>(row.x[c * sc]);
        const acc_t wc = w ? w[c] : acc_t(1);
        grad_row[c * gtc] = static_cast<T>(e * wc * ((xc - split.hi) - split.lo));
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Dtype and mode dispatch.

#define XENT_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

void index_forward(const IndexForwardArgs& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_index_forward", [&] {
    if (!(args.label_smoothing > 0)) {
      index_forward_typed<scalar_t, Coef::kNone>(args);
    } else if (args.weight.defined()) {
      index_forward_typed<scalar_t, Coef::kWeight>(args);
    } else {
      index_forward_typed<scalar_t, Coef::kOnes>(args);
    }
  });
}

void index_backward(const IndexBackwardArgs& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_index_backward", [&] {
    if (!(args.label_smoothing > 0)) {
      index_backward_typed<scalar_t, Coef::kNone>(args);
    } else if (args.weight.defined()) {
      index_backward_typed<scalar_t, Coef::kWeight>(args);
    } else {
      index_backward_typed<scalar_t, Coef::kOnes>(args);
    }
  });
}

void prob_forward(const ProbForwardArgs& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_prob_forward", [&] {
    if (args.weight.defined()) {
      prob_forward_typed<scalar_t, Coef::kProbWeight>(args);
    } else {
      prob_forward_typed<scalar_t, Coef::kProb>(args);
    }
  });
}

void prob_backward(const ProbBackwardArgs& args) {
  XENT_DISPATCH_FLOATING(args.input.scalar_type(), "xent_prob_backward", [&] {
    if (args.weight.defined()) {
      prob_backward_typed<scalar_t, Coef::kProbWeight>(args);
    } else {
      prob_backward_typed<scalar_t, Coef::kProb>(args);
    }
  });
}

#undef XENT_DISPATCH_FLOATING

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext

#define XENT_CONCAT_(a, b) a##b
#define XENT_CONCAT(a, b) XENT_CONCAT_(a, b)
#define XENT_STRINGIFY_(a) #a
#define XENT_STRINGIFY(a) XENT_STRINGIFY_(a)

// The one symbol each per-ISA translation unit exports.
const xent_ext::cpu::KernelTable& xent_ext::cpu::XENT_CONCAT(kernels_, CPU_CAPABILITY)() {
  namespace isa = xent_ext::cpu::CPU_CAPABILITY;
  static const KernelTable table{
      XENT_STRINGIFY(CPU_CAPABILITY), isa::index_forward, isa::index_backward, isa::prob_forward, isa::prob_backward};
  return table;
}
