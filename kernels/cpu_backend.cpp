// The CPU backend's registration. Its kernels are built once per SIMD level into a library of
// their own (bpext/_cpu_default, _cpu_avx2, _cpu_avx512: kernels/cpu/*.cpp with hidden symbols,
// so that no inline function compiled for AVX-512 can stand in for another library's), and
// bpext/__init__.py loads the one the CPU runs, as ATen picks its own kernels at run time.
#include <dlfcn.h>

#include <string>

#include "bpext/backend.h"

namespace bpext {
namespace {

Backend cpu_kernels{};  // filled by load_cpu_kernels
std::string& cpu_kernels_path() {
  static std::string path;
  return path;
}

}  // namespace

void load_cpu_kernels(c10::string_view path) {
  const std::string file(path);
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
