"""xent_ext.patch() / unpatch() / patched(): routing torch's own cross-entropy through xent_ext.

Every test starts and ends with torch's functions in place (the autouse fixture
checks and repairs it): the rest of the suite compares against
``torch.nn.functional.cross_entropy``, which must be torch's.
"""

import io
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import xent_ext
import xent_ext._patch as xent_patch
from helpers import (
    assert_bitwise_equal,
    check_against_torch,
    make_index_target,
    make_logits,
    make_prob_target,
    random_weight,
    run_ce,
)

# torch's own objects, taken at import (before any test patches).
TORCH_CROSS_ENTROPY = F.cross_entropy
TORCH_LOSS_FORWARD = torch.nn.CrossEntropyLoss.forward


@pytest.fixture(autouse=True)
def torch_functions_restored():
    """Each test starts unpatched and must leave torch's functions in place."""
    assert F.cross_entropy is TORCH_CROSS_ENTROPY, "a previous test left torch.nn.functional patched"
    yield
    leaked = F.cross_entropy is not TORCH_CROSS_ENTROPY
    # Repair before failing, so one broken test doesn't falsify the rest of the suite.
    with xent_patch._lock:
        xent_patch._saved.clear()
        xent_patch._open_blocks = 0
    F.cross_entropy = TORCH_CROSS_ENTROPY
    assert not leaked, "the test left torch.nn.functional.cross_entropy patched"


class OpSpy(TorchDispatchMode):
    """Counts the operators that run below autograd: xent_ext's, and torch's cross-entropy ones."""

    TORCH_CE_OPS = frozenset(
        f"aten::{name}"
        for name in ("cross_entropy_loss", "log_softmax", "_log_softmax", "nll_loss", "nll_loss_forward",
                     "nll_loss2d", "nll_loss2d_forward", "nll_loss_nd")
    )

    def __init__(self):
        super().__init__()
        self.xent = 0
        self.torch_ce = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("xent_ext::"):
            self.xent += 1
        elif name in self.TORCH_CE_OPS:
            self.torch_ce += 1
        return func(*args, **(kwargs or {}))


def as_functional(module):
    """A module as a function with cross_entropy's leading signature, for run_ce."""
    return lambda input, target, weight=None: module(input, target)


def spy(fn):
    """Run fn() (forward and backward) under OpSpy; return (result, spy)."""
    with OpSpy() as s:
        out = fn()
    return out, s


# ----------------------------------------------------------------------------------
# the switch: identity, idempotence, context manager
# ----------------------------------------------------------------------------------


def test_patch_unpatch_identity():
    xent_ext.patch()
    try:
        patched_fn = F.cross_entropy
        assert patched_fn is not TORCH_CROSS_ENTROPY
        assert patched_fn.__wrapped__ is xent_ext.cross_entropy
        # torch.nn's loss modules read F through their own module: the same object.
        assert torch.nn.modules.loss.F.cross_entropy is patched_fn
        # The class is not touched: isinstance, pickling and subclasses see torch's.
        assert torch.nn.CrossEntropyLoss.forward is TORCH_LOSS_FORWARD
    finally:
        xent_ext.unpatch()
    assert F.cross_entropy is TORCH_CROSS_ENTROPY
    assert torch.nn.modules.loss.F.cross_entropy is TORCH_CROSS_ENTROPY


def test_patch_is_idempotent_and_unpatch_restores_at_once():
    xent_ext.patch()
    first = F.cross_entropy
    xent_ext.patch()
    assert F.cross_entropy is first, "a second patch() must change nothing"
    xent_ext.unpatch()
    assert F.cross_entropy is TORCH_CROSS_ENTROPY, "one unpatch() undoes any number of patch() calls"
    xent_ext.unpatch()  # not patched: nothing to do
    assert F.cross_entropy is TORCH_CROSS_ENTROPY
    xent_ext.patch()  # and it can be patched again
    assert F.cross_entropy is not TORCH_CROSS_ENTROPY
    xent_ext.unpatch()
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


