"""Every CPU ISA path (forced with ATEN_CPU_CAPABILITY in a subprocess) matches torch,
and results are bitwise independent of the thread count and run-to-run repeatable."""

import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import xent_ext
from helpers import (
    REDUCTIONS,
    assert_bitwise_equal,
    dtype_name,
    make_index_target,
    make_logits,
    make_prob_target,
    new_seed,
    random_like_loss,
    random_weight,
    run_ce,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ISA_ORDER = ["default", "avx2", "avx512"]


def _clean_env():
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    return env


@functools.lru_cache(maxsize=None)
def native_capability():
    """torch's CPU capability without ATEN_CPU_CAPABILITY (asked in a clean subprocess,
    in case the test process itself runs with the variable set)."""
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                         env=_clean_env(), capture_output=True, text=True, check=True, timeout=300)
    return out.stdout.strip().splitlines()[-1].lower()


CHILD = textwrap.dedent(r"""
    import os, random, sys
    sys.path.insert(0, {tests_dir!r})
    import torch
    import helpers as H
    import xent_ext

    cap = {cap!r}
    assert torch.backends.cpu.get_cpu_capability().lower() == cap, torch.backends.cpu.get_cpu_capability()
    got = xent_ext.cpu_capability()
    assert got == cap, f"xent_ext.cpu_capability() = {{got!r}} under ATEN_CPU_CAPABILITY={{cap}}"
    seed = {seed}
    torch.manual_seed(seed)
    rng = random.Random(seed)
    n = 0
    for C in (1, 7, 8, 9, 16, 17, 33, 100, 1000, 2049, 5000):
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            for kind in ("index", "prob"):
                N = rng.randint(1, 6) if C > 100 else rng.randint(1, 40)
                shape = (N, C) if rng.random() < 0.7 else (N, C, rng.randint(1, 3))
                layout = rng.choice(H.layouts_for(len(shape)))
                x = H.make_logits(shape, dtype, layout, rng.choice([1.0, 4.0]))
                red = rng.choice(H.REDUCTIONS)
                ls = rng.choice([0.0, 0.1])
                w = H.random_weight(C, dtype) if rng.random() < 0.5 else None
                if kind == "index":
                    ii = rng.randrange(C)
                    t = H.make_index_target(shape, ignore_index=ii, ignore_frac=0.2)
                    wrt = ("input",)
                else:
                    ii = -100
                    t = H.make_prob_target(shape, dtype)
                    wrt = ("input", "target")
                ctx = f"cap={{cap}} seed={{seed}} C={{C}} dtype={{dtype}} kind={{kind}} shape={{shape}} layout={{layout}} red={{red}} ls={{ls}} w={{w is not None}}"
                H.check_against_torch(xent_ext.cross_entropy, x, t, w, reduction=red, ignore_index=ii,
                                      label_smoothing=ls, wrt=wrt, ctx=ctx)
                n += 1
    print("CHILD-OK", got, n)
""")


@pytest.mark.slow
@pytest.mark.parametrize("cap", ISA_ORDER)
def test_forced_isa_matches_torch(cap, fresh_seed):
    native = native_capability()
    if native not in ISA_ORDER:
        pytest.skip(f"torch reports CPU capability {native!r}, not an x86 one")
    if ISA_ORDER.index(cap) > ISA_ORDER.index(native):
        pytest.skip(f"this CPU supports up to {native}; cannot force {cap}")
    env = _clean_env()
    env["ATEN_CPU_CAPABILITY"] = cap
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    code = CHILD.format(tests_dir=TESTS_DIR, cap=cap, seed=fresh_seed)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "CHILD-OK" in proc.stdout, (
        f"ATEN_CPU_CAPABILITY={cap} seed={fresh_seed}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")


# ----------------------------------------------------------------------------------
# determinism: thread count and run to run
# ----------------------------------------------------------------------------------

THREADS = [1, 2, 3]

DET_CASES = [
    # (id, input shape)
    ("few_long_rows", (2, 50000)),
    ("one_long_row_unbatched", (30011,)),
    ("many_short_rows", (6000, 7)),
    ("mid", (64, 1000)),
    ("spatial", (3, 19, 17, 11)),
    ("spatial_long", (2, 4099, 5)),
]


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run_all_threads(x, t, w, kw, wrt, g):
    out = {}
    for n in THREADS:
        torch.set_num_threads(n)
        runs = [run_ce(xent_ext.cross_entropy, x, t, w, g, wrt, **kw) for _ in range(2)]
        out[n] = runs
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("case", DET_CASES, ids=[c[0] for c in DET_CASES])
def test_bitwise_deterministic_across_threads(case, kind, dtype, restore_threads, rng, fresh_seed):
    _, shape = case
    C = shape[0] if len(shape) == 1 else shape[1]
    x = make_logits(shape, dtype, rng.choice(["contiguous", "transposed"]) if len(shape) > 1 else "contiguous")
    w = random_weight(C, dtype) if rng.random() < 0.5 else None
    ls = rng.choice([0.0, 0.1])
    if kind == "index":
        ii = rng.randrange(C)
        t = make_index_target(shape, ignore_index=ii, ignore_frac=0.1)
        kw = dict(ignore_index=ii, label_smoothing=ls)
        wrt = ("input",)
    else:
        t = make_prob_target(shape, dtype)
        kw = dict(label_smoothing=ls)
        wrt = ("input", "target")
    for red in REDUCTIONS:
        kw["reduction"] = red
        loss0, _ = run_ce(xent_ext.cross_entropy, x, t, w, None, (), **kw)
        g = random_like_loss(loss0)
        res = _run_all_threads(x, t, w, kw, wrt, g)
        base_loss, base_grads = res[THREADS[0]][0]
        for n, runs in res.items():
            for i, (loss, grads) in enumerate(runs):
                ctx = f"seed={fresh_seed} case={case[0]} kind={kind} dtype={dtype_name(dtype)} red={red} ls={ls} threads={n} run={i} vs threads={THREADS[0]} run=0"
                assert_bitwise_equal(loss, base_loss, ctx + " loss")
                for name in wrt:
                    assert_bitwise_equal(grads[name], base_grads[name], ctx + f" grad[{name}]")


def test_seed_helper_is_fresh():
    # two fresh seeds differ (unless pinned with XENT_TEST_SEED)
    if os.environ.get("XENT_TEST_SEED"):
        pytest.skip("seed pinned")
    assert new_seed() != new_seed()
