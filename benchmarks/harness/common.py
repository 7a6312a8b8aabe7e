"""What both devices share: the cases, one implementation's result, a row, its inputs and its steps."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import xent_ext

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[], Any]

MODES = ("fwd", "fwd+bwd")
MODE_CHOICES = {"fwd": ["fwd"], "fwdbwd": ["fwd+bwd"], "both": list(MODES)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative tolerance on the loss value vs torch eager (sanity check only).
LOSS_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}
TARGET_INDEX_BYTES = 8  # int64 class indices


@dataclass(frozen=True)
class Case:
    """One input configuration: logits shape (N, C, d1, ...) and dtype."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def label(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def num_classes(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else self.shape[0]

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Class-index target shape, as F.cross_entropy expects it."""
        return (self.shape[0], *self.shape[2:]) if len(self.shape) > 1 else ()

    @property
    def logits_bytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize

    @property
    def target_bytes(self) -> int:
        return math.prod(self.target_shape) * TARGET_INDEX_BYTES


def parse_shape(spec: str) -> Case:
    """Parse ``"4096x32000"`` or ``"4096x32000:bf16"`` (default dtype fp32)."""
    dims, _, dtype = spec.strip().partition(":")
    dtype = dtype or "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} in {spec!r}; choose from {sorted(DTYPES)}")
    shape = tuple(int(d) for d in dims.lower().split("x"))
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"bad shape {spec!r}")
    return Case(shape, dtype)


def parse_int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def select_cases(shapes: Sequence[str], dtypes: Sequence[str] | None) -> list[Case]:
    """Cases in order; ``dtypes`` (if given) replaces each shape's own dtype."""
    cases: list[Case] = []
    for spec in shapes:
        case = parse_shape(spec)
        for dtype in dtypes or [case.dtype]:
            if dtype not in DTYPES:
                raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(DTYPES)}")
            candidate = Case(case.shape, dtype)
            if candidate not in cases:
                cases.append(candidate)
    return cases


def selection(args: Any, quick_shapes: Sequence[str], default_shapes: Sequence[str]) -> tuple[list[Case], list[str], bool]:
    """The cases, modes and whether to compile, from the command line and a device's shape sets."""
    cases = select_cases(
        args.shapes.split(",") if args.shapes else quick_shapes if args.quick else default_shapes,
        args.dtype.split(",") if args.dtype else None,
    )
    use_compile = args.compile if args.compile is not None else not args.quick
    return cases, MODE_CHOICES[args.mode], use_compile


def first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
    return text[:200]


def short_reason(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class ImplResult:
    """Measurements of one implementation for one row."""

    status: str = "ok"  # ok | not installed | failed: <reason> | skipped: <reason>
    error: str | None = None  # the exception's first line, when something failed
    samples_ms: list[float] = field(default_factory=list)
    inner: int = 0  # calls per timed sample (each sample is their mean)
    loss: float | None = None  # of the warm-up call
    peak_extra_bytes: int | None = None

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.samples_ms) if self.samples_ms else None

    @property
    def skipped(self) -> bool:
        return self.status.startswith("skipped")

    def fail(self, exc: BaseException | str, where: str = "") -> None:
        text = exc if isinstance(exc, str) else first_line(exc)
        self.error = f"{where}{text}"
        self.status = "failed: " + short_reason(self.error)

    def to_json(self) -> dict[str, Any]:
        """The fields both devices write; each adds its own (CPU ``skipped``, CUDA ``status``)."""
        return {
            "error": self.error,
            "samples_ms": self.samples_ms,
            "inner": self.inner,
            "loss": self.loss,
            "peak_extra_bytes": self.peak_extra_bytes,
            "median_ms": self.median_ms,
            "min_ms": min(self.samples_ms) if self.samples_ms else None,
        }


@dataclass
class Row:
    """One (shape, dtype, mode) row: every implementation's result (each device adds its own fields)."""

    case: Case
    mode: str
    impls: dict[str, ImplResult]

    def ratio(self, slower: str, faster: str) -> float | None:
        """Median time of ``slower`` over median time of ``faster`` (> 1: ``faster`` is faster)."""
        a, b = self.impls[slower].median_ms, self.impls[faster].median_ms
        return a / b if a and b else None

    def speedup(self, impl: str) -> float | None:
        """Time of ``impl`` divided by the time of xent (> 1: xent is faster)."""
        return self.ratio(impl, "xent")

    @property
    def where(self) -> str:
        return f"{self.case.label} {self.case.dtype} {self.mode}"


