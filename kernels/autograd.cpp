// bpext::dense: a dense layer with its autograd in C++, the plain eager path. dense_forward and
// dense_backward are tied together by a torch::autograd::Function, so an eager training step
// runs no Python between a layer's ops (a Python autograd.Function costs some 40 us a layer,
// forward and backward, more than a small layer's GEMMs). bpext/functional.py calls this op
// in plain eager mode only: under torch.func, forward-mode AD, torch.compile and tracing it
// applies DenseFunction, which this mirrors (same outputs, same saved tensors, same double
// backward built of differentiable pieces).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "bpext/checks.h"
#include "bpext/config.h"

namespace bpext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <class Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Params = at::ArrayRef<double>;
using OptionalTensor = std::optional<at::Tensor>;

// The ops this Function ties together, called through the dispatcher (so fake and meta
// tensors reach their fake kernels), below autograd where they must not record a graph.
const auto& dense_forward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, c10::string_view, Params, bool)>(
      "bpext::dense_forward");
  return op;
}
const auto& dense_backward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const at::Tensor&, c10::string_view, Params,
      std::array<bool, 3>)>("bpext::dense_backward");
  return op;
}
const auto& activation_backward_op() {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, Params)>("bpext::activation_backward");
  return op;
}

at::Tensor sum_defined(const at::Tensor& a, const at::Tensor& b) {
  if (!a.defined()) return b;
  return b.defined() ? a + b : a;
}

struct DenseAutograd : torch::autograd::Function<DenseAutograd> {
  // x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact.
  // Saves x only when the weight needs a gradient, the weight only when x does, and the tensor
  // the activation's derivative reads (y, z or nothing); never the bias.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const OptionalTensor& bias, c10::string_view activation, Params params,
                               bool return_preact) {
    at::Tensor y, preact;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, preact) = dense_forward_op().call(x, weight, bias, activation, params, return_preact);
    }
    const Saves saves = find_activation(activation)->saves;  // `dense` checked the name
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(), x.requires_grad() ? weight : at::Tensor(),
                            saves == Saves::kOutput ? y : saves == Saves::kInput ? preact : at::Tensor()});
    ctx->saved_data["activation"] = std::string(activation);
    ctx->saved_data["params"] = params.vec();
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->set_materialize_grads(false);
    if (!return_preact) ctx->mark_non_differentiable({preact});
    return {y, preact};
  }

  // grad_y, grad_preact: (*, OUT), either undefined -> grad_x, grad_weight, grad_bias (undefined where not needed)
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor &grad_y = grads[0], &grad_preact = grads[1];
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &weight = saved[1], &s = saved[2];
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor inputs only: x, weight, and the bias when there is one
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    variable_list out(6);
    if (!grad_y.defined() && !grad_preact.defined()) return out;
    if (at::GradMode::is_enabled() || grad_preact.defined()) {
      // Double backward (create_graph=True), or a gradient sent into z: differentiable pieces.
      const at::Tensor dz = sum_defined(
          !grad_y.defined() || !s.defined() ? grad_y : activation_backward_op().call(grad_y, s, activation, params),
          grad_preact);
      const at::Tensor dz2 = as_rows(dz);
      if (mask[0]) out[0] = at::mm(dz2, weight).reshape(with_last_dim(dz.sizes(), weight.size(1)));
      if (mask[1]) out[1] = at::mm(dz2.t(), as_rows(x));
      if (mask[2]) out[2] = dz2.sum(0);
      return out;
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weight, grad_bias] = dense_backward_op().call(
        grad_y, mask[1] ? OptionalTensor(x) : std::nullopt, mask[0] ? OptionalTensor(weight) : std::nullopt,
        s.defined() ? s : at::empty({0}, grad_y.options()), activation, params, mask);
    if (mask[0]) out[0] = grad_x;
    if (mask[1]) out[1] = grad_weight;
    if (mask[2]) out[2] = grad_bias;
    return out;
  }
};

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT) = act(x @ weight.T + bias)
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                 c10::string_view activation, Params params) {
  const Saves saves = parse_activation(activation, params, x.scalar_type(), "bpext.dense").saves();
  const bool builds_graph = at::GradMode::is_enabled() &&
                            (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  // z is kept (and returned, for double backward) only where backward reads it
  const bool return_preact = builds_graph && saves == Saves::kInput;
  return DenseAutograd::apply(x, weight, bias, activation, params, return_preact)[0];
}

// CompositeImplicitAutograd: one kernel above autograd for every device (and for meta and fake
// tensors, whose dense_forward is the fake one); the Function records the graph itself.
const bool registered = [] {
  if (!define_library()) return false;
  static torch::Library library(torch::Library::IMPL, "bpext", c10::DispatchKey::CompositeImplicitAutograd,
                                __FILE__, __LINE__);
  library.impl("dense", TORCH_FN(dense));
  return true;
}();

}  // namespace
}  // namespace bpext
