"""TorchScript: torch.jit.script of xent_ext.CrossEntropyLoss, of modules holding it and of
functions calling xent_ext.cross_entropy compiles to the operator xent_ext::cross_entropy
(Note [TorchScript] in xent_ext/_torchscript.py), with torch's results and gradients, and
survives torch.jit.save / torch.jit.load.
"""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import xent_ext
from helpers import (
    REDUCTIONS,
    assert_bitwise_equal,
    check_against_torch,
    make_index_target,
    make_logits,
    make_prob_target,
    random_weight,
)

OP = "xent_ext::cross_entropy"

# torch.jit.script / save / load warn that TorchScript is deprecated; it is still what these test.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


class Net(torch.nn.Module):
    """A model that holds the loss, as training code does."""

    def __init__(self, criterion):
        super().__init__()
        self.linear = torch.nn.Linear(6, 5)
        self.criterion = criterion

    def forward(self, x: Tensor, target: Tensor) -> Tensor:
        return self.criterion(self.linear(x), target)


def _graph_ops(scripted):
    """The operators a scripted module's or function's graph calls (submodules inlined)."""
    graph = scripted.inlined_graph if hasattr(scripted, "inlined_graph") else scripted.graph
    return {node.kind() for node in graph.nodes()}


def _scripted_loss(x, t, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    m = torch.jit.script(xent_ext.CrossEntropyLoss(weight, ignore_index=ignore_index, reduction=reduction,
                                                   label_smoothing=label_smoothing))
    return m(x, t)


@pytest.mark.parametrize("weighted", [False, True], ids=["noweight", "weight"])
def test_scripted_module_calls_the_operator(weighted):
    w = random_weight(5) if weighted else None
    for module in (xent_ext.CrossEntropyLoss(w), Net(xent_ext.CrossEntropyLoss(w))):
        scripted = torch.jit.script(module)
        ops = _graph_ops(scripted)
        assert OP in ops, ops
        assert not any(k.startswith("prim::Python") for k in ops), ops
    # torch's own module, for comparison, calls aten::cross_entropy_loss
    assert "aten::cross_entropy_loss" in _graph_ops(torch.jit.script(torch.nn.CrossEntropyLoss(w)))


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_scripted_module_matches_torch(reduction, kind, device, rng, fresh_seed):
    # value and gradients (input; target for probabilities) against torch, through the scripted module
    shape = rng.choice([(7, 5), (3, 5, 4), (5,), (2, 5, 3, 2)])
    dtype = rng.choice([torch.float32, torch.float64, torch.bfloat16])
    x = make_logits(shape, dtype, device=device)
    weight = random_weight(5, dtype, device) if rng.random() < 0.5 else None
    ls = rng.choice([0.0, 0.1])
    if kind == "index":
        ignore_index = rng.choice([-100, 2])
        t = make_index_target(shape, ignore_index=ignore_index, ignore_frac=0.3, device=device)
        wrt = ("input",)
    else:
        ignore_index = -100
        t = make_prob_target(shape, dtype, device=device)
        wrt = ("input", "target")
    check_against_torch(_scripted_loss, x, t, weight, reduction=reduction, ignore_index=ignore_index,
                        label_smoothing=ls, wrt=wrt,
                        ctx=f"scripted seed={fresh_seed} {kind} {shape} {dtype} {reduction} ls={ls} "
                            f"weighted={weight is not None} device={device}")


def test_scripted_equals_eager_bitwise(device, fresh_seed):
    # the scripted module runs the eager front: the same kernels, the same bits
    x = make_logits((9, 5), device=device)
    t = make_index_target((9, 5), device=device)
    w = random_weight(5, device=device)
    eager = xent_ext.CrossEntropyLoss(w, label_smoothing=0.1)
    net = Net(eager).to(device)
    scripted = torch.jit.script(net)
    inp = torch.randn(9, 6).to(device)
    results = []
    for model in (net, scripted):
        model.zero_grad()
        loss = model(inp, t)
        loss.backward()
        results.append((loss.detach(), net.linear.weight.grad.clone()))
    assert_bitwise_equal(results[0][0], results[1][0], "loss")
    assert_bitwise_equal(results[0][1], results[1][1], "grad of the linear layer's weight")
    xi = x.clone().requires_grad_()
    loss = torch.jit.script(eager)(xi, t)
    (g,) = torch.autograd.grad(loss, xi)
    xe = x.clone().requires_grad_()
    (ge,) = torch.autograd.grad(eager(xe, t), xe)
    assert_bitwise_equal(g, ge, "input grad")


def test_scripted_function_calls_the_operator(device, fresh_seed):
    # a scripted function calling xent_ext.cross_entropy, with positional and keyword
    # arguments, compiles to the operator and gives the eager results
    @torch.jit.script
    def loss_fn(x: Tensor, t: Tensor, w: Tensor) -> Tensor:
        a = xent_ext.cross_entropy(x, t, reduction="none", label_smoothing=0.2)
        b = xent_ext.cross_entropy(x, t, w, None, 1, None, "sum")
        return a.sum() + b

    assert OP in _graph_ops(loss_fn)
    assert not any(k.startswith("prim::Python") for k in _graph_ops(loss_fn))
    x = make_logits((6, 5), device=device)
    t = make_index_target((6, 5), device=device)
    w = random_weight(5, device=device)
    got = loss_fn(x, t, w)
    ref = F.cross_entropy(x, t, reduction="none", label_smoothing=0.2).sum() + F.cross_entropy(
        x, t, w, ignore_index=1, reduction="sum")
    torch.testing.assert_close(got, ref)


def test_operator_is_callable_directly(device, fresh_seed):
    x = make_logits((4, 5), device=device).requires_grad_()
    t = make_index_target((4, 5), device=device)
    loss = torch.ops.xent_ext.cross_entropy(x, t, reduction="sum", label_smoothing=0.1)
    (g,) = torch.autograd.grad(loss, x)
    xr = x.detach().requires_grad_()
    ref = F.cross_entropy(xr, t, reduction="sum", label_smoothing=0.1)
    (gr,) = torch.autograd.grad(ref, xr)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(g, gr)


def test_save_and_load(device, fresh_seed, tmp_path):
    net = Net(xent_ext.CrossEntropyLoss(random_weight(5), label_smoothing=0.1)).to(device)
    scripted = torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf, map_location=device)
    assert OP in _graph_ops(loaded)
    inp = torch.randn(8, 6).to(device)
    t = make_index_target((8, 5), device=device)
    for model in (net, loaded):
        model.zero_grad()
    a, b = net(inp, t), loaded(inp, t)
    a.backward()
    b.backward()
    assert_bitwise_equal(a.detach(), b.detach(), "loss after load")
    assert_bitwise_equal(net.linear.weight.grad, loaded.linear.weight.grad, "grad after load")


