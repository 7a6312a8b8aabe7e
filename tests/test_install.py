"""The build knows what it was built for, and says so when it meets another torch.

Importing a build made for another torch minor, CUDA major or C++ ABI
must raise an ImportError that names what was expected, what was found and
what to run, never a bare ``undefined symbol``; importing a package folder
that has no compiled module must say exactly that.
"""

import importlib.machinery
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
         ["torch 2.14 was expected", "torch 2.13.0+cu130 was found", "torch==2.14.*"]),
        (_build((2, 14), "13.0"), RunningTorch("2.14.1+cpu", None, True),
         ["a CUDA 13.0 build of torch was expected", "a CPU build was found"]),
        (_build((2, 14), "12.8"), RunningTorch("2.14.1+cu130", "13.0", True),
         ["CUDA 12.x was expected", "torch uses CUDA 13.0"]),
        (_build((2, 14), None, abi=False), RunningTorch("2.14.1", None, True),
         ["_GLIBCXX_USE_CXX11_ABI=0) was expected", "_GLIBCXX_USE_CXX11_ABI=1"]),
    ],
    ids=["torch-minor", "cuda-build-on-cpu-torch", "cuda-major", "cxx-abi"],
)
def test_mismatch_names_expected_found_and_what_to_install(build, running, words):
    message = _compat.mismatch(build, running)
    assert message is not None
    assert message.startswith(f"xent_ext {build.version} was built for")
    for w in words:
        assert w in message, (w, message)
    # What to run: a rebuild from source, never an xent_ext build other than this one
    # (no such wheels are published).
    assert "pip install --no-build-isolation --force-reinstall --no-deps " in message, message
    assert set(re.findall(r"\d+\.\d+\.\d+\+\w+", message)) <= {build.version, running.version}, message


def test_rebuild_command_names_the_source_tree(tmp_path):
    package = tmp_path / "xent_ext"
    package.mkdir()
    assert _compat.rebuild_command(str(package)).endswith("<path to a clone of xent_ext>")
    (tmp_path / "setup.py").write_text("")
    assert _compat.rebuild_command(str(package)).endswith(f" {tmp_path}")


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
def test_installed_metadata_pins_the_torch_it_was_built_for():
    """A release wheel requires its torch minor; a build from source, exactly its torch (Note [Build identity])."""
    dist = importlib.metadata.distribution("xent_ext")
    assert dist.version == xent_ext.__version__
    running = _compat.running_torch()
    major, minor = running.major_minor
    torch_requires = [r.replace(" ", "") for r in dist.requires or [] if r.startswith("torch")]
    release = {f"torch<{major}.{minor + 1},>={major}.{minor}", f"torch>={major}.{minor},<{major}.{minor + 1}"}
    source = {f"torch=={running.version.split('+')[0]}"}
    assert len(torch_requires) == 1 and torch_requires[0] in release | source, torch_requires


def _package_copy(tmp_path, *, with_compiled_module, source_tree, torch_major_minor=None):
    """A copy of this package under tmp_path, with or without its compiled module, in a source tree or not."""
    copy = tmp_path / "xent_ext"
    ignore = ["__pycache__"] + ([] if with_compiled_module else ["_C.*"])
    shutil.copytree(PACKAGE_DIR, copy, ignore=shutil.ignore_patterns(*ignore))
    if source_tree:
        (tmp_path / "setup.py").write_text("raise SystemExit('not run by these tests')\n")
    if torch_major_minor is not None:
        # The state a pip install leaves in the source tree: a config for the torch built against.
        major, minor = torch_major_minor
        (copy / "_build_config.py").write_text(
            f"VERSION = '0.1.0+pt{major}{minor}cu130'\nTORCH_VERSION = '{major}.{minor}.1'\n"
            f"TORCH_MAJOR_MINOR = ({major}, {minor})\nCUDA_VERSION = '13.0'\nCXX11_ABI = True\n"
        )
    return copy


