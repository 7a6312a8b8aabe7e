"""``xent_ext.CrossEntropyLoss``: :class:`torch.nn.CrossEntropyLoss` computed by the fused kernels."""

from typing import Optional

import torch
from torch import Tensor

from . import _extras
from .functional import cross_entropy

__all__ = ["CrossEntropyLoss"]

# The extras and their defaults (xent_ext.cross_entropy's).
_EXTRAS = {"logit_scale": 1.0, "softcap": None, "z_loss": 0.0, "return_aux": False, "inplace_backward": False}


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    r"""Drop-in for :class:`torch.nn.CrossEntropyLoss`, backed by :func:`xent_ext.cross_entropy`.

    It *is* a ``torch.nn.CrossEntropyLoss`` (a subclass): the same constructor
    ``(weight=None, size_average=None, ignore_index=-100, reduce=None,
    reduction='mean', label_smoothing=0.0)``, ``weight`` registered as a buffer
    (in ``state_dict()`` when given, moved by ``.to()``), the same attributes
    ``ignore_index``, ``reduction`` and ``label_smoothing``, and, as in torch,
    invalid values are accepted by the constructor and rejected by
    ``forward``. Only the computation differs.

    The keyword-only extras of :func:`xent_ext.cross_entropy` (``logit_scale``,
    ``softcap``, ``z_loss``, ``return_aux``, ``inplace_backward``) are
    constructor arguments too, kept as attributes of the same names and shown
    by ``repr`` when set. Unlike torch's own arguments they are checked by the
    constructor (ValueError / TypeError), since torch has no convention for
    them. With ``return_aux=True``, ``forward`` returns ``(loss, aux)``.

    ``torch.jit.script`` works on it (and on models holding it): the scripted
    ``forward`` calls the operator ``xent_ext::cross_entropy``, whose kernel is
    :func:`xent_ext.cross_entropy`, where torch's calls ``aten::cross_entropy_loss``.
    A saved script needs ``import xent_ext`` before ``torch.jit.load``. A
    scripted module returns one tensor, so ``return_aux=True`` raises there.
    The extras may be changed after construction, as torch's own attributes.

    Example::

        >>> criterion = xent_ext.CrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)
        >>> loss = criterion(torch.randn(4, 10), torch.randint(10, (4,)))
    """

    logit_scale: float
    softcap: Optional[float]
    z_loss: float
    return_aux: bool
    inplace_backward: bool
    _plain: bool

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        logit_scale: float = 1.0,
        softcap: Optional[float] = None,
        z_loss: float = 0.0,
        return_aux: bool = False,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        ex = _extras.parse(logit_scale, softcap, z_loss, return_aux, inplace_backward)
        self.logit_scale = ex.logit_scale
        self.softcap = ex.softcap
        self.z_loss = ex.z_loss
        self.return_aux = ex.return_aux
        self.inplace_backward = ex.inplace_backward

    def extra_repr(self) -> str:
        parts = [super().extra_repr()] if super().extra_repr() else []
        parts += [f"{name}={getattr(self, name)}" for name, default in _EXTRAS.items()
                  if getattr(self, name) != default]
        return ", ".join(parts)

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in _EXTRAS:
            self._update_plain()

    def __setstate__(self, state: dict) -> None:
        # A module pickled before the extras existed gets their defaults.
        super().__setstate__(state)
        for name, default in _EXTRAS.items():
            self.__dict__.setdefault(name, default)
        self._update_plain()

    def _update_plain(self) -> None:
        # Whether every extra is at its default, kept up to date so that forward
        # tests one attribute (Note [Extras on the hot path], functional.py).
        d = self.__dict__
        d["_plain"] = all(d.get(name, default) == default for name, default in _EXTRAS.items())

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        # The result of cross_entropy: (loss, aux) with return_aux in Python; in
        # TorchScript (which compiles only the last call) the operator returns the
        # loss and raises for return_aux.
        if not torch.jit.is_scripting():
            if self._plain:
                return cross_entropy(
                    input,
                    target,
                    weight=self.weight,
                    ignore_index=self.ignore_index,
                    reduction=self.reduction,
                    label_smoothing=self.label_smoothing,
                )
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            return_aux=self.return_aux,
            inplace_backward=self.inplace_backward,
        )
