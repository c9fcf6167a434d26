// Parallel drivers of the depthwise passes over whole tensors, on the micro-kernels of
// dwconv_simd.h: forward, input gradient and weight gradient, NCHW (one task per plane,
// or per channel for the weight gradient) and channels_last (one task per image x strip
// of output rows x group of channel blocks, or per group of images x block for the
// weight gradient; the plain passes that read the tensor itself, window_pass and
// direct_pass, one task per image x output row).
//
// The caller supplies what is read (a transform applied while packing: identity for
// masked_dwconv2d; BN + activation of the input, or the upstream gradient with the
// statistics terms, for bn_act_dwconv2d) and what happens to each result (a plain store,
// statistics, the BN-activation input gradient). Per-task partial sums live in double
// arrays with one slot per (image, strip, channel block) or (plane), so every reduction
// runs in a fixed order whatever the number of threads.
#pragma once

#include "dwconv_simd.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {
namespace simd {

// Calls fn.template operator()<A>() with the activation code as a compile-time constant.
template <typename Fn>
void with_act(int64_t act, const Fn& fn) {
  if (act == kActReLU) fn.template operator()<kActReLU>();
  else if (act == kActReLU6) fn.template operator()<kActReLU6>();
  else fn.template operator()<kActIdentity>();
}

// -------------------------------------------------------------------------- NCHW

// For every plane nc = n * C + c: pack src(nc) (a functor of the index within the
// plane) into the pass's scratch, convolve with filter(nc, dst [k*k]) into dest(nc),
// then done(nc, dest). Forward or input-gradient pass alike (p says which). Small planes
// are packed and convolved in groups, so the micro-kernel always has rows to overlap.
template <typename T, typename MakeSrc, typename Filter, typename Dest, typename Done>
void plane_pass(const Pass& pass, int64_t planes, const MakeSrc& make_src, const Filter& filter,
                const Dest& dest, const Done& done) {
  const bool flat = use_flat(pass, kLanes<T>);
  const Pass p = flat ? flat_pass(pass) : pass;
  const int64_t kk = p.K * p.K;
  const int64_t slot = p.rows * p.row_len() + (flat ? flat_slack<T>(p) : 0);
  const int64_t group = std::max<int64_t>(1, kPlaneGroupBytes / (slot * int64_t(sizeof(T))));
  const std::vector<int64_t> toff = p.tap_offsets();
  at::parallel_for(0, planes, grain(p.Ho * p.Wo * kk), [&](int64_t b, int64_t e) {
    const int64_t gmax = std::min(group, e - b);
    std::vector<T> buf(static_cast<size_t>(gmax * slot));
    std::vector<T> wf(static_cast<size_t>(gmax * kk));
    std::vector<T*> out(static_cast<size_t>(gmax));
    // Flat passes: the flat outputs, aligned for vector stores.
    std::vector<T> tmp(static_cast<size_t>(flat ? flat_outputs<T>(p) + kLanes<T> : 0));
    T* tmpa = flat ? align_to_vector(tmp.data()) : tmp.data();
    for (int64_t g0 = b; g0 < e; g0 += gmax) {
      const int64_t gn = std::min(gmax, e - g0);
      for (int64_t i = 0; i < gn; ++i) {
        pack_plane(buf.data() + i * slot, p, make_src(g0 + i));
        filter(g0 + i, wf.data() + i * kk);
        out[i] = dest(g0 + i);
      }
      if (flat) plane_conv_flat(buf.data(), slot, gn, p, wf.data(), toff.data(), out.data(), tmpa);
      else plane_conv(buf.data(), slot, gn, p, wf.data(), toff.data(), out.data());
      for (int64_t i = 0; i < gn; ++i) done(g0 + i, out[i]);
    }
  });
}

// grad_w[c] = sum over n of the correlation of g(n, c) with the packed a(n, c): one task
// per channel, images summed in order. make_a(nc) / make_g(nc): functors of the index
// within the input / output plane.
template <typename T, typename MakeA, typename MakeG>
void plane_weight_grad(const DwGeometry& g, const MakeA& make_a, const MakeG& make_g, T* gw) {
  const Pass p = Pass::forward(g, kLanes<T>);
  const int64_t kk = g.K * g.K, gl = round_up(g.Wo, kLanes<T>);
  const std::vector<int64_t> toff = p.tap_offsets();
  at::parallel_for(0, g.C, grain(g.N * g.Ho * g.Wo * kk), [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(p.rows * p.row_len()));
    std::vector<T> gr(static_cast<size_t>(g.Ho * gl));
    std::vector<double> acc(static_cast<size_t>(kk));
    for (int64_t c = b; c < e; ++c) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t nc = n * g.C + c;
        pack_plane(buf.data(), p, make_a(nc));
        pack_rows(gr.data(), g.Ho, g.Wo, gl, make_g(nc));
        plane_wgrad(buf.data(), p, gr.data(), gl, toff.data(), acc.data());
      }
      for (int64_t t = 0; t < kk; ++t) gw[c * kk + t] = static_cast<T>(acc[t]);
    }
  });
}

