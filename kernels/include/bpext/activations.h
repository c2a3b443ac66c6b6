// Every activation, written once.
//
// BPEXT_ACTIVATIONS below is the list: one line per activation with its name, what its
// backward reads, and its parameters. The enum, the names, the parameter checks, the save
// policy and the dispatch (visit_activation) are all generated from it; Python reads the
// same list through the extension (bpext._activation_table). The math is one functor
// per activation, Act<A, M>:
//   forward(z)      -> y = act(z)
//   backward(g, s)  -> dz = g * act'(.), where s is the tensor the activation saves:
//                      the output y (Saves::kOutput), the input z (kInput), or nothing.
//   second(s)       -> d act'(.) / ds, the derivative of backward's factor with respect
//                      to the saved tensor (for double backward).
// M is a math policy: ScalarMath<T> below (one element, host and device) or the
// CPU's VecMath<T> (one SIMD vector, kernels/cpu/vec_math.h). A formula only uses
// M's functions, arithmetic operators and M::c(constant), so the same text runs as
// a CUDA thread, a scalar host loop, or an AVX2/AVX-512 loop. The compiler may not fuse
// a*b + c on its own (-ffp-contract=off, for results that do not depend on the code path);
// where a sum cancels, a formula asks for M::fma explicitly.
//
// Adding an activation: one line in BPEXT_ACTIVATIONS, one functor, one line in the
// Python table (bpext/activations.py).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BPEXT_HD __host__ __device__ __forceinline__
#else
// Forced, so that a functor's math (a division, polynomials, an exp) inlines into the loops that
// keep two vectors in flight: called, it runs one dependency chain at a time.
#define BPEXT_HD inline __attribute__((always_inline))
#endif

