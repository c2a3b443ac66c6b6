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

#include "bpext/backend.h"
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
      const at::Tensor&, const OptionalTensor&, const at::Tensor&, at::TensorList, at::TensorList, c10::string_view,
      Params, c10::string_view, Params, const c10::List<bool>&)>("bpext::mlp_backward");
  return op;
}
// The layers' backward as differentiable pieces, for double backward: defined once, in Python
// (bpext/functional.py, _dense_grads and _mlp_grads, registered as CompositeImplicitAutograd ops),
// so their formulas are those of every other path. (0) where not asked for.
const auto& dense_grads_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
      const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      c10::string_view, Params, std::array<bool, 3>)>("bpext::dense_grads");
  return op;
}
const auto& mlp_grads_op() {
  static const auto op = find_op<std::vector<at::Tensor>(
      const OptionalTensor&, at::TensorList, const OptionalTensor&, const at::Tensor&, at::TensorList, at::TensorList,
      c10::string_view, Params, c10::string_view, Params, const c10::List<bool>&)>("bpext::mlp_grads");
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

// A tensor of a list the mlp ops take, (0) where it is undefined.
std::vector<at::Tensor> or_placeholders(at::ArrayRef<at::Tensor> list, const at::Tensor& like) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : list) out.push_back(t.defined() ? t : like.new_empty({0}));
  return out;
}

c10::List<bool> bool_list(const std::vector<bool>& bits) {
  c10::List<bool> list;
  for (const bool b : bits) list.push_back(b);
  return list;
}

struct MLPAutograd : torch::autograd::Function<MLPAutograd> {
  // x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) -> y: (*, W[L]), then the tensors
  // kept for backward (one per layer, (0) for a last layer that keeps nothing). The kept tensors are
  // differentiable outputs, so that double backward reaches the layers through them, as native's graph
  // does through its activations. Saves x only where weights[0] needs a gradient, weights[l] only
  // where something below layer l does (MLPGrads), the kept tensors, and y where the last
  // activation's derivative reads it; never a bias (backward reads none).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, c10::string_view activation, Params params,
                               c10::string_view output_activation, Params output_params) {
    at::Tensor y;
    std::vector<at::Tensor> kept;
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(y, kept) =
          mlp_forward_op().call(x, weights, biases, activation, params, output_activation, output_params, true);
    }
    const size_t n = weights.size();
    std::vector<bool> tracked{x.requires_grad()};
    for (const at::Tensor& w : weights) tracked.push_back(w.requires_grad());
    for (const at::Tensor& b : biases) tracked.push_back(is_bias(b) && b.requires_grad());
    const MLPGrads reads(tracked, n);
    variable_list to_save{reads.weight[0] ? x : at::Tensor(),
                          find_activation(output_activation)->saves == Saves::kOutput ? y : at::Tensor()};
    for (size_t l = 0; l < n; ++l) to_save.push_back(reads.input[l] ? weights[l] : at::Tensor());
    to_save.insert(to_save.end(), kept.begin(), kept.end());
    ctx->save_for_backward(to_save);
    std::vector<int64_t> has_bias;
    for (const at::Tensor& b : biases) has_bias.push_back(is_bias(b));
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["x_is_empty_vector"] = x.dim() == 1 && x.sym_numel() == 0;  // its gradient is (0) too
    SavedActivation::store(ctx, "hidden", activation, params);
    SavedActivation::store(ctx, "output", output_activation, output_params);
    ctx->set_materialize_grads(false);
    for (const at::Tensor& k : kept) {
      if (k.sym_numel() == 0) ctx->mark_non_differentiable({k});  // (0): nothing kept; or no rows
    }
    variable_list outputs{y};
    outputs.insert(outputs.end(), kept.begin(), kept.end());
    return outputs;
  }

  // grad_y: (*, W[L]), then gradients of the kept tensors (double backward sends them), any undefined
  //   -> grad_x, grad_weights, grad_biases, where needed
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const std::vector<int64_t> has_bias = ctx->saved_data["has_bias"].toIntVector();
    const size_t n = has_bias.size();
    variable_list out(1 + 2 * n + 4);  // x, the weights, the biases, then 4 arguments that are not tensors
    const at::Tensor& grad_y = grads[0];
    const std::vector<at::Tensor> grad_kept(grads.begin() + 1, grads.end());
    const bool into_kept = std::any_of(grad_kept.begin(), grad_kept.end(), [](const at::Tensor& g) { return g.defined(); });
    if (!grad_y.defined() && !into_kept) return out;
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &y = saved[1];
    const std::vector<at::Tensor> weights(saved.begin() + 2, saved.begin() + 2 + n);
    const std::vector<at::Tensor> kept(saved.begin() + 2 + n, saved.end());
    const SavedActivation hidden = SavedActivation::load(ctx, "hidden"), output = SavedActivation::load(ctx, "output");
    std::vector<bool> mask(1 + 2 * n);  // x, the weights, the biases
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = ctx->needs_input_grad(i) && (i <= n || has_bias[i - 1 - n]);
    at::Tensor out_x;
    std::vector<at::Tensor> out_weights, out_biases;
    if (at::GradMode::is_enabled() || at::isBatchedTensor(grad_y) || into_kept) {
      // Double backward, or gradients sent into the kept tensors: differentiable pieces (also for
      // gradcheck's legacy vmap, which has no fallback for the fused op's lists).
      const at::Tensor& like = grad_y.defined() ? grad_y : *std::find_if(grad_kept.begin(), grad_kept.end(),
                                                                         [](const at::Tensor& g) { return g.defined(); });
      const std::vector<at::Tensor> grads_in = mlp_grads_op().call(
          defined_or_none(grad_y), or_placeholders(grad_kept, like), defined_or_none(x), y.defined() ? y : like.new_empty({0}),
          or_placeholders(weights, like), kept, hidden.name, hidden.params, output.name, output.params,
          bool_list(mask));
      std::vector<at::Tensor> got;  // (0): no gradient reached (grad_y undefined, and no kept tensor above)
      for (const at::Tensor& g : grads_in) got.push_back(g.dim() == 1 && g.sym_numel() == 0 ? at::Tensor() : g);
      if (ctx->saved_data["x_is_empty_vector"].toBool()) got[0] = grads_in[0];
      out_x = got[0];
      out_weights.assign(got.begin() + 1, got.begin() + 1 + n);
      out_biases.assign(got.begin() + 1 + n, got.end());
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out_x, out_weights, out_biases) = mlp_backward_op().call(
          grad_y, defined_or_none(x), y.defined() ? y : grad_y.new_empty({0}), or_placeholders(weights, grad_y), kept,
          hidden.name, hidden.params, output.name, output.params, bool_list(mask));
    }
    if (mask[0]) out[0] = out_x;
    for (size_t l = 0; l < n; ++l) {
      if (mask[1 + l]) out[1 + l] = out_weights[l];
      if (mask[1 + n + l]) out[1 + n + l] = out_biases[l];
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
  return MLPAutograd::apply(x, weights, biases, activation, params, output_activation, output_params)[0];
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