// Transposes channels [0, lanes) of a block of V = kLanes<T> NCHW planes (xs: the
// first plane, H x W each, plane stride H * W) into the pixel vectors of a
// [rows][cols][V] scratch: source pixel (h, x) to row h + pad, column x + pad. V pixels
// at a time through transpose_square; pixels that fall outside the scratch are skipped,
// lanes from `lanes` on are written as zeros, nothing else is written (the padding
// keeps what it holds).
template <typename T>
inline void planes_to_block(T* sb, int64_t rows, int64_t cols, int64_t pad, const T* xs,
                            int64_t H, int64_t W, int64_t lanes) {
  constexpr int64_t V = kLanes<T>;
  const int64_t hw = H * W;
  const int64_t h0 = std::max<int64_t>(0, -pad), h1 = std::min(H, rows - pad);
  const int64_t w0 = std::max<int64_t>(0, -pad), w1 = std::min(W, cols - pad);
  for (int64_t i0 = 0; i0 < hw; i0 += V) {
    const int64_t np = std::min(V, hw - i0);
    Vec<T> m[V];
    for (int64_t l = 0; l < V; ++l) m[l] = l < lanes ? vload_part(xs + l * hw + i0, np) : Vec<T>{};
    transpose_square<T>(m);
    int64_t h = i0 / W, x = i0 % W;
    for (int64_t j = 0; j < np; ++j) {
      if (h >= h0 && h < h1 && x >= w0 && x < w1) vstore(sb + ((h + pad) * cols + x + pad) * V, m[j]);
      if (++x == W) {
        x = 0;
        ++h;
      }
    }
  }
}

// The way back: the first `lanes` channels of the n pixel vectors [n][V] at ob into
// `lanes` planes of n values at ys (plane stride n).
template <typename T>
inline void block_to_planes(T* ys, const T* ob, int64_t n, int64_t lanes) {
  constexpr int64_t V = kLanes<T>;
  for (int64_t i0 = 0; i0 < n; i0 += V) {
    const int64_t np = std::min(V, n - i0);
    Vec<T> m[V];
    for (int64_t j = 0; j < V; ++j) m[j] = j < np ? vload(ob + (i0 + j) * V) : Vec<T>{};
    transpose_square<T>(m);
    for (int64_t l = 0; l < lanes; ++l) vstore_part(ys + l * n + i0, m[l], np);
  }
}

// NCHW planes of up to kBlockedPlanePixels source pixels through the channels_last
// register window: per image x block of kLanes channels, the block's planes are
// transposed (kLanes x kLanes in registers, transpose_square) into a zero-padded
// [rows][cols][lanes] scratch, convolved by window_positions, and the [Ho][Wo][lanes]
// result transposed back into the planes. A vector across channels is always full,
// where one along an output row is mostly empty on small planes or spans rows. Kernel
// 3, 5 or 7, dilation 1, stride 1 or 2, spread 1 (returns false for anything else,
// doing nothing). src / dst: NCHW tensors of C channels with p.Hs x p.Ws / p.Ho x p.Wo
// planes; flip as in pack_taps.
// Taken for planes up to 128x128: there it beats plane_pass, whose vectors along a row
// are mostly empty; larger planes keep plane_pass (this scratch would outgrow a core's
// L2).
constexpr int64_t kBlockedPlanePixels = 128 * 128;

template <typename T>
bool blocked_plane_pass(const Pass& p, int64_t N, int64_t C, const T* src, const T* w, bool flip,
                      T* dst) {
  if (p.spread != 1 || p.Hs * p.Ws > kBlockedPlanePixels) return false;
  return with_window(p.K, p.S, p.d, [&](auto KT, auto ST) {
    constexpr int K = decltype(KT)::value, S = decltype(ST)::value;
    constexpr int64_t V = kLanes<T>, kk = K * K;
    const int64_t H = p.Hs, W = p.Ws, Ho = p.Ho, Wo = p.Wo, ohw = Ho * Wo;
    const int64_t rows = (Ho - 1) * S + K, cols = (Wo - 1) * S + K;
    const int64_t nb = num_blocks<T>(C);
    std::vector<T> taps(static_cast<size_t>(nb * kk * V));
    pack_taps(taps.data(), w, C, kk, flip);
    at::parallel_for(0, N * nb, grain(ohw * V * kk), [&](int64_t b, int64_t e) {
      std::vector<T> buf(static_cast<size_t>(rows * cols * V + V), T(0));
      std::vector<T> obuf(static_cast<size_t>(ohw * V + V));
      T* sb = align_to_vector(buf.data());
      T* ob = align_to_vector(obuf.data());
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / nb, bi = task % nb, c0 = bi * V;
        const int64_t lanes = std::min(V, C - c0);
        // The block's planes into pixel vectors (the padding stays zero).
        planes_to_block(sb, rows, cols, p.pad, src + (n * C + c0) * H * W, H, W, lanes);
        const T* tb = taps.data() + bi * kk * V;
        for (int64_t oh = 0; oh < Ho; ++oh) {
          for_blocks(Wo, [&](int64_t ow0, auto R) {
            constexpr int RV = decltype(R)::value;
            window_positions<RV, K, S, kNoMask>(sb + (oh * S * cols + ow0 * S) * V, V,
                                                cols * V, 0, K, tb, nullptr,
                                                RunStore<T>{ob + (oh * Wo + ow0) * V, V, V});
          });
        }
        block_to_planes(dst + (n * C + c0) * ohw, ob, ohw, lanes);
      }
    });
  });
}

// ------------------------------------------------------------------ channels_last

// How a channels_last pass is cut into tasks: image x strip of `ro` output rows x group
// of channel blocks. Strips hold about kStripBytes of scratch over all channels (so the
// strip count, and with it the partial-sum slots, never depends on the thread count);
// channels are split into groups only when images x strips would leave threads idle.
struct BlockPlan {
  int64_t nb;         // channel blocks
  int64_t ro;         // output rows per strip
  int64_t strips;     // strips per image
  int64_t groups;     // channel groups per strip
  int64_t per_group;  // blocks per group
  // Partial sums: one per image x strip ("part") and block, kLanes values each, laid
  // out [parts][nb * kLanes] so that channel c of part i is at i * nb * kLanes + c.
  int64_t parts(int64_t N) const { return N * strips; }
  int64_t slots(int64_t N) const { return parts(N) * nb; }
};

