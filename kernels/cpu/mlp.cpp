// The multi-layer perceptron on the CPU, fused across layers for narrow networks.
//
// The batch is cut into blocks of kBlockRows rows. Forward runs every layer on a block
// before the next block, so the block's activations stay in L1/L2 between layers;
// backward does the same from the last layer down, recomputing act(z) for the weight
// gradients while the block is hot. The products are a small register-blocked kernel
// (MKL's per-call cost dominates at these sizes). Weight and bias gradients are summed
// per chunk of blocks and the chunks added in order: the chunking depends only on the
// batch size, so results do not depend on the thread count.
// Wider networks and 16-bit dtypes return false: the ops run them layer by layer.
#include <ATen/Parallel.h>
#include <c10/util/irange.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"

namespace bpext::cpu {
namespace {

constexpr int64_t kMaxFusedWidth = 256;
constexpr int64_t kBlockRows = 64;
constexpr int64_t kMaxChunks = 16;

// A layer of width 0 goes layer by layer too: its products over nothing are the GEMMs' zeros
// there (the fused loops would skip writing what flows through it, e.g. grad_x). W[0] may be 0
// where nothing reads it (backward asked nothing of layer 0's input or weight).
bool fusable(at::ScalarType dtype, at::IntArrayRef widths, bool reads_input_width) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  return std::all_of(widths.begin(), widths.end(), [](int64_t w) { return w <= kMaxFusedWidth; }) &&
         std::all_of(widths.begin() + (reads_input_width ? 0 : 1), widths.end(), [](int64_t w) { return w > 0; });
}

std::vector<int64_t> widths_of(at::TensorList weights) {
  std::vector<int64_t> widths{weights[0].size(1)};
  for (const at::Tensor& w : weights) widths.push_back(w.size(0));
  return widths;
}

// a: (rows, K) with row stride lda, b: (K, N) dense -> c: (rows, N) with row stride ldc;
// c = a b, or c += a b. kRows rows at a time, two vectors of columns in registers. Never
// inlined: inside the backward pass's loop the compiler spilled an accumulator to the stack,
// a store and a load on every FMA chain (half of backward's time).
template <int kRows, bool kAccumulate, class T>
__attribute__((noinline)) void gemm_rows(const T* a, int64_t lda, const T* b, int64_t k_dim, int64_t n_dim, T* c, int64_t ldc) {
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

// acc: (OUT) GEMM row, bias: (OUT) or null -> z = acc + bias (back into acc when keep_z), y = act(z)
template <class F, class T, class P>
BPEXT_FLATTEN void bias_activation_row(T* acc, const T* bias, T* y, int64_t out_features, const P& params, bool keep_z) {
  using IO = VecIO<T>;
  for (int64_t j = 0; j < out_features; j += IO::kWidth) {
    const int64_t n = std::min<int64_t>(IO::kWidth, out_features - j);
    auto z = IO::load(acc + j, n);
    if (bias != nullptr) z = z + IO::load(bias + j, n);
    if (keep_z) IO::store(acc + j, z, n);
    IO::store(y + j, F::forward(z, params), n);
  }
}

// g, s: (OUT) rows -> dz = g * act'(s), db_acc += dz (unless null); from act'(s) itself where
// slope is not null.
template <class F, class T, class P>
BPEXT_FLATTEN void grad_row(const T* g, const T* s, const T* slope, T* dz, T* db_acc, int64_t out_features, const P& params) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  for (int64_t j = 0; j < out_features; j += IO::kWidth) {
    const int64_t n = std::min<int64_t>(IO::kWidth, out_features - j);
    const auto d = slope ? IO::load(g + j, n) * IO::load(slope + j, n)
                         : F::backward(IO::load(g + j, n), s ? IO::load(s + j, n) : V(T(0)), params);
    IO::store(dz + j, d, n);
    if (db_acc != nullptr) (V::loadu(db_acc + j, n) + d).store(db_acc + j, n);
  }
}

// Calls f.template operator()<F>(params) with the activation's functor over SIMD vectors of T.
template <class T, class Body>
void with_functor(const ActivationArg& act, const Body& body) {
  using M = VecMath<T>;
  visit_activation(act.kind, [&](auto a) { body.template operator()<Act<decltype(a)::value, M>>(make_params<M>(act.params)); });
}

// The network's shapes and parameters, as row-major pointers.
template <class T>
struct Layers {
  std::vector<int64_t> width;      // width[0] = in_features, width[l + 1] = layer l's outputs
  std::vector<at::Tensor> weight;  // weights[l], contiguous: (W[l+1], W[l]); undefined where unread
  std::vector<const T*> weight_t;  // weights[l].T: (W[l], W[l+1]), in weight_t_buf (forward only)
  std::unique_ptr<T[]> weight_t_buf;
  std::vector<at::Tensor> bias;    // contiguous, undefined without bias (or in backward, which reads none)
  int64_t max_width = 0;

