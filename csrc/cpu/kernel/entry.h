// The CPU cross-entropy kernels: one algorithm, written once on raw pointers
// with at::vec::Vectorized and at::parallel_for.
//
// This header is included only by csrc/cpu/kernel_{default,avx2,avx512}.cpp,
// each compiled with its own ISA flags and -DCPU_CAPABILITY=<ISA>, so the
// vector code below becomes three copies picked at run time (kernel_dispatch.cpp).
// Everything here has internal linkage except the one kernels_<ISA>() table.
#pragma once

#ifndef CPU_CAPABILITY
#error "cpu/kernel/entry.h must be compiled with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

#include "common/xent_math.h"
#include "cpu/kernel_api.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using at::vec::Vectorized;
using math::RowStats;

using math::acc_type;  // Note [Accumulation dtype] (common/xent_math.h)

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
// third of memory bandwidth. This exp: Cody-Waite reduction x = n ln2 + r with
// ln2 in two parts (Cephes' split), |r| <= ln2/2, then 1 + r q(r) with q a
// degree-5 minimax fit of (e^r - 1)/r (relative error of the fit 2e-9, fitted
// in float64 by linear programming on 20001 points), evaluated by Horner so
// the last step, fma(q, r, 1), rounds once. Measured max relative error over
// [-87.3, 0] against float64: 8.8e-8 (about 1.5 ulp; Cephes' degree-7 form
// that this replaced: 1.2e-7), in 17 vector instructions.
// Rounding x / ln2 to n and building 2^n take one fma and one shift: adding
// the magic number 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa bits
// of t (the fma rounds to nearest), t - magic is n exactly, and t's bits
// shifted left by 23 are 2^n's bits (valid for -126 <= n <= 127, which the
// clamp ensures). Domain: the kernels only take exp(x - max) and
// exp(x - lse), so x <= ~0; inputs above ln(FLT_MAX) saturate instead of
// giving inf. Inputs below ln(FLT_MIN), -inf included, give exactly 0 (the
// true result would be subnormal: an absolute error under 1.2e-38), so -inf
// logits get exactly zero probability and gradient, as in torch. nan stays
// nan (clamp propagates it, and x < lowest is false for it). fp64 keeps
// Sleef's exp: accuracy is the point. The AVX512 build uses a shorter exp
// with a table (Note [Fast exp on AVX512]).
#if defined(CPU_CAPABILITY_AVX512)
// Note [Fast exp on AVX512]
// AVX512 has a 16-entry register table lookup (vpermps) and a scale by a
// power of two that handles the exponent's range itself (vscalefps), so it
// takes a shorter exp than Note [Fast exp]'s: x = (16k + j) ln2/16 + r with
// n = 16k + j the nearest integer to x 16/ln2 (the same magic-number rounding,
// whose low 4 bits of t are j: vpermps reads only those), |r| <= ln2/32,
// ln2/16 in two parts (12 significant bits in the first, so n * hi is exact
// for |n| < 4096); then exp(x) = 2^k (T_j + T_j p + L_j), where T_j + L_j is
// 2^(j/16) in two floats (the table's rounding, up to 6e-8, would otherwise be
// the largest error) and p = r + r^2/2 + r^3/6 (Taylor's remainder r^4/24 <=
// 9.2e-9 on that interval). 2^k comes from vscalefps(y, n/16), which floors
// n/16 itself and rounds to subnormals and to zero as the true result would.
// The input is clamped at -120 (with nan passed through: max(lowest, x) keeps
// the second operand's nan), where the result is exactly 0, so -inf gives 0
// with no blend. Measured max relative error over [-87.3, 0] against float64:
// 6.9e-8 (Note [Fast exp]'s: 8.2e-8 on the same points); below -87.3 it is
// accurate to subnormal precision where the other gives 0. An L1-resident
// sum of exp(x - m) runs at 0.22-0.25 ns per element against 0.32 on the Zen 4
// this was tuned on: 14 instructions per 16 lanes, 8 of them fma or mul,
// against Note [Fast exp]'s 17 with 10.
// The domain is Note [Fast exp]'s (x <= ~0; above 88.7 gives inf).
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  const __m512 table_hi = _mm512_setr_ps(
      1.000000000e+00f, 1.044273734e+00f, 1.090507746e+00f, 1.138788581e+00f, 1.189207077e+00f, 1.241857767e+00f,
      1.296839595e+00f, 1.354255557e+00f, 1.414213538e+00f, 1.476826191e+00f, 1.542210817e+00f, 1.610490322e+00f,
      1.681792855e+00f, 1.756252170e+00f, 1.834008098e+00f, 1.915206552e+00f);
  const __m512 table_lo = _mm512_setr_ps(
      0.000000000e+00f, 4.833470157e-08f, -1.307753994e-08f, 5.386222313e-08f, 3.797635273e-08f, 4.496838102e-08f,
      -4.018999533e-08f, -1.012334927e-08f, 2.420323497e-08f, -4.500898854e-08f, 8.070904833e-09f, 9.836217174e-09f,
      -2.475532668e-08f, -9.235770371e-09f, -1.123927795e-08f, 9.845328108e-09f);
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-120.0f), x);
  const __m512 t = _mm512_fmadd_ps(xc, _mm512_set1_ps(23.08312065f), magic);  // 16 / ln2
  const __m512 n = _mm512_sub_ps(t, magic);
  __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-4.3319702148e-2f), xc);  // ln2/16, first part
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(-1.9966365e-06f), r);            // ... second part
  __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(0.16666667f), r, _mm512_set1_ps(0.5f));
  q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.0f));
  const __m512 p = _mm512_mul_ps(q, r);
  const __m512i j = _mm512_castps_si512(t);
  const __m512 hi = _mm512_permutexvar_ps(j, table_hi);
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(hi, p, _mm512_permutexvar_ps(j, table_lo)), hi);
  return _mm512_scalef_ps(y, _mm512_mul_ps(n, _mm512_set1_ps(0.0625f)));
}
#else
inline Vectorized<float> fast_exp(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  const V lowest(-87.33654475f);  // ln(FLT_MIN)
  const V highest(88.72283935f);  // ln(FLT_MAX)
  const V magic(12582912.0f + 127.0f);  // 1.5 * 2^23 + exponent bias
  const V xc = at::vec::clamp(x, lowest, highest);
  const V t = at::vec::fmadd(xc, V(1.44269504088896341f), magic);
  const V n = t - magic;
  V r = at::vec::fmadd(n, V(-0.693359375f), xc);
  r = at::vec::fmadd(n, V(2.12194440e-4f), r);
  V q = V(1.3843645848e-3f);
  q = at::vec::fmadd(q, r, V(8.3741633961e-3f));
  q = at::vec::fmadd(q, r, V(4.1668002538e-2f));
  q = at::vec::fmadd(q, r, V(1.6666431170e-1f));
  q = at::vec::fmadd(q, r, V(4.9999994206e-1f));
  q = at::vec::fmadd(q, r, V(1.0000000322f));
  const V p = at::vec::fmadd(q, r, V(1.0f));
  const V two_to_n = at::vec::cast<float>(at::vec::cast<int32_t>(t) << Vectorized<int32_t>(23));
  return V::blendv(p * two_to_n, V(0.0f), x < lowest);
}
#endif

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

// Note [Prefetch]
// The forward's max pass streams a chunk from DRAM, then its exp pass
// computes from L1 while the memory system idles: the hardware prefetcher
// sees no misses to follow. Prefetching the memory one chunk ahead during the
// exp pass overlaps the next chunk's DRAM read with this chunk's arithmetic
// (rows are usually adjacent, so "one chunk ahead" is usually what comes
// next). A prefetch never faults, so running past the tensor is harmless.
// Every 64-byte line of a step gets its own prefetch: one per step covered
// only every other line of fp32 (a step is 128 bytes), and prefetching both
// took 4-5 % off the 4096 x 32000 fp32 forward on Zen 4 (bf16's step is one
// line: unchanged).
template <typename T>
inline void prefetch_next_chunk(const T* p) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t k = 0; k < static_cast<int64_t>(VecIO<T>::kStep); k += kLine) {
    __builtin_prefetch(p + kChunk + k, 0, 3);
  }
#endif
}

// Note [Max ignoring nan]
// The rows walk's max pass (chunk_stats) takes max(m, x) in one instruction
// (clamp_min's max keeps m when x is nan) instead of at::vec::maximum's three
// (max, unordered compare, or): 3-8 % off the fp32 LLM-row forward. A nan is
// not lost: the exp pass sums exp(nan - shift) = nan into sum_exp, and the
// chunk's stats then mark ref nan too (`nan_if_sum_is`), so math::merge
// cannot drop a chunk of only nans as one without probability mass (Note
// [Rows of -inf]), and a row's stats read as before: ref and sum_exp nan,
// hence a nan lse, loss and gradient, as in torch. The column walks keep
// at::vec::maximum: there the same change measured slower (NCHW forward
// 6.7-7.4 -> 7.1-8.5 ms), for reasons not found.
template <typename V>
inline V max_ignoring_nan(const V& m, const V& x) {
  return at::vec::clamp_min(m, x);
}

