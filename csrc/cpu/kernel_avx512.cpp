// The CPU kernels compiled for AVX512 (flags set by setup.py / CMakeLists.txt:
// -DCPU_CAPABILITY=AVX512 -DCPU_CAPABILITY_AVX512 plus the ISA's -m flags).
#include "cpu/kernel/entry.h"