  Layers(at::IntArrayRef widths, at::TensorList weights, at::TensorList biases, bool transposed)
      : width(widths.vec()), max_width(*std::max_element(widths.begin(), widths.end())) {
    size_t weight_elements = 0;
    for (size_t l = 0; l < weights.size(); ++l) {
      weight.push_back(weights[l].defined() ? weights[l].contiguous() : at::Tensor());
      weight_elements += weights[l].defined() ? weights[l].numel() : 0;
      bias.push_back(l < biases.size() && biases[l].defined() ? biases[l].contiguous() : at::Tensor());
    }
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
  const T* bias_ptr(size_t l) const { return bias[l].defined() ? bias[l].template const_data_ptr<T>() : nullptr; }
};

template <class T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() && t.numel() > 0 ? t.template mutable_data_ptr<T>() : nullptr;
}

template <class T>
void forward(const Network& net, const at::Tensor& x, const Layers<T>& layers, T* y, const std::vector<T*>& saved) {
  const size_t n_layers = layers.size();
  const bool save = !saved.empty();
  const int64_t rows = x.size(0);
  const T* xp = x.const_data_ptr<T>();
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
        const ActivationArg& act = net.of(l, n_layers);
        const bool keeps_z = save && mlp_keeps_z(act);
        const bool keeps_y = save && !keeps_z && saved[l] != nullptr;
        // z goes where backward will read it (saved), else to scratch; y to the output,
        // to saved (a kept y is the next layer's input), or to scratch.
        T* z = keeps_z ? saved[l] + r0 * n_dim : z_buf.get();
        T* out = l + 1 == n_layers ? y + r0 * n_dim
                                   : (keeps_y ? saved[l] + r0 * n_dim : a_buf.get() + (l % 2) * block_elements);
        small_gemm<false>(a, k_dim, layers.weight_t[l], k_dim, n_dim, z, n_dim, n);
        with_functor<T>(act, [&]<class F>(const auto& params) {
          for (int64_t i = 0; i < n; ++i) {
            bias_activation_row<F>(z + i * n_dim, layers.bias_ptr(l), out + i * n_dim, n_dim, params, keeps_z);
          }
        });
        a = out;
      }
    }
  });
}

// One chunk's running sums of every layer's weight and bias gradients (chunk 0 sums straight
// into the gradient tensors, chunk c > 0 into partial sums of its own).
template <class T>
struct GradSums {
  std::vector<int64_t> w_off, b_off;  // offsets of layer l's sums in one chunk's partials
  std::vector<T*> dw_out, db_out;     // the gradient tensors (db null without bias)
  int64_t chunk_size = 0;
  std::unique_ptr<T[]> partial;

