// Every op of bpext, written once for all devices: parse and check the arguments, shape
// and allocate the outputs, run the matrix products through ATen, and call the device's
// elementwise passes (bpext/backend.h) in between. Outputs are allocated in their final
// shape (never returned as views), so in-place ops on them work as on native outputs.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "bpext/backend.h"
#include "bpext/config.h"

namespace bpext {
namespace {

std::array<const Backend*, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& backends() {
  static std::array<const Backend*, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> table{};
  return table;
}

at::Tensor empty0(const at::Tensor& like) { return at::empty({0}, like.options()); }

// out: (N, OUT) = x: (N, IN) @ weight.T + bias. The bias is folded into the product, so a
// 16-bit result is rounded once, exactly as F.linear rounds it.
void linear_out(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (bias.defined()) {
    at::addmm_out(out, bias, x, weight.t());
  } else {
    at::mm_out(out, x, weight.t());
  }
}

// A view of t, allocated as (*, F), as (N, F).
at::Tensor rows_view(const at::Tensor& t) { return t.view({rows_of(t), t.size(-1)}); }

at::Tensor bias_or_undefined(const std::optional<at::Tensor>& bias) {
  return bias.has_value() ? bias->contiguous() : at::Tensor();
}

// ---- activations -----------------------------------------------------------------------

// x: (*) -> y: (*)
at::Tensor activation_forward(const at::Tensor& x, c10::string_view activation, at::ArrayRef<double> params) {
  constexpr const char* op = "bpext.activation_forward";
  check_floating(x, op, "x");
  const ActivationArg act = parse_activation(activation, params, x.scalar_type(), op);
  const c10::OptionalDeviceGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), xc.options());
  if (y.numel() > 0) backend_for(x.device().type()).activation_forward(act, xc, y);
  return y;
}

// grad_y, saved: (*) -> grad_x: (*)
at::Tensor activation_backward(const at::Tensor& grad_y, const at::Tensor& saved, c10::string_view activation,
                               at::ArrayRef<double> params) {
  constexpr const char* op = "bpext.activation_backward";
  check_floating(grad_y, op, "grad_y");
  const ActivationArg act = parse_activation(activation, params, grad_y.scalar_type(), op);
  check_like(grad_y, saved, op, "grad_y", "saved");
  const c10::OptionalDeviceGuard guard(grad_y.device());
  const at::Tensor gc = grad_y.contiguous();
  at::Tensor grad_x = at::empty(grad_y.sizes(), gc.options());
  if (grad_x.numel() > 0) {
    backend_for(grad_y.device().type()).activation_backward(act, gc, saved.contiguous(), grad_x);
  }
  return grad_x;
}

// grad_grad_x, grad_y, saved: (*) -> grad of grad_y, grad of saved: (*)
std::tuple<at::Tensor, at::Tensor> activation_double_backward(const at::Tensor& grad_grad_x, const at::Tensor& grad_y,
                                                              const at::Tensor& saved, c10::string_view activation,
                                                              at::ArrayRef<double> params) {
  constexpr const char* op = "bpext.activation_double_backward";
  check_floating(grad_y, op, "grad_y");
  const ActivationArg act = parse_activation(activation, params, grad_y.scalar_type(), op);
  check_like(grad_y, grad_grad_x, op, "grad_y", "grad_grad_x");
  check_like(grad_y, saved, op, "grad_y", "saved");
  const c10::OptionalDeviceGuard guard(grad_y.device());
  const at::Tensor gc = grad_y.contiguous();
  at::Tensor grad_grad_y = at::empty(grad_y.sizes(), gc.options());
  at::Tensor grad_saved = at::empty(grad_y.sizes(), gc.options());
  if (gc.numel() > 0) {
    backend_for(grad_y.device().type())
        .activation_double_backward(act, grad_grad_x.contiguous(), gc, saved.contiguous(), grad_grad_y, grad_saved);
  }
  return {grad_grad_y, grad_saved};
}

// ---- dense layers ----------------------------------------------------------------------

// x: (*, IN), weight: (OUT, IN), bias: (OUT)
void check_dense_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least 1 dimension (*, in_features), got a 0-D tensor");
  check_weight(x, weight, x.size(-1), op, "weight");
  check_bias(x, bias, weight.size(0), op, "bias");
}

// x2: (N, IN) -> y2, z2: (N, OUT); z2 is y2 itself unless the pre-activation is kept apart.
void dense_forward_rows(const Backend& backend, const ActivationArg& act, const at::Tensor& x2,
                        const at::Tensor& weight, const at::Tensor& bias, at::Tensor y2, const at::Tensor& z2) {
  const bool in_place = z2.is_same(y2);
  // ReLU with a bias can finish inside the GEMM (cuBLASLt's epilogue on CUDA), except for
  // an empty reduction, where _addmm_activation returns the bias un-activated.
  if (act.kind == Activation::kRelu && in_place && bias.defined() && x2.size(0) > 0 && x2.size(1) > 0 &&
      gemm_epilogue_enabled().load()) {
    at::_addmm_activation_out(y2, bias, x2, weight.t(), 1, 1, /*use_gelu=*/false);
    return;
  }
  linear_out(z2, x2, weight, bias);
  if (y2.numel() > 0 && (act.kind != Activation::kIdentity || !in_place)) backend.activation_forward(act, z2, y2);
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                 at::ArrayRef<double> params, bool return_preact) {
  constexpr const char* op = "bpext.dense_forward";
  check_dense_args(x, weight, bias, op);
  const ActivationArg act = parse_activation(activation, params, x.scalar_type(), op);
  const c10::OptionalDeviceGuard guard(x.device());
  const auto out_shape = with_last_dim(x.sizes(), weight.size(0));
  at::Tensor y = at::empty(out_shape, x.options());
  at::Tensor preact = return_preact ? at::empty(out_shape, x.options()) : empty0(x);
  const at::Tensor y2 = rows_view(y);  // one view, so that dense_forward_rows sees z2 is y2
  dense_forward_rows(backend_for(x.device().type()), act, as_rows(x), weight, bias_or_undefined(bias), y2,
                     return_preact ? rows_view(preact) : y2);
  return {y, preact};
}

