// The dense and gated layers' elementwise passes on the CPU: the backward's pre-activation gradient
// with its bias-gradient column sums, and the gated product forward and backward.
#include "kernels.h"

namespace bpext::cpu {

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

}  // namespace bpext::cpu
