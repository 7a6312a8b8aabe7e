"""Build script for xent_ext's compiled core (``xent_ext._C``).

Build with ``pip install --no-build-isolation .`` (torch must already be
installed: the extension is compiled against it). Environment variables:

- ``XENT_EXT_CPU_ONLY=1``: skip the CUDA sources even when torch is a CUDA
  build (fast local work). With a CPU build of torch there is nothing else;
  with a CUDA build of torch but no usable CUDA toolkit, the build says why
  and builds the CPU kernels only (Note [When CUDA is built]).
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
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup

# Note [No build isolation]
# The extension is compiled against the torch of the environment it installs
# into, and works only with that torch minor (Note [Build identity]). pip's
# default build isolation hides that torch; pyproject.toml therefore does not
# ask for torch as a build requirement (pip would fetch the newest one, a
# 5 GB CUDA build, compile against it, and then replace the user's torch to
# satisfy the wheel's pin). Here an isolated build stops at once and says
# what to run instead.
try:
    import torch
except ImportError:
    raise SystemExit(
        "xent_ext build: torch is not importable here. xent_ext is compiled against the torch of the "
        "environment it installs into, and pip's build isolation hides that torch. Build without isolation, "
        "with torch installed first:\n"
        "    pip install torch ninja setuptools wheel     (those not installed yet)\n"
        "    pip install --no-build-isolation .           (or: pip install --no-build-isolation -e . to develop)"
    ) from None
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
# Note [Quiet AVX512 intrinsics] (csrc/build_flags.txt); GCC flags, as the -m flags above are.
ISA_WARNING_FLAGS = {isa: BUILD_FLAGS.get(f"ISA_WARNING_FLAGS_{isa}", []) for isa in ISA_FLAGS}


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
    return [isa for isa in ISA_FLAGS if isa in isas]  # lowest ISA first: Note [Link the lowest ISA first]


ISAS = _isas()
OPENMP_FLAGS = BUILD_FLAGS["OPENMP_FLAGS"]
# No -std flag: BuildExtension adds the standard the installed torch needs (C++20 for torch >= 2.14).
# -g0 overrides the -g in Python's default CFLAGS: debug info made the module
# much larger and the compile slower, and wheels ship without it.
CXX_FLAGS = [*BUILD_FLAGS["CXX_FLAGS"], "-g0", *OPENMP_FLAGS]
DEFINES = [f"-DXENT_HAVE_{isa.upper()}" for isa in ISAS if isa != "default"]


# Note [When CUDA is built]
# CUDA sources are compiled whenever torch is a CUDA build (torch.version.cuda)
# and the CUDA toolkit torch would use (cpp_extension.CUDA_HOME) can compile
# them: GPU or not, so a .cu file that doesn't compile fails CI on a machine
# without a GPU. CUDA is an optional part: a CUDA build of torch (pip's default
# on Linux) without a usable toolkit -- no nvcc, no CUDA headers, or an nvcc of
# another CUDA major than torch's -- builds the CPU kernels only and says why
# and how to get the CUDA ones, instead of failing minutes into the compile.
# XENT_EXT_CPU_ONLY=1 turns CUDA off explicitly.
DEFAULT_CUDA_ARCHS = ";".join(BUILD_FLAGS["CUDA_ARCHS"])
TRUTHY = ("1", "true", "yes", "on")


def _nvcc_release(nvcc: str) -> str | None:
    """The CUDA release nvcc reports ("13.0"), or None if it does not run or say."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return f"{match.group(1)}.{match.group(2)}" if match else None


