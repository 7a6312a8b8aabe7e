// Input gradients: grad = a * softmax - d * coef - b at the target class
// (math::GradCoefs), written by GradWalker over the same walks as the forward.
#pragma once

#include "common/xent_math.h"
#include "cpu/kernel/coef.h"
#include "cpu/kernel/exp.h"
#include "cpu/kernel/layout.h"
#include "cpu/kernel/map.h"
#include "cpu/kernel/stats.h"
#include "cpu/kernel/vec.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

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
    math::SoftmaxShift<acc_type<T>> shift) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const V va(a), vd(d), vm(shift.max), vl(shift.log_sum);
  V xa, xb, ca, cb;
  const auto grad_of = [&](const V& xv, const V& cv) {
    const V p = vexp((xv - vm) - vl);  // math::log_softmax's order
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

// out[i * stride] = g[i] * slope[i], rounded to T, for i < len: a gradient
// formed for z, times dz/dx (Note [Logit scale, softcap and z-loss]).
template <typename T>
void store_times_slope(const acc_type<T>* g, const acc_type<T>* slope, T* out, int64_t stride, int64_t len) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  if (stride != 1) {
    for (int64_t i = 0; i < len; ++i) {
      out[i * stride] = static_cast<T>(g[i] * slope[i]);
    }
    return;
  }
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    IO::store(out + i, V::loadu(g + i) * V::loadu(slope + i),
              V::loadu(g + i + V::size()) * V::loadu(slope + i + V::size()));
  }
  if (i < len) {
    const int64_t rest = len - i;
    const int64_t na = std::min<int64_t>(rest, V::size());
    const int64_t nb = rest - na;
    const V a = V::loadu(g + i, na) * V::loadu(slope + i, na);
    const V b = nb > 0 ? V::loadu(g + i + V::size(), nb) * V::loadu(slope + i + V::size(), nb) : V(acc_t(0));
    IO::store(out + i, rest, a, b);
  }
}

// g[c * ld + j] *= slope[c * ld + j] for c < C, j < n (a tile's gradient for
// z, column-major, times dz/dx).
template <typename acc_t>
void tile_times_slope(acc_t* g, const acc_t* slope, int64_t ld, int64_t C, int64_t n) {
  using V = Vectorized<acc_t>;
  for (int64_t c = 0; c < C; ++c) {
    acc_t* gc = g + c * ld;
    const acc_t* sc = slope + c * ld;
    for (int64_t j = 0; j < n; j += V::size()) {
      const int64_t k = std::min<int64_t>(V::size(), n - j);
      (V::loadu(gc + j, k) * V::loadu(sc + j, k)).store(gc + j, k);
    }
  }
}

// One chunk of one row's input gradient, any strides (Note [Strided class dim]).
// Mapped logits (kMapped) are mapped into scratch with their slopes, the
// gradient for z is formed there and multiplied by the slopes as it is stored.
template <typename T, Coef kCoef, bool kMapped = false>
void row_chunk_grad(
    const RowView<T>& row,
    T* grad_row,
    int64_t grad_stride,
    const CoefSource<T>& coef,
    int64_t c_begin,
    int64_t len,
    acc_type<T> a,
    acc_type<T> d,
    math::SoftmaxShift<acc_type<T>> shift,
    Scratch<acc_type<T>>& scratch,
    const VecMap<acc_type<T>>* map = nullptr) {
  using acc_t = acc_type<T>;
  if constexpr (kMapped) {
    const CoefSource<acc_t> gathered = map_gather_chunk<kCoef>(row, coef, c_begin, len, scratch, *map, scratch.s);
    chunk_grad<acc_t, kCoef>(scratch.x, scratch.g, gathered, len, a, d, shift);
    store_times_slope<T>(scratch.g, scratch.s, grad_row + c_begin * grad_stride, grad_stride, len);
    return;
  }
  if (grad_stride == 1 && classes_contiguous<kCoef>(row)) {
    chunk_grad<T, kCoef>(row.x + c_begin, grad_row + c_begin, chunk_source<kCoef>(coef, row, c_begin), len, a, d, shift);
    return;
  }
  const CoefSource<acc_t> gathered = gather_chunk<kCoef>(row, coef, c_begin, len, scratch);
  chunk_grad<acc_t, kCoef>(scratch.x, scratch.g, gathered, len, a, d, shift);
  for (int64_t i = 0; i < len; ++i) {
    grad_row[(c_begin + i) * grad_stride] = static_cast<T>(scratch.g[i]);
  }
}

