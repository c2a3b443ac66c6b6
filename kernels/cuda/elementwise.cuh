// The two loop shapes of bpext's CUDA passes: a vectorized grid-stride map, and a row map
// whose outputs are also summed down the columns (bias gradients) in an order fixed by the
// shape. Both move 16-byte packs where every pointer and the row length allow.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace bpext::cuda {

constexpr int kThreads = 256;

// kVec elements of T moved as one aligned load or store.
template <class T, int kVec>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

// Elements per 16-byte pack.
template <class T>
constexpr int kPackWidth = 16 / sizeof(T);

// K values (an op's results) or K pointers (where they go).
template <class T, int K>
struct Array {
  T v[K];
};

inline bool is_aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Blocks for a grid-stride loop over `work` items: one item per thread up to a few
// hundred blocks per SM (many loads in flight), then each thread loops.
inline unsigned grid_for(int64_t work) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return static_cast<unsigned>(std::clamp<int64_t>((work + kThreads - 1) / kThreads, 1, sms * 128));
}

// The packs arrive by value: each is loaded once, 16 bytes at a time.
template <class T, int kVec, class Op, class... P>
__device__ __forceinline__ Pack<T, kVec> apply_packed(const Op& op, P... packs) {
  using O = at::opmath_type<T>;
  Pack<T, kVec> result;
#pragma unroll
  for (int k = 0; k < kVec; ++k) result.v[k] = static_cast<T>(op(static_cast<O>(packs.v[k])...));
  return result;
}

// out[i] = op(in[i]...) for i in [0, n); packs of kVec, then a scalar tail.
template <int kVec, class T, class Op, class... In>
__global__ void map_kernel(int64_t n, Op op, T* __restrict__ out, const In* __restrict__... in) {
  using O = at::opmath_type<T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t packs = n / kVec;
  for (int64_t i = first; i < packs; i += stride) {
    reinterpret_cast<Pack<T, kVec>*>(out)[i] =
        apply_packed<T, kVec>(op, reinterpret_cast<const Pack<In, kVec>*>(in)[i]...);
  }
  for (int64_t i = packs * kVec + first; i < n; i += stride) {
    out[i] = static_cast<T>(op(static_cast<O>(in[i])...));
  }
}

// Launches map_kernel on the current stream, with 16-byte packs when every pointer allows.
template <class T, class Op, class... In>
void launch_map(int64_t n, const Op& op, T* out, const In*... in) {
  if (n == 0) return;
  constexpr int kVec = kPackWidth<T>;
  auto stream = at::cuda::getCurrentCUDAStream();
  if ((is_aligned(out, 16) && ... && is_aligned(in, 16))) {
    map_kernel<kVec><<<grid_for(n / kVec), kThreads, 0, stream>>>(n, op, out, in...);
  } else {
    map_kernel<1><<<grid_for(n), kThreads, 0, stream>>>(n, op, out, in...);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

constexpr int kSumThreadsX = 32;  // threads across columns (kVec columns each)
constexpr int kSumThreadsY = 8;   // threads down the rows of one tile

// in...: (N, C) -> out[k]: (N, C) = op(in...).v[k] unless null, partial[k]: (tiles, C) column
// sums of out[k] over each tile of rows unless null. Block (32, 8) covers 32*kVec columns of
// one tile; each thread sums its columns down the tile in registers, then the 8 row-threads
// are added in a fixed order.
template <class T, int kVec, int K, class Op, class... In>
__global__ void map_rows_sum_kernel(Op op, Array<T*, K> out, Array<at::opmath_type<T>*, K> partial, int64_t rows,
                                    int64_t cols, int64_t rows_per_tile, const In* __restrict__... in) {
  using O = at::opmath_type<T>;
  __shared__ O column_sums[K][kSumThreadsY][kSumThreadsX * kVec];
  const int64_t col = (static_cast<int64_t>(blockIdx.x) * kSumThreadsX + threadIdx.x) * kVec;
  const int64_t r0 = blockIdx.y * rows_per_tile;
  const int64_t r1 = std::min(rows, r0 + rows_per_tile);
  O sum[K][kVec] = {};
  if (col < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += kSumThreadsY) {
      const int64_t off = (r * cols + col) / kVec;
      Pack<T, kVec> results[K];
      const auto packs = Array<Pack<T, kVec>, sizeof...(In)>{reinterpret_cast<const Pack<In, kVec>*>(in)[off]...};
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const Array<O, K> value = [&]<size_t... I>(std::index_sequence<I...>) {
          return op(static_cast<O>(packs.v[I].v[e])...);
        }(std::make_index_sequence<sizeof...(In)>{});
#pragma unroll
        for (int k = 0; k < K; ++k) {
          results[k].v[e] = static_cast<T>(value.v[k]);
          sum[k][e] += value.v[k];
        }
      }
#pragma unroll
      for (int k = 0; k < K; ++k) {
        if (out.v[k] != nullptr) reinterpret_cast<Pack<T, kVec>*>(out.v[k])[off] = results[k];
      }
    }
  }
  bool summing = false;
#pragma unroll
  for (int k = 0; k < K; ++k) summing = summing || partial.v[k] != nullptr;
  if (!summing) return;  // uniform across the block, so no barrier is skipped by some threads only
#pragma unroll
  for (int k = 0; k < K; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) column_sums[k][threadIdx.y][threadIdx.x * kVec + e] = sum[k][e];
  }
  __syncthreads();
  if (threadIdx.y != 0 || col >= cols) return;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (partial.v[k] == nullptr) continue;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      O total = 0;
      for (int y = 0; y < kSumThreadsY; ++y) total += column_sums[k][y][threadIdx.x * kVec + e];
      partial.v[k][blockIdx.y * cols + col + e] = total;
    }
  }
}