template <typename T>
BlockPlan block_plan(const Pass& p, int64_t N, int64_t C) {
  BlockPlan bp{};
  bp.nb = num_blocks<T>(C);
  const int64_t row_bytes = PixelStrip::columns(p) * bp.nb * kLanes<T> * int64_t(sizeof(T));
  bp.ro = p.strip_rows(row_bytes, kStripBytes);
  bp.strips = (p.Ho + bp.ro - 1) / bp.ro;
  const int64_t want = 2 * int64_t(at::get_num_threads());
  const int64_t tasks = std::max<int64_t>(1, N * bp.strips);
  bp.groups = std::min(bp.nb, std::max<int64_t>(1, (want + tasks - 1) / tasks));
  bp.per_group = (bp.nb + bp.groups - 1) / bp.groups;
  bp.groups = (bp.nb + bp.per_group - 1) / bp.per_group;
  return bp;
}

// Source rows [lo, hi) that a (strip of a) pass reads: hs with hs * spread + pad in
// [row0, row0 + rows).
inline std::pair<int64_t, int64_t> source_rows(const Pass& p) {
  const int64_t first = p.row0 - p.pad, last = p.row0 + p.rows - 1 - p.pad;
  const int64_t lo = first <= 0 ? 0 : (first + p.spread - 1) / p.spread;
  const int64_t hi = last < 0 ? 0 : std::min(p.Hs, last / p.spread + 1);
  return {std::min(lo, hi), hi};
}

// For every image n, strip and channel group: pack src(c, off) of the image's source
// tensor (`src_image` elements per image) into a PixelStrip scratch, convolve with the
// blocks' filters (flipped for the input-gradient pass) and hand the output vectors to
// out(n, slot, block, oh, ow, R, acc): the R vectors acc[0, R) of pixels (oh, ow),
// (oh, ow + 1), ...; slot indexes the (image, strip, block) partial sums of
// bp.slots(N).
template <typename T, typename Src, typename Out>
void block_pass(const Pass& p, const BlockPlan& bp, int64_t N, int64_t C, int64_t src_image,
                const T* w, bool flip, const Src& src, const Out& out) {
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = p.K * p.K;
  std::vector<T> taps(static_cast<size_t>(bp.nb * kk * V));
  pack_taps(taps.data(), w, C, kk, flip);
  const int64_t cols = PixelStrip::columns(p);
  const int64_t max_rows = (bp.ro - 1) * p.S + (p.K - 1) * p.d + 1;
  const int64_t tasks = N * bp.strips * bp.groups;
  const int64_t per_task = bp.ro * p.Wo * bp.per_group * V * kk;
  at::parallel_for(0, tasks, grain(per_task), [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(max_rows * cols * bp.per_group * V + V));
    T* sb = align_to_vector(buf.data());
    for (int64_t task = b; task < e; ++task) {
      const int64_t gi = task % bp.groups, part = task / bp.groups;
      const int64_t n = part / bp.strips, oh0 = (part % bp.strips) * bp.ro;
      const int64_t b0 = gi * bp.per_group, b1 = std::min(bp.nb, b0 + bp.per_group);
      const PixelStrip ps{cols, (b1 - b0) * V};
      const Pass sp = p.strip(oh0, std::min(bp.ro, p.Ho - oh0));
      const std::vector<int64_t> toff = ps.tap_offsets(sp);
      pack_strip(sb, sp, ps, C, b0 * V, std::min(C, b1 * V), n * src_image, src);
      // While this strip is convolved, the source rows the next task adds are fetched
      // into L2 a slice per run, so its packing does not wait on memory.
      int64_t pf_off = 0, pf_len = 0;
      if (task + 1 < e) {
        const int64_t nx = task + 1, npart = nx / bp.groups;
        const int64_t nn = npart / bp.strips, noh0 = (npart % bp.strips) * bp.ro;
        const auto [lo, hi] = source_rows(p.strip(noh0, std::min(bp.ro, p.Ho - noh0)));
        const int64_t from = nn == n ? std::max(lo, source_rows(sp).second) : lo;
        pf_off = nn * src_image + from * p.Ws * C;
        pf_len = std::max<int64_t>(0, hi - from) * p.Ws * C;
      }
      strip_conv(
          sb, sp, ps, b0, b1, taps.data(), toff.data(),
          [&](int64_t bi, int64_t oh, int64_t ow0, int R, const Vec<T>* acc) {
            out(n, part * bp.nb + bi, block_of<T>(bi, C), oh0 + oh, ow0, R, acc);
          },
          [&](int64_t step, int64_t steps) {
            if (pf_len == 0) return;
            const int64_t a = pf_len * step / steps, z = pf_len * (step + 1) / steps;
            src.prefetch(pf_off + a, z - a);
          });
    }
  });
}

// Kernel taps [k0, k1) of a k-tap, dilation-d window starting at source index i0 that
// land inside a source of n values (k1 <= k0: none).
inline std::pair<int64_t, int64_t> taps_inside(int64_t i0, int64_t n, int64_t k, int64_t d) {
  const int64_t k0 = i0 >= 0 ? 0 : (-i0 + d - 1) / d;
  const int64_t k1 = n - 1 - i0 < 0 ? 0 : std::min(k, (n - 1 - i0) / d + 1);
  return {k0, k1};
}

