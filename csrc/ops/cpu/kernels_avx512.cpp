// The CPU kernels compiled for AVX-512 (F, BW, VL, DQ) + FMA (see kernels_isa.h).
#include "kernels_isa.h"

#ifdef BSNAS_CPU_X86_VARIANTS
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi,bmi2,f16c,popcnt")
#define BSNAS_CPU_ISA avx512
#define BSNAS_VEC_BYTES 64
#include "bn_act_kernel.h"
#include "bn_act_dwconv2d_kernel.h"
#include "channel_stats_kernel.h"
#include "gemm_kernel.h"
#include "masked_dwconv2d_kernel.h"
#include "mbconv_folded_kernel.h"
#pragma GCC pop_options
#endif
