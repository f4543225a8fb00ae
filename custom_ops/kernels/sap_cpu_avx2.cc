// The AVX2 level (x86-64-v3: AVX2, FMA, F16C, BMI2): CMakeLists.txt compiles this file alone with those flags.
#define SAP_SIMD_ENTRY run_cpu_avx2
#include "sap_cpu_simd.h"