// The plain channels_last pass (no transform of the source, spread 1): straight from
// the NHWC source `x` (`C` channels, p.Hs x p.Ws per image), no scratch. Per image x
// output row, taps on rows outside the source are dropped from the tap list; pixels
// whose taps all lie inside (the interior columns) run R at a time through the
// micro-kernel, border pixels take a per-pixel loop over their valid taps, 8 blocks at
// once; the last block's loads are masked when C is not a whole number of vectors.
// out(n, block, oh, ow, vec) receives each output vector.
template <typename T, typename Out>
void direct_pass(const Pass& p, int64_t N, int64_t C, const T* x, const T* w, bool flip,
                 const Out& out) {
  constexpr int64_t V = kLanes<T>;
  const int64_t K = p.K, kk = K * K, d = p.d, S = p.S, W = p.Ws, H = p.Hs;
  const int64_t nb = num_blocks<T>(C), image = H * W * C;
  std::vector<T> taps(static_cast<size_t>(nb * kk * V));
  pack_taps(taps.data(), w, C, kk, flip);
  // Tap offsets from a pixel of kernel row 0, in elements: kernel rows kh >= kh0 of a
  // row whose first valid kernel row is kh0 start at toff + kh0 * K, relative to the
  // pixel in kernel row kh0.
  std::vector<int64_t> toff(static_cast<size_t>(kk));
  for (int64_t kh = 0; kh < K; ++kh)
    for (int64_t kw = 0; kw < K; ++kw) toff[kh * K + kw] = (kh * d * W + kw * d) * C;
  // Interior columns: ow * S - pad >= 0 and ow * S - pad + (K - 1) * d < W.
  const int64_t owl = p.pad <= 0 ? 0 : std::min(p.Wo, (p.pad + S - 1) / S);
  const int64_t last = W - 1 - (K - 1) * d + p.pad;  // largest ow * S with all taps inside
  const int64_t owr = std::max(owl, std::min(p.Wo, last < 0 ? 0 : last / S + 1));
  const int64_t tail = C - (nb - 1) * V;  // lanes of the last block
  at::parallel_for(0, N * p.Ho, grain(p.Wo * C * kk), [&](int64_t b, int64_t e) {
    std::vector<int64_t> rel(static_cast<size_t>(kk));
    for (int64_t task = b; task < e; ++task) {
      const int64_t n = task / p.Ho, oh = task % p.Ho;
      const int64_t ih0 = oh * S - p.pad;
      const auto [kh0, kh1] = taps_inside(ih0, H, K, d);
      if (kh1 <= kh0) {  // every tap in the padding
        for (int64_t ow = 0; ow < p.Wo; ++ow)
          for (int64_t bi = 0; bi < nb; ++bi) out(n, bi, oh, ow, Vec<T>{});
        continue;
      }
      const T* row = x + n * image + (ih0 + kh0 * d) * W * C;  // kernel row kh0
      const int64_t ntaps = (kh1 - kh0) * K;
      const int64_t* to = toff.data() + kh0 * K;
      const int64_t shift = kh0 * d * W * C;  // to[] counts from kernel row 0
      for (int64_t t = 0; t < ntaps; ++t) rel[t] = to[t] - shift;
      for_blocks(owr - owl, [&](int64_t i, auto R) {
        constexpr int RV = decltype(R)::value;
        int64_t base[RV];
        for (int r = 0; r < RV; ++r) base[r] = ((owl + i + r) * S - p.pad) * C;
        for (int64_t bi = 0; bi < nb; ++bi) {
          Vec<T> acc[RV];
          const T* tp = taps.data() + (bi * kk + kh0 * K) * V;
          if (bi + 1 < nb || tail == V)
            block_positions<RV, false>(row + bi * V, ntaps, tp, rel.data(), base, V, acc);
          else
            block_positions<RV, true>(row + bi * V, ntaps, tp, rel.data(), base, tail, acc);
          for (int r = 0; r < RV; ++r) out(n, bi, oh, owl + i + r, acc[r]);
        }
      });
      // Border pixels: only the columns kw in [kw0, kw1) lie inside.
      const auto border = [&](int64_t ow) {
        const int64_t iw0 = ow * S - p.pad;
        const auto [kw0, kw1] = taps_inside(iw0, W, K, d);
        for (int64_t b0 = 0; b0 < nb; b0 += 8) {
          const int64_t nj = std::min<int64_t>(8, nb - b0);
          Vec<T> acc[8];
          for (int j = 0; j < 8; ++j) acc[j] = Vec<T>{};
          for (int64_t kh = kh0; kh < kh1; ++kh)
            for (int64_t kw = kw0; kw < kw1; ++kw) {
              const T* src = row + ((kh - kh0) * d * W + iw0 + kw * d) * C;
              const T* tp = taps.data() + (kh * K + kw) * V;
              for (int64_t j = 0; j < nj; ++j) {
                const int64_t bi = b0 + j;
                const Vec<T> v = bi + 1 < nb ? vload(src + bi * V) : vload_part(src + bi * V, tail);
                acc[j] += vload(tp + bi * kk * V) * v;
              }
            }
          for (int64_t j = 0; j < nj; ++j) out(n, b0 + j, oh, ow, acc[j]);
        }
      };
      for (int64_t ow = 0; ow < owl; ++ow) border(ow);
      for (int64_t ow = owr; ow < p.Wo; ++ow) border(ow);
    }
  });
}

