// The CPU's whole-network MLP kernels (kernels/cpu/mlp.cpp), for the Backend table.
#pragma once

#include "bpext/backend.h"

namespace bpext::cpu {

// See Backend::mlp_forward / mlp_backward; false for networks they do not fuse.
bool mlp_forward(const Network& net, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                 const at::Tensor& y, at::TensorList saved);
bool mlp_backward(const Network& net, const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights,
                  at::TensorList biases, at::TensorList state, const at::Tensor& grad_x, at::TensorList grad_weights,
                  at::TensorList grad_biases);

}  // namespace bpext::cpu
