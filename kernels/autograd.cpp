// The autograd of the dense layer and the MLP, one definition for every path: plain eager mode,
// torch.func, forward-mode AD, torch.compile, torch.export, tracing, checkpointing. Each is the
// Autograd kernel of its forward op (bpext::dense_forward, bpext::mlp_forward), written as ATen's
// generated kernels are: a Node with the tensors its backward reads (so a training step runs no
// Python between a layer's ops), its tangents set from the primals. What needs Python is defined
// once in bpext/functional.py: the backward as differentiable pieces, where a derivative of it
// follows (bpext::dense_grads, bpext::mlp_grads), and the tangents (bpext::dense_jvp, bpext::mlp_jvp).
// bpext::dense and bpext::mlp call the forward ops, keeping tensors only where autograd records.
#include <ATen/ATen.h>
#include <ATen/LegacyBatchedTensorImpl.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "bpext/backend.h"
#include "bpext/checks.h"
#include "bpext/config.h"

namespace bpext {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
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
// The tangents of dense_forward's outputs, from the primals and the inputs' tangents (defined once, in
// Python: bpext/functional.py's _dense_jvp_op, a CompositeImplicitAutograd op).
const auto& dense_jvp_op() {
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
      const OptionalTensor&, const at::Tensor&, const at::Tensor&, c10::string_view, Params)>("bpext::dense_jvp");
  return op;
}
const auto& mlp_jvp_op() {
  static const auto op = find_op<std::tuple<at::Tensor, std::vector<at::Tensor>>(
      const at::Tensor&, at::TensorList, at::TensorList, const OptionalTensor&, const c10::List<OptionalTensor>&,
      const c10::List<OptionalTensor>&, c10::string_view, Params, c10::string_view, Params)>("bpext::mlp_jvp");
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

// An activation as backward needs it.
struct SavedActivation {
  std::string name;
  std::vector<double> params;

  Saves saves() const { return find_activation(name)->saves; }
};

// What an activation's derivative reads of a layer with pre-activation z and output y.
at::Tensor read_of(Saves saves, const at::Tensor& z, const at::Tensor& y) {
  return saves == Saves::kOutput ? y : saves == Saves::kInput ? z : at::Tensor();
}

OptionalTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : std::nullopt; }

// Whether a tensor carries a forward-mode tangent (a derivative of a backward follows: forward over reverse).
bool has_tangent(std::initializer_list<const at::Tensor*> tensors) {
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const at::Tensor* t) { return t->defined() && torch::autograd::isFwGradDefined(*t); });
}

// The autograd of bpext::dense_forward on every path (plain eager, torch.func, forward-mode AD,
// torch.compile, torch.export, tracing, checkpointing), written as ATen's generated kernels are: a
// Node that saves x only when the weight needs a gradient, the weight only when x does, and the
// tensor the activation's derivative reads (y, or z when return_preact); never the bias. z is a
// differentiable output where it is returned, so that double backward can send a gradient into it.
struct DenseBackward : torch::autograd::TraceableFunction {
  SavedVariable x, weight, saved;
  SavedActivation act;
  bool has_bias = false, preact_differentiable = false;

  std::string name() const override { return "DenseBackward"; }
  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    weight.reset_data();
    saved.reset_data();
  }

  // grad_y, grad_preact: (*, OUT), either undefined -> grad_x, grad_weight, grad_bias (undefined where not needed)
  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    const at::Tensor& grad_y = grads[0];
    const at::Tensor grad_preact = preact_differentiable ? grads[1] : at::Tensor();
    const std::array<bool, 3> mask{task_should_compute_output(0), task_should_compute_output(1),
                                   has_bias && task_should_compute_output(2)};
    variable_list out(3);
    if (!grad_y.defined() && !grad_preact.defined()) return out;
    const at::Tensor x_ = x.unpack(), weight_ = weight.unpack(), s = saved.unpack(getptr());
    std::tuple<at::Tensor, at::Tensor, at::Tensor> got;
    if (grad_preact.defined() || at::GradMode::is_enabled() || has_tangent({&grad_y, &x_, &weight_, &s})) {
      // create_graph=True, torch.func, forward over reverse, or a gradient sent into z: the layer's
      // backward in Python, which composes differentiable pieces where a derivative of it follows
      // (and calls the fused op under a lone torch.func transform where none does)
      got = dense_grads_op().call(defined_or_none(grad_y), defined_or_none(grad_preact), defined_or_none(x_),
                                  defined_or_none(weight_), defined_or_none(s), act.name, act.params, mask);
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      got = dense_backward_op().call(grad_y, mask[1] ? OptionalTensor(x_) : std::nullopt,
                                     mask[0] ? OptionalTensor(weight_) : std::nullopt,
                                     s.defined() ? s : grad_y.new_empty({0}),  // new_empty: a DTensor for a DTensor
                                     act.name, act.params, mask);
    }
    if (mask[0]) out[0] = std::get<0>(got);
    if (mask[1]) out[1] = std::get<1>(got);
    if (mask[2]) out[2] = std::get<2>(got);
    return out;
  }
};

