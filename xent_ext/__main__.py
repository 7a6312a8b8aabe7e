"""``python -m xent_ext``: print how this build of xent_ext was made and what it runs on."""

from __future__ import annotations

import torch

import xent_ext


def main() -> None:
    info = xent_ext.build_info()
    print(f"xent_ext {xent_ext.__version__}")
    print(f"  built against torch {info['torch_version']} (running torch {torch.__version__})")
    print(f"  CUDA: {info['cuda_version'] or 'none (CPU-only build)'}")
    if info.get("cuda_archs"):
        print(f"  CUDA archs: {info['cuda_archs']}")
    print(f"  CPU ISAs compiled: {', '.join(info['cpu_isas'])}; in use: {xent_ext.cpu_capability()}")
    print(f"  OpenMP: {'yes' if info['openmp'] else 'no'}; threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