def test_patch_keeps_and_restores_a_previous_replacement():
    # Whatever stood there before patch() is what unpatch() puts back.
    def mine(*args, **kwargs):
        return TORCH_CROSS_ENTROPY(*args, **kwargs)

    F.cross_entropy = mine
    try:
        with xent_ext.patched():
            assert F.cross_entropy is not mine and F.cross_entropy.__wrapped__ is xent_ext.cross_entropy
        assert F.cross_entropy is mine
    finally:
        F.cross_entropy = TORCH_CROSS_ENTROPY


def test_unpatch_keeps_a_later_assignment_and_warns():
    def mine(*args, **kwargs):
        return TORCH_CROSS_ENTROPY(*args, **kwargs)

    xent_ext.patch()
    F.cross_entropy = mine
    try:
        with pytest.warns(RuntimeWarning, match="reassigned after xent_ext.patch"):
            xent_ext.unpatch()
        assert F.cross_entropy is mine
        xent_ext.unpatch()  # no longer patched: silent
    finally:
        F.cross_entropy = TORCH_CROSS_ENTROPY


def test_context_manager_restores_on_exit_and_on_exception():
    with xent_ext.patched():
        assert F.cross_entropy.__wrapped__ is xent_ext.cross_entropy
    assert F.cross_entropy is TORCH_CROSS_ENTROPY
    with pytest.raises(KeyError, match="boom"):
        with xent_ext.patched():
            raise KeyError("boom")
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


def test_context_manager_restores_the_state_it_found():
    xent_ext.patch()
    try:
        patched_fn = F.cross_entropy
        with pytest.raises(ValueError):
            with xent_ext.patched():
                assert F.cross_entropy is patched_fn
                raise ValueError
        assert F.cross_entropy is patched_fn, "a block entered under patch() must leave it on"
        with xent_ext.patched():
            xent_ext.unpatch()  # undone inside the block: the block still restores what it found
            assert F.cross_entropy is TORCH_CROSS_ENTROPY
        assert F.cross_entropy.__wrapped__ is xent_ext.cross_entropy
    finally:
        xent_ext.unpatch()
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


def test_context_managers_nest():
    with xent_ext.patched():
        outer = F.cross_entropy
        with xent_ext.patched():
            assert F.cross_entropy is outer
        assert F.cross_entropy is outer, "the inner block must not undo the outer one"
        with pytest.raises(RuntimeError):
            with xent_ext.patched():
                raise RuntimeError
        assert F.cross_entropy is outer
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


def test_every_route_is_applied():
    xent_ext.patch()
    try:
        for route in xent_patch._ROUTES:
            module = sys.modules[route.module]
            fn = getattr(module, route.name)
            assert fn.__wrapped__ is getattr(xent_ext.functional, route.name), route
            for cls_name in route.followed_by:
                mod_name, cls = cls_name.rsplit(".", 1)
                assert isinstance(getattr(sys.modules[mod_name], cls), type), route
    finally:
        xent_ext.unpatch()


# ----------------------------------------------------------------------------------
# threads
# ----------------------------------------------------------------------------------


