// Dense (fully connected) layer forward and backward on CUDA.
//
// GEMMs go through ATen (cuBLAS / cuBLASLt). Forward lets cuBLASLt's epilogue add
// the bias (and apply ReLU) where it can; every other activation runs in one
// bias+activation kernel after the GEMM. Backward computes dz = g * act'(s) and
// the bias gradient in one kernel, then only the GEMMs that are asked for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "bpext/checks.h"
#include "bpext/dense_backward.h"
#include "bpext/config.h"
#include "elementwise.cuh"

namespace bpext::cuda {
namespace {

// acc: (N, OUT) GEMM result, bias: (OUT) or null -> z = acc + bias (back into acc when kKeepZ), y = act(z)
template <Activation A, class T, int kVec, bool kKeepZ>
__global__ void bias_activation_kernel(T* __restrict__ acc, const T* __restrict__ bias, T* __restrict__ y,
                                       int64_t n, int64_t out_features, Params<at::opmath_type<T>> params) {
  using O = at::opmath_type<T>;
  using F = Act<A, ScalarMath<O>>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n / kVec; i += stride) {
    const Pack<T, kVec> a = reinterpret_cast<const Pack<T, kVec>*>(acc)[i];
    Pack<T, kVec> b{};
    if (bias != nullptr) b = reinterpret_cast<const Pack<T, kVec>*>(bias)[(i * kVec % out_features) / kVec];
    Pack<T, kVec> z, out;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const O zk = static_cast<O>(a.v[k]) + (bias != nullptr ? static_cast<O>(b.v[k]) : O(0));
      z.v[k] = static_cast<T>(zk);
      out.v[k] = static_cast<T>(F::forward(zk, params));
    }
    if (kKeepZ) reinterpret_cast<Pack<T, kVec>*>(acc)[i] = z;
    reinterpret_cast<Pack<T, kVec>*>(y)[i] = out;
  }
}

constexpr int kGradThreadsX = 32;  // threads across columns (kVec columns each)
constexpr int kGradThreadsY = 8;   // threads down the rows of one tile

// g, s: (N, OUT) -> dz: (N, OUT) when dz != null, partial: (tiles, OUT) column sums of dz when partial != null.
// Block (32, 8) covers 32*kVec columns of one tile of rows; each thread sums its columns
// down the tile in registers, then the 8 row-threads are added in a fixed order.
template <Activation A, class T, int kVec>
__global__ void grad_bias_grad_kernel(const T* __restrict__ g, const T* __restrict__ s, T* __restrict__ dz,
                                      at::opmath_type<T>* __restrict__ partial, int64_t rows, int64_t out_features,
                                      int64_t rows_per_tile, Params<at::opmath_type<T>> params) {
  using O = at::opmath_type<T>;
  using F = Act<A, ScalarMath<O>>;
  __shared__ O column_sums[kGradThreadsY][kGradThreadsX * kVec];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kGradThreadsX + threadIdx.x) * kVec;
  const int64_t r0 = blockIdx.y * rows_per_tile;
  const int64_t r1 = std::min(rows, r0 + rows_per_tile);
  O sum[kVec] = {};
  if (col < out_features) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kGradThreadsY) {
      const int64_t off = (r * out_features + col) / kVec;
      const Pack<T, kVec> gp = reinterpret_cast<const Pack<T, kVec>*>(g)[off];
      Pack<T, kVec> sp{};
      if (A != Activation::kIdentity) sp = reinterpret_cast<const Pack<T, kVec>*>(s)[off];
      Pack<T, kVec> d;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const O dk = F::backward(static_cast<O>(gp.v[k]), static_cast<O>(sp.v[k]), params);
        d.v[k] = static_cast<T>(dk);
        sum[k] += dk;
      }
      if (dz != nullptr) reinterpret_cast<Pack<T, kVec>*>(dz)[off] = d;
    }
  }
  if (partial == nullptr) return;  // uniform across the block, so no barrier is skipped by some threads only