template <typename acc_t>
inline acc_t nan_if_sum_is(acc_t ref, acc_t sum_exp) {
  return sum_exp != sum_exp ? sum_exp : ref;
}

// ---------------------------------------------------------------------------
// Forward: statistics of one contiguous chunk of a row.

// keep_exp, when not null, receives exp(x_i - accumulation_shift(ref)) for
// the chunk (Note [Kept exps]).
template <typename T, Coef kCoef>
RowStats<acc_type<T>> chunk_stats(const T* x, const CoefSource<T>& coef, int64_t n, acc_type<T>* keep_exp = nullptr) {
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
    IO::load_any_order(x + i, xa, xb);  // Note [Widening in any order]
    m0 = max_ignoring_nan(m0, xa);  // Note [Max ignoring nan]
    m1 = max_ignoring_nan(m1, xb);
  }
  if (tail > 0) {
    IO::load(x + n_full, tail, xa, xb);
    m0 = max_ignoring_nan(m0, V::set(neg_inf, xa, tail_a));
    m1 = max_ignoring_nan(m1, V::set(neg_inf, xb, tail_b));
  }
  const acc_t ref = lane_max(at::vec::maximum(m0, m1));

  // Pass 2: exp-sum and coefficient sums, from L1.
  const V shift(math::accumulation_shift(ref));
  V s0 = zero, s1 = zero, t0 = zero, t1 = zero, c0 = zero, c1 = zero;
  V ca, cb;
  for (int64_t i = 0; i < n_full; i += kStep) {
    prefetch_next_chunk(x + i);
    IO::load(x + i, xa, xb);
    const V da = xa - shift;
    const V db = xb - shift;
    const V ea = vexp(da);
    const V eb = vexp(db);
    s0 = s0 + ea;
    s1 = s1 + eb;
    if (keep_exp) {
      ea.store(keep_exp + i);
      eb.store(keep_exp + i + V::size());
    }
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
    const V ea = V::set(zero, vexp(da), tail_a);
    const V eb = V::set(zero, vexp(db), tail_b);
    s0 = s0 + ea;
    s1 = s1 + eb;
    if (keep_exp) {
      ea.store(keep_exp + n_full, tail_a);
      if (tail_b > 0) {
        eb.store(keep_exp + n_full + V::size(), tail_b);
      }
    }
    if constexpr (kCoef != Coef::kNone) {
      CoefLoader<T, kCoef>::load(coef, n_full, tail, ca, cb);
      t0 = t0 + V::set(zero, ca * da, tail_a);
      t1 = t1 + V::set(zero, cb * db, tail_b);
      c0 = c0 + ca;
      c1 = c1 + cb;
    }
  }
  RowStats<acc_t> st;
  st.sum_exp = lane_sum(s0 + s1);
  st.ref = nan_if_sum_is(ref, st.sum_exp);
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
    Scratch<acc_type<T>>& scratch,
    acc_type<T>* keep_exp = nullptr) {
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
    return chunk_stats<T, kCoef>(row.x + c_begin, chunk_coef, len, keep_exp);
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
  return chunk_stats<acc_t, kCoef>(scratch.x, gathered, len, keep_exp);
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

// ---------------------------------------------------------------------------
// Layout of the canonical (N, C, K) view, and the three ways to walk it.

// Offsets of row r = n * K + k in a tensor with these (n, k) strides.
struct RowStrides {
  int64_t n = 0;
  int64_t k = 0;
};

template <typename T>
struct Layout {
  int64_t N = 0, C = 0, K = 1;
  const T* x = nullptr;
  int64_t xc = 1;         // class stride of the logits
  RowStrides xs;          // row strides of the logits
  const T* q = nullptr;   // probability target of the same shape, or null
  int64_t qc = 1;
  RowStrides qs;

  int64_t rows() const {
    return N * K;
  }
  int64_t at(int64_t r, RowStrides s) const {
    return row_offset(r, K, s.n, s.k);
  }
  RowView<T> row(int64_t r) const {
    return {x + at(r, xs), xc, q ? q + at(r, qs) : nullptr, qc};
  }
};

template <typename T>
Layout<T> make_layout(const at::Tensor& input, const at::Tensor* prob_target) {
  Layout<T> L;
  L.N = input.size(0);
  L.C = input.size(1);
  L.K = input.size(2);
  L.x = input.data_ptr<T>();
  L.xc = input.stride(1);
  L.xs = {input.stride(0), input.stride(2)};
  if (prob_target) {
    L.q = prob_target->data_ptr<T>();
    L.qc = prob_target->stride(1);
    L.qs = {prob_target->stride(0), prob_target->stride(2)};
  }
  return L;
}

// Note [Three walks]
// - kRows: each row's classes are walked in chunks with vector loads along
//   the classes (contiguous classes: ordinary and channels-last inputs), or
//   gathered chunk by chunk (Note [Strided class dim]).
// - kColumns: consecutive rows are contiguous in memory and classes are
//   strided (NCHW segmentation, a transposed (N, C) input): vectors run across
//   kStep rows at a time, looping over the classes, with no gather at all.
// - kGatheredColumns: contiguous rows of very few classes (C = 10): per-row
//   vector code would be all tail, so a tile of rows is transposed into a
//   small buffer and the column code runs on it.
// The walk depends only on shapes and strides, never on the thread count.
enum class Walk { kRows, kColumns, kGatheredColumns };

constexpr int64_t kSmallClasses = 32;  // up to here, rows are walked as gathered columns

template <typename T>
Walk choose_walk(const Layout<T>& L, const RowStrides* grad = nullptr) {
  if (L.C == 0 || L.rows() == 0) {
    return Walk::kRows;
  }
  // Row strides in the order rows are enumerated within a tile.
  const auto row_step = [&](RowStrides s) { return L.K > 1 ? s.k : s.n; };
  const bool rows_contiguous = (L.K > 1 || L.N > 1) && row_step(L.xs) == 1 &&
      (!L.q || row_step(L.qs) == 1) && (!grad || row_step(*grad) == 1);
  if (rows_contiguous && L.xc != 1) {
    return Walk::kColumns;
  }
  if (L.xc == 1 && (!L.q || L.qc == 1) && L.C <= kSmallClasses) {
    return Walk::kGatheredColumns;
  }
  return Walk::kRows;
}

// For kColumns the rows of a tile must be consecutive k of one n; with K == 1
// the rows are the n's, so view (N, C, 1) as (1, C, N). Row numbers r are
// unchanged, so callers index their own per-row tensors as before.
template <typename T>
Layout<T> columns_view(Layout<T> L) {
  if (L.K == 1) {
    L.K = L.N;
    L.N = 1;
    L.xs = {0, L.xs.n};
    L.qs = {0, L.qs.n};
  }
  return L;
}

RowStrides columns_view(RowStrides s, int64_t K) {
  return K == 1 ? RowStrides{0, s.n} : s;
}

// kColumns tiles: kStep consecutive rows of one n.
struct ColumnTiles {
  int64_t per_n;
  int64_t count;
  int64_t K;
  int64_t step;
  ColumnTiles(int64_t N, int64_t K_, int64_t step_) : K(K_), step(step_) {
    per_n = (K + step - 1) / step;
    count = N * per_n;
  }
  int64_t n(int64_t t) const {
    return t / per_n;
  }
  int64_t k0(int64_t t) const {
    return (t % per_n) * step;
  }
  int64_t size(int64_t t) const {
    return std::min(step, K - k0(t));
  }
};

// Statistics of npos <= kStep rows whose classes are xc apart and whose rows
// are adjacent: vectors across rows, one pass for the max and one for the
// sums, classes in order (the same order for every lane and every thread).
// keep_exp, when not null, receives exp(x - shift) at keep_exp[c * keep_stride
// + j] and keep_shift[j] the shift (math::accumulation_shift of the max), for
// kStep lanes (Note [Kept exps in a tile]).
template <typename T, Coef kCoef>
void column_stats(
    const T* x,
    int64_t xc,
    const T* q,
    int64_t qc,
    const CoefSource<T>& coef,
    int64_t C,
    int64_t npos,
    RowStats<acc_type<T>>* out,
    acc_type<T>* keep_exp = nullptr,
    int64_t keep_stride = 0,
    acc_type<T>* keep_shift = nullptr) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const V neg_inf(math::neg_inf<acc_t>());
  const V zero(acc_t(0));
  const bool full = npos == kStep;
  const auto load = [&](const T* p, V& a, V& b) {
    if (full) {
      IO::load(p, a, b);
    } else {
      IO::load(p, npos, a, b);  // lanes past npos are computed and dropped
    }
  };
  V xa, xb, m0 = neg_inf, m1 = neg_inf;
  for (int64_t c = 0; c < C; ++c) {
    load(x + c * xc, xa, xb);
    m0 = at::vec::maximum(m0, xa);
    m1 = at::vec::maximum(m1, xb);
  }
  // math::accumulation_shift, lane-wise.
  const V shift0 = V::blendv(m0, zero, m0 == neg_inf);
  const V shift1 = V::blendv(m1, zero, m1 == neg_inf);
  if (keep_exp) {
    shift0.store(keep_shift);
    shift1.store(keep_shift + V::size());
  }
  V s0 = zero, s1 = zero, t0 = zero, t1 = zero, c0 = zero, c1 = zero;
  for (int64_t c = 0; c < C; ++c) {
    load(x + c * xc, xa, xb);
    const V da = xa - shift0;
    const V db = xb - shift1;
    const V ea = vexp(da);
    const V eb = vexp(db);
    s0 = s0 + ea;
    s1 = s1 + eb;
    if (keep_exp) {  // whole vectors: lanes past npos land in the tile's spare columns
      ea.store(keep_exp + c * keep_stride);
      eb.store(keep_exp + c * keep_stride + V::size());
    }
    if constexpr (kCoef != Coef::kNone) {
      V ca(acc_t(1)), cb(acc_t(1));
      if constexpr (uses_target(kCoef)) {
        load(q + c * qc, ca, cb);
        ca = at::vec::fmadd(ca, V(coef.q_scale), V(coef.q_shift));
        cb = at::vec::fmadd(cb, V(coef.q_scale), V(coef.q_shift));
      }
      if constexpr (uses_weight(kCoef)) {
        ca = ca * V(coef.w[c]);
        cb = cb * V(coef.w[c]);
      }
      t0 = at::vec::fmadd(ca, da, t0);
      t1 = at::vec::fmadd(cb, db, t1);
      c0 = c0 + ca;
      c1 = c1 + cb;
    }
  }
  acc_t lanes[6][kStep];
  m0.store(lanes[0]);
  m1.store(lanes[0] + V::size());
  s0.store(lanes[1]);
  s1.store(lanes[1] + V::size());
  t0.store(lanes[2]);
  t1.store(lanes[2] + V::size());
  c0.store(lanes[3]);
  c1.store(lanes[3] + V::size());
  for (int64_t j = 0; j < npos; ++j) {
    out[j] = {lanes[0][j], lanes[1][j], kCoef == Coef::kNone ? acc_t(0) : lanes[2][j],
              kCoef == Coef::kNone ? acc_t(0) : lanes[3][j]};
  }
}

