// Dense (fully connected) layer forward and backward on the CPU.
//
// Forward runs the GEMM one block of rows at a time and finishes each block
// (bias + activation) while it is still in cache. Backward computes dz and the
// bias gradient in one fused pass, then only the GEMMs that are asked for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <vector>

#include "bpext/checks.h"
#include "bpext/dense_backward.h"
#include "dense_rows.h"

namespace bpext::cpu {
namespace {

// A row block of the forward output this size stays in L2 between GEMM and epilogue.
constexpr int64_t kForwardBlockBytes = 1 << 20;
constexpr int64_t kMinBlockRows = 64;

// Rows per chunk of the bias-gradient reduction. A function of N alone, never of
// the thread count, so the summation order (and the result, bitwise) is fixed.
int64_t reduction_chunk_rows(int64_t n) { return std::max<int64_t>(8, (n + 63) / 64); }

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                 double p0, double p1, bool return_preact) {
  constexpr const char* op = "bpext.dense_forward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_dense_args(x, weight, bias, op);
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0);
  const int64_t out_features = w.size(0);
  at::Tensor y = at::empty({rows, out_features}, x2.options());
  at::Tensor preact = at::empty({return_preact ? rows : 0, return_preact ? out_features : 0}, x2.options());
  at::Tensor acc = return_preact ? preact : y;  // the GEMM's destination
  const bool has_epilogue = act != Activation::kIdentity || b.defined() || return_preact;
  const int64_t block_rows =
      std::max(kMinBlockRows, kForwardBlockBytes / std::max<int64_t>(1, out_features * x2.element_size()));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using M = VecMath<at::opmath_type<scalar_t>>;
    const auto params = make_params<M>(p0, p1);
    const scalar_t* bias_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    visit_activation(act, [&](auto a) {
      using F = Act<decltype(a)::value, M>;
      for (int64_t r0 = 0; r0 < rows; r0 += block_rows) {
        const int64_t r1 = std::min(rows, r0 + block_rows);
        at::Tensor acc_block = acc.narrow(0, r0, r1 - r0);
        at::mm_out(acc_block, x2.narrow(0, r0, r1 - r0), w.t());
        if (!has_epilogue) continue;
        scalar_t* acc_ptr = acc.mutable_data_ptr<scalar_t>();
        scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(r0, r1, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, out_features)),
                         [&](int64_t i0, int64_t i1) {
                           for (const auto i : c10::irange(i0, i1)) {
                             bias_activation_row<F>(acc_ptr + i * out_features, bias_ptr, y_ptr + i * out_features,
                                                    out_features, params, return_preact);
                           }
                         });
      }
    });
  });
  const auto out_shape = with_last_dim(x.sizes(), out_features);
  return {y.view(out_shape), return_preact ? preact.view(out_shape) : preact.view({0})};
}

// grad_y, saved: (N, OUT) -> dz: (N, OUT) unless null, grad_bias: (OUT) unless undefined
template <class scalar_t>
void fused_grad_and_bias_grad(Activation act, const at::Tensor& g2, const at::Tensor& s2, at::Tensor* dz,
                              at::Tensor* grad_bias, double p0, double p1) {
  using O = at::opmath_type<scalar_t>;
  using M = VecMath<O>;
  const auto params = make_params<M>(p0, p1);
  const int64_t rows = g2.size(0);
  const int64_t out_features = g2.size(1);
  const int64_t chunk_rows = reduction_chunk_rows(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<O> partial(grad_bias ? chunks * out_features : 0, O(0));
  const scalar_t* g = g2.const_data_ptr<scalar_t>();
  const scalar_t* s = s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* d = dz ? dz->mutable_data_ptr<scalar_t>() : nullptr;
  visit_activation(act, [&](auto a) {
    using F = Act<decltype(a)::value, M>;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (const auto c : c10::irange(c0, c1)) {
        O* acc = grad_bias ? partial.data() + c * out_features : nullptr;
        for (int64_t i = c * chunk_rows; i < std::min(rows, (c + 1) * chunk_rows); ++i) {
          const int64_t off = i * out_features;
          grad_row<F>(g + off, s ? s + off : nullptr, d ? d + off : nullptr, acc, out_features, params);
        }
      }
    });
  });
  if (grad_bias == nullptr) return;
  scalar_t* db = grad_bias->mutable_data_ptr<scalar_t>();
  at::parallel_for(0, out_features, 1024, [&](int64_t j0, int64_t j1) {
    for (const auto j : c10::irange(j0, j1)) {
      O sum = 0;
      for (int64_t c = 0; c < chunks; ++c) sum += partial[c * out_features + j];
      db[j] = static_cast<scalar_t>(sum);
    }
  });
}

// grad_y, saved: (*, OUT), x: (*, IN), weight: (OUT, IN)
//   -> grad_x: (*, IN), grad_weight: (OUT, IN), grad_bias: (OUT); each (0) unless output_mask asks for it
std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_backward(const at::Tensor& grad_y,
                                                             const std::optional<at::Tensor>& x,
                                                             const at::Tensor& weight, const at::Tensor& saved,
                                                             c10::string_view activation, double p0, double p1,
                                                             std::array<bool, 3> output_mask) {
  constexpr const char* op = "bpext.dense_backward";
  const Activation act = parse_activation(activation, p0, p1, op);
  return dense_backward_with(grad_y, x, weight, saved, act, output_mask, op,
                             [&](const at::Tensor& g2, const at::Tensor& s2, at::Tensor* dz, at::Tensor* grad_bias) {
                               AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g2.scalar_type(), op, [&] {
                                 fused_grad_and_bias_grad<scalar_t>(act, g2, s2, dz, grad_bias, p0, p1);
                               });
                             });
}

}  // namespace

TORCH_LIBRARY_IMPL(bpext, CPU, m) {
  m.impl("dense_forward", &dense_forward);
  m.impl("dense_backward", &dense_backward);
}

}  // namespace bpext::cpu