namespace bpext {

// What an activation's backward reads: its output y, its input z, or nothing at all.
// y only where the derivative follows from it without cancellation (and where native
// PyTorch saves y too, so that in-place ops on the output behave the same).
enum class Saves { kNothing, kOutput, kInput };

// What a parameter value must be (checked once per call, with the op's name in the message).
enum class Rule {
  kFinite,   // finite
  kNonzero,  // finite and not 0
  kNotNan,   // anything but NaN (+-inf allowed)
};

struct Param {
  std::string_view name;  // torch.nn.functional's keyword
  double default_value = 0;
  Rule rule = Rule::kFinite;
};

//   X(Enum, "name", saves, Param{...}...)     parameters in torch.nn.functional's order
#define BPEXT_ACTIVATIONS(X)                                                                          \
  X(Identity, "identity", kNothing)                                                                   \
  X(Relu, "relu", kOutput)                                                                            \
  X(LeakyRelu, "leaky_relu", kInput, Param{"negative_slope", 0.01, Rule::kFinite})                    \
  X(Elu, "elu", kInput, Param{"alpha", 1.0, Rule::kFinite})                                           \
  X(Gelu, "gelu", kInput)                                                                             \
  X(GeluTanh, "gelu_tanh", kInput)                                                                    \
  X(Silu, "silu", kInput)                                                                             \
  X(Mish, "mish", kInput)                                                                             \
  X(Sigmoid, "sigmoid", kOutput)                                                                      \
  X(Tanh, "tanh", kOutput)                                                                            \
  X(Softplus, "softplus", kInput, Param{"beta", 1.0, Rule::kNonzero}, Param{"threshold", 20.0, Rule::kNotNan}) \
  X(QuickGelu, "quick_gelu", kInput)                                                                  \
  X(Hardswish, "hardswish", kInput)

enum class Activation : int {
#define BPEXT_ENUM(E, ...) k##E,
  BPEXT_ACTIVATIONS(BPEXT_ENUM)
#undef BPEXT_ENUM
};

constexpr int kMaxParams = 2;

struct ActivationInfo {
  Activation kind;
  std::string_view name;
  Saves saves;
  std::array<Param, kMaxParams> params;  // the first `n_params` are used
  int n_params;
};

namespace detail {
template <class... P>
constexpr ActivationInfo make_info(Activation kind, std::string_view name, Saves saves, P... params) {
  static_assert(sizeof...(P) <= kMaxParams, "raise kMaxParams");
  return {kind, name, saves, {params...}, static_cast<int>(sizeof...(P))};
}
}  // namespace detail

inline constexpr ActivationInfo kActivations[] = {
#define BPEXT_INFO(E, name, saves, ...) detail::make_info(Activation::k##E, name, Saves::saves, ##__VA_ARGS__),
    BPEXT_ACTIVATIONS(BPEXT_INFO)
#undef BPEXT_INFO
};

constexpr const ActivationInfo& info(Activation a) { return kActivations[static_cast<int>(a)]; }

template <Activation A>
inline constexpr Saves kSaves = info(A).saves;

// The activation's parameters, in the list's order (negative_slope; alpha; beta, threshold).
// V is float/double on the scalar path and a broadcast SIMD vector on the CPU path.
template <class V>
struct Params {
  V p0, p1;
};

template <class M>
BPEXT_HD Params<typename M::V> make_params(const std::array<double, kMaxParams>& p) {
  return {M::c(p[0]), M::c(p[1])};
}

// One element of compute type T (float or double).
template <class T>
struct ScalarMath {
  using V = T;
  using Mask = bool;
  BPEXT_HD static V c(double x) { return static_cast<T>(x); }
  BPEXT_HD static V exp(V x) { return std::exp(x); }
  BPEXT_HD static V expm1(V x) { return std::expm1(x); }
  BPEXT_HD static V log1p(V x) { return std::log1p(x); }
  BPEXT_HD static V tanh(V x) { return std::tanh(x); }
  BPEXT_HD static V erfc(V x) { return std::erfc(x); }
  BPEXT_HD static V abs(V x) { return std::fabs(x); }
  BPEXT_HD static V fma(V a, V b, V c) { return std::fma(a, b, c); }  // a * b + c, rounded once
  // std::min / std::max: NaN in `a` propagates.
  BPEXT_HD static V min(V a, V b) { return b < a ? b : a; }
  BPEXT_HD static V max(V a, V b) { return a < b ? b : a; }
  // Comparisons are ordered: false when either side is NaN, as in ATen's kernels.
  BPEXT_HD static Mask lt(V a, V b) { return a < b; }
  BPEXT_HD static Mask le(V a, V b) { return a <= b; }
  BPEXT_HD static Mask gt(V a, V b) { return a > b; }
  BPEXT_HD static Mask both(Mask a, Mask b) { return a && b; }
  BPEXT_HD static V select(Mask m, V a, V b) { return m ? a : b; }
};

template <Activation A, class M>
struct Act;

// Phi(z) and phi(z): the standard normal distribution's cdf and density at z (the GELU's).
template <class V>
struct Normal {
  V cdf, pdf;
};

// act(z) and act'(z) from one evaluation, for a caller that recomputes act(z) and then needs
// act'(z) at the same z (the fused MLP's backward). A functor offers value_and_slope where the
// two share their costly part (GELU's erfc); value is forward(z) and g * slope is backward(g, z),
// bitwise.
template <class V>
struct ValueSlope {
  V value, slope;
};
template <class F, class V>
concept HasValueSlope = requires(V z, const Params<V>& p) { F::value_and_slope(z, p); };

// sigmoid(z) and 1 - sigmoid(z), from e = exp(-|z|) <= 1: the smaller of the two is e / (1 + e),
// accurate relative to itself down to subnormal values (1 / (1 + exp(-z)) overflows to 1/inf = 0
// there), and the larger is 1 minus it, accurate relative to 1. Neither is a difference that
// cancels, so s (1 - s) and 1 + k z (1 - s) keep their digits too.
template <class M>
struct Logistic {
  using V = typename M::V;
  V s, sc;
  BPEXT_HD explicit Logistic(V z) {
    V e = M::exp(M::c(0) - M::abs(z));
    V small = e / (M::c(1) + e);
    V large = M::c(1) - small;
    auto negative = M::lt(z, M::c(0));
    s = M::select(negative, small, large);
    sc = M::select(negative, large, small);
  }
  BPEXT_HD V q() const { return s * sc; }  // s (1 - s), the derivative
};

template <class M>
struct Act<Activation::kIdentity, M> {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, const Params<V>&) { return z; }
  BPEXT_HD static V backward(V g, V, const Params<V>&) { return g; }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kRelu, M> {
  using V = typename M::V;
  // NaN passes through (z < 0 is false), like torch.relu.
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::select(M::lt(z, M::c(0)), M::c(0), z); }
  // Like ATen's threshold_backward: the gradient is 0, not g * 0, where y <= 0.
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return M::select(M::le(y, M::c(0)), M::c(0), g); }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kLeakyRelu, M> {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, const Params<V>& p) { return M::select(M::gt(z, M::c(0)), z, z * p.p0); }
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) { return M::select(M::gt(z, M::c(0)), g, g * p.p0); }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kElu, M> {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, const Params<V>& p) {
    return M::select(M::le(z, M::c(0)), p.p0 * M::expm1(z), z);
  }
  // alpha * e^z from z itself: recovering it from y as y + alpha cancels (ATen saves z too).
  // Tested as z > 0, so that a NaN z gives NaN, as ATen's vectorized kernel does.
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) {
    return M::select(M::gt(z, M::c(0)), g, g * (p.p0 * M::exp(z)));
  }
  BPEXT_HD static V second(V z, const Params<V>& p) { return M::select(M::gt(z, M::c(0)), M::c(0), p.p0 * M::exp(z)); }
};