// Rows per gathered-columns tile (a multiple of every kStep).
constexpr int64_t kTileRows = 64;

// Note [Finishing rows in groups]
// The column walks hand their finish a vector's worth of rows at once (the
// rows walk one row). Finishing index-target rows one call at a time (target
// lookup, x[y], the loss) was up to a quarter of the C = 10 forward, and the
// compiler reloaded the closure's pointers after every store. A group runs
// as short loops over local copies (5 % off that forward; the rest is the
// scalar work itself, see benchmarks/NOTES.md).
constexpr int64_t kMaxFinishRows = kTileRows;
static_assert(kSmallClasses * kTileRows <= kChunk, "a gathered tile must fit the scratch buffers");

// Note [Tile transposes]
// A gathered-columns tile is transposed into scratch and its gradient back
// out. Element by element that was a fifth of a C = 10 forward+backward (a
// load and a store per logit, twice), so fp32 tiles of evenly spaced rows
// with C >= 8 move in 8 x 8 blocks (transpose_8x8: eight vector loads, 24
// shuffles, eight vector stores). When C is not a multiple of 8 the
// last block of classes starts at C - 8 and overlaps the one before it: it
// reads logits it already read and writes the same values again, so nothing
// past a row is touched and no tail code is needed. Rows past the last whole
// block of 8, other dtypes and unevenly spaced rows go element by element.
// The AVX512 build transposes with 256-bit instructions too: ATen's
// transpose_mxn<float, 8, 8> is specialized for AVX2 only, and under AVX512 it
// runs its general 16 x 16 kernel with masks, which made the C = 10 forward
// and fwd+bwd twice as slow at AVX512 as at AVX2 on the same Zen 4.
constexpr int64_t kTransposeBlock = 8;

// dst[c * ld_dst + j] = src[j * ld_src + c] for j, c < 8.
inline void transpose_8x8(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm256_loadu_ps(src + i * ld_src);
  }
  // pairs of rows interleaved, then quadruples, then the two 128-bit halves
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ld_dst, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
#else
  at::vec::transpose_mxn<float, kTransposeBlock, kTransposeBlock>(src, ld_src, dst, ld_dst);
#endif
}

// The offset from row r to row r + 1 when it is the same for every r, else -1.
inline int64_t even_row_step(int64_t K, RowStrides s) {
  if (K == 1) {
    return s.n;
  }
  return s.n == K * s.k ? s.k : -1;
}

// Whether rows of C classes at this step move by blocks (Note [Tile transposes]).
template <typename T, typename acc_t>
bool transposes_by_block(int64_t C, int64_t step) {
  return std::is_same_v<T, float> && std::is_same_v<acc_t, float> && C >= kTransposeBlock && step >= 0;
}

// The whole blocks of 8 rows among rows [0, n) of a tile, moved by 8 x 8
// transposes (Note [Tile transposes]) between rows `step` apart (class c of
// row j at rows[j * step + c]) and a column-major tile (tile[c * kTileRows +
// j]): into the tile when kToTile, out of it otherwise. Returns the number
// of rows moved.
template <bool kToTile>
int64_t transpose_whole_blocks(
    std::conditional_t<kToTile, const float*, float*> rows,
    std::conditional_t<kToTile, float*, const float*> tile,
    int64_t step,
    int64_t C,
    int64_t n) {
  int64_t j = 0;
  for (; j + kTransposeBlock <= n; j += kTransposeBlock) {
    for (int64_t c0 = 0; c0 < C; c0 += kTransposeBlock) {
      const int64_t c = std::min(c0, C - kTransposeBlock);  // the last block may overlap
      if constexpr (kToTile) {
        transpose_8x8(rows + j * step + c, step, tile + c * kTileRows + j, kTileRows);
      } else {
        transpose_8x8(tile + c * kTileRows + j, kTileRows, rows + j * step + c, step);
      }
    }
  }
  return j;
}

// Copies rows [r0, r0 + n) of a contiguous-class layout into column-major
// scratch: dst[c * kTileRows + j] = row (r0 + j), class c.
template <typename T, typename acc_t>
void gather_tile(const T* base, RowStrides s, const Layout<T>& L, int64_t r0, int64_t n, acc_t* dst) {
  const int64_t C = L.C;
  const int64_t step = even_row_step(L.K, s);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
    if (transposes_by_block<T, acc_t>(C, step)) {
      j = transpose_whole_blocks<true>(base + L.at(r0, s), dst, step, C, n);
    }
  }
  for (; j < n; ++j) {
    const T* src = base + L.at(r0 + j, s);
    for (int64_t c = 0; c < C; ++c) {
      dst[c * kTileRows + j] = static_cast<acc_t>(src[c]);
    }
  }
}

// The reverse of gather_tile for a gradient with class stride gc: row
// (r0 + j), class c = src[c * kTileRows + j], rounded to T.
template <typename T, typename acc_t>
void scatter_tile(const acc_t* src, T* base, RowStrides s, int64_t gc, const Layout<T>& L, int64_t r0, int64_t n) {
  const int64_t C = L.C;
  const int64_t step = even_row_step(L.K, s);
  int64_t j = 0;
  if constexpr (std::is_same_v<T, float> && std::is_same_v<acc_t, float>) {
    // A step below C would make rows overlap: a gradient never does, but the
    // block path would then depend on the order of its stores.
    if (gc == 1 && step >= C && transposes_by_block<T, acc_t>(C, step)) {
      j = transpose_whole_blocks<false>(base + L.at(r0, s), src, step, C, n);
    }
  }
  for (; j < n; ++j) {
    T* dst = base + L.at(r0 + j, s);
    for (int64_t c = 0; c < C; ++c) {
      dst[c * gc] = static_cast<T>(src[c * kTileRows + j]);
    }
  }
}

// Note [Kept exps]
// In the fused forward+backward (Note [Gradient in the forward]) the exp pass
// can keep exp(x - shift) for the whole row (fp32, in L2 for LLM rows), so
// the gradient becomes (a * exp(shift - lse)) * kept - d * coef: one exp per
// logit for forward and backward together instead of two. Only for the rows
// walk with C <= kMaxKeptExps (the kept row must stay in cache to pay off).
template <typename acc_t>
struct RowExps {
  const acc_t* e;      // exp(x_c - shift of c's chunk), c in [0, C)
  const acc_t* shift;  // accumulation shift of each chunk
};

constexpr int64_t kMaxKeptExps = 1 << 18;

// Whether a kColumns tile (step rows of C classes) keeps its exps: up to
// 4 x kChunk values, so short class dims (segmentation) do and a transposed
// LLM-sized row does not. Depends on the shape only.
inline bool keeps_column_exps(int64_t C, int64_t step) {
  return C * step <= 4 * kChunk;
}

