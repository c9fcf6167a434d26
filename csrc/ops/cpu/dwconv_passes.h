// Parallel drivers of the depthwise passes over whole tensors, on the micro-kernels of
// dwconv_simd.h: forward, input gradient and weight gradient, NCHW (one task per plane,
// or per channel for the weight gradient) and channels_last (one task per image x block
// of channels, or per group of images x block for the weight gradient).
//
// The caller supplies what is read (a transform applied while packing: identity for
// masked_dwconv2d; BN + activation of the input, or the upstream gradient with the
// statistics terms, for bn_act_dwconv2d) and what happens to each result (a plain store,
// statistics, the BN-activation input gradient). Per-task partial sums live in
// caller-owned double arrays with one slot per (image, channel block) or (plane), so
// every reduction runs in a fixed order whatever the number of threads.
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

// Scratch bytes of a group of small NCHW planes convolved together.
constexpr int64_t kPlaneGroupBytes = 64 * 1024;

// Scratch bytes per strip of the channels_last passes: a fraction of a core's L2.
constexpr int64_t kStripBytes = 96 * 1024;

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

// ------------------------------------------------------------------ channels_last

// For every image n and channel block: pack src(c, off) of the image's source tensor
// (`src_image` elements per image) into the scratch, convolve with the block's filters
// (flipped for the input-gradient pass) and hand each output vector to
// out(n, block index, block, oh, ow, vec).
template <typename T, typename Src, typename Out>
void block_pass(const Pass& p, int64_t N, int64_t C, int64_t src_image, const T* w, bool flip,
                const Src& src, const Out& out) {
  constexpr int64_t V = kLanes<T>;
  const int64_t kk = p.K * p.K, nb = num_blocks<T>(C);
  const std::vector<int64_t> toff = p.tap_offsets();
  // Strips of output rows whose scratch stays in the core's caches.
  const int64_t ro = p.strip_rows(p.row_len() * V * int64_t(sizeof(T)), kStripBytes);
  const int64_t max_rows = (ro - 1) * p.S + (p.K - 1) * p.d + 1;
  at::parallel_for(0, N * nb, grain(p.Ho * p.Wo * V * kk), [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(max_rows * p.row_len() * V));
    std::vector<T> tp(static_cast<size_t>(kk * V));
    int64_t packed = -1;
    for (int64_t task = b; task < e; ++task) {
      // Block-major: consecutive tasks share the block's transposed filters.
      const int64_t bi = task / N, n = task % N;
      const ChannelBlock cb = block_of<T>(bi, C);
      if (packed != bi) {
        pack_taps(tp.data(), w, cb, kk, flip);
        packed = bi;
      }
      for (int64_t oh0 = 0; oh0 < p.Ho; oh0 += ro) {
        const Pass sp = p.strip(oh0, std::min(ro, p.Ho - oh0));
        pack_block(buf.data(), sp, cb, n * src_image, src);
        block_conv(buf.data(), sp, tp.data(), toff.data(),
                   [&](int64_t oh, int64_t ow, const Vec<T>& v) {
                     out(n, bi, cb, oh0 + oh, ow, v);
                   });
      }
    }
  });
}

// Stores an output vector of a channel block at pixel `pix` of an NHWC tensor.
template <typename T>
inline void store_block(T* dst, const ChannelBlock& cb, int64_t pix, const Vec<T>& v) {
  T* d = dst + pix * cb.C + cb.c0;
  vstore_part(d, v, cb.cb);
}

// grad_w of channels_last: tasks over (group of kImagesPerPartial images, channel
// block), each a double partial [k*k][V]; partials summed in group order.
// a(c, off) / gsrc(c, off): the input and the output gradient, element offsets of the
// NHWC tensors.
template <typename T, typename ASrc, typename GSrc>
void block_weight_grad(const DwGeometry& g, const ASrc& a, const GSrc& gsrc, T* gw) {
  constexpr int64_t V = kLanes<T>;
  const Pass p = Pass::forward(g, 1);
  const int64_t kk = g.K * g.K, C = g.C, nb = num_blocks<T>(C);
  const int64_t groups = (g.N + kImagesPerPartial - 1) / kImagesPerPartial;
  const std::vector<int64_t> toff = p.tap_offsets();
  std::vector<double> part(static_cast<size_t>(groups * nb * kk * V), 0.0);
  at::parallel_for(0, groups * nb, 1, [&](int64_t b, int64_t e) {
    std::vector<T> buf(static_cast<size_t>(p.rows * p.row_len() * V));
    std::vector<T> gr(static_cast<size_t>(g.Ho * g.Wo * V));
    for (int64_t task = b; task < e; ++task) {
      const int64_t grp = task / nb, bi = task % nb;
      const ChannelBlock cb = block_of<T>(bi, C);
      double* acc = part.data() + task * kk * V;
      const int64_t n_end = std::min(g.N, (grp + 1) * kImagesPerPartial);
      for (int64_t n = grp * kImagesPerPartial; n < n_end; ++n) {
        pack_block(buf.data(), p, cb, n * g.H * g.W * C, a);
        pack_block_rows(gr.data(), g.Ho, g.Wo, cb, n * g.Ho * g.Wo * C, gsrc);
        block_wgrad(buf.data(), p, gr.data(), toff.data(), acc);
      }
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

}  // namespace simd
}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