// partial: (tiles, C) -> sums: (C), tiles added in order
template <class T>
__global__ void sum_tiles_kernel(const at::opmath_type<T>* __restrict__ partial, T* __restrict__ sums, int64_t tiles,
                                 int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  at::opmath_type<T> total = 0;
  for (int64_t t = 0; t < tiles; ++t) total += partial[t * cols + j];
  sums[j] = static_cast<T>(total);
}

// For rows x cols elements: out[k] = op(in...).v[k] (unless null) and sums[k] = the column sums
// of out[k] (unless null). The tiling, and so the summation order, depends only on the shape
// and the device.
template <int K, class T, class Op, class... In>
void launch_map_rows_sum(int64_t rows, int64_t cols, const Op& op, Array<T*, K> out, Array<T*, K> sums,
                         const In*... in) {
  using O = at::opmath_type<T>;
  if (rows == 0 || cols == 0) {
    for (int k = 0; k < K; ++k) {
      if (sums.v[k] != nullptr && cols > 0) C10_CUDA_CHECK(cudaMemsetAsync(sums.v[k], 0, cols * sizeof(T),
                                                                           at::cuda::getCurrentCUDAStream()));
    }
    return;
  }
  constexpr int kVec = kPackWidth<T>;
  bool packed = cols % kVec == 0 && (is_aligned(in, 16) && ...);
  for (int k = 0; k < K; ++k) packed = packed && (out.v[k] == nullptr || is_aligned(out.v[k], 16));
  const int vec = packed ? kVec : 1;
  // Tiles of rows: enough blocks to fill the GPU a few times over.
  const int64_t col_blocks = (cols + kSumThreadsX * vec - 1) / (kSumThreadsX * vec);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_tiles =
      std::clamp<int64_t>((4 * sms + col_blocks - 1) / col_blocks, 1, (rows + kSumThreadsY - 1) / kSumThreadsY);
  const int64_t rows_per_tile = (rows + want_tiles - 1) / want_tiles;
  const int64_t tiles = (rows + rows_per_tile - 1) / rows_per_tile;
  bool summing = false;
  for (int k = 0; k < K; ++k) summing = summing || sums.v[k] != nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partial_buf;  // (K, tiles, cols) in the compute type, when summing
  Array<O*, K> partial{};
  if (summing) {
    partial_buf = at::empty({K, tiles, cols}, at::TensorOptions().device(at::kCUDA).dtype(
                                                  c10::CppTypeToScalarType<O>::value));
    for (int k = 0; k < K; ++k) {
      partial.v[k] = sums.v[k] != nullptr ? partial_buf.mutable_data_ptr<O>() + k * tiles * cols : nullptr;
    }
  }
  const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(tiles));
  const dim3 block(kSumThreadsX, kSumThreadsY);
  if (packed) {
    map_rows_sum_kernel<T, kVec, K><<<grid, block, 0, stream>>>(op, out, partial, rows, cols, rows_per_tile, in...);
  } else {
    map_rows_sum_kernel<T, 1, K><<<grid, block, 0, stream>>>(op, out, partial, rows, cols, rows_per_tile, in...);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int k = 0; k < K; ++k) {
    if (sums.v[k] == nullptr) continue;
    sum_tiles_kernel<T><<<static_cast<unsigned>((cols + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
        partial.v[k], sums.v[k], tiles, cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace bpext::cuda