// Note [Recomputed equals fused]
// The backward of index targets recomputes the gradient only when the fused
// one cannot be used (reduction 'none', a second backward, a non-unit
// upstream gradient in bf16/fp16). autograd.gradcheck runs the backward twice
// and requires identical bits, so the recomputation takes its exps exactly as
// the fused forward keeps them: the same stats function on the same chunk or
// tile, then the same gradient function. It costs the recomputation a max
// pass over each chunk, from L1.
//
// Note [Kept exps in a tile]
// Note [Kept exps] for the column walks: for rows of few classes
// (kGatheredColumns) the stats walk keeps the tile it transposed and the exps
// it took, so the fused gradient neither gathers the rows again nor takes a
// second exp per logit (both were a fifth of a C = 10 forward+backward); for
// class-strided tiles (kColumns, NCHW) it keeps the exps when the tile's are
// few (keeps_column_exps), which also spares the one-hot element its scalar
// exp. The per-row factor
// a * exp(shift - lse) is taken a vector of rows at a time, its exponent
// rounded to acc_t first: shift - lse is -log(sum_exp), at most log(C) in
// size, so that rounding moves the gradient by under 2 ulp of fp32.
//
// What the column walks keep of a tile of rows for the fused gradient (Note
// [Kept exps in a tile]): exp(x - shift), column-major, which the gradient
// walk may overwrite.
template <typename acc_t>
struct TileExps {
  acc_t* e;            // e[c * stride + j] = exp(x - shift[j]) of row r0 + j, class c
  const acc_t* shift;  // accumulation shift of each row of the tile
  int64_t stride;      // kTileRows (gathered columns) or the vector step (columns)
};

// No-op hook for for_each_row_stats.
struct NoAfter {
  template <typename E>
  void operator()(int64_t, int64_t, const E*) const {}
};

// log_sum[j] = log(st[j].sum_exp) for n <= kMax rows, one vector log per
// vector of rows (Note [One log per row]): Sleef's 1-ulp log on AVX2/AVX512,
// std::log lane by lane on the default ISA. fp32 accumulation takes the log
// in fp32 (Note [Log in the accumulation type]).
template <int64_t kMax, typename acc_t>
void row_logs(const RowStats<acc_t>* st, int64_t n, double* log_sum) {
  using V = Vectorized<acc_t>;
  static_assert(kMax % V::size() == 0, "whole vectors");
  acc_t sums[kMax];
  acc_t logs[kMax];
  for (int64_t j = 0; j < kMax; ++j) {
    sums[j] = j < n ? st[j].sum_exp : acc_t(1);  // lanes past n: log(1), dropped
  }
  for (int64_t j = 0; j < n; j += V::size()) {
    V::loadu(sums + j).log().store(logs + j);
  }
  for (int64_t j = 0; j < n; ++j) {
    log_sum[j] = static_cast<double>(logs[j]);
  }
}

// Calls finish(r0, n, stats, log_sum) for consecutive rows r0 .. r0 + n - 1
// (n <= kMaxFinishRows: one row in the rows walk, a vector group of rows in
// the column walks, Note [Finishing rows in groups]), with stats[j]
// accumulated over the whole row r0 + j and log_sum[j] =
// math::row_log(stats[j].sum_exp) (taken a group of rows at a time in the
// column walks), walking the layout as choose_walk decides. Rows run in
// parallel; when rows are few and long, their chunks run in parallel too and
// are merged afterwards, in the same order as the sequential path, so both
// give identical bits. After rows [r0, r0 + n) are finished, the same thread
// calls after(r0, n) while their logits are still in cache (the fused
// forward+backward writes their gradient there: Note [Gradient in the
// forward]); n and r0 follow the walk's tiles.
template <typename T, Coef kCoef, typename Finish, typename After = NoAfter>
void for_each_row_stats(const Layout<T>& L, const CoefSource<T>& coef, const Finish& finish, const After& after = After{}) {
  using acc_t = acc_type<T>;
  constexpr int64_t kStep = VecIO<T>::kStep;
  const int64_t R = L.rows(), C = L.C;
  switch (choose_walk(L)) {
    case Walk::kColumns: {
      const Layout<T> Lc = columns_view(L);
      const ColumnTiles tiles(Lc.N, Lc.K, kStep);
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (kStep * C));
      // Kept for the fused gradient of index targets when the tile's exps are
      // few (Note [Kept exps in a tile]).
      const bool keep = !std::is_same_v<After, NoAfter> && !uses_target(kCoef) && keeps_column_exps(C, kStep);
      at::parallel_for(0, tiles.count, grain, [&](int64_t begin, int64_t end) {
        RowStats<acc_t> st[kStep];
        double log_sum[kStep];
        acc_t shift[kStep];
        std::vector<acc_t> kept(keep ? static_cast<size_t>(C * kStep) : 0);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = tiles.n(t) * Lc.K + tiles.k0(t);
          const int64_t npos = tiles.size(t);
          const RowView<T> first = Lc.row(r0);
          column_stats<T, kCoef>(
              first.x, Lc.xc, first.q, Lc.qc, coef, C, npos, st, keep ? kept.data() : nullptr, kStep, shift);
          row_logs<kStep>(st, npos, log_sum);
          finish(r0, npos, st, log_sum);
          if (keep) {
            const TileExps<acc_t> tile{kept.data(), shift, kStep};
            after(r0, npos, &tile);
          } else {
            after(r0, npos, static_cast<const RowExps<acc_t>*>(nullptr));
          }
        }
      });
      return;
    }
    case Walk::kGatheredColumns: {
      constexpr int64_t kGroup = VecIO<acc_t>::kStep;
      const int64_t tiles = (R + kTileRows - 1) / kTileRows;
      const int64_t grain = std::max<int64_t>(1, kGrainElements / (kTileRows * C));
      CoefSource<acc_t> gathered;
      gathered.w = coef.w;
      gathered.q_scale = coef.q_scale;
      gathered.q_shift = coef.q_shift;
      // Kept only for the fused gradient of index targets (the only after hook).
      constexpr bool kKeep = !std::is_same_v<After, NoAfter> && !uses_target(kCoef);
      at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
        Scratch<acc_t> scratch;
        RowStats<acc_t> st[kGroup];
        double log_sum[kGroup];
        acc_t shift[kTileRows];
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = t * kTileRows;
          const int64_t n = std::min(kTileRows, R - r0);
          gather_tile(L.x, L.xs, L, r0, n, scratch.x);
          if (uses_target(kCoef)) {
            gather_tile(L.q, L.qs, L, r0, n, scratch.q);
          }
          for (int64_t j0 = 0; j0 < n; j0 += kGroup) {
            const int64_t npos = std::min(kGroup, n - j0);
            column_stats<acc_t, kCoef>(
                scratch.x + j0, kTileRows, scratch.q + j0, kTileRows, gathered, C, npos, st,
                kKeep ? scratch.g + j0 : nullptr, kTileRows, shift + j0);
            row_logs<kGroup>(st, npos, log_sum);
            finish(r0 + j0, npos, st, log_sum);
          }
          if constexpr (kKeep) {
            const TileExps<acc_t> kept{scratch.g, shift, kTileRows};
            after(r0, n, &kept);
          } else {
            after(r0, n, static_cast<const RowExps<acc_t>*>(nullptr));
          }
        }
      });
      return;
    }
    case Walk::kRows:
      break;
  }
  const int64_t chunks = num_chunks(C);
  const bool split_rows = chunks > 1 && R < 4 * static_cast<int64_t>(at::get_num_threads());
  // Whether exps are kept depends on the shape only, never on the thread
  // count, so the fused gradient has the same bits on both paths below.
  constexpr bool kHasAfter = !std::is_same_v<After, NoAfter>;
  const bool keep = kHasAfter && C <= kMaxKeptExps;
  if (!split_rows) {
    const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      Scratch<acc_t> scratch;
      std::vector<acc_t> kept(keep ? static_cast<size_t>(C) : 0);
      std::vector<acc_t> shifts(keep ? static_cast<size_t>(chunks) : 0);
      const RowExps<acc_t> exps{kept.data(), shifts.data()};
      for (int64_t r = begin; r < end; ++r) {
        const RowView<T> row = L.row(r);
        RowStats<acc_t> st = empty_stats<acc_t>();
        for (int64_t c = 0; c < chunks; ++c) {
          const RowStats<acc_t> part = row_chunk_stats<T, kCoef>(
              row, coef, c * kChunk, chunk_len(C, c), scratch, keep ? kept.data() + c * kChunk : nullptr);
          if (keep) {
            shifts[c] = math::accumulation_shift(part.ref);
          }
          math::merge(st, part);
        }
        const double log_sum = math::row_log(st.sum_exp);
        finish(r, 1, &st, &log_sum);
        after(r, 1, keep ? &exps : nullptr);
      }
    });
    return;
  }
  // Few long rows (fewer than 4 per thread): all rows' exps are kept at once,
  // at most 4 x threads x kMaxKeptExps values.
  std::vector<RowStats<acc_t>> partial(static_cast<size_t>(R * chunks));
  std::vector<acc_t> kept(keep ? static_cast<size_t>(R * C) : 0);
  std::vector<acc_t> shifts(keep ? static_cast<size_t>(R * chunks) : 0);
  at::parallel_for(0, R * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks;
      const int64_t c = item % chunks;
      partial[item] = row_chunk_stats<T, kCoef>(
          L.row(r), coef, c * kChunk, chunk_len(C, c), scratch, keep ? kept.data() + r * C + c * kChunk : nullptr);
      if (keep) {
        shifts[item] = math::accumulation_shift(partial[item].ref);
      }
    }
  });
  for (int64_t r = 0; r < R; ++r) {
    RowStats<acc_t> st = empty_stats<acc_t>();
    for (int64_t c = 0; c < chunks; ++c) {
      math::merge(st, partial[r * chunks + c]);
    }
    const double log_sum = math::row_log(st.sum_exp);
    finish(r, 1, &st, &log_sum);
  }
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const RowExps<acc_t> exps{kept.data() + r * C, shifts.data() + r * chunks};
      after(r, 1, keep ? &exps : nullptr);
    }
  });
}

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

