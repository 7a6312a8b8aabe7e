"""Checks, before the compiled module loads, that there is one and that it was built for the running torch.

A compiled torch extension only works with the torch minor version, CUDA major
version and C++ ABI it was compiled against (Note [Build identity] in
setup.py). Loading it into another torch fails with an ``undefined symbol``
or a missing ``libc10_cuda.so`` that says nothing about the cause; this module
turns that into an ImportError that names what was expected, what was found,
and what to do. A package folder without a compiled module at all (most often
the source tree, which shadows the installed package when Python runs from
the clone's root) gets its own ImportError that says so.
"""

from __future__ import annotations

import importlib.machinery
import os
from dataclasses import dataclass
from typing import Optional

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class BuildIdentity:
    """What a build of xent_ext was compiled against (from ``_build_config.py``)."""

    version: str
    torch_version: str
    torch_major_minor: tuple[int, int]
    cuda_version: Optional[str]
    cxx11_abi: bool


@dataclass(frozen=True)
class RunningTorch:
    """The torch that is importing xent_ext."""

    version: str
    cuda_version: Optional[str]
    cxx11_abi: bool

    @property
    def major_minor(self) -> tuple[int, int]:
        major, minor = self.version.split("+")[0].split(".")[:2]
        return int(major), int(minor)


def _describe_build(build: BuildIdentity) -> str:
    cuda = f"CUDA {build.cuda_version}" if build.cuda_version else "CPU only"
    return f"torch {build.torch_major_minor[0]}.{build.torch_major_minor[1]} ({cuda})"


def _describe_torch(running: RunningTorch) -> str:
    cuda = f"CUDA {running.cuda_version}" if running.cuda_version else "a CPU build"
    return f"torch {running.version} ({cuda})"


def _source_tree(package_dir: str) -> Optional[str]:
    """The source tree (the folder with setup.py) that `package_dir` is part of, or None."""
    root = os.path.dirname(package_dir)
    return root if os.path.isfile(os.path.join(root, "setup.py")) else None


def rebuild_command(package_dir: str = PACKAGE_DIR) -> str:
    """The command that builds and installs xent_ext from source against the running torch."""
    source = _source_tree(package_dir) or "<path to a clone of xent_ext>"
    return f"pip install --no-build-isolation --force-reinstall --no-deps {source}"


def missing_compiled_module(package_dir: str = PACKAGE_DIR) -> Optional[str]:
    """Why `package_dir` cannot be imported for lack of a compiled module (_C*.so), or None if it has one."""
    names = os.listdir(package_dir)
    if any(name.startswith("_C.") and name[2:] in importlib.machinery.EXTENSION_SUFFIXES for name in names):
        return None
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    source = _source_tree(package_dir)
    if source is None:
        return (
            f"xent_ext was imported from {package_dir}, which has no compiled module (_C{suffix}): the "
            f"installation is incomplete. Reinstall xent_ext from source: {rebuild_command(package_dir)}"
        )
    return (
        f"xent_ext was imported from {package_dir}, a source folder with no compiled module (_C{suffix}). "
        f"If you installed xent_ext, this folder is shadowing it (Python imports from the current folder "
        f"first): run from another folder. To use this folder itself, build it in place: "
        f"python setup.py build_ext --inplace (in {source}), or pip install --no-build-isolation -e {source}."
    )


