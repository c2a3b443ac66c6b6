// The CPU's SIMD side of the activation math: a math policy over at::vec::Vectorized
// (Sleef-backed), loads and stores that widen bfloat16/float16 to float, and the two
// loop shapes every CPU pass uses (an elementwise map, and a row map with column sums).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>
#include <vector>

#include "bpext/activations.h"

namespace bpext::cpu {

// On a loop over vectors: every call in it inlined (the functor's math, its lambda), so that
// the dependency chains of consecutive vectors overlap; a call runs one chain at a time.
#define BPEXT_FLATTEN __attribute__((flatten))

// exp for float vectors, inline: no call (Sleef's), whose clobbered registers serialise the
// math of the vectors around it. Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes'
// polynomial for e^r (within an ulp; by Estrin's scheme, half Horner's chain of dependent FMAs),
// then 2^n in two factors, so that a subnormal result is rounded once and n down to -150 stays
// representable; inf past 88.72, NaN kept. kNonPositive: for x <= 0 only (no overflow to handle).
template <bool kNonPositive = false>
C10_ALWAYS_INLINE at::vec::Vectorized<float> fast_exp(const at::vec::Vectorized<float>& x) {
  using V = at::vec::Vectorized<float>;
  using I = at::vec::Vectorized<int32_t>;
  V xc = at::vec::maximum(x, V(-104.0f));  // e^-104 rounds to 0
  if constexpr (!kNonPositive) xc = at::vec::minimum(xc, V(88.72283f));
  const V n = (xc * V(1.44269504089f)).round();
  V r = at::vec::fnmadd(n, V(0.693359375f), xc);  // ln2 in two parts: n * 0.693359375 is exact
  r = at::vec::fnmadd(n, V(-2.12194440e-4f), r);
  using at::vec::fmadd;
  const V r2 = r * r;
  const V p = fmadd(fmadd(fmadd(V(1.9875691500e-4f), r, V(1.3981999507e-3f)), r2 * r2,
                          fmadd(fmadd(V(8.3334519073e-3f), r, V(4.1665795894e-2f)), r2,
                                fmadd(V(1.6666665459e-1f), r, V(5.0000001201e-1f)))),
                    r2, r + V(1.0f));  // 1 + r + r^2 (c5 + c4 r + ... + c0 r^5)
  const I k = at::vec::convert_to_int_of_same_size(n);
  const I k1 = k >> I(1), k2 = k - k1;
  const auto pow2 = [](const I& e) { return at::vec::cast<float>((e + I(127)) << I(23)); };
  const V out = p * pow2(k1) * pow2(k2);
  if constexpr (kNonPositive) return out;
  return V::blendv(out, V(std::numeric_limits<float>::infinity()), x > V(88.72283f));
}

// Phi(z) and phi(z) of the standard normal distribution for float vectors, sharing one exp:
// the tail Phi(-|z|) = erfcx(|z|/sqrt2) e / 2 with e = exp(-z^2/2) = sqrt(2 pi) phi(z), and
// erfcx(y) = exp(y^2) erfc(y) ~ t Q(t), t = 1/(1 + 0.45 y), Q of degree 9 fitted for relative
// error (under 2e-8; within 3 ulps in float, tails included). z^2/2 enters the exp with its
// rounding error (fma), so that the tail, where e's relative error is z^2 times the exponent's,
// keeps its digits. Phi(-15) is 0 in float. Near 0 a polynomial in z (see below).
C10_ALWAYS_INLINE Normal<at::vec::Vectorized<float>> fast_normal(const at::vec::Vectorized<float>& z) {
  using V = at::vec::Vectorized<float>;
  using at::vec::fmadd;
  const V a = at::vec::minimum(z.abs(), V(15.0f));  // NaN kept
  const V aa = a * a;
  const V e = fast_exp</*kNonPositive=*/true>(V(-0.5f) * aa) * (V(1.0f) - V(0.5f) * at::vec::fmsub(a, a, aa));  // exp(-a^2/2)
  const V t = V(1.0f) / fmadd(V(0.318198055f), a, V(1.0f));                             // 0.45 / sqrt2
  // q0 + q1 t + ... + q9 t^9 by Estrin's scheme: four dependent FMAs where Horner's takes nine
  const V t2 = t * t, t4 = t2 * t2;
  const V low = fmadd(fmadd(fmadd(V(-0.21904166f), t, V(0.037754301f)), t2, fmadd(V(0.0604778379f), t, V(0.0781840459f))),
                      t4, fmadd(fmadd(V(0.188608497f), t, V(0.22566998f)), t2, fmadd(V(0.254162371f), t, V(0.253872752f))));
  const V q = fmadd(fmadd(V(-0.0346760228f), t, V(0.154987887f)), t4 * t4, low);
  const V tail = V(0.5f) * t * q * e;
  const V far = V::blendv(V(1.0f) - tail, tail, z < V(0.0f));
  // Below |z| = 1.2, where 1/2 - Phi(-|z|) would cancel the tail's roundings into Phi:
  // 1/2 + c z + z^3 R(z^2), c = 1/sqrt(2 pi) in two parts (its rounding alone is an ulp there).
  const V r = fmadd(fmadd(fmadd(fmadd(fmadd(fmadd(V(-4.25886348e-08f), aa, V(6.96525092e-07f)), aa, V(-9.5075784e-06f)),
                                      aa, V(0.000115487099f)), aa, V(-0.00118734711f)), aa, V(0.00997355953f)),
                    aa, V(-0.066490382f));
  const V near = fmadd(V(0.398942292f), z, V(0.5f)) + fmadd(V(-1.13351701e-08f), z, z * aa * r);
  return {V::blendv(far, near, a < V(1.2f)), e * V(0.398942280f)};  // 1/sqrt(2 pi)
}

// One SIMD vector of compute type T (float or double); see ScalarMath in activations.h.
template <class T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true
  C10_ALWAYS_INLINE static V c(double x) { return V(static_cast<T>(x)); }
  C10_ALWAYS_INLINE static V exp(const V& x) {
    if constexpr (std::is_same_v<T, float>) {
      return fast_exp(x);
    } else {
      return x.exp();
    }
  }
  C10_ALWAYS_INLINE static V expm1(const V& x) { return x.expm1(); }
  C10_ALWAYS_INLINE static V log1p(const V& x) { return x.log1p(); }
  // tanh correctly rounded where |tanh| nears 1: Sleef's rounds tanh(8.7) up to 1, and tanh's
  // derivative 1 - y^2 from that y is 0 instead of 1.2e-7 (a one-ulp error in y is 1/(1 - y^2)
  // ulps of the derivative). 1 - 2/(e^2|x| + 1) there, whose small term keeps its digits; below
  // |x| = 0.55, where that form cancels and 1 - y^2 amplifies nothing, x + x^3 P(x^2) for float
  // (fitted for relative error: within 0.7 ulp; inline, where Sleef's call serialises the vectors
  // around it), Sleef's tanh for double.
  C10_ALWAYS_INLINE static V tanh(const V& x) {
    const V a = x.abs();
    V small;
    if constexpr (std::is_same_v<T, float>) {
      using at::vec::fmadd;
      const V s = a * a;
      const V p = fmadd(fmadd(fmadd(fmadd(V(-0.00627516536f), s, V(0.021072356f)), s, V(-0.0538524762f)), s,
                              V(0.133325875f)), s, V(-0.333333164f));
      small = fmadd(a * s, p, a);
    } else {
      small = a.tanh();
    }
    const V r = V::blendv(V(T(1)) - V(T(2)) / (exp(a + a) + V(T(1))), small, a < V(T(0.55)));
    return r | (x & V(T(-0.0)));  // x's sign bit on |tanh x| (tanh(-0) is -0); NaN stays NaN
  }
  C10_ALWAYS_INLINE static V erfc(const V& x) { return x.erfc(); }
  // Phi(z) and phi(z) at once, for float: see fast_normal (activations.h's GELU uses it where M has it).
  C10_ALWAYS_INLINE static Normal<V> normal(const V& z)
    requires std::is_same_v<T, float>
  {
    return fast_normal(z);
  }
  C10_ALWAYS_INLINE static V abs(const V& x) { return x.abs(); }
  C10_ALWAYS_INLINE static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  C10_ALWAYS_INLINE static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }  // NaN propagates
  C10_ALWAYS_INLINE static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  C10_ALWAYS_INLINE static Mask lt(const V& a, const V& b) { return a < b; }
  C10_ALWAYS_INLINE static Mask le(const V& a, const V& b) { return a <= b; }
  C10_ALWAYS_INLINE static Mask gt(const V& a, const V& b) { return a > b; }
  C10_ALWAYS_INLINE static Mask both(const Mask& a, const Mask& b) { return a & b; }
  C10_ALWAYS_INLINE static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
};

