// The CPU backend's table. kernels/cpu is built once per SIMD level (setup.py: bpext/_cpu_default,
// _cpu_avx2, _cpu_avx512, each with hidden symbols), and bpext loads the library its CPU runs
// (kernels/cpu_backend.cpp): the only symbol each exports is this table.
#include "kernels.h"

namespace {

// Designated, in declaration order: two entries of the same type swapped do not compile.
const bpext::Backend kCpuBackend{
    .activation_forward = bpext::cpu::activation_forward,
    .activation_backward = bpext::cpu::activation_backward,
    .activation_double_backward = bpext::cpu::activation_double_backward,
    .bias_grad = bpext::cpu::bias_grad,
    .gated_forward = bpext::cpu::gated_forward,
    .gated_backward = bpext::cpu::gated_backward,
    .mlp_forward = bpext::cpu::mlp_forward,
    .mlp_backward = bpext::cpu::mlp_backward,
};

}  // namespace

extern "C" __attribute__((visibility("default"))) const bpext::Backend* bpext_cpu_backend() { return &kCpuBackend; }
