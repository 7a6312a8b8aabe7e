"""``xent_ext.CrossEntropyLoss``: :class:`torch.nn.CrossEntropyLoss` computed by the fused kernels."""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import cross_entropy

__all__ = ["CrossEntropyLoss"]


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""Drop-in for :class:`torch.nn.CrossEntropyLoss`, backed by :func:`xent_ext.cross_entropy`.

    It *is* a ``torch.nn.CrossEntropyLoss`` (a subclass): the same constructor
    ``(weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction='mean', label_smoothing=0.0)``, ``weight`` registered as a buffer
    (in ``state_dict()`` when given, moved by ``.to()``), the same attributes
    ``ignore_index``, ``reduction`` and ``label_smoothing``, and, as in torch,
    invalid values are accepted by the constructor and rejected by
    ``forward``. Only the computation differs.

    ``torch.jit.script`` works on it (and on models holding it): the scripted
    ``forward`` calls the operator ``xent_ext::cross_entropy``, whose kernel is
    :func:`xent_ext.cross_entropy`, where torch's calls ``aten::cross_entropy_loss``.
    A saved script needs ``import xent_ext`` before ``torch.jit.load``.

    Example::

        >>> criterion = xent_ext.CrossEntropyLoss(label_smoothing=0.1)
        >>> loss = criterion(torch.randn(4, 10), torch.randint(10, (4,)))
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
        )
