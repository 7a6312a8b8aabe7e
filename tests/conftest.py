"""Fixtures and pytest hooks for the xent_ext test suite; the shared helpers are in
helpers.py.

Reproducing a failure
---------------------
Every test that draws random data takes the ``fresh_seed`` fixture. Its seed comes
from ``os.urandom``, is printed in the captured stdout, attached to the failure
report (section "xent_ext seed"), and is also part of the assertion messages
("seed=..."). Rerun one test with the same data::

    XENT_TEST_SEED=<seed> python -m pytest "tests/test_parity.py::test_x[id]"

Devices
-------
Tests that take the ``device`` fixture run once per entry of ``helpers.DEVICES``:
``"cpu"``, plus ``"cuda"`` wherever ``torch.cuda.is_available()``; on a CPU-only machine
the CUDA twins are not even collected. ``XENT_TEST_DEVICES=cuda`` (or ``cpu``, or
``cpu,cuda``) picks the devices explicitly, e.g. to run only the CUDA twins on a GPU
machine; CUDA twins carry the ``cuda`` marker (``-m cuda`` / ``-m "not cuda"``).
"""

import random

import pytest
import torch

import xent_ext
from helpers import DEVICES, SEED_ENV, cuda_skip_reason, is_cuda, new_seed

# ----------------------------------------------------------------------------------
# devices
# ----------------------------------------------------------------------------------


def _device_param(d):
    marks = [pytest.mark.cuda] if is_cuda(d) else []
    return pytest.param(d, id=d, marks=marks)


@pytest.fixture(params=[_device_param(d) for d in DEVICES])
def device(request):
    """The device a twin test builds its tensors on ('cpu', 'cuda')."""
    d = request.param
    if is_cuda(d):
        reason = cuda_skip_reason()
        if reason:
            pytest.skip(reason)
    return d


@pytest.fixture
def cuda_target_check_on(device):
    """On CUDA: xent_ext's target check is on for the test (out-of-range class indices
    raise IndexError, as on the CPU), and the previous setting is restored afterwards."""
    if not is_cuda(device):
        yield
        return
    prev = xent_ext.set_cuda_target_check(True)
    try:
        yield
    finally:
        xent_ext.set_cuda_target_check(prev)


# ----------------------------------------------------------------------------------
# pytest hooks: markers, header, seed in failure reports
# ----------------------------------------------------------------------------------


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: larger sizes, compilation or subprocesses (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: runs on a CUDA device (the CUDA twin of a test, or tests/test_cuda.py)")


def pytest_report_header(config):
    where = getattr(xent_ext, "__file__", "?")
    cuda = cuda_skip_reason() or f"CUDA tests run on {torch.cuda.get_device_name()}"
    return [
        f"xent_ext: {where}",
        f"torch {torch.__version__}, ATen CPU capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {torch.get_num_threads()}",
        f"devices {', '.join(DEVICES)}; {cuda}",
    ]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = getattr(item, "_xent_seed", None)
    if seed is not None and rep.failed:
        rep.sections.append(("xent_ext seed", f"{SEED_ENV}={seed} python -m pytest \"{item.nodeid}\""))


@pytest.fixture
def fresh_seed(request):
    """A fresh random seed (os.urandom); seeds torch and `random`, and is logged."""
    seed = new_seed()
    # the CPU generator only: torch.manual_seed also seeds (lazily) cuda/xpu/mtia, and
    # records a formatted stack for each, which costs milliseconds per test
    torch.random.default_generator.manual_seed(seed)
    random.seed(seed)
    request.node._xent_seed = seed
    request.node.user_properties.append(("xent_seed", seed))
    print(f"xent_ext test seed: {seed}   reproduce: {SEED_ENV}={seed} python -m pytest \"{request.node.nodeid}\"")
    return seed


@pytest.fixture
def rng(fresh_seed):
    """A `random.Random` for picking parameter combinations, seeded by fresh_seed."""
    return random.Random(fresh_seed)


@pytest.fixture
def xent_calls(monkeypatch):
    """The reductions of the calls that reach xent_ext.cross_entropy during the test
    (a counting wrapper around the front end, which torch's patched entry points call)."""
    calls = []
    real = xent_ext.functional.cross_entropy

    def counting(*args, **kwargs):
        calls.append(kwargs.get("reduction", "mean"))
        return real(*args, **kwargs)

    monkeypatch.setattr(xent_ext.functional, "cross_entropy", counting)
    return calls
