// What a device implements for bpext: the elementwise passes of every op. The ops
// themselves (kernels/ops.cpp) are written once for all devices: they parse and check
// the arguments, shape and allocate the outputs, run the matrix products through ATen
// (MKL/oneDNN, cuBLAS/cuBLASLt) and call these passes in between. A pass receives
// contiguous tensors of one dtype on its device; an output may be the same tensor as an
// input of the same shape. A new device writes these functions and one BPEXT_BACKEND line.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/core/DispatchKey.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bpext/checks.h"
#include "bpext/config.h"

namespace bpext {

// An MLP's activations: the hidden layers share one, the last layer has its own.
struct Network {
  ActivationArg hidden, output;
  const ActivationArg& of(size_t layer, size_t layers) const { return layer + 1 == layers ? output : hidden; }
};

// What mlp_forward keeps of layer l for backward: the tensor its activation's derivative
// reads (y or z; y for identity, as the next layer's input), and nothing for the last
// layer when that is y: the op's output, which the caller keeps.
inline bool mlp_keeps_z(const ActivationArg& act) { return act.saves() == Saves::kInput; }
inline bool mlp_keeps_nothing(size_t layer, size_t layers, const ActivationArg& act) {
  return layer + 1 == layers && !mlp_keeps_z(act);
}

// What an MLP's backward is asked for, from a mask of grad_x, then the weights', then the biases'
// gradients; input[l]: whether the gradient of layer l's input is wanted (something below layer l
// asks), for which backward reads weights[l]. x is read only for the first weight's gradient.
struct MLPGrads {
  std::vector<bool> weight, bias, input;
  MLPGrads(const std::vector<bool>& mask, size_t layers)
      : weight(mask.begin() + 1, mask.begin() + 1 + layers), bias(mask.begin() + 1 + layers, mask.end()) {
    input.push_back(mask[0]);
    for (size_t l = 0; l < layers; ++l) input.push_back(input[l] || weight[l] || bias[l]);
  }
};

struct Backend {
  // x: (n) -> y: (n) = act(x)
  void (*activation_forward)(const ActivationArg& act, const at::Tensor& x, const at::Tensor& y);
  // grad_y, saved: (n) -> grad_x: (n) = grad_y * act'(saved)
  void (*activation_backward)(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved,
                              const at::Tensor& grad_x);
  // grad_grad_x, grad_y, saved: (n) -> grad_grad_y = grad_grad_x * act'(saved),
  //                                    grad_saved = grad_grad_x * grad_y * act''(saved)
  void (*activation_double_backward)(const ActivationArg& act, const at::Tensor& grad_grad_x,
                                     const at::Tensor& grad_y, const at::Tensor& saved,
                                     const at::Tensor& grad_grad_y, const at::Tensor& grad_saved);
  // grad_y, saved: (N, OUT) -> dz: (N, OUT) = grad_y * act'(saved) unless undefined,
  //                            grad_bias: (OUT) = column sums of dz unless undefined.
  // saved is undefined for identity. The sums run in an order fixed by the shape.
  void (*bias_grad)(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& saved,
                    const at::Tensor& dz, const at::Tensor& grad_bias);
  // gate, up: (N, H) -> y: (N, H) = act(gate) * up
  void (*gated_forward)(const ActivationArg& act, const at::Tensor& gate, const at::Tensor& up,
                        const at::Tensor& y);
  // grad_y, gate, up: (N, H) -> grad_gate = grad_y * up * act'(gate), grad_up = grad_y * act(gate): (N, H);
  //   their column sums into grad_bias_gate, grad_bias_up: (H), each unless undefined
  void (*gated_backward)(const ActivationArg& act, const at::Tensor& grad_y, const at::Tensor& gate,
                         const at::Tensor& up, const at::Tensor& grad_gate, const at::Tensor& grad_up,
                         const at::Tensor& grad_bias_gate, const at::Tensor& grad_bias_up);

  // Optional whole-network kernels; null, or returning false for a network they do not
  // take, runs the MLP layer by layer through the passes above.
  // x: (N, W0), weights[l]: (W[l+1], W[l]), biases[l]: (W[l+1]) or undefined
  //   -> y: (N, W[L]), saved[l]: (N, W[l+1]) or (0) per mlp_keeps_*
  bool (*mlp_forward)(const Network& net, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                      const at::Tensor& y, at::TensorList saved);
  // widths: W[0..L]; grad_y: (N, W[L]), state[l]: what layer l's derivative reads (its kept y or z, the
  // output y for the last layer; undefined for a linear last layer); x: (N, W0), undefined unless
  // grad_weights[0] is defined; weights[l]: (W[l+1], W[l]) where the gradient of layer l's input is
  // wanted (grad_x for layer 0), else undefined; the gradients: undefined where not wanted
  //   -> grad_x: (N, W0), grad_weights[l]: (W[l+1], W[l]), grad_biases[l]: (W[l+1])
  bool (*mlp_backward)(const Network& net, at::IntArrayRef widths, const at::Tensor& grad_y, const at::Tensor& x,
                       at::TensorList weights, at::TensorList state, const at::Tensor& grad_x,
                       at::TensorList grad_weights, at::TensorList grad_biases);
};

// The backend registered for a device type; raises for one without bpext kernels.
const Backend& backend_for(c10::DeviceType device);

// The CPU's kernels, from the library built for its SIMD level (kernels/cpu_backend.cpp), and the
// path they were loaded from ("" until then).
void load_cpu_kernels(c10::string_view path);
std::string loaded_cpu_kernels();

// Registers `backend` for its device and every op's kernel for its dispatch key (kernels/ops.cpp);
// false when another copy of bpext defined the library first (see define_library).
bool register_backend(c10::DispatchKey key, c10::DeviceType device, const Backend* backend, const char* file,
                      uint32_t line);

}  // namespace bpext

// In a backend's source: its dispatch key and Backend table, e.g. BPEXT_BACKEND(CPU, kCpuBackend).
// The torch::Library lives in kernels/ops.cpp, so a backend's sources need no torch/library.h.
#define BPEXT_BACKEND(KEY, table)                                                                           \
  static const bool bpext_registered_##KEY =                                                              \
      ::bpext::register_backend(c10::DispatchKey::KEY, c10::DeviceType::KEY, &table, __FILE__, __LINE__)
