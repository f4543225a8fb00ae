// The AVX-512 level (F, DQ, BW, VL over x86-64-v3): CMakeLists.txt compiles this file alone with those flags.
#define SAP_SIMD_ENTRY run_cpu_avx512
#include "sap_cpu_simd.h"
