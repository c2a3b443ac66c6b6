// Argument parsing and checks shared by every op. Each message names the op, the
// argument and what was expected.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <cfloat>
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

// An activation and its parameters, parsed and checked once per op call.
struct ActivationArg {
  Activation kind = Activation::kIdentity;
  std::array<double, kMaxParams> params{};
  Saves saves() const { return info(kind).saves; }
};

inline std::string activation_choices() {
  std::string out;
  for (const auto& a : kActivations) out += (out.empty() ? "" : ", ") + std::string(a.name);
  return out;
}

inline const ActivationInfo* find_activation(std::string_view name) {
  for (const auto& a : kActivations) {
    if (a.name == name) return &a;
  }
  return nullptr;
}

// Checks `value` against the parameter's rule. `compute_max` is the largest finite value
// of the kernels' compute type: a finite parameter beyond it would silently become inf
// (ATen refuses it with an overflow error too).
inline void check_param(const Param& param, std::string_view activation, double value, double compute_max,
                        const char* op) {
  const std::string what = std::string(op) + ": " + std::string(activation) + " " + std::string(param.name);
  switch (param.rule) {
    case Rule::kFinite:
      TORCH_CHECK_VALUE(std::isfinite(value), what, " must be finite, got ", show(value));
      break;
    case Rule::kNonzero:
      TORCH_CHECK_VALUE(std::isfinite(value) && value != 0, what, " must be finite and nonzero, got ", show(value));
      break;
    case Rule::kNotNan:
      TORCH_CHECK_VALUE(!std::isnan(value), what, " must not be NaN");
      break;
  }
  TORCH_CHECK_VALUE(!std::isfinite(value) || std::fabs(value) <= compute_max, what, " = ", show(value),
                    " does not fit in the compute type (largest ", show(compute_max), ")");
}

// Parses the activation name and checks its parameters. `dtype` is the tensors' dtype; its
// compute type (float for the 16-bit types) bounds the parameters.
inline ActivationArg parse_activation(std::string_view name, at::ArrayRef<double> params, at::ScalarType dtype,
                                      const char* op) {
  const ActivationInfo* a = find_activation(name);
  TORCH_CHECK_VALUE(a != nullptr, op, ": unknown activation '", std::string(name), "'; expected one of: ",
                    activation_choices());
  TORCH_CHECK_VALUE(static_cast<int>(params.size()) == a->n_params, op, ": activation '", std::string(name),
                    "' takes ", show(static_cast<int64_t>(a->n_params)), " parameter(s), got ",
                    show(static_cast<int64_t>(params.size())));
  const double compute_max = dtype == at::kDouble ? DBL_MAX : FLT_MAX;
  ActivationArg out{a->kind, {}};
  for (int i = 0; i < a->n_params; ++i) {
    check_param(a->params[i], a->name, params[i], compute_max, op);
    out.params[i] = params[i];
  }
  return out;
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
              ref.device().str(), "), got ", t.device().str());
}

inline void check_same_shape(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_arg,
                             const char* arg) {
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", arg, " must have the shape of ", ref_arg, " ", show(ref.sizes()),
              ", got ", show(t.sizes()));
}

// t: the shape, dtype and device of ref
inline void check_like(const at::Tensor& ref, const at::Tensor& t, const char* op, const char* ref_arg,
                       const char* arg) {
  check_same_dtype_device(ref, t, op, ref_arg, arg);
  check_same_shape(ref, t, op, ref_arg, arg);
}

// t: (*, features), with at least one dimension
inline void check_rows(const at::Tensor& t, int64_t features, const char* op, const char* arg, const char* what) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == features, op, ": ", arg, " must have shape (*, ", show(features),
              ") (", what, "), got ", show(t.sizes()));
}

// weight: (OUT, IN) following a layer of IN features, one dtype and device with x
inline void check_weight(const at::Tensor& x, const at::Tensor& weight, int64_t in_features, const char* op,
                         const char* arg) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == in_features, op, ": ", arg,
              " must be 2-D of shape (out_features, ", show(in_features), "), got shape ", show(weight.sizes()));
  check_same_dtype_device(x, weight, op, "input", arg);
}

// bias: (OUT) or none
inline void check_bias(const at::Tensor& x, const std::optional<at::Tensor>& bias, int64_t out_features,
                       const char* op, const char* arg) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_features, op, ": ", arg,
              " must be 1-D of size out_features (", show(out_features), "), got shape ", show(bias->sizes()));
  check_same_dtype_device(x, *bias, op, "input", arg);
}

// The number of rows of a (*, features) tensor: the product of its leading dims.
inline int64_t rows_of(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// The leading dims of a (*, features) tensor folded into one: (N, features), as a view
// where the strides allow (GEMMs take any row-major or column-major layout).
inline at::Tensor as_rows(const at::Tensor& t) { return t.reshape({rows_of(t), t.size(-1)}); }

// (N, features) and contiguous: what the elementwise kernels read.
inline at::Tensor contiguous_rows(const at::Tensor& t) { return as_rows(t).contiguous(); }

// `sizes` with its last entry replaced: the output shape of a (*, IN) -> (*, OUT) layer.
inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

}  // namespace bpext
