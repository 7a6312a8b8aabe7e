"""xent_ext: exact, fused cross-entropy for PyTorch.

``xent_ext.cross_entropy`` and ``xent_ext.CrossEntropyLoss`` are drop-in
replacements for :func:`torch.nn.functional.cross_entropy` and
:class:`torch.nn.CrossEntropyLoss`: same arguments, same numbers, same errors,
computed by fused C++ kernels (OpenMP + SIMD on the CPU) registered as
``torch.ops.xent_ext.*`` operators, so ``torch.compile`` sees through them.
``xent_ext.patch()`` (or ``with xent_ext.patched():``) routes torch's own
``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss`` through
them, for code that calls torch's (a Hugging Face ``Trainer``, for one);
``xent_ext.unpatch()`` puts torch's back.
"""

from __future__ import annotations

import os as _os

from . import _ops  # noqa: F401  (loads the compiled ops, registers their autograd)
from ._C import build_info
from ._C import cuda_target_check as _cuda_target_check
from ._C import set_cuda_target_check as _set_cuda_target_check
from ._extras import CrossEntropyAux
from .functional import cross_entropy
from .modules import CrossEntropyLoss
from .linear import LinearCrossEntropyLoss, linear_cross_entropy
from . import functional as _functional

_functional.linear_cross_entropy = linear_cross_entropy  # as torch.nn.functional has it (the patch routes by name)
from ._patch import patch, patched, unpatch

from ._compat import build_identity as _build_identity

# With the local tag of the torch/CUDA it was built for, e.g. "0.1.0+pt214cu130".
__version__ = _build_identity().version if _build_identity() is not None else "0.1.0"

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "CrossEntropyAux",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "patch",
    "unpatch",
    "patched",
    "build_info",
    "cpu_capability",
    "cuda_target_check",
    "set_cuda_target_check",
    "__version__",
]


def __getattr__(name: str):
    # xent_ext.distributed on first use: importing xent_ext does not import torch.distributed.
    if name == "distributed":
        import importlib

        return importlib.import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def cpu_capability() -> str:
    """The CPU ISA whose kernels are in use: ``'default'``, ``'avx2'`` or ``'avx512'``.

    It follows torch's own choice, so ``ATEN_CPU_CAPABILITY=default|avx2|avx512``
    (set before the process starts) forces a path.
    """
    from ._C import cpu_capability as _cpu_capability

    return _cpu_capability()


def set_cuda_target_check(enabled: bool) -> bool:
    """Turn the CUDA forward's class-index check on or off; returns the previous setting.

    A class index outside ``[0, C)`` (and not ``ignore_index``) never fires a
    device-side assert in xent_ext (torch's does, and it leaves the process's
    CUDA context unusable). The kernels record the first bad row on the device
    and compute NaN for it (loss, and so 'mean'/'sum', and its gradient). With
    the check on (the default), the forward then syncs with the host once and
    raises torch's ``IndexError("Target 7 is out of bounds.")``. Turning it off
    removes that sync, so the forward never waits for the GPU; bad targets then
    show up only as NaN. While a CUDA graph is being captured the check is
    always skipped (a sync is illegal there). ``XENT_EXT_CUDA_TARGET_CHECK=0``
    in the environment turns it off at import. CPU calls always check.
    """
    return bool(_set_cuda_target_check(bool(enabled)))


def cuda_target_check() -> bool:
    """Whether the CUDA forward checks class indices (see :func:`set_cuda_target_check`)."""
    return bool(_cuda_target_check())


def _warn_if_cuda_kernels_missing() -> None:
    from ._compat import cpu_only_build_on_gpu_warning

    message = cpu_only_build_on_gpu_warning(build_info()["cuda_version"])
    if message is not None:
        import warnings

        warnings.warn(message, UserWarning, stacklevel=3)


_warn_if_cuda_kernels_missing()

if _os.environ.get("XENT_EXT_CUDA_TARGET_CHECK", "").strip().lower() in ("0", "false", "no", "off"):
    set_cuda_target_check(False)