def _import_in(folder, code="import xent_ext"):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_import_from_a_source_tree_without_compiled_module_says_so(tmp_path):
    """Python run from a clone's root imports its xent_ext/ folder, which has no _C*.so after `pip install .`."""
    copy = _package_copy(tmp_path, with_compiled_module=False, source_tree=True, torch_major_minor=(2, 99))
    proc = _import_in(tmp_path)
    assert proc.returncode != 0
    err = proc.stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: xent_ext was imported from {copy}, a source folder with no compiled "
                           f"module (_C"), err
    for words in ("run from another folder", "python setup.py build_ext --inplace", "pip install",
                  f"-e {tmp_path}"):
        assert words in last, (words, err)
    assert "was built for" not in err and "expected" not in err, err  # not blamed on a torch mismatch


def test_import_of_an_installed_package_without_compiled_module_says_so(tmp_path):
    copy = _package_copy(tmp_path, with_compiled_module=False, source_tree=False)
    proc = _import_in(tmp_path)
    assert proc.returncode != 0
    assert f"ImportError: xent_ext was imported from {copy}, which has no compiled module" in proc.stderr
    assert "Reinstall xent_ext from source: pip install" in proc.stderr, proc.stderr


def test_missing_compiled_module_looks_for_the_extension_file(tmp_path):
    (tmp_path / "setup.py").write_text("")
    package = tmp_path / "xent_ext"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "_C.txt").write_text("")
    assert _compat.missing_compiled_module(str(package)) is not None
    (package / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    assert _compat.missing_compiled_module(str(package)) is None
    assert _compat.missing_compiled_module(str(PACKAGE_DIR)) is None  # this very build


@pytest.mark.parametrize(
    "build_cuda, torch_cuda, gpus, warns",
    [(None, "13.0", 1, True), (None, "13.0", 0, False), ("13.0", "13.0", 1, False), (None, None, 0, False)],
    ids=["cpu-build-gpu-visible", "cpu-build-no-gpu", "cuda-build", "cpu-torch"],
)
def test_cpu_only_build_on_gpu_warning(monkeypatch, build_cuda, torch_cuda, gpus, warns):
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    message = _compat.cpu_only_build_on_gpu_warning(build_cuda)
    assert (message is not None) == warns
    if warns:
        assert "without its CUDA kernels" in message and "torch's own implementation" in message, message
        assert "CUDA 13.x toolkit" in message and "CUDA_HOME" in message, message


@pytest.mark.skipif(xent_ext.build_info()["cuda_version"] is not None, reason="a build with CUDA kernels")
def test_cpu_only_build_warns_once_at_import_when_a_gpu_is_visible(tmp_path):
    code = (
        "import warnings, torch\n"
        "torch.version.cuda = '13.0'\n"
        "torch.cuda.device_count = lambda: 1\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import xent_ext, importlib\n"
        "    import xent_ext.functional\n"
        "mine = [w for w in caught if 'without its CUDA kernels' in str(w.message)]\n"
        "print(len(mine), mine[0].category.__name__ if mine else None)\n"
    )
    proc = _import_in(PACKAGE_DIR.parent, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "UserWarning"], proc.stdout


def test_devices_without_kernels_go_to_torch(monkeypatch):
    """A build without CUDA kernels hands CUDA tensors to torch; shown here with the CPU taken off the list."""
    from xent_ext import functional

    built_cuda = xent_ext.build_info()["cuda_version"] is not None
    assert functional._KERNEL_DEVICES == (("cpu", "cuda") if built_cuda else ("cpu",))

    g = torch.Generator().manual_seed(16)
    logits = torch.randn(6, 9, generator=g, dtype=torch.float64)
    target = torch.randint(9, (6,), generator=g)
    x_ref = logits.clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(x_ref, target, label_smoothing=0.2)
    ref.backward()

    calls = []
    torch_impl = torch._C._nn.cross_entropy_loss

    def spy(*args):
        calls.append(args[0].device.type)
        return torch_impl(*args)

    monkeypatch.setattr(torch._C._nn, "cross_entropy_loss", spy)
    for kernel_devices, handed_over in ((("cpu",), []), ((), ["cpu"])):
        monkeypatch.setattr(functional, "_KERNEL_DEVICES", kernel_devices)
        calls.clear()
        x = logits.clone().requires_grad_()
        loss = xent_ext.cross_entropy(x, target, label_smoothing=0.2)
        loss.backward()
        assert calls == handed_over
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
