// The CPU's elementwise passes (see bpext/backend.h for what each computes), built once per SIMD
// level: activation.cpp, layers.cpp and mlp.cpp, gathered into one table by backend.cpp.
#pragma once

#include <ATen/Dispatch.h>

#include "bpext/backend.h"
#include "vec_math.h"

namespace bpext::cpu {

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

void activation_forward(const ActivationArg& act, const at::Tensor& x, const at::Tensor& y);
void activation_backward(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved,
                         const at::Tensor& grad_x);
void activation_double_backward(const ActivationArg& act, const at::Tensor& grad_grad_x, const at::Tensor& grad_y,
                                const at::Tensor& saved, const at::Tensor& grad_grad_y, const at::Tensor& grad_saved);
void bias_grad(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved, const at::Tensor& dz,
               const at::Tensor& grad_bias);
void gated_forward(const ActivationArg& act, const at::Tensor& gate, const at::Tensor& up, const at::Tensor& y);
void gated_backward(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& gate, const at::Tensor& up,
                    const at::Tensor& grad_gate, const at::Tensor& grad_up, const at::Tensor& grad_bias_gate,
                    const at::Tensor& grad_bias_up);
// false for networks they do not fuse (too wide, 16-bit): the ops then run them layer by layer
bool mlp_forward(const Network& net, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                 const at::Tensor& y, at::TensorList saved);
bool mlp_backward(const Network& net, at::IntArrayRef widths, const at::Tensor& grad_y, const at::Tensor& x,
                  at::TensorList weights, at::TensorList state, const at::Tensor& grad_x, at::TensorList grad_weights,
                  at::TensorList grad_biases);

}  // namespace bpext::cpu
