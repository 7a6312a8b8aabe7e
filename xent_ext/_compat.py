"""Checks, before the compiled module loads, that it was built for the running torch.

A compiled torch extension only works with the torch minor version, CUDA major
version and C++ ABI it was compiled against (Note [Build identity] in
setup.py). Loading it into another torch fails with an ``undefined symbol``
or a missing ``libc10_cuda.so`` that says nothing about the cause; this module
turns that into an ImportError that names what was expected, what was found,
and what to install.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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


def _local_tag(major_minor: tuple[int, int], cuda_version: Optional[str]) -> str:
    cuda = "cu" + cuda_version.replace(".", "") if cuda_version else "cpu"
    return f"pt{major_minor[0]}{major_minor[1]}{cuda}"


def mismatch(build: BuildIdentity, running: RunningTorch) -> Optional[str]:
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
    base = build.version.split("+")[0]
    want_tag = _local_tag(running.major_minor, running.cuda_version)
    return (
        f"xent_ext {build.version} was built for {_describe_build(build)}, but it is being imported "
        f"with {_describe_torch(running)}: " + "; ".join(problems) + ".\n"
        f"Install the xent_ext build made for your torch (version {base}+{want_tag}), or rebuild it "
        f"against your torch from source: pip install --no-build-isolation --force-reinstall --no-deps "
        f"<path to the xent_ext source>; or install the torch this build was made for: "
        f"pip install 'torch=={build.torch_major_minor[0]}.{build.torch_major_minor[1]}.*'"
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


def load_compiled_module():
    """Import xent_ext._C after the check, explaining a failure to load it."""
    check()
    try:
        from . import _C
    except ImportError as e:
        build = build_identity()
        built_for = f" (built for {_describe_build(build)})" if build else ""
        raise ImportError(
            f"xent_ext's compiled module could not be loaded{built_for} into "
            f"{_describe_torch(running_torch())}: {e}. If xent_ext was installed from source, rebuild it "
            f"against this torch: pip install --no-build-isolation --force-reinstall --no-deps <path to the "
            f"xent_ext source>."
        ) from e
    return _C