OptionalTensor tangent_of(const OptionalTensor& t) {
  if (!t.has_value() || !t->defined()) return std::nullopt;
  return defined_or_none(t->_fw_grad(/*level=*/0));
}
OptionalTensor primal_of(const OptionalTensor& t) {
  return t.has_value() && t->defined() ? OptionalTensor(t->_fw_primal(/*level=*/0)) : t;
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
std::tuple<at::Tensor, at::Tensor> dense_forward_autograd(c10::DispatchKeySet keys, const at::Tensor& x,
                                                          const at::Tensor& weight, const OptionalTensor& bias,
                                                          c10::string_view activation, Params params,
                                                          bool return_preact) {
  const at::Tensor bias_ = bias.value_or(at::Tensor());
  auto [y, preact] = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dense_forward_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, x, weight, bias, activation, params,
                                         return_preact);
  }();
  c10::intrusive_ptr<DenseBackward> node;
  if (torch::autograd::compute_requires_grad(x, weight, bias_)) {
    node = c10::make_intrusive<DenseBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(x, weight, bias_));
    node->x = SavedVariable(weight.requires_grad() ? x : at::Tensor(), false);
    node->weight = SavedVariable(x.requires_grad() ? weight : at::Tensor(), false);
    node->act = {std::string(activation), params.vec()};
    node->has_bias = bias_.defined();
    node->preact_differentiable = return_preact && preact.sym_numel() != 0;
    torch::autograd::set_history(y, node);
    if (node->preact_differentiable) torch::autograd::set_history(preact, node);
  }
  if (torch::autograd::isFwGradDefined(x) || torch::autograd::isFwGradDefined(weight) ||
      torch::autograd::isFwGradDefined(bias_)) {  // forward-mode AD: the tangents, from the primals
    // (after the history, so that a derivative of the tangent reaches the inputs through y or z)
    auto [y_t, preact_t] = dense_jvp_op().call(
        x._fw_primal(0), weight._fw_primal(0), primal_of(bias), tangent_of(x), tangent_of(weight), tangent_of(bias),
        y, preact, activation, params);
    y._set_fw_grad(y_t, /*level=*/0, /*is_inplace_op=*/false);
    if (return_preact) preact._set_fw_grad(preact_t, /*level=*/0, /*is_inplace_op=*/false);
  }
  if (node) {  // the outputs saved last, with their tangents (forward over reverse reads them)
    const Saves saves = node->act.saves();
    node->saved = saves == Saves::kOutput  ? SavedVariable(y, true)
                  : saves == Saves::kInput ? SavedVariable(preact, node->preact_differentiable)
                                           : SavedVariable();
  }
  return {y, preact};
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT) = act(x @ weight.T + bias); z is kept
// (and returned by dense_forward, for double backward) only where backward reads it
at::Tensor dense(const at::Tensor& x, const at::Tensor& weight, const OptionalTensor& bias,
                 c10::string_view activation, Params params) {
  const Saves saves = parse_activation(activation, params, x.scalar_type(), "bpext.dense").saves();
  const bool builds_graph = at::GradMode::is_enabled() &&
                            (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad()));
  return std::get<0>(dense_forward_op().call(x, weight, bias, activation, params, saves == Saves::kInput && builds_graph));
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

std::vector<at::Tensor> unpacked(const std::vector<SavedVariable>& saved, const c10::intrusive_ptr<Node>& node) {
  std::vector<at::Tensor> out;
  for (const SavedVariable& s : saved) out.push_back(s.unpack(node));
  return out;
}

// The autograd of bpext::mlp_forward on every path, as DenseBackward is the dense layer's. Saves x
// only where weights[0] needs a gradient, weights[l] only where something below layer l does
// (MLPGrads), the kept tensors (one per layer, (0) for a last layer that keeps nothing), and y where
// the last activation's derivative reads it; never a bias (backward reads none). The kept tensors
// are differentiable outputs, so that double backward reaches the layers through them, as native's
// graph does through its activations.
struct MLPBackward : torch::autograd::TraceableFunction {
  SavedVariable x, y;
  std::vector<SavedVariable> weights, kept;
  SavedActivation hidden, output;
  std::vector<bool> has_bias;
  std::vector<size_t> kept_output;  // each kept tensor's output number, 0 where it is not differentiable
  bool x_is_empty_vector = false;  // its gradient is (0) too