template <class M>
struct Act<Activation::kGelu, M> {
  using V = typename M::V;
  static constexpr double kSqrtHalf = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  // M::normal(z) where the policy has one (the CPU's float vectors: Phi and phi sharing an exp)
  static constexpr bool kPolicyNormal = requires(V z) { M::normal(z); };
  // Phi(z) = erfc(-z/sqrt2)/2: no cancellation in the negative tail, where 1 + erf(z/sqrt2) loses
  // every digit that the tail's small values have.
  BPEXT_HD static V cdf(V z) {
    if constexpr (kPolicyNormal) {
      return M::normal(z).cdf;
    } else {
      return M::c(0.5) * M::erfc(M::c(-kSqrtHalf) * z);
    }
  }
  BPEXT_HD static Normal<V> normal(V z) {
    if constexpr (kPolicyNormal) {
      return M::normal(z);
    } else {
      return {cdf(z), M::exp(M::c(-0.5) * z * z) * M::c(kInvSqrt2Pi)};
    }
  }
  // d/dz z*Phi(z) = Phi(z) + z*phi(z)
  BPEXT_HD static V slope(V z, const Normal<V>& n) { return M::fma(z, n.pdf, n.cdf); }
  BPEXT_HD static V forward(V z, const Params<V>&) { return z * cdf(z); }
  BPEXT_HD static V backward(V g, V z, const Params<V>&) { return g * slope(z, normal(z)); }
  BPEXT_HD static ValueSlope<V> value_and_slope(V z, const Params<V>&) {
    const Normal<V> n = normal(z);
    return {z * n.cdf, slope(z, n)};
  }
  // d/dz (Phi + z*phi) = 2*phi - z^2*phi
  BPEXT_HD static V second(V z, const Params<V>&) { return normal(z).pdf * (M::c(2) - z * z); }
};

template <class M>
struct Act<Activation::kGeluTanh, M> {
  using V = typename M::V;
  static constexpr double kBeta = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double kKappa = 0.044715;
  // z/2 (1 + tanh(u)) = z sigmoid(2u), u = beta (z + kappa z^3): written with the sigmoid,
  // 1 + tanh(u) and 1 - tanh(u)^2 do not cancel in the tails.
  BPEXT_HD static Logistic<M> of_2u(V z) { return Logistic<M>(M::c(2 * kBeta) * (z + M::c(kKappa) * z * z * z)); }
  BPEXT_HD static V du(V z) { return M::c(kBeta) * (M::c(1) + M::c(3 * kKappa) * z * z); }  // u'
  BPEXT_HD static V forward(V z, const Params<V>&) {
    return z * Act<Activation::kSigmoid, M>::forward(M::c(2 * kBeta) * (z + M::c(kKappa) * z * z * z), {});
  }
  // s + 2 z s (1 - s) u'; where s (1 - s) underflows, just s (2 z u' may be inf there).
  BPEXT_HD static V backward(V g, V z, const Params<V>&) {
    const Logistic<M> l = of_2u(z);
    V q = l.q();
    return g * M::select(M::gt(q, M::c(0)), M::fma(M::c(2) * z * du(z), q, l.s), l.s);
  }
  // 2 q (2 u' + 2 z (1 - 2 s) u'^2 + z u''), q = s (1 - s), u'' = 6 beta kappa z
  BPEXT_HD static V second(V z, const Params<V>&) {
    const Logistic<M> l = of_2u(z);
    V q = l.q();
    V u1 = du(z);
    V sum = M::c(2) * u1 + M::c(2) * z * (l.sc - l.s) * u1 * u1 + M::c(6 * kBeta * kKappa) * z * z;
    return M::select(M::gt(q, M::c(0)), M::c(2) * q * sum, M::c(0));
  }
};