def loss_mismatches(row: Row) -> list[str]:
    """Implementations whose warm-up loss differs from torch eager's beyond the tolerance."""
    ref = row.impls["eager"].loss
    if ref is None:
        return []
    out = []
    for name, r in row.impls.items():
        if name == "eager" or r.loss is None:
            continue
        rel = abs(r.loss - ref) / max(abs(ref), 1e-12)
        if not rel <= LOSS_RTOL[row.case.dtype]:  # also catches NaN
            out.append(f"{name} loss {r.loss:.6g} vs eager {ref:.6g} (rel diff {rel:.2e})")
    return out


def row_notes(row: Row, where: str) -> list[str]:
    """The notes a row adds: each implementation's error, then each loss mismatch."""
    notes = [f"{where}: {name}: {r.error}" for name, r in row.impls.items() if r.error]
    return notes + [f"{where}: WARNING {m}" for m in loss_mismatches(row)]


class RotatingInputs:
    """``copies`` identical (logits, targets) pairs; each call takes the next pair.

    For fwd+bwd, taking a pair first drops the gradient of the pair used by
    the previous call (``zero_grad(set_to_none=True)`` of the previous step),
    so at most one gradient is alive at a time, as with a single input.
    ``clone=False`` (one copy only) uses ``x``'s own memory.
    """

    def __init__(self, x: torch.Tensor, target: torch.Tensor, copies: int = 1, clone: bool = True) -> None:
        assert clone or copies == 1
        base = x.detach()
        self.xs = [(base.clone() if clone else base).requires_grad_(True) for _ in range(copies)]
        self.detached = [t.detach() for t in self.xs]
        self.targets = [target.clone() if clone else target for _ in range(copies)]
        self._next = 0
        self._last = 0

    def __len__(self) -> int:
        return len(self.xs)

    def take(self, with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._next
        self._next = (i + 1) % len(self.xs)
        if with_grad:
            self.xs[self._last].grad = None
            self.xs[i].grad = None
        self._last = i
        return (self.xs[i] if with_grad else self.detached[i]), self.targets[i]

    def clear_grads(self) -> None:
        for x in self.xs:
            x.grad = None


def make_step(fn: LossFn, inputs: RotatingInputs, mode: str) -> Step:
    """One forward ('fwd') or ``loss = f(x, y); loss.backward()`` ('fwd+bwd') on the next input pair.

    fwd+bwd drops the previous gradient first, like
    ``optimizer.zero_grad(set_to_none=True)``: every call allocates its own.
    """
    if mode == "fwd":

        def fwd() -> torch.Tensor:
            x, target = inputs.take(with_grad=False)
            return fn(x, target)

        return fwd

    def fwd_bwd() -> torch.Tensor:
        x, target = inputs.take(with_grad=True)
        loss = fn(x, target)
        loss.backward()
        return loss.detach()

    return fwd_bwd


def baseline_fns(use_compile: bool, results: dict[str, ImplResult]) -> dict[str, LossFn]:
    """xent, torch eager and (unless ``use_compile`` is off) a fresh ``torch.compile(F.cross_entropy)``.

    A fresh compile per row avoids dynamo's recompile limit and lets inductor
    specialise on this row's shape (and, on the CPU, thread count).
    """
    fns: dict[str, LossFn] = {"xent": xent_ext.cross_entropy, "eager": F.cross_entropy}
    if use_compile:
        torch._dynamo.reset()
        try:
            fns["compile"] = torch.compile(F.cross_entropy, dynamic=False)
        except Exception as exc:  # noqa: BLE001  (compile support varies by machine)
            results["compile"].fail(exc)
    else:
        results["compile"].status = "skipped: --no-compile"
    return fns


def warm_up(
    fns: dict[str, LossFn],
    inputs_of: Callable[[str], RotatingInputs],
    mode: str,
    results: dict[str, ImplResult],
    after_failure: Callable[[], None] = lambda: None,
) -> dict[str, Step]:
    """One call of each implementation (compiles 'compile'), its loss kept; the steps that ran."""
    steps: dict[str, Step] = {}
    for name, fn in fns.items():
        step = make_step(fn, inputs_of(name), mode)
        try:
            results[name].loss = float(step())  # float() waits for the device
        except Exception as exc:  # noqa: BLE001  (report n/a and keep going)
            results[name].fail(exc)
            after_failure()
            continue
        steps[name] = step
    return steps
