// The canonical (N, C, K) view of the logits: rows, chunks, the three walks
// over it, and moving rows in and out of contiguous scratch.
#pragma once

#include "cpu/kernel/coef.h"
#include "cpu/kernel_api.h"

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Note [Chunks]
// A row is processed in chunks of kChunk classes: a max pass then an exp-sum
// pass over the same chunk, which is still in L1 (8 KB of fp32), so each logit
// is read from memory once. Chunks are merged with math::merge in chunk order,
// whatever thread computed them, so results are bitwise independent of the
// thread count. Long rows with few of them are split across threads by chunk.
constexpr int64_t kChunk = 2048;

// Rows per task when parallelizing: about this many elements per task.
constexpr int64_t kGrainElements = 32768;

int64_t num_chunks(int64_t C) {
  return C == 0 ? 0 : (C + kChunk - 1) / kChunk;
}

int64_t chunk_len(int64_t C, int64_t chunk) {
  return std::min<int64_t>(kChunk, C - chunk * kChunk);
}

// Offsets of row r = n * K + k in a tensor with these (n, k) strides.
struct RowStrides {
  int64_t n = 0;
  int64_t k = 0;
};

// A row of the canonical (N, C, K) view: its first logit, the class stride,
// and the matching probability-target row (if any).
template <typename T>
struct RowView {
  const T* x;
  int64_t x_stride;
  const T* q = nullptr;
  int64_t q_stride = 1;
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
  // z = map(x) (Note [Logit map on the CPU]); read only by the kMapped kernels.
  math::LogitMap<acc_type<T>> map{acc_type<T>(1), acc_type<T>(0), acc_type<T>(0)};

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
Layout<T> make_layout(const at::Tensor& input, const at::Tensor* prob_target, const Extras& extras) {
  Layout<T> L;
  L.map = math::logit_map<acc_type<T>>(extras);
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

// Note [Strided class dim]
// When the class dimension is not contiguous (transposed 2-D input, (N, C, d)
// input, sliced classes) a chunk is gathered into a small contiguous fp32/fp64
// buffer and the same vector code runs on it (a gradient is then written to
// scratch and scattered back). That keeps one definition of the math for
// every layout; channels-last and ordinary (N, C) inputs need no gather
// because their class stride is 1.

// Scratch for gathering strided chunks into contiguous accumulation-dtype
// buffers (and, for mapped logits, z in x and dz/dx in s).
template <typename acc_t>
struct Scratch {
  acc_t x[kChunk];
  acc_t q[kChunk];
  acc_t g[kChunk];
  acc_t s[kChunk];
};

// Whether a row's chunks can be read in place: its classes, and its
// target's when kCoef reads one, are contiguous.
template <Coef kCoef, typename T>
bool classes_contiguous(const RowView<T>& row) {
  return row.x_stride == 1 && (!uses_target(kCoef) || row.q_stride == 1);
}

// The coefficients of the chunk of a row that starts at class c_begin, read
// in place.
template <Coef kCoef, typename T>
CoefSource<T> chunk_source(const CoefSource<T>& coef, const RowView<T>& row, int64_t c_begin) {
  CoefSource<T> chunk = coef;
  if (uses_weight(kCoef)) {
    chunk.w = coef.w + c_begin;
  }
  if (uses_target(kCoef)) {
    chunk.q = row.q + c_begin;
  }
  return chunk;
}

// The coefficients of a chunk whose logits were moved into scratch.x: the
// target's classes (when kCoef reads them) are gathered into scratch.q.
template <Coef kCoef, typename T>
CoefSource<acc_type<T>> gathered_chunk_source(
    const RowView<T>& row, const CoefSource<T>& coef, int64_t c_begin, int64_t len, Scratch<acc_type<T>>& scratch) {
  using acc_t = acc_type<T>;
  CoefSource<acc_t> gathered = gathered_source(chunk_source<kCoef>(coef, row, c_begin));
  if (uses_target(kCoef)) {
    for (int64_t i = 0; i < len; ++i) {
      scratch.q[i] = static_cast<acc_t>(row.q[(c_begin + i) * row.q_stride]);
    }
    gathered.q = scratch.q;
  }
  return gathered;
}

// Gathers classes [c_begin, c_begin + len) of a row into scratch.x (and of
// its target into scratch.q when kCoef reads one), and returns the
// coefficients that go with the gathered chunk.
template <Coef kCoef, typename T>
CoefSource<acc_type<T>> gather_chunk(
    const RowView<T>& row, const CoefSource<T>& coef, int64_t c_begin, int64_t len, Scratch<acc_type<T>>& scratch) {
  using acc_t = acc_type<T>;
  for (int64_t i = 0; i < len; ++i) {
    scratch.x[i] = static_cast<acc_t>(row.x[(c_begin + i) * row.x_stride]);
  }
  return gathered_chunk_source<kCoef>(row, coef, c_begin, len, scratch);
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

// Rows per gathered-columns tile (a multiple of every kStep).
constexpr int64_t kTileRows = 64;

static_assert(kSmallClasses * kTileRows <= kChunk, "a gathered tile must fit the scratch buffers");

// Note [Tile transposes]
// A gathered-columns tile is transposed into scratch and its gradient back
// out. Element by element that is a load and a store per logit, twice, a
// large share of a short-row forward+backward, so fp32 tiles of evenly spaced
// rows with C >= 8 move in 8 x 8 blocks (transpose_8x8: eight vector loads,
// 24 shuffles, eight vector stores). When C is not a multiple of 8 the last
// block of classes starts at C - 8 and overlaps the one before it: it reads
// logits it already read and writes the same values again, so nothing past a
// row is touched and no tail code is needed. Rows past the last whole block
// of 8, other dtypes and unevenly spaced rows go element by element. The
// AVX512 build transposes with 256-bit instructions too: ATen's
// transpose_mxn<float, 8, 8> is specialized for AVX2 only, and under AVX512
// it runs its general 16 x 16 kernel with masks, far slower than these
// shuffles.
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

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