template <class M>
struct Act<Activation::kSigmoid, M> {
  using V = typename M::V;
  // As ATen has it (and as fast): forward alone does not need Logistic's tail.
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::c(1) / (M::c(1) + M::exp(M::c(0) - z)); }
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return g * y * (M::c(1) - y); }
  BPEXT_HD static V second(V y, const Params<V>&) { return M::c(1) - M::c(2) * y; }
};

// z * sigmoid(k z): silu for k = 1, quick_gelu for k = 1.702.
template <class M>
struct SwishOf {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, V k) { return z * Act<Activation::kSigmoid, M>::forward(k * z, {}); }
  // d/dz z*s(kz) = s * (1 + kz*(1 - s)); where s (1 - s) underflows (kz may be inf there), just s:
  // 1 at the top of the range, 0 at the bottom.
  BPEXT_HD static V derivative(V z, V k) {
    const Logistic<M> l(k * z);
    return M::select(M::gt(l.q(), M::c(0)), l.s * M::fma(k * z, l.sc, M::c(1)), l.s);
  }
  // k s (1 - s) (2 + kz (1 - 2s)); 0 where s (1 - s) underflows
  BPEXT_HD static V second(V z, V k) {
    const Logistic<M> l(k * z);
    const V q = l.q();
    return M::select(M::gt(q, M::c(0)), k * q * M::fma(k * z, l.sc - l.s, M::c(2)), M::c(0));
  }
};

template <class M>
struct Act<Activation::kSilu, M> {
  using V = typename M::V;
  using S = SwishOf<M>;
  BPEXT_HD static V forward(V z, const Params<V>&) { return S::forward(z, M::c(1)); }
  BPEXT_HD static V backward(V g, V z, const Params<V>&) { return g * S::derivative(z, M::c(1)); }
  BPEXT_HD static V second(V z, const Params<V>&) { return S::second(z, M::c(1)); }
};

// x * sigmoid(1.702 x), as CLIP and OpenAI's GPT models write GELU.
template <class M>
struct Act<Activation::kQuickGelu, M> {
  using V = typename M::V;
  using S = SwishOf<M>;
  static constexpr double kScale = 1.702;
  BPEXT_HD static V forward(V z, const Params<V>&) { return S::forward(z, M::c(kScale)); }
  BPEXT_HD static V backward(V g, V z, const Params<V>&) { return g * S::derivative(z, M::c(kScale)); }
  BPEXT_HD static V second(V z, const Params<V>&) { return S::second(z, M::c(kScale)); }
};

template <class M>
struct Act<Activation::kTanh, M> {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::tanh(z); }
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return g * M::fma(M::c(0) - y, y, M::c(1)); }
  BPEXT_HD static V second(V y, const Params<V>&) { return M::c(-2) * y; }
};

