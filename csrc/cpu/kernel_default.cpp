// The CPU kernels compiled for DEFAULT (flags set by setup.py / CMakeLists.txt:
// -DCPU_CAPABILITY=DEFAULT -DCPU_CAPABILITY_DEFAULT plus the ISA's -m flags).
#include "cpu/kernel/entry.h"