// g2, s2: (N, OUT) -> dz2 (g2 itself for identity) and grad_bias when `bias_grad`
at::Tensor dense_dz(const Backend& backend, const ActivationArg& act, const at::Tensor& g2, const at::Tensor& s2,
                    const at::Tensor& grad_bias) {
  if (act.kind == Activation::kIdentity) {
    if (grad_bias.defined()) backend.bias_grad(act, g2, at::Tensor(), at::Tensor(), grad_bias);
    return g2;
  }
  at::Tensor dz = at::empty_like(g2);
  backend.bias_grad(act, g2, s2, dz, grad_bias);
  return dz;
}

// grad_y: (*, OUT), saved: (*, OUT) (unread for identity), x2: (N, IN) or undefined, weight: (OUT, IN) or
// undefined -> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless mask asks for it
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward_rows(const Backend& backend, const ActivationArg& act,
                                                                   const at::Tensor& grad_y, const at::Tensor& x2,
                                                                   const at::Tensor& weight, const at::Tensor& saved,
                                                                   std::array<bool, 3> mask) {
  const at::Tensor g2 = contiguous_rows(grad_y);
  at::Tensor grad_bias = mask[2] ? at::empty({g2.size(1)}, g2.options()) : empty0(g2);
  at::Tensor grad_x = empty0(g2), grad_weight = empty0(g2);
  if (!mask[0] && !mask[1] && !mask[2]) return {grad_x, grad_weight, grad_bias};
  const bool reads_saved = act.saves() != Saves::kNothing;
  const at::Tensor dz = dense_dz(backend, act, g2, reads_saved ? contiguous_rows(saved) : at::Tensor(),
                                 mask[2] ? grad_bias : at::Tensor());
  if (mask[0]) {
    grad_x = at::empty(with_last_dim(grad_y.sizes(), weight.size(1)), g2.options());
    at::Tensor grad_x2 = rows_view(grad_x);
    at::mm_out(grad_x2, dz, weight);
  }
  if (mask[1]) grad_weight = at::mm(dz.t(), x2);
  return {grad_x, grad_weight, grad_bias};
}

// grad_y, saved: (*, OUT), x: (*, IN) (read for grad_weight), weight: (OUT, IN) (read for grad_x)
//   -> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless output_mask asks for it
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad_y,
                                                             const std::optional<at::Tensor>& x,
                                                             const std::optional<at::Tensor>& weight,
                                                             const at::Tensor& saved, c10::string_view activation,
                                                             at::ArrayRef<double> params,
                                                             std::array<bool, 3> output_mask) {
  constexpr const char* op = "bpext.dense_backward";
  check_floating(grad_y, op, "grad_y");
  const ActivationArg act = parse_activation(activation, params, grad_y.scalar_type(), op);
  TORCH_CHECK(grad_y.dim() >= 1, op, ": grad_y must have at least 1 dimension (*, out_features), got a 0-D tensor");
  const int64_t out_features = grad_y.size(-1);
  if (act.saves() != Saves::kNothing) check_like(grad_y, saved, op, "grad_y", "saved");
  if (output_mask[0]) {
    TORCH_CHECK(weight.has_value(), op, ": weight is required to compute grad_x");
    TORCH_CHECK(weight->dim() == 2 && weight->size(0) == out_features, op,
                ": weight must be 2-D of shape (", show(out_features), ", in_features) to match grad_y ",
                show(grad_y.sizes()), ", got shape ", show(weight->sizes()));
    check_same_dtype_device(grad_y, *weight, op, "grad_y", "weight");
  }
  if (output_mask[1]) {
    TORCH_CHECK(x.has_value(), op, ": x is required to compute grad_weight");
    check_same_dtype_device(grad_y, *x, op, "grad_y", "x");
    TORCH_CHECK(x->dim() >= 1 && rows_of(*x) == rows_of(grad_y), op, ": x must have shape (*, in_features) with "
                "as many rows as grad_y ", show(grad_y.sizes()), ", got ", show(x->sizes()));
    TORCH_CHECK(!output_mask[0] || x->size(-1) == weight->size(1), op, ": x must have shape (*, ",
                show(weight->size(1)), ") to match weight, got ", show(x->sizes()));
  }
  const c10::OptionalDeviceGuard guard(grad_y.device());
  return dense_backward_rows(backend_for(grad_y.device().type()), act, grad_y,
                             output_mask[1] ? as_rows(*x) : at::Tensor(),
                             output_mask[0] ? *weight : at::Tensor(), saved, output_mask);
}

// ---- gated layers: y = act(x Wg^T + bg) * (x Wu^T + bu) -----------------------------------

struct Gated {
  at::Tensor weight_gate, bias_gate, weight_up, bias_up;
};

// x: (*, IN), weight_gate, weight_up: (H, IN), bias_gate, bias_up: (H) or none
Gated check_gated_args(const at::Tensor& x, const at::Tensor& weight_gate, const std::optional<at::Tensor>& bias_gate,
                       const at::Tensor& weight_up, const std::optional<at::Tensor>& bias_up, const char* op) {
  check_floating(x, op, "input");
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least 1 dimension (*, in_features), got a 0-D tensor");
  check_weight(x, weight_gate, x.size(-1), op, "weight_gate");
  check_weight(x, weight_up, x.size(-1), op, "weight_up");
  TORCH_CHECK(weight_up.size(0) == weight_gate.size(0), op, ": weight_up must have the shape of weight_gate ",
              show(weight_gate.sizes()), ", got ", show(weight_up.sizes()));
  check_bias(x, bias_gate, weight_gate.size(0), op, "bias_gate");
  check_bias(x, bias_up, weight_gate.size(0), op, "bias_up");
  return {weight_gate, bias_or_undefined(bias_gate), weight_up, bias_or_undefined(bias_up)};
}

// x2: (N, IN) -> gate2, up2: (N, H) pre-activations, h2: (N, H) = act(gate) * up
void gated_forward_rows(const Backend& backend, const ActivationArg& act, const at::Tensor& x2, const Gated& p,
                        const at::Tensor& gate2, const at::Tensor& up2, const at::Tensor& h2) {
  linear_out(gate2, x2, p.weight_gate, p.bias_gate);
  linear_out(up2, x2, p.weight_up, p.bias_up);
  if (h2.numel() > 0) backend.gated_forward(act, gate2, up2, h2);
}

