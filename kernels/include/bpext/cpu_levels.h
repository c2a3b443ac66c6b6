// The SIMD levels the CPU kernels are built for, and what each needs of the CPU. One list:
// setup.py reads kCpuLevels below to build bpext/_cpu_<level> with -m<feature> for each of its
// features, and kernels/cpu_backend.cpp loads a level only on a CPU that has all of them
// (asked of the CPU itself, never of an environment variable), so a level the CPU lacks is
// an error, never an illegal instruction.
#pragma once

#include <array>
#include <string>
#include <string_view>
#include <vector>

namespace bpext {

struct CpuLevel {
  std::string_view name;
  std::vector<std::string_view> features;  // GCC's -m names (/proc/cpuinfo's too)
};

// Fastest first; "default" (plain x86-64, or any other CPU) runs everywhere.
inline const std::array<CpuLevel, 3> kCpuLevels{{
    {"avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"}},
    {"avx2", {"avx2", "fma", "f16c"}},
    {"default", {}},
}};

// The level called `name`, or null.
inline const CpuLevel* find_cpu_level(std::string_view name) {
  for (const CpuLevel& level : kCpuLevels) {
    if (level.name == name) return &level;
  }
  return nullptr;
}

// The features of `level` this CPU (and its operating system, which must save the vector
// registers) does not have: empty where the level runs here. Defined in cpu_backend.cpp.
std::vector<std::string> missing_cpu_features(const CpuLevel& level);

}  // namespace bpext
