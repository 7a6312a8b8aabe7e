// Forward statistics (Note [Row statistics]) of chunks, tiles and whole rows,
// and for_each_row_stats, which walks a layout and hands each row's
// statistics to the caller.
#pragma once

#include "common/xent_math.h"
#include "cpu/kernel/coef.h"
#include "cpu/kernel/exp.h"
#include "cpu/kernel/layout.h"
#include "cpu/kernel/map.h"
#include "cpu/kernel/vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

using math::RowStats;

// Note [Max ignoring nan]
// The rows walk's max pass (chunk_stats) takes max(m, x) in one instruction
// (clamp_min's max keeps m when x is nan) instead of at::vec::maximum's three
// (max, unordered compare, or), a visible saving on long fp32 rows. A nan is
// not lost: the exp pass sums exp(nan - shift) = nan into sum_exp, and the
// chunk's stats then mark ref nan too (`nan_if_sum_is`), so math::merge
// cannot drop a chunk of only nans as one without probability mass (Note
// [Rows of -inf]), and a row's stats read as before: ref and sum_exp nan,
// hence nan row statistics, loss and gradient, as in torch. The column walks keep
// at::vec::maximum: there the same change measured slower, for reasons not
// found.
template <typename V>
inline V max_ignoring_nan(const V& m, const V& x) {
  return at::vec::clamp_min(m, x);
}

template <typename acc_t>
inline acc_t nan_if_sum_is(acc_t ref, acc_t sum_exp) {
  return sum_exp != sum_exp ? sum_exp : ref;
}

