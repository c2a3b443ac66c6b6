// One row of a dense layer's elementwise work, shared by the CPU dense and MLP kernels:
// the forward epilogue (bias + activation) and the backward's dz with its bias-gradient sum.
#pragma once

#include <algorithm>

#include "vec_math.h"

namespace bpext::cpu {

// acc: (OUT) GEMM row, bias: (OUT) or null -> z = acc + bias (back into acc when keep_z), y = act(z)
template <class F, class T, class P>
void bias_activation_row(T* acc, const T* bias, T* y, int64_t out_features, const P& params, bool keep_z) {
  using IO = VecIO<T>;
  for (int64_t j = 0; j < out_features; j += IO::kWidth) {
    const int64_t n = std::min<int64_t>(IO::kWidth, out_features - j);
    auto z = IO::load(acc + j, n);
    if (bias != nullptr) z = z + IO::load(bias + j, n);
    if (keep_z) IO::store(acc + j, z, n);
    IO::store(y + j, F::forward(z, params), n);
  }
}

// g, s: (OUT) rows -> dz = g * act'(s) (written when dz != null), db_acc += dz
template <class F, class T, class O, class P>
void grad_row(const T* g, const T* s, T* dz, O* db_acc, int64_t out_features, const P& params) {
  using IO = VecIO<T>;
  using V = typename IO::V;
  for (int64_t j = 0; j < out_features; j += IO::kWidth) {
    const int64_t n = std::min<int64_t>(IO::kWidth, out_features - j);
    const auto d = F::backward(IO::load(g + j, n), s ? IO::load(s + j, n) : V(typename IO::O(0)), params);
    if (dz != nullptr) IO::store(dz + j, d, n);
    if (db_acc != nullptr) (V::loadu(db_acc + j, n) + d).store(db_acc + j, n);
  }
}

}  // namespace bpext::cpu
