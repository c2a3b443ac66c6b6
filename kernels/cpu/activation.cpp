// Activation forward, backward and double backward on the CPU: one vectorized, multithreaded
// map over the activation's functor each.
#include "kernels.h"

namespace bpext::cpu {

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

}  // namespace bpext::cpu