// The plain channels_last pass through the register window, straight from the NHWC
// source `x` (`C` channels, p.Hs x p.Ws per image) into the NHWC result `y` (p.Ho x
// p.Wo per image), no scratch: kernel 3, 5 or 7, dilation 1, stride 1 or 2, spread 1
// (returns false for anything else, doing nothing). One task per image x output row;
// per channel block, the row in runs of up to 8 pixels. Kernel rows outside the source
// are skipped (a row whose taps all lie in the padding gets zeros); runs whose window
// reaches into the left or right padding, and the one block of C < V channels, use
// masked loads (nothing outside the source is read).
template <typename T>
bool window_pass(const Pass& p, int64_t N, int64_t C, const T* x, const T* w, bool flip,
                 T* y) {
  if (p.spread != 1) return false;
  return with_window(p.K, p.S, p.d, [&](auto KT, auto ST) {
    constexpr int K = decltype(KT)::value, S = decltype(ST)::value;
    constexpr int64_t V = kLanes<T>, kk = K * K;
    const int64_t W = p.Ws, H = p.Hs, nb = num_blocks<T>(C), image = H * W * C;
    // The last block ends at channel C (end_aligned_block), so only runs that reach
    // into the padding, or C < V, mask their loads (masked loads in every run of a
    // last block cost up to a fifth of the pass).
    const int64_t lanes = std::min(V, C);
    std::vector<T> taps(static_cast<size_t>(nb * kk * V));
    pack_taps(taps.data(), w, C, kk, flip, true);
    // Runs outermost (each run through every block) while a run's window over all
    // channels fits in L1 (each window is then read once), blocks outermost otherwise.
    const bool runs_outer = K * (S * 7 + K) * C * int64_t(sizeof(T)) <= kWindowBytes;
    // A result beyond the cache share whose pixels start on cache lines goes straight
    // from the registers to memory (put_run, non-temporal). One whose pixels do not (the
    // runs' vectors straddle lines and fill each in parts) is stored through the cache,
    // fetching ahead: each run asks for the output lines that the run after it writes
    // (prefetchw; a task's rows follow each other in memory, so the last run of a row
    // reaches into the next) and for the newest kernel row's input lines under that run,
    // a share before each channel block. One run ahead: it beats staging the rows in a
    // cached buffer and streaming them out, and fetching further ahead gains nothing;
    // line-aligned results stream rather than fetch ahead, which is slower for them.
    const int64_t row_values = p.Wo * C;
    const int64_t in_bytes = N * image * int64_t(sizeof(T));
    const int64_t out_bytes = N * p.Ho * row_values * int64_t(sizeof(T));
    const bool line_pixels = (C * int64_t(sizeof(T))) % kCacheLineBytes == 0;
    const bool stream = line_pixels && stream_output(in_bytes, out_bytes, y);
    const bool fetch_ahead = !line_pixels && exceeds_cache_share(in_bytes, out_bytes);
    const bool prefetch_rows = prefetch_input_rows(in_bytes);
    const int64_t x_values = N * image, y_values = N * p.Ho * row_values;
    at::parallel_for(0, N * p.Ho, grain(row_values * kk), [&](int64_t b, int64_t e) {
      for (int64_t task = b; task < e; ++task) {
        const int64_t n = task / p.Ho, oh = task % p.Ho;
        const int64_t ih0 = oh * S - p.pad;
        const auto [kh0, kh1] = taps_inside(ih0, H, K, 1);
        const T* row = x + n * image + (ih0 + kh0) * W * C;  // kernel row kh0
        const int64_t y_row = task * row_values;              // offset of the output row
        T* const yrow = y + y_row;
        // The input rows that the next output row adds (ih0 + K .. ih0 + K + S - 1),
        // prefetched into L2 run by run when the input comes from memory.
        const int64_t next_ih = ih0 + K;
        const int64_t next_rows =
            prefetch_rows && oh + 1 < p.Ho ? std::clamp<int64_t>(H - next_ih, 0, S) : 0;
        const auto prefetch_next = [&](int64_t ow0, int64_t runs) {
          const int64_t c_lo = std::max<int64_t>(0, ow0 * S - p.pad + (ow0 == 0 ? 0 : K - 1));
          const int64_t c_hi = std::min<int64_t>(W, (ow0 + runs) * S - p.pad + K - 1);
          for (int64_t r = 0; r < next_rows && c_lo < c_hi; ++r)
            prefetch_l2(x + n * image + ((next_ih + r) * W + c_lo) * C, (c_hi - c_lo) * C);
        };
        // fetch_ahead's lines for the run after the one at ow0 (R pixels): the output it
        // writes, and the newest kernel row's input under it (both streams continue into
        // the next row).
        const int64_t x_newest = n * image + (ih0 + K - 1) * W * C;
        const auto lines_ahead = [&](int64_t ow0, int64_t R) {
          const int64_t o = y_row + (ow0 + R) * C, i = x_newest + (ow0 + R) * S * C;
          return std::pair{line_span(y, o, o + R * C, y_values),
                           line_span(x, i, i + R * S * C, x_values)};
        };
        const auto run = [&](int64_t bi, int64_t ow0, auto R) {
          constexpr int RV = decltype(R)::value, NI = S * (RV - 1) + K;
          const int64_t ch0 = end_aligned_block(bi, nb, C, V);  // the block's first channel
          const int64_t c0 = ow0 * S - p.pad;  // source column of window slot 0
          const RunStore<T> dst{yrow + ow0 * C + ch0, C, lanes, stream};
          with_window_slots<NI>(c0, W, lanes, V, [&](auto M, const int64_t* sl) {
            window_positions<RV, K, S, decltype(M)::value>(row + c0 * C + ch0, C, W * C,
                                                           kh0, kh1,
                                                           taps.data() + bi * kk * V, sl, dst);
          });
        };
        if (runs_outer) {
          for_balanced_runs<kWideRun<K, S>>(p.Wo, [&](int64_t ow0, auto R) {
            if (next_rows) prefetch_next(ow0, decltype(R)::value);
            if (!fetch_ahead) {
              for (int64_t bi = 0; bi < nb; ++bi) run(bi, ow0, R);
              return;
            }
            const auto [out, in] = lines_ahead(ow0, decltype(R)::value);
            const int64_t po = (out.count + nb - 1) / nb, pi = (in.count + nb - 1) / nb;
            for (int64_t bi = 0; bi < nb; ++bi) {
              prefetch_lines<true>(out, bi * po, (bi + 1) * po);
              prefetch_lines<false>(in, bi * pi, (bi + 1) * pi);
              run(bi, ow0, R);
            }
          });
        } else {
          for (int64_t bi = 0; bi < nb; ++bi)
            for_balanced_runs<kWideRun<K, S>>(p.Wo, [&](int64_t ow0, auto R) {
              if (next_rows && bi == 0) prefetch_next(ow0, decltype(R)::value);
              if (fetch_ahead && bi == 0) {
                const auto [out, in] = lines_ahead(ow0, decltype(R)::value);
                prefetch_lines<true>(out, 0, out.count);
                prefetch_lines<false>(in, 0, in.count);
              }
              run(bi, ow0, R);
            });
        }
      }
      if (stream) stream_fence();
    });
  });
}

