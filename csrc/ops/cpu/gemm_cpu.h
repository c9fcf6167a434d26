#pragma once
// A float32 GEMM for the 1x1 convolutions of masked_pwconv2d on CPU: C = A B with A, B
// read through arbitrary element strides (the active block of a full weight is a
// strided view; nothing is sliced into a tensor) and C written with unit column
// stride. Compiled once per instruction set (kernels_isa.h).
//
// Why not at::mm: on the dev box (tenth session, AMD EPYC, 2 threads) MKL's sgemm behind
// at::mm ran at about half the speed of oneDNN's 1x1 convolutions (the slicing
// baseline); oneDNN's own matmul is reachable only through at::native::mkldnn_matmul,
// which copies a non-contiguous weight block into a tensor first.
//
// Register tiles of MR rows x 2 vectors of columns: per k, two B vectors and MR
// broadcasts of A feed 2 * MR multiply-adds. B is read in place where its columns are
// unit-stride (activations, or weight rows), else packed once into [k][2 vectors]
// panels (the weight's transposed block, a few hundred KB at most).
#include "dwconv_simd.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {
namespace simd {

// Rows of a register tile: 2 * MR accumulators + 2 B vectors + a broadcast fit in 32
// registers at 8 rows, in 16 at 6.
constexpr int kGemmRows = BSNAS_VEC_BYTES == 64 ? 8 : 6;

// C[r][j] (+)= sum_k A(r, k) B(k, j) for r < R, j < nvalid (<= 2V): A(r, k) = a[r *
// as_m + k * as_k], B(k, j) = b[k * bs_k + j]; added to C with `add`, stored over it
// otherwise. Masked: B's columns past nvalid are not read.
template <int R, bool Masked>
__attribute__((noinline)) void gemm_tile(int64_t K, const float* a, int64_t as_m,
                                         int64_t as_k, const float* b, int64_t bs_k,
                                         int64_t nvalid, float* c, int64_t ldc, bool add) {
  constexpr int64_t V = kLanes<float>;
  const int64_t n0 = std::min(nvalid, V), n1 = std::max<int64_t>(0, nvalid - V);
  Vec<float> acc0[R], acc1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = Vec<float>{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * bs_k;
    Vec<float> b0 = Masked ? vload_first(bk, n0) : vload(bk);
    Vec<float> b1 = Masked ? vload_first(bk + V, n1) : vload(bk + V);
    pin<float>(b0);
    pin<float>(b1);
    const float* ak = a + k * as_k;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const Vec<float> av = vsplat(ak[r * as_m]);
      acc0[r] += av * b0;
      acc1[r] += av * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (add) {
      acc0[r] += vload_first(cr, n0);
      acc1[r] += vload_first(cr + V, n1);
    }
    if (!Masked) {
      vstore(cr, acc0[r]);
      vstore(cr + V, acc1[r]);
    } else {
      vstore_part(cr, acc0[r], n0);
      if (n1 > 0) vstore_part(cr + V, acc1[r], n1);
    }
  }
}

}  // namespace simd

// Depth of one pass of a register tile: partial sums of at most this many products
// are added to C in float (a long reduction, as the weight gradient's over every
// pixel, then errs like a sum of K / kGemmDepth terms, not of K).
constexpr int64_t kGemmDepth = 512;

// C[m][n] (row stride ldc) (+)= sum_k A(m, k) B(k, n), A(m, k) = a[m * as_m + k * as_k],
// B(k, n) = b[k * bs_k + n * bs_n] (added to C with `add`); M, N, K >= 1. Tasks over
// row tiles; every tile runs through all column panels, kGemmDepth of k at a time (its
// A rows stay in L1, the panels come from L2).
void gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t as_m, int64_t as_k,
              const float* b, int64_t bs_k, int64_t bs_n, float* c, int64_t ldc, bool add) {
  using namespace simd;
  constexpr int64_t V = kLanes<float>, NR = 2 * V, MR = kGemmRows;
  const int64_t panels = (N + NR - 1) / NR;
  std::vector<float> packed;
  const float* bsrc = b;
  int64_t pk = bs_k, pstride = NR;  // B panel p at bsrc + p * pstride, k stride pk
  if (bs_n != 1) {
    packed.assign(static_cast<size_t>(panels * K * NR), 0.f);
    at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < NR && p * NR + j < N; ++j)
            packed[(p * K + k) * NR + j] = b[k * bs_k + (p * NR + j) * bs_n];
    });
    bsrc = packed.data();
    pk = NR;
    pstride = K * NR;
  }
  const int64_t tiles = (M + MR - 1) / MR;
  at::parallel_for(0, tiles, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, N * K)),
                   [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t m0 = t * MR;
      // One call: for_blocks hands a run of at most 8 <= MR rows its compile-time size.
      for_blocks(std::min(MR, M - m0), [&](int64_t, auto RT) {
        constexpr int R = decltype(RT)::value;
        for (int64_t k0 = 0; k0 < K; k0 += kGemmDepth) {
          const int64_t kd = std::min(kGemmDepth, K - k0);
          const float* ak = a + m0 * as_m + k0 * as_k;
          for (int64_t p = 0; p < panels; ++p) {
            const int64_t nv = std::min(NR, N - p * NR);
            const float* bp = bsrc + p * pstride + k0 * pk;
            float* cp = c + m0 * ldc + p * NR;
            const bool acc = add || k0 > 0;
            if (nv == NR) gemm_tile<R, false>(kd, ak, as_m, as_k, bp, pk, nv, cp, ldc, acc);
            else gemm_tile<R, true>(kd, ak, as_m, as_k, bp, pk, nv, cp, ldc, acc);
          }
        }
      });
    }
  });
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
