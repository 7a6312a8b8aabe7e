// The Python module xent_ext._C: importing it loads the library, whose static
// initializers register the torch.ops.xent_ext operators (csrc/ops.cpp, csrc/cpu/ops_cpu.cpp,
// csrc/cuda/ops_cuda.cpp); the functions here report how it was built.
#include "cpu/kernel_api.h"
#include "ops_common.h"
#ifdef XENT_WITH_CUDA
#include "cuda/kernel_api.h"
#endif

#include <torch/version.h>
#include <pybind11/pybind11.h>

#include <cctype>
#include <string>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "xent_ext compiled core: importing it registers the torch.ops.xent_ext operators.";
  m.def(
      "build_info",
      []() {
        pybind11::dict info;
        info["torch_version"] = TORCH_VERSION;
#ifdef XENT_WITH_CUDA
        const int v = xent_ext::cuda::runtime_version_built();
        info["cuda_version"] = std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
        // nvcc's list ("800,900") as torch writes arch names ("8.0", "9.0").
        pybind11::list archs;
        std::string list = xent_ext::cuda::compiled_archs();
        size_t begin = 0;
        while (begin < list.size()) {
          size_t end = list.find(',', begin);
          if (end == std::string::npos) {
            end = list.size();
          }
          const int arch = std::stoi(list.substr(begin, end - begin));
          archs.append(std::to_string(arch / 100) + "." + std::to_string((arch % 100) / 10));
          begin = end + 1;
        }
        info["cuda_archs"] = archs;
#else
        info["cuda_version"] = pybind11::none();
        info["cuda_archs"] = pybind11::none();
#endif
        pybind11::list isas;
        isas.append("default");
#ifdef XENT_HAVE_AVX2
        isas.append("avx2");
#endif
#ifdef XENT_HAVE_AVX512
        isas.append("avx512");
#endif
        info["cpu_isas"] = isas;
#ifdef _OPENMP
        info["openmp"] = true;
        info["openmp_version"] = static_cast<int>(_OPENMP);
#else
        info["openmp"] = false;
        info["openmp_version"] = pybind11::none();
#endif
#ifdef _GLIBCXX_USE_CXX11_ABI
        info["cxx11_abi"] = static_cast<bool>(_GLIBCXX_USE_CXX11_ABI);
#endif
        return info;
      },
      "How this extension was built: torch version, CUDA version and archs (None for a CPU-only "
      "build), CPU ISAs compiled, OpenMP.");
  m.def(
      "cpu_capability",
      []() {
        std::string isa = xent_ext::cpu::kernels().isa;
        for (char& ch : isa) {
          ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        }
        return isa;
      },
      "The CPU ISA whose kernels are in use: 'default', 'avx2' or 'avx512'.");
  m.def(
      "set_cuda_target_check",
      [](bool enabled) { return xent_ext::ops::cuda_target_check().exchange(enabled); },
      pybind11::arg("enabled"),
      "Turn the CUDA forward's class-index check (one host sync) on or off; returns the previous setting.");
  m.def(
      "cuda_target_check", []() { return xent_ext::ops::cuda_target_check().load(); },
      "Whether the CUDA forward checks class indices (Note [Target check on the GPU]).");
}
