"""The ``xent_ext::cross_entropy`` operator: what TorchScript calls for ``xent_ext.cross_entropy``.

Note [TorchScript]
``torch.jit.script`` compiles Python source, and the Python front of
``xent_ext.cross_entropy`` (argument checks, hand-overs, autograd wrappers)
is not TorchScript. torch's own ``CrossEntropyLoss`` scripts because its
functional ends in an operator, ``aten::cross_entropy_loss``. Ours gets one
too: ``xent_ext::cross_entropy``, registered here with the Python signature
of ``xent_ext.cross_entropy`` (same names, order and defaults), and entered in
TorchScript's table of builtins under that function. A scripted function or
module (``xent_ext.CrossEntropyLoss`` included) that calls
``xent_ext.cross_entropy`` then compiles to a call of the operator, whatever
its arguments, and ``torch.jit.save`` / ``torch.jit.load`` keep it by name.
(``torch.jit.script(xent_ext.cross_entropy)`` itself still compiles the
function's source, which is not TorchScript: script the code that calls it.)

The operator's kernel is the Python front itself, registered for
CompositeImplicitAutograd: the operator has no autograd formula of its own,
autograd records what the front calls (the fused ops and their formulas), so
the scripted loss gives the eager loss's numbers, gradients and errors. The
eager call does not go through the operator and pays nothing for it.

The keyword-only extras are in the schema as keyword-only arguments, so
scripted code passes them as it does in Python, with one exception:
``return_aux=True`` would change the operator's return type, which TorchScript
fixes when it compiles; the operator returns the loss alone and raises a clear
error for it (script the loss without it). ``inplace_backward=True`` works,
but the schema does not declare the write into ``input`` (the operator's
other calls must stay free of it), so scripted code must not read the logits
after the call, which TorchScript's optimizations could move before it.

The limit: the kernel is Python, so a saved script runs only in a Python
process that has imported ``xent_ext`` (which registers the operator) before
``torch.jit.load``; a libtorch (C++) program cannot run it.
"""

from __future__ import annotations

from typing import Callable

import torch

# The schema mirrors xent_ext.cross_entropy's signature, so that TorchScript
# can bind a call written for the Python function, keywords included.
SCHEMA = (
    "cross_entropy(Tensor input, Tensor target, Tensor? weight=None, bool? size_average=None, "
    'int ignore_index=-100, bool? reduce=None, str reduction="mean", float label_smoothing=0.0, *, '
    "float logit_scale=1.0, float? softcap=None, float z_loss=0.0, bool return_aux=False, "
    "bool inplace_backward=False) -> Tensor"
)
QUALNAME = "xent_ext::cross_entropy"

_lib = torch.library.Library("xent_ext", "FRAGMENT")


def register(cross_entropy: Callable[..., torch.Tensor]) -> None:
    """Define ``xent_ext::cross_entropy`` with ``cross_entropy`` as its kernel, and make
    TorchScript compile calls of ``cross_entropy`` to it (Note [TorchScript])."""

    def kernel(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
               reduction="mean", label_smoothing=0.0, *, logit_scale=1.0, softcap=None, z_loss=0.0,
               return_aux=False, inplace_backward=False):
        if return_aux:
            raise RuntimeError(
                "xent_ext.cross_entropy: return_aux=True is not available in TorchScript, where the operator "
                "returns the loss alone (a scripted function's return type is fixed when it compiles); call it "
                "without return_aux in scripted code"
            )
        return cross_entropy(input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing,
                             logit_scale=logit_scale, softcap=softcap, z_loss=z_loss,
                             inplace_backward=inplace_backward)

    _lib.define(SCHEMA)
    _lib.impl("cross_entropy", kernel, "CompositeImplicitAutograd")
    # TorchScript's table of builtins: Python function -> operator. Private to
    # torch.jit, so a torch without it leaves the operator callable as
    # torch.ops.xent_ext.cross_entropy, and scripting fails as it did before.
    from torch.jit import _builtins

    register_builtin = getattr(_builtins, "_register_builtin", None)
    if register_builtin is not None:
        register_builtin(cross_entropy, QUALNAME)