// What the gated layer's backward reads besides gate and up, each only where the mask (x,
// weight_gate, bias_gate, weight_up, bias_up) asks: x2 (N, IN) for the weights' gradients, the
// weights (H, IN) for grad_x; undefined otherwise.
struct GatedGradInputs {
  at::Tensor x2, weight_gate, weight_up;
  int64_t in_features = -1;  // -1: neither x nor the weights are read
};

// gate, up: (*, H); x: (*, IN) where a weight's gradient is asked for; weight_gate, weight_up: (H, IN) where grad_x is
GatedGradInputs check_gated_grad_inputs(const at::Tensor& gate, const at::Tensor& up, const std::optional<at::Tensor>& x,
                                        const std::optional<at::Tensor>& weight_gate,
                                        const std::optional<at::Tensor>& weight_up, std::array<bool, 5> mask,
                                        const char* op) {
  check_floating(gate, op, "gate");
  TORCH_CHECK(gate.dim() >= 1, op, ": gate must have at least 1 dimension (*, hidden), got a 0-D tensor");
  check_like(gate, up, op, "gate", "up");
  const int64_t hidden = gate.size(-1);
  GatedGradInputs in;
  if (mask[1] || mask[3]) {
    TORCH_CHECK(x.has_value(), op, ": x is required to compute the weights' gradients");
    check_same_dtype_device(gate, *x, op, "gate", "x");
    TORCH_CHECK(x->dim() >= 1, op, ": x must have at least 1 dimension (*, in_features), got a 0-D tensor");
    const auto shape = with_last_dim(x->sizes(), hidden);
    TORCH_CHECK(gate.sizes() == at::IntArrayRef(shape), op, ": gate must have shape ", show(shape), " to match x ",
                show(x->sizes()), ", got ", show(gate.sizes()));
    in.x2 = as_rows(*x);
    in.in_features = x->size(-1);
  }
  if (mask[0]) {
    TORCH_CHECK(weight_gate.has_value() && weight_up.has_value(), op,
                ": weight_gate and weight_up are required to compute grad_x");
    for (const auto& [w, name] : {std::pair{&*weight_gate, "weight_gate"}, std::pair{&*weight_up, "weight_up"}}) {
      TORCH_CHECK(w->dim() == 2 && w->size(0) == hidden && (in.in_features < 0 || w->size(1) == in.in_features), op,
                  ": ", name, " must be 2-D of shape (", show(hidden), ", ",
                  in.in_features < 0 ? std::string("in_features") : show(in.in_features), "), got shape ",
                  show(w->sizes()));
      check_same_dtype_device(gate, *w, op, "gate", name);
      in.in_features = w->size(1);
    }
    in.weight_gate = *weight_gate;
    in.weight_up = *weight_up;
  }
  return in;
}

// The gated layer's input gradients from grad_h, gate2, up2: (N, H) -> grad_x: (*, IN) (written into
// grad_x2, its (N, IN) view), grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up, where
// mask (x, weight_gate, bias_gate, weight_up, bias_up) asks; (0) otherwise.
std::array<at::Tensor, 4> gated_backward_rows(const Backend& backend, const ActivationArg& act,
                                              const at::Tensor& grad_h, const GatedGradInputs& in,
                                              const at::Tensor& gate2, const at::Tensor& up2,
                                              std::array<bool, 5> mask, at::Tensor grad_x2) {
  const auto opts = grad_h.options();
  const int64_t hidden = gate2.size(1);
  at::Tensor grad_bias_gate = mask[2] ? at::empty({hidden}, opts) : empty0(grad_h);
  at::Tensor grad_bias_up = mask[4] ? at::empty({hidden}, opts) : empty0(grad_h);
  at::Tensor grad_weight_gate = empty0(grad_h), grad_weight_up = empty0(grad_h);
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4])) {
    return {grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up};
  }
  at::Tensor grad_gate = at::empty_like(grad_h), grad_up = at::empty_like(grad_h);
  if (grad_h.numel() > 0) {
    backend.gated_backward(act, grad_h, gate2, up2, grad_gate, grad_up, mask[2] ? grad_bias_gate : at::Tensor(),
                           mask[4] ? grad_bias_up : at::Tensor());
  } else {
    grad_bias_gate.zero_();
    grad_bias_up.zero_();
  }
  if (mask[0]) {
    at::mm_out(grad_x2, grad_gate, in.weight_gate);
    grad_x2.addmm_(grad_up, in.weight_up);
  }
  if (mask[1]) grad_weight_gate = at::mm(grad_gate.t(), in.x2);
  if (mask[3]) grad_weight_up = at::mm(grad_up.t(), in.x2);
  return {grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up};
}

// x: (*, IN) -> y: (*, H), gate: (*, H), up: (*, H); gate and up (0) unless save
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_forward(const at::Tensor& x, const at::Tensor& weight_gate,
                                                             const std::optional<at::Tensor>& bias_gate,
                                                             const at::Tensor& weight_up,
                                                             const std::optional<at::Tensor>& bias_up,
                                                             c10::string_view activation, at::ArrayRef<double> params,
                                                             bool save) {
  constexpr const char* op = "bpext.gated_forward";
  const Gated p = check_gated_args(x, weight_gate, bias_gate, weight_up, bias_up, op);
  const ActivationArg act = parse_activation(activation, params, x.scalar_type(), op);
  const c10::OptionalDeviceGuard guard(x.device());
  const auto shape = with_last_dim(x.sizes(), weight_gate.size(0));
  at::Tensor y = at::empty(shape, x.options());
  at::Tensor gate = at::empty(shape, x.options()), up = at::empty(shape, x.options());
  gated_forward_rows(backend_for(x.device().type()), act, as_rows(x), p, rows_view(gate), rows_view(up), rows_view(y));
  if (!save) return {y, empty0(x), empty0(x)};
  return {y, gate, up};
}