// Upstream gradient of row r: per-row for 'none', the scalar otherwise.
template <typename T>
struct GradOut {
  using acc_t = acc_type<T>;
  const T* per_row = nullptr;
  int64_t sn = 0, sk = 0, K = 1;
  acc_t scalar = 0;

  // A known scalar upstream gradient (the fused forward+backward uses 1).
  explicit GradOut(double scalar_) : scalar(static_cast<acc_t>(scalar_)) {}

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
    return per_row ? static_cast<acc_t>(per_row[row_offset(r, K, sn, sk)]) : scalar;
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

// What the backward needs of row r: grad = a * softmax - d * coef, minus b at
// class y (y < 0: no one-hot term), with softmax from the saved lse.
template <typename acc_t>
struct GradPlan {
  math::GradCoefs<acc_t> k;
  double lse;
  int64_t y;
};

// The one-hot element, rewritten after the vector code wrote a * p - d * coef
// there. coef_y is 0 when there are no coefficients.
template <typename acc_t>
acc_t one_hot_grad(acc_t x_y, acc_t coef_y, const GradPlan<acc_t>& plan) {
  const math::SplitLse<acc_t> lse = math::split_lse<acc_t>(plan.lse);
  return plan.k.a * std::exp((x_y - lse.hi) - lse.lo) - plan.k.d * coef_y - plan.k.b;
}

template <typename T, Coef kCoef>
acc_type<T> coef_at(const CoefSource<T>& coef, const RowView<T>& row, int64_t c) {
  using acc_t = acc_type<T>;
  if constexpr (kCoef == Coef::kNone) {
    return acc_t(0);
  } else {
    acc_t v = 1;
    if constexpr (uses_target(kCoef)) {
      v = static_cast<acc_t>(row.q[c * row.q_stride]) * coef.q_scale + coef.q_shift;
    }
    if constexpr (uses_weight(kCoef)) {
      v *= coef.w[c];
    }
    return v;
  }
}

// Input gradient of npos <= kStep adjacent rows (see column_stats), with
// per-row a, d and lse given lane by lane.
template <typename T, Coef kCoef>
void column_grad(
    const T* x,
    int64_t xc,
    const T* q,
    int64_t qc,
    T* grad,
    int64_t gc,
    const CoefSource<T>& coef,
    int64_t C,
    int64_t npos,
    const acc_type<T>* a,
    const acc_type<T>* d,
    const acc_type<T>* lse_hi,
    const acc_type<T>* lse_lo) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const bool full = npos == kStep;
  const V a0 = V::loadu(a), a1 = V::loadu(a + V::size());
  const V d0 = V::loadu(d), d1 = V::loadu(d + V::size());
  const V h0 = V::loadu(lse_hi), h1 = V::loadu(lse_hi + V::size());
  const V l0 = V::loadu(lse_lo), l1 = V::loadu(lse_lo + V::size());
  V xa, xb;
  for (int64_t c = 0; c < C; ++c) {
    if (full) {
      IO::load(x + c * xc, xa, xb);
    } else {
      IO::load(x + c * xc, npos, xa, xb);
    }
    V ga = a0 * vexp((xa - h0) - l0);
    V gb = a1 * vexp((xb - h1) - l1);
    if constexpr (kCoef != Coef::kNone) {
      V ca(acc_t(1)), cb(acc_t(1));
      if constexpr (uses_target(kCoef)) {
        if (full) {
          IO::load(q + c * qc, ca, cb);
        } else {
          IO::load(q + c * qc, npos, ca, cb);
        }
        ca = at::vec::fmadd(ca, V(coef.q_scale), V(coef.q_shift));
        cb = at::vec::fmadd(cb, V(coef.q_scale), V(coef.q_shift));
      }
      if constexpr (uses_weight(kCoef)) {
        ca = ca * V(coef.w[c]);
        cb = cb * V(coef.w[c]);
      }
      ga = ga - d0 * ca;
      gb = gb - d1 * cb;
    }
    if (full) {
      IO::store(grad + c * gc, ga, gb);
    } else {
      IO::store(grad + c * gc, npos, ga, gb);
    }
  }
}

// Per-lane plan arrays for column_grad; lanes past npos stay zero.
template <typename acc_t, int64_t kLanes>
struct LanePlans {
  acc_t a[kLanes] = {};
  acc_t d[kLanes] = {};
  acc_t hi[kLanes] = {};
  acc_t lo[kLanes] = {};
  void set(int64_t j, const GradPlan<acc_t>& p) {
    const math::SplitLse<acc_t> s = math::split_lse<acc_t>(p.lse);
    a[j] = p.k.a;
    d[j] = p.k.d;
    hi[j] = s.hi;
    lo[j] = s.lo;
  }
};

// Writes input gradients: grad[r] = plan_of(r) applied to row r's logits,
// walking the layout as choose_walk decides. Every element is independent,
// so any split across threads gives the same bits. run() covers all rows in
// parallel; rows(r0, n) covers one tile of for_each_row_stats's walk in the
// calling thread (the fused forward+backward).
template <typename T, Coef kCoef, typename PlanOf>
struct GradWalker {
  using acc_t = acc_type<T>;
  static constexpr int64_t kStep = VecIO<T>::kStep;
  static constexpr int64_t kGroup = VecIO<acc_t>::kStep;

  const Layout<T>& L;
  T* grad;
  int64_t gc;
  RowStrides gs;
  CoefSource<T> coef;
  const PlanOf& plan_of;
  Walk walk;
  Layout<T> Lc;      // columns_view(L)
  RowStrides gsc;    // columns_view(gs)
  CoefSource<acc_t> gathered;

  GradWalker(const Layout<T>& L_, T* grad_, int64_t gc_, RowStrides gs_, const CoefSource<T>& coef_, const PlanOf& plan_of_)
      : L(L_), grad(grad_), gc(gc_), gs(gs_), coef(coef_), plan_of(plan_of_), walk(choose_walk(L_, &gs_)),
        Lc(columns_view(L_)), gsc(columns_view(gs_, L_.K)) {
    gathered.w = coef.w;
    gathered.q_scale = coef.q_scale;
    gathered.q_shift = coef.q_shift;
  }

  // The buffer column_tile keeps a tile's exps in (empty when it keeps none).
  std::vector<acc_t> column_buffer() const {
    const bool keep = walk == Walk::kColumns && !uses_target(kCoef) && keeps_column_exps(L.C, kStep);
    return std::vector<acc_t>(keep ? static_cast<size_t>(L.C * kStep) : 0);
  }

  // kStep adjacent rows starting at r0 (kColumns); kept from column_buffer().
  void column_tile(int64_t r0, int64_t npos, std::vector<acc_t>& kept) const {
    if constexpr (!uses_target(kCoef)) {
      if (keeps_column_exps(L.C, kStep)) {
        // Exactly as the fused forward keeps them (Note [Recomputed equals fused]).
        RowStats<acc_t> st[kStep];
        acc_t shift[kStep];
        const RowView<T> first = Lc.row(r0);
        column_stats<T, kCoef>(first.x, Lc.xc, first.q, Lc.qc, coef, L.C, npos, st, kept.data(), kStep, shift);
        column_from_exps(r0, npos, TileExps<acc_t>{kept.data(), shift, kStep});
        return;
      }
    }
    GradPlan<acc_t> plans[kStep];
    LanePlans<acc_t, kStep> lanes;
    for (int64_t j = 0; j < npos; ++j) {
      plans[j] = plan_of(r0 + j);
      lanes.set(j, plans[j]);
    }
    const RowView<T> first = Lc.row(r0);
    T* g0 = grad + Lc.at(r0, gsc);
    column_grad<T, kCoef>(first.x, Lc.xc, first.q, Lc.qc, g0, gc, coef, L.C, npos, lanes.a, lanes.d, lanes.hi, lanes.lo);
    for (int64_t j = 0; j < npos; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {
        const RowView<T> row = Lc.row(r0 + j);
        g0[j + y * gc] = static_cast<T>(one_hot_grad<acc_t>(
            static_cast<acc_t>(row.x[y * row.x_stride]), coef_at<T, kCoef>(coef, row, y), plans[j]));
      }
    }
  }

