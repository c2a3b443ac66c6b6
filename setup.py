"""Builds bpext's extensions from kernels/: bpext._C (the ops, and the CUDA kernels whenever torch is
a CUDA build and nvcc is found; BPEXT_FORCE_CPU=1 turns them off) and the CPU kernels, once per
SIMD level (bpext._cpu_default, _cpu_avx2, _cpu_avx512), of which bpext loads the one its CPU runs."""

import copy
import glob
import os
import platform
import re
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _configure_cuda_environment():
    """Environment fixes that must precede importing torch.utils.cpp_extension."""
    # torch guesses CUDA_HOME from the nvcc on PATH (/usr/local/bin/nvcc -> /usr/local),
    # which misses the toolkit when it lives in /usr/local/cuda.
    if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    # With no GPU to ask, the architectures must be named; Hopper (H100/H200) by default.
    if "TORCH_CUDA_ARCH_LIST" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"


def _nvidia_include_dirs():
    """cuBLAS/cuSPARSE headers ship in the nvidia pip packages, not always in the toolkit."""
    roots = site.getsitepackages() + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "cu*", "include"))
    return sorted(set(d for d in found if os.path.isdir(d)))


# The CPU kernels (kernels/cpu) are built once per SIMD level, each into a library of its own
# whose symbols stay hidden (an inline function compiled for AVX-512 must not serve another
# library), and bpext loads the best one the CPU runs at import, as ATen picks its own kernels.
# The levels and the CPU features each needs are one list, in kernels/include/bpext/cpu_levels.h.
def _cpu_levels() -> dict[str, list[str]]:
    """{level: the CPU features it is built for (GCC -m names)}, fastest first."""
    with open(os.path.join(ROOT, "kernels", "include", "bpext", "cpu_levels.h")) as f:
        text = f.read()
    table = text[text.index("kCpuLevels"):]
    return {name: re.findall(r'"(\w+)"', features) for name, features in re.findall(r'\{"(\w+)", \{([^}]*)\}\}', table)}


def _simd_flags(level: str, features: list[str]) -> list[str]:
    # CPU_CAPABILITY selects at::vec's implementation, as in ATen.
    return [f"-m{f}" for f in features] + [f"-DCPU_CAPABILITY={level.upper()}", f"-DCPU_CAPABILITY_{level.upper()}"]


def _this_cpu_features() -> set[str] | None:
    """The CPU features Linux reports (its names are GCC's), or None where it does not say."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def _simd_levels(levels: dict[str, list[str]]) -> list[str]:
    """The levels to build. Every level on x86-64 (a wheel that runs on any x86-64 CPU), the
    default elsewhere. BPEXT_SIMD_LEVELS=native builds the levels this CPU runs (make does, for a
    working copy: its tests run every level built); BPEXT_SIMD_LEVELS=avx2,default names them."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    choice = os.environ.get("BPEXT_SIMD_LEVELS", "").strip().lower()
    if choice in ("", "all"):
        return list(levels)
    if choice == "native":
        features = _this_cpu_features()
        return [name for name, needs in levels.items() if features is None or set(needs) <= features]
    chosen = [level.strip() for level in choice.split(",")]
    unknown = sorted(set(chosen) - set(levels))
    if unknown or "default" not in chosen:
        raise SystemExit(f"BPEXT_SIMD_LEVELS={os.environ['BPEXT_SIMD_LEVELS']}: expected all, native, or levels "
                         f"of {', '.join(levels)} with default among them (it runs where no other does)")
    return [level for level in levels if level in chosen]


def _sanitizer_flags():
    """BPEXT_SANITIZE=1 (make sanitize): AddressSanitizer and UndefinedBehaviorSanitizer,
    every finding fatal, for the CPU kernels."""
    if os.environ.get("BPEXT_SANITIZE", "0") != "1":
        return []
    return ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]


def _extensions():
    force_cpu = os.environ.get("BPEXT_FORCE_CPU", "0") == "1"
    if not force_cpu:
        _configure_cuda_environment()
    from torch.utils import cpp_extension
    import torch

    sources = sorted(glob.glob("kernels/*.cpp"))
    cpu_sources = sorted(glob.glob("kernels/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("kernels/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "kernels", "include")]
    # -fopenmp: at::parallel_for is inline and runs its loop in an OpenMP region (ATen's
    # backend); compiled without it, the region is silently serial.
    # -ffp-contract=off: the compiler may not fuse a*b+c into an FMA on its own; where it did,
    # the same formula rounded differently in an unrolled loop and its tail (results then
    # depended on where a thread's chunk began). -Werror=switch: every enum case handled.
    warnings = ["-Wno-unknown-pragmas", "-Wno-maybe-uninitialized", "-Werror=switch"]
    cxx = ["-std=c++20", "-O3", "-fopenmp", "-ffp-contract=off"] + warnings + _sanitizer_flags()
    link = ["-fopenmp"] + _sanitizer_flags()
    hidden = ["-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    levels = _cpu_levels()
    cpu_kernels = [
        cpp_extension.CppExtension(
            f"bpext._cpu_{level}", cpu_sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + hidden + _simd_flags(level, levels[level])}, extra_link_args=link,
            py_limited_api=True)
        for level in _simd_levels(levels)
    ]

    if force_cpu:
        reason = "BPEXT_FORCE_CPU=1"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None:
        reason = "nvcc / CUDA_HOME not found"
    else:
        reason = None

    if reason is not None:
        print(f"bpext: building the CPU kernels only ({reason})", flush=True)
        return [cpp_extension.CppExtension(
            "bpext._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True,
        ), *cpu_kernels]
    print(f"bpext: building CPU and CUDA kernels (CUDA {torch.version.cuda}, "
          f"arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})", flush=True)
    return [cpp_extension.CUDAExtension(
        "bpext._C", sources + cuda_sources,
        include_dirs=include_dirs + _nvidia_include_dirs(),
        extra_compile_args={"cxx": cxx, "nvcc": ["-std=c++20", "-O3", "-lineinfo"]},
        extra_link_args=link, py_limited_api=True,
    ), *cpu_kernels]


def _parallel_fixed_folder_build(base):
    class Build(base):
        # The extensions build at once (each one's ninja runs MAX_JOBS compilers): one after
        # another, the slowest objects of each (the CUDA kernels) would leave cores idle.
        def finalize_options(self):
            super().finalize_options()
            if not self.parallel:
                self.parallel = len(self.extensions)

        # pip install -e builds in a new temporary folder each time; a fixed one per extension
        # lets ninja rebuild only the kernels that changed. A copy of the command per extension,
        # as the extensions build on threads of their own.
        def build_extension(self, ext):
            worker = copy.copy(self)
            worker.build_temp = os.path.join(ROOT, "build", "temp", ext.name)
            base.build_extension(worker, ext)

    return Build


def main():
    extensions = _extensions()  # first: it fixes the environment that cpp_extension reads on import
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions,
        cmdclass={"build_ext": _parallel_fixed_folder_build(BuildExtension)},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )


if __name__ == "__main__":
    main()