// grad_y, gate, up: (*, H), x: (*, IN) (read for the weights' gradients), weight_gate, weight_up: (H, IN)
// (read for grad_x) -> grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up; each (0) unless asked for
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight_gate,
    const std::optional<at::Tensor>& weight_up, const at::Tensor& gate, const at::Tensor& up,
    c10::string_view activation, at::ArrayRef<double> params, std::array<bool, 5> output_mask) {
  constexpr const char* op = "bpext.gated_backward";
  const GatedGradInputs in = check_gated_grad_inputs(gate, up, x, weight_gate, weight_up, output_mask, op);
  const ActivationArg act = parse_activation(activation, params, gate.scalar_type(), op);
  check_like(gate, grad_y, op, "gate", "grad_y");
  const c10::OptionalDeviceGuard guard(gate.device());
  at::Tensor grad_x = output_mask[0] ? at::empty(with_last_dim(gate.sizes(), in.in_features), gate.options())
                                     : empty0(gate);
  auto [gw, gb, uw, ub] = gated_backward_rows(backend_for(gate.device().type()), act, contiguous_rows(grad_y), in,
                                              contiguous_rows(gate), contiguous_rows(up), output_mask,
                                              output_mask[0] ? rows_view(grad_x) : at::Tensor());
  return {grad_x, gw, gb, uw, ub};
}

// ---- gated MLP: y = down(act(gate(x)) * up(x)) --------------------------------------------

// x: (*, IN), weights_gate/up: (H, IN), weight_down: (OUT, H) -> y: (*, OUT), gate, up: (*, H) or (0) unless save.
// act(gate) * up is not kept: backward recomputes it from gate and up.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_mlp_forward(
    const at::Tensor& x, const at::Tensor& weight_gate, const std::optional<at::Tensor>& bias_gate,
    const at::Tensor& weight_up, const std::optional<at::Tensor>& bias_up, const at::Tensor& weight_down,
    const std::optional<at::Tensor>& bias_down, c10::string_view activation, at::ArrayRef<double> params, bool save) {
  constexpr const char* op = "bpext.gated_mlp_forward";
  const Gated p = check_gated_args(x, weight_gate, bias_gate, weight_up, bias_up, op);
  check_weight(x, weight_down, weight_gate.size(0), op, "weight_down");
  check_bias(x, bias_down, weight_down.size(0), op, "bias_down");
  const ActivationArg act = parse_activation(activation, params, x.scalar_type(), op);
  const c10::OptionalDeviceGuard guard(x.device());
  const Backend& backend = backend_for(x.device().type());
  const at::Tensor x2 = as_rows(x);
  const auto hidden_shape = with_last_dim(x.sizes(), weight_gate.size(0));
  at::Tensor gate = at::empty(hidden_shape, x.options()), up = at::empty(hidden_shape, x.options());
  const at::Tensor h2 = at::empty({x2.size(0), weight_gate.size(0)}, x.options());
  gated_forward_rows(backend, act, x2, p, rows_view(gate), rows_view(up), h2);
  at::Tensor y = at::empty(with_last_dim(x.sizes(), weight_down.size(0)), x.options());
  linear_out(rows_view(y), h2, weight_down, bias_or_undefined(bias_down));
  if (!save) return {y, empty0(x), empty0(x)};
  return {y, gate, up};
}

// grad_y: (*, OUT), gate, up: (*, H), x, weight_gate, weight_up as gated_backward reads them, weight_down: (OUT, H)
// (read unless only its own gradients are asked for) -> grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up,
//   grad_bias_up, grad_weight_down, grad_bias_down; each (0) unless output_mask asks for it
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gated_mlp_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight_gate,
    const std::optional<at::Tensor>& weight_up, const std::optional<at::Tensor>& weight_down, const at::Tensor& gate,
    const at::Tensor& up, c10::string_view activation, at::ArrayRef<double> params, std::array<bool, 7> output_mask) {
  constexpr const char* op = "bpext.gated_mlp_backward";
  const std::array<bool, 5> mask{output_mask[0], output_mask[1], output_mask[2], output_mask[3], output_mask[4]};
  const GatedGradInputs in = check_gated_grad_inputs(gate, up, x, weight_gate, weight_up, mask, op);
  const ActivationArg act = parse_activation(activation, params, gate.scalar_type(), op);
  check_same_dtype_device(gate, grad_y, op, "gate", "grad_y");
  TORCH_CHECK(grad_y.dim() == gate.dim() && grad_y.sizes().slice(0, grad_y.dim() - 1) == gate.sizes().slice(0, gate.dim() - 1),
              op, ": grad_y must have shape (*, out_features) with gate's leading dims ", show(gate.sizes()), ", got ",
              show(grad_y.sizes()));
  const bool hidden_grad = mask[0] || mask[1] || mask[2] || mask[3] || mask[4];
  if (hidden_grad) {
    TORCH_CHECK(weight_down.has_value(), op, ": weight_down is required to compute the gated layer's gradients");
    TORCH_CHECK(weight_down->dim() == 2 && weight_down->size(0) == grad_y.size(-1) &&
                    weight_down->size(1) == gate.size(-1),
                op, ": weight_down must be 2-D of shape (", show(grad_y.size(-1)), ", ", show(gate.size(-1)),
                "), got shape ", show(weight_down->sizes()));
    check_same_dtype_device(gate, *weight_down, op, "gate", "weight_down");
  }
  const c10::OptionalDeviceGuard guard(gate.device());
  const Backend& backend = backend_for(gate.device().type());
  const at::Tensor g2 = contiguous_rows(grad_y), gate2 = contiguous_rows(gate), up2 = contiguous_rows(up);
  at::Tensor grad_bias_down = output_mask[6] ? at::empty({grad_y.size(-1)}, gate.options()) : empty0(gate);
  if (output_mask[6]) dense_dz(backend, ActivationArg{}, g2, at::Tensor(), grad_bias_down);
  at::Tensor grad_weight_down = empty0(gate);
  if (output_mask[5]) {
    at::Tensor h2 = at::empty_like(gate2);
    if (h2.numel() > 0) backend.gated_forward(act, gate2, up2, h2);
    grad_weight_down = at::mm(g2.t(), h2);
  }
  at::Tensor grad_x = output_mask[0] ? at::empty(with_last_dim(gate.sizes(), in.in_features), gate.options())
                                     : empty0(gate);
  const at::Tensor grad_h = hidden_grad ? at::mm(g2, *weight_down) : gate2;  // unread where nothing is asked of it
  auto [gw, gb, uw, ub] = gated_backward_rows(backend, act, grad_h, in, gate2, up2, mask,
                                              output_mask[0] ? rows_view(grad_x) : at::Tensor());
  return {grad_x, gw, gb, uw, ub, grad_weight_down, grad_bias_down};
}

