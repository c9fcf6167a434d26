#pragma once
// A float32 GEMM for the 1x1 convolutions of masked_pwconv2d on CPU: C = A B (over a
// batch of matrices) with A, B read through arbitrary element strides (the active
// block of a full weight is a strided view; nothing is sliced into a tensor) and C
// written with unit column stride. Compiled once per instruction set (kernels_isa.h).
//
// Why not at::mm: MKL's sgemm behind at::mm runs at about half the speed of oneDNN's 1x1
// convolutions (the slicing baseline; docs/performance.md); oneDNN's own matmul is
// reachable only through at::native::mkldnn_matmul, which copies a non-contiguous weight block into a tensor first.
//
// Register tiles of MR rows x 2 vectors of columns: per k, two B vectors and MR
// broadcasts of A feed 2 * MR multiply-adds. B is read in place where its columns are
// unit-stride (activations, or weight rows), else packed once into [k][2 vectors]
// panels (the weight's transposed block; x[n]^T for the NCHW weight gradient). A last
// panel of at most one vector runs through taller one-vector tiles.
#include <algorithm>
#include <memory>

#include "dwconv_simd.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {
namespace simd {

// A read with a long stride along k (the channels_last weight gradient's A, grad_out
// transposed: one line per pixel, the next pixel a whole row away) is prefetched this
// many k ahead: the hardware prefetchers left the first load of each pixel waiting
// (41 % of the tile's samples on one instruction, 112x112 16->96).
constexpr int64_t kGemmPrefetch = 32;

// Rows of a register tile: 2 * MR accumulators + 2 B vectors + a broadcast fit in 32
// registers at 8 rows, in 16 at 6.
constexpr int kGemmRows = BSNAS_VEC_BYTES == 64 ? 8 : 6;

// C[r][j] (+)= sum_k A(r, k) B(k, j) for r < R, j < nvalid (<= 2V): A(r, k) = a[r *
// as_m + k * as_k], B(k, j) = b[k * bs_k + j]; added to C with `add`, stored over it
// otherwise. Masked: B's columns past nvalid are not read.
template <int R, bool Masked, bool Stream = false>
__attribute__((noinline)) void gemm_tile(int64_t K, const float* a, int64_t as_m,
                                         int64_t as_k, const float* b, int64_t bs_k,
                                         int64_t nvalid, float* c, int64_t ldc, bool add) {
  constexpr int64_t V = kLanes<float>;
  const int64_t n0 = std::min(nvalid, V), n1 = std::max<int64_t>(0, nvalid - V);
  const bool prefetch_a = as_k > as_m && as_k >= kLanes<float>;
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
    if (prefetch_a) __builtin_prefetch(ak + kGemmPrefetch * as_k);
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
    if (Stream) {
      vstream(cr, acc0[r]);
      vstream(cr + V, acc1[r]);
    } else if (!Masked) {
      vstore(cr, acc0[r]);
      vstore(cr + V, acc1[r]);
    } else {
      vstore_part(cr, acc0[r], n0);
      if (n1 > 0) vstore_part(cr + V, acc1[r], n1);
    }
  }
}

// The same for a panel of one vector of columns (nvalid <= V), R <= 2 * kGemmRows rows:
// B's last panel when N leaves at most one vector there (a 16-column project layer
// would leave half of a two-vector tile idle), where taller tiles keep the B load
// shared by more multiply-adds.
template <int R, bool Masked, bool Stream = false>
__attribute__((noinline)) void gemm_tile_narrow(int64_t K, const float* a, int64_t as_m,
                                                int64_t as_k, const float* b, int64_t bs_k,
                                                int64_t nvalid, float* c, int64_t ldc,
                                                bool add) {
  const bool prefetch_a = as_k > as_m && as_k >= kLanes<float>;
  Vec<float> acc[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) acc[r] = Vec<float>{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * bs_k;
    Vec<float> b0 = Masked ? vload_first(bk, nvalid) : vload(bk);
    pin<float>(b0);
    const float* ak = a + k * as_k;
    if (prefetch_a) __builtin_prefetch(ak + kGemmPrefetch * as_k);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) acc[r] += vsplat(ak[r * as_m]) * b0;
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (add) acc[r] += vload_first(cr, nvalid);
    if (Stream) vstream(cr, acc[r]);
    else if (!Masked) vstore(cr, acc[r]);
    else vstore_part(cr, acc[r], nvalid);
  }
}

// Packs B's column panel starting at column j0 (NR = 2 vectors wide) into dst[k * NR +
// j], zero past column N, for B(k, j) = b[k + j * bs_n] (unit stride along k: the
// transposed weight block): V x V blocks, one vector per column read, transposed in
// registers. A scalar loop over the transposed weight took a fifth of the 7x7 960->160
// channels_last forward.
inline void pack_panel_transposed(int64_t K, int64_t N, const float* b, int64_t bs_n,
                                  int64_t j0, float* dst) {
  constexpr int64_t V = kLanes<float>, NR = 2 * V;
  for (int64_t h = 0; h < 2; ++h) {
    const int64_t jh = j0 + h * V, nj = std::clamp<int64_t>(N - jh, 0, V);
    for (int64_t k0 = 0; k0 < K; k0 += V) {
      const int64_t nk = std::min(V, K - k0);
      Vec<float> m[V];
#pragma GCC unroll 16
      for (int64_t j = 0; j < V; ++j)
        m[j] = j < nj ? vload_first(b + (jh + j) * bs_n + k0, nk) : Vec<float>{};
      transpose_square<float>(m);
      for (int64_t k = 0; k < nk; ++k) vstore(dst + (k0 + k) * NR + h * V, m[k]);
    }
  }
}

