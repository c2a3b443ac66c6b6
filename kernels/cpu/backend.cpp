// The CPU backend: every elementwise pass as one vectorized, multithreaded loop over the
// activation functors, instantiated per dtype and activation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "bpext/backend.h"
#include "mlp.h"
#include "vec_math.h"

namespace bpext::cpu {
namespace {

// Calls body.template operator()<scalar_t, F>(params) for the tensor's dtype and the
// activation's functor over SIMD vectors of its compute type.
template <class Body>
void dispatch(const at::Tensor& t, const ActivationArg& act, const Body& body) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "bpext", [&] {
    using M = VecMath<at::opmath_type<scalar_t>>;
    visit_activation(act.kind, [&](auto a) {
      using F = Act<decltype(a)::value, M>;
      body.template operator()<scalar_t, F>(make_params<M>(act.params));
    });
  });
}

template <class T>
T* ptr(const at::Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<T>() : nullptr;
}

// x: (n) -> y: (n) = act(x)
void activation_forward(const ActivationArg& act, const at::Tensor& x, const at::Tensor& y) {
  dispatch(x, act, [&]<class T, class F>(const auto& p) {
    parallel_map(x.numel(), [&](const auto& z) { return F::forward(z, p); }, ptr<T>(y), x.const_data_ptr<T>());
  });
}

// grad_y, saved: (n) -> grad_x: (n) = grad_y * act'(saved)
void activation_backward(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved,
                         const at::Tensor& grad_x) {
  dispatch(grad_y, act, [&]<class T, class F>(const auto& p) {
    parallel_map(
        grad_y.numel(), [&](const auto& g, const auto& s) { return F::backward(g, s, p); }, ptr<T>(grad_x),
        grad_y.const_data_ptr<T>(), saved.const_data_ptr<T>());
  });
}

// grad_grad_x, grad_y, saved: (n) -> grad_grad_y = grad_grad_x * act'(saved), grad_saved = grad_grad_x * grad_y * act''(saved)
void activation_double_backward(const ActivationArg& act, const at::Tensor& grad_grad_x, const at::Tensor& grad_y,
                                const at::Tensor& saved, const at::Tensor& grad_grad_y,
                                const at::Tensor& grad_saved) {
  dispatch(grad_y, act, [&]<class T, class F>(const auto& p) {
    const T *gg = grad_grad_x.const_data_ptr<T>(), *g = grad_y.const_data_ptr<T>(), *s = saved.const_data_ptr<T>();
    parallel_map(grad_y.numel(), [&](const auto& ggv, const auto& sv) { return F::backward(ggv, sv, p); },
                 ptr<T>(grad_grad_y), gg, s);
    parallel_map(
        grad_y.numel(), [&](const auto& ggv, const auto& gv, const auto& sv) { return ggv * gv * F::second(sv, p); },
        ptr<T>(grad_saved), gg, g, s);
  });
}

// grad_y, saved: (N, OUT) -> dz = grad_y * act'(saved) (unless undefined), grad_bias = column sums of dz (unless undefined)
void bias_grad(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& dz,
               const at::Tensor& grad_bias) {
  const int64_t rows = grad_y.size(0), cols = grad_y.size(1);
  dispatch(grad_y, act, [&]<class T, class F>(const auto& p) {
    using V = typename VecIO<T>::V;
    const std::array<T*, 1> out{ptr<T>(dz)}, sums{ptr<T>(grad_bias)};
    if (saved.defined()) {
      map_rows_with_sums<1>(
          rows, cols, [&](const V& g, const V& s) { return std::array<V, 1>{F::backward(g, s, p)}; }, out, sums,
          grad_y.const_data_ptr<T>(), saved.const_data_ptr<T>());
    } else {  // identity: dz is grad_y itself
      map_rows_with_sums<1>(
          rows, cols, [&](const V& g) { return std::array<V, 1>{F::backward(g, g, p)}; }, out, sums,
          grad_y.const_data_ptr<T>());
    }
  });
}

// gate, up: (N, H) -> y = act(gate) * up
void gated_forward(const ActivationArg& act, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y) {
  dispatch(gate, act, [&]<class T, class F>(const auto& p) {
    parallel_map(
        gate.numel(), [&](const auto& a, const auto& b) { return F::forward(a, p) * b; }, ptr<T>(y),
        gate.const_data_ptr<T>(), up.const_data_ptr<T>());
  });
}

// grad_y, gate, up: (N, H) -> grad_gate = grad_y * up * act'(gate), grad_up = grad_y * act(gate), their column sums
void gated_backward(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& gate, const at::Tensor& up,
                    const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& grad_bias_gate,
                    const at::Tensor& grad_bias_up) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), "bpext", [&] {
    using T = scalar_t;
    using M = VecMath<at::opmath_type<T>>;
    using V = typename VecIO<T>::V;
    const auto p = make_params<M>(act.params);
    visit_activation(act.kind, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      map_rows_with_sums<2>(
          grad_y.size(0), grad_y.size(1),
          [&](const V& g, const V& z, const V& b) {
            const V y = Act<A, M>::forward(z, p);
            return std::array<V, 2>{backward_given<A, M>(g * b, z, y, p), g * y};
          },
          std::array<T*, 2>{ptr<T>(grad_gate), ptr<T>(grad_up)},
          std::array<T*, 2>{ptr<T>(grad_bias_gate), ptr<T>(grad_bias_up)}, grad_y.const_data_ptr<T>(),
          gate.const_data_ptr<T>(), up.const_data_ptr<T>());
    });
  });
}

const Backend kCpuBackend{
    activation_forward, activation_backward, activation_double_backward, bias_grad,
    gated_forward,      gated_backward,      mlp_forward,                mlp_backward,
};

}  // namespace
}  // namespace bpext::cpu

BPEXT_BACKEND(CPU, bpext::cpu::kCpuBackend);