  GradSums(const Layers<T>& layers, at::TensorList grad_weights, at::TensorList grad_biases, int64_t chunks) {
    const size_t n_layers = layers.size();
    w_off.assign(n_layers + 1, 0);
    b_off.assign(n_layers + 1, 0);
    for (size_t l = 0; l < n_layers; ++l) {
      w_off[l + 1] = w_off[l] + layers.width[l] * layers.width[l + 1];
      b_off[l + 1] = b_off[l] + layers.width[l + 1];
      dw_out.push_back(grad_weights[l].defined() ? grad_weights[l].mutable_data_ptr<T>() : nullptr);
      db_out.push_back(grad_biases[l].defined() ? grad_biases[l].mutable_data_ptr<T>() : nullptr);
    }
    chunk_size = w_off.back() + b_off.back();
    partial = scratch<T>((chunks - 1) * chunk_size);
  }
  T* dw(int64_t c, size_t l) const {
    if (dw_out[l] == nullptr) return nullptr;
    return c == 0 ? dw_out[l] : partial.get() + (c - 1) * chunk_size + w_off[l];
  }
  T* db(int64_t c, size_t l) const {
    if (db_out[l] == nullptr) return nullptr;
    return c == 0 ? db_out[l] : partial.get() + (c - 1) * chunk_size + w_off.back() + b_off[l];
  }
  void zero(int64_t c, const Layers<T>& layers) const {
    for (size_t l = 0; l < layers.size(); ++l) {
      if (dw(c, l) != nullptr) std::fill_n(dw(c, l), layers.width[l] * layers.width[l + 1], T(0));
      if (db(c, l) != nullptr) std::fill_n(db(c, l), layers.width[l + 1], T(0));
    }
  }
  // Chunks 1.. added to chunk 0's sums in order, for results independent of the thread count; one
  // parallel loop over a chunk's layout (the weights' sums, then the biases'), not one per tensor.
  void reduce(int64_t chunks) const {
    if (chunks < 2) return;
    struct Segment {
      int64_t offset, size;
      T* out;
    };
    std::vector<Segment> segments;
    for (size_t l = 0; l < dw_out.size(); ++l) {
      if (dw_out[l] != nullptr) segments.push_back({w_off[l], w_off[l + 1] - w_off[l], dw_out[l]});
    }
    for (size_t l = 0; l < db_out.size(); ++l) {
      if (db_out[l] != nullptr) segments.push_back({w_off.back() + b_off[l], b_off[l + 1] - b_off[l], db_out[l]});
    }
    at::parallel_for(0, chunk_size, 4096, [&](int64_t i0, int64_t i1) {
      for (const Segment& seg : segments) {
        const int64_t from = std::max(i0, seg.offset), to = std::min(i1, seg.offset + seg.size);
        for (int64_t c = 1; c < chunks; ++c) {
          const T* part = partial.get() + (c - 1) * chunk_size;
          for (int64_t i = from; i < to; ++i) seg.out[i - seg.offset] += part[i];
        }
      }
    });
  }
};

// Per-thread scratch for one block of the backward pass. slope holds act'(z) of the layer
// slope_layer, computed with act(z) where the activation shares the work (HasValueSlope).
template <class T>
struct BlockScratch {
  std::unique_ptr<T[]> dz, dz_t, a, slope, g;
  int64_t elements;
  size_t slope_layer = SIZE_MAX;
  explicit BlockScratch(int64_t block_elements)
      : dz(scratch<T>(block_elements)), dz_t(scratch<T>(block_elements)), a(scratch<T>(block_elements)),
        slope(scratch<T>(block_elements)), g(scratch<T>(2 * block_elements)), elements(block_elements) {}
};

// a = act(z) over n elements, and slope = act'(z) where the activation computes both at once
// (returns whether it did).
template <class F, class T, class P>
BPEXT_FLATTEN bool recompute_activation(const T* z, int64_t n, T* a, T* slope, const P& params) {
  using IO = VecIO<T>;
  if constexpr (HasValueSlope<F, typename IO::V>) {
    for (int64_t j = 0; j < n; j += IO::kWidth) {
      const int64_t count = std::min<int64_t>(IO::kWidth, n - j);
      const auto r = F::value_and_slope(IO::load(z + j, count), params);
      IO::store(a + j, r.value, count);
      IO::store(slope + j, r.slope, count);
    }
    return true;
  } else {
    map_span(n, [&](const auto& v) { return F::forward(v, params); }, a, z);
    return false;
  }
}

// Layer l's backward on the n rows from r0: from g (the gradient of its output), accumulates
// its weight and bias gradients into chunk c's sums (where wanted) and returns the gradient of
// its input (written to grad_x for layer 0; null where not wanted: its weight is undefined).
template <class T>
const T* backward_layer(const Network& net, const Layers<T>& layers, size_t l, const std::vector<const T*>& state,
                        const T* x, T* grad_x, const T* g, int64_t r0, int64_t n, const GradSums<T>& sums, int64_t c,
                        BlockScratch<T>& buf) {
  const size_t n_layers = layers.size();
  const int64_t k_dim = layers.width[l], n_dim = layers.width[l + 1];
  const T* s = state[l] != nullptr ? state[l] + r0 * n_dim : nullptr;
  const T* slope = buf.slope_layer == l ? buf.slope.get() : nullptr;
  // dz = g * act'(s), and its column sums into the bias gradient.
  with_functor<T>(net.of(l, n_layers), [&]<class F>(const auto& params) {
    for (int64_t i = 0; i < n; ++i) {
      grad_row<F>(g + i * n_dim, s ? s + i * n_dim : nullptr, slope ? slope + i * n_dim : nullptr,
                  buf.dz.get() + i * n_dim, sums.db(c, l), n_dim, params);
    }
  });
  buf.slope_layer = SIZE_MAX;
  if (sums.dw(c, l) != nullptr) {
    // The layer's input: x, the previous layer's kept y, or act(z) recomputed from its kept z
    // (with act'(z), for layer l - 1's dz, where that comes at no extra cost).
    const T* a = l == 0 ? x + r0 * k_dim : state[l - 1] + r0 * k_dim;
    if (l > 0 && mlp_keeps_z(net.hidden)) {
      with_functor<T>(net.hidden, [&]<class F>(const auto& params) {
        if (recompute_activation<F>(a, n * k_dim, buf.a.get(), buf.slope.get(), params)) buf.slope_layer = l - 1;
      });
      a = buf.a.get();
    }
    // grad_weight += dz^T a
    transpose(buf.dz.get(), n, n_dim, buf.dz_t.get());
    small_gemm<true>(buf.dz_t.get(), n, a, n, k_dim, sums.dw(c, l), k_dim, n_dim);
  }
  if (!layers.weight[l].defined()) return nullptr;
  // grad of the layer's input: dz W
  T* g_in = l == 0 ? grad_x + r0 * k_dim : buf.g.get() + (l % 2) * buf.elements;
  small_gemm<false>(buf.dz.get(), n_dim, layers.weight[l].template const_data_ptr<T>(), n_dim, k_dim, g_in, k_dim, n);
  return g_in;
}

