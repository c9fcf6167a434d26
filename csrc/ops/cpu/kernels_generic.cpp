// The CPU kernels for the baseline instruction set of the build.
#include "kernels_isa.h"

#define BSNAS_CPU_ISA generic
#define BSNAS_VEC_BYTES 16
#include "bn_act_kernel.h"
#include "bn_act_dwconv2d_kernel.h"
#include "channel_stats_kernel.h"
#include "gemm_kernel.h"
#include "masked_dwconv2d_kernel.h"
#include "mbconv_folded_kernel.h"
