// The multi-layer perceptron on the CPU, fused across layers for narrow networks.
//
// The batch is cut into blocks of kBlockRows rows. Forward runs every layer on a block
// before the next block, so the block's activations stay in L1/L2 between layers;
// backward does the same from the last layer down, recomputing act(z) for the weight
// gradients while the block is hot. The products are a small register-blocked kernel
// (MKL's per-call cost dominates at these sizes). Weight and bias gradients are summed
// per chunk of blocks and the chunks added in order: the chunking depends only on the
// batch size, so results do not depend on the thread count.
// Wide networks and 16-bit dtypes take the layer-by-layer path (kernels/mlp.cpp).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <memory>
#include <vector>

#include "bpext/mlp.h"
#include "dense_rows.h"

namespace bpext::cpu {
namespace {

constexpr int64_t kMaxFusedWidth = 256;
constexpr int64_t kBlockRows = 64;
constexpr int64_t kMaxChunks = 64;

bool fusable(const at::Tensor& x, at::TensorList weights) {
  if (x.scalar_type() != at::kFloat && x.scalar_type() != at::kDouble) return false;
  return std::all_of(weights.begin(), weights.end(), [](const at::Tensor& w) {
    return w.size(0) <= kMaxFusedWidth && w.size(1) <= kMaxFusedWidth;
  });
}

// a: (rows, K) with row stride lda, b: (K, N) dense -> c: (rows, N) with row stride ldc;
// c = a b, or c += a b. kRows rows at a time, two vectors of columns in registers.
template <int kRows, bool kAccumulate, class T>
void gemm_rows(const T* a, int64_t lda, const T* b, int64_t k_dim, int64_t n_dim, T* c, int64_t ldc) {
  using V = at::vec::Vectorized<T>;
  constexpr int64_t W = V::size();
  for (int64_t n0 = 0; n0 < n_dim; n0 += 2 * W) {
    const int64_t c0 = std::min<int64_t>(W, n_dim - n0);
    const int64_t c1 = std::clamp<int64_t>(n_dim - n0 - W, 0, W);
    // The loops over kRows are unrolled so that the accumulators stay in registers.
    V acc[kRows][2];
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) acc[i][0] = acc[i][1] = V(T(0));
    for (int64_t k = 0; k < k_dim; ++k) {
      const T* brow = b + k * n_dim + n0;
      const V b0 = V::loadu(brow, c0);
      const V b1 = c1 > 0 ? V::loadu(brow + W, c1) : V(T(0));
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        const V ai(a[i * lda + k]);
        acc[i][0] = at::vec::fmadd(ai, b0, acc[i][0]);
        acc[i][1] = at::vec::fmadd(ai, b1, acc[i][1]);
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      T* crow = c + i * ldc + n0;
      if (kAccumulate) {
        acc[i][0] = acc[i][0] + V::loadu(crow, c0);
        if (c1 > 0) acc[i][1] = acc[i][1] + V::loadu(crow + W, c1);
      }
      acc[i][0].store(crow, c0);
      if (c1 > 0) acc[i][1].store(crow + W, c1);
    }
  }
}

// a: (rows, K), b: (K, N) -> c: (rows, N) = a b (or += when kAccumulate)
template <bool kAccumulate, class T>
void small_gemm(const T* a, int64_t lda, const T* b, int64_t k_dim, int64_t n_dim, T* c, int64_t ldc, int64_t rows) {
  // 6 rows x 2 vectors: 12 accumulators, enough independent FMAs to hide their latency.
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) gemm_rows<6, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc);
  switch (rows - r) {
    case 5: gemm_rows<5, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc); break;
    case 4: gemm_rows<4, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc); break;
    case 3: gemm_rows<3, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc); break;
    case 2: gemm_rows<2, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc); break;
    case 1: gemm_rows<1, kAccumulate>(a + r * lda, lda, b, k_dim, n_dim, c + r * ldc, ldc); break;
    default: break;
  }
}

// src: (rows, cols) -> dst: (cols, rows), in 16x16 SIMD tiles where the CPU has them
template <class T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  at::vec::transpose_mxn<T>(src, cols, dst, rows, static_cast<int>(rows), static_cast<int>(cols));
}

// n elements of scratch memory, left uninitialized.
template <class T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

template <class T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.const_data_ptr<T>() : nullptr;
}

// The network's shapes and parameters, as row-major pointers.
template <class T>
struct Layers {
  std::vector<int64_t> width;         // width[0] = in_features, width[l + 1] = layer l's outputs
  std::vector<at::Tensor> weight;     // weights[l], contiguous: (W[l+1], W[l])
  std::vector<const T*> weight_t;     // weights[l].T: (W[l], W[l+1]), in weight_t_buf (forward only)
  std::unique_ptr<T[]> weight_t_buf;
  std::vector<const T*> bias;         // null without bias (or when only its presence was passed)
  std::vector<at::Tensor> bias_keep;  // keeps contiguous biases alive; undefined without bias
  int64_t max_width = 0;

