"""Builds mpq_ops._C: C++ always, CUDA sources when a CUDA toolkit and a CUDA
build of torch are present (or MPQ_OPS_CUDA=1/0 forces the choice).

The choice is made from the toolchain, not from torch.cuda.is_available(), so
a wheel can be built on a machine without a GPU.

mpq_ops._mlx (the MLX backend's CPU kernels in C++, csrc/mlx/) is built when
mlx is installed at build time with its headers and libmlx (MPQ_OPS_MLX=1/0
forces the choice); without it the Python bridge serves alone."""
import glob
import importlib.util
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("MPQ_OPS_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return CUDA_HOME is not None and torch.version.cuda is not None


def hopper_arch_specific() -> bool:
    """Builds compute capability 9.0 as sm_90a (wgmma, csrc/cuda/gemm_sm90.cu):
    rewrites 9.0 to 9.0a in TORCH_CUDA_ARCH_LIST (taken from the visible GPUs
    when unset, as torch would). True when the list then holds 9.0a."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs is None:
        if not torch.cuda.is_available():
            return False
        archs = ";".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i)
                                 for i in range(torch.cuda.device_count())}))
    tokens = [("9.0a" + t[3:]) if t.startswith("9.0") and not t.startswith("9.0a") else t
              for t in archs.replace(" ", ";").split(";") if t]
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(tokens)
    return any(t.startswith("9.0a") for t in tokens)


def openmp_flags():
    """-fopenmp where torch runs its CPU threads on OpenMP (Linux): at::parallel_for
    is a header template whose `omp parallel` compiles into our library, so
    without the flag the CPU kernels run on one thread. torch ships the
    libgomp.so.1 that the flag links, and the loader shares it."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        return ["-fopenmp"]
    return []


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to BuildExtension: it must match the one torch was built with;
    # so is Py_LIMITED_API, which it sets to the oldest CPython torch supports (py_limited_api).
    cxx = ["-O3"] + openmp_flags()
    if want_cuda():
        cu = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "--use_fast_math", "-lineinfo",
                "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        if hopper_arch_specific():
            nvcc.append("-DMPQ_SM90A")
        return CUDAExtension("mpq_ops._C", cpp + cu,
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                             extra_link_args=openmp_flags(), py_limited_api=True)
    return CppExtension("mpq_ops._C", cpp, extra_compile_args={"cxx": cxx},
                        extra_link_args=openmp_flags(), py_limited_api=True)


def mlx_dirs():
    """(include dir, lib dir) of the installed mlx package, or None."""
    forced = os.environ.get("MPQ_OPS_MLX")
    if forced is not None and forced in ("0", "", "false", "False"):
        return None
    spec = importlib.util.find_spec("mlx")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
        if os.path.exists(os.path.join(inc, "mlx", "mlx.h")) and glob.glob(os.path.join(lib, "libmlx.*")):
            return inc, lib
    if forced is not None:
        raise RuntimeError("MPQ_OPS_MLX=1 but no mlx package with include/ and lib/ was found")
    return None


def mlx_extension():
    dirs = mlx_dirs()
    if dirs is None:
        return []
    inc, lib = dirs
    # libmlx is found through the rpath, and is already loaded by `import mlx.core`,
    # which mpq_ops does before loading this library.
    return [CppExtension("mpq_ops._mlx", ["csrc/mlx/bridge.cpp", "csrc/checks.cpp"],
                         include_dirs=[inc], library_dirs=[lib], libraries=["mlx"],
                         extra_compile_args={"cxx": ["-O2"] + openmp_flags()},
                         extra_link_args=[f"-Wl,-rpath,{lib}"] + openmp_flags(),
                         py_limited_api=True)]


setup(
    ext_modules=[extension()] + mlx_extension(),
    cmdclass={"build_ext": BuildExtension},
    # (the stable ABI of CPython 3.10, the oldest that torch >= 2.11 supports and
    # the Py_LIMITED_API that BuildExtension compiles for)
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
