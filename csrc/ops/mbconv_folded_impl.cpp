// The kernel of bsnas::mbconv_folded (schema in mbconv_folded.cpp), one code for CPU and
// CUDA: two GEMMs around the _mbconv_folded_depthwise op.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/kernels_isa.h"
#include "masked_conv_common.h"
#include "op_handles.h"

namespace bsnas {

namespace {

constexpr const char* kOp = "mbconv_folded";

// A [rows, cols, 1, 1] 1x1-convolution weight as the 2-D matrix it is.
at::Tensor matrix(const at::Tensor& w, const char* name, int64_t cols) {
  TORCH_CHECK(w.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == 1 && w.size(3) == 1 && w.size(1) == cols, kOp,
              ": ", name, " must be [rows, ", cols, ", 1, 1], got ", w.sizes());
  return w.contiguous().view({w.size(0), cols});  // a no-op for the cached folded weights
}

// y = w @ x per image into `y` (beta = 0), or y += w @ x (beta = 1): one GEMM over all
// pixels for channels_last, one batched GEMM over the images for NCHW
// (cpu::shared_left_bmm_into).
void pointwise(const at::Tensor& x, const at::Tensor& w2, at::Tensor& y, bool accumulate,
               bool channels_last) {
  if (channels_last) {
    at::Tensor y2 = cpu::rows_view(y);
    cpu::matmul_into(y2, cpu::rows_view(x), w2.t(), accumulate);
  } else {
    const int64_t N = x.size(0), hw = x.size(2) * x.size(3);
    at::Tensor y3 = y.view({N, y.size(1), hw});
    cpu::shared_left_bmm_into(y3, w2, x.view({N, x.size(1), hw}), accumulate);
  }
}

at::Tensor mbconv_folded(const at::Tensor& x_in, const at::Tensor& expand_w,
                         const at::Tensor& expand_b, const at::Tensor& dw_w,
                         const at::Tensor& dw_b, const at::Tensor& project_w,
                         const at::Tensor& project_b, int64_t stride, int64_t act,
                         bool residual) {
  TORCH_CHECK(x_in.defined() && x_in.dim() == 4, kOp, ": x must be 4-D [N, in, H, W]");
  check_floating(kOp, x_in);
  for (const auto& [t, name] :
       {std::pair{&expand_w, "expand_w"}, std::pair{&project_w, "project_w"}}) {
    TORCH_CHECK(t->defined(), kOp, ": ", name, " is undefined");
    check_same(kOp, *t, name, x_in, "x");
  }
  const int64_t cin = x_in.size(1);
  const at::Tensor we = matrix(expand_w, "expand_w", cin);
  const int64_t c = we.size(0);
  const at::Tensor wp = matrix(project_w, "project_w", c);
  const int64_t cout = wp.size(0);
  TORCH_CHECK(!residual || (stride == 1 && cout == cin), kOp,
              ": a residual block needs stride 1 and out == in channels, got stride ",
              stride, ", in ", cin, ", out ", cout);
  const auto fmt = compute_format(x_in);
  const at::Tensor x = x_in.contiguous(fmt);
  at::Tensor z = at::empty({x.size(0), c, x.size(2), x.size(3)}, x.options().memory_format(fmt));
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  if (z.numel() > 0) pointwise(x, we, z, /*accumulate=*/false, cl);  // launch 1
  using DwSig = std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const std::optional<at::Tensor>&, int64_t, int64_t);
  static const auto dw_op = handle<DwSig>("bsnas::_mbconv_folded_depthwise");
  const std::optional<at::Tensor> shortcut =
      residual ? std::optional<at::Tensor>(x) : std::nullopt;
  auto [h, out] = dw_op.call(z, expand_b, dw_w, dw_b, project_b, shortcut, stride, act);  // 2
  // At width 1, z (and h) are NCHW and channels_last at once and the stage returns `out`
  // NCHW; the result keeps x's format (an extra copy in that corner case only).
  if (!out.is_contiguous(fmt)) out = out.contiguous(fmt);
  if (out.numel() > 0) pointwise(h, wp, out, /*accumulate=*/true, cl);                   // 3
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CPU, m) { m.impl("mbconv_folded", &mbconv_folded); }

#ifdef BSNAS_WITH_CUDA
TORCH_LIBRARY_IMPL(bsnas, CUDA, m) { m.impl("mbconv_folded", &mbconv_folded); }
#endif

}  // namespace bsnas
