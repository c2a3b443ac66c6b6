// Every activation's math, written once.
//
// Each activation is a struct Act<A, M> with
//   forward(z)      -> y = act(z)
//   backward(g, s)  -> dz = g * act'(.), where s is the tensor the activation saves:
//                      the output y when kSavesOutput, else the pre-activation z.
//   second(s)       -> d act'(.) / ds, the derivative of backward's factor with respect
//                      to the saved tensor (for double backward).
// M is a math policy: ScalarMath<T> below (one element, host and device) or the
// CPU's VecMath<T> (one SIMD vector, kernels/cpu/vec_math.h). A formula only uses
// M's functions, arithmetic operators and M::c(constant), so the same text runs as
// a CUDA thread, a scalar host loop, or an AVX2 loop.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BPEXT_HD __host__ __device__ __forceinline__
#else
#define BPEXT_HD inline
#endif

namespace bpext {

enum class Activation : int {
  kIdentity,
  kRelu,
  kLeakyRelu,
  kElu,
  kGelu,
  kGeluTanh,
  kSilu,
  kMish,
  kSigmoid,
  kTanh,
  kSoftplus,
};

// The activation's two numeric parameters, in torch.nn.functional's meaning:
//   leaky_relu: p0 = negative_slope
//   elu:        p0 = alpha
//   softplus:   p0 = beta, p1 = threshold
// M::V is float/double on the scalar path and a broadcast SIMD vector on the CPU path.
template <class V>
struct Params {
  V p0, p1;
};

template <class M>
BPEXT_HD Params<typename M::V> make_params(double p0, double p1) {
  return {M::c(p0), M::c(p1)};
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
  BPEXT_HD static V erf(V x) { return std::erf(x); }
  // Comparisons are ordered: false when either side is NaN, as in ATen's kernels.
  BPEXT_HD static Mask lt(V a, V b) { return a < b; }
  BPEXT_HD static Mask le(V a, V b) { return a <= b; }
  BPEXT_HD static Mask gt(V a, V b) { return a > b; }
  BPEXT_HD static V select(Mask m, V a, V b) { return m ? a : b; }
};

template <Activation A, class M>
struct Act;

template <class M>
struct Act<Activation::kIdentity, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;
  BPEXT_HD static V forward(V z, const Params<V>&) { return z; }
  BPEXT_HD static V backward(V g, V, const Params<V>&) { return g; }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kRelu, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;
  // NaN passes through (z < 0 is false), like torch.relu.
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::select(M::lt(z, M::c(0)), M::c(0), z); }
  // Like ATen's threshold_backward: the gradient is 0, not g * 0, where y <= 0.
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return M::select(M::le(y, M::c(0)), M::c(0), g); }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kLeakyRelu, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;  // valid because negative_slope >= 0 is enforced
  BPEXT_HD static V forward(V z, const Params<V>& p) { return M::select(M::gt(z, M::c(0)), z, z * p.p0); }
  BPEXT_HD static V backward(V g, V y, const Params<V>& p) { return M::select(M::gt(y, M::c(0)), g, g * p.p0); }
  BPEXT_HD static V second(V, const Params<V>&) { return M::c(0); }
};

template <class M>
struct Act<Activation::kElu, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;  // valid because alpha >= 0 is enforced
  BPEXT_HD static V forward(V z, const Params<V>& p) {
    return M::select(M::le(z, M::c(0)), p.p0 * M::expm1(z), z);
  }
  // For z <= 0: d/dz alpha*(e^z - 1) = alpha*e^z = y + alpha.
  BPEXT_HD static V backward(V g, V y, const Params<V>& p) {
    return M::select(M::le(y, M::c(0)), g * (y + p.p0), g);
  }
  // d/dy (y + alpha) = 1 where y <= 0
  BPEXT_HD static V second(V y, const Params<V>&) { return M::select(M::le(y, M::c(0)), M::c(1), M::c(0)); }
};

template <class M>
struct Act<Activation::kGelu, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = false;
  static constexpr double kSqrtHalf = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  BPEXT_HD static V cdf(V z) { return M::c(0.5) * (M::c(1) + M::erf(z * M::c(kSqrtHalf))); }
  BPEXT_HD static V forward(V z, const Params<V>&) { return z * cdf(z); }
  // d/dz z*Phi(z) = Phi(z) + z*phi(z)
  BPEXT_HD static V backward(V g, V z, const Params<V>&) {
    return g * (cdf(z) + z * pdf(z));
  }
  BPEXT_HD static V pdf(V z) { return M::exp(M::c(-0.5) * z * z) * M::c(kInvSqrt2Pi); }
  // d/dz (Phi + z*phi) = 2*phi - z^2*phi
  BPEXT_HD static V second(V z, const Params<V>&) { return pdf(z) * (M::c(2) - z * z); }
};

template <class M>
struct Act<Activation::kGeluTanh, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = false;
  static constexpr double kBeta = 0.79788456080286535588;  // sqrt(2/pi)
  static constexpr double kKappa = 0.044715;
  BPEXT_HD static V inner(V z) { return M::c(kBeta) * (z + M::c(kKappa) * z * z * z); }
  BPEXT_HD static V forward(V z, const Params<V>&) {
    return M::c(0.5) * z * (M::c(1) + M::tanh(inner(z)));
  }
  BPEXT_HD static V backward(V g, V z, const Params<V>&) {
    V t = M::tanh(inner(z));
    V dinner = M::c(kBeta) * (M::c(1) + M::c(3 * kKappa) * z * z);
    return g * (M::c(0.5) * (M::c(1) + t) + M::c(0.5) * z * (M::c(1) - t * t) * dinner);
  }
  // d/dz of the factor above: (1 - t^2) * (u + z/2 * (u' - 2 t u^2)), u = inner'(z)
  BPEXT_HD static V second(V z, const Params<V>&) {
    V t = M::tanh(inner(z));
    V u = M::c(kBeta) * (M::c(1) + M::c(3 * kKappa) * z * z);
    V du = M::c(6 * kBeta * kKappa) * z;
    return (M::c(1) - t * t) * (u + M::c(0.5) * z * (du - M::c(2) * t * u * u));
  }
};