// ---- multi-layer perceptrons -----------------------------------------------------------

Network parse_network(c10::string_view activation, at::ArrayRef<double> params, c10::string_view output_activation,
                      at::ArrayRef<double> output_params, at::ScalarType dtype, const char* op) {
  return {parse_activation(activation, params, dtype, op),
          parse_activation(output_activation, output_params, dtype, op)};
}

// x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) -> the biases, undefined where (0)
std::vector<at::Tensor> check_mlp_args(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                       const char* op) {
  check_floating(x, op, "x");
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (*, in_features), got a 0-D tensor");
  TORCH_CHECK(!weights.empty(), op, ": weights must hold at least one layer");
  TORCH_CHECK(biases.size() == weights.size(), op, ": biases must have one entry (a tensor, (0) for none) per layer: ",
              show(static_cast<int64_t>(weights.size())), " weights, ", show(static_cast<int64_t>(biases.size())),
              " biases");
  std::vector<at::Tensor> out;
  int64_t width = x.size(-1);
  for (size_t l = 0; l < weights.size(); ++l) {
    const std::string w_arg = "weights[" + show(static_cast<int64_t>(l)) + "]";
    const std::string b_arg = "biases[" + show(static_cast<int64_t>(l)) + "]";
    check_weight(x, weights[l], width, op, w_arg.c_str());
    width = weights[l].size(0);
    const std::optional<at::Tensor> b = biases[l].numel() > 0 ? std::optional(biases[l]) : std::nullopt;
    check_bias(x, b, width, op, b_arg.c_str());
    out.push_back(bias_or_undefined(b));
  }
  return out;
}

// x: (*, W0) -> y: (*, W[L]), saved: one tensor per layer (see mlp_keeps_*) when `save`, else none
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward(const at::Tensor& x, at::TensorList weights,
                                                            at::TensorList biases, c10::string_view activation,
                                                            at::ArrayRef<double> params,
                                                            c10::string_view output_activation,
                                                            at::ArrayRef<double> output_params, bool save) {
  constexpr const char* op = "bpext.mlp_forward";
  const std::vector<at::Tensor> bias = check_mlp_args(x, weights, biases, op);
  const Network net = parse_network(activation, params, output_activation, output_params, x.scalar_type(), op);
  const c10::OptionalDeviceGuard guard(x.device());
  const Backend& backend = backend_for(x.device().type());
  const size_t layers = weights.size();
  const at::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0);
  at::Tensor y = at::empty(with_last_dim(x.sizes(), weights.back().size(0)), x.options());
  std::vector<at::Tensor> saved, saved2;  // (*, W) as returned, and the same as (N, W)
  for (size_t l = 0; l < layers && save; ++l) {
    const bool none = mlp_keeps_nothing(l, layers, net.of(l, layers));
    saved.push_back(none ? empty0(x) : at::empty(with_last_dim(x.sizes(), weights[l].size(0)), x.options()));
    saved2.push_back(none ? saved.back() : rows_view(saved.back()));
  }
  if (backend.mlp_forward && backend.mlp_forward(net, x2, weights, bias, rows_view(y), saved2)) return {y, saved};
  // Layer by layer: each writes y (into saved, the output, or a temporary) and z when kept.
  at::Tensor a = x2;
  for (size_t l = 0; l < layers; ++l) {
    const ActivationArg& act = net.of(l, layers);
    const bool last = l + 1 == layers;
    const bool keep = save && !mlp_keeps_nothing(l, layers, act);
    at::Tensor y_l = last ? rows_view(y)
                          : (keep && !mlp_keeps_z(act) ? saved2[l] : at::empty({rows, weights[l].size(0)}, x.options()));
    at::Tensor z_l = keep && mlp_keeps_z(act) ? saved2[l] : y_l;
    dense_forward_rows(backend, act, a, weights[l], bias[l], y_l, z_l);
    a = y_l;
  }
  return {y, saved};
}

bool is_weight(const at::Tensor& t) { return t.dim() == 2; }  // else the (0) that stands for an unread one