// Packs the same panel of any B(k, j) = b[k * bs_k + j * bs_n], element by element.
inline void pack_panel(int64_t K, int64_t N, const float* b, int64_t bs_k, int64_t bs_n,
                       int64_t j0, float* dst) {
  constexpr int64_t NR = 2 * kLanes<float>;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < NR; ++j)
      dst[k * NR + j] = j0 + j < N ? b[k * bs_k + (j0 + j) * bs_n] : 0.f;
}

}  // namespace simd

// Depth of one pass of a register tile: partial sums of at most this many products
// are added to C in float (a long reduction, as the weight gradient's over every
// pixel, then errs like a sum of K / kGemmDepth terms, not of K). A B panel this deep,
// kGemmDepth x 2 vectors (32 KB at AVX-512), stays in a 48 KB L1 while the row tiles of
// a block run through it.
constexpr int64_t kGemmDepth = 256;
// Row tiles per block: the block's A rows, kGemmDepth deep, stay in L2 (256 KB at 8 x 32
// tiles) while the B panels run past them.
constexpr int64_t kGemmBlockTiles = 32;

// The batched GEMM of GemmArgs (kernels_isa.h). Loops, outer to inner: blocks of row
// tiles; depth passes of kGemmDepth; B panels (in L1 for the whole block); the block's
// row tiles; the register tile over the depth. One parallel region for the batch:
// threads split the row tiles or the panels of every matrix, whichever leaves each
// thread the smaller operand to read in full (B: K x N when splitting rows, A: M x K
// otherwise).
int64_t gemm_f32_lanes() { return simd::kLanes<float>; }