template <class M>
struct Act<Activation::kSigmoid, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::c(1) / (M::c(1) + M::exp(M::c(0) - z)); }
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return g * y * (M::c(1) - y); }
  BPEXT_HD static V second(V y, const Params<V>&) { return M::c(1) - M::c(2) * y; }
};

template <class M>
struct Act<Activation::kSilu, M> {
  using V = typename M::V;
  using Sigmoid = Act<Activation::kSigmoid, M>;
  static constexpr bool kSavesOutput = false;
  BPEXT_HD static V forward(V z, const Params<V>& p) { return z * Sigmoid::forward(z, p); }
  // d/dz z*s(z) = s * (1 + z*(1 - s))
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) {
    V s = Sigmoid::forward(z, p);
    return g * s * (M::c(1) + z * (M::c(1) - s));
  }
  // s(1 - s)(2 + z(1 - 2s))
  BPEXT_HD static V second(V z, const Params<V>& p) {
    V s = Sigmoid::forward(z, p);
    return s * (M::c(1) - s) * (M::c(2) + z * (M::c(1) - M::c(2) * s));
  }
};

template <class M>
struct Act<Activation::kTanh, M> {
  using V = typename M::V;
  static constexpr bool kSavesOutput = true;
  BPEXT_HD static V forward(V z, const Params<V>&) { return M::tanh(z); }
  BPEXT_HD static V backward(V g, V y, const Params<V>&) { return g * (M::c(1) - y * y); }
  BPEXT_HD static V second(V y, const Params<V>&) { return M::c(-2) * y; }
};

template <class M>
struct Act<Activation::kMish, M> {
  using V = typename M::V;
  using Sigmoid = Act<Activation::kSigmoid, M>;
  static constexpr bool kSavesOutput = false;
  BPEXT_HD static V tanh_softplus(V z) { return M::tanh(M::log1p(M::exp(z))); }
  BPEXT_HD static V forward(V z, const Params<V>&) { return z * tanh_softplus(z); }
  // d/dz z*t(z), t = tanh(softplus(z)): t + z * sigmoid(z) * (1 - t^2)
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) {
    V t = tanh_softplus(z);
    return g * (t + z * Sigmoid::forward(z, p) * (M::c(1) - t * t));
  }
  // (1 - t^2) * sigmoid * (2 + z * (1 - sigmoid - 2 t sigmoid))
  BPEXT_HD static V second(V z, const Params<V>& p) {
    V t = tanh_softplus(z);
    V s = Sigmoid::forward(z, p);
    return (M::c(1) - t * t) * s * (M::c(2) + z * (M::c(1) - s - M::c(2) * t * s));
  }
};

template <class M>
struct Act<Activation::kSoftplus, M> {
  using V = typename M::V;
  using Sigmoid = Act<Activation::kSigmoid, M>;
  static constexpr bool kSavesOutput = false;
  // Linear above the threshold, exactly where torch.nn.functional.softplus is.
  BPEXT_HD static V forward(V z, const Params<V>& p) {
    V zb = z * p.p0;
    return M::select(M::gt(zb, p.p1), z, M::log1p(M::exp(zb)) / p.p0);
  }
  // The derivative sigmoid(beta*z) is written as 1/(1+e^-bz), not e^bz/(e^bz+1):
  // the latter is inf/inf = NaN for large bz when the threshold is raised.
  BPEXT_HD static V backward(V g, V z, const Params<V>& p) {
    V zb = z * p.p0;
    return M::select(M::gt(zb, p.p1), g, g * Sigmoid::forward(zb, p));
  }
  // d/dz sigmoid(beta z) = beta s (1 - s) below the threshold, 0 above it
  BPEXT_HD static V second(V z, const Params<V>& p) {
    V zb = z * p.p0;
    V s = Sigmoid::forward(zb, p);
    return M::select(M::gt(zb, p.p1), M::c(0), p.p0 * s * (M::c(1) - s));
  }
};

// Calls f(std::integral_constant<Activation, A>{}) with the run-time activation
// as a compile-time constant, so each kernel is instantiated once per activation.
template <class F>
decltype(auto) visit_activation(Activation a, F&& f) {
#define BPEXT_CASE(A) \
  case Activation::A: \
    return f(std::integral_constant<Activation, Activation::A>{});
  switch (a) {
    BPEXT_CASE(kRelu)
    BPEXT_CASE(kLeakyRelu)
    BPEXT_CASE(kElu)
    BPEXT_CASE(kGelu)
    BPEXT_CASE(kGeluTanh)
    BPEXT_CASE(kSilu)
    BPEXT_CASE(kMish)
    BPEXT_CASE(kSigmoid)
    BPEXT_CASE(kTanh)
    BPEXT_CASE(kSoftplus)
    case Activation::kIdentity:
    default:
      return f(std::integral_constant<Activation, Activation::kIdentity>{});
  }
#undef BPEXT_CASE
}

}  // namespace bpext