def mismatch(build: BuildIdentity, running: RunningTorch, package_dir: str = PACKAGE_DIR) -> Optional[str]:
    """Why this build cannot load into the running torch, or None if it can.

    A CPU-only build loads into a CUDA torch of the same minor (it uses no
    CUDA library); a CUDA build needs a CUDA torch of the same CUDA major.
    """
    problems = []
    if running.major_minor != build.torch_major_minor:
        problems.append(
            f"torch {build.torch_major_minor[0]}.{build.torch_major_minor[1]} was expected, "
            f"torch {running.version} was found"
        )
    if build.cuda_version is not None:
        if running.cuda_version is None:
            problems.append(f"a CUDA {build.cuda_version} build of torch was expected, a CPU build was found")
        elif running.cuda_version.split(".")[0] != build.cuda_version.split(".")[0]:
            problems.append(
                f"CUDA {build.cuda_version.split('.')[0]}.x was expected, torch uses CUDA {running.cuda_version}"
            )
    if running.cxx11_abi != build.cxx11_abi:
        problems.append(
            f"the C++11 ABI (_GLIBCXX_USE_CXX11_ABI={int(build.cxx11_abi)}) was expected, "
            f"torch uses _GLIBCXX_USE_CXX11_ABI={int(running.cxx11_abi)}"
        )
    if not problems:
        return None
    # Only commands that work: a rebuild from source, or the torch this build was made
    # for (xent_ext builds for other torch versions are not published anywhere).
    return (
        f"xent_ext {build.version} was built for {_describe_build(build)}, but it is being imported "
        f"with {_describe_torch(running)}: " + "; ".join(problems) + ".\n"
        f"Rebuild xent_ext against your torch: {rebuild_command(package_dir)}; or install the torch this "
        f"build was made for: pip install 'torch=={build.torch_major_minor[0]}.{build.torch_major_minor[1]}.*'"
        + (f" (a CUDA {build.cuda_version} build)" if build.cuda_version else "")
        + "."
    )


def build_identity() -> Optional[BuildIdentity]:
    """This build's identity, or None in a source tree that was never built."""
    try:
        from . import _build_config as c
    except ImportError:
        return None
    return BuildIdentity(c.VERSION, c.TORCH_VERSION, tuple(c.TORCH_MAJOR_MINOR), c.CUDA_VERSION, bool(c.CXX11_ABI))


def running_torch() -> RunningTorch:
    import torch

    return RunningTorch(torch.__version__, torch.version.cuda, bool(torch._C._GLIBCXX_USE_CXX11_ABI))


def check() -> None:
    """Raise ImportError if this build of xent_ext does not match the running torch."""
    build = build_identity()
    if build is None:
        return
    problem = mismatch(build, running_torch())
    if problem is not None:
        raise ImportError(problem)


def cpu_only_build_on_gpu_warning(build_cuda_version: Optional[str]) -> Optional[str]:
    """The warning for a build without CUDA kernels in a process that has a GPU, or None.

    Such a build is valid (Note [When CUDA is built] in setup.py: a CUDA torch
    without a usable CUDA toolkit builds the CPU kernels only), and CUDA tensors
    then go to torch's own cross_entropy (Note [Handing over to torch]); the
    warning says so, since the user likely expected the fused CUDA kernels.
    """
    import torch

    # device_count, not is_available: with NVML it asks without initialising CUDA,
    # so importing xent_ext does not make a later fork unable to use the GPU.
    if build_cuda_version is not None or torch.version.cuda is None or torch.cuda.device_count() == 0:
        return None
    return (
        f"xent_ext was built without its CUDA kernels (a CPU-only build) and a GPU is visible: "
        f"cross_entropy on CUDA tensors runs torch's own implementation. To build the CUDA kernels, "
        f"install a CUDA {torch.version.cuda.split('.')[0]}.x toolkit and rebuild with CUDA_HOME set to it: "
        f"{rebuild_command()}"
    )


def load_compiled_module():
    """Import xent_ext._C after the checks, explaining a failure to load it."""
    missing = missing_compiled_module()
    if missing is not None:
        raise ImportError(missing)
    check()
    try:
        from . import _C
    except ImportError as e:
        build = build_identity()
        built_for = f" (built for {_describe_build(build)})" if build else ""
        raise ImportError(
            f"xent_ext's compiled module could not be loaded{built_for} into "
            f"{_describe_torch(running_torch())}: {e}. Rebuild xent_ext against this torch: "
            f"{rebuild_command()}."
        ) from e
    return _C