// grad_y: (*, W[L]); x: (*, W0), read for grad_weights[0]; y: the output, read where the last layer's
// derivative reads it; weights[l]: (W[l+1], W[l]), read where a gradient below layer l is asked for, else
// (0) may stand for it; saved: what mlp_forward kept
//   -> grad_x: (*, W0), grad_weights[l], grad_biases[l]: (W[l+1]); each (0) unless output_mask asks for it
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& y, at::TensorList weights,
    at::TensorList saved, c10::string_view activation, at::ArrayRef<double> params,
    c10::string_view output_activation, at::ArrayRef<double> output_params, const c10::List<bool>& output_mask) {
  constexpr const char* op = "bpext.mlp_backward";
  const size_t layers = weights.size();
  check_floating(grad_y, op, "grad_y");
  TORCH_CHECK(grad_y.dim() >= 1, op, ": grad_y must have at least 1 dimension (*, out_features), got a 0-D tensor");
  TORCH_CHECK(layers > 0, op, ": weights must hold at least one layer");
  TORCH_CHECK(saved.size() == layers, op, ": saved must have one tensor per layer, as mlp_forward returns");
  TORCH_CHECK(output_mask.size() == 1 + 2 * layers, op,
              ": output_mask must have 1 + 2 * layers entries (grad_x, then the weights', then the biases')");
  const Network net = parse_network(activation, params, output_activation, output_params, grad_y.scalar_type(), op);
  const MLPGrads wants(output_mask.vec(), layers);
  auto name = [](const char* list, size_t l) { return std::string(list) + "[" + show(static_cast<int64_t>(l)) + "]"; };
  // The widths: W[L] from grad_y, a hidden layer's from what it kept, W[0] from x or weights[0].
  std::vector<int64_t> widths(layers + 1);
  widths[layers] = grad_y.size(-1);
  for (size_t l = 0; l + 1 < layers; ++l) {
    TORCH_CHECK(saved[l].dim() == grad_y.dim(), op, ": ", name("saved", l), " must have shape (*, W) with grad_y's "
                "leading dims, as mlp_forward returns it, got ", show(saved[l].sizes()));
    widths[l + 1] = saved[l].size(-1);
  }
  widths[0] = x.has_value() ? x->size(-1) : is_weight(weights[0]) ? weights[0].size(1) : 0;
  auto rows_shape = [&](size_t l) { return with_last_dim(grad_y.sizes(), widths[l]); };
  TORCH_CHECK(x.has_value() || !wants.weight[0], op, ": x is read for grad_weights[0]");
  if (x.has_value()) {
    check_same_dtype_device(grad_y, *x, op, "grad_y", "x");
    TORCH_CHECK(x->sizes() == at::IntArrayRef(rows_shape(0)), op, ": x must have shape ", show(rows_shape(0)),
                " (grad_y's leading dims), got ", show(x->sizes()));
  }
  for (size_t l = 0; l < layers; ++l) {
    const std::string w = name("weights", l);
    TORCH_CHECK(is_weight(weights[l]) || !wants.input[l], op, ": ", w, " is read for the gradient of layer ",
                show(static_cast<int64_t>(l)), "'s input, which output_mask asks for");
    if (!is_weight(weights[l])) continue;
    check_same_dtype_device(grad_y, weights[l], op, "grad_y", w.c_str());
    TORCH_CHECK(weights[l].size(0) == widths[l + 1] && weights[l].size(1) == widths[l], op, ": ", w,
                " must have shape ", show(at::IntArrayRef{widths[l + 1], widths[l]}), ", got ",
                show(weights[l].sizes()));
  }
  // What each layer's backward reads: its saved tensor, or the output y for the last layer.
  std::vector<at::Tensor> state2(layers);
  for (size_t l = 0; l < layers; ++l) {
    const ActivationArg& act = net.of(l, layers);
    const bool from_y = mlp_keeps_nothing(l, layers, act);
    if (from_y && act.saves() == Saves::kNothing) continue;  // the last layer is linear: nothing to read
    const at::Tensor& s = from_y ? y : saved[l];
    const std::string what = from_y ? "y" : name("saved", l);
    check_same_dtype_device(grad_y, s, op, "grad_y", what.c_str());
    TORCH_CHECK(s.sizes() == at::IntArrayRef(rows_shape(l + 1)), op, ": ", what, " must have shape ",
                show(rows_shape(l + 1)), " as mlp_forward returns it, got ", show(s.sizes()));
    state2[l] = contiguous_rows(s);
  }
  const at::TensorOptions options = grad_y.options();
  at::Tensor grad_x = wants.input[0] ? at::empty(rows_shape(0), options) : empty0(grad_y);
  std::vector<at::Tensor> grad_weights, grad_biases, weight_out, bias_out, read_weights;  // *_out: undefined unless asked
  for (size_t l = 0; l < layers; ++l) {
    grad_weights.push_back(wants.weight[l] ? at::empty({widths[l + 1], widths[l]}, options) : empty0(grad_y));
    grad_biases.push_back(wants.bias[l] ? at::empty({widths[l + 1]}, options) : empty0(grad_y));
    weight_out.push_back(wants.weight[l] ? grad_weights[l] : at::Tensor());
    bias_out.push_back(wants.bias[l] ? grad_biases[l] : at::Tensor());
    read_weights.push_back(wants.input[l] ? weights[l] : at::Tensor());
  }
  if (!wants.input[layers]) return {grad_x, grad_weights, grad_biases};  // nothing asked for
  const c10::OptionalDeviceGuard guard(grad_y.device());
  const Backend& backend = backend_for(grad_y.device().type());
  const at::Tensor x2 = wants.weight[0] ? as_rows(*x) : at::Tensor();
  const at::Tensor g2 = contiguous_rows(grad_y);
  const at::Tensor grad_x2 = wants.input[0] ? rows_view(grad_x) : at::Tensor();
  if (backend.mlp_backward &&
      backend.mlp_backward(net, widths, g2, x2, read_weights, state2, grad_x2, weight_out, bias_out)) {
    return {grad_x, grad_weights, grad_biases};
  }
  // Layer by layer, from the last down to the lowest that anything is asked of: the input of
  // layer l is x, the previous layer's kept y, or act(z) recomputed from its kept z.
  at::Tensor g = g2;
  for (size_t l = layers; l-- > 0 && wants.input[l + 1];) {
    const at::Tensor dz = dense_dz(backend, net.of(l, layers), g, state2[l], bias_out[l]);
    if (wants.weight[l]) {
      at::Tensor a = l == 0 ? x2 : state2[l - 1];
      if (l > 0 && mlp_keeps_z(net.hidden)) {
        a = at::empty_like(state2[l - 1]);
        if (a.numel() > 0) backend.activation_forward(net.hidden, state2[l - 1], a);
      }
      at::mm_out(grad_weights[l], dz.t(), a);
    }
    if (!wants.input[l]) break;
    at::Tensor g_in = l == 0 ? grad_x2 : at::empty({g.size(0), widths[l]}, options);
    at::mm_out(g_in, dz, weights[l]);
    g = g_in;
  }
  return {grad_x, grad_weights, grad_biases};
}

// ---- the last dense layer with its cross-entropy loss ------------------------------------------

struct LossArgs {
  int64_t ignore_index;
  double label_smoothing, softcap, z_loss;  // softcap 0: none
};

// Rows per block: as many as keep a block's logits (rows x V, in float) within 32 MB, and at least 256:
// the products of fewer rows run at half the rate (65 rows of a 128256-word vocabulary, the 32 MB of
// such a block, took twice the time per row of 1024 rows on the CPU).
int64_t loss_block_rows(int64_t rows, int64_t vocab) {
  const int64_t within_32mb = (int64_t{32} << 20) / (4 * std::max<int64_t>(vocab, 1));
  return std::clamp<int64_t>(std::max<int64_t>(within_32mb, 256), 1, std::max<int64_t>(rows, 1));
}