  // Up to kTileRows rows of few classes, transposed through scratch (kGatheredColumns).
  void gathered_tile(int64_t r0, int64_t n, Scratch<acc_t>& scratch) const {
    const int64_t C = L.C;
    if constexpr (!uses_target(kCoef)) {
      // Index targets: the exps exactly as the fused forward keeps them (the
      // same column_stats), so the fused and the recomputed gradient agree
      // to the bit (Note [Recomputed equals fused]).
      gather_tile(L.x, L.xs, L, r0, n, scratch.x);
      RowStats<acc_t> st[kGroup];
      acc_t shift[kTileRows];
      for (int64_t j0 = 0; j0 < n; j0 += kGroup) {
        const int64_t npos = std::min(kGroup, n - j0);
        column_stats<acc_t, kCoef>(
            scratch.x + j0, kTileRows, nullptr, kTileRows, gathered, C, npos, st, scratch.g + j0, kTileRows, shift + j0);
      }
      tile_from_exps(r0, n, TileExps<acc_t>{scratch.g, shift, kTileRows});
      return;
    }
    GradPlan<acc_t> plans[kTileRows];
    gather_tile(L.x, L.xs, L, r0, n, scratch.x);
    if (uses_target(kCoef)) {
      gather_tile(L.q, L.qs, L, r0, n, scratch.q);
    }
    for (int64_t j0 = 0; j0 < n; j0 += kGroup) {
      const int64_t npos = std::min(kGroup, n - j0);
      LanePlans<acc_t, kGroup> lanes;
      for (int64_t j = 0; j < npos; ++j) {
        plans[j0 + j] = plan_of(r0 + j0 + j);
        lanes.set(j, plans[j0 + j]);
      }
      column_grad<acc_t, kCoef>(
          scratch.x + j0, kTileRows, scratch.q + j0, kTileRows, scratch.g + j0, kTileRows, gathered, C, npos,
          lanes.a, lanes.d, lanes.hi, lanes.lo);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {
        // The vector code left a * p_y - d * coef_y there, in acc_t (the
        // scratch is not rounded to T): subtracting b completes the one-hot
        // element with one more rounding, without a second exp of x_y (a
        // scalar expf per row was 7 % of a C = 10 forward+backward).
        scratch.g[y * kTileRows + j] -= plans[j].k.b;
      }
    }
    scatter_tile(scratch.g, grad, gs, gc, L, r0, n);
  }

  // Up to kTileRows rows from what the gathered-columns stats walk kept of
  // them (Note [Kept exps in a tile]); the gradient replaces the exps in place.
  // For rows r0 + j, j < n <= kMax: plans[j], d[j] and factor[j] =
  // a * exp(shift[j] - lse), the exp a vector of rows at a time (Note [Kept
  // exps in a tile]); factor and d past n, up to kMax, are 0.
  template <int64_t kMax>
  void tile_factors(int64_t r0, int64_t n, const acc_t* shift, GradPlan<acc_t>* plans, acc_t* factor, acc_t* d) const {
    using V = Vectorized<acc_t>;
    static_assert(kMax % V::size() == 0, "whole vectors");
    acc_t a[kMax];
    for (int64_t j = 0; j < n; ++j) {
      plans[j] = plan_of(r0 + j);
      a[j] = plans[j].k.a;
      d[j] = plans[j].k.d;
      factor[j] = static_cast<acc_t>(static_cast<double>(shift[j]) - plans[j].lse);
    }
    for (int64_t j = n; j < kMax; ++j) {  // only the tail: zeroing whole arrays showed in C = 10 profiles
      a[j] = factor[j] = d[j] = acc_t(0);
    }
    for (int64_t j = 0; j < n; j += V::size()) {
      (V::loadu(a + j) * vexp(V::loadu(factor + j))).store(factor + j);
    }
  }