  Layers(at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases, bool transposed) {
    width.push_back(weights[0].size(1));
    size_t weight_elements = 0;
    for (size_t l = 0; l < weights.size(); ++l) {
      width.push_back(weights[l].size(0));
      weight.push_back(weights[l].contiguous());
      weight_elements += weights[l].numel();
      const auto b = biases.get(l);
      bias_keep.push_back(b.has_value() ? b->contiguous() : at::Tensor());
      bias.push_back(ptr_or_null<T>(bias_keep.back()));
    }
    max_width = *std::max_element(width.begin(), width.end());
    if (!transposed) return;
    weight_t_buf = scratch<T>(weight_elements);
    T* dst = weight_t_buf.get();
    for (size_t l = 0; l < weights.size(); ++l) {
      transpose(weight[l].template const_data_ptr<T>(), width[l + 1], width[l], dst);
      weight_t.push_back(dst);
      dst += width[l] * width[l + 1];
    }
  }
  size_t size() const { return weight.size(); }
  bool has_bias(size_t l) const { return bias_keep[l].defined(); }
};

// x: (*, W0) -> y: (*, W[L]), saved: one per layer (see kernels/mlp.cpp) when `save`
std::tuple<at::Tensor, std::vector<at::Tensor>> mlp_forward(const at::Tensor& x, at::TensorList weights,
                                                            const c10::List<std::optional<at::Tensor>>& biases,
                                                            c10::string_view activation, double p0, double p1,
                                                            c10::string_view output_activation, double q0, double q1,
                                                            bool save) {
  constexpr const char* op = "bpext.mlp_forward";
  const Network net = parse_network(activation, p0, p1, output_activation, q0, q1, op);
  check_mlp_args(x, weights, biases, op);
  for (const auto& w : weights) check_same_dtype_device(x, w, op, "x", "weights");
  if (!fusable(x, weights)) {
    return mlp_forward_layerwise(x, weights, biases, activation, p0, p1, output_activation, q0, q1, save);
  }
  const at::Tensor x2 = as_rows(x);
  const int64_t rows = x2.size(0);
  std::vector<at::Tensor> saved;
  at::Tensor y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    using T = scalar_t;
    const Layers<T> layers(weights, biases, /*transposed=*/true);
    const size_t n_layers = layers.size();
    y = at::empty({rows, layers.width.back()}, x2.options());
    std::vector<T*> saved_ptr(n_layers, nullptr);
    for (size_t l = 0; l < n_layers && save; ++l) {
      const bool none = l + 1 == n_layers && keeps_output(net.output.kind);
      saved.push_back(none ? at::empty({0}, x2.options()) : at::empty({rows, layers.width[l + 1]}, x2.options()));
      saved_ptr[l] = none ? nullptr : saved.back().mutable_data_ptr<T>();
    }
    const T* xp = x2.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
    const int64_t block_elements = std::min(kBlockRows, rows) * layers.max_width;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const auto z_buf = scratch<T>(block_elements), a_buf = scratch<T>(2 * block_elements);
      for (const auto blk : c10::irange(b0, b1)) {
        const int64_t r0 = blk * kBlockRows;
        const int64_t n = std::min(kBlockRows, rows - r0);
        const T* a = xp + r0 * layers.width[0];
        for (size_t l = 0; l < n_layers; ++l) {
          const int64_t k_dim = layers.width[l], n_dim = layers.width[l + 1];
          const LayerActivation& act = net.of(l, n_layers);
          const bool last = l + 1 == n_layers, keeps_y = keeps_output(act.kind);
          // z goes where backward will read it (saved), else to scratch; y to the output,
          // to saved (a kept y is the next layer's input), or to scratch.
          T* z = save && !keeps_y ? saved_ptr[l] + r0 * n_dim : z_buf.get();
          T* out = last ? yp + r0 * n_dim
                        : (save && keeps_y ? saved_ptr[l] + r0 * n_dim : a_buf.get() + (l % 2) * block_elements);
          small_gemm<false>(a, k_dim, layers.weight_t[l], k_dim, n_dim, z, n_dim, n);
          visit_activation(act.kind, [&](auto kind) {
            using M = VecMath<T>;
            using F = Act<decltype(kind)::value, M>;
            const auto params = make_params<M>(act.p0, act.p1);
            for (int64_t i = 0; i < n; ++i) {
              bias_activation_row<F>(z + i * n_dim, layers.bias[l], out + i * n_dim, n_dim, params, z != z_buf.get());
            }
          });
          a = out;
        }
      }
    });
  });
  for (auto& s : saved) {
    if (s.dim() == 2) s = s.view(with_last_dim(x.sizes(), s.size(1)));  // (N, W) -> (*, W), like the layerwise path
  }
  return {y.view(with_last_dim(x.sizes(), y.size(1))), saved};
}