// Statistics of one contiguous chunk of a row. keep_exp, when not null,
// receives exp(x_i - accumulation_shift(ref)) for the chunk (Note [Kept
// exps]). The exp pass prefetches the chunk one ahead of x (Note [Prefetch]),
// or, when `next` is given, from `next` on: a chunk mapped into scratch
// (Note [Logit map on the CPU]) prefetches the logits it came from.
template <typename T, Coef kCoef, typename P = T>
RowStats<acc_type<T>> chunk_stats(
    const T* x, const CoefSource<T>& coef, int64_t n, acc_type<T>* keep_exp = nullptr, const P* next = nullptr) {
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
  static_assert(VecIO<P>::kStep == kStep, "one prefetch step per step");
  const P* ahead = next;
  if constexpr (std::is_same_v<P, T>) {
    ahead = next ? next : x + kChunk;
  }
  for (int64_t i = 0; i < n_full; i += kStep) {
    if (std::is_same_v<P, T> || ahead) {
      prefetch_step(ahead + i);  // Note [Prefetch]
    }
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

// One chunk of a row, any class stride (Note [Strided class dim]). Mapped
// logits (kMapped, `map`) are mapped into scratch first and the
// accumulation-type code runs on their z; `slope`, when not null, receives
// dz/dx of the chunk (Note [Logit map on the CPU]).
template <typename T, Coef kCoef, bool kMapped = false>
RowStats<acc_type<T>> row_chunk_stats(
    const RowView<T>& row,
    const CoefSource<T>& coef,
    int64_t c_begin,
    int64_t len,
    Scratch<acc_type<T>>& scratch,
    acc_type<T>* keep_exp = nullptr,
    const VecMap<acc_type<T>>* map = nullptr,
    acc_type<T>* slope = nullptr) {
  using acc_t = acc_type<T>;
  if constexpr (kMapped) {
    const CoefSource<acc_t> gathered = map_gather_chunk<kCoef>(row, coef, c_begin, len, scratch, *map, slope);
    const T* next = row.x_stride == 1 ? row.x + c_begin + kChunk : nullptr;
    return chunk_stats<acc_t, kCoef, T>(scratch.x, gathered, len, keep_exp, next);
  }
  if (classes_contiguous<kCoef>(row)) {
    return chunk_stats<T, kCoef>(row.x + c_begin, chunk_source<kCoef>(coef, row, c_begin), len, keep_exp);
  }
  const CoefSource<acc_t> gathered = gather_chunk<kCoef>(row, coef, c_begin, len, scratch);
  return chunk_stats<acc_t, kCoef>(scratch.x, gathered, len, keep_exp);
}

template <typename acc_t>
RowStats<acc_t> empty_stats() {
  return {math::neg_inf<acc_t>(), acc_t(0), acc_t(0), acc_t(0)};
}

// Statistics of npos <= kStep rows whose classes are xc apart and whose rows
// are adjacent: vectors across rows, one pass for the max and one for the
// sums, classes in order (the same order for every lane and every thread).
// keep_exp, when not null, receives exp(x - shift) at keep_exp[c * keep_stride
// + j] and keep_shift[j] the shift (math::accumulation_shift of the max), for
// kStep lanes (Note [Kept exps in a tile]). kMapped: every logit is mapped in
// registers as it is loaded, in both passes (the same function, so the same
// z), and keep_slope, when not null, receives dz/dx as keep_exp its exps.
template <typename T, Coef kCoef, bool kMapped = false>
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
    acc_type<T>* keep_shift = nullptr,
    const VecMap<acc_type<T>>* map = nullptr,
    acc_type<T>* keep_slope = nullptr) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  constexpr int64_t kStep = IO::kStep;
  const V neg_inf(math::neg_inf<acc_t>());
  const V zero(acc_t(0));
  V xa, xb, m0 = neg_inf, m1 = neg_inf;
  for (int64_t c = 0; c < C; ++c) {
    load_upto(x + c * xc, npos, xa, xb);
    if constexpr (kMapped) {
      xa = map->z(xa);
      xb = map->z(xb);
    }
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
    load_upto(x + c * xc, npos, xa, xb);
    if constexpr (kMapped) {
      V sa, sb;
      map->z_slope(xa, xa, sa);
      map->z_slope(xb, xb, sb);
      if (keep_slope) {
        sa.store(keep_slope + c * keep_stride);
        sb.store(keep_slope + c * keep_stride + V::size());
      }
    }
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
      V ca, cb;
      CoefLoader<T, kCoef>::load_column(coef, q, qc, c, npos, ca, cb);
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

// Note [Finishing rows in groups]
// The column walks hand their finish a vector's worth of rows at once (the
// rows walk one row). Finishing index-target rows one call at a time (target
// lookup, x[y], the loss) was a large share of a short-row forward, and the
// compiler reloaded the closure's pointers after every store. A group runs
// as short loops over local copies (what remains is the scalar work itself,
// see benchmarks/NOTES.md).
constexpr int64_t kMaxFinishRows = kTileRows;

// Note [Kept exps]
// In the fused forward+backward (Note [Gradient in the forward]) the exp pass
// can keep exp(x - shift) for the whole row (fp32, in L2 for LLM rows), so
// the gradient becomes (a * exp((shift - m) - log_sum)) * kept - d * coef
// (Note [Kept exps and the row statistics]): one exp per logit for forward
// and backward together instead of two. Only for the rows
// walk with C <= kMaxKeptExps (the kept row must stay in cache to pay off).
template <typename acc_t>
struct RowExps {
  const acc_t* e;      // exp(x_c - accumulation_shift(ref of c's chunk)), c in [0, C)
  const acc_t* ref;    // each chunk's max (RowStats::ref)
  const acc_t* slope;  // mapped logits: dz/dx of each class (Note [Kept slopes]); else null
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
// one cannot be used (a second backward through the same graph, a double
// backward, torch.compile). autograd.gradcheck runs the backward twice and
// requires identical bits, so the recomputation takes its exps exactly as
// the fused forward keeps them: the same stats function on the same chunk or
// tile, then the same gradient function. It costs the recomputation a max
// pass over each chunk, from L1.
//
// Note [Kept exps in a tile]
// Note [Kept exps] for the column walks: for rows of few classes
// (kGatheredColumns) the stats walk keeps the tile it transposed and the exps
// it took, so the fused gradient neither gathers the rows again nor takes a
// second exp per logit (both a large share of a short-row forward+backward);
// for class-strided tiles (kColumns, NCHW) it keeps the exps when the tile's
// are few (keeps_column_exps), which also spares the one-hot element its
// scalar exp. The per-row factor a * exp((shift - m) - log_sum) is taken a
// vector of rows at a time, its exponent rounded to acc_t first: a tile's
// shift is its row's max m (or 0 for a row of only -inf), so the exponent is
// -log_sum, at most log(C) in size, and that rounding moves the gradient by
// under 2 ulp of fp32.
//
// What the column walks keep of a tile of rows for the fused gradient (Note
// [Kept exps in a tile]): exp(x - shift), column-major, which the gradient
// walk may overwrite.
template <typename acc_t>
struct TileExps {
  acc_t* e;            // e[c * stride + j] = exp(x - shift[j]) of row r0 + j, class c
  const acc_t* shift;  // accumulation shift of each row of the tile
  int64_t stride;      // kTileRows (gathered columns) or the vector step (columns)
  const acc_t* slope = nullptr;  // mapped logits: dz/dx, indexed as e (Note [Kept slopes])
};

// Note [Kept slopes]
// With mapped logits the gradient is formed for z and multiplied by dz/dx
// (Note [Logit scale, softcap and z-loss]). With softcap, dz/dx takes the
// tanh the stats pass already took, so wherever exps are kept for the fused
// gradient (Note [Kept exps], Note [Kept exps in a tile]) the slopes are kept
// beside them, from the same tanh: the gradient from kept exps then reads
// neither the logits nor a second tanh, and never reads a logit after its
// gradient was written (the *_grad_into_ ops write into the logits). The
// recomputing backward keeps them the same way (Note [Recomputed equals
// fused]). The paths that recompute the gradient from x take z and its slope
// from one tanh per logit.

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
template <typename T, Coef kCoef, bool kMapped, typename Finish, typename After = NoAfter>
void for_each_row_stats(const Layout<T>& L, const CoefSource<T>& coef, const Finish& finish, const After& after = After{}) {
  using acc_t = acc_type<T>;
  constexpr int64_t kStep = VecIO<T>::kStep;
  const int64_t R = L.rows(), C = L.C;
  const VecMap<acc_t> map(L.map);
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
        std::vector<acc_t> kept_slope(keep && kMapped ? static_cast<size_t>(C * kStep) : 0);
        for (int64_t t = begin; t < end; ++t) {
          const int64_t r0 = tiles.n(t) * Lc.K + tiles.k0(t);
          const int64_t npos = tiles.size(t);
          const RowView<T> first = Lc.row(r0);
          column_stats<T, kCoef, kMapped>(
              first.x, Lc.xc, first.q, Lc.qc, coef, C, npos, st, keep ? kept.data() : nullptr, kStep, shift, &map,
              keep && kMapped ? kept_slope.data() : nullptr);
          row_logs<kStep>(st, npos, log_sum);
          finish(r0, npos, st, log_sum);
          if (keep) {
            const TileExps<acc_t> tile{kept.data(), shift, kStep, kMapped ? kept_slope.data() : nullptr};
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
      const CoefSource<acc_t> gathered = gathered_source(coef);
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
          if constexpr (kMapped) {
            map_tile(map, scratch.x, kKeep ? scratch.s : nullptr, kTileRows, C, n);
          }
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
            const TileExps<acc_t> kept{scratch.g, shift, kTileRows, kMapped ? scratch.s : nullptr};
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
      std::vector<acc_t> kept_slope(keep && kMapped ? static_cast<size_t>(C) : 0);
      std::vector<acc_t> refs(keep ? static_cast<size_t>(chunks) : 0);
      const RowExps<acc_t> exps{kept.data(), refs.data(), kMapped ? kept_slope.data() : nullptr};
      for (int64_t r = begin; r < end; ++r) {
        const RowView<T> row = L.row(r);
        RowStats<acc_t> st = empty_stats<acc_t>();
        for (int64_t c = 0; c < chunks; ++c) {
          const RowStats<acc_t> part = row_chunk_stats<T, kCoef, kMapped>(
              row, coef, c * kChunk, chunk_len(C, c), scratch, keep ? kept.data() + c * kChunk : nullptr, &map,
              keep && kMapped ? kept_slope.data() + c * kChunk : nullptr);
          if (keep) {
            refs[c] = part.ref;
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
  std::vector<acc_t> kept_slope(keep && kMapped ? static_cast<size_t>(R * C) : 0);
  std::vector<acc_t> refs(keep ? static_cast<size_t>(R * chunks) : 0);
  at::parallel_for(0, R * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / chunks;
      const int64_t c = item % chunks;
      partial[item] = row_chunk_stats<T, kCoef, kMapped>(
          L.row(r), coef, c * kChunk, chunk_len(C, c), scratch, keep ? kept.data() + r * C + c * kChunk : nullptr,
          &map, keep && kMapped ? kept_slope.data() + r * C + c * kChunk : nullptr);
      if (keep) {
        refs[item] = partial[item].ref;
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
      const RowExps<acc_t> exps{kept.data() + r * C, refs.data() + r * chunks,
                                kMapped ? kept_slope.data() + r * C : nullptr};
      after(r, 1, keep ? &exps : nullptr);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