def _cuda_toolkit_problem(home: str | None, want_major: str) -> str | None:
    """Why the toolkit at `home` cannot build torch's CUDA kernels, or None if it can."""
    if home is None:
        return "no CUDA toolkit was found (CUDA_HOME is unset and there is no nvcc on the PATH)"
    nvcc = os.path.join(home, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    if not os.path.isfile(nvcc):
        return f"{home} has no bin/{os.path.basename(nvcc)}"
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
        return f"{home} has no include/cuda_runtime_api.h"
    release = _nvcc_release(nvcc)
    if release is None:
        return f"`{nvcc} --version` names no CUDA release"
    if release.split(".")[0] != want_major:
        return f"{nvcc} is CUDA {release}"
    return None


def _cuda_decision() -> tuple[bool, str]:
    if os.environ.get("XENT_EXT_CPU_ONLY", "").strip().lower() in TRUTHY:
        return False, "XENT_EXT_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    want_major = torch.version.cuda.split(".")[0]
    problem = _cuda_toolkit_problem(cpp_extension.CUDA_HOME, want_major)
    if problem is not None:
        # torch guesses CUDA_HOME from an nvcc on the PATH before trying the usual
        # install folder, so a wrapper script can hide a working toolkit there.
        usual = "/usr/local/cuda"
        if os.name != "nt" and usual != cpp_extension.CUDA_HOME and _cuda_toolkit_problem(usual, want_major) is None:
            fix = f"set CUDA_HOME={usual}"
        else:
            fix = f"set CUDA_HOME to a CUDA {want_major}.x toolkit"
        return False, f"torch {torch.__version__} is a CUDA {torch.version.cuda} build, but {problem}; {fix} to build the CUDA kernels"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    return True, f"CUDA {torch.version.cuda}, nvcc at {cpp_extension.CUDA_HOME}"


WITH_CUDA, CUDA_REASON = _cuda_decision()
NVCC_FLAGS = BUILD_FLAGS["NVCC_FLAGS"]


# Note [Build identity]
# A compiled extension works only with the torch minor (and CUDA major, C++
# ABI) it was compiled against. The build records them three ways: the
# version's local tag (0.1.0+pt214cu130, as torch tags its own wheels), the
# torch requirement, and _build_config.py beside the compiled module, which
# xent_ext/__init__.py checks before loading it, so a mismatch is a clear
# ImportError instead of an `undefined symbol`. A release wheel
# (XENT_EXT_RELEASE_WHEEL=1, as scripts/ci/build_wheel.sh builds them)
# requires the torch minor (torch>=2.14,<2.15), so pip never pairs it with
# another; a build from source requires exactly the torch it was compiled
# against (torch==2.14.1), so nothing that pip does later swaps that torch
# from under it unnoticed. The config is written next to the compiled module
# (the build folder, or the source tree only for an in-place build, where
# the module goes too), never into the sources otherwise.
BASE_VERSION = "0.1.0"
TORCH_MAJOR, TORCH_MINOR = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
CUDA_TAG = "cu" + torch.version.cuda.replace(".", "") if WITH_CUDA else "cpu"
VERSION = f"{BASE_VERSION}+pt{TORCH_MAJOR}{TORCH_MINOR}{CUDA_TAG}"
TORCH_VERSION = torch.__version__.split("+")[0]
RELEASE_WHEEL = os.environ.get("XENT_EXT_RELEASE_WHEEL", "").strip().lower() in ("1", "true", "yes", "on")
TORCH_REQUIREMENT = (
    f"torch>={TORCH_MAJOR}.{TORCH_MINOR},<{TORCH_MAJOR}.{TORCH_MINOR + 1}" if RELEASE_WHEEL else f"torch=={TORCH_VERSION}"
)


def _write_build_config(package_dir: str) -> None:
    config = (
        "# Generated by setup.py (Note [Build identity]): what this build of xent_ext was compiled against.\n"
        f"VERSION = {VERSION!r}\n"
        f"TORCH_VERSION = {TORCH_VERSION!r}\n"
        f"TORCH_MAJOR_MINOR = ({TORCH_MAJOR}, {TORCH_MINOR})\n"
        f"CUDA_VERSION = {torch.version.cuda if WITH_CUDA else None!r}\n"
        f"CXX11_ABI = {bool(torch._C._GLIBCXX_USE_CXX11_ABI)!r}\n"
    )
    os.makedirs(package_dir, exist_ok=True)
    path = os.path.join(package_dir, "_build_config.py")
    if not os.path.exists(path) or open(path).read() != config:
        with open(path, "w") as f:
            f.write(config)


def _torch_includes_as_system(ext) -> None:
    """Move torch's include directories from -I to -isystem (Note [Torch headers are system headers])."""
    torch_include = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "include")
    is_torch = [os.path.abspath(d).startswith(torch_include) for d in ext.include_dirs]
    system = [flag for d, t in zip(ext.include_dirs, is_torch) if t for flag in ("-isystem", d)]
    ext.include_dirs = [d for d, t in zip(ext.include_dirs, is_torch) if not t]
    for args in ext.extra_compile_args.values():
        args.extend(system)