void gemm_f32(const GemmArgs& g) {
  using namespace simd;
  constexpr int64_t V = kLanes<float>, NR = 2 * V, MR = kGemmRows;
  const int64_t M = g.M, N = g.N, K = g.K;
  const int64_t panels = (N + NR - 1) / NR, tiles = (M + MR - 1) / MR;
  std::unique_ptr<float[]> packed;
  const float* bsrc = g.b;
  // B panel p of matrix i at bsrc + i * bbatch + p * pstride, k stride pk.
  int64_t pk = g.bs_k, pstride = NR, bbatch = g.b_batch;
  if (g.bs_n != 1) {
    bbatch = panels * K * NR;
    packed.reset(new float[g.batch * bbatch]);  // every element written below
    float* dst = packed.get();
    at::parallel_for(0, g.batch * panels, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t i = u / panels, p = u % panels;
        const float* bi = g.b + i * g.b_batch;
        float* di = dst + i * bbatch + p * K * NR;
        if (g.bs_k == 1) pack_panel_transposed(K, N, bi, g.bs_n, p * NR, di);
        else pack_panel(K, N, bi, g.bs_k, g.bs_n, p * NR, di);
      }
    });
    bsrc = dst;
    pk = NR;
    pstride = K * NR;
  }
  const int64_t as_m = g.as_m, as_k = g.as_k;
  // A large result written in one pass (no depth passes to add, nothing to add to) on
  // cache-line-aligned rows leaves through non-temporal stores in its whole tiles, as
  // the depthwise passes do (stream_output: beyond 30 % of the last-level cache, and not
  // into freshly mapped pages): a cached store would first read every line it writes.
  constexpr int64_t kLineFloats = kCacheLineBytes / int64_t(sizeof(float));
  const int64_t c_values = (g.batch - 1) * g.c_batch + (M - 1) * g.ldc + N;  // C's extent
  const bool stream = !g.add && K <= kGemmDepth && g.ldc % kLineFloats == 0 &&
                      vector_aligned(g.c) && (g.batch == 1 || g.c_batch % kLineFloats == 0) &&
                      stream_output(int64_t(sizeof(float)) * g.batch * M * K,
                                    int64_t(sizeof(float)) * c_values, g.c);
  // Calls f(masked, streamed) with the compile-time variant of a tile: a partial panel
  // masked, a whole one streamed or stored.
  const auto with_tile_kind = [&](bool whole, const auto& f) {
    if (!whole) f(std::true_type{}, std::false_type{});
    else if (stream) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  };
  // Matrix i: row tiles [t0, t1) x panels [p0, p1) over the depth [kb, ke), into c (row
  // stride ldc; added to it with `add`).
  auto run = [&](int64_t i, int64_t t0, int64_t t1, int64_t p0, int64_t p1, int64_t kb,
                 int64_t ke, float* c, int64_t ldc, bool add) {
    const float* a = g.a + i * g.a_batch;
    const float* b = bsrc + i * bbatch;
    for (int64_t tb = t0; tb < t1; tb += kGemmBlockTiles) {
      const int64_t tb1 = std::min(t1, tb + kGemmBlockTiles);
      for (int64_t k0 = kb; k0 < ke; k0 += kGemmDepth) {
        const int64_t kd = std::min(kGemmDepth, ke - k0);
        const bool acc = add || k0 > kb;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t nv = std::min(NR, N - p * NR);
          const float* bp = b + p * pstride + k0 * pk;
          if (nv <= V) {  // one vector of columns: tiles of up to 2 * MR rows
            const int64_t m0 = tb * MR, rows = std::min(M, tb1 * MR) - m0;
            for_wide_blocks<2 * MR>(rows, [&](int64_t r, auto RT) {
              constexpr int R = decltype(RT)::value;
              const float* ak = a + (m0 + r) * as_m + k0 * as_k;
              float* cp = c + (m0 + r) * ldc + p * NR;
              with_tile_kind(nv == V, [&](auto masked, auto streamed) {
                gemm_tile_narrow<R, decltype(masked)::value, decltype(streamed)::value>(
                    kd, ak, as_m, as_k, bp, pk, nv, cp, ldc, acc);
              });
            });
            continue;
          }
          for (int64_t t = tb; t < tb1; ++t) {
            const int64_t m0 = t * MR;
            const float* ak = a + m0 * as_m + k0 * as_k;
            float* cp = c + m0 * ldc + p * NR;
            // for_blocks hands a run of at most 8 <= MR rows its compile-time size.
            for_blocks(std::min(MR, M - m0), [&](int64_t, auto RT) {
              constexpr int R = decltype(RT)::value;
              with_tile_kind(nv == NR, [&](auto masked, auto streamed) {
                gemm_tile<R, decltype(masked)::value, decltype(streamed)::value>(
                    kd, ak, as_m, as_k, bp, pk, nv, cp, ldc, acc);
              });
            });
          }
        }
      }
    }
  };
  const int64_t threads = at::get_num_threads();
  // Splitting the depth: each of `parts` threads takes a contiguous range of k (whole
  // passes), its partial C into a private buffer (the first part straight into C), summed
  // into C at the end. It reads A and B once in all, in order, plus 2 (parts - 1) M N
  // partial sums, where splitting rows has every thread read all of B (K x N) and
  // splitting panels all of A (M x K): it wins for a long reduction onto a small C, the
  // channels_last weight gradient (K = N*H*W pixels), where splitting rows has each
  // thread read all of x and half of every line of grad_out.
  const int64_t parts = std::min(threads, (K + kGemmDepth - 1) / kGemmDepth);
  if (g.batch == 1 && parts > 1 &&
      2 * parts * M * N < (parts - 1) * K * std::min(M, N)) {
    const int64_t passes = (K + kGemmDepth - 1) / kGemmDepth;
    std::unique_ptr<float[]> partial(new float[(parts - 1) * M * N]);  // written in full
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t kb = std::min(K, passes * q / parts * kGemmDepth);
        const int64_t ke = std::min(K, passes * (q + 1) / parts * kGemmDepth);
        if (q == 0) run(0, 0, tiles, 0, panels, kb, ke, g.c, g.ldc, g.add);
        else run(0, 0, tiles, 0, panels, kb, ke, partial.get() + (q - 1) * M * N, N, false);
      }
    });
    // C += the partial sums, rows in parallel (inline for a small C).
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 15) / (N * parts)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* cr = g.c + r * g.ldc;
        for (int64_t q = 0; q + 1 < parts; ++q) {
          const float* pr = partial.get() + q * M * N + r * N;
          int64_t j = 0;
          for (; j + V <= N; j += V) vstore(cr + j, vload(cr + j) + vload(pr + j));
          if (j < N) {
            vstore_part(cr + j, vload_first(cr + j, N - j) + vload_first(pr + j, N - j), N - j);
          }
        }
      }
    });
    return;
  }
  bool by_rows = M >= N;
  if (by_rows && g.batch * tiles < threads && panels > tiles) by_rows = false;
  if (!by_rows && g.batch * panels < threads && tiles > panels) by_rows = true;
  const int64_t per = by_rows ? tiles : panels;             // units per matrix
  const int64_t unit = (by_rows ? MR * N : M * NR) * K;   // multiply-adds per unit
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 19) / unit);
  at::parallel_for(0, g.batch * per, grain, [&](int64_t u0, int64_t u1) {
    for (int64_t i = u0 / per; i * per < u1; ++i) {
      const int64_t lo = std::max(u0, i * per) - i * per;
      const int64_t hi = std::min(u1, (i + 1) * per) - i * per;
      float* c = g.c + i * g.c_batch;
      if (by_rows) run(i, lo, hi, 0, panels, 0, K, c, g.ldc, g.add);
      else run(i, 0, tiles, lo, hi, 0, K, c, g.ldc, g.add);
    }
    if (stream) stream_fence();
  });
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
