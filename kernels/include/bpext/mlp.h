// The multi-layer perceptron ops' shared pieces: argument parsing and checks, and the
// layer-by-layer implementation (kernels/mlp.cpp) that any backend can fall back to.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <string>
#include <tuple>
#include <vector>

#include "bpext/checks.h"

namespace bpext {

inline bool saves_output(Activation a) {
  return visit_activation(a, [](auto t) { return Act<decltype(t)::value, ScalarMath<float>>::kSavesOutput; });
}

// Whether a layer keeps its output y for backward (else its pre-activation z). Identity
// layers keep y too: their backward needs nothing, but y is the next layer's input.
inline bool keeps_output(Activation a) { return a == Activation::kIdentity || saves_output(a); }

// One layer's activation and parameters: hidden layers share one, the last has its own.
struct LayerActivation {
  std::string name;
  Activation kind;
  double p0, p1;
};

struct Network {
  LayerActivation hidden, output;
  const LayerActivation& of(size_t layer, size_t layers) const { return layer + 1 == layers ? output : hidden; }
};

inline Network parse_network(c10::string_view activation, double p0, double p1,
                             c10::string_view output_activation, double q0, double q1, const char* op) {
  return {{std::string(activation), parse_activation(activation, p0, p1, op), p0, p1},
          {std::string(output_activation), parse_activation(output_activation, q0, q1, op), q0, q1}};
}

// x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or none
inline void check_mlp_args(const at::Tensor& x, at::TensorList weights,
                           const c10::List<std::optional<at::Tensor>>& biases, const char* op) {
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one layer");
  TORCH_CHECK(biases.size() == weights.size(), op, ": biases must have one entry (a tensor or None) per layer: ",
              show(static_cast<int64_t>(weights.size())), " weights, ", show(static_cast<int64_t>(biases.size())),
              " biases");
  int64_t width = x.dim() >= 1 ? x.size(-1) : -1;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK(w.dim() == 2 && w.size(1) == width, op, ": weights[", show(static_cast<int64_t>(l)),
                "] must have shape (out, ", show(width), ") to follow the ", l == 0 ? "input" : "previous layer",
                ", got ", show(w.sizes()));
    width = w.size(0);
  }
}

// Each layer through the dense ops (see kernels/mlp.cpp); same schema as mlp_forward / mlp_backward.
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_layerwise(
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    c10::string_view activation, double p0, double p1, c10::string_view output_activation, double q0, double q1,
    bool save);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward_layerwise(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList saved, c10::string_view activation, double p0,
    double p1, c10::string_view output_activation, double q0, double q1, bool input_grad);

}  // namespace bpext
