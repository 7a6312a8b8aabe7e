// vexp and vtanh: the vector exp of every kernel, a fast fp32 exp (one form
// per ISA) and Sleef's for fp64; the softcap's tanh, built on the fast exp
// for fp32 and Sleef's for fp64.
#pragma once

#include "cpu/kernel/vec.h"

namespace xent_ext {
namespace cpu {
namespace CPU_CAPABILITY {
namespace {

// Note [Fast exp]
// exp is the only transcendental per element, in the forward and again in the
// backward, and Sleef's expf (Vectorized::exp) is slow enough to leave the
// kernels compute-bound well below memory bandwidth. This exp: Cody-Waite
// reduction x = n ln2 + r with ln2 in two parts (Cephes' split), |r| <=
// ln2/2, then 1 + r q(r) with q a degree-5 minimax fit of (e^r - 1)/r
// (relative error of the fit 2e-9, fitted in float64 by linear programming on
// 20001 points), evaluated by Horner so the last step, fma(q, r, 1), rounds
// once. Max relative error over [-87.3, 0] against float64: 8.8e-8 (about
// 1.5 ulp), in 17 vector instructions.
// Rounding x / ln2 to n and building 2^n take one fma and one shift: adding
// the magic number 1.5 * 2^23 + 127 leaves n + 127 in the low mantissa bits
// of t (the fma rounds to nearest), t - magic is n exactly, and t's bits
// shifted left by 23 are 2^n's bits (valid for -126 <= n <= 127, which the
// clamp ensures). Domain: the kernels only take exp(x - max) and
// exp((x - max) - log_sum), so x <= ~0; inputs above ln(FLT_MAX) saturate instead of
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
// with no blend. Max relative error over [-87.3, 0] against float64: 6.9e-8;
// below -87.3 it is accurate to subnormal precision where the other gives 0.
// It is faster than Note [Fast exp]'s form: 14 instructions per 16 lanes, 8 of
// them fma or mul, against 17 with 10.
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

// Note [Fast tanh]
// The softcap maps every logit through tanh, and Sleef's 1-ulp tanhf
// (Vectorized::tanh) costs several times the fast exp: with it the softcap
// made the forward several times slower than the plain loss. This tanh, for
// a = |y|:
//   a <  0.625: y + y^3 P(y^2), P a degree-4 fit of (tanh(y) - y) / y^3
//               (relative error of the fit 4.5e-9, fitted in float64 by
//               iteratively reweighted least squares towards minimax);
//   a >= 0.625: 1 - 2 / (exp(2a) + 1) with Note [Fast exp], and y's sign.
// The cut keeps the subtraction's cancellation small: there 2 / (exp(2a) + 1)
// is at most 0.45 of a result of at least 0.55, so the exp's and the
// division's roundings reach the result scaled by less than one. Max
// relative error against float64, measured on every 16th float of
// [2^-30, 24]: 1.2 eps (just above the cut; the polynomial side 0.7 eps).
// a is clamped at 20 before the exp (tanh(20) rounds to 1, and the AVX512 exp
// takes no infinite input), so +-inf give +-1; nan stays nan (the clamp, the
// exp and both branches propagate it; the comparison is false and picks the
// exp side). Where every lane of a vector is below the cut (the common case
// for a softcap of tens: |logit| under 0.625 cap) the exp side is skipped.
// fp64 keeps Sleef's tanh: accuracy is the point there.
inline Vectorized<float> vtanh(const Vectorized<float>& y) {
  using V = Vectorized<float>;
  const V a = y.abs();
  const V s = y * y;
  V p(-5.705772899e-3f);
  p = at::vec::fmadd(p, s, V(2.063977905e-2f));
  p = at::vec::fmadd(p, s, V(-5.373992398e-2f));
  p = at::vec::fmadd(p, s, V(1.333144456e-1f));
  p = at::vec::fmadd(p, s, V(-3.333328068e-1f));
  const V small = at::vec::fmadd(y * s, p, y);
  // Each lane's result depends on its own input alone, so skipping the exp side
  // when no lane needs it gives the same bits as blending (nan lanes count as
  // small, and the polynomial keeps them nan).
  constexpr int kAllLanes = (1 << V::size()) - 1;
  if ((a >= V(0.625f)).zero_mask() == kAllLanes) {
    return small;
  }
  const V a_clamped = at::vec::minimum(a, V(20.0f));
  const V e = fast_exp(a_clamped + a_clamped);
  const V large = (V(1.0f) - V(2.0f) / (e + V(1.0f))) | (y & V(-0.0f));
  return V::blendv(large, small, a < V(0.625f));
}

inline Vectorized<double> vtanh(const Vectorized<double>& y) {
  return y.tanh();
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace cpu
}  // namespace xent_ext