// grad_y: (*, W[L]) -> grad_x: (*, W0) or (0), grad_weights[l], grad_biases[l] ((0) without bias)
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> mlp_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& y, at::TensorList weights,
    const c10::List<std::optional<at::Tensor>>& biases, at::TensorList saved, c10::string_view activation, double p0,
    double p1, c10::string_view output_activation, double q0, double q1, bool input_grad) {
  constexpr const char* op = "bpext.mlp_backward";
  const Network net = parse_network(activation, p0, p1, output_activation, q0, q1, op);
  check_mlp_args(x, weights, biases, op);
  TORCH_CHECK(saved.size() == weights.size(), op, ": saved must have one tensor per layer, as mlp_forward returns");
  check_same_dtype_device(grad_y, x, op, "grad_y", "x");
  for (const auto& w : weights) check_same_dtype_device(grad_y, w, op, "grad_y", "weights");
  if (!fusable(x, weights)) {
    return mlp_backward_layerwise(grad_y, x, y, weights, biases, saved, activation, p0, p1, output_activation, q0, q1,
                                  input_grad);
  }
  const at::Tensor x2 = as_rows(x);
  const at::Tensor g2 = as_rows(grad_y);
  const int64_t rows = x2.size(0);
  const size_t n_layers = weights.size();
  TORCH_CHECK(g2.size(0) == rows && g2.size(1) == weights.back().size(0), op, ": grad_y must have shape (*, ",
              show(weights.back().size(0)), ") with x's leading dims, got ", show(grad_y.sizes()));
  // The tensor each layer's backward reads (y for the last layer when it keeps y).
  std::vector<at::Tensor> state(n_layers);
  for (size_t l = 0; l < n_layers; ++l) {
    const bool last = l + 1 == n_layers;
    const Activation kind = net.of(l, n_layers).kind;
    if (last && kind == Activation::kIdentity) continue;
    const at::Tensor& s = last && keeps_output(kind) ? y : saved[l];
    TORCH_CHECK(s.numel() == rows * weights[l].size(0), op, ": saved[", show(static_cast<int64_t>(l)),
                "] does not match the layer's output (", show(rows), " x ", show(weights[l].size(0)), "), got ",
                show(s.sizes()));
    state[l] = as_rows(s);
  }
  at::Tensor grad_x = input_grad ? at::empty({rows, x2.size(1)}, x2.options()) : at::empty({0}, x2.options());
  std::vector<at::Tensor> grad_weights(n_layers), grad_biases(n_layers);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), op, [&] {
    using T = scalar_t;
    const Layers<T> layers(weights, biases, /*transposed=*/false);
    // Offsets of each layer's weight and bias gradient in one chunk's partial sums.
    std::vector<int64_t> w_off(n_layers + 1, 0), b_off(n_layers + 1, 0);
    for (size_t l = 0; l < n_layers; ++l) {
      w_off[l + 1] = w_off[l] + layers.width[l] * layers.width[l + 1];
      b_off[l + 1] = b_off[l] + layers.width[l + 1];
    }
    const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
    const int64_t blocks_per_chunk = std::max<int64_t>(1, (blocks + kMaxChunks - 1) / kMaxChunks);
    const int64_t chunks = std::max<int64_t>(1, (blocks + blocks_per_chunk - 1) / blocks_per_chunk);
    // Chunk 0 sums straight into the gradients, chunk c > 0 into partial sums of its own
    // (each zeroed by the thread that fills it), which are added to them in order after.
    const int64_t chunk_size = w_off.back() + b_off.back();
    const auto partial = scratch<T>((chunks - 1) * chunk_size);
    std::vector<T*> dw_out(n_layers), db_out(n_layers);
    for (size_t l = 0; l < n_layers; ++l) {
      const int64_t k_dim = layers.width[l], n_dim = layers.width[l + 1];
      grad_weights[l] = at::empty({n_dim, k_dim}, x2.options());
      grad_biases[l] = at::empty({layers.has_bias(l) ? n_dim : 0}, x2.options());
      dw_out[l] = grad_weights[l].mutable_data_ptr<T>();
      db_out[l] = grad_biases[l].mutable_data_ptr<T>();
    }
    const auto dw_of = [&](int64_t c, size_t l) {
      return c == 0 ? dw_out[l] : partial.get() + (c - 1) * chunk_size + w_off[l];
    };
    const auto db_of = [&](int64_t c, size_t l) {
      return c == 0 ? db_out[l] : partial.get() + (c - 1) * chunk_size + w_off.back() + b_off[l];
    };
    const T* xp = x2.const_data_ptr<T>();
    const T* gp = g2.const_data_ptr<T>();
    T* gxp = input_grad ? grad_x.mutable_data_ptr<T>() : nullptr;
    const Activation hidden = net.hidden.kind;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      const int64_t block_elements = std::min(kBlockRows, rows) * layers.max_width;
      const auto dz = scratch<T>(block_elements), dz_t = scratch<T>(block_elements);
      const auto a_buf = scratch<T>(block_elements), g_buf = scratch<T>(2 * block_elements);
      for (const auto c : c10::irange(c0, c1)) {
        for (size_t l = 0; l < n_layers; ++l) {
          std::fill_n(dw_of(c, l), layers.width[l] * layers.width[l + 1], T(0));
          if (layers.has_bias(l)) std::fill_n(db_of(c, l), layers.width[l + 1], T(0));
        }
        for (int64_t blk = c * blocks_per_chunk; blk < std::min(blocks, (c + 1) * blocks_per_chunk); ++blk) {
          const int64_t r0 = blk * kBlockRows;
          const int64_t n = std::min(kBlockRows, rows - r0);
          const T* g = gp + r0 * layers.width.back();
          for (size_t l = n_layers; l-- > 0;) {
            const int64_t k_dim = layers.width[l], n_dim = layers.width[l + 1];
            const LayerActivation& act = net.of(l, n_layers);
            const T* s = state[l].defined() ? state[l].template const_data_ptr<T>() + r0 * n_dim : nullptr;
            // dz = g * act'(s), and its column sums into the bias gradient.
            visit_activation(act.kind, [&](auto kind) {
              using M = VecMath<T>;
              using F = Act<decltype(kind)::value, M>;
              const auto params = make_params<M>(act.p0, act.p1);
              T* db = layers.has_bias(l) ? db_of(c, l) : nullptr;
              for (int64_t i = 0; i < n; ++i) {
                grad_row<F>(g + i * n_dim, s ? s + i * n_dim : nullptr, dz.get() + i * n_dim, db, n_dim, params);
              }
            });
            // The layer's input: x, the previous layer's kept y, or act(z) recomputed.
            const T* a = xp + r0 * k_dim;
            if (l > 0) {
              const T* prev = state[l - 1].template const_data_ptr<T>() + r0 * k_dim;
              a = prev;
              if (!keeps_output(hidden)) {
                visit_activation(hidden, [&](auto kind) {
                  using M = VecMath<T>;
                  using F = Act<decltype(kind)::value, M>;
                  const auto params = make_params<M>(net.hidden.p0, net.hidden.p1);
                  map_span(n * k_dim, [&](const auto& z) { return F::forward(z, params); }, a_buf.get(), prev);
                });
                a = a_buf.get();
              }
            }
            // grad_weight += dz^T a
            transpose(dz.get(), n, n_dim, dz_t.get());
            small_gemm<true>(dz_t.get(), n, a, n, k_dim, dw_of(c, l), k_dim, n_dim);
            // grad of the layer's input: dz W
            if (l == 0 && !input_grad) break;
            T* g_next = l == 0 ? gxp + r0 * k_dim : g_buf.get() + (l % 2) * block_elements;
            small_gemm<false>(dz.get(), n_dim, layers.weight[l].template const_data_ptr<T>(), n_dim, k_dim, g_next,
                              k_dim, n);
            g = g_next;
          }
        }
      }
    });
    // Chunks 1.. added to chunk 0's sums in order, for results independent of the thread count.
    const auto add_partials = [&](T* out, int64_t offset, int64_t size) {
      at::parallel_for(0, size, 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t c = 1; c < chunks; ++c) {
          const T* part = partial.get() + (c - 1) * chunk_size + offset;
          for (int64_t i = i0; i < i1; ++i) out[i] += part[i];
        }
      });
    };
    for (size_t l = 0; l < n_layers && chunks > 1; ++l) {
      add_partials(dw_out[l], w_off[l], w_off[l + 1] - w_off[l]);
      if (layers.has_bias(l)) add_partials(db_out[l], w_off.back() + b_off[l], b_off[l + 1] - b_off[l]);
    }
  });
  if (input_grad) grad_x = grad_x.view(x.sizes());
  return {grad_x, grad_weights, grad_biases};
}

}  // namespace

TORCH_LIBRARY_IMPL(bpext, CPU, m) {
  m.impl("mlp_forward", &mlp_forward);
  m.impl("mlp_backward", &mlp_backward);
}

}  // namespace bpext::cpu