  std::string name() const override { return "MLPBackward"; }
  void release_variables() override {
    const std::lock_guard<std::mutex> lock(mutex_);
    x.reset_data();
    y.reset_data();
    for (auto* list : {&weights, &kept}) {
      for (SavedVariable& s : *list) s.reset_data();
    }
  }

  // grad_y: (*, W[L]), then gradients of the kept tensors (double backward sends them), any undefined
  //   -> grad_x, grad_weights, grad_biases, where needed
  variable_list apply(variable_list&& grads) override {
    const std::lock_guard<std::mutex> lock(mutex_);
    const size_t n = has_bias.size();
    variable_list out(1 + 2 * n);  // x, the weights, the biases
    const at::Tensor& grad_y = grads[0];
    std::vector<at::Tensor> grad_kept(n);  // each differentiable kept tensor's gradient
    for (size_t l = 0; l < n; ++l) {
      if (kept_output[l] > 0) grad_kept[l] = grads[kept_output[l]];
    }
    const bool into_kept = std::any_of(grad_kept.begin(), grad_kept.end(), [](const at::Tensor& g) { return g.defined(); });
    if (!grad_y.defined() && !into_kept) return out;
    const c10::intrusive_ptr<Node> self = getptr();
    const at::Tensor x_ = x.unpack(), y_ = y.unpack(self);
    const std::vector<at::Tensor> weights_ = unpacked(weights, nullptr);
    const at::Tensor& like = grad_y.defined() ? grad_y : *std::find_if(grad_kept.begin(), grad_kept.end(),
                                                                       [](const at::Tensor& g) { return g.defined(); });
    const std::vector<at::Tensor> kept_ = or_placeholders(unpacked(kept, self), like);
    std::vector<bool> mask(1 + 2 * n);
    for (size_t i = 0; i < mask.size(); ++i) mask[i] = task_should_compute_output(i) && (i <= n || has_bias[i - 1 - n]);
    at::Tensor out_x;
    std::vector<at::Tensor> out_weights, out_biases;
    bool tangents = has_tangent({&grad_y, &x_, &y_});
    for (const auto* list : {&weights_, &kept_}) {
      for (const at::Tensor& t : *list) tangents = tangents || has_tangent({&t});
    }
    if (into_kept || at::GradMode::is_enabled() || tangents || at::isBatchedTensor(grad_y)) {
      // As DenseBackward: the backward in Python (also for gradcheck's legacy vmap, which has no
      // fallback for the fused op's lists)
      const std::vector<at::Tensor> grads_in = mlp_grads_op().call(
          defined_or_none(grad_y), or_placeholders(grad_kept, like), defined_or_none(x_),
          y_.defined() ? y_ : like.new_empty({0}), or_placeholders(weights_, like), kept_, hidden.name, hidden.params,
          output.name, output.params, bool_list(mask));
      std::vector<at::Tensor> got;  // (0): no gradient reached (grad_y undefined, and no kept tensor above)
      for (const at::Tensor& g : grads_in) got.push_back(g.dim() == 1 && g.sym_numel() == 0 ? at::Tensor() : g);
      if (x_is_empty_vector) got[0] = grads_in[0];
      out_x = got[0];
      out_weights.assign(got.begin() + 1, got.begin() + 1 + n);
      out_biases.assign(got.begin() + 1 + n, got.end());
    } else {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out_x, out_weights, out_biases) = mlp_backward_op().call(
          grad_y, defined_or_none(x_), y_.defined() ? y_ : grad_y.new_empty({0}), or_placeholders(weights_, grad_y),
          kept_, hidden.name, hidden.params, output.name, output.params, bool_list(mask));
    }
    if (mask[0]) out[0] = out_x;
    for (size_t l = 0; l < n; ++l) {
      if (mask[1 + l]) out[1 + l] = out_weights[l];
      if (mask[1 + n + l]) out[1 + n + l] = out_biases[l];
    }
    return out;
  }
};

c10::List<OptionalTensor> tangents_of(at::TensorList list) {
  c10::List<OptionalTensor> out;
  for (const at::Tensor& t : list) out.push_back(tangent_of(t));
  return out;
}
std::vector<at::Tensor> primals_of(at::TensorList list) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : list) out.push_back(t._fw_primal(/*level=*/0));
  return out;
}