// The channels_last input gradient of a stride-2 convolution (kernel 3, 5 or 7,
// dilation 1) by phases, straight from the NHWC output gradient `gy` (C channels,
// p.Hs x p.Ws per image; p = Pass::forward's geometry: Hs x Ws input, Ho x Wo output)
// into `gx`. Input pixel (ih, iw) receives the taps kh = (ih + pad) mod 2 + 2m and
// kw = (iw + pad) mod 2 + 2j only, from gy[(ih + pad - kh) / 2, (iw + pad - kw) / 2]: per
// row parity and column parity, a stride-1 correlation of gy with a (K+1)/2 x (K+1)/2
// sub-kernel (the flipped taps of that parity, zero-padded), whose outputs are every
// other input pixel of the row. window_positions runs it on the tensor itself, so each
// input-gradient pixel costs at most ((K+1)/2)^2 multiply-adds instead of K^2 over a
// zero-spread copy of gy (block_pass with spread 2). One task per image x input row.
// The sub-kernels' all-zero row (odd parity) and column (kw = K) are skipped, not
// multiplied: 0 * gy is NaN where gy is NaN or Inf, and no real tap reads that gy.
// Returns false (doing nothing) for any other geometry.
template <typename T>
bool phase_input_grad(const DwGeometry& g, const T* gy, const T* w, T* gx) {
  if (!g.channels_last || g.stride != 2 || g.dil != 1) return false;
  const auto run_k = [&](auto KSC) {
    constexpr int KS = decltype(KSC)::value, K = 2 * KS - 1;
    constexpr int64_t V = kLanes<T>, ks2 = KS * KS;
    const int64_t C = g.C, nb = num_blocks<T>(C), H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
    const int64_t pad = g.pad, lanes = std::min(V, C), oimage = Ho * Wo * C;
    // sub[bi][a][b][u][v - b][lane] = w[c][kh][kw], c = end_aligned_block(bi) + lane, kh =
    // a + 2 (KS - 1 - u), kw = b + 2 (KS - 1 - v), rows of KS - b taps (column parity 1
    // drops v = 0, where kw = K); 0 where kh >= K (row u = 0 of parity 1) or c >= C.
    std::vector<T> sub(static_cast<size_t>(nb * 4 * ks2 * V), T(0));
    for (int64_t bi = 0; bi < nb; ++bi)
      for (int64_t l = 0; l < lanes; ++l)
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b)
            for (int u = 0; u < KS; ++u)
              for (int v = b; v < KS; ++v) {
                const int kh = a + 2 * (KS - 1 - u), kw = b + 2 * (KS - 1 - v);
                if (kh < K)
                  sub[((bi * 4 + a * 2 + b) * ks2 + u * (KS - b) + v - b) * V + l] =
                      w[(end_aligned_block(bi, nb, C, V) + l) * K * K + kh * K + kw];
              }
    at::parallel_for(0, g.N * H, grain(W * C * ks2), [&](int64_t tb, int64_t te) {
      for (int64_t task = tb; task < te; ++task) {
        const int64_t n = task / H, ih = task % H;
        const int a = int((ih + pad) & 1);
        const int64_t r0 = (ih + pad - a) / 2 - (KS - 1);  // gy row of sub-kernel row 0
        auto [u0, u1] = taps_inside(r0, Ho, KS, 1);
        u0 = std::max<int64_t>(u0, a);  // odd rows: sub-kernel row 0 is all zero
        T* grow = gx + ((n * H + ih) * W) * C;
        // Column parity b: KW = KS - b taps a row, from sub-kernel column b on.
        const auto parity = [&]<int b, int KW>() {
          const int64_t iwb = ((b - pad) % 2 + 2) % 2;  // first column of parity b
          if (iwb >= W) return;
          const int64_t cnt = (W - iwb + 1) / 2, cw0 = (iwb + pad - b) / 2 - (KS - 1) + b;
          for_blocks(cnt, [&](int64_t t0, auto R) {
            constexpr int RV = decltype(R)::value, NI = RV - 1 + KW;
            const int64_t c0 = cw0 + t0;  // gy column of window slot 0
            for (int64_t bi = 0; bi < nb; ++bi) {
              const int64_t ch0 = end_aligned_block(bi, nb, C, V);
              const T* taps = sub.data() + (bi * 4 + a * 2 + b) * ks2 * V;
              const T* src = gy + n * oimage + ((r0 + u0) * Wo + c0) * C + ch0;
              const RunStore<T> dst{grow + (iwb + 2 * t0) * C + ch0, 2 * C, lanes};
              with_window_slots<NI>(c0, Wo, lanes, V, [&](auto M, const int64_t* sl) {
                window_positions<RV, KW, 1, decltype(M)::value>(src, C, Wo * C, u0, u1, taps,
                                                                sl, dst);
              });
            }
          });
        };
        parity.template operator()<0, KS>();
        parity.template operator()<1, KS - 1>();
      }
    });
  };
  switch (g.K) {
    case 3: run_k(std::integral_constant<int, 2>{}); return true;
    case 5: run_k(std::integral_constant<int, 3>{}); return true;
    case 7: run_k(std::integral_constant<int, 4>{}); return true;
    default: return false;
  }
}

