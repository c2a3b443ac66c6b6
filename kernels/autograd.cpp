// The plain eager path of the dense layer and the MLP: bpext::dense and bpext::mlp tie each
// layer's forward and backward ops together with a torch::autograd::Function, so an eager
// training step runs no Python between a layer's ops (a Python autograd.Function costs some
// 40 us a layer, forward and backward, more than a small layer's GEMMs). bpext/functional.py
// calls these ops in plain eager mode only: under torch.func, forward-mode AD, torch.compile
// and tracing it applies DenseFunction and MLPFunction, whose outputs and saved tensors these
// mirror. Double backward calls the one differentiable definition of each layer's backward, which
// bpext/functional.py registers as bpext::dense_grads and bpext::mlp_grads.
#include <ATen/ATen.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
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
const auto& mlp_forward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, std::vector<at::Tensor>>(
      const at::Tensor&, at::TensorList, at::TensorList, c10::string_view, Params, c10::string_view, Params, bool)>(
      "bpext::mlp_forward");
  return op;
}
const auto& mlp_backward_op() {
  static const auto op = find_op<std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, at::TensorList, at::TensorList, at::TensorList,
      c10::string_view, Params, c10::string_view, Params, bool)>("bpext::mlp_backward");
  return op;
}
// The layers' backward as differentiable pieces, for double backward: defined once, in Python
// (bpext/functional.py, _dense_grads and _stack_grads, registered as CompositeImplicitAutograd ops),
// so their formulas are those of every other path. (0) where not asked for.
const auto& dense_grads_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      c10::string_view, Params, std::array<bool, 3>)>("bpext::dense_grads");
  return op;
}
const auto& mlp_grads_op() {
  static const auto op = find_op<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, at::TensorList,
                                                         at::TensorList, c10::string_view, Params, c10::string_view,
                                                         Params, at::IntArrayRef)>("bpext::mlp_grads");
  return op;
}
const auto& activation_forward_op() {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, c10::string_view, Params)>("bpext::activation_forward");
  return op;
}
const auto& activation_backward_op() {
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, Params)>("bpext::activation_backward");
  return op;
}

// An activation as backward needs it, kept in the context under `key`.
struct SavedActivation {
  std::string name;
  std::vector<double> params;

  static void store(AutogradContext* ctx, const std::string& key, c10::string_view name, Params params) {
    ctx->saved_data[key] = std::string(name);
    ctx->saved_data[key + ".params"] = params.vec();
  }
  static SavedActivation load(AutogradContext* ctx, const std::string& key) {
    return {ctx->saved_data[key].toStringRef(), ctx->saved_data[key + ".params"].toDoubleVector()};
  }
  Saves saves() const { return find_activation(name)->saves; }
};

// What an activation's derivative reads of a layer with pre-activation z and output y.
at::Tensor read_of(Saves saves, const at::Tensor& z, const at::Tensor& y) {
  return saves == Saves::kOutput ? y : saves == Saves::kInput ? z : at::Tensor();
}

OptionalTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

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
    ctx->save_for_backward({weight.requires_grad() ? x : at::Tensor(), x.requires_grad() ? weight : at::Tensor(),
                            read_of(find_activation(activation)->saves, preact, y)});  // `dense` checked the name
    SavedActivation::store(ctx, "activation", activation, params);
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
    const SavedActivation act = SavedActivation::load(ctx, "activation");
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts the tensor inputs only: x, weight, and the bias when there is one
    const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                   has_bias && ctx->needs_input_grad(2)};
    variable_list out(6);
    if (!grad_y.defined() && !grad_preact.defined()) return out;
    if (at::GradMode::is_enabled() || grad_preact.defined()) {
      // Double backward (create_graph=True), or a gradient sent into z: differentiable pieces.
      auto [grad_x, grad_weight, grad_bias] =
          dense_grads_op().call(defined_or_none(grad_y), defined_or_none(grad_preact), defined_or_none(x),
                                defined_or_none(weight), defined_or_none(s), act.name, act.params, mask);
      if (mask[0]) out[0] = grad_x;
      if (mask[1]) out[1] = grad_weight;
      if (mask[2]) out[2] = grad_bias;
      return out;
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weight, grad_bias] = dense_backward_op().call(
        grad_y, mask[1] ? OptionalTensor(x) : std::nullopt, mask[0] ? OptionalTensor(weight) : std::nullopt,
        s.defined() ? s : grad_y.new_empty({0}), act.name, act.params, mask);  // new_empty: a DTensor for a DTensor
    if (mask[0]) out[0] = grad_x;
    if (mask[1]) out[1] = grad_weight;
    if (mask[2]) out[2] = grad_bias;
    return out;
  }
};