#pragma unroll
  for (int k = 0; k < kVec; ++k) column_sums[threadIdx.y][threadIdx.x * kVec + k] = sum[k];
  __syncthreads();
  if (threadIdx.y == 0 && col < out_features) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      O total = 0;
      for (int y = 0; y < kGradThreadsY; ++y) total += column_sums[y][threadIdx.x * kVec + k];
      partial[blockIdx.y * out_features + col + k] = total;
    }
  }
}

// partial: (tiles, OUT) -> grad_bias: (OUT), tiles summed in order
template <class T>
__global__ void sum_tiles_kernel(const at::opmath_type<T>* __restrict__ partial, T* __restrict__ grad_bias,
                                 int64_t tiles, int64_t out_features) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= out_features) return;
  at::opmath_type<T> total = 0;
  for (int64_t t = 0; t < tiles; ++t) total += partial[t * out_features + j];
  grad_bias[j] = static_cast<T>(total);
}

// x: (*, IN), weight: (OUT, IN), bias: (OUT) -> y: (*, OUT), preact: (*, OUT) or (0) unless return_preact
std::tuple<at::Tensor, at::Tensor> dense_forward(const at::Tensor& x, const at::Tensor& weight,
                                                 const std::optional<at::Tensor>& bias, c10::string_view activation,
                                                 double p0, double p1, bool return_preact) {
  constexpr const char* op = "bpext.dense_forward";
  const Activation act = parse_activation(activation, p0, p1, op);
  check_dense_args(x, weight, bias, op);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = as_rows(x);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows = x2.size(0);
  const int64_t out_features = w.size(0);
  const auto out_shape = with_last_dim(x.sizes(), out_features);
  at::Tensor y = at::empty({rows, out_features}, x2.options());
  at::Tensor preact = at::empty({return_preact ? rows : 0, return_preact ? out_features : 0}, x2.options());
  const auto result = [&] {
    return std::make_tuple(y.view(out_shape), return_preact ? preact.view(out_shape) : preact.view({0}));
  };

  // cuBLASLt's epilogue only where it finishes the whole layer, and not for an empty
  // reduction (in_features == 0), where _addmm_activation returns the bias un-activated.
  const bool lt_epilogue = cublaslt_epilogue_enabled().load() && b.defined() && !return_preact && rows > 0 &&
                           x2.size(1) > 0 && (act == Activation::kIdentity || act == Activation::kRelu);
  if (lt_epilogue && act == Activation::kIdentity) {
    at::addmm_out(y, b, x2, w.t());
    return result();
  }
  if (lt_epilogue && act == Activation::kRelu) {
    at::_addmm_activation_out(y, b, x2, w.t(), 1, 1, /*use_gelu=*/false);
    return result();
  }
  at::Tensor acc = return_preact ? preact : y;
  at::mm_out(acc, x2, w.t());
  const int64_t n = acc.numel();
  if (n == 0 || (act == Activation::kIdentity && !b.defined() && !return_preact)) return result();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using O = at::opmath_type<scalar_t>;
    const auto params = make_params<ScalarMath<O>>(p0, p1);
    scalar_t* acc_ptr = acc.mutable_data_ptr<scalar_t>();
    scalar_t* y_ptr = y.mutable_data_ptr<scalar_t>();
    const scalar_t* bias_ptr = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    constexpr int kVec = kPackWidth<scalar_t>;
    const bool packed = out_features % kVec == 0 && is_aligned(acc_ptr, 16) && is_aligned(y_ptr, 16) &&
                        (bias_ptr == nullptr || is_aligned(bias_ptr, 16));
    auto stream = at::cuda::getCurrentCUDAStream();
    visit_activation(act, [&](auto a) {
      constexpr Activation A = decltype(a)::value;
      const auto launch = [&](auto vec, auto keep_z) {
        constexpr int V = decltype(vec)::value;
        bias_activation_kernel<A, scalar_t, V, decltype(keep_z)::value><<<grid_for(n / V), kThreads, 0, stream>>>(
            acc_ptr, bias_ptr, y_ptr, n, out_features, params);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      using Packed = std::integral_constant<int, kVec>;
      using Single = std::integral_constant<int, 1>;
      if (packed && return_preact) launch(Packed{}, std::true_type{});
      else if (packed) launch(Packed{}, std::false_type{});
      else if (return_preact) launch(Single{}, std::true_type{});
      else launch(Single{}, std::false_type{});
    });
  });
  return result();
}