@pytest.fixture
def frequent_thread_switches():
    """Switch threads as often as the interpreter allows, so unlocked races show up."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _run_threads(target, n):
    errors = []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait()
            target(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_concurrent_patch_and_unpatch_never_lose_the_original(frequent_thread_switches, fresh_seed):
    x = make_logits((3, 5))
    y = make_index_target((3, 5))
    expected = TORCH_CROSS_ENTROPY(x, y)

    def work(i):
        for k in range(2000):
            if (i + k) % 2:
                xent_ext.patch()
            else:
                xent_ext.unpatch()
            if k % 100 == 0:  # whatever the state, a call computes the same loss
                torch.testing.assert_close(F.cross_entropy(x, y), expected)

    _run_threads(work, 4)
    xent_ext.unpatch()
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


def test_overlapping_blocks_in_threads_restore_the_state_first_found(frequent_thread_switches):
    inside = threading.Barrier(4)

    def work(i):
        for _ in range(50):
            with xent_ext.patched():
                assert F.cross_entropy.__wrapped__ is xent_ext.cross_entropy
        with xent_ext.patched():
            inside.wait()  # all four blocks open at once
            assert F.cross_entropy.__wrapped__ is xent_ext.cross_entropy

    _run_threads(work, 4)
    assert F.cross_entropy is TORCH_CROSS_ENTROPY


# ----------------------------------------------------------------------------------
# routing: results and a spy on the kernels
# ----------------------------------------------------------------------------------


CASES = {
    "index_2d_mean": lambda dev: (make_logits((6, 11), device=dev), make_index_target((6, 11), ignore_frac=0.3, device=dev), {}),
    "index_2d_none_weight_smoothing": lambda dev: (
        make_logits((5, 9), device=dev), make_index_target((5, 9), device=dev),
        {"weight": random_weight(9, device=dev), "reduction": "none", "label_smoothing": 0.2}),
    "index_4d_sum_ignore": lambda dev: (
        make_logits((2, 7, 3, 4), device=dev), make_index_target((2, 7, 3, 4), ignore_index=3, ignore_frac=0.2, device=dev),
        {"reduction": "sum", "ignore_index": 3}),
    "index_1d": lambda dev: (make_logits((13,), device=dev), make_index_target((13,), device=dev), {}),
    "prob_2d_mean": lambda dev: (make_logits((4, 10), device=dev), make_prob_target((4, 10), device=dev), {}),
    "prob_3d_none_smoothing": lambda dev: (
        make_logits((3, 6, 5), device=dev), make_prob_target((3, 6, 5), device=dev),
        {"reduction": "none", "label_smoothing": 0.1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_patched_function_is_xent_ext(case, dtype, device, fresh_seed):
    x, target, kw = CASES[case](device)
    x = x.to(dtype)
    kw = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if target.is_floating_point():
        target = target.to(dtype)
    with xent_ext.patched():
        routed = F.cross_entropy
        (loss, grads), seen = spy(lambda: run_ce(routed, x, target, **kw))
    assert seen.xent > 0 and seen.torch_ce == 0, f"xent_ext ops {seen.xent}, torch's {seen.torch_ce}"
    own_loss, own_grads = run_ce(xent_ext.cross_entropy, x, target, **kw)
    assert_bitwise_equal(loss, own_loss, f"{case}: loss")
    assert_bitwise_equal(grads["input"], own_grads["input"], f"{case}: grad")
    # And torch's (the reference is F.cross_entropy, torch's again outside the block).
    check_against_torch(routed, x, target, ctx=f"{case} {dtype} seed={fresh_seed}", **kw)


@pytest.mark.parametrize("made", ["before", "after"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_module_instances_made_before_and_after(made, kind, device, fresh_seed):
    shape = (5, 8)
    x = make_logits(shape, device=device)
    target = make_index_target(shape, device=device) if kind == "index" else make_prob_target(shape, device=device)
    args = {"weight": random_weight(8, device=device), "label_smoothing": 0.15}
    if made == "before":
        module = torch.nn.CrossEntropyLoss(**args)
    with xent_ext.patched():
        if made == "after":
            module = torch.nn.CrossEntropyLoss(**args)
        assert type(module) is torch.nn.CrossEntropyLoss
        (loss, grads), seen = spy(lambda: run_ce(as_functional(module), x, target))
    assert seen.xent > 0 and seen.torch_ce == 0, f"xent_ext ops {seen.xent}, torch's {seen.torch_ce}"
    own_loss, own_grads = run_ce(as_functional(xent_ext.CrossEntropyLoss(**args)), x, target)
    assert_bitwise_equal(loss, own_loss, "loss")
    assert_bitwise_equal(grads["input"], own_grads["input"], "grad")
    torch_loss, torch_grads = run_ce(as_functional(module), x, target)  # unpatched again: torch's own
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grads["input"], torch_grads["input"])


def test_unpatched_calls_are_torchs_again(device, fresh_seed):
    # The spy can tell the two apart (so the tests above can fail).
    x = make_logits((4, 6), device=device)
    y = make_index_target((4, 6), device=device)
    module = torch.nn.CrossEntropyLoss()
    with xent_ext.patched():
        pass
    for fn in (F.cross_entropy, module):
        _, seen = spy(lambda: run_ce(as_functional(fn), x, y))
        assert seen.xent == 0 and seen.torch_ce > 0, f"xent_ext ops {seen.xent}, torch's {seen.torch_ce}"


def test_patched_calls_go_through_xent_ext_front_end(xent_calls, fresh_seed):
    calls = xent_calls
    x = make_logits((3, 4))
    y = make_index_target((3, 4))
    module = torch.nn.CrossEntropyLoss(reduction="sum")
    with xent_ext.patched():
        F.cross_entropy(x, y, reduction="none")
        module(x, y)
    F.cross_entropy(x, y)  # unpatched: torch's
    assert calls == ["none", "sum"]


HANDED_OVER = {
    # xent_ext gives these to torch's C++ entry point (Note [Handing over to
    # torch] in functional.py), never to torch.nn.functional.cross_entropy:
    # were it the patched one, these would recurse.
    "weight_requires_grad": lambda: (make_logits((4, 5)), make_index_target((4, 5)), random_weight(5).requires_grad_()),
    "int_logits": lambda: (torch.randint(5, (4, 5)), make_index_target((4, 5)), None),
    "0d_input": lambda: (torch.tensor(1.5), torch.tensor(0), None),
    "meta_device": lambda: (torch.empty(4, 5, device="meta"), torch.empty(4, dtype=torch.long, device="meta"), None),
    "zero_class_probs": lambda: (torch.empty(3, 0), torch.empty(3, 0), None),
}


def _outcome(fn, x, y, w):
    try:
        return fn(x, y, weight=w)
    except RuntimeError as e:
        return e


@pytest.mark.parametrize("case", sorted(HANDED_OVER))
def test_inputs_handed_back_to_torch_do_not_recurse(case, fresh_seed):
    x, y, w = HANDED_OVER[case]()
    expected = _outcome(TORCH_CROSS_ENTROPY, x, y, w)
    with xent_ext.patched():
        got = _outcome(F.cross_entropy, x, y, w)
    assert type(got) is type(expected), (got, expected)
    if isinstance(expected, Exception):
        assert str(got) == str(expected)
    else:
        assert got.shape == expected.shape and got.dtype == expected.dtype and got.device == expected.device
        if got.device.type != "meta":
            torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def test_errors_are_torchs():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError) as expected:
        TORCH_CROSS_ENTROPY(x, torch.tensor([0, 1]))
    with xent_ext.patched():
        with pytest.raises(ValueError) as got:
            torch.nn.CrossEntropyLoss()(x, torch.tensor([0, 1]))
    assert str(got.value) == str(expected.value)


# ----------------------------------------------------------------------------------
# TorchScript and torch.compile while patched
# ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_of_torch_module_while_patched(fresh_seed):
    # Note [Scripting a patched function]: while patched, scripted code that
    # calls torch's cross_entropy compiles to xent_ext's operator.
    x = make_logits((5, 7))
    y = make_index_target((5, 7))
    with xent_ext.patched():
        scripted = torch.jit.script(torch.nn.CrossEntropyLoss(label_smoothing=0.1))

        @torch.jit.script
        def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(a, b, reduction="sum")

        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        got_module, got_fn = scripted(x, y), fn(x, y)
    for graph in (scripted.graph, fn.graph):
        kinds = {node.kind() for node in graph.nodes()}
        assert "xent_ext::cross_entropy" in kinds and "aten::cross_entropy_loss" not in kinds, kinds
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    expected = xent_ext.cross_entropy(x, y, label_smoothing=0.1)
    for got in (got_module, loaded(x, y)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got_fn, xent_ext.cross_entropy(x, y, reduction="sum"), rtol=0, atol=0)
    torch.testing.assert_close(got_module, TORCH_CROSS_ENTROPY(x, y, label_smoothing=0.1))
    # After unpatch, newly scripted torch code compiles to torch's operator again.
    unpatched = torch.jit.script(torch.nn.CrossEntropyLoss())
    assert "aten::cross_entropy_loss" in {node.kind() for node in unpatched.inlined_graph.nodes()}
    torch.testing.assert_close(unpatched(x, y), TORCH_CROSS_ENTROPY(x, y))


@pytest.mark.slow
def test_torch_compile_while_patched(fresh_seed):
    x = make_logits((6, 9))
    y = make_index_target((6, 9), ignore_frac=0.2)
    module = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    graphs = []
    with xent_ext.patched():
        compiled = torch.compile(module, backend=recording_backend(graphs), fullgraph=True)
        loss, grads = run_ce(as_functional(compiled), x, y)
    assert graphs and all("xent_ext" in g for g in graphs), graphs  # forward, backward
    own_loss, own_grads = run_ce(xent_ext.cross_entropy, x, y, label_smoothing=0.05)
    torch.testing.assert_close(loss, own_loss, rtol=0, atol=0)
    torch.testing.assert_close(grads["input"], own_grads["input"])


def recording_backend(graphs):
    """aot_eager, recording the text of each graph it compiles (forward, then backward) in `graphs`."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, example_inputs):
        graphs.append(str(gm.graph))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