class XentBuildExtension(BuildExtension):
    """BuildExtension that compiles the C++ sources in one pool, each per-ISA kernel with its own flags.

    Note [One compile pool]
    setuptools compiles every source of an extension with the same flags, so
    the per-ISA kernel files (Note [Per-ISA kernels], csrc/build_flags.txt) are
    compiled here and linked in as objects. The other C++ sources join them in
    the same pool of MAX_JOBS workers, the slowest (the kernels) first: left to
    torch's ninja build, they would start only after the last kernel, with the
    other cores idle while it compiles. The smallest source (torch's build
    needs one) and the CUDA sources (nvcc) stay with torch's build, which then
    links everything.
    """

    def build_extension(self, ext) -> None:
        # Beside the compiled module: the build folder, or the source tree for
        # an in-place (or editable) build (Note [Build identity]).
        _write_build_config(os.path.dirname(self.get_ext_fullpath(ext.name)))
        _torch_includes_as_system(ext)
        cxx_args = ext.extra_compile_args["cxx"]
        kernels = [(os.path.join(CSRC, "cpu", f"kernel_{isa}.cpp"), [*ISA_FLAGS[isa], *ISA_WARNING_FLAGS[isa]])
                   for isa in reversed(ISAS)]  # avx512 first: the slowest
        pooled = [source for source in ext.sources if source.endswith(".cpp") and source != LEFT_TO_TORCH_BUILD]
        jobs = [*kernels, *[(source, []) for source in pooled]]

        def compile_one(job: tuple[str, list[str]]) -> list[str]:
            source, flags = job
            # One output folder per source: with ninja, torch's compile() writes
            # a build.ninja into output_dir, so parallel calls must not share it.
            name = os.path.splitext(os.path.relpath(source, CSRC))[0].replace(os.sep, "_")
            return self.compiler.compile(
                [source],
                output_dir=os.path.join(self.build_temp, "pool", name),
                include_dirs=ext.include_dirs,
                extra_postargs=[*cxx_args, *flags],
            )

        with ThreadPoolExecutor(max_workers=min(JOBS, len(jobs))) as pool:
            compiled = dict(zip((source for source, _ in jobs), pool.map(compile_one, jobs)))
        # Note [Link the lowest ISA first] (csrc/build_flags.txt): the baseline
        # objects, then the kernels from the lowest ISA up.
        link_order = [*pooled, *reversed([source for source, _ in kernels])]
        objects = [obj for source in link_order for obj in compiled[source]]
        ext.sources = [source for source in ext.sources if source not in pooled]
        ext.extra_objects = [*getattr(ext, "extra_objects", []), *objects]
        super().build_extension(ext)

    def copy_extensions_to_source(self) -> None:
        # An in-place or editable build: the compiled module goes into the
        # source tree, and its build identity with it.
        super().copy_extensions_to_source()
        _write_build_config(os.path.join(ROOT, "xent_ext"))


# The parallel compile jobs: MAX_JOBS, as torch's ninja build reads it, else one per core.
JOBS = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))


def _print_decisions() -> None:
    """The build's decisions, first in the log (pip shows it with -v, or when the build fails)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "those of the visible GPUs"
    lines = [
        "xent_ext build",
        f"  version  {VERSION} (requires {TORCH_REQUIREMENT})",
        f"  torch    {torch.__version__} at {os.path.dirname(torch.__file__)}",
        f"  CUDA     on: {CUDA_REASON}; archs {archs}" if WITH_CUDA else f"  CUDA     off: {CUDA_REASON}",
        f"  CPU ISAs {', '.join(ISAS)}" + ("" if os.environ.get("XENT_EXT_ISAS") else " (XENT_EXT_ISAS chooses)"),
        f"  OpenMP   on ({' '.join(OPENMP_FLAGS)})",
        f"  jobs     {JOBS}" + (" (MAX_JOBS)" if os.environ.get("MAX_JOBS") else " (one per core; MAX_JOBS chooses)"),
    ]
    print("\n".join(lines), file=sys.stderr, flush=True)


_print_decisions()


# The one C++ source compiled by torch's build rather than the pool (Note [One
# compile pool]): the smallest.
LEFT_TO_TORCH_BUILD = os.path.join(CSRC, "cpu", "kernel_dispatch.cpp")


def _extension():
    include_dirs = [os.path.join(ROOT, CSRC)]
    sources = [
        os.path.join(CSRC, "python_module.cpp"),
        os.path.join(CSRC, "ops.cpp"),
        os.path.join(CSRC, "cpu", "ops_cpu.cpp"),
        LEFT_TO_TORCH_BUILD,
    ]
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
        extra_compile_args={"cxx": [*CXX_FLAGS, *DEFINES, "-DXENT_WITH_CUDA"], "nvcc": list(NVCC_FLAGS)},
        extra_link_args=OPENMP_FLAGS,
    )


setup(
    version=VERSION,
    install_requires=[TORCH_REQUIREMENT],
    ext_modules=[_extension()],
    cmdclass={"build_ext": XentBuildExtension},
)