// x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) -> y: (*, W[L]), then the tensors
// kept for backward (one per layer, (0) for a last layer that keeps nothing, all (0) unless save)
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward_autograd(
    c10::DispatchKeySet keys, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::string_view activation, Params params, c10::string_view output_activation, Params output_params, bool save) {
  const size_t n = weights.size();
  std::vector<at::Tensor> inputs{x};  // x, the weights, the biases (undefined for none)
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  for (const at::Tensor& b : biases) inputs.push_back(is_bias(b) ? b : at::Tensor());
  auto [y, kept] = [&] {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    return mlp_forward_op().redispatch(keys & c10::after_ADInplaceOrView_keyset, x, weights, biases, activation,
                                       params, output_activation, output_params, save);
  }();
  c10::intrusive_ptr<MLPBackward> node;
  if (torch::autograd::compute_requires_grad(inputs)) {
    node = c10::make_intrusive<MLPBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(inputs));
    std::vector<bool> tracked;
    for (const at::Tensor& t : inputs) tracked.push_back(t.defined() && t.requires_grad());
    const MLPGrads reads(tracked, n);
    node->x = SavedVariable(reads.weight[0] ? x : at::Tensor(), false);
    for (size_t l = 0; l < n; ++l) node->weights.emplace_back(reads.input[l] ? weights[l] : at::Tensor(), false);
    for (size_t l = 0; l < n; ++l) node->has_bias.push_back(is_bias(biases[l]));
    node->hidden = {std::string(activation), params.vec()};
    node->output = {std::string(output_activation), output_params.vec()};
    node->x_is_empty_vector = x.dim() == 1 && x.sym_numel() == 0;
    torch::autograd::set_history(y, node);
    for (const at::Tensor& k : kept) {  // differentiable unless (0), nothing kept, or without rows
      node->kept_output.push_back(k.sym_numel() != 0 ? node->num_inputs() : 0);
      if (k.sym_numel() != 0) torch::autograd::set_history(k, node);
    }
  }
  if (std::any_of(inputs.begin(), inputs.end(), [](const at::Tensor& t) { return t.defined() && torch::autograd::isFwGradDefined(t); })) {
    // forward-mode AD: the tangents of y and of the kept tensors, from the primals
    auto [y_t, kept_t] = mlp_jvp_op().call(x._fw_primal(0), primals_of(weights), primals_of(biases), tangent_of(x),
                                           tangents_of(weights), tangents_of(biases), activation, params,
                                           output_activation, output_params);
    y._set_fw_grad(y_t, /*level=*/0, /*is_inplace_op=*/false);
    for (size_t l = 0; l < kept.size(); ++l) {
      if (kept[l].sym_numel() != 0 && kept_t[l].sym_sizes() == kept[l].sym_sizes()) {
        kept[l]._set_fw_grad(kept_t[l], /*level=*/0, /*is_inplace_op=*/false);
      }
    }
  }
  if (node) {  // the outputs saved last, with their tangents (forward over reverse reads them)
    node->y = SavedVariable(find_activation(output_activation)->saves == Saves::kOutput ? y : at::Tensor(), true);
    for (const at::Tensor& k : kept) {  // (0): nothing kept, saved as nothing
      const bool placeholder = k.dim() == 1 && k.sym_numel() == 0;
      node->kept.emplace_back(placeholder ? at::Tensor() : k, k.sym_numel() != 0);
    }
  }
  return {y, kept};
}

// x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or (0) for none -> y: (*, W[L]); keeps
// its tensors only where autograd records the call
at::Tensor mlp(const at::Tensor& x, at::TensorList weights, at::TensorList biases, c10::string_view activation,
               Params params, c10::string_view output_activation, Params output_params) {
  parse_activation(activation, params, x.scalar_type(), "bpext.mlp");
  parse_activation(output_activation, output_params, x.scalar_type(), "bpext.mlp");
  bool requires_grad = x.requires_grad();
  for (const at::TensorList list : {weights, biases}) {
    for (const at::Tensor& t : list) requires_grad = requires_grad || t.requires_grad();
  }
  return std::get<0>(mlp_forward_op().call(x, weights, biases, activation, params, output_activation, output_params,
                                           at::GradMode::is_enabled() && requires_grad));
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

// bpext::dense and bpext::mlp: CompositeImplicitAutograd, one kernel for every device (and for meta and
// fake tensors, whose forward ops are the fake ones), also under vmap (whose rules batch the forward
// ops); the forward ops' autograd is the Nodes above.
const bool registered = [] {
  if (!define_library()) return false;
  static torch::Library composite(torch::Library::IMPL, "bpext", c10::DispatchKey::CompositeImplicitAutograd, __FILE__,
                                  __LINE__);
  static torch::Library under_vmap(torch::Library::IMPL, "bpext", c10::DispatchKey::FuncTorchBatchedDecomposition,
                                   __FILE__, __LINE__);
  for (torch::Library* library : {&composite, &under_vmap}) {
    library->impl("dense", TORCH_FN(dense));
    library->impl("mlp", TORCH_FN(mlp));
  }
  static torch::Library autograd(torch::Library::IMPL, "bpext", c10::DispatchKey::Autograd, __FILE__, __LINE__);
  autograd.impl("dense_forward", TORCH_FN(dense_forward_autograd));
  autograd.impl("mlp_forward", TORCH_FN(mlp_forward_autograd));
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
