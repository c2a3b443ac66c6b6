// Shared pieces of bpext's CUDA elementwise kernels: 16-byte packs, a vectorized
// grid-stride map, and launch sizing.
#pragma once

#include <ATen/OpMathType.h>
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

}  // namespace bpext::cuda
