// Input checks shared by the CPU and CUDA implementations of every op. Each
// message names the op, the argument and what was expected.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "bpext/activations.h"

namespace bpext {

// Numbers in error messages are formatted with snprintf, not std::ostream: under the GPU
// machine's torch 2.11 build, streaming a number from this extension (as c10::str does)
// segfaulted, while messages made only of strings were raised normally.
inline std::string show(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
inline std::string show(int64_t v) { return std::to_string(v); }
inline std::string show(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

struct ActivationName {
  std::string_view name;
  Activation value;
};

inline constexpr std::array<ActivationName, 11> kActivationNames{{
    {"identity", Activation::kIdentity},
    {"relu", Activation::kRelu},
    {"leaky_relu", Activation::kLeakyRelu},
    {"elu", Activation::kElu},
    {"gelu", Activation::kGelu},
    {"gelu_tanh", Activation::kGeluTanh},
    {"silu", Activation::kSilu},
    {"mish", Activation::kMish},
    {"sigmoid", Activation::kSigmoid},
    {"tanh", Activation::kTanh},
    {"softplus", Activation::kSoftplus},
}};

inline std::string activation_choices() {
  std::string out;
  for (const auto& a : kActivationNames) {
    out += out.empty() ? "" : ", ";
    out += a.name;
  }
  return out;
}

// Parses the activation name and checks its parameters (see Params in activations.h).
inline Activation parse_activation(std::string_view name, double p0, double p1, const char* op) {
  for (const auto& a : kActivationNames) {
    if (a.name != name) continue;
    switch (a.value) {
      case Activation::kLeakyRelu:
        TORCH_CHECK(std::isfinite(p0) && p0 >= 0, op, ": leaky_relu negative_slope must be finite and >= 0 "
                    "(the derivative is recovered from the output), got ", show(p0));
        break;
      case Activation::kElu:
        TORCH_CHECK(std::isfinite(p0) && p0 >= 0, op, ": elu alpha must be finite and >= 0 "
                    "(the derivative is recovered from the output), got ", show(p0));
        break;
      case Activation::kSoftplus:
        TORCH_CHECK(std::isfinite(p0) && p0 > 0, op, ": softplus beta must be finite and > 0, got ", show(p0));
        TORCH_CHECK(!std::isnan(p1), op, ": softplus threshold must not be NaN");
        break;
      default:
        break;
    }
    return a.value;
  }
  TORCH_CHECK_VALUE(false, op, ": unknown activation '", std::string(name), "'; expected one of: ",
                    activation_choices());
}

inline void check_floating(const at::Tensor& t, const char* op, const char* arg) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", arg,
                   " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
                   t.scalar_type());
}

inline void check_same_dtype_device(const at::Tensor& ref, const at::Tensor& t, const char* op,
                                    const char* ref_arg, const char* arg) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have the dtype of ", ref_arg,
                   " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", arg, " must be on the device of ", ref_arg, " (",
              ref.device(), "), got ", t.device());
}

inline void check_same_shape(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_arg,
                             const char* arg) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", arg, " must have the shape of ", ref_arg, " ", show(ref.sizes()),
              ", got ", show(t.sizes()));
}

// grad_grad_x, grad_y, saved: (*), one dtype and device
inline void check_double_backward_args(const at::Tensor& grad_grad_x, const at::Tensor& grad_y,
                                       const at::Tensor& saved, const char* op) {
  check_floating(grad_y, op, "grad_y");
  check_same_dtype_device(grad_y, grad_grad_x, op, "grad_y", "grad_grad_x");
  check_same_dtype_device(grad_y, saved, op, "grad_y", "saved");
  check_same_shape(grad_y, grad_grad_x, op, "grad_y", "grad_grad_x");
  check_same_shape(grad_y, saved, op, "grad_y", "saved");
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT)
inline void check_dense_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least 1 dimension (*, in_features), got a 0-D tensor");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got ", show(weight.dim()),
              "-D with shape ", show(weight.sizes()));
  check_same_dtype_device(x, weight, op, "input", "weight");
  TORCH_CHECK(x.size(-1) == weight.size(1), op, ": input's last dimension (", show(x.size(-1)),
              ") must equal weight's in_features (", show(weight.size(1)), "); input ", show(x.sizes()),
              ", weight ", show(weight.sizes()));
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must be 1-D of size out_features (",
                show(weight.size(0)), "), got shape ", show(bias->sizes()));
    check_same_dtype_device(x, *bias, op, "input", "bias");
  }
}

// grad_y, saved: (*, OUT), x: (*, IN) when grad_weight is asked for, weight: (OUT, IN)
inline void check_dense_backward_args(const at::Tensor& grad_y, const std::optional<at::Tensor>& x,
                                      const at::Tensor& weight, const at::Tensor& saved, Activation act,
                                      std::array<bool, 3> output_mask, const char* op) {
  check_floating(grad_y, op, "grad_y");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D (out_features, in_features), got shape ", show(weight.sizes()));
  check_same_dtype_device(grad_y, weight, op, "grad_y", "weight");
  TORCH_CHECK(grad_y.dim() >= 1 && grad_y.size(-1) == weight.size(0), op, ": grad_y must have shape (*, ",
              show(weight.size(0)), "), got ", show(grad_y.sizes()));
  if (act != Activation::kIdentity) {  // identity's backward reads nothing saved
    check_same_dtype_device(grad_y, saved, op, "grad_y", "saved");
    check_same_shape(grad_y, saved, op, "grad_y", "saved");
  }
  if (output_mask[1]) {
    TORCH_CHECK(x.has_value(), op, ": x is required to compute grad_weight");
    check_same_dtype_device(grad_y, *x, op, "grad_y", "x");
    const int64_t in_features = weight.size(1);
    TORCH_CHECK(x->dim() >= 1 && x->size(-1) == in_features && x->numel() == grad_y.numel() / std::max<int64_t>(1, weight.size(0)) * in_features,
                op, ": x must have shape (*, ", show(in_features), ") with the leading dims of grad_y ",
                show(grad_y.sizes()), ", got ", show(x->sizes()));
  }
}

// The leading dims of a (*, features) tensor folded into one: (N, features).
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t rows = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
  return t.reshape({rows, t.size(-1)}).contiguous();  // not (-1, F): ambiguous when F == 0
}

// `sizes` with its last entry replaced: the output shape of a (*, IN) -> (*, OUT) layer.
inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

}  // namespace bpext
