// Run-time switches shared by the backends (defined in registration.cpp).
#pragma once

#include <atomic>

namespace bpext {

// CUDA dense_forward: let cuBLASLt's bias/ReLU epilogue finish identity and relu
// layers inside the GEMM (true, the default), or always run bpext's own epilogue
// kernel after a plain GEMM (false). Exposed for benchmarking both paths.
std::atomic<bool>& cublaslt_epilogue_enabled();

}  // namespace bpext