// Stores an output vector of a channel block at pixel `pix` of an NHWC tensor.
template <typename T>
inline void store_block(T* dst, const ChannelBlock& cb, int64_t pix, const Vec<T>& v) {
  T* d = dst + pix * cb.C + cb.c0;
  vstore_part(d, v, cb.cb);
}
// Stores the R output vectors of a channel block at pixels pix, pix + 1, ...
template <typename T>
inline void store_run(T* dst, const ChannelBlock& cb, int64_t pix, int R, const Vec<T>* acc) {
  T* d = dst + pix * cb.C + cb.c0;
  if (cb.cb == kLanes<T>) {
    for (int r = 0; r < R; ++r) vstore(d + r * cb.C, acc[r]);
  } else {
    for (int r = 0; r < R; ++r) vstore_part(d + r * cb.C, acc[r], cb.cb);
  }
}

// The task skeleton of the block weight gradients: tasks over (group of
// kImagesPerPartial images, block of kLanes channels), each with its own double
// partial [k*k][V], zeroed; make_worker() is called once per thread's range of tasks
// (its scratch lives there) and returns worker(bi, n0, n1, acc), which adds the
// gradient of block bi over images [n0, n1) into acc. gw[c][t] for c < C is then the
// sum of the partials over the groups, in group order, so the result does not depend
// on the number of threads.
template <typename T, typename MakeWorker>
void grouped_weight_grad(int64_t N, int64_t C, int64_t kk, T* gw, const MakeWorker& make_worker) {
  constexpr int64_t V = kLanes<T>;
  const int64_t nb = num_blocks<T>(C);
  const int64_t groups = (N + kImagesPerPartial - 1) / kImagesPerPartial;
  std::vector<double> part(static_cast<size_t>(groups * nb * kk * V), 0.0);
  at::parallel_for(0, groups * nb, 1, [&](int64_t b, int64_t e) {
    auto worker = make_worker();
    for (int64_t task = b; task < e; ++task) {
      const int64_t grp = task / nb;
      worker(task % nb, grp * kImagesPerPartial, std::min(N, (grp + 1) * kImagesPerPartial),
             part.data() + task * kk * V);
    }
  });
  for (int64_t bi = 0; bi < nb; ++bi) {
    const ChannelBlock cb = block_of<T>(bi, C);
    for (int64_t l = 0; l < cb.cb; ++l)
      for (int64_t t = 0; t < kk; ++t) {
        double s = 0;
        for (int64_t grp = 0; grp < groups; ++grp) s += part[((grp * nb + bi) * kk + t) * V + l];
        gw[(cb.c0 + l) * kk + t] = static_cast<T>(s);
      }
  }
}

// grad_w of NCHW for kernel 3, 5 or 7, dilation 1, stride 1 or 2, input planes of up
// to kBlockedPlanePixels: tasks over (group of kImagesPerPartial images, block of
// kLanes channels); per image the block's input planes and output-gradient planes are
// transposed into pixel-vector scratch (planes_to_block; the input zero-padded), and
// each output row's runs go through window_wgrad_run, kWgradRows kernel rows at a time,
// as window_weight_grad does on channels_last tensors (float sums per (row, kernel row)
// added into the task's double partial [k*k][V]; partials summed in group order).
// Returns false (doing nothing) otherwise. Ahead of plane_weight_grad, which vectorises
// along a plane row, on 7x7 to 56x56 planes; level with it at 112x112.
template <typename T>
bool blocked_weight_grad(const DwGeometry& g, const T* x, const T* gy, T* gw) {
  if (g.channels_last || g.H * g.W > kBlockedPlanePixels) return false;
  return with_window(g.K, g.stride, g.dil, [&](auto KT, auto ST) {
    constexpr int K = decltype(KT)::value, S = decltype(ST)::value;
    constexpr int64_t V = kLanes<T>, kk = K * K;
    const int64_t C = g.C, H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
    const int64_t hw = H * W, ohw = Ho * Wo, pad = g.pad;
    const int64_t rows = (Ho - 1) * S + K, cols = (Wo - 1) * S + K;
    grouped_weight_grad(g.N, C, kk, gw, [&] {
      return [&, buf = std::vector<T>(static_cast<size_t>(rows * cols * V + V), T(0)),
              gbuf = std::vector<T>(static_cast<size_t>(ohw * V + V))](
                 int64_t bi, int64_t n0, int64_t n1, double* acc) mutable {
        T* sb = align_to_vector(buf.data());
        T* gb = align_to_vector(gbuf.data());
        const int64_t c0 = bi * V, lanes = std::min(V, C - c0);
        for (int64_t n = n0; n < n1; ++n) {
          planes_to_block(sb, rows, cols, pad, x + (n * C + c0) * hw, H, W, lanes);
          planes_to_block(gb, Ho, Wo, 0, gy + (n * C + c0) * ohw, Ho, Wo, lanes);
          padded_window_wgrad<K, S>(sb, cols, gb, Ho, Wo, acc);
        }
      };
    });
  });
}

