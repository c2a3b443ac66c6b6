// The single definition of the bpext operator library: every op's schema. The kernels
// (kernels/ops.cpp) are registered per device by each backend's BPEXT_BACKEND line.
#include <Python.h>
#include <torch/library.h>

#include <memory>
#include <string>

#include "bpext/backend.h"
#include "bpext/config.h"
#include "bpext/cpu_levels.h"

namespace bpext {
namespace {

std::string& load_error() {
  static std::string error;
  return error;
}

void define_ops(torch::Library& m) {
  // x: (*) -> y: (*)
  m.def("activation_forward(Tensor x, str activation, float[] params) -> Tensor");
  // grad_y, saved: (*) -> grad_x: (*); saved is y or z, as the activation's save policy says
  m.def("activation_backward(Tensor grad_y, Tensor saved, str activation, float[] params) -> Tensor");
  // The backward of activation_backward: grad_grad_x, grad_y, saved: (*)
  //   -> grad of grad_y = grad_grad_x * act'(s), grad of saved = grad_grad_x * grad_y * d act'(s) / ds
  m.def(
      "activation_double_backward(Tensor grad_grad_x, Tensor grad_y, Tensor saved, str activation, "
      "float[] params) -> (Tensor, Tensor)");
  // x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
  m.def(
      "dense_forward(Tensor x, Tensor weight, Tensor? bias, str activation, float[] params, bool return_preact) "
      "-> (Tensor, Tensor)");
  // grad_y, saved: (*, OUT), x: (*, IN) (for grad_weight), weight: (OUT, IN) (for grad_x)
  //   -> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless output_mask asks for it
  m.def(
      "dense_backward(Tensor grad_y, Tensor? x, Tensor? weight, Tensor saved, str activation, float[] params, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The dense layer with its autograd in C++ (kernels/autograd.cpp), the plain eager path:
  // x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT)
  m.def("dense(Tensor x, Tensor weight, Tensor? bias, str activation, float[] params) -> Tensor");
  // x: (*, IN), weight_gate, weight_up: (H, IN), biases: (H)
  //   -> y = act(x Wg^T + bg) * (x Wu^T + bu): (*, H), and the two pre-activations (*, H) or (0) unless save
  m.def(
      "gated_forward(Tensor x, Tensor weight_gate, Tensor? bias_gate, Tensor weight_up, Tensor? bias_up, "
      "str activation, float[] params, bool save) -> (Tensor, Tensor, Tensor)");
  // grad_y, gate, up: (*, H); x read for the weights' gradients, the weights for grad_x (none where not asked for)
  //   -> grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up
  m.def(
      "gated_backward(Tensor grad_y, Tensor? x, Tensor? weight_gate, Tensor? weight_up, Tensor gate, Tensor up, "
      "str activation, float[] params, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gated layer followed by its down projection weight_down: (OUT, H), bias_down: (OUT)
  //   -> y: (*, OUT), and the two pre-activations (*, H) or (0) unless save
  m.def(
      "gated_mlp_forward(Tensor x, Tensor weight_gate, Tensor? bias_gate, Tensor weight_up, Tensor? bias_up, "
      "Tensor weight_down, Tensor? bias_down, str activation, float[] params, bool save) "
      "-> (Tensor, Tensor, Tensor)");
  // -> grad_x, grad_weight_gate, grad_bias_gate, grad_weight_up, grad_bias_up, grad_weight_down, grad_bias_down
  m.def(
      "gated_mlp_backward(Tensor grad_y, Tensor? x, Tensor? weight_gate, Tensor? weight_up, Tensor? weight_down, "
      "Tensor gate, Tensor up, str activation, float[] params, bool[7] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]), or (0) for a layer without bias (a
  // list of tensors, not of optional ones: autograd, tracing and export take those); hidden layers use
  // `activation`, the last `output_activation`
  //   -> y: (*, OUT), saved: one tensor per layer when `save` (see bpext/backend.h)
  m.def(
      "mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, str activation, float[] params, "
      "str output_activation, float[] output_params, bool save) -> (Tensor, Tensor[])");
  // The MLP with its autograd in C++ (kernels/autograd.cpp), the plain eager path: -> y: (*, OUT)
  m.def(
      "mlp(Tensor x, Tensor[] weights, Tensor[] biases, str activation, float[] params, str output_activation, "
      "float[] output_params) -> Tensor");
  // grad_y: (*, OUT); x read for grad_weights[0]; y where the last layer's derivative reads it; weights[l]
  // where a gradient below layer l is asked for ((0) may stand for it elsewhere); saved as mlp_forward
  // returns it; output_mask: grad_x, the weights', the biases'
  //   -> grad_x: (*, W0), grad_weights[l], grad_biases[l]; each (0) unless output_mask asks for it
  m.def(
      "mlp_backward(Tensor grad_y, Tensor? x, Tensor y, Tensor[] weights, Tensor[] saved, str activation, "
      "float[] params, str output_activation, float[] output_params, bool[] output_mask) "
      "-> (Tensor, Tensor[], Tensor[])");

  // The last dense layer with its cross-entropy loss, the (N, V) logits never whole (kernels/ops.cpp).
  // input: (N, H), weight: (V, H), bias: (V), target: (N) int64 -> loss: () ("mean", "sum"; divided by
  //   divisor where given) or (N) ("none") in the compute type (float for 16-bit inputs), and the loss's
  //   gradients output_mask asks for (grad_input, grad_weight, grad_bias), computed in the same blocks, else (0)
  m.def(
      "linear_cross_entropy_forward(Tensor input, Tensor weight, Tensor? bias, Tensor target, int ignore_index, "
      "float label_smoothing, float softcap, float z_loss, str reduction, float? divisor, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // grad_loss: the loss's shape -> grad_input, grad_weight, grad_bias ((0) without bias), the logits recomputed
  m.def(
      "linear_cross_entropy_backward(Tensor grad_loss, Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, float softcap, float z_loss, str reduction, float? divisor) "
      "-> (Tensor, Tensor, Tensor)");

  // The activation list (bpext/activations.h) as text, one line per activation:
  // "name saves param=default:rule ...". bpext/activations.py builds its registry from it.
  m.def("_activation_table() -> str", [] {
    constexpr const char* kSaves[] = {"nothing", "output", "input"};
    constexpr const char* kRules[] = {"finite", "nonzero", "not_nan"};
    std::string out;
    for (const auto& a : kActivations) {
      out += std::string(a.name) + " " + kSaves[static_cast<int>(a.saves)];
      for (int i = 0; i < a.n_params; ++i) {
        out += " " + std::string(a.params[i].name) + "=" + show(a.params[i].default_value) + ":" +
               kRules[static_cast<int>(a.params[i].rule)];
      }
      out += "\n";
    }
    return out;
  });
  // Raises where an op would for these parameters (float64 bounds), so modules can check at construction.
  m.def("_check_activation(str activation, float[] params) -> ()",
        [](c10::string_view activation, at::ArrayRef<double> params) {
          parse_activation(activation, params, at::kDouble, "bpext");
        });
  // The CPU kernels' SIMD levels (bpext/cpu_levels.h), fastest first, and what of one this CPU lacks
  // ([] where it runs); loads the library built for one level (bpext/__init__.py picks it).
  m.def("_cpu_levels() -> str[]", [] {
    std::vector<std::string> names;
    for (const CpuLevel& level : kCpuLevels) names.emplace_back(level.name);
    return names;
  });
  m.def("_cpu_missing_features(str level) -> str[]", [](c10::string_view name) {
    const CpuLevel* level = find_cpu_level(name);
    TORCH_CHECK(level != nullptr, "bpext: no CPU level ", std::string(name));
    return missing_cpu_features(*level);
  });
  m.def("_load_cpu_kernels(str path) -> ()", [](c10::string_view path) { load_cpu_kernels(path); });
  m.def("_cpu_kernels() -> str", [] { return loaded_cpu_kernels(); });
  // ReLU layers with a bias finish inside the GEMM (cuBLASLt's epilogue on CUDA); returns the previous value.
  m.def("_set_gemm_epilogue(bool enabled) -> bool",
        [](bool enabled) { return gemm_epilogue_enabled().exchange(enabled); });
}

}  // namespace

std::atomic<bool>& gemm_epilogue_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

bool define_library() {
  // A second copy of this library (a vendored build) finds the namespace taken. That must
  // not abort the process from a static initializer: the error is kept for PyInit__C.
  static const bool ok = [] {
    try {
      static torch::Library library(torch::Library::DEF, "bpext", std::nullopt, __FILE__, __LINE__);
      define_ops(library);
      return true;
    } catch (const std::exception& e) {
      load_error() = e.what();
      return false;
    }
  }();
  return ok;
}

namespace {
const bool defined_at_load = define_library();
}

}  // namespace bpext

// `import bpext._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  if (!bpext::define_library()) {
    const std::string message =
        "bpext._C: another copy of bpext's kernels is already loaded in this process (the torch.ops.bpext "
        "namespace is taken); import only one bpext. Details: " +
        bpext::load_error().substr(0, bpext::load_error().find('\n'));
    PyErr_SetString(PyExc_ImportError, message.c_str());
    return nullptr;
  }
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
