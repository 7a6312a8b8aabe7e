"""``xent_ext.patch()``: route torch's own cross-entropy through xent_ext, process-wide.

After :func:`patch`, every call of ``torch.nn.functional.cross_entropy``
(looked up as ``torch.nn.functional.cross_entropy``, ``F.cross_entropy`` or
``nn.functional.cross_entropy`` at call time) and every
``torch.nn.CrossEntropyLoss``, made before or after the call, computes with
:func:`xent_ext.cross_entropy`. :func:`unpatch` puts back the very objects it
replaced (``torch.nn.functional.cross_entropy is original`` again).

Hugging Face: the causal-LM loss of ``transformers`` (``ForCausalLMLoss`` in
``transformers/loss/loss_utils.py``) and the ``CrossEntropyLoss`` its other
heads build both call ``nn.functional.cross_entropy`` at call time, so one line
before building the ``Trainer`` makes a training run use xent_ext::

    import xent_ext; xent_ext.patch()

What is and is not routed
-------------------------
Each entry of ``_ROUTES`` swaps one attribute of a torch module for a
forwarder that calls the xent_ext function of the same name. The
``torch.nn`` loss modules follow without being touched:
``torch.nn.CrossEntropyLoss.forward`` reads ``F.cross_entropy`` through
``torch.nn.modules.loss.F``, which is the ``torch.nn.functional`` module
itself, at every call (so instances made before :func:`patch` are routed too,
and ``isinstance`` checks and pickles see torch's class as before). A reference
taken before :func:`patch` (``from torch.nn.functional import cross_entropy``)
still holds torch's function: it can't be reached.

Semantics of the switch
-----------------------
- :func:`patch` is idempotent: patching twice and unpatching once restores
  torch's functions. Calls don't nest or count.
- :func:`patched` is a context manager that restores the state it found:
  unpatched on exit when it found torch's functions, still patched when it was
  entered under :func:`patch`. Blocks nest, also across threads: the state
  found by the first of the overlapping blocks is restored when the last one
  exits.
- The patch is process-wide, not per thread: other threads see it while it is
  on. The swap itself holds a lock, so concurrent patch/unpatch calls never
  leave torch half-patched or lose the originals.
- :func:`unpatch` restores an attribute only where it still holds xent_ext's
  forwarder; if something else was assigned there after :func:`patch`, that
  assignment is kept and a ``RuntimeWarning`` says so.

No recursion: xent_ext hands the inputs it does not compute itself to torch's
C++ entry point (``torch._C._nn.cross_entropy_loss``), never to
``torch.nn.functional.cross_entropy``.

TorchScript: scripting code that calls the patched function (torch's own
``CrossEntropyLoss`` included) compiles the function the patch replaced, so a
scripted module is the same with or without the patch (and loads without
xent_ext); only eager calls and ``torch.compile`` are routed. Note [Scripting
a patched function], Note [torch.compile of a patched function].
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch._jit_internal as _jit_internal

from . import functional as _functional

__all__ = ["patch", "unpatch", "patched"]


class _Route(NamedTuple):
    """One torch function that :func:`patch` routes through xent_ext."""

    module: str  # the torch module whose attribute is swapped
    name: str  # the attribute, and the name of xent_ext's replacement in xent_ext.functional
    # The torch.nn module classes whose forward calls the attribute through
    # the module at call time, and so follow the swap (for the docs and tests).
    followed_by: tuple[str, ...]


# Adding a function is one entry: e.g. ("torch.nn.functional",
# "linear_cross_entropy", ("torch.nn.LinearCrossEntropyLoss",)) once
# xent_ext.functional.linear_cross_entropy exists. An entry whose torch
# attribute is missing (an older torch) is skipped.
_ROUTES: tuple[_Route, ...] = (
    _Route("torch.nn.functional", "cross_entropy", ("torch.nn.CrossEntropyLoss",)),
    _Route("torch.nn.functional", "linear_cross_entropy", ("torch.nn.LinearCrossEntropyLoss",)),
)

_lock = threading.Lock()
# (module object, attribute) -> (the object patch() replaced, the forwarder it installed)
_saved: dict[tuple[Any, str], tuple[Any, Callable[..., Any]]] = {}
_open_blocks = 0  # patched() blocks now inside, over all threads
_found_patched = False  # the state the first of the open blocks found


def _make_forwarder(name: str) -> Callable[..., Any]:
    """A function that calls ``xent_ext.functional.<name>``, looked up at each call.

    A separate object (not xent_ext's function itself), so that torch's
    attribute can be told apart from a caller's own assignment, and so that
    TorchScript can be pointed at the original for it alone (Note [Scripting a
    patched function]). It carries the signature and docstring of xent_ext's
    function (``inspect.signature`` and ``help`` show them).
    """
    target = getattr(_functional, name)

    @functools.wraps(target)
    def forwarder(*args: Any, **kwargs: Any) -> Any:
        return getattr(_functional, name)(*args, **kwargs)

    return forwarder


# Note [Scripting a patched function]
# TorchScript compiles a Python function it meets in scripted code from its
# source, unless the function is in its table of builtins (function ->
# operator). xent_ext.cross_entropy is there, as xent_ext::cross_entropy
# (Note [TorchScript], _torchscript.py); the forwarder is entered under the same
# operator, so scripting torch.nn.CrossEntropyLoss while patched compiles to
# xent_ext's operator, as its eager calls use xent_ext. The table is keyed by
# id(), so every forwarder ever entered is kept alive (a few per process): a
# later object at a freed address must not inherit the entry. A function
# without an operator would fail to script from its source; for those the
# forwarder is entered in torch._jit_internal.boolean_dispatched instead (the
# table behind torch's own boolean-dispatched functionals, e.g.
# F.max_pool2d), naming an argument no caller passes, whose default picks the
# original both ways: TorchScript then compiles what it compiled before the
# patch. Eager calls never read either table.
_scripted_forwarders: list[Callable[..., Any]] = []


def _point_torchscript_at(forwarder: Callable[..., Any], name: str, original: Any) -> None:
    from torch.jit import _builtins

    operator = _builtins._find_builtin(getattr(_functional, name))
    if operator is not None:
        _scripted_forwarders.append(forwarder)
        _builtins._register_builtin(forwarder, operator)
        return
    _jit_internal.boolean_dispatched[forwarder] = {
        "if_true": original,
        "if_false": original,
        "index": 1 << 30,
        "default": False,
        "arg_name": "_xent_ext_torchscript_original",
    }


# Note [torch.compile of a patched function]
# Dynamo keeps a table of torch functions it puts into graphs whole, built
# once by looking each one up by name (torch.nn.functional.cross_entropy among
# them) and rebuilt when torch.distributed starts a process group. Built while
# patched, it holds the forwarder: Dynamo then records the forwarder as one
# call, which AOTAutograd traces into xent_ext's ops. Built before, it doesn't:
# Dynamo inlines the forwarder and records xent_ext's ops itself. Either way
# the compiled code computes xent_ext's loss; torch's function, unpatched
# again, is inlined or kept whole, and computes torch's. Nothing to do here.


def _targets() -> list[tuple[Any, str]]:
    out = []
    for route in _ROUTES:
        module = importlib.import_module(route.module)
        if hasattr(module, route.name) and hasattr(_functional, route.name):
            out.append((module, route.name))
    return out


def _is_patched_locked() -> bool:
    return bool(_saved)


def _patch_locked() -> None:
    if _saved:
        return
    for module, name in _targets():
        original = getattr(module, name)
        forwarder = _make_forwarder(name)
        _point_torchscript_at(forwarder, name, original)
        _saved[(module, name)] = (original, forwarder)
        setattr(module, name, forwarder)


def _unpatch_locked() -> None:
    for (module, name), (original, forwarder) in list(_saved.items()):
        current = getattr(module, name, None)
        if current is forwarder:
            setattr(module, name, original)
        else:
            warnings.warn(
                f"xent_ext.unpatch(): {module.__name__}.{name} was reassigned after xent_ext.patch() "
                f"(it is now {current!r}); leaving that assignment in place instead of restoring {original!r}",
                RuntimeWarning,
                stacklevel=3,
            )
        del _saved[(module, name)]


def patch() -> None:
    """Route ``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss`` through xent_ext.

    Process-wide, for every thread, until :func:`unpatch`: calls of
    ``torch.nn.functional.cross_entropy`` (looked up at call time) and every
    ``torch.nn.CrossEntropyLoss`` instance, including those made before this
    call, compute with :func:`xent_ext.cross_entropy` (the same arguments,
    results and errors as torch's). Idempotent: a second call does nothing.
    TorchScript keeps compiling torch's function (see ``xent_ext._patch``).

    Example (a Hugging Face ``Trainer`` run)::

        >>> import xent_ext; xent_ext.patch()
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        >>> trainer.train()   # the causal-LM loss is computed by xent_ext
    """
    with _lock:
        _patch_locked()


def unpatch() -> None:
    """Undo :func:`patch`: put back the exact objects it replaced.

    After it, ``torch.nn.functional.cross_entropy`` is the object it was before
    :func:`patch` (``is``-identical). Does nothing when not patched. Calls
    don't count: one :func:`unpatch` undoes any number of :func:`patch` calls.
    An attribute that was reassigned after :func:`patch` keeps that assignment
    (with a ``RuntimeWarning``).
    """
    with _lock:
        _unpatch_locked()


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Context manager: patched inside the block, then the state it found.

    ::

        with xent_ext.patched():
            loss = model(input_ids, labels=labels).loss   # computed by xent_ext

    On exit (also by an exception) the block restores the state it found:
    torch's functions if they were in place when it was entered, the patch if
    :func:`patch` was on (even if :func:`unpatch` was called inside). Blocks nest; with overlapping blocks in several threads, the last
    one to exit restores the state the first one found. The patch is
    process-wide, so other threads see it while any block is open.
    """
    global _open_blocks, _found_patched
    with _lock:
        if _open_blocks == 0:
            _found_patched = _is_patched_locked()
        _open_blocks += 1
        _patch_locked()
    try:
        yield
    finally:
        with _lock:
            _open_blocks -= 1
            if _open_blocks == 0:
                if _found_patched:
                    _patch_locked()
                else:
                    _unpatch_locked()
