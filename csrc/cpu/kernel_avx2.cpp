// The CPU kernels compiled for AVX2 (flags set by setup.py / CMakeLists.txt:
// -DCPU_CAPABILITY=AVX2 -DCPU_CAPABILITY_AVX2 plus the ISA's -m flags).
#include "cpu/kernel/entry.h"