  void tile_from_exps(int64_t r0, int64_t n, const TileExps<acc_t>& tile) const {
    using V = Vectorized<acc_t>;
    const int64_t C = L.C;
    GradPlan<acc_t> plans[kTileRows];
    acc_t factor[kTileRows];
    acc_t d[kTileRows];
    tile_factors<kTileRows>(r0, n, tile.shift, plans, factor, d);
    const int64_t n_vec = (n + V::size() - 1) / V::size() * V::size();
    for (int64_t c = 0; c < C; ++c) {
      acc_t* e = tile.e + c * kTileRows;
      acc_t w(1);
      if constexpr (uses_weight(kCoef)) {
        w = static_cast<acc_t>(coef.w[c]);
      }
      for (int64_t j = 0; j < n_vec; j += V::size()) {
        V g = V::loadu(factor + j) * V::loadu(e + j);
        if constexpr (kCoef != Coef::kNone) {
          g = g - V::loadu(d + j) * V(w);
        }
        g.store(e + j);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      if (plans[j].y >= 0) {
        tile.e[plans[j].y * kTileRows + j] -= plans[j].k.b;  // as in gathered_tile
      }
    }
    scatter_tile(tile.e, grad, gs, gc, L, r0, n);
  }

  // npos <= kStep adjacent rows of a kColumns tile from their kept exps
  // (Note [Kept exps in a tile]), written straight to the gradient.
  void column_from_exps(int64_t r0, int64_t npos, const TileExps<acc_t>& tile) const {
    using V = Vectorized<acc_t>;
    using IO = VecIO<T>;
    static_assert(kStep == 2 * V::size(), "two vectors per tile row");
    GradPlan<acc_t> plans[kStep];
    acc_t factor[kStep];
    acc_t d[kStep];
    tile_factors<kStep>(r0, npos, tile.shift, plans, factor, d);
    const V f0 = V::loadu(factor), f1 = V::loadu(factor + V::size());
    const V d0 = V::loadu(d), d1 = V::loadu(d + V::size());
    T* g0 = grad + Lc.at(r0, gsc);
    const bool full = npos == kStep;
    for (int64_t c = 0; c < L.C; ++c) {
      const acc_t* e = tile.e + c * tile.stride;
      V ga = f0 * V::loadu(e);
      V gb = f1 * V::loadu(e + V::size());
      if constexpr (kCoef != Coef::kNone) {
        const V w(uses_weight(kCoef) ? static_cast<acc_t>(coef.w[c]) : acc_t(1));
        ga = ga - d0 * w;
        gb = gb - d1 * w;
      }
      if (full) {
        IO::store(g0 + c * gc, ga, gb);
      } else {
        IO::store(g0 + c * gc, npos, ga, gb);
      }
    }
    for (int64_t j = 0; j < npos; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {  // the one-hot element, rounded to T once
        acc_t g = factor[j] * tile.e[y * tile.stride + j];
        if constexpr (kCoef != Coef::kNone) {
          g = g - d[j] * (uses_weight(kCoef) ? static_cast<acc_t>(coef.w[y]) : acc_t(1));
        }
        g0[j + y * gc] = static_cast<T>(g - plans[j].k.b);
      }
    }
  }

  // One chunk of one row (kRows).
  void row_chunk(int64_t r, int64_t chunk, Scratch<acc_t>& scratch) const {
    const GradPlan<acc_t> plan = plan_of(r);
    const RowView<T> row = L.row(r);
    T* grad_row = grad + L.at(r, gs);
    const int64_t c_begin = chunk * kChunk;
    const int64_t len = chunk_len(L.C, chunk);
    if (plan.k.a == 0 && plan.k.b == 0 && plan.k.d == 0 && std::isfinite(plan.lse)) {
      // Every softmax value is finite, so a * p - d * coef - b is exactly 0.
      for (int64_t i = 0; i < len; ++i) {
        grad_row[(c_begin + i) * gc] = T(0);
      }
      return;
    }
    if constexpr (!uses_target(kCoef)) {
      // Index targets: the exps exactly as the fused forward keeps them (the
      // same row_chunk_stats), so the fused and the recomputed gradient agree
      // to the bit (Note [Recomputed equals fused]).
      const RowStats<acc_t> part = row_chunk_stats<T, kCoef>(row, coef, c_begin, len, scratch, scratch.g);
      chunk_from_exps(plan, row, grad_row, chunk, scratch.g, math::accumulation_shift(part.ref));
    } else {
      row_chunk_grad<T, kCoef>(
          row, grad_row, gc, coef, c_begin, len, plan.k.a, plan.k.d, math::split_lse<acc_t>(plan.lse), scratch);
    }
    if (plan.y >= c_begin && plan.y < c_begin + len) {
      grad_row[plan.y * gc] = static_cast<T>(one_hot_grad<acc_t>(
          static_cast<acc_t>(row.x[plan.y * row.x_stride]), coef_at<T, kCoef>(coef, row, plan.y), plan));
    }
  }

  // One row from the exps the forward kept (Note [Kept exps]).
  void row_from_exps(int64_t r, const RowExps<acc_t>& exps) const {
    const GradPlan<acc_t> plan = plan_of(r);
    const RowView<T> row = L.row(r);
    T* grad_row = grad + L.at(r, gs);
    const int64_t C = L.C;
    if (plan.k.a == 0 && plan.k.b == 0 && plan.k.d == 0 && std::isfinite(plan.lse)) {
      for (int64_t c = 0; c < C; ++c) {
        grad_row[c * gc] = T(0);
      }
      return;
    }
    for (int64_t chunk = 0; chunk < num_chunks(C); ++chunk) {
      chunk_from_exps(plan, row, grad_row, chunk, exps.e + chunk * kChunk, exps.shift[chunk]);
    }
    if (plan.y >= 0) {
      grad_row[plan.y * gc] = static_cast<T>(one_hot_grad<acc_t>(
          static_cast<acc_t>(row.x[plan.y * row.x_stride]), coef_at<T, kCoef>(coef, row, plan.y), plan));
    }
  }

  // One chunk of a row's gradient from e = exp(x - shift) over the chunk
  // (the one-hot element is the caller's).
  void chunk_from_exps(
      const GradPlan<acc_t>& plan, const RowView<T>& row, T* grad_row, int64_t chunk, const acc_t* e, acc_t shift) const {
    using V = Vectorized<acc_t>;
    using IO = VecIO<T>;
    const V vd(plan.k.d);
    // softmax = kept * exp(shift - lse); the factor is formed in double.
    const acc_t a = plan.k.a * static_cast<acc_t>(std::exp(static_cast<double>(shift) - plan.lse));
    const V va(a);
    const int64_t c_begin = chunk * kChunk;
    const int64_t len = chunk_len(L.C, chunk);
    CoefSource<T> chunk_coef = coef;
    if (uses_weight(kCoef)) {
      chunk_coef.w = coef.w + c_begin;
    }
    V ca, cb;
    const auto grad_of = [&](const V& ev, const V& cv) {
      if constexpr (kCoef == Coef::kNone) {
        return va * ev;
      } else {
        return va * ev - vd * cv;
      }
    };
    if (gc == 1) {
      T* g = grad_row + c_begin;
      int64_t i = 0;
      for (; i + IO::kStep <= len; i += IO::kStep) {
        if constexpr (kCoef != Coef::kNone) {
          CoefLoader<T, kCoef>::load(chunk_coef, i, ca, cb);
        }
        IO::store(g + i, grad_of(V::loadu(e + i), ca), grad_of(V::loadu(e + i + V::size()), cb));
      }
      if (i < len) {
        const int64_t rest = len - i;
        if constexpr (kCoef != Coef::kNone) {
          CoefLoader<T, kCoef>::load(chunk_coef, i, rest, ca, cb);
        }
        const V ea = V::loadu(e + i, std::min<int64_t>(rest, V::size()));
        const V eb = rest > V::size() ? V::loadu(e + i + V::size(), rest - V::size()) : V(acc_t(0));
        IO::store(g + i, rest, grad_of(ea, ca), grad_of(eb, cb));
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t coef_i = coef_at<T, kCoef>(coef, row, c_begin + i);
        grad_row[(c_begin + i) * gc] = static_cast<T>(a * e[i] - plan.k.d * coef_i);
      }
    }
  }

  // A tile a column stats walk kept.
  void rows(int64_t r0, int64_t n, const TileExps<acc_t>* tile) const {
    if (walk == Walk::kGatheredColumns && tile->stride == kTileRows) {
      tile_from_exps(r0, n, *tile);
    } else if (walk == Walk::kColumns && tile->stride == kStep) {
      column_from_exps(r0, n, *tile);
    } else {  // a gradient laid out otherwise than the logits: its own walk
      rows(r0, n, static_cast<const RowExps<acc_t>*>(nullptr));
    }
  }

  void rows(int64_t r0, int64_t n, const RowExps<acc_t>* exps = nullptr) const {
    if constexpr (!uses_target(kCoef)) {
      if (exps && walk == Walk::kRows && n == 1) {
        row_from_exps(r0, *exps);
        return;
      }
    }
    Scratch<acc_t> scratch;
    if (walk == Walk::kColumns) {
      std::vector<acc_t> kept = column_buffer();
      for (int64_t j = 0; j < n;) {
        // Stay inside one column tile (rows of one n, aligned to kStep).
        const int64_t k = (r0 + j) % Lc.K;
        const int64_t npos = std::min({n - j, kStep - k % kStep, Lc.K - k});
        column_tile(r0 + j, npos, kept);
        j += npos;
      }
    } else if (walk == Walk::kGatheredColumns) {
      for (int64_t j = 0; j < n; j += kTileRows) {
        gathered_tile(r0 + j, std::min(kTileRows, n - j), scratch);
      }
    } else {
      const int64_t chunks = num_chunks(L.C);
      for (int64_t r = r0; r < r0 + n; ++r) {
        for (int64_t c = 0; c < chunks; ++c) {
          row_chunk(r, c, scratch);
        }
      }
    }
  }

  void run() const {
    const int64_t R = L.rows(), C = L.C;
    if (walk == Walk::kColumns) {
      const ColumnTiles tiles(Lc.N, Lc.K, kStep);
      at::parallel_for(0, tiles.count, std::max<int64_t>(1, kGrainElements / (kStep * C)), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> kept = column_buffer();
        for (int64_t t = begin; t < end; ++t) {
          column_tile(tiles.n(t) * Lc.K + tiles.k0(t), tiles.size(t), kept);
        }
      });
    } else if (walk == Walk::kGatheredColumns) {
      const int64_t tiles = (R + kTileRows - 1) / kTileRows;
      at::parallel_for(0, tiles, std::max<int64_t>(1, kGrainElements / (kTileRows * C)), [&](int64_t begin, int64_t end) {
        Scratch<acc_t> scratch;
        for (int64_t t = begin; t < end; ++t) {
          gathered_tile(t * kTileRows, std::min(kTileRows, R - t * kTileRows), scratch);
        }
      });
    } else {
      const int64_t chunks = num_chunks(C);
      const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(std::min(C, kChunk), 1));
      at::parallel_for(0, R * chunks, grain, [&](int64_t begin, int64_t end) {
        Scratch<acc_t> scratch;
        for (int64_t item = begin; item < end; ++item) {
          row_chunk(item / chunks, item % chunks, scratch);
        }
      });
    }
  }
};

template <typename T, Coef kCoef, typename PlanOf>
GradWalker<T, kCoef, PlanOf> make_grad_walker(
    const Layout<T>& L, const at::Tensor& grad, const CoefSource<T>& coef, const PlanOf& plan_of) {
  return GradWalker<T, kCoef, PlanOf>(
      L, grad.data_ptr<T>(), grad.stride(1), RowStrides{grad.stride(0), grad.stride(2)}, coef, plan_of);
}

// Everything about class-index targets that both the backward and the fused
// forward+backward need to turn a row into a GradPlan.
template <typename T>
struct IndexRows {
  using acc_t = acc_type<T>;
  int64_t C, K;
  const int64_t* target;
  int64_t tn, tk;
  const acc_t* w;
  acc_t weight_sum;  // Σ w (C without a weight)
  acc_t eps;
  int64_t ignore_index;

  IndexRows(const at::Tensor& input, const at::Tensor& target_, const at::Tensor& weight, int64_t ignore, double ls)
      : C(input.size(1)), K(input.size(2)), target(target_.data_ptr<int64_t>()), tn(target_.stride(0)),
        tk(target_.stride(1)), w(weight.defined() ? weight.data_ptr<acc_t>() : nullptr),
        eps(static_cast<acc_t>(ls)), ignore_index(ignore) {
    double sum = static_cast<double>(C);
    if (w) {
      sum = 0.0;
      for (int64_t c = 0; c < C; ++c) {
        sum += static_cast<double>(w[c]);
      }
    }
    weight_sum = static_cast<acc_t>(sum);
  }
  int64_t y(int64_t r) const {
    return target[row_offset(r, K, tn, tk)];
  }
  GradPlan<acc_t> plan(int64_t r, acc_t grad_scaled, double lse) const {
    const int64_t t = y(r);
    const bool valid = t != ignore_index;
    const acc_t w_y = valid && w ? w[t] : acc_t(1);
    return {math::index_grad_coefs<acc_t>(grad_scaled, valid, w_y, weight_sum, eps, C), lse, valid ? t : -1};
  }
};

