// The CPU backend's registration. Its kernels are built once per SIMD level into a library of
// their own (bpext/_cpu_default, _cpu_avx2, _cpu_avx512: kernels/cpu/*.cpp with hidden symbols,
// so that no inline function compiled for AVX-512 can stand in for another library's), and
// bpext/__init__.py loads the one the CPU runs, as ATen picks its own kernels at run time.
#include <dlfcn.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <string>

#include "bpext/backend.h"
#include "bpext/cpu_levels.h"

namespace bpext {
namespace {

Backend cpu_kernels{};  // filled by load_cpu_kernels
std::string& cpu_kernels_path() {
  static std::string path;
  return path;
}

// Whether the CPU has `feature` (a GCC -m name) and the operating system saves the registers
// it uses: AVX's ymm state for AVX2, FMA and F16C, the opmask and zmm state for AVX-512.
bool cpu_has(std::string_view feature) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx1 = 0, edx = 0, ebx7 = 0, ecx7 = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx1, &edx)) return false;
  if (__get_cpuid_max(0, nullptr) >= 7) __cpuid_count(7, 0, eax, ebx7, ecx7, edx);
  unsigned long long xcr0 = 0;
  if (ecx1 & (1u << 27)) {  // OSXSAVE: xgetbv may be asked which register states the OS saves
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<unsigned long long>(hi) << 32) | lo;
  }
  // AVX itself too (a hypervisor may hide it and leave AVX2's bit set)
  const bool avx_state = (ecx1 >> 28 & 1u) && (xcr0 & 0x6) == 0x6, avx512_state = avx_state && (xcr0 & 0xe6) == 0xe6;
  struct Bit {
    std::string_view name;
    unsigned reg, bit;
    bool state;
  };
  const Bit bits[] = {
      {"fma", ecx1, 12, avx_state},        {"f16c", ecx1, 29, avx_state},         {"avx2", ebx7, 5, avx_state},
      {"avx512f", ebx7, 16, avx512_state}, {"avx512dq", ebx7, 17, avx512_state}, {"avx512bw", ebx7, 30, avx512_state},
      {"avx512vl", ebx7, 31, avx512_state},
  };
  for (const Bit& b : bits) {
    if (b.name == feature) return b.state && (b.reg >> b.bit & 1u);
  }
  TORCH_CHECK(false, "bpext: no check for the CPU feature ", std::string(feature), " (kernels/cpu_backend.cpp)");
  return false;
#else
  return false;  // only the default level is built for other CPUs
#endif
}

}  // namespace

std::vector<std::string> missing_cpu_features(const CpuLevel& level) {
  std::vector<std::string> missing;
  for (std::string_view feature : level.features) {
    if (!cpu_has(feature)) missing.emplace_back(feature);
  }
  return missing;
}

// A library's name says its level: _cpu_<level>.<suffix>. The level is checked against the CPU
// before the library is opened: its code (static initializers included) may use any
// instruction of its level.
void load_cpu_kernels(c10::string_view path) {
  const std::string file(path);
  const std::string base = file.substr(file.find_last_of('/') + 1);
  const std::string prefix = "_cpu_";
  const size_t dot = base.find('.');
  const CpuLevel* level = base.rfind(prefix, 0) == 0 && dot != std::string::npos
                              ? find_cpu_level(std::string_view(base).substr(prefix.size(), dot - prefix.size()))
                              : nullptr;
  TORCH_CHECK(level != nullptr, "bpext: ", file, " is not a CPU kernel library (_cpu_<level>.*.so, ",
              "for a level of kernels/include/bpext/cpu_levels.h)");
  const std::vector<std::string> missing = missing_cpu_features(*level);
  if (!missing.empty()) {
    std::string names;
    for (const std::string& m : missing) names += (names.empty() ? "" : ", ") + m;
    TORCH_CHECK(false, "bpext: this CPU cannot run the ", std::string(level->name), " kernels of ", file,
                ": it lacks ", names);
  }
  void* library = dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  TORCH_CHECK(library != nullptr, "bpext: cannot load its CPU kernels from ", file, ": ", dlerror());
  using Table = const Backend* (*)();
  const auto table = reinterpret_cast<Table>(dlsym(library, "bpext_cpu_backend"));
  TORCH_CHECK(table != nullptr, "bpext: ", file, " has no bpext_cpu_backend");
  cpu_kernels = *table();
  cpu_kernels_path() = file;
}

std::string loaded_cpu_kernels() { return cpu_kernels_path(); }

}  // namespace bpext

BPEXT_BACKEND(CPU, bpext::cpu_kernels);
