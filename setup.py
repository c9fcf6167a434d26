"""Builds bsnas._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc
is found. BSNAS_CUDA=0|1 forces either way; TORCH_CUDA_ARCH_LIST picks architectures
(default sm_80 and sm_90 + PTX); MAX_JOBS sets the parallel compile jobs."""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """CUDA_HOME, looking behind a shim `nvcc` (a script that execs the real one)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.isfile(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:  # a shim script: find the path it execs
            with open(nvcc, "rb") as f:
                head = f.read(4096).decode("utf-8", "ignore")
            for tok in head.split():
                if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                    candidates.insert(0, os.path.dirname(os.path.dirname(tok)))
        except OSError:
            pass
    for c in candidates:
        if os.path.isfile(os.path.join(c, "bin", "nvcc")) and os.path.isfile(
            os.path.join(c, "include", "cuda_runtime.h")
        ):
            return c
    return None


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before cpp_extension is imported
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    forced = os.environ.get("BSNAS_CUDA")
    can = torch.version.cuda is not None and _cuda_home is not None
    if forced == "1":
        if not can:
            sys.exit("BSNAS_CUDA=1 but torch is not a CUDA build or nvcc was not found")
        return True
    if forced == "0":
        return False
    return can


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/ops/*.cpp") +
                     glob.glob("csrc/ops/autograd/*.cpp") + glob.glob("csrc/ops/cpu/*.cpp"))
    # -fopenmp: at::parallel_for in our kernels is header code that threads only when
    # _OPENMP is defined (torch itself links the same libgomp). -fno-trapping-math: GCC
    # keeps loops with two float compares (the ReLU6 derivative) scalar otherwise; it
    # changes no value, only which floating-point exception flags may be raised, and
    # nothing here reads them.
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fno-tree-loop-distribute-patterns",
           "-fno-trapping-math"]
    # Where the compiler links libstdc++ statically (the lent GPU machine's g++ does), the
    # copy inside _C must keep its own symbols: exported, its functions ran against the
    # data of the process's libstdc++.so (loaded by torch) and formatting an integer into
    # an error message crashed. Hidden, the copy is self-contained. No effect otherwise.
    link = ["-Wl,--exclude-libs,ALL"]
    if _want_cuda():
        sources += sorted(glob.glob("csrc/ops/cuda/*.cu") + glob.glob("csrc/ops/cuda/*.cpp"))
        print(f"bsnas: building CPU + CUDA kernels (CUDA_HOME={_cuda_home}, "
              f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})")
        return CUDAExtension(
            "bsnas._C", sources,
            define_macros=[("BSNAS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]},
            extra_link_args=link,
        )
    print("bsnas: building CPU kernels only (no CUDA build of torch, nvcc not found, or BSNAS_CUDA=0)")
    return CppExtension("bsnas._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=link)


setup(
    name="bsnas",
    version="0.1.0",
    description="BS-NAS: broadening-and-shrinking one-shot NAS with searchable channel numbers",
    packages=find_packages(include=["bsnas", "bsnas.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    entry_points={"console_scripts": ["bsnas = bsnas.cli:main"]},
)