// grad_y, saved: (N, OUT) -> dz (unless null), grad_bias (unless null)
template <class scalar_t>
void fused_grad_and_bias_grad(Activation act, const at::Tensor& g2, const at::Tensor& s2, at::Tensor* dz,
                              at::Tensor* grad_bias, double p0, double p1) {
  using O = at::opmath_type<scalar_t>;
  const int64_t rows = g2.size(0);
  const int64_t out_features = g2.size(1);
  if (rows == 0) {
    if (grad_bias) grad_bias->zero_();
    return;
  }
  const auto params = make_params<ScalarMath<O>>(p0, p1);
  const scalar_t* g = g2.const_data_ptr<scalar_t>();
  const scalar_t* s = s2.defined() ? s2.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* d = dz ? dz->mutable_data_ptr<scalar_t>() : nullptr;
  constexpr int kVec = kPackWidth<scalar_t>;
  const bool packed = out_features % kVec == 0 && is_aligned(g, 16) && (s == nullptr || is_aligned(s, 16)) &&
                      (d == nullptr || is_aligned(d, 16));
  const int vec = packed ? kVec : 1;
  // Tiles of rows: enough blocks to fill the GPU a few times over. The tiling (and so the
  // summation order of the bias gradient) depends only on the shape and the device.
  const int64_t col_blocks = (out_features + kGradThreadsX * vec - 1) / (kGradThreadsX * vec);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_tiles = std::clamp<int64_t>((4 * sms + col_blocks - 1) / col_blocks, 1,
                                                 (rows + kGradThreadsY - 1) / kGradThreadsY);
  const int64_t rows_per_tile = (rows + want_tiles - 1) / want_tiles;
  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  at::Tensor partial;
  if (grad_bias) partial = at::empty({tiles, out_features}, g2.options().dtype(c10::CppTypeToScalarType<O>::value));
  O* partial_ptr = grad_bias ? partial.mutable_data_ptr<O>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(tiles));
  const dim3 block(kGradThreadsX, kGradThreadsY);
  visit_activation(act, [&](auto a) {
    constexpr Activation A = decltype(a)::value;
    if (packed) {
      grad_bias_grad_kernel<A, scalar_t, kVec>
          <<<grid, block, 0, stream>>>(g, s, d, partial_ptr, rows, out_features, rows_per_tile, params);
    } else {
      grad_bias_grad_kernel<A, scalar_t, 1>
          <<<grid, block, 0, stream>>>(g, s, d, partial_ptr, rows, out_features, rows_per_tile, params);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (grad_bias) {
    sum_tiles_kernel<scalar_t><<<static_cast<unsigned>((out_features + kThreads - 1) / kThreads), kThreads, 0,
                                 stream>>>(partial_ptr, grad_bias->mutable_data_ptr<scalar_t>(), tiles,
                                           out_features);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
  const c10::cuda::CUDAGuard guard(grad_y.device());
  return dense_backward_with(grad_y, x, weight, saved, act, output_mask, op,
                             [&](const at::Tensor& g2, const at::Tensor& s2, at::Tensor* dz, at::Tensor* grad_bias) {
                               AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g2.scalar_type(), op, [&] {
                                 fused_grad_and_bias_grad<scalar_t>(act, g2, s2, dz, grad_bias, p0, p1);
                               });
                             });
}

}  // namespace

TORCH_LIBRARY_IMPL(bpext, CUDA, m) {
  m.impl("dense_forward", &dense_forward);
  m.impl("dense_backward", &dense_backward);
}

}  // namespace bpext::cuda