COMPILE_PATCHED_FIRST = textwrap.dedent("""
    import torch, torch.nn.functional as F, xent_ext
    from test_patch import recording_backend
    torch.random.default_generator.manual_seed({seed})
    x, y = torch.randn(6, 9, dtype=torch.float64).float(), torch.randint(9, (6,))
    torch_fn = F.cross_entropy

    def run(fn):
        xi = x.clone().requires_grad_()
        loss = fn(xi, y, label_smoothing=0.05)
        return loss.detach(), torch.autograd.grad(loss, xi)[0]

    def compiled():
        graphs = []
        backend = recording_backend(graphs)
        return torch.compile(lambda a, b, **kw: F.cross_entropy(a, b, **kw), backend=backend, fullgraph=True), graphs

    with xent_ext.patched():  # the first torch.compile of the process, while patched
        fn, graphs = compiled()
        got = run(fn)
    assert graphs and all("xent_ext" in g for g in graphs), graphs
    own = run(xent_ext.cross_entropy)
    assert torch.equal(got[0], own[0]), (got[0], own[0])
    torch.testing.assert_close(got[1], own[1])
    # Unpatched again, a new compile computes torch's loss.
    fn, graphs = compiled()
    again, ref = run(fn), run(torch_fn)
    assert graphs and not any("xent_ext" in g for g in graphs), graphs
    torch.testing.assert_close(again[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(again[1], ref[1])
    print("CHILD-OK")
""")


