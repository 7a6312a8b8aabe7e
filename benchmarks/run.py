"""The project's benchmark harness: ``python benchmarks/run.py [--device cuda] ...`` from the repository root.

Times xent_ext (as importable: installed, or built in place in the source
tree) against torch eager, torch.compile and, on CUDA, Liger Kernel and
QuACK, and checks the project's performance targets (benchmarks/README.md).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # the harness package
try:  # installed, or on PYTHONPATH
    import xent_ext  # noqa: F401
except ModuleNotFoundError:  # built in place (setup.py build_ext --inplace): the repository root
    sys.path.insert(0, os.path.dirname(HERE))

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
