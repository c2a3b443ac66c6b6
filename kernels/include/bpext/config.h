// Process-wide state shared by the ops and the library definition (kernels/registration.cpp).
#pragma once

#include <atomic>

namespace bpext {

// Dense forward of a ReLU layer with a bias: finish the layer inside the GEMM
// (at::_addmm_activation: cuBLASLt's bias+ReLU epilogue on CUDA) when true, the default,
// or run a plain GEMM and bpext's own activation pass. Exposed for benchmarking both.
std::atomic<bool>& gemm_epilogue_enabled();

// Defines the bpext op library once; false when another copy of bpext defined it first.
bool define_library();

}  // namespace bpext
