// The kernels of bsnas::masked_pwconv2d and its backward (schema in masked_pwconv2d.cpp),
// one code for CPU and CUDA: GEMMs through cpu::matmul_into (cpu/kernels_isa.h).
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>

#include "cpu/kernels_isa.h"
#include "masked_conv_common.h"

namespace bsnas {

namespace {

constexpr const char* kFwd = "masked_pwconv2d";
constexpr const char* kBwd = "masked_pwconv2d_backward";

// The active [out_width, in_width] block of the weight as a strided 2-D view.
at::Tensor active_block(const at::Tensor& weight2d, const PwGeometry& g) {
  return weight2d.narrow(0, 0, g.out_w).narrow(1, 0, g.in_w);
}

// The share of the CPU GEMM's vector lanes that n columns fill.
double lane_fill(int64_t n) {
  static const int64_t lanes = cpu::gemm_f32_lanes();
  return static_cast<double>(n) / ((n + lanes - 1) / lanes * lanes);
}

at::Tensor weight_2d(const at::Tensor& weight, const PwGeometry& g) {
  return weight.contiguous().view({g.out_max, g.in_max});  // contiguous(): no-op for params
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& weight, int64_t in_width,
                   int64_t out_width) {
  const PwGeometry g = check_pw_args(kFwd, x_in, weight, in_width, out_width);
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor w = active_block(weight_2d(weight, g), g);
  at::Tensor y = at::empty({g.N, g.out_w, g.H, g.W}, x.options().memory_format(fmt));
  if (y.numel() == 0) return y;
  if (g.channels_last) {
    at::Tensor y2 = cpu::rows_view(y);
    cpu::matmul_into(y2, cpu::rows_view(x), w.t());
  } else {
    at::Tensor y3 = y.view({g.N, g.out_w, g.H * g.W});
    cpu::shared_left_bmm_into(y3, w, x.view({g.N, g.in_w, g.H * g.W}));
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                            const at::Tensor& x_in,
                                            const at::Tensor& weight, int64_t in_width,
                                            int64_t out_width) {
  const PwGeometry g = check_pw_args(kBwd, x_in, weight, in_width, out_width);
  check_grad_out(kBwd, grad_out, x_in, {g.N, g.out_w, g.H, g.W});
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  const at::Tensor gy = grad_out.contiguous(fmt);
  const at::Tensor w = active_block(weight_2d(weight, g), g);
  at::Tensor gx = at::empty({g.N, g.in_w, g.H, g.W}, x.options().memory_format(fmt));
  // Full-shaped weight gradient; the GEMMs below write the active block in full.
  at::Tensor gw_full = weight_grad_outside_zeroed(weight, g.out_w, g.in_w);
  if (x.numel() == 0) return {gx.zero_(), gw_full.zero_()};
  at::Tensor gw = active_block(gw_full.view({g.out_max, g.in_max}), g);
  if (g.channels_last) {
    const at::Tensor gy2 = cpu::rows_view(gy), x2 = cpu::rows_view(x);
    at::Tensor gx2 = cpu::rows_view(gx);
    cpu::matmul_into(gx2, gy2, w);
    // gw = gy^T x over every pixel. The CPU GEMM's columns run in vectors (16 floats
    // with AVX-512, 8 with AVX2): where in_width fills them worse than out_width (AVX-512:
    // 24 inputs fill 3/4 of the lanes, 16 or 48 outputs all), or as well but is the wider
    // (48 -> 16: one-vector tiles of 16 rows over the 48 inputs beat two-vector tiles of
    // 8 rows over 16 outputs), it computes gw^T = x^T gy into a small temporary instead.
    // The lane count is the running copy's (gemm_f32_lanes), so the rule holds for AVX2
    // as for AVX-512.
    if (cpu::runs_gemm_f32(gw, gy2.t(), x2) && (lane_fill(g.in_w) < lane_fill(g.out_w) ||
         (lane_fill(g.in_w) == lane_fill(g.out_w) && g.in_w > g.out_w))) {
      at::Tensor gwt = at::empty({g.in_w, g.out_w}, gw.options());
      cpu::matmul_into(gwt, x2.t(), gy2);
      // Transposed into the strided view element by element (a few KB; no aten::copy_).
      const float* src = gwt.const_data_ptr<float>();
      float* dst = gw.mutable_data_ptr<float>();
      const int64_t ld = gw.stride(0);
      for (int64_t i = 0; i < g.in_w; ++i)
        for (int64_t o = 0; o < g.out_w; ++o) dst[o * ld + i] = src[i * g.out_w + o];
    } else {
      cpu::matmul_into(gw, gy2.t(), x2);  // writes through the strided view
    }
  } else {
    const int64_t hw = g.H * g.W;
    const at::Tensor gy3 = gy.view({g.N, g.out_w, hw}), x3 = x.view({g.N, g.in_w, hw});
    at::Tensor gx3 = gx.view({g.N, g.in_w, hw});
    cpu::shared_left_bmm_into(gx3, w.t(), gy3);
    // sum_n gy[n] @ x[n]^T. Small planes (N*H*W*(out + in) < N*out*in values): one GEMM
    // over [C, N*H*W] copies of gy and x. Planes up to 32x32, float32 on CPU, with
    // out >= in or at least 8192 weight values: image by image, added into gw (the GEMM
    // packs x[n]^T): faster than MKL's batched GEMM there, except for narrow
    // out < in products (under 8192 weight values), where it is not. Else batched
    // products summed over n, in chunks of the batch that bound the [chunk, out, in]
    // temporary.
    if (hw * (g.out_w + g.in_w) < g.out_w * g.in_w) {
      const at::Tensor gyt = gy3.transpose(0, 1).reshape({g.out_w, g.N * hw});
      const at::Tensor xt = x3.transpose(0, 1).reshape({g.in_w, g.N * hw});
      cpu::matmul_into(gw, gyt, xt.t());  // writes through the strided view
    } else if (gw.is_cpu() && gw.scalar_type() == at::kFloat && hw <= 1024 &&
               (g.out_w >= g.in_w || g.out_w * g.in_w >= 8192)) {
      for (int64_t n = 0; n < g.N; ++n) cpu::matmul_into(gw, gy3[n], x3[n].t(), n > 0);
    } else {
      const int64_t per = std::max<int64_t>(1, (int64_t{1} << 23) / (g.out_w * g.in_w));
      for (int64_t n0 = 0; n0 < g.N; n0 += per) {
        const int64_t len = std::min(per, g.N - n0);
        const at::Tensor prod =
            at::bmm(gy3.narrow(0, n0, len), x3.narrow(0, n0, len).transpose(1, 2));
        if (n0 == 0) {
          at::sum_out(gw, prod, 0);  // reduces straight into the strided view
        } else {
          gw.add_(prod.sum(0));
        }
      }
    }
  }
  return {gx, gw_full};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CPU, m) {
  m.impl("masked_pwconv2d", &forward);
  m.impl("_masked_pwconv2d_backward", &backward);
}

#ifdef BSNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(bsnas, CUDA, m) {
  m.impl("masked_pwconv2d", &forward);
  m.impl("_masked_pwconv2d_backward", &backward);
}
#endif

}  // namespace bsnas
