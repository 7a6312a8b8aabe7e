// The logit map (logit_scale, softcap; Note [Logit scale, softcap and
// z-loss], common/xent_math.h) in vector form, and the chunks and tiles of
// mapped logits the mapped kernels work on.
#pragma once

#include "common/xent_math.h"
#include "cpu/kernel/coef.h"
#include "cpu/kernel/exp.h"
#include "cpu/kernel/layout.h"
#include "cpu/kernel/vec.h"

#include <algorithm>
#include <cstdint>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Note [Logit map on the CPU]
// math::LogitMap is the definition of z = map(x) and of its slope dz/dx; this
// is the same formula on vectors, from the same fields: z = cap * tanh(x *
// inner) and slope = scale * (1 - t * t) with t = tanh(x * inner) when
// softcap is on, z = x * scale and slope = scale when it is not (no FMA
// contraction on the CPU, so the vector products round as the scalar ones).
// tanh is vtanh (Note [Fast tanh], exp.h: a few ulp for fp32, Sleef's for
// fp64), which may differ from std::tanh by a few ulp. So
// every logit of a call, the target logit and the one-hot element of the
// gradient included, is mapped by these vector functions (one element as a
// broadcast vector): a row's z values are then the same numbers wherever they
// are read, the target logit that is the row's maximum gives (m - z_y) = 0
// exactly, and the fused and the recomputed gradient take the same bits
// (Note [Recomputed equals fused]). The walks take a compile-time kMapped,
// true in the extras variant (Note [The extras variant], entry.h): the
// default variant instantiates nothing of this, and the mapped one tells
// scale alone from softcap by a branch that is the same for the whole call.
template <typename acc_t>
struct VecMap {
  using V = Vectorized<acc_t>;
  V scale, cap, inner;
  bool capped;

  explicit VecMap(const math::LogitMap<acc_t>& m)
      : scale(m.scale), cap(m.cap), inner(m.inner), capped(m.cap != acc_t(0)) {}

  V z(const V& x) const {
    return capped ? cap * vtanh(x * inner) : x * scale;
  }
  void z_slope(const V& x, V& z, V& slope) const {
    if (capped) {
      const V t = vtanh(x * inner);
      z = cap * t;
      slope = scale * (V(acc_t(1)) - t * t);
    } else {
      z = x * scale;
      slope = scale;
    }
  }
  // One logit, as a broadcast vector (Note [Logit map on the CPU]).
  void z_slope(acc_t x, acc_t& z_out, acc_t& slope_out) const {
    V zv, sv;
    z_slope(V(x), zv, sv);
    z_out = first_lane(zv);
    slope_out = first_lane(sv);
  }
  static acc_t first_lane(const V& v) {
    acc_t lanes[V::size()];
    v.store(lanes);
    return lanes[0];
  }

  // v[i] = map(v[i]) for i < n, and slope[i] its slope when slope is not
  // null. Lanes past n are neither read nor written.
  void apply(acc_t* v, acc_t* slope, int64_t n) const {
    int64_t i = 0;
    V zv, sv;
    for (; i + V::size() <= n; i += V::size()) {
      z_slope(V::loadu(v + i), zv, sv);
      zv.store(v + i);
      if (slope) {
        sv.store(slope + i);
      }
    }
    if (i < n) {
      z_slope(V::loadu(v + i, n - i), zv, sv);
      zv.store(v + i, n - i);
      if (slope) {
        sv.store(slope + i, n - i);
      }
    }
  }
};

// z[i] = map(x[i * stride]) for i < len, widened to acc_t, and slope[i] its
// slope when slope is not null. Contiguous logits are mapped as they are
// loaded; strided ones are gathered first.
template <typename T>
void map_chunk(const VecMap<acc_type<T>>& map, const T* x, int64_t stride, int64_t len, acc_type<T>* z,
               acc_type<T>* slope) {
  using acc_t = acc_type<T>;
  using V = Vectorized<acc_t>;
  using IO = VecIO<T>;
  if (stride != 1) {
    for (int64_t i = 0; i < len; ++i) {
      z[i] = static_cast<acc_t>(x[i * stride]);
    }
    map.apply(z, slope, len);
    return;
  }
  int64_t i = 0;
  V a, b, sa, sb;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    IO::load(x + i, a, b);
    map.z_slope(a, a, sa);
    map.z_slope(b, b, sb);
    a.store(z + i);
    b.store(z + i + V::size());
    if (slope) {
      sa.store(slope + i);
      sb.store(slope + i + V::size());
    }
  }
  if (i < len) {
    const int64_t rest = len - i;
    const int64_t na = std::min<int64_t>(rest, V::size());
    IO::load(x + i, rest, a, b);
    map.z_slope(a, a, sa);
    map.z_slope(b, b, sb);
    a.store(z + i, na);
    if (slope) {
      sa.store(slope + i, na);
    }
    if (rest > V::size()) {
      b.store(z + i + V::size(), rest - V::size());
      if (slope) {
        sb.store(slope + i + V::size(), rest - V::size());
      }
    }
  }
}

// The chunk's z = map(x) into scratch.x (and its slopes into `slope` when not
// null), with its coefficients as gather_chunk gives them: the mapped
// kernels run the accumulation-type code on it (Note [Logit map on the CPU]).
template <Coef kCoef, typename T>
CoefSource<acc_type<T>> map_gather_chunk(
    const RowView<T>& row, const CoefSource<T>& coef, int64_t c_begin, int64_t len, Scratch<acc_type<T>>& scratch,
    const VecMap<acc_type<T>>& map, acc_type<T>* slope) {
  map_chunk<T>(map, row.x + c_begin * row.x_stride, row.x_stride, len, scratch.x, slope);
  return gathered_chunk_source<kCoef>(row, coef, c_begin, len, scratch);
}

// The same for a gathered tile (column-major, kTileRows apart, n rows): the
// tile's logits are replaced by their z, and slope (same indexing) receives
// the slopes when not null.
template <typename acc_t>
void map_tile(const VecMap<acc_t>& map, acc_t* tile, acc_t* slope, int64_t ld, int64_t C, int64_t n) {
  for (int64_t c = 0; c < C; ++c) {
    map.apply(tile + c * ld, slope ? slope + c * ld : nullptr, n);
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