// Forward-mode AD: a C++ Function has no jvp, so a tangent would be dropped without a word.
// bpext.functional's layers carry tangents; these ops refuse them.
void check_no_tangents(std::initializer_list<at::TensorList> lists, const char* op) {
  for (const at::TensorList list : lists) {
    for (const at::Tensor& t : list) {
      TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), op,
                  " has no forward-mode derivative (a dual tensor reached it): use the bpext.functional layer, "
                  "which has one");
    }
  }
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT) = act(x @ weight.T + bias)
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                 c10::string_view activation, Params params) {
  const Saves saves = parse_activation(activation, params, x.scalar_type(), "bpext.dense").saves();
  check_no_tangents({x, weight, bias.has_value() ? at::TensorList(*bias) : at::TensorList()}, "bpext.dense");
  const bool builds_graph = at::GradMode::is_enabled() &&
                            (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  if (!builds_graph) {  // no graph to record: the forward op alone, without the pre-activation
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::get<0>(dense_forward_op().call(x, weight, bias, activation, params, false));
  }
  // z is kept (and returned, for double backward) only where backward reads it
  return DenseAutograd::apply(x, weight, bias, activation, params, saves == Saves::kInput)[0];
}

// A bias of the mlp ops: (0) stands for none (sizes may be symbolic, under torch.compile's tracing).
bool is_bias(const at::Tensor& bias) { return bias.sym_numel() != 0; }

// A bias's version counter, which double backward checks; an inference tensor has none (and
// cannot be changed in place outside inference mode), nor has the (0) that stands for no bias.
int64_t version_of(const at::Tensor& bias) { return bias.is_inference() || !is_bias(bias) ? -1 : bias._version(); }

struct MLPAutograd : torch::autograd::Function<MLPAutograd> {
  // x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) -> y: (*, W[L]), then the kept
  // tensors (one per layer when `save`, not differentiable). Saves x, the weights, the kept
  // tensors and y where the last activation's derivative reads it; the biases are only
  // remembered (backward does not read them; double backward rebuilds the layers from them).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, c10::string_view activation, Params params,
                               c10::string_view output_activation, Params output_params, bool save) {
    at::Tensor y;
    std::vector<at::Tensor> kept;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, kept) =
          mlp_forward_op().call(x, weights, biases, activation, params, output_activation, output_params, save);
    }
    variable_list to_save{x, find_activation(output_activation)->saves == Saves::kOutput ? y : at::Tensor()};
    to_save.insert(to_save.end(), weights.begin(), weights.end());
    to_save.insert(to_save.end(), kept.begin(), kept.end());
    ctx->save_for_backward(to_save);
    std::vector<int64_t> versions;
    for (const at::Tensor& b : biases) versions.push_back(version_of(b));
    ctx->saved_data["biases"] = biases.vec();
    ctx->saved_data["bias_versions"] = versions;
    SavedActivation::store(ctx, "hidden", activation, params);
    SavedActivation::store(ctx, "output", output_activation, output_params);
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(kept);
    variable_list outputs{y};
    outputs.insert(outputs.end(), kept.begin(), kept.end());
    return outputs;
  }

  // grad_y: (*, W[L]) (the kept tensors get none) -> grad_x, grad_weights, grad_biases, where needed
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<at::Tensor> biases = ctx->saved_data["biases"].toTensorVector();
    const size_t n = biases.size();
    variable_list out(1 + 2 * n + 5);  // x, the weights, the biases, then 5 arguments that are not tensors
    const at::Tensor& grad_y = grads[0];
    if (!grad_y.defined()) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1];
    const std::vector<at::Tensor> weights(saved.begin() + 2, saved.begin() + 2 + n);
    const std::vector<at::Tensor> kept(saved.begin() + 2 + n, saved.end());
    const SavedActivation hidden = SavedActivation::load(ctx, "hidden"), output = SavedActivation::load(ctx, "output");
    std::vector<bool> needs(1 + 2 * n);
    for (size_t i = 0; i < needs.size(); ++i) needs[i] = ctx->needs_input_grad(i);
    if (at::GradMode::is_enabled() || at::isBatchedTensor(grad_y)) {
      const std::vector<int64_t> versions = ctx->saved_data["bias_versions"].toIntVector();
      for (size_t l = 0; l < n; ++l) {
        TORCH_CHECK(version_of(biases[l]) == versions[l],
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    "operation: a bias of a bpext layer was changed after forward, and double backward "
                    "(create_graph=True) rebuilds the layer from it");
      }
      // The layers rebuilt from x, as differentiable pieces (also for gradcheck's legacy vmap, which has
      // no fallback for the fused op's lists).
      std::vector<int64_t> wanted(needs.begin(), needs.end());  // x, the weights, the biases: 1 where asked for
      for (size_t l = 0; l < n; ++l) wanted[1 + n + l] = needs[1 + n + l] && is_bias(biases[l]);
      const std::vector<at::Tensor> grads_in =
          mlp_grads_op().call(grad_y, x, weights, biases, hidden.name, hidden.params, output.name, output.params, wanted);
      for (size_t i = 0; i < grads_in.size(); ++i) {
        if (wanted[i]) out[i] = grads_in[i];
      }
      return out;
    }
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_x, grad_weights, grad_biases] =
        mlp_backward_op().call(grad_y, x, y.defined() ? y : at::empty({0}, grad_y.options()), weights, biases, kept,
                               hidden.name, hidden.params, output.name, output.params, needs[0]);
    if (needs[0]) out[0] = grad_x;
    for (size_t l = 0; l < n; ++l) {
      if (needs[1 + l]) out[1 + l] = grad_weights[l];
      if (needs[1 + n + l] && is_bias(biases[l])) out[1 + n + l] = grad_biases[l];
    }
    return out;
  }
};