// What the backward needs of row r: grad = a * softmax - d * coef, minus b at
// class y (y < 0: no one-hot term), with softmax from the saved row
// statistics (Note [Row max and log-sum apart]).
template <typename acc_t>
struct GradPlan {
  math::GradCoefs<acc_t> k;
  double max;      // row_stats[0]
  double log_sum;  // row_stats[1]
  int64_t y;

  math::SoftmaxShift<acc_t> shift() const {
    return math::softmax_shift<acc_t>(max, log_sum);
  }
  // Every gradient element is exactly 0 (an ignored row whose softmax is finite).
  bool zero() const {
    return k.a == 0 && k.b == 0 && k.d == 0 && math::finite_softmax(max, log_sum);
  }
};

// The coefficient of class c of a row, one element (0 without coefficients).
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

// The one-hot element of a row (class plan.y >= 0), written over what the
// vector code wrote there. Note [Read before write]: the callers take it
// before the vector code writes the row's gradient, which may be the logits
// themselves.
template <typename T, Coef kCoef, bool kMapped = false>
acc_type<T> one_hot_grad(const RowView<T>& row, const CoefSource<T>& coef, const GradPlan<acc_type<T>>& plan,
                         const VecMap<acc_type<T>>* map = nullptr) {
  using acc_t = acc_type<T>;
  acc_t z_y = static_cast<acc_t>(row.x[plan.y * row.x_stride]);
  acc_t slope_y = acc_t(1);
  if constexpr (kMapped) {
    map->z_slope(z_y, z_y, slope_y);
  }
  const acc_t coef_y = coef_at<T, kCoef>(coef, row, plan.y);
  const acc_t g = plan.k.a * std::exp(math::log_softmax(z_y, plan.shift())) - plan.k.d * coef_y - plan.k.b;
  if constexpr (kMapped) {
    return g * slope_y;
  }
  return g;
}

// Input gradient of npos <= kStep adjacent rows (see column_stats), with
// per-row a, d and the row statistics (math::SoftmaxShift) given lane by lane.
// Each class is loaded before its gradient is stored. kMapped: z and dz/dx
// from one tanh per logit, the gradient for z times dz/dx.
template <typename T, Coef kCoef, bool kMapped = false>
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
    const acc_type<T>* max,
    const acc_type<T>* log_sum,
    const VecMap<acc_type<T>>* map = nullptr) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  const V a0 = V::loadu(a), a1 = V::loadu(a + V::size());
  const V d0 = V::loadu(d), d1 = V::loadu(d + V::size());
  const V m0 = V::loadu(max), m1 = V::loadu(max + V::size());
  const V l0 = V::loadu(log_sum), l1 = V::loadu(log_sum + V::size());
  V xa, xb, sa, sb;
  for (int64_t c = 0; c < C; ++c) {
    load_upto(x + c * xc, npos, xa, xb);
    if constexpr (kMapped) {
      map->z_slope(xa, xa, sa);
      map->z_slope(xb, xb, sb);
    }
    V ga = a0 * vexp((xa - m0) - l0);  // math::log_softmax's order
    V gb = a1 * vexp((xb - m1) - l1);
    if constexpr (kCoef != Coef::kNone) {
      V ca, cb;
      CoefLoader<T, kCoef>::load_column(coef, q, qc, c, npos, ca, cb);
      ga = ga - d0 * ca;
      gb = gb - d1 * cb;
    }
    if constexpr (kMapped) {
      ga = ga * sa;
      gb = gb * sb;
    }
    store_upto(grad + c * gc, npos, ga, gb);
  }
}