// z tanh(softplus(z)). With w = e^z and n = w (w + 2): tanh(softplus(z)) = n / (n + 2) and
// 1 - tanh^2 = 4 (n + 1) / (n + 2)^2, neither of which cancels (1 - t*t does as t nears 1).
// Past z = 40, t is 1 and 1 - t^2 negligible in float64 too: w stops there (before n overflows
// float32), and 1 - t^2 is 0.
template <class M>
struct Act<Activation::kMish, M> {
  using V = typename M::V;
  struct Parts {
    V t, one_minus_t2;
  };
  BPEXT_HD static Parts parts(V z) {
    V w = M::exp(M::min(z, M::c(40)));
    V n = w * (w + M::c(2));
    V d = n + M::c(2);
    return {n / d, M::select(M::gt(z, M::c(40)), M::c(0), M::c(4) * (n + M::c(1)) / d / d)};
  }
  BPEXT_HD static V forward(V z, const Params<V>&) { return z * parts(z).t; }
  // d/dz z*t(z): t + z * sigmoid(z) * (1 - t^2)
  BPEXT_HD static V backward(V g, V z, const Params<V>&) {
    const Parts p = parts(z);
    return g * M::fma(z * Logistic<M>(z).s, p.one_minus_t2, p.t);
  }
  // (1 - t^2) * sigmoid * (2 + z * (1 - sigmoid - 2 t sigmoid))
  BPEXT_HD static V second(V z, const Params<V>&) {
    const Parts p = parts(z);
    const Logistic<M> l(z);
    return p.one_minus_t2 * l.s * M::fma(z, l.sc - M::c(2) * p.t * l.s, M::c(2));
  }
};

template <class M>
struct Act<Activation::kSoftplus, M> {
  using V = typename M::V;
  // Linear above the threshold, exactly where torch.nn.functional.softplus is.
  BPEXT_HD static V forward(V z, const Params<V>& p) {
    V zb = z * p.p0;
    return M::select(M::gt(zb, p.p1), z, M::log1p(M::exp(zb)) / p.p0);
  }
  // The derivative sigmoid(beta*z): never inf/inf (NaN) for large bz when the threshold is raised.
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) {
    V zb = z * p.p0;
    return M::select(M::gt(zb, p.p1), g, g * Logistic<M>(zb).s);
  }
  // d/dz sigmoid(beta z) = beta s (1 - s) below the threshold, 0 above it
  BPEXT_HD static V second(V z, const Params<V>& p) {
    V zb = z * p.p0;
    return M::select(M::gt(zb, p.p1), M::c(0), p.p0 * Logistic<M>(zb).q());
  }
};

// x * relu6(x + 3) / 6, with ATen's derivative at the kinks (x/3 + 1/2 strictly inside (-3, 3),
// as its vectorized CPU and its CUDA kernels have it).
template <class M>
struct Act<Activation::kHardswish, M> {
  using V = typename M::V;
  BPEXT_HD static V forward(V z, const Params<V>&) {
    return z * M::min(M::max(z + M::c(3), M::c(0)), M::c(6)) / M::c(6);
  }
  BPEXT_HD static V backward(V g, V z, const Params<V>&) {
    // Ordered as ATen's: a NaN input falls through to the formula and gives NaN.
    return M::select(M::le(M::c(3), z), g, M::select(M::le(z, M::c(-3)), M::c(0), g * (z / M::c(3) + M::c(0.5))));
  }
  // 1/3 strictly inside (-3, 3), as ATen's double backward has it.
  BPEXT_HD static V second(V z, const Params<V>&) {
    return M::select(M::both(M::lt(M::c(-3), z), M::lt(z, M::c(3))), M::c(1.0 / 3.0), M::c(0));
  }
};

// g * act'(z) for a caller that holds the input z and y = act(z), whichever of the two the
// activation's backward reads (the gated layers keep z for every activation).
template <Activation A, class M>
BPEXT_HD typename M::V backward_given(typename M::V g, typename M::V z, typename M::V y,
                                      const Params<typename M::V>& p) {
  if constexpr (kSaves<A> == Saves::kOutput) {
    return Act<A, M>::backward(g, y, p);
  } else {
    return Act<A, M>::backward(g, z, p);
  }
}

// Calls f(std::integral_constant<Activation, A>{}) with the run-time activation as a
// compile-time constant, so each kernel is instantiated once per activation. The cases
// come from the list, and an activation without a functor fails to compile.
template <class F>
decltype(auto) visit_activation(Activation a, F&& f) {
  switch (a) {
#define BPEXT_CASE(E, ...) \
  case Activation::k##E:   \
    return f(std::integral_constant<Activation, Activation::k##E>{});
    BPEXT_ACTIVATIONS(BPEXT_CASE)
#undef BPEXT_CASE
  }
  // Not reached: the switch covers the enum (built with -Werror=switch).
  return f(std::integral_constant<Activation, Activation::kIdentity>{});
}

}  // namespace bpext
