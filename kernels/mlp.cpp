// The whole network in one op each way: mlp_forward and mlp_backward run every layer
// through bpext's dense kernels, so they work on every backend that has those.
//
// Forward keeps one tensor per layer: the output y when the activation's derivative
// follows from it (it is also the next layer's input), else the pre-activation z.
// Backward recomputes each layer's input act(z) from the saved z when it needs it for
// the weight gradient, instead of having kept it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "bpext/mlp.h"

namespace bpext {
namespace {

using DenseForwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&, c10::string_view, double,
                                                         double, bool);
using DenseBackwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&, c10::string_view,
    double, double, std::array<bool, 3>);
using ActivationForwardFn = at::Tensor(const at::Tensor&, c10::string_view, double, double);

template <class Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

}  // namespace

// x: (*, IN) -> y: (*, OUT), saved: one tensor per layer (empty where the layer needs none) when `save`
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_layerwise(const at::Tensor& x, at::TensorList weights,
                                                            const c10::List<std::optional<at::Tensor>>& biases,
                                                            c10::string_view activation, double p0, double p1,
                                                            c10::string_view output_activation, double q0, double q1,
                                                            bool save) {
  constexpr const char* op = "bpext.mlp_forward";
  const Network net = parse_network(activation, p0, p1, output_activation, q0, q1, op);
  check_mlp_args(x, weights, biases, op);
  static const auto dense_forward = op_handle<DenseForwardFn>("bpext::dense_forward");
  const size_t layers = weights.size();
  std::vector<at::Tensor> saved;
  at::Tensor a = x;
  for (size_t l = 0; l < layers; ++l) {
    const LayerActivation& act = net.of(l, layers);
    const bool last = l + 1 == layers;
    const bool keeps_y = keeps_output(act.kind);
    auto [y, z] = dense_forward.call(a, weights[l], biases.get(l), act.name, act.p0, act.p1, save && !keeps_y);
    if (save) {
      // The last layer's y is the op's output, which the caller keeps itself.
      const bool none = last && keeps_y;
      saved.push_back(none ? at::empty({0}, x.options()) : (keeps_y ? y : z));
    }
    a = y;
  }
  return {a, saved};
}

// grad_y: (*, OUT) -> grad_x: (*, IN) (or (0) unless input_grad), grad_weights[l], grad_biases[l] ((0) without bias)
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward_layerwise(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList saved, c10::string_view activation, double p0,
    double p1, c10::string_view output_activation, double q0, double q1, bool input_grad) {
  constexpr const char* op = "bpext.mlp_backward";
  const Network net = parse_network(activation, p0, p1, output_activation, q0, q1, op);
  check_mlp_args(x, weights, biases, op);
  TORCH_CHECK(saved.size() == weights.size(), op, ": saved must have one tensor per layer, as mlp_forward returns");
  static const auto dense_backward = op_handle<DenseBackwardFn>("bpext::dense_backward");
  static const auto activation_forward = op_handle<ActivationForwardFn>("bpext::activation_forward");
  const size_t layers = weights.size();
  const LayerActivation& hidden = net.hidden;
  const bool hidden_keeps_y = keeps_output(hidden.kind);
  // The input of layer l: x, the previous layer's saved y, or act(z) recomputed.
  const auto layer_input = [&](size_t l) -> at::Tensor {
    if (l == 0) return x;
    return hidden_keeps_y ? saved[l - 1] : activation_forward.call(saved[l - 1], hidden.name, hidden.p0, hidden.p1);
  };
  std::vector<at::Tensor> grad_weights(layers), grad_biases(layers);
  at::Tensor g = grad_y;
  for (size_t l = layers; l-- > 0;) {
    const LayerActivation& act = net.of(l, layers);
    const bool last = l + 1 == layers;
    const bool keeps_y = keeps_output(act.kind);
    const at::Tensor& s = last && keeps_y ? y : saved[l];
    const std::array<bool, 3> mask{l > 0 || input_grad, true, biases.get(l).has_value()};
    auto [gx, gw, gb] = dense_backward.call(g, layer_input(l), weights[l], s, act.name, act.p0, act.p1, mask);
    grad_weights[l] = gw;
    grad_biases[l] = gb;
    g = gx;
  }
  return {input_grad ? g : at::empty({0}, grad_y.options()), grad_weights, grad_biases};
}

TORCH_LIBRARY_IMPL(bpext, CompositeExplicitAutograd, m) {
  m.impl("mlp_forward", &mlp_forward_layerwise);
  m.impl("mlp_backward", &mlp_backward_layerwise);
}

}  // namespace bpext
