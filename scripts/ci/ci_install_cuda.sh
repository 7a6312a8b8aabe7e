#!/usr/bin/env bash
# Install the CUDA toolkit's compiler (nvcc) on an Ubuntu CI runner, for
# compiling (not running) the CUDA kernels against torch's CUDA build.
#   scripts/ci/ci_install_cuda.sh 13.0
set -euo pipefail
VERSION=${1:?usage: ci_install_cuda.sh MAJOR.MINOR}
if [ -x /usr/local/cuda/bin/nvcc ]; then /usr/local/cuda/bin/nvcc --version; exit 0; fi
. /etc/os-release
repo="ubuntu${VERSION_ID//./}"
wget -q "https://developer.download.nvidia.com/compute/cuda/repos/${repo}/x86_64/cuda-keyring_1.1-1_all.deb"
sudo dpkg -i cuda-keyring_1.1-1_all.deb
sudo apt-get update -q
sudo apt-get install -y -q "cuda-nvcc-${VERSION//./-}" "cuda-cudart-dev-${VERSION//./-}"
sudo ln -sfn "/usr/local/cuda-${VERSION}" /usr/local/cuda
/usr/local/cuda/bin/nvcc --version
