#!/usr/bin/env bash
# A newcomer's first run, checked as the README tells it, from a fresh clone
# in fresh environments:
#   1. the README's Quick start commands, pasted as written (read from
#      README.md), once with a CUDA build of torch on a machine whose CUDA_HOME
#      has an nvcc but no CUDA headers (the build must fall back to the CPU
#      kernels and say so), once with a CPU build of torch;
#   2. `pip install .` with build isolation into an environment that has
#      torch: it must stop within a minute and say what to run, and leave the
#      installed torch as it was;
#   3. importing xent_ext from a clone's root that has no compiled module
#      must say exactly that.
#
#   scripts/ci/first_run.sh PYTHON [CPU_TORCH_VERSION]
#
# Called by .ci/run. Needs the package index (torch is installed the way the
# README says: `pip install torch`).
set -euo pipefail
PY=${1:?usage: first_run.sh PYTHON [CPU_TORCH_VERSION]}
CPU_TORCH=${2:-2.13.0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "first_run.sh: FAILED: $*" >&2; exit 1; }

# The Quick start block: the first ```sh block after "## Quick start".
QUICK_START=$(awk '/^## Quick start/{q=1} q&&/^```sh/{b=1; next} b&&/^```/{exit} b' "$ROOT/README.md")
[ "$(printf '%s\n' "$QUICK_START" | grep -c .)" = 2 ] || fail "README's Quick start should hold two commands, found: $QUICK_START"
echo "README's Quick start:"; printf '%s\n' "$QUICK_START" | sed 's/^/  /'

# Runs the Quick start in a fresh clone named as the project is (xent_ext,
# in $WORK/NAME/), in a clean environment (no virtualenv active) plus the
# given variables.
quick_start() {
  local name=$1; shift
  local clone="$WORK/$name/xent_ext"
  mkdir -p "$WORK/$name"
  git clone -q "$ROOT" "$clone"
  echo "--- Quick start, $name"
  local start=$(date +%s)
  if ! (cd "$clone" && env -u VIRTUAL_ENV PATH="$(dirname "$(command -v "$PY")"):/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
      "$@" bash -euo pipefail -c "$QUICK_START") >"$WORK/$name.log" 2>&1; then
    tail -n 60 "$WORK/$name.log"
    fail "the Quick start failed ($name)"
  fi
  # The package is found from the clone's parent folder too, where a folder
  # named xent_ext (the clone) stands in the current directory.
  (cd "$WORK/$name" && "$clone/.venv/bin/python" -c "import xent_ext; xent_ext.build_info()") ||
    fail "after the Quick start, xent_ext does not import from the clone's parent folder ($name)"
  tail -n 22 "$WORK/$name.log" | sed 's/^/  /'
  echo "--- Quick start, $name: passed in $(($(date +%s) - start))s"
}

# 1a. A CUDA build of torch (what `pip install torch` gives on Linux) and a
# CUDA_HOME whose nvcc answers but whose include/ is missing: the build must
# compile the CPU kernels and say why CUDA is off.
FAKE_CUDA="$WORK/cuda-without-headers"
mkdir -p "$FAKE_CUDA/bin"
cat >"$FAKE_CUDA/bin/nvcc" <<'NVCC'
#!/bin/sh
echo "nvcc: NVIDIA (R) Cuda compiler driver"
echo "Cuda compilation tools, release 13.0, V13.0.88"
NVCC
chmod +x "$FAKE_CUDA/bin/nvcc"
quick_start cuda-torch CUDA_HOME="$FAKE_CUDA" MAX_JOBS="${MAX_JOBS:-2}"
(cd "$WORK" && "$WORK/cuda-torch/xent_ext/.venv/bin/python" -) <<'PYCHECK' || fail "the CUDA-torch build without CUDA headers is not a CPU build"
import torch, xent_ext
info = xent_ext.build_info()
assert torch.version.cuda, "expected a CUDA build of torch"
assert not info.get("cuda_version"), f"expected a CPU-only xent_ext, got {info}"
x = torch.randn(64, 1000, requires_grad=True); y = torch.randint(1000, (64,))
loss = xent_ext.cross_entropy(x, y); loss.backward()
ref = torch.nn.functional.cross_entropy(x, y)
assert torch.allclose(loss, ref, rtol=1e-5), (loss, ref)
print("CUDA torch", torch.__version__, "+ CPU-only xent_ext", xent_ext.__version__, ": smoke test passed")
PYCHECK