// x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) for none -> y: (*, W[L])
at::Tensor mlp(const at::Tensor& x, at::TensorList weights, at::TensorList biases, c10::string_view activation,
               Params params, c10::string_view output_activation, Params output_params) {
  parse_activation(activation, params, x.scalar_type(), "bpext.mlp");
  parse_activation(output_activation, output_params, x.scalar_type(), "bpext.mlp");
  check_no_tangents({x, weights, biases}, "bpext.mlp");
  bool requires_grad = x.requires_grad();
  for (const at::TensorList list : {weights, biases}) {
    for (const at::Tensor& t : list) requires_grad = requires_grad || t.requires_grad();
  }
  if (!(at::GradMode::is_enabled() && requires_grad)) {  // no graph to record: the forward op alone, keeping nothing
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::get<0>(
        mlp_forward_op().call(x, weights, biases, activation, params, output_activation, output_params, false));
  }
  return MLPAutograd::apply(x, weights, biases, activation, params, output_activation, output_params, true)[0];
}

// Under torch.autocast the layers compute in the autocast dtype, as nn.Linear does (float64 and
// tensors of other devices kept): a direct call of the op, e.g. from TorchScript, where
// bpext.functional, which casts before its calls, does not run.
template <c10::DeviceType kDevice>
struct Autocast {
  static at::Tensor cast(const at::Tensor& t) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(kDevice), t, kDevice);
  }
  static std::vector<at::Tensor> cast(at::TensorList list) {
    return at::autocast::cached_cast(at::autocast::get_autocast_dtype(kDevice), list, kDevice);
  }
  static at::Tensor dense_(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                           c10::string_view activation, Params params) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    return dense(cast(x), cast(weight), bias.has_value() ? OptionalTensor(cast(*bias)) : std::nullopt, activation,
                 params);
  }
  static at::Tensor mlp_(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                         c10::string_view activation, Params params, c10::string_view output_activation,
                         Params output_params) {
    const c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(kDevice));
    return mlp(cast(x), cast(weights), cast(biases), activation, params, output_activation, output_params);
  }
};

// CompositeImplicitAutograd: one kernel above autograd for every device (and for meta and fake
// tensors, whose forward ops are the fake ones); the Function records the graph itself.
const bool registered = [] {
  if (!define_library()) return false;
  static torch::Library library(torch::Library::IMPL, "bpext", c10::DispatchKey::CompositeImplicitAutograd,
                                __FILE__, __LINE__);
  library.impl("dense", TORCH_FN(dense));
  library.impl("mlp", TORCH_FN(mlp));
  static torch::Library autocast_cpu(torch::Library::IMPL, "bpext", c10::DispatchKey::AutocastCPU, __FILE__, __LINE__);
  autocast_cpu.impl("dense", TORCH_FN(Autocast<c10::DeviceType::CPU>::dense_));
  autocast_cpu.impl("mlp", TORCH_FN(Autocast<c10::DeviceType::CPU>::mlp_));
  static torch::Library autocast_cuda(torch::Library::IMPL, "bpext", c10::DispatchKey::AutocastCUDA, __FILE__,
                                      __LINE__);
  autocast_cuda.impl("dense", TORCH_FN(Autocast<c10::DeviceType::CUDA>::dense_));
  autocast_cuda.impl("mlp", TORCH_FN(Autocast<c10::DeviceType::CUDA>::mlp_));
  return true;
}();

}  // namespace
}  // namespace bpext