// grad_w of channels_last: tasks over (group of kImagesPerPartial images, channel
// block), each a double partial [k*k][V]; partials summed in group order.
// a(c, off) / gsrc(c, off): the input and the output gradient, element offsets of the
// NHWC tensors.
template <typename T, typename ASrc, typename GSrc>
void block_weight_grad(const DwGeometry& g, const ASrc& a, const GSrc& gsrc, T* gw) {
  constexpr int64_t V = kLanes<T>;
  const Pass p = Pass::forward(g, 1);
  const int64_t C = g.C;
  const std::vector<int64_t> toff = p.tap_offsets();
  grouped_weight_grad(g.N, C, g.K * g.K, gw, [&] {
    return [&, buf = std::vector<T>(static_cast<size_t>(p.rows * p.row_len() * V)),
            gr = std::vector<T>(static_cast<size_t>(g.Ho * g.Wo * V))](
               int64_t bi, int64_t n0, int64_t n1, double* acc) mutable {
      const ChannelBlock cb = block_of<T>(bi, C);
      for (int64_t n = n0; n < n1; ++n) {
        pack_block(buf.data(), p, cb, n * g.H * g.W * C, a);
        pack_block_rows(gr.data(), g.Ho, g.Wo, cb, n * g.Ho * g.Wo * C, gsrc);
        block_wgrad(buf.data(), p, gr.data(), toff.data(), acc);
      }
    };
  });
}

// grad_w of channels_last for kernel 3, 5 or 7, dilation 1, stride 1 or 2, straight
// from the NHWC tensors (no packed copies): tasks over (group of kImagesPerPartial
// images, channel block) as block_weight_grad, each output row's runs through
// window_wgrad_run over kWgradRows kernel rows at a time (the run's gradient vectors
// loaded once for them all, each kernel row's input window once for its K taps), float
// sums per (output row, kernel row) added into the task's double partial [k*k][V];
// partials summed in group order. Taken on inputs of at least 28x28 pixels
// (kWindowWgradPixels); otherwise it returns false, doing nothing, and
// block_weight_grad (packed, zero-padded copies) runs: from 28x28 up this pass is
// ahead for kernels 3, 5 and 7; at 7x7 most runs reach into the padding and it is slower.
constexpr int64_t kWindowWgradPixels = 28 * 28;

template <typename T>
bool window_weight_grad(const DwGeometry& g, const T* x, const T* gy, T* gw) {
  if (!g.channels_last || g.H * g.W < kWindowWgradPixels)
    return false;
  return with_window(g.K, g.stride, g.dil, [&](auto KT, auto ST) {
    constexpr int K = decltype(KT)::value, S = decltype(ST)::value;
    constexpr int64_t V = kLanes<T>;
    const int64_t C = g.C, nb = num_blocks<T>(C), tail = C - (nb - 1) * V;
    const int64_t H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo;
    grouped_weight_grad(g.N, C, K * K, gw, [&] {
      return [&](int64_t bi, int64_t n0, int64_t n1, double* acc) {
        const int64_t lanes = bi + 1 < nb ? V : tail;
        for (int64_t n = n0; n < n1; ++n) {
          const T* xn = x + n * H * W * C + bi * V;
          const T* gn = gy + n * Ho * Wo * C + bi * V;
          for (int64_t oh = 0; oh < Ho; ++oh) {
            const T* grow = gn + oh * Wo * C;
            const int64_t ih0 = oh * S - g.pad;  // input row of kernel row 0
            const auto [kh_in0, kh_in1] = taps_inside(ih0, H, K, 1);
            // Kernel rows [kh0, kh0 + G) of this output row, all inside the input.
            const auto rows = [&](int64_t kh0, auto GC) {
              constexpr int G = decltype(GC)::value;
              Vec<T> a[G * K] = {};
              const T* xr = xn + (ih0 + kh0) * W * C;
              for_blocks(Wo, [&](int64_t ow0, auto R) {
                constexpr int RV = decltype(R)::value, NI = S * (RV - 1) + K;
                const int64_t c0 = ow0 * S - g.pad;  // input column of window slot 0
                with_window_slots<NI>(c0, W, lanes, V, [&](auto M, const int64_t* sl) {
                  window_wgrad_run<RV, K, S, G, decltype(M)::value>(
                      xr + c0 * C, W * C, grow + ow0 * C, C, sl, lanes, a);
                });
              });
              add_row_sums<G * K, T>(acc + kh0 * K * V, a);
            };
            for_row_groups<K, kWgradRows<K, S>>([&](int kh0, auto GC) {
              if (kh0 >= kh_in0 && kh0 + decltype(GC)::value <= kh_in1) {
                rows(kh0, GC);
              } else {
                const int64_t lo = std::max<int64_t>(kh0, kh_in0);
                const int64_t hi = std::min<int64_t>(kh0 + decltype(GC)::value, kh_in1);
                for (int64_t kh = lo; kh < hi; ++kh) rows(kh, std::integral_constant<int, 1>{});
              }
            });
          }
        }
      };
    });
  });
}

}  // namespace simd
}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