# The one line that says why (pip shows a build's output with -v only).
why=$(cd "$WORK/cuda-torch/xent_ext" && CUDA_HOME="$FAKE_CUDA" .venv/bin/python setup.py --version 2>&1 | grep "CUDA .*off:" || true)
echo "the build said: $why"
case "$why" in *off:*CUDA_HOME*) ;; *) fail "the build did not say why CUDA is off and what to set";; esac
# A CUDA torch's environment is about 5.5 GB: gone before the next one.
rm -rf "$WORK/cuda-torch"

# 1b. A CPU build of torch (pip's choice pinned by a constraint; the command
# itself is the README's).
echo "torch==$CPU_TORCH" >"$WORK/cpu-torch.txt"
quick_start cpu-torch PIP_CONSTRAINT="$WORK/cpu-torch.txt" MAX_JOBS="${MAX_JOBS:-2}"
rm -rf "$WORK/cpu-torch"

# 2. Build isolation never replaces the user's torch.
VENV="$WORK/isolated"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet "torch==$CPU_TORCH"
before=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
git clone -q "$ROOT" "$WORK/isolated-src"
start=$(date +%s)
if "$VENV/bin/python" -m pip install "$WORK/isolated-src" >"$WORK/isolated.log" 2>&1; then
  echo "pip install . with build isolation built against the installed torch"
else
  grep -q -- "--no-build-isolation" "$WORK/isolated.log" || { tail -n 30 "$WORK/isolated.log"; fail "the isolated build failed without saying what to run"; }
  echo "pip install . with build isolation stopped after $(($(date +%s) - start))s, saying:"
  grep -A3 "xent_ext build:" "$WORK/isolated.log" | head -n 8 | sed 's/^/  /'
  [ $(($(date +%s) - start)) -le 60 ] || fail "the isolated build took more than a minute to stop"
fi
after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
[ "$before" = "$after" ] || fail "pip replaced torch $before with $after"
echo "torch stayed $after"
# What the message says to run works, pins the torch it built against, and
# writes nothing into the source tree's package (one ISA, to keep CI short).
"$VENV/bin/python" -m pip install --quiet ninja setuptools wheel
(cd "$WORK" && XENT_EXT_ISAS=default "$VENV/bin/python" -m pip install --quiet --no-build-isolation "$WORK/isolated-src") ||
  fail "pip install --no-build-isolation . failed"
after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
[ "$before" = "$after" ] || fail "pip install --no-build-isolation replaced torch $before with $after"
(cd "$WORK" && "$VENV/bin/python" -c "
import importlib.metadata as m, torch
req = [r.replace(' ', '') for r in m.requires('xent_ext') if r.startswith('torch')]
assert req == ['torch==' + torch.__version__.split('+')[0]], req
print('a source build requires', req[0])") || fail "a source build does not pin the torch it was built against"
written=$(git -C "$WORK/isolated-src" status --porcelain --ignored --untracked-files=all -- xent_ext)
[ -z "$written" ] || fail "the build wrote into the source tree's package: $written"
echo "nothing written into the source tree's package"

# 3. Importing from a source tree without a compiled module.
git clone -q "$ROOT" "$WORK/bare"
if (cd "$WORK/bare" && "$VENV/bin/python" -c "import xent_ext") >"$WORK/bare.log" 2>&1; then
  fail "importing xent_ext from a source tree without a compiled module succeeded"
fi
grep -q "no compiled module" "$WORK/bare.log" || { cat "$WORK/bare.log"; fail "the import error does not say the compiled module is missing"; }
echo "import from a source tree without a build says:"; grep -A2 "ImportError" "$WORK/bare.log" | tail -n 3 | sed 's/^/  /'
echo "first run: all checks passed"
