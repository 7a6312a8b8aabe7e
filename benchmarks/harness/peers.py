"""What the CUDA harness compares xent with: torch eager and compile, and third-party kernels when importable."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from importlib import metadata

from .common import LossFn, first_line

# What the CUDA harness compares, in the tables' order: xent, torch's two, then the peers.
CUDA_IMPLS = ("xent", "eager", "compile", "liger", "quack")
CUDA_PEERS = CUDA_IMPLS[1:]
# Peers that take only (N, C) logits and class-index targets (N,).
PEERS_2D_ONLY = ("liger", "quack")
# Peers that write the gradient into the logits (they get their own copies).
PEERS_GRAD_IN_PLACE = ("liger",)


@dataclass
class Peer:
    """An optional third-party implementation: its loss function, or why it is missing."""

    name: str
    fn: LossFn | None
    version: str | None = None
    status: str = "ok"  # "not installed" or "failed: import: ..." when fn is None


def dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _missing(exc: BaseException, module: str) -> str:
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == module:
        return "not installed"
    return f"failed: import: {first_line(exc)}"


def load_liger() -> Peer:
    """Liger Kernel's Triton cross-entropy (``liger_cross_entropy``, F.cross_entropy's signature).

    It computes the gradient inside the forward and stores it in the logits'
    own memory (when they require grad); the backward hands that tensor to
    autograd.  So its fwd+bwd allocates no gradient but overwrites its input.
    """
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except Exception as exc:  # noqa: BLE001  (any import failure: report and go on)
        return Peer("liger", None, status=_missing(exc, "liger_kernel"))
    return Peer("liger", lambda x, t: liger_cross_entropy(x, t), dist_version("liger-kernel", "liger_kernel"))


def load_quack() -> Peer:
    """QuACK's CuTe-DSL cross-entropy (``quack.cross_entropy.cross_entropy(x, target, ..., reduction)``)."""
    try:
        from quack.cross_entropy import cross_entropy as quack_ce
    except Exception as exc:  # noqa: BLE001
        return Peer("quack", None, status=_missing(exc, "quack"))
    try:
        takes_reduction = "reduction" in inspect.signature(quack_ce).parameters
    except (TypeError, ValueError):
        takes_reduction = True
    if takes_reduction:
        fn: LossFn = lambda x, t: quack_ce(x, t, reduction="mean")
    else:  # older releases return the per-row losses
        fn = lambda x, t: quack_ce(x, t).mean()
    return Peer("quack", fn, dist_version("quack-kernels", "quack_kernels", "quack"))


def load_peers() -> dict[str, Peer]:
    return {"liger": load_liger(), "quack": load_quack()}