template <class T>
void backward(const Network& net, const at::Tensor& grad_y, const T* xp, const Layers<T>& layers,
              const std::vector<const T*>& state, T* grad_x, at::TensorList grad_weights, at::TensorList grad_biases) {
  const size_t n_layers = layers.size();
  const int64_t rows = grad_y.size(0);
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t blocks_per_chunk = std::max<int64_t>(1, (blocks + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = std::max<int64_t>(1, (blocks + blocks_per_chunk - 1) / blocks_per_chunk);
  const GradSums<T> sums(layers, grad_weights, grad_biases, chunks);
  const T* gp = grad_y.const_data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    BlockScratch<T> buf(std::min(kBlockRows, rows) * layers.max_width);
    for (const auto c : c10::irange(c0, c1)) {
      sums.zero(c, layers);
      for (int64_t blk = c * blocks_per_chunk; blk < std::min(blocks, (c + 1) * blocks_per_chunk); ++blk) {
        const int64_t r0 = blk * kBlockRows;
        const int64_t n = std::min(kBlockRows, rows - r0);
        const T* g = gp + r0 * layers.width.back();
        for (size_t l = n_layers; l-- > 0 && g != nullptr;) {
          g = backward_layer(net, layers, l, state, xp, grad_x, g, r0, n, sums, c, buf);
        }
      }
    }
  });
  sums.reduce(chunks);
}

}  // namespace

bool mlp_forward(const Network& net, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                 const at::Tensor& y, at::TensorList saved) {
  const std::vector<int64_t> widths = widths_of(weights);
  if (!fusable(x.scalar_type(), widths, /*reads_input_width=*/true)) return false;
  const at::Tensor xc = x.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bpext.mlp_forward", [&] {
    std::vector<scalar_t*> saved_ptr;
    for (const auto& s : saved) saved_ptr.push_back(data_or_null<scalar_t>(s));
    const Layers<scalar_t> layers(widths, weights, biases, /*transposed=*/true);
    forward(net, xc, layers, y.mutable_data_ptr<scalar_t>(), saved_ptr);
  });
  return true;
}

bool mlp_backward(const Network& net, at::IntArrayRef widths, const at::Tensor& grad_y, const at::Tensor& x,
                  at::TensorList weights, at::TensorList state, const at::Tensor& grad_x, at::TensorList grad_weights,
                  at::TensorList grad_biases) {
  if (!fusable(grad_y.scalar_type(), widths, x.defined() || grad_x.defined())) return false;
  const at::Tensor xc = x.defined() ? x.contiguous() : x;
  AT_DISPATCH_FLOATING_TYPES(grad_y.scalar_type(), "bpext.mlp_backward", [&] {
    std::vector<const scalar_t*> state_ptr;
    for (const auto& s : state) state_ptr.push_back(data_or_null<scalar_t>(s));
    const Layers<scalar_t> layers(widths, weights, {}, /*transposed=*/false);
    backward(net, grad_y, xc.defined() ? xc.const_data_ptr<scalar_t>() : nullptr, layers, state_ptr, data_or_null<scalar_t>(grad_x),
             grad_weights, grad_biases);
  });
  return true;
}

}  // namespace bpext::cpu
