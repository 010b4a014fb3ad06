"""Build script of mmkernels and its compiled extension mmkernels._C.

Knobs (environment variables):
  MMKERNELS_NO_EXT=1     pure-Python install (reference / Triton backends only)
  FORCE_CUDA=1           build the CUDA sources even when no GPU is visible (needs nvcc)
  TORCH_CUDA_ARCH_LIST   CUDA archs, default "8.0;9.0"
  MAX_JOBS               parallel compile jobs (ninja)
  MMKERNELS_NATIVE=1     compile the generic CPU code with -march=native (a binary for this CPU only;
                         the explicitly vectorised kernels pick their ISA at run time either way)
  MMKERNELS_DEBUG=1      -O0 -g
Build: pip install --no-build-isolation --no-deps -e .
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _find_cuda_home() -> str | None:
    """CUDA toolkit root. Honours CUDA_HOME / CUDA_PATH; else resolves the nvcc on PATH,
    following wrapper scripts that exec the real nvcc (torch would guess one level too high)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(real)
        try:  # a wrapper script: look for the path of the nvcc it runs
            with open(real, "rb") as fh:
                head = fh.read(4096)
            if head.startswith(b"#!"):
                for m in re.finditer(rb"(/[^\s\"'`;]*?/bin/nvcc)\b", head):
                    candidates.append(os.path.realpath(m.group(1).decode()))
        except OSError:
            pass
    for c in candidates:
        home = os.path.dirname(os.path.dirname(c))
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    for home in sorted(glob.glob("/usr/local/cuda*"), reverse=True):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
            os.path.join(home, "bin", "nvcc")
        ):
            return home
    return None


def _nvcc_works(cuda_home: str) -> bool:
    try:
        subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            check=True,
            capture_output=True,
        )
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def _extensions():
    if _env_flag("MMKERNELS_NO_EXT"):
        print("mmkernels: MMKERNELS_NO_EXT set, building without the C++ extension")
        return [], {}
    try:
        import torch
    except ImportError:
        print("mmkernels: torch not importable at build time (use --no-build-isolation); "
              "building without the C++ extension", file=sys.stderr)
        return [], {}

    # torch.utils.cpp_extension adds the -std flag its headers need (c++17 up to torch 2.9, c++20 after).
    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "isa", "*.cpp")))
    sources = ["csrc/ops.cpp"] + cpu_sources
    cuda_sources = _rel(
        glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))
        + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp"))
    )

    with_cuda = False
    if cuda_sources and torch.version.cuda is not None:
        cuda_home = _find_cuda_home()
        wanted = _env_flag("FORCE_CUDA") or torch.cuda.is_available()
        if cuda_home and wanted and _nvcc_works(cuda_home):
            os.environ["CUDA_HOME"] = cuda_home
            # torch.utils.cpp_extension reads CUDA_HOME when imported: refresh its guess.
            import torch.utils.cpp_extension as ce

            ce.CUDA_HOME = cuda_home
            with_cuda = True
        elif wanted:
            print("mmkernels: CUDA requested but nvcc / the CUDA toolkit was not found; "
                  "building the CPU kernels only", file=sys.stderr)
    print(f"mmkernels: building _C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels")

    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = _env_flag("MMKERNELS_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # (py_limited_api=True makes torch define Py_LIMITED_API for every TU.)
    cxx = opt + ["-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if _env_flag("MMKERNELS_NATIVE"):
        cxx.append("-march=native")
    link = ["-fopenmp"]
    define_macros = [("MMKERNELS_WITH_CUDA", "1")] if with_cuda else []

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        nvcc = opt + ["--expt-relaxed-constexpr", "-lineinfo"]
        ext = CUDAExtension(
            "mmkernels._C",
            sources + cuda_sources,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
            define_macros=define_macros,
            py_limited_api=True,
        )
    else:
        ext = CppExtension(
            "mmkernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
            define_macros=define_macros,
            py_limited_api=True,
        )
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()
options = {"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {}

setup(
    packages=find_packages(include=["mmkernels", "mmkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options=options,
    include_package_data=True,
    entry_points={
        "console_scripts": [
            "mmkernels-train = mmkernels.train.cli:train_main",
            "mmkernels-eval = mmkernels.train.cli:eval_main",
            "mmkernels-predict = mmkernels.train.cli:predict_main",
            "mmkernels-speakers = mmkernels.train.speakers:main",
            "mmkernels-build-data = mmkernels.data.build:main",
            "mmkernels-info = mmkernels.info:main",
        ]
    },
    zip_safe=False,
)
