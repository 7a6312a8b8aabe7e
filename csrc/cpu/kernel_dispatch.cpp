// Run-time choice of the CPU kernels' ISA.
#include "cpu/kernel_api.h"

#include <ATen/Version.h>

#include <string>

namespace xent_ext {
namespace cpu {

// Note [ISA choice]
// We follow ATen's own choice (at::get_cpu_capability), which honours the
// ATEN_CPU_CAPABILITY environment variable, so tests can force every path and
// xent_ext never runs wider vectors than the rest of torch. ATen reads the
// variable once per process; so do we.
const KernelTable& kernels() {
  static const KernelTable& table = []() -> const KernelTable& {
    const std::string capability = at::get_cpu_capability();
#ifdef XENT_HAVE_AVX512
    if (capability.find("AVX512") != std::string::npos) {
      return kernels_AVX512();
    }
#endif
#ifdef XENT_HAVE_AVX2
    // Also where ATen runs AVX512 but this build compiled no AVX512 kernels.
    if (capability.find("AVX2") != std::string::npos || capability.find("AVX512") != std::string::npos) {
      return kernels_AVX2();
    }
#endif
    return kernels_DEFAULT();
  }();
  return table;
}

}  // namespace cpu
}  // namespace xent_ext
