"""Build script for xent_ext's compiled core (``xent_ext._C``).

Build with ``pip install --no-build-isolation .`` (torch must already be
installed: the extension is compiled against it). Environment variables:

- ``XENT_EXT_CPU_ONLY=1``: skip the CUDA sources even when torch is a CUDA
  build (fast local work). With a CPU build of torch there is nothing else.
- ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``: where nvcc lives and which GPU
  architectures to compile for. Without a visible GPU and without
  ``TORCH_CUDA_ARCH_LIST``, the build uses ``CUDA_ARCHS`` of
  ``csrc/build_flags.txt`` (7.5, 8.0 and 9.0+PTX).
- ``MAX_JOBS``: parallel compile jobs.
- ``XENT_EXT_ISAS``: comma-separated CPU ISAs to compile (default
  ``default,avx2,avx512`` on x86-64, ``default`` elsewhere).

The compiler flags are in ``csrc/build_flags.txt``, shared with CMakeLists.txt.
"""

from __future__ import annotations

import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
import torch
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"

# The compiler flags, defined once for setup.py and CMakeLists.txt, with the
# Notes that explain them (Note [Per-ISA kernels], Note [No FMA contraction
# on the CPU], Note [No FMA contraction on the GPU]).
BUILD_FLAGS_FILE = os.path.join(CSRC, "build_flags.txt")


def _read_build_flags(path: str) -> dict[str, list[str]]:
    """`KEY = words ...` lines of the flags file, as {KEY: [words]}."""
    flags = {}
    with open(os.path.join(ROOT, path)) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                flags[key.strip()] = value.split()
    return flags


BUILD_FLAGS = _read_build_flags(BUILD_FLAGS_FILE)
ISA_FLAGS = {key[len("ISA_FLAGS_"):]: value for key, value in BUILD_FLAGS.items() if key.startswith("ISA_FLAGS_")}


def _isas() -> list[str]:
    requested = os.environ.get("XENT_EXT_ISAS")
    if requested:
        isas = [s.strip().lower() for s in requested.split(",") if s.strip()]
    elif platform.machine().lower() in ("x86_64", "amd64"):
        isas = list(ISA_FLAGS)
    else:
        isas = ["default"]
    unknown = sorted(set(isas) - set(ISA_FLAGS))
    if unknown or "default" not in isas:
        raise SystemExit(f"XENT_EXT_ISAS={requested!r}: expected a list from {sorted(ISA_FLAGS)} including 'default'")
    return isas


ISAS = _isas()
OPENMP_FLAGS = BUILD_FLAGS["OPENMP_FLAGS"]
# No -std flag: BuildExtension adds the standard the installed torch needs (C++20 for torch >= 2.14).
# -g0 overrides the -g in Python's default CFLAGS: debug info made the module
# much larger and the compile slower, and wheels ship without it.
CXX_FLAGS = [*BUILD_FLAGS["CXX_FLAGS"], "-g0", *OPENMP_FLAGS]
DEFINES = [f"-DXENT_HAVE_{isa.upper()}" for isa in ISAS if isa != "default"]


# Note [When CUDA is built]
# CUDA sources are compiled whenever torch is a CUDA build (torch.version.cuda),
# GPU or not, so a .cu file that doesn't compile fails CI on a machine without
# a GPU. Only XENT_EXT_CPU_ONLY turns that off.
DEFAULT_CUDA_ARCHS = ";".join(BUILD_FLAGS["CUDA_ARCHS"])
TRUTHY = ("1", "true", "yes", "on")