// Per-lane plan arrays for column_grad; lanes past npos stay zero.
template <typename acc_t, int64_t kLanes>
struct LanePlans {
  acc_t a[kLanes] = {};
  acc_t d[kLanes] = {};
  acc_t max[kLanes] = {};
  acc_t log_sum[kLanes] = {};
  void set(int64_t j, const GradPlan<acc_t>& p) {
    const math::SoftmaxShift<acc_t> s = p.shift();
    a[j] = p.k.a;
    d[j] = p.k.d;
    max[j] = s.max;
    log_sum[j] = s.log_sum;
  }
};

// Note [Read before write]
// The *_grad_into_ ops write the gradient into the logits themselves, so
// every walk reads each logit before the gradient element at its address is
// written, and never after: a chunk, a column of a tile or a gathered tile
// is read (or its exps and slopes kept) before it is written, and the
// one-hot element, which reads x_y, is taken before the vector code writes
// the row. Rows and tiles are disjoint, so threads never read what another
// writes. The fused forward finishes a row (x_y for the loss included)
// before its gradient is written (for_each_row_stats' after hook).

// Writes input gradients: grad[r] = plan_of(r) applied to row r's logits,
// walking the layout as choose_walk decides. Every element is independent,
// so any split across threads gives the same bits. run() covers all rows in
// parallel; rows(r0, n) covers one tile of for_each_row_stats's walk in the
// calling thread (the fused forward+backward). kMapped: the logits are
// mapped (Note [Logit map on the CPU]) and every gradient element is formed
// for z and multiplied by dz/dx.
template <typename T, Coef kCoef, bool kMapped, typename PlanOf>
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
  VecMap<acc_t> map;

  GradWalker(const Layout<T>& L_, T* grad_, int64_t gc_, RowStrides gs_, const CoefSource<T>& coef_, const PlanOf& plan_of_)
      : L(L_), grad(grad_), gc(gc_), gs(gs_), coef(coef_), plan_of(plan_of_), walk(choose_walk(L_, &gs_)),
        Lc(columns_view(L_)), gsc(columns_view(gs_, L_.K)), gathered(gathered_source(coef_)), map(L_.map) {}

  // What column_tile keeps of a tile: its exps and, for mapped logits, their
  // slopes (both empty when it keeps none).
  struct ColumnKept {
    std::vector<acc_t> e;
    std::vector<acc_t> slope;
  };

  ColumnKept column_buffer() const {
    const bool keep = walk == Walk::kColumns && !uses_target(kCoef) && keeps_column_exps(L.C, kStep);
    const size_t n = keep ? static_cast<size_t>(L.C * kStep) : 0;
    return {std::vector<acc_t>(n), std::vector<acc_t>(kMapped ? n : 0)};
  }

  // kStep adjacent rows starting at r0 (kColumns); kept from column_buffer().
  void column_tile(int64_t r0, int64_t npos, ColumnKept& kept) const {
    if constexpr (!uses_target(kCoef)) {
      if (keeps_column_exps(L.C, kStep)) {
        // Exactly as the fused forward keeps them (Note [Recomputed equals fused]).
        RowStats<acc_t> st[kStep];
        acc_t shift[kStep];
        const RowView<T> first = Lc.row(r0);
        acc_t* slope = kMapped ? kept.slope.data() : nullptr;
        column_stats<T, kCoef, kMapped>(
            first.x, Lc.xc, first.q, Lc.qc, coef, L.C, npos, st, kept.e.data(), kStep, shift, &map, slope);
        column_from_exps(r0, npos, TileExps<acc_t>{kept.e.data(), shift, kStep, slope});
        return;
      }
    }
    GradPlan<acc_t> plans[kStep];
    LanePlans<acc_t, kStep> lanes;
    for (int64_t j = 0; j < npos; ++j) {
      plans[j] = plan_of(r0 + j);
      lanes.set(j, plans[j]);
    }
    // The one-hot elements first (Note [Read before write]).
    acc_t one_hot[kStep];
    for (int64_t j = 0; j < npos; ++j) {
      if (plans[j].y >= 0) {
        one_hot[j] = one_hot_grad<T, kCoef, kMapped>(Lc.row(r0 + j), coef, plans[j], &map);
      }
    }
    const RowView<T> first = Lc.row(r0);
    T* g0 = grad + Lc.at(r0, gsc);
    column_grad<T, kCoef, kMapped>(
        first.x, Lc.xc, first.q, Lc.qc, g0, gc, coef, L.C, npos, lanes.a, lanes.d, lanes.max, lanes.log_sum, &map);
    for (int64_t j = 0; j < npos; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {
        g0[j + y * gc] = static_cast<T>(one_hot[j]);
      }
    }
  }

  // Up to kTileRows rows of few classes, transposed through scratch
  // (kGatheredColumns). Mapped logits are mapped in the tile, their slopes
  // into scratch.s, and the tile's gradient is multiplied by them before it
  // is scattered.
  void gathered_tile(int64_t r0, int64_t n, Scratch<acc_t>& scratch) const {
    const int64_t C = L.C;
    if constexpr (!uses_target(kCoef)) {
      // Index targets: the exps exactly as the fused forward keeps them (the
      // same column_stats), so the fused and the recomputed gradient agree
      // to the bit (Note [Recomputed equals fused]).
      gather_tile(L.x, L.xs, L, r0, n, scratch.x);
      if constexpr (kMapped) {
        map_tile(map, scratch.x, scratch.s, kTileRows, C, n);
      }
      RowStats<acc_t> st[kGroup];
      acc_t shift[kTileRows];
      for (int64_t j0 = 0; j0 < n; j0 += kGroup) {
        const int64_t npos = std::min(kGroup, n - j0);
        column_stats<acc_t, kCoef>(
            scratch.x + j0, kTileRows, nullptr, kTileRows, gathered, C, npos, st, scratch.g + j0, kTileRows, shift + j0);
      }
      tile_from_exps(r0, n, TileExps<acc_t>{scratch.g, shift, kTileRows, kMapped ? scratch.s : nullptr});
      return;
    }
    GradPlan<acc_t> plans[kTileRows];
    gather_tile(L.x, L.xs, L, r0, n, scratch.x);
    if constexpr (kMapped) {
      map_tile(map, scratch.x, scratch.s, kTileRows, C, n);
    }
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
          lanes.a, lanes.d, lanes.max, lanes.log_sum);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {
        // The vector code left a * p_y - d * coef_y there, in acc_t (the
        // scratch is not rounded to T): subtracting b completes the one-hot
        // element with one more rounding, without a second exp of x_y (a
        // scalar expf per row shows in a short-row forward+backward).
        scratch.g[y * kTileRows + j] -= plans[j].k.b;
      }
    }
    if constexpr (kMapped) {
      tile_times_slope(scratch.g, scratch.s, kTileRows, C, n);
    }
    scatter_tile(scratch.g, grad, gs, gc, L, r0, n);
  }

  // For rows r0 + j, j < n <= kMax: plans[j], d[j] and factor[j] =
  // a * exp((shift[j] - m) - log_sum), the exp a vector of rows at a time
  // (Note [Kept exps in a tile]); factor and d past n, up to kMax, are 0.
  template <int64_t kMax>
  void tile_factors(int64_t r0, int64_t n, const acc_t* shift, GradPlan<acc_t>* plans, acc_t* factor, acc_t* d) const {
    using V = Vectorized<acc_t>;
    static_assert(kMax % V::size() == 0, "whole vectors");
    acc_t a[kMax];
    for (int64_t j = 0; j < n; ++j) {
      plans[j] = plan_of(r0 + j);
      a[j] = plans[j].k.a;
      d[j] = plans[j].k.d;
      factor[j] = static_cast<acc_t>((static_cast<double>(shift[j]) - plans[j].max) - plans[j].log_sum);
    }
    for (int64_t j = n; j < kMax; ++j) {  // only the tail: zeroing whole arrays showed in C = 10 profiles
      a[j] = factor[j] = d[j] = acc_t(0);
    }
    for (int64_t j = 0; j < n; j += V::size()) {
      (V::loadu(a + j) * vexp(V::loadu(factor + j))).store(factor + j);
    }
  }

  // Up to kTileRows rows from what the gathered-columns stats walk kept of
  // them (Note [Kept exps in a tile]); the gradient replaces the exps in place.
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
    if constexpr (kMapped) {
      tile_times_slope(tile.e, tile.slope, kTileRows, C, n);  // Note [Kept slopes]
    }
    scatter_tile(tile.e, grad, gs, gc, L, r0, n);
  }

  // npos <= kStep adjacent rows of a kColumns tile from their kept exps
  // (Note [Kept exps in a tile]) and, mapped, their kept slopes (Note [Kept
  // slopes]), written straight to the gradient; no logit is read.
  void column_from_exps(int64_t r0, int64_t npos, const TileExps<acc_t>& tile) const {
    using V = Vectorized<acc_t>;
    static_assert(kStep == 2 * V::size(), "two vectors per tile row");
    GradPlan<acc_t> plans[kStep];
    acc_t factor[kStep];
    acc_t d[kStep];
    tile_factors<kStep>(r0, npos, tile.shift, plans, factor, d);
    const V f0 = V::loadu(factor), f1 = V::loadu(factor + V::size());
    const V d0 = V::loadu(d), d1 = V::loadu(d + V::size());
    T* g0 = grad + Lc.at(r0, gsc);
    for (int64_t c = 0; c < L.C; ++c) {
      const acc_t* e = tile.e + c * tile.stride;
      V ga = f0 * V::loadu(e);
      V gb = f1 * V::loadu(e + V::size());
      if constexpr (kCoef != Coef::kNone) {
        const V w(uses_weight(kCoef) ? static_cast<acc_t>(coef.w[c]) : acc_t(1));
        ga = ga - d0 * w;
        gb = gb - d1 * w;
      }
      if constexpr (kMapped) {
        const acc_t* s = tile.slope + c * tile.stride;
        ga = ga * V::loadu(s);
        gb = gb * V::loadu(s + V::size());
      }
      store_upto(g0 + c * gc, npos, ga, gb);
    }
    for (int64_t j = 0; j < npos; ++j) {
      const int64_t y = plans[j].y;
      if (y >= 0) {  // the one-hot element, rounded to T once
        acc_t g = factor[j] * tile.e[y * tile.stride + j];
        if constexpr (kCoef != Coef::kNone) {
          g = g - d[j] * (uses_weight(kCoef) ? static_cast<acc_t>(coef.w[y]) : acc_t(1));
        }
        g = g - plans[j].k.b;
        if constexpr (kMapped) {
          g = g * tile.slope[y * tile.stride + j];
        }
        g0[j + y * gc] = static_cast<T>(g);
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
    if (plan.zero()) {
      // Every softmax value is finite, so a * p - d * coef - b is exactly 0.
      for (int64_t i = 0; i < len; ++i) {
        grad_row[(c_begin + i) * gc] = T(0);
      }
      return;
    }
    // The one-hot element first (Note [Read before write]).
    const bool has_y = plan.y >= c_begin && plan.y < c_begin + len;
    const acc_t g_y = has_y ? one_hot_grad<T, kCoef, kMapped>(row, coef, plan, &map) : acc_t(0);
    if constexpr (!uses_target(kCoef)) {
      // Index targets: the exps exactly as the fused forward keeps them (the
      // same row_chunk_stats), so the fused and the recomputed gradient agree
      // to the bit (Note [Recomputed equals fused]).
      acc_t* slope = kMapped ? scratch.s : nullptr;
      const RowStats<acc_t> part =
          row_chunk_stats<T, kCoef, kMapped>(row, coef, c_begin, len, scratch, scratch.g, &map, slope);
      chunk_from_exps(plan, row, grad_row, chunk, scratch.g, part.ref, slope);
    } else {
      row_chunk_grad<T, kCoef, kMapped>(
          row, grad_row, gc, coef, c_begin, len, plan.k.a, plan.k.d, plan.shift(), scratch, &map);
    }
    if (has_y) {
      grad_row[plan.y * gc] = static_cast<T>(g_y);
    }
  }

  // One row from the exps the forward kept (Note [Kept exps]).
  void row_from_exps(int64_t r, const RowExps<acc_t>& exps) const {
    const GradPlan<acc_t> plan = plan_of(r);
    const RowView<T> row = L.row(r);
    T* grad_row = grad + L.at(r, gs);
    const int64_t C = L.C;
    if (plan.zero()) {
      for (int64_t c = 0; c < C; ++c) {
        grad_row[c * gc] = T(0);
      }
      return;
    }
    // The one-hot element first (Note [Read before write]).
    const acc_t g_y = plan.y >= 0 ? one_hot_grad<T, kCoef, kMapped>(row, coef, plan, &map) : acc_t(0);
    for (int64_t chunk = 0; chunk < num_chunks(C); ++chunk) {
      chunk_from_exps(plan, row, grad_row, chunk, exps.e + chunk * kChunk, exps.ref[chunk],
                      kMapped ? exps.slope + chunk * kChunk : nullptr);
    }
    if (plan.y >= 0) {
      grad_row[plan.y * gc] = static_cast<T>(g_y);
    }
  }

  // One chunk of a row's gradient from e = exp(x - accumulation_shift(ref))
  // over the chunk, ref the chunk's max (the one-hot element is the
  // caller's); mapped, times the chunk's kept slopes (Note [Kept slopes]).
  void chunk_from_exps(const GradPlan<acc_t>& plan, const RowView<T>& row, T* grad_row, int64_t chunk, const acc_t* e,
                       acc_t ref, const acc_t* slope) const {
    using V = Vectorized<acc_t>;
    using IO = VecIO<T>;
    const V vd(plan.k.d);
    // softmax = kept * factor, the factor formed in double (Note [Kept exps
    // and the row statistics]).
    const acc_t a = plan.k.a * static_cast<acc_t>(math::kept_exp_factor(ref, plan.max, plan.log_sum));
    const V va(a);
    const int64_t c_begin = chunk * kChunk;
    const int64_t len = chunk_len(L.C, chunk);
    const CoefSource<T> chunk_coef = chunk_source<kCoef>(coef, row, c_begin);
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
        V ga = grad_of(V::loadu(e + i), ca);
        V gb = grad_of(V::loadu(e + i + V::size()), cb);
        if constexpr (kMapped) {
          ga = ga * V::loadu(slope + i);
          gb = gb * V::loadu(slope + i + V::size());
        }
        IO::store(g + i, ga, gb);
      }
      if (i < len) {
        const int64_t rest = len - i;
        if constexpr (kCoef != Coef::kNone) {
          CoefLoader<T, kCoef>::load(chunk_coef, i, rest, ca, cb);
        }
        const int64_t na = std::min<int64_t>(rest, V::size());
        const V ea = V::loadu(e + i, na);
        const V eb = rest > V::size() ? V::loadu(e + i + V::size(), rest - V::size()) : V(acc_t(0));
        V ga = grad_of(ea, ca);
        V gb = grad_of(eb, cb);
        if constexpr (kMapped) {
          ga = ga * V::loadu(slope + i, na);
          gb = gb * (rest > V::size() ? V::loadu(slope + i + V::size(), rest - V::size()) : V(acc_t(0)));
        }
        IO::store(g + i, rest, ga, gb);
      }
    } else {
      for (int64_t i = 0; i < len; ++i) {
        const acc_t coef_i = coef_at<T, kCoef>(coef, row, c_begin + i);
        acc_t g = a * e[i] - plan.k.d * coef_i;
        if constexpr (kMapped) {
          g = g * slope[i];
        }
        grad_row[(c_begin + i) * gc] = static_cast<T>(g);
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
      ColumnKept kept = column_buffer();
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
        ColumnKept kept = column_buffer();
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

template <typename T, Coef kCoef, bool kMapped, typename PlanOf>
GradWalker<T, kCoef, kMapped, PlanOf> make_grad_walker(
    const Layout<T>& L, const at::Tensor& grad, const CoefSource<T>& coef, const PlanOf& plan_of) {
  return GradWalker<T, kCoef, kMapped, PlanOf>(
      L, grad.data_ptr<T>(), grad.stride(1), RowStrides{grad.stride(0), grad.stride(2)}, coef, plan_of);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