@pytest.mark.slow
def test_torch_compile_first_used_while_patched(fresh_seed):
    # Note [torch.compile of a patched function]: Dynamo builds its table of
    # torch functions on first use, here while patched. A fresh process makes
    # sure that is the order.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(xent_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([package_parent, os.path.dirname(os.path.abspath(__file__))]))
    code = COMPILE_PATCHED_FIRST.format(seed=fresh_seed)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, (
        f"seed={fresh_seed}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")


# ----------------------------------------------------------------------------------
# autocast
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["functional", "module"])
def test_patched_under_autocast_is_torchs_fp32_loss(kind, fresh_seed):
    # torch's cross_entropy is on autocast's float32 list: bfloat16 logits give a
    # float32 loss (and a bfloat16 gradient). Routed through xent_ext, the same.
    x = make_logits((6, 50), dtype=torch.bfloat16)
    y = make_index_target((6, 50), ignore_frac=0.2)
    module = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    call = as_functional(module) if kind == "module" else (
        lambda a, b, weight=None: F.cross_entropy(a, b, label_smoothing=0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = run_ce(call, x, y)  # unpatched: torch's
        with xent_ext.patched():
            (got, grads), seen = spy(lambda: run_ce(call, x, y))
        own, own_grads = run_ce(xent_ext.cross_entropy, x, y, label_smoothing=0.1)
    assert seen.xent > 0 and seen.torch_ce == 0, f"xent_ext ops {seen.xent}, torch's {seen.torch_ce}"
    assert got.dtype == expected.dtype == torch.float32
    assert grads["input"].dtype == torch.bfloat16
    assert_bitwise_equal(got, own, "loss")
    assert_bitwise_equal(grads["input"], own_grads["input"], "grad")
    # torch computes on a float32 copy of the logits: float32 rounding apart; the
    # gradients, rounded to bfloat16 from float32 values that differ in the last
    # bits, one bfloat16 rounding apart.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grads["input"], expected_grads["input"], rtol=1.6e-2, atol=1e-5)