// Note [Gradient in the forward]
// When the loss is about to be differentiated (input requires grad, reduction
// 'mean' or 'sum'), the forward also writes the gradient for an upstream
// gradient of 1, row by row, right after each row's statistics, while the
// row is still in cache: the logits are read from memory once for forward
// and backward together (1R + 1W instead of 2R + 1W), and the backward only
// rescales when the upstream gradient is not 1 (xent_ext/_ops.py). The mean's
// denominator, needed for that scale, is summed from the targets first.
template <typename T, Coef kCoef>
void index_forward_typed(const IndexForwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const int64_t C = input.size(1), K = input.size(2);
  const int64_t R = input.size(0) * K;
  const int64_t sn = input.stride(0), sc = input.stride(1), sk = input.stride(2);
  const T* x = input.data_ptr<T>();
  const IndexRows<T> rows(input, args.target, args.weight, args.ignore_index, args.label_smoothing);
  const bool smoothing = args.label_smoothing > 0;
  double* lse = args.lse.data_ptr<double>();
  const CoefSource<T> coef = weight_source<T>(args.weight);
  const Layout<T> L = make_layout<T>(input, nullptr);

  // Σ w[y] over non-ignored rows: the weighted mean's denominator.
  const std::unique_ptr<acc_t[]> row_weight = row_buffer<acc_t>(R);  // Note [Uninitialized row buffers]
  at::parallel_for(0, R, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t y = rows.y(r);
      row_weight[r] = y == rows.ignore_index ? acc_t(0) : (rows.w ? rows.w[y] : acc_t(1));
    }
  });
  const double total_weight = deterministic_sum(row_weight.get(), R);
  *args.total_weight.data_ptr<acc_t>() = static_cast<acc_t>(total_weight);
  const bool reduce = args.reduction != kReductionNone;
  const double denominator = args.reduction == kReductionMean ? total_weight : 1.0;

  // 'none', or no smoothing: the row loss. Reduced with smoothing: the nll
  // part, with the smoothing part in row_smooth (math::reduced_smoothed_loss).
  const std::unique_ptr<acc_t[]> row_loss = row_buffer<acc_t>(R);
  const std::unique_ptr<acc_t[]> row_smooth = reduce && smoothing ? row_buffer<acc_t>(R) : nullptr;
  acc_t* const loss_out = row_loss.get();
  acc_t* const smooth_out = row_smooth.get();
  const auto finish = [&](int64_t r0, int64_t n, const RowStats<acc_t>* st, const double* log_sum) {
    // Locals, not the closure's references: stores to the outputs cannot
    // make the compiler reload them (Note [Finishing rows in groups]).
    const int64_t* const target = rows.target;
    const int64_t tn = rows.tn, tk = rows.tk, ignore_index = rows.ignore_index;
    const acc_t* const w = rows.w;
    const acc_t eps = rows.eps;
    const T* const xp = x;
    double* const lse_out = lse;
    acc_t* const loss = loss_out;
    acc_t* const smooth = smooth_out;
    int64_t y[kMaxFinishRows];
    acc_t x_y[kMaxFinishRows];
    TORCH_INTERNAL_ASSERT(n <= kMaxFinishRows);
    for (int64_t j = 0; j < n; ++j) {
      lse_out[r0 + j] = math::log_sum_exp(st[j].ref, log_sum[j]);
      y[j] = target[row_offset(r0 + j, K, tn, tk)];
    }
    for (int64_t j = 0; j < n; ++j) {
      // An ignored row reads nothing: with C = 0 there is no logit to read.
      x_y[j] = y[j] == ignore_index ? acc_t(0) : static_cast<acc_t>(xp[row_offset(r0 + j, K, sn, sk) + y[j] * sc]);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t r = r0 + j;
      if (y[j] == ignore_index) {
        // torch selects rather than multiplies: an ignored row is exactly 0
        // even when its logits hold a nan.
        loss[r] = acc_t(0);
        if (smooth) {
          smooth[r] = acc_t(0);
        }
        continue;
      }
      const acc_t w_y = w ? w[y[j]] : acc_t(1);
      const acc_t log_sum_j = static_cast<acc_t>(log_sum[j]);
      if (!smooth) {
        loss[r] = math::index_row_loss(st[j], log_sum_j, x_y[j], w_y, eps, C, smoothing);
      } else {
        loss[r] = math::index_row_nll(st[j], log_sum_j, x_y[j], w_y);
        smooth[r] = math::index_row_smooth(st[j], log_sum_j);
      }
    }
  };
  if (args.grad_input.defined()) {
    // The scale from the stored, acc_t-rounded total weight, which is what a
    // recomputing backward reads (Note [Recomputed equals fused]).
    const double stored_denominator = args.reduction == kReductionMean
        ? static_cast<double>(*args.total_weight.data_ptr<acc_t>())
        : 1.0;
    const GradOut<T> unit(1.0 / stored_denominator);
    const auto plan_of = [&](int64_t r) { return rows.plan(r, unit(r), lse[r]); };
    const auto walker = make_grad_walker<T, kCoef>(L, args.grad_input, coef, plan_of);
    for_each_row_stats<T, kCoef>(L, coef, finish, [&](int64_t r0, int64_t n, const auto* exps) {
      walker.rows(r0, n, exps);
    });
  } else {
    for_each_row_stats<T, kCoef>(L, coef, finish);
  }

  if (!reduce) {
    write_rows<T>(args.loss, row_loss.get(), R);
    return;
  }
  const double nll_sum = deterministic_sum(row_loss.get(), R);
  write_scalar<T>(args.loss, smoothing
      ? math::reduced_smoothed_loss(nll_sum, deterministic_sum(row_smooth.get(), R), denominator, args.label_smoothing, C)
      : nll_sum / denominator);
}

template <typename T, Coef kCoef>
void index_backward_typed(const IndexBackwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const IndexRows<T> rows(input, args.target, args.weight, args.ignore_index, args.label_smoothing);
  const double* lse = args.lse.data_ptr<double>();
  const double scale = args.reduction == kReductionMean
      ? 1.0 / static_cast<double>(*args.total_weight.data_ptr<acc_t>())
      : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, input.size(2), scale);
  const auto plan_of = [&](int64_t r) { return rows.plan(r, grad_out(r), lse[r]); };
  const Layout<T> L = make_layout<T>(input, nullptr);
  make_grad_walker<T, kCoef>(L, args.grad_input, weight_source<T>(args.weight), plan_of).run();
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
  const int64_t C = input.size(1);
  const int64_t R = input.size(0) * input.size(2);
  double* lse = args.lse.data_ptr<double>();
  acc_t* coef_sum = args.coef_sum.data_ptr<acc_t>();
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);

  const std::unique_ptr<acc_t[]> row_loss = row_buffer<acc_t>(R);  // Note [Uninitialized row buffers]
  for_each_row_stats<T, kCoef>(
      make_layout<T>(input, &target), coef,
      [&](int64_t r0, int64_t n, const RowStats<acc_t>* st, const double* log_sum) {
        for (int64_t j = 0; j < n; ++j) {
          lse[r0 + j] = math::log_sum_exp(st[j].ref, log_sum[j]);
          coef_sum[r0 + j] = st[j].coef_sum;
          row_loss[r0 + j] = math::prob_row_loss(st[j], static_cast<acc_t>(log_sum[j]));
        }
      });
  if (args.reduction == kReductionNone) {
    write_rows<T>(args.loss, row_loss.get(), R);
    return;
  }
  // torch's mean divides by the number of rows N * d1 * ... * dk, not by weights.
  const double denominator = args.reduction == kReductionMean ? static_cast<double>(R) : 1.0;
  write_scalar<T>(args.loss, deterministic_sum(row_loss.get(), R) / denominator);
}

template <typename T, Coef kCoef>
void prob_backward_typed(const ProbBackwardArgs& args) {
  using acc_t = acc_type<T>;
  const at::Tensor& input = args.input;
  const at::Tensor& target = args.target;
  const int64_t C = input.size(1), K = input.size(2);
  const Layout<T> L = make_layout<T>(input, &target);
  const int64_t R = L.rows();
  const double* lse = args.lse.data_ptr<double>();
  const acc_t* coef_sum = args.coef_sum.data_ptr<acc_t>();
  const CoefSource<T> coef = prob_source<T>(args.weight, args.label_smoothing, C);
  const double scale = args.reduction == kReductionMean ? 1.0 / static_cast<double>(R) : 1.0;
  const GradOut<T> grad_out(args.grad_loss, args.reduction, K, scale);

  if (args.grad_input.defined()) {
    // grad_c = s * (p_c * Σ_c' w q - w_c q_c): a = s Σ w q, d = s, no one-hot.
    const auto plan_of = [&](int64_t r) {
      const acc_t s = grad_out(r);
      return GradPlan<acc_t>{{s * coef_sum[r], acc_t(0), s}, lse[r], -1};
    };
    make_grad_walker<T, kCoef>(L, args.grad_input, coef, plan_of).run();
  }
  if (args.grad_target.defined()) {
    // grad_target_c = -s (1 - eps) w_c (x_c - lse). Rare (targets that require
    // grad), so a plain loop over rows.
    const at::Tensor& gt = args.grad_target;
    T* g = gt.data_ptr<T>();
    const int64_t gtc = gt.stride(1);
    const RowStrides gts{gt.stride(0), gt.stride(2)};
    at::parallel_for(0, R, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(C, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const RowView<T> row = L.row(r);
        const math::SplitLse<acc_t> split = math::split_lse<acc_t>(lse[r]);
        const acc_t e = -grad_out(r) * coef.q_scale;
        T* grad_row = g + L.at(r, gts);
        for (int64_t c = 0; c < C; ++c) {
          const acc_t wc = coef.w ? coef.w[c] : acc_t(1);
          const acc_t xc = static_cast<acc_t>(row.x[c * row.x_stride]);
          grad_row[c * gtc] = static_cast<T>(e * wc * ((xc - split.hi) - split.lo));
        }
      }
    });
  }
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