// input: (N, H), weight: (V, H), bias: (V) or undefined, target: (N) -> loss: (N), in the compute type (float for
// the 16-bit types), 0 where the target is ignored: lse - (1 - eps) z_t - eps mean(z) + z_loss lse^2 of the
// logits z = x W^T + b (softcap * tanh(z / softcap) where capped). With row_weights ((N), defined) also the
// gradients of sum_i row_weights_i loss_i that mask asks for: grad_input (N, H), grad_weight (V, H), grad_bias
// (V), computed block by block, never holding more than one block's logits.
std::array<at::Tensor, 4> loss_blocks(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                      const at::Tensor& target, const LossArgs& a, const at::Tensor& row_weights,
                                      std::array<bool, 3> mask) {
  const int64_t rows = x.size(0), vocab = weight.size(0);
  const bool with_grad = row_weights.defined() && (mask[0] || mask[1] || (mask[2] && bias.defined()));
  const auto compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto fopts = x.options().dtype(compute);
  at::Tensor loss = at::zeros({rows}, fopts);
  at::Tensor grad_x, grad_w, grad_b;
  if (with_grad) {
    // no products without a vocabulary (every target is then ignored: check_loss_args): zeros
    if (mask[0]) grad_x = vocab > 0 ? at::empty(x.sizes(), x.options()) : at::zeros(x.sizes(), x.options());
    if (mask[1]) grad_w = at::zeros(weight.sizes(), fopts);  // summed over blocks in the compute type, rounded once
    if (mask[2] && bias.defined()) grad_b = at::zeros({vocab}, fopts);
  }
  // the smoothing term's mean over no classes is 0/0 in every row, ignored ones too, as native's
  if (vocab == 0 && a.label_smoothing != 0) loss.fill_(std::numeric_limits<double>::quiet_NaN());
  const at::Tensor w_t = weight.t();
  const int64_t block = loss_block_rows(rows, vocab);
  for (int64_t r0 = 0; r0 < rows && vocab > 0; r0 += block) {
    const int64_t r1 = std::min(rows, r0 + block);
    const at::Tensor xb = x.slice(0, r0, r1), tb = target.slice(0, r0, r1);
    at::Tensor z = (bias.defined() ? at::addmm(bias, xb, w_t) : at::mm(xb, w_t)).to(compute);
    at::Tensor capped;  // tanh(z / softcap)
    if (a.softcap > 0) {
      capped = at::tanh(z / a.softcap);
      z = capped * a.softcap;
    }
    // log softmax(z) = z - lse in one pass (logsumexp, then z - lse and its exp, took three)
    at::Tensor log_p = at::_log_softmax(z, 1, false);
    const at::Tensor lse = a.z_loss != 0 ? at::logsumexp(z, {1}) : at::Tensor();
    const at::Tensor valid = tb != a.ignore_index;
    const at::Tensor safe = at::where(valid, tb, at::zeros_like(tb)).unsqueeze(1);
    // lse - (1 - eps) z_t - eps mean(z)
    at::Tensor lb = -(1 - a.label_smoothing) * log_p.gather(1, safe).squeeze(1);
    if (a.label_smoothing != 0) lb = lb - a.label_smoothing * log_p.mean({1});
    if (a.z_loss != 0) lb = lb + a.z_loss * lse * lse;
    loss.slice(0, r0, r1).copy_(at::where(valid, lb, at::zeros_like(lb)));
    if (!with_grad) continue;
    // d loss / dz = softmax(z) (1 + 2 z_loss lse) - (1 - eps) onehot(t) - eps / V, times the row's weight
    at::Tensor dz = log_p.exp_();
    if (a.z_loss != 0) dz.mul_((1 + 2 * a.z_loss * lse).unsqueeze(1));
    if (a.label_smoothing != 0) dz.sub_(a.label_smoothing / vocab);
    dz.scatter_add_(1, safe, at::full({r1 - r0, 1}, -(1 - a.label_smoothing), fopts));
    dz.mul_(at::where(valid, row_weights.slice(0, r0, r1).to(compute), 0).unsqueeze(1));
    if (a.softcap > 0) dz.mul_(1 - capped * capped);
    if (grad_x.defined()) {
      at::Tensor grad_xb = grad_x.slice(0, r0, r1);
      at::mm_out(grad_xb, dz.to(x.scalar_type()), weight);
    }
    // 16-bit blocks are multiplied in float: their sum over blocks keeps float's digits, as native's one
    // product does
    if (grad_w.defined()) grad_w.addmm_(dz.t(), compute == x.scalar_type() ? xb : xb.to(compute));
    if (grad_b.defined()) grad_b.add_(dz.sum(0));
  }
  const auto out = [&](const at::Tensor& g) { return g.defined() ? g.to(x.scalar_type()) : empty0(x); };
  return {loss, out(grad_x), out(grad_w), out(grad_b)};
}

// What each row's loss counts in the reduced loss: 1 / (the divisor, or the number of rows not ignored for
// "mean", or 1 for "sum"), a scalar tensor (no synchronisation); undefined for "none".
at::Tensor loss_row_weight(const at::Tensor& target, const LossArgs& a, c10::string_view reduction,
                           std::optional<double> divisor, at::ScalarType compute) {
  if (reduction == "none") return at::Tensor();
  const auto opts = target.options().dtype(compute);
  if (divisor.has_value()) return at::full({}, 1.0 / *divisor, opts);
  if (reduction == "sum") return at::ones({}, opts);
  return 1 / (target != a.ignore_index).sum().to(compute);  // inf where every row is ignored: 0/0 = NaN, as native
}

