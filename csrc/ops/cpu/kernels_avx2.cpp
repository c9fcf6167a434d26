// The CPU kernels compiled for AVX2 + FMA (see kernels_isa.h).
#include "kernels_isa.h"

#ifdef BSNAS_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c,popcnt")
#define BSNAS_CPU_ISA avx2
#define BSNAS_VEC_BYTES 32
#include "bn_act_kernel.h"
#include "bn_act_dwconv2d_kernel.h"
#include "channel_stats_kernel.h"
#include "gemm_kernel.h"
#include "masked_dwconv2d_kernel.h"
#include "mbconv_folded_kernel.h"
#pragma GCC pop_options
#endif
