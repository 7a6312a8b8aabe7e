"""The build knows what it was built for, and says so when it meets another torch.

Importing a build made for another torch minor, CUDA major or C++ ABI
must raise an ImportError that names what was expected, what was found and
what to install, never a bare ``undefined symbol``.
"""

import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import xent_ext
from xent_ext import _compat
from xent_ext._compat import BuildIdentity, RunningTorch

PACKAGE_DIR = pathlib.Path(xent_ext.__file__).resolve().parent
FROM_SOURCE_TREE = (PACKAGE_DIR.parent / "setup.py").exists()


def _build(major_minor=(2, 14), cuda="13.0", abi=True):
    tag = "cu" + cuda.replace(".", "") if cuda else "cpu"
    return BuildIdentity(f"0.1.0+pt{major_minor[0]}{major_minor[1]}{tag}", f"{major_minor[0]}.{major_minor[1]}.1",
                         major_minor, cuda, abi)


@pytest.mark.parametrize(
    "build, running, words",
    [
        (_build((2, 14), "13.0"), RunningTorch("2.13.0+cu130", "13.0", True),
         ["torch 2.14 was expected", "torch 2.13.0+cu130 was found", "0.1.0+pt213cu130", "torch==2.14.*"]),
        (_build((2, 14), "13.0"), RunningTorch("2.14.1+cpu", None, True),
         ["a CUDA 13.0 build of torch was expected", "a CPU build was found", "0.1.0+pt214cpu"]),
        (_build((2, 14), "12.8"), RunningTorch("2.14.1+cu130", "13.0", True),
         ["CUDA 12.x was expected", "torch uses CUDA 13.0", "0.1.0+pt214cu130"]),
        (_build((2, 14), None, abi=False), RunningTorch("2.14.1", None, True),
         ["_GLIBCXX_USE_CXX11_ABI=0) was expected", "_GLIBCXX_USE_CXX11_ABI=1"]),
    ],
    ids=["torch-minor", "cuda-build-on-cpu-torch", "cuda-major", "cxx-abi"],
)
def test_mismatch_names_expected_found_and_what_to_install(build, running, words):
    message = _compat.mismatch(build, running)
    assert message is not None
    assert message.startswith(f"xent_ext {build.version} was built for")
    assert "pip install" in message
    for w in words:
        assert w in message, (w, message)


@pytest.mark.parametrize(
    "build, running",
    [
        (_build((2, 14), "13.0"), RunningTorch("2.14.1+cu130", "13.0", True)),
        (_build((2, 14), "13.0"), RunningTorch("2.14.0", "13.2", True)),  # same CUDA major
        (_build((2, 14), None), RunningTorch("2.14.1+cu130", "13.0", True)),  # CPU-only build, CUDA torch
        (_build((2, 13), None), RunningTorch("2.13.0+cpu", None, True)),
    ],
    ids=["exact", "cuda-minor-differs", "cpu-build-on-cuda-torch", "cpu"],
)
def test_compatible_builds_pass(build, running):
    assert _compat.mismatch(build, running) is None


def test_this_build_matches_the_running_torch():
    build = _compat.build_identity()
    assert build is not None, "xent_ext/_build_config.py is missing: setup.py writes it at build time"
    assert _compat.mismatch(build, _compat.running_torch()) is None
    assert xent_ext.__version__ == build.version
    info = xent_ext.build_info()
    assert build.torch_version == info["torch_version"]
    assert build.cuda_version == info["cuda_version"]


def test_deliberate_torch_mismatch_raises_clear_import_error(tmp_path):
    """A copy of this very build, relabelled as made for another torch minor, must refuse to load."""
    copy = tmp_path / "xent_ext"
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "_build_config.py"
    text = config.read_text()
    text = re.sub(r"TORCH_MAJOR_MINOR = \(\d+, \d+\)", "TORCH_MAJOR_MINOR = (2, 99)", text)
    text = re.sub(r"VERSION = '([\d.]+)\+pt\d+", r"VERSION = '\1+pt299", text, count=1)
    config.write_text(text)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", "import xent_ext"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    err = proc.stderr
    assert "ImportError: xent_ext 0.1.0+pt299" in err, err
    assert "torch 2.99 was expected" in err and f"torch {torch.__version__} was found" in err, err
    assert "pip install" in err, err
    assert "undefined symbol" not in err, err


def test_info_command():
    proc = subprocess.run([sys.executable, "-m", "xent_ext", "info"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f"xent_ext {xent_ext.__version__}")
    for words in ("built for: torch", "running:   torch", "CPU ISAs compiled:", "in use:", "threads:"):
        assert words in out, (words, out)


@pytest.mark.skipif(FROM_SOURCE_TREE, reason="xent_ext is imported from a source tree, not an installed wheel")
def test_installed_metadata_pins_the_torch_minor():
    dist = importlib.metadata.distribution("xent_ext")
    assert dist.version == xent_ext.__version__
    major, minor = _compat.running_torch().major_minor
    requires = dist.requires or []
    assert f"torch<{major}.{minor + 1},>={major}.{minor}" in [r.replace(" ", "") for r in requires], requires
