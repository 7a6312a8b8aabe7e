"""``python -m xent_ext [info]``: how this build of xent_ext was made and what it runs on."""

from __future__ import annotations

import argparse

import torch

import xent_ext


def info() -> None:
    build = xent_ext.build_info()
    print(f"xent_ext {xent_ext.__version__} ({xent_ext.__file__})")
    print(f"  built for: torch {build['torch_version']}, "
          f"CUDA {build['cuda_version'] or 'none (CPU-only build)'}, C++11 ABI {build.get('cxx11_abi')}")
    print(f"  running:   torch {torch.__version__}, CUDA {torch.version.cuda or 'none (CPU build)'}, "
          f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none visible'}")
    if build["cuda_archs"]:
        print(f"  CUDA archs compiled: {', '.join(build['cuda_archs'])}; "
              f"target check: {'on' if xent_ext.cuda_target_check() else 'off'}")
    print(f"  CPU ISAs compiled: {', '.join(build['cpu_isas'])}; in use: {xent_ext.cpu_capability()}")
    openmp = f"OpenMP {build['openmp_version']}" if build["openmp"] else "no OpenMP"
    print(f"  threads: {torch.get_num_threads()} ({openmp})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xent_ext", description=__doc__)
    parser.add_argument("command", nargs="?", default="info", choices=["info"],
                        help="info (default): version, the torch and CUDA built for, CUDA archs, CPU ISAs, threads")
    parser.parse_args(argv)
    info()


if __name__ == "__main__":
    main()
