"""xent_ext: exact, fused cross-entropy for PyTorch.

``xent_ext.cross_entropy`` and ``xent_ext.CrossEntropyLoss`` are drop-in
replacements for :func:`torch.nn.functional.cross_entropy` and
:class:`torch.nn.CrossEntropyLoss`: same arguments, same numbers, same errors,
computed by fused C++ kernels (OpenMP + SIMD on the CPU) registered as
``torch.ops.xent_ext.*`` operators, so ``torch.compile`` sees through them.
"""

from __future__ import annotations

from . import _ops  # noqa: F401  (loads the compiled ops, registers fake kernels and autograd)
from ._C import build_info
from .functional import cross_entropy
from .modules import CrossEntropyLoss

__version__ = "0.1.0"

__all__ = ["cross_entropy", "CrossEntropyLoss", "build_info", "cpu_capability", "__version__"]


def cpu_capability() -> str:
    """The CPU ISA whose kernels are in use: ``'default'``, ``'avx2'`` or ``'avx512'``.

    It follows torch's own choice, so ``ATEN_CPU_CAPABILITY=default|avx2|avx512``
    (set before the process starts) forces a path.
    """
    from ._C import cpu_capability as _cpu_capability

    return _cpu_capability()
