// The CPU kernels for the baseline instruction set of the build.
#include "kernels_isa.h"

#define BSNAS_CPU_ISA generic
#define BSNAS_VEC_BYTES 16
#include "bn_act_cpu.h"
#include "bn_act_dwconv2d_cpu.h"
#include "channel_stats_cpu.h"
#include "gemm_cpu.h"
#include "masked_dwconv2d_cpu.h"
#include "mbconv_folded_cpu.h"
