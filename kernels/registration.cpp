// The single definition of the bpext operator library: every op's schema.
// Backends add kernels with TORCH_LIBRARY_IMPL in kernels/cpu and kernels/cuda.
#include <Python.h>
#include <torch/library.h>

#include "bpext/config.h"

namespace bpext {

std::atomic<bool>& cublaslt_epilogue_enabled() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

static bool set_cublaslt_epilogue(bool enabled) { return cublaslt_epilogue_enabled().exchange(enabled); }

}  // namespace bpext

// `import bpext._C` loads this library, which registers the ops below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(bpext, m) {
  // x: (*) -> y: (*)
  m.def("activation_forward(Tensor x, str activation, float p0, float p1) -> Tensor");
  // grad_y, saved: (*) -> grad_x: (*); saved is y or z, as the activation's policy says
  m.def("activation_backward(Tensor grad_y, Tensor saved, str activation, float p0, float p1) -> Tensor");
  // The backward of activation_backward: grad_grad_x, grad_y, saved: (*)
  //   -> grad of grad_y = grad_grad_x * act'(s), grad of saved = grad_grad_x * grad_y * d act'(s) / ds
  m.def(
      "activation_double_backward(Tensor grad_grad_x, Tensor grad_y, Tensor saved, str activation, float p0, "
      "float p1) -> (Tensor, Tensor)");
  // x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
  m.def(
      "dense_forward(Tensor x, Tensor weight, Tensor? bias, str activation, float p0, float p1, "
      "bool return_preact) -> (Tensor, Tensor)");
  // grad_y, saved: (*, OUT), x: (*, IN), weight: (OUT, IN)
  //   -> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless output_mask asks for it
  m.def(
      "dense_backward(Tensor grad_y, Tensor? x, Tensor weight, Tensor saved, str activation, float p0, "
      "float p1, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // x: (*, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or None; hidden layers use
  // `activation` (p0, p1), the last `output_activation` (q0, q1)
  //   -> y: (*, OUT), saved: one tensor per layer when `save` (see kernels/mlp.cpp)
  m.def(
      "mlp_forward(Tensor x, Tensor[] weights, Tensor?[] biases, str activation, float p0, float p1, "
      "str output_activation, float q0, float q1, bool save) -> (Tensor, Tensor[])");
  // -> grad_x: (*, W0) or (0) unless input_grad, grad_weights[l], grad_biases[l] ((0) for a layer without bias)
  m.def(
      "mlp_backward(Tensor grad_y, Tensor x, Tensor y, Tensor[] weights, Tensor?[] biases, Tensor[] saved, "
      "str activation, float p0, float p1, str output_activation, float q0, float q1, bool input_grad) "
      "-> (Tensor, Tensor[], Tensor[])");
  // Returns the previous value; see bpext/config.h.
  m.def("_set_cublaslt_epilogue(bool enabled) -> bool", &bpext::set_cublaslt_epilogue);
}