LossArgs check_loss_args(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& target, int64_t ignore_index, double label_smoothing, double softcap,
                         double z_loss, c10::string_view reduction, std::optional<double> divisor, const char* op) {
  TORCH_CHECK_VALUE(reduction == "mean" || reduction == "sum" || reduction == "none", op,
                    ": reduction must be mean, sum or none, got ", std::string(reduction));
  // (0: the summed loss over 0 is inf, or NaN where it is 0, as native's; its gradients inf or NaN)
  TORCH_CHECK_VALUE(!divisor.has_value() || std::isfinite(*divisor), op, ": divisor must be finite, got ",
                    show(divisor.value_or(0.0)));
  check_floating(input, op, "input");
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D (tokens, hidden), got shape ", show(input.sizes()));
  check_weight(input, weight, input.size(1), op, "weight");
  check_bias(input, bias, weight.size(0), op, "bias");
  TORCH_CHECK_TYPE(target.scalar_type() == at::kLong, op, ": target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op, ": target must be 1-D of size ",
              show(input.size(0)), " (one class per row of input), got shape ", show(target.sizes()));
  TORCH_CHECK(target.device() == input.device(), op, ": target must be on the device of input");
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, op, ": label_smoothing must be in [0, 1], got ",
                    show(label_smoothing));
  TORCH_CHECK_VALUE(std::isfinite(softcap) && softcap >= 0, op, ": softcap must be finite and > 0 (0: none), got ",
                    show(softcap));
  TORCH_CHECK_VALUE(std::isfinite(z_loss) && z_loss >= 0, op, ": z_loss must be finite and >= 0, got ", show(z_loss));
  if (input.size(0) > 0) {
    const at::Tensor bad = (target != ignore_index) & ((target < 0) | (target >= weight.size(0)));
    TORCH_CHECK_INDEX(!bad.any().item<bool>(), op, ": target holds a class outside [0, ", show(weight.size(0)),
                      ") that is not ignore_index (", show(ignore_index), ")");
  }
  return {ignore_index, label_smoothing, softcap, z_loss};
}

// input: (N, H), weight: (V, H), bias: (V), target: (N)
//   -> loss: () reduced ("mean", "sum": divided by divisor where given) or (N) ("none"), in the compute type;
//      and (a scalar reduction) the gradients of that loss output_mask asks for, grad_input (N, H),
//      grad_weight (V, H), grad_bias (V), computed in the same blocks; each (0) unless asked for
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& target,
    int64_t ignore_index, double label_smoothing, double softcap, double z_loss, c10::string_view reduction,
    std::optional<double> divisor, std::array<bool, 3> output_mask) {
  constexpr const char* op = "bpext.linear_cross_entropy_forward";
  const LossArgs a = check_loss_args(input, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss,
                                     reduction, divisor, op);
  const bool with_grad = output_mask[0] || output_mask[1] || output_mask[2];
  TORCH_CHECK(!with_grad || reduction != "none", op, ": gradients in forward need a scalar reduction (mean or sum)");
  const c10::OptionalDeviceGuard guard(input.device());
  const auto compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor scale = loss_row_weight(target, a, reduction, divisor, compute);
  const at::Tensor row_weights = with_grad ? scale.expand({input.size(0)}) : at::Tensor();
  auto [rows, gx, gw, gb] = loss_blocks(input, weight, bias_or_undefined(bias), target, a, row_weights, output_mask);
  return {reduction == "none" ? rows : rows.sum() * scale, gx, gw, gb};
}

// grad_loss: () or (N), as the loss -> grad_input (N, H), grad_weight (V, H), grad_bias (V) ((0) without bias):
// the logits recomputed block by block
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_backward(
    const at::Tensor& grad_loss, const at::Tensor& input, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& target, int64_t ignore_index, double label_smoothing,
    double softcap, double z_loss, c10::string_view reduction, std::optional<double> divisor) {
  constexpr const char* op = "bpext.linear_cross_entropy_backward";
  const LossArgs a = check_loss_args(input, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss,
                                     reduction, divisor, op);
  check_floating(grad_loss, op, "grad_loss");
  const bool rows = reduction == "none";
  TORCH_CHECK(rows ? grad_loss.dim() == 1 && grad_loss.size(0) == input.size(0) : grad_loss.dim() == 0, op,
              ": grad_loss must have the loss's shape (", rows ? "1-D, one per row" : "a scalar", "), got shape ",
              show(grad_loss.sizes()));
  TORCH_CHECK(grad_loss.device() == input.device(), op, ": grad_loss must be on the device of input");
  const c10::OptionalDeviceGuard guard(input.device());
  const auto compute = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor g = grad_loss.to(compute);
  const at::Tensor row_weights = rows ? g : (g * loss_row_weight(target, a, reduction, divisor, compute)).expand({input.size(0)});
  auto [loss, gx, gw, gb] =
      loss_blocks(input, weight, bias_or_undefined(bias), target, a, row_weights, {true, true, true});
  return {gx, gw, gb};
}

}  // namespace

const Backend& backend_for(c10::DeviceType device) {
  const Backend* b = backends()[static_cast<size_t>(device)];
  TORCH_CHECK(b != nullptr, "bpext has no kernels for device type ", c10::DeviceTypeName(device),
              " in this build");
  TORCH_CHECK(b->activation_forward != nullptr, "bpext's ", c10::DeviceTypeName(device),
              " kernels are not loaded: import bpext (it loads the ones built for this CPU)");
  return *b;
}

bool register_backend(c10::DispatchKey key, c10::DeviceType device, const Backend* backend, const char* file,
                      uint32_t line) {
  if (!define_library()) return false;
  static std::vector<std::unique_ptr<torch::Library>> libraries;  // one per backend, for the process's lifetime
  torch::Library& m = *libraries.emplace_back(std::make_unique<torch::Library>(torch::Library::IMPL, "bpext", key, file, line));
  backends()[static_cast<size_t>(device)] = backend;
  m.impl("activation_forward", TORCH_FN(activation_forward));
  m.impl("activation_backward", TORCH_FN(activation_backward));
  m.impl("activation_double_backward", TORCH_FN(activation_double_backward));
  m.impl("dense_forward", TORCH_FN(dense_forward));
  m.impl("dense_backward", TORCH_FN(dense_backward));
  m.impl("gated_forward", TORCH_FN(gated_forward));
  m.impl("gated_backward", TORCH_FN(gated_backward));
  m.impl("gated_mlp_forward", TORCH_FN(gated_mlp_forward));
  m.impl("gated_mlp_backward", TORCH_FN(gated_mlp_backward));
  m.impl("mlp_forward", TORCH_FN(mlp_forward));
  m.impl("mlp_backward", TORCH_FN(mlp_backward));
  m.impl("linear_cross_entropy_forward", TORCH_FN(linear_cross_entropy_forward));
  m.impl("linear_cross_entropy_backward", TORCH_FN(linear_cross_entropy_backward));
  return true;
}

}  // namespace bpext
