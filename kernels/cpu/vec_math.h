// The CPU's SIMD side of the activation math: a math policy over at::vec::Vectorized
// (Sleef-backed under AVX2) and loads/stores that widen bfloat16/float16 to float.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>

#include "bpext/activations.h"

namespace bpext::cpu {

// One SIMD vector of compute type T (float or double); see ScalarMath in activations.h.
template <class T>
struct VecMath {
  using V = at::vec::Vectorized<T>;
  using Mask = V;  // all-ones lanes where true
  static V c(double x) { return V(static_cast<T>(x)); }
  static V exp(const V& x) { return x.exp(); }
  static V expm1(const V& x) { return x.expm1(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V tanh(const V& x) { return x.tanh(); }
  static V erf(const V& x) { return x.erf(); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask gt(const V& a, const V& b) { return a > b; }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
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
inline void map_span(int64_t n, const F& f, T* out, const In*... in) {
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
  for (; i + W <= n; i += W) {
    IO::store(out + i, f(IO::load(in + i)...));
  }
  if (i < n) {
    const int64_t rest = n - i;
    IO::store(out + i, f(IO::load(in + i, rest)...), rest);
  }
}

}  // namespace bpext::cpu
