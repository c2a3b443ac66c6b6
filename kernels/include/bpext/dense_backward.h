// The backend-independent part of dense_backward: argument checks, then the pre-activation
// gradient (dz) and the bias gradient from the backend's fused pass, then only the GEMMs
// that output_mask asks for. An identity layer's dz is grad_y itself.
#pragma once

#include <ATen/ATen.h>

#include "bpext/checks.h"

namespace bpext {

// fused(g2, s2, dz_or_null, grad_bias_or_null): g2, s2: (N, OUT) -> dz: (N, OUT), grad_bias: (OUT).
// It runs once for every activation but identity, and for identity only when grad_bias is asked for.
template <class FusedGradBiasGrad>
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward_with(
    const at::Tensor& grad_y, const std::optional<at::Tensor>& x, const at::Tensor& weight,
    const at::Tensor& saved, Activation act, std::array<bool, 3> output_mask, const char* op,
    const FusedGradBiasGrad& fused) {
  check_dense_backward_args(grad_y, x, weight, saved, act, output_mask, op);
  const at::Tensor g2 = as_rows(grad_y);
  const auto opts = g2.options();
  const bool identity = act == Activation::kIdentity;
  at::Tensor grad_bias = at::empty({output_mask[2] ? weight.size(0) : 0}, opts);
  at::Tensor dz = identity ? g2 : at::empty_like(g2);
  if (!identity || output_mask[2]) {
    fused(g2, identity ? at::Tensor() : as_rows(saved), identity ? nullptr : &dz,
          output_mask[2] ? &grad_bias : nullptr);
  }
  at::Tensor grad_x = output_mask[0]
                          ? at::mm(dz, weight.contiguous()).view(with_last_dim(grad_y.sizes(), weight.size(1)))
                          : at::empty({0}, opts);
  at::Tensor grad_weight = output_mask[1] ? at::mm(dz.t(), as_rows(*x)) : at::empty({0}, opts);
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace bpext
