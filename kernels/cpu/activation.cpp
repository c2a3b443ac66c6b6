// Activation forward and backward on the CPU: one vectorized, multithreaded pass each.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bpext/checks.h"
#include "vec_math.h"

namespace bpext::cpu {
namespace {

constexpr int64_t kGrainElements = 1 << 15;

// x: (*) -> y: (*)
at::Tensor activation_forward(const at::Tensor& x, c10::string_view activation, double p0, double p1) {
  constexpr const char* op = "bpext.activation_forward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_floating(x, op, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using M = VecMath<at::opmath_type<scalar_t>>;
    const auto params = make_params<M>(p0, p1);
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    visit_activation(act, [&](auto a) {
      using F = Act<decltype(a)::value, M>;
      at::parallel_for(0, x.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
        map_span(end - begin, [&](const auto& z) { return F::forward(z, params); }, out + begin, in + begin);
      });
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
  const at::Tensor gc = grad_y.contiguous();
  const at::Tensor sc = saved.contiguous();
  at::Tensor grad_x = at::empty(grad_y.sizes(), gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), op, [&] {
    using M = VecMath<at::opmath_type<scalar_t>>;
    const auto params = make_params<M>(p0, p1);
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    const scalar_t* s = sc.const_data_ptr<scalar_t>();
    scalar_t* out = grad_x.mutable_data_ptr<scalar_t>();
    visit_activation(act, [&](auto a) {
      using F = Act<decltype(a)::value, M>;
      at::parallel_for(0, grad_y.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
        map_span(
            end - begin, [&](const auto& gv, const auto& sv) { return F::backward(gv, sv, params); },
            out + begin, g + begin, s + begin);
      });
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
  const at::Tensor ggc = grad_grad_x.contiguous(), gc = grad_y.contiguous(), sc = saved.contiguous();
  at::Tensor grad_grad_y = at::empty(gc.sizes(), gc.options());
  at::Tensor grad_saved = at::empty(gc.sizes(), gc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_y.scalar_type(), op, [&] {
    using M = VecMath<at::opmath_type<scalar_t>>;
    const auto params = make_params<M>(p0, p1);
    const scalar_t* gg = ggc.const_data_ptr<scalar_t>();
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    const scalar_t* s = sc.const_data_ptr<scalar_t>();
    scalar_t* out_g = grad_grad_y.mutable_data_ptr<scalar_t>();
    scalar_t* out_s = grad_saved.mutable_data_ptr<scalar_t>();
    visit_activation(act, [&](auto a) {
      using F = Act<decltype(a)::value, M>;
      at::parallel_for(0, grad_y.numel(), kGrainElements, [&](int64_t begin, int64_t end) {
        map_span(
            end - begin, [&](const auto& ggv, const auto& sv) { return F::backward(ggv, sv, params); },
            out_g + begin, gg + begin, s + begin);
        map_span(
            end - begin,
            [&](const auto& ggv, const auto& gv, const auto& sv) { return ggv * gv * F::second(sv, params); },
            out_s + begin, gg + begin, g + begin, s + begin);
      });
    });
  });
  return {grad_grad_y, grad_saved};
}

}  // namespace

TORCH_LIBRARY_IMPL(bpext, CPU, m) {
  m.impl("activation_forward", &activation_forward);
  m.impl("activation_backward", &activation_backward);
  m.impl("activation_double_backward", &activation_double_backward);
}

}  // namespace bpext::cpu