// Loads and stores of storage type T as vectors of its compute type.
template <class T>
struct VecIO {
  using O = at::opmath_type<T>;
  using V = at::vec::Vectorized<O>;
  static constexpr int64_t kWidth = V::size();

  static V load(const T* p) {
    if constexpr (std::is_same_v<T, O>) {
      return V::loadu(p);
    } else {
      V out;
      at::vec::load_to_float<T>(p, out);
      return out;
    }
  }
  // The first `count` lanes from p, the rest zero.
  static V load(const T* p, int64_t count) {
    if (count == kWidth) return load(p);
    if constexpr (std::is_same_v<T, O>) {
      return V::loadu(p, count);
    } else {
      T buf[kWidth] = {};
      std::copy_n(p, count, buf);
      return load(buf);
    }
  }
  static void store(T* p, const V& v, int64_t count = kWidth) {
    if constexpr (std::is_same_v<T, O>) {
      v.store(p, count);
    } else {
      at::vec::convert_from_float<T>(v, v).store(p, count);
    }
  }
};

// out[i] = f(in[i]...) for i in [0, n), a vector at a time. The tail is padded
// rather than done in scalar code, so every element takes the same path and a
// result never depends on where a thread's chunk happens to end.
template <class T, class F, class... In>
BPEXT_FLATTEN inline void map_span(int64_t n, const F& f, T* out, const In*... in) {
  using IO = VecIO<T>;
  constexpr int64_t W = IO::kWidth;
  int64_t i = 0;
  // Two vectors per step: two independent dependency chains overlap (the math is
  // latency-bound: a division, polynomials and a Sleef call per vector).
  for (; i + 2 * W <= n; i += 2 * W) {
    const auto r0 = f(IO::load(in + i)...);
    const auto r1 = f(IO::load(in + i + W)...);
    IO::store(out + i, r0);
    IO::store(out + i + W, r1);
  }
  for (; i < n; i += W) {
    const int64_t count = std::min(W, n - i);
    IO::store(out + i, f(IO::load(in + i, count)...), count);
  }
}