def _cuda_decision() -> tuple[bool, str]:
    if os.environ.get("XENT_EXT_CPU_ONLY", "").strip().lower() in TRUTHY:
        return False, "XENT_EXT_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if cpp_extension.CUDA_HOME is None:
        raise SystemExit(
            f"xent_ext build: torch {torch.__version__} is a CUDA {torch.version.cuda} build, but no CUDA toolkit "
            "was found. Set CUDA_HOME to a CUDA toolkit of the same major version (nvcc), or set "
            "XENT_EXT_CPU_ONLY=1 to build without CUDA."
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return True, f"CUDA {torch.version.cuda} (nvcc at {cpp_extension.CUDA_HOME}), archs {os.environ.get('TORCH_CUDA_ARCH_LIST') or 'of the visible GPUs'}"


WITH_CUDA, CUDA_REASON = _cuda_decision()
NVCC_FLAGS = BUILD_FLAGS["NVCC_FLAGS"]


# Note [Build identity]
# A compiled extension works only with the torch minor (and CUDA major, C++
# ABI) it was compiled against. The build records them three ways: the
# version's local tag (0.1.0+pt214cu130, as torch tags its own wheels), the
# torch requirement (>=2.14,<2.15), and xent_ext/_build_config.py, which
# xent_ext/__init__.py checks before loading the compiled module, so a
# mismatch is a clear ImportError instead of an `undefined symbol`.
BASE_VERSION = "0.1.0"
TORCH_MAJOR, TORCH_MINOR = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
CUDA_TAG = "cu" + torch.version.cuda.replace(".", "") if WITH_CUDA else "cpu"
VERSION = f"{BASE_VERSION}+pt{TORCH_MAJOR}{TORCH_MINOR}{CUDA_TAG}"
TORCH_REQUIREMENT = f"torch>={TORCH_MAJOR}.{TORCH_MINOR},<{TORCH_MAJOR}.{TORCH_MINOR + 1}"


def _write_build_config() -> None:
    config = (
        "# Generated by setup.py (Note [Build identity]): what this build of xent_ext was compiled against.\n"
        f"VERSION = {VERSION!r}\n"
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
        f"TORCH_MAJOR_MINOR = ({TORCH_MAJOR}, {TORCH_MINOR})\n"
        f"CUDA_VERSION = {torch.version.cuda if WITH_CUDA else None!r}\n"
        f"CXX11_ABI = {bool(torch._C._GLIBCXX_USE_CXX11_ABI)!r}\n"
    )
    path = os.path.join(ROOT, "xent_ext", "_build_config.py")
    if not os.path.exists(path) or open(path).read() != config:
        with open(path, "w") as f:
            f.write(config)


_write_build_config()


class XentBuildExtension(BuildExtension):
    """BuildExtension that first compiles the per-ISA kernel files with their own flags.

    setuptools compiles every source of an extension with the same flags, so the
    per-ISA files are compiled here (in parallel) and linked in as objects.
    """

    def build_extension(self, ext) -> None:
        cxx_args = ext.extra_compile_args
        if isinstance(cxx_args, dict):
            cxx_args = cxx_args.get("cxx", [])
        sources = [os.path.join(CSRC, "cpu", f"kernel_{isa}.cpp") for isa in ISAS]

        def compile_one(isa_and_source: tuple[str, str]) -> list[str]:
            isa, source = isa_and_source
            # One output folder per ISA: with ninja, torch's compile() writes a
            # build.ninja into output_dir, so parallel calls must not share it.
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                include_dirs=ext.include_dirs,
                extra_postargs=[*cxx_args, *ISA_FLAGS[isa]],
            )

        jobs = max(1, int(os.environ.get("MAX_JOBS", os.cpu_count() or 1)))
        with ThreadPoolExecutor(max_workers=min(jobs, len(sources))) as pool:
            objects = [obj for objs in pool.map(compile_one, zip(ISAS, sources)) for obj in objs]
        ext.extra_objects = [*getattr(ext, "extra_objects", []), *objects]
        super().build_extension(ext)


def _extension():
    include_dirs = [os.path.join(ROOT, CSRC)]
    sources = [
        os.path.join(CSRC, "python_module.cpp"),
        os.path.join(CSRC, "ops.cpp"),
        os.path.join(CSRC, "cpu", "ops_cpu.cpp"),
        os.path.join(CSRC, "cpu", "kernel_dispatch.cpp"),
    ]
    print(
        f"xent_ext build: {VERSION} against torch {torch.__version__} (requires {TORCH_REQUIREMENT}); "
        f"CPU ISAs {ISAS}; OpenMP on; MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}; "
        + (f"CUDA on: {CUDA_REASON}" if WITH_CUDA else f"CUDA off: {CUDA_REASON}"),
        file=sys.stderr,
    )
    if not WITH_CUDA:
        return CppExtension(
            "xent_ext._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": [*CXX_FLAGS, *DEFINES]},
            extra_link_args=OPENMP_FLAGS,
        )
    sources += [os.path.join(CSRC, "cuda", "ops_cuda.cpp"), os.path.join(CSRC, "cuda", "kernels.cu")]
    return CUDAExtension(
        "xent_ext._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": [*CXX_FLAGS, *DEFINES, "-DXENT_WITH_CUDA"], "nvcc": NVCC_FLAGS},
        extra_link_args=OPENMP_FLAGS,
    )


setup(
    version=VERSION,
    install_requires=[TORCH_REQUIREMENT],
    ext_modules=[_extension()],
    cmdclass={"build_ext": XentBuildExtension},
)