@pytest.mark.parametrize("case", [
    ("reduction", {"reduction": "avg"}, [0, 1, 2]),
    ("out_of_range", {}, [0, 1, 7]),
    ("label_smoothing", {"label_smoothing": 2.0}, [0, 1, 2]),
], ids=lambda c: c[0])
def test_scripted_errors_carry_torchs_message(case):
    # the TorchScript interpreter wraps the exception of either module (its traceback
    # differs); the message torch gives must be in ours
    _, kw, targets = case
    x, t = torch.randn(3, 5), torch.tensor(targets)
    with pytest.raises(Exception) as te:
        torch.jit.script(torch.nn.CrossEntropyLoss(**kw))(x, t)
    with pytest.raises(Exception) as oe:
        torch.jit.script(xent_ext.CrossEntropyLoss(**kw))(x, t)
    torch_message = str(te.value).strip().splitlines()[-1].split(": ", 1)[1]
    assert torch_message in str(oe.value)


@pytest.mark.slow
def test_loading_needs_xent_ext_imported(tmp_path):
    # The operator's kernel is Python (the documented limit): a fresh process can load a
    # saved script only after `import xent_ext`.
    path = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(Net(xent_ext.CrossEntropyLoss())), str(path))
    script = textwrap.dedent(f"""
        import torch
        try:
            torch.jit.load({str(path)!r})
        except Exception as e:
            assert "xent_ext::cross_entropy" in str(e), str(e)
        else:
            raise AssertionError("loaded without xent_ext")
        import xent_ext
        m = torch.jit.load({str(path)!r})
        print(float(m(torch.randn(4, 6), torch.tensor([0, 1, 2, 3]))))
    """)
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(xent_ext.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    float(proc.stdout.strip().splitlines()[-1])