// Elements per task of a parallel loop: below it, starting threads costs more than it saves.
constexpr int64_t kGrainElements = 1 << 15;

// map_span over n elements, in parallel.
template <class T, class F, class... In>
inline void parallel_map(int64_t n, const F& f, T* out, const In*... in) {
  at::parallel_for(0, n, kGrainElements, [&](int64_t begin, int64_t end) {
    map_span(end - begin, f, out + begin, (in + begin)...);
  });
}

// Rows per chunk of a column-sum reduction. A function of the row count alone, never of
// the thread count, so the summation order (and the result, bitwise) is fixed.
inline int64_t reduction_chunk_rows(int64_t rows) { return std::max<int64_t>(8, (rows + 63) / 64); }

// For each of `rows` rows of `cols` elements: the K results of f(in...) go to out[k] (unless
// null) and are summed down the columns into sums[k] (unless null). Rows are summed per chunk
// in the compute type, and the chunks added in order.
template <size_t K, class T, class F, class... In>
void map_rows_with_sums(int64_t rows, int64_t cols, const F& f, std::array<T*, K> out, std::array<T*, K> sums,
                        const In*... in) {
  using IO = VecIO<T>;
  using O = typename IO::O;
  using V = typename IO::V;
  constexpr int64_t W = IO::kWidth;
  const int64_t chunk_rows = reduction_chunk_rows(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const bool summing = std::any_of(sums.begin(), sums.end(), [](T* s) { return s != nullptr; });
  std::vector<O> partial(summing ? chunks * K * cols : 0, O(0));
  const int64_t grain_chunks = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, chunk_rows * cols));
  at::parallel_for(0, chunks, grain_chunks, [&](int64_t c0, int64_t c1) BPEXT_FLATTEN {
    for (int64_t c = c0; c < c1; ++c) {
      O* acc = summing ? partial.data() + c * K * cols : nullptr;
      for (int64_t i = c * chunk_rows; i < std::min(rows, (c + 1) * chunk_rows); ++i) {
        const int64_t row = i * cols;
        for (int64_t j = 0; j < cols; j += W) {
          const int64_t n = std::min(W, cols - j);
          const std::array<V, K> r = f(IO::load(in + row + j, n)...);
          for (size_t k = 0; k < K; ++k) {
            if (out[k] != nullptr) IO::store(out[k] + row + j, r[k], n);
            if (sums[k] != nullptr) (V::loadu(acc + k * cols + j, n) + r[k]).store(acc + k * cols + j, n);
          }
        }
      }
    }
  });
  for (size_t k = 0; k < K; ++k) {
    if (sums[k] == nullptr) continue;
    at::parallel_for(0, cols, std::max<int64_t>(1024, kGrainElements / std::max<int64_t>(1, chunks)),
                     [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        O total = 0;
        for (int64_t c = 0; c < chunks; ++c) total += partial[(c * K + k) * cols + j];
        sums[k][j] = static_cast<T>(total);
      }
    });
  }
}

}  // namespace bpext::cpu
