// Activation forward and backward on CUDA: one vectorized grid-stride pass each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bpext/checks.h"
#include "elementwise.cuh"

namespace bpext::cuda {
namespace {

template <Activation A, class O>
struct ForwardOp {
  Params<O> params;
  __device__ O operator()(O z) const { return Act<A, ScalarMath<O>>::forward(z, params); }
};

template <Activation A, class O>
struct BackwardOp {
  Params<O> params;
  __device__ O operator()(O g, O s) const { return Act<A, ScalarMath<O>>::backward(g, s, params); }
};

template <Activation A, class O>
struct SecondOp {
  Params<O> params;
  __device__ O operator()(O gg, O g, O s) const { return gg * g * Act<A, ScalarMath<O>>::second(s, params); }
};

// x: (*) -> y: (*)
at::Tensor activation_forward(const at::Tensor& x, c10::string_view activation, double p0, double p1) {
  constexpr const char* op = "bpext.activation_forward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_floating(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using O = at::opmath_type<scalar_t>;
    const auto params = make_params<ScalarMath<O>>(p0, p1);
    visit_activation(act, [&](auto a) {
      launch_map(x.numel(), ForwardOp<decltype(a)::value, O>{params}, y.mutable_data_ptr<scalar_t>(),
                 xc.const_data_ptr<scalar_t>());
    });
  });
  return y;
}

// grad_y, saved: (*) -> grad_x: (*)
at::Tensor activation_backward(const at::Tensor& grad_y, const at::Tensor& saved, c10::string_view activation,
                               double p0, double p1) {
  constexpr const char* op = "bpext.activation_backward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_floating(grad_y, op, "grad_y");
  check_same_dtype_device(grad_y, saved, op, "grad_y", "saved");
  check_same_shape(grad_y, saved, op, "grad_y", "saved");
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor gc = grad_y.contiguous();
  const at::Tensor sc = saved.contiguous();
  at::Tensor grad_x = at::empty(grad_y.sizes(), gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), op, [&] {
    using O = at::opmath_type<scalar_t>;
    const auto params = make_params<ScalarMath<O>>(p0, p1);
    visit_activation(act, [&](auto a) {
      launch_map(grad_y.numel(), BackwardOp<decltype(a)::value, O>{params}, grad_x.mutable_data_ptr<scalar_t>(),
                 gc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>());
    });
  });
  return grad_x;
}

// grad_grad_x, grad_y, saved: (*) -> grad of grad_y, grad of saved: (*)
std::tuple<at::Tensor, at::Tensor> activation_double_backward(const at::Tensor& grad_grad_x, const at::Tensor& grad_y,
                                                              const at::Tensor& saved, c10::string_view activation,
                                                              double p0, double p1) {
  constexpr const char* op = "bpext.activation_double_backward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_double_backward_args(grad_grad_x, grad_y, saved, op);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  const at::Tensor ggc = grad_grad_x.contiguous(), gc = grad_y.contiguous(), sc = saved.contiguous();
  at::Tensor grad_grad_y = at::empty(gc.sizes(), gc.options());
  at::Tensor grad_saved = at::empty(gc.sizes(), gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), op, [&] {
    using O = at::opmath_type<scalar_t>;
    const auto params = make_params<ScalarMath<O>>(p0, p1);
    const scalar_t* gg = ggc.const_data_ptr<scalar_t>();
    const scalar_t* s = sc.const_data_ptr<scalar_t>();
    visit_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      launch_map(gc.numel(), BackwardOp<A, O>{params}, grad_grad_y.mutable_data_ptr<scalar_t>(), gg, s);
      launch_map(gc.numel(), SecondOp<A, O>{params}, grad_saved.mutable_data_ptr<scalar_t>(), gg,
                 gc.const_data_ptr<scalar_t>(), s);
    });
  });
  return {grad_grad_y, grad_saved};
}

}  // namespace

TORCH_LIBRARY_IMPL(bpext, CUDA, m) {
  m.impl("activation_forward", &activation_forward);
  m.impl("activation_backward", &activation_backward);
  m.impl("activation_double_backward", &activation_double_backward);
}

}  // namespace bpext::cuda
