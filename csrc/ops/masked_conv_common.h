// Shapes, argument checks and index math shared by the CPU and CUDA kernels of the
// masked variable-width convolutions. The index helpers are __host__ __device__ so
// the CPU tests exercise the exact arithmetic the CUDA kernels use.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#if defined(__CUDACC__)
#define BSNAS_HD __host__ __device__ __forceinline__
#else
#define BSNAS_HD inline
#endif

namespace bsnas {

// Output length of a convolution along one spatial axis.
BSNAS_HD int64_t conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad,
                               int64_t dil) {
  return (in + 2 * pad - dil * (k - 1) - 1) / stride + 1;
}

// For a kernel tap at offset `off` (input index = out * stride + off), the half-open
// range [lo, hi) of output indices whose input index lies in [0, in).
BSNAS_HD void valid_out_range(int64_t in, int64_t out, int64_t stride, int64_t off,
                              int64_t* lo, int64_t* hi) {
  int64_t l = off >= 0 ? 0 : (-off + stride - 1) / stride;
  int64_t h = (in - 1 - off) < 0 ? 0 : (in - 1 - off) / stride + 1;
  *lo = l;
  *hi = h < out ? h : out;
  if (*hi < *lo) *hi = *lo;
}

// Inverse map used by gather-style input gradients: output index of input `i` through
// tap offset `off`, or -1 when no output reads input `i` through that tap.
BSNAS_HD int64_t out_index_for_input(int64_t i, int64_t off, int64_t stride,
                                     int64_t out) {
  int64_t t = i - off;
  if (t < 0 || t % stride != 0) return -1;
  t /= stride;
  return t < out ? t : -1;
}

// Activations the fused kernels apply (codes shared with bsnas/ops/bn_act_dwconv.py).
enum ActCode : int64_t { kActIdentity = 0, kActReLU = 1, kActReLU6 = 2 };

// NaN propagates, as F.relu / F.relu6 (clamp) give it: each comparison is false for
// NaN, which then falls through (the SIMD form is one max / min with v as the operand
// returned on unordered compares).
template <typename T>
BSNAS_HD T activate(T v, int64_t act) {
  if (act == kActIdentity) return v;
  v = v < T(0) ? T(0) : v;
  if (act == kActReLU6) v = v > T(6) ? T(6) : v;
  return v;
}

// Whether d act / d u is 1 (else 0) at u, as the autograd of F.relu / F.relu6 on the
// device at hand defines it: 0 at the kinks u == 0 and u == 6 and past them. At u = NaN
// ReLU passes the gradient (threshold_backward: u <= 0 ? 0 : g, CPU and CUDA); ReLU6
// passes it on CUDA (hardtanh_backward: u <= 0 || u >= 6 ? 0 : g) and not on CPU, whose
// vectorised hardtanh_backward is (u > 0) & (u < 6) (only its scalar tail, under 16
// values a loop, passes it).
template <typename T>
BSNAS_HD bool act_passes(T u, int64_t act) {
  if (act == kActIdentity) return true;
  if (act == kActReLU) return !(u <= T(0));
#if defined(__CUDA_ARCH__)
  return !(u <= T(0) || u >= T(6));
#else
  return u > T(0) && u < T(6);
#endif
}

// The memory format every op of this extension computes in and returns: channels_last
// when the input is densely channels_last and not also plain contiguous, NCHW
// otherwise. The Python fake kernels apply the same rule.
inline at::MemoryFormat compute_format(const at::Tensor& x) {
  return (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous())
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

struct DwGeometry {
  int64_t N, C, H, W;  // input; C is the active width
  int64_t K;           // square, odd kernel size
  int64_t Ho, Wo;
  int64_t stride, pad, dil;
  int64_t c_max;
  bool channels_last;
};

inline void check_floating(const char* op, const at::Tensor& x) {
  if (x.is_cpu()) {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": CPU tensors must be float32 or float64, got ", x.scalar_type(),
                " (half precision is supported on CUDA only)");
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                    x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                op, ": CUDA tensors must be float32, float64, float16 or bfloat16, got ",
                x.scalar_type());
  }
}

// bsnas::channel_stats's input, for the CPU and CUDA kernels: checked, dense in its
// compute format, with the two float64 outputs [C] allocated.
struct ChannelStatsArgs {
  at::Tensor z, sum, sumsq;
  bool channels_last;
};
inline ChannelStatsArgs prepare_channel_stats(const at::Tensor& z_in) {
  TORCH_CHECK(z_in.defined() && z_in.dim() == 4, "channel_stats: z must be 4-D [N, C, H, W], got ",
              z_in.defined() ? z_in.dim() : 0, "-D");
  check_floating("channel_stats", z_in);
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt);
  const auto f64 = z.options().dtype(at::kDouble);
  return {z, at::empty({z.size(1)}, f64), at::empty({z.size(1)}, f64),
          fmt == at::MemoryFormat::ChannelsLast};
}

inline void check_same(const char* op, const at::Tensor& a, const char* a_name,
                       const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " is on ", a.device(), " but ",
              b_name, " is on ", b.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " is ",
              a.scalar_type(), " but ", b_name, " is ", b.scalar_type());
}

// Arguments of bsnas::_channel_stats_grad_add_ (channel_stats.cpp), for the CPU and CUDA
// kernels: grad_z and z of one shape, dtype and device, both dense in z's compute
// format (grad_z is written in place, so it is never copied); grad_sum and grad_sumsq
// float64 [C]. Returns whether that format is channels_last.
inline bool check_stats_grad_add(const at::Tensor& grad_z, const at::Tensor& z,
                                 const at::Tensor& grad_sum, const at::Tensor& grad_sumsq) {
  constexpr const char* op = "_channel_stats_grad_add_";
  TORCH_CHECK(grad_z.defined() && z.defined(), op, ": undefined tensor");
  TORCH_CHECK(z.dim() == 4, op, ": z must be 4-D [N, C, H, W], got ", z.dim(), "-D");
  check_floating(op, z);
  check_same(op, grad_z, "grad_z", z, "z");
  TORCH_CHECK(grad_z.sizes() == z.sizes(), op, ": grad_z has shape ", grad_z.sizes(),
              " but z has ", z.sizes());
  const auto fmt = compute_format(z);
  TORCH_CHECK(z.is_contiguous(fmt) && grad_z.is_contiguous(fmt), op,
              ": grad_z and z must be dense in one memory format");
  for (const auto& [t, name] :
       {std::pair{&grad_sum, "grad_sum"}, std::pair{&grad_sumsq, "grad_sumsq"}}) {
    TORCH_CHECK(t->defined() && t->scalar_type() == at::kDouble && t->dim() == 1 &&
                    t->size(0) == z.size(1),
                op, ": ", name, " must be float64 [", z.size(1), "]");
    TORCH_CHECK(t->device() == z.device(), op, ": ", name, " is on ", t->device(),
                " but z is on ", z.device());
  }
  return fmt == at::MemoryFormat::ChannelsLast;
}

inline DwGeometry check_dw_args(const char* op, const at::Tensor& x,
                                const at::Tensor& weight, int64_t width, int64_t stride,
                                int64_t padding, int64_t dilation) {
  TORCH_CHECK(x.defined() && weight.defined(), op, ": undefined tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, width, H, W], got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D [C_max, 1, k, k], got ",
              weight.dim(), "-D");
  check_same(op, x, "x", weight, "weight");
  check_floating(op, x);
  TORCH_CHECK(weight.size(1) == 1, op,
              ": weight must be depthwise [C_max, 1, k, k], got size(1) = ",
              weight.size(1));
  TORCH_CHECK(weight.size(2) == weight.size(3), op, ": kernel must be square, got ",
              weight.size(2), "x", weight.size(3));
  TORCH_CHECK(weight.size(2) % 2 == 1, op, ": kernel size must be odd, got ",
              weight.size(2));
  const int64_t c_max = weight.size(0);
  TORCH_CHECK(width >= 1 && width <= c_max, op, ": width must be in [1, C_max = ", c_max,
              "], got ", width);
  TORCH_CHECK(x.size(1) == width, op, ": x has ", x.size(1),
              " channels but the active width is ", width);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(dilation >= 1, op, ": dilation must be >= 1, got ", dilation);
  DwGeometry g;
  g.N = x.size(0);
  g.C = width;
  g.H = x.size(2);
  g.W = x.size(3);
  g.K = weight.size(2);
  g.stride = stride;
  g.pad = padding;
  g.dil = dilation;
  g.c_max = c_max;
  g.Ho = conv_out_size(g.H, g.K, stride, padding, dilation);
  g.Wo = conv_out_size(g.W, g.K, stride, padding, dilation);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, op, ": input ", g.H, "x", g.W,
              " is too small for kernel ", g.K, " with padding ", padding,
              " and dilation ", dilation);
  g.channels_last = compute_format(x) == at::MemoryFormat::ChannelsLast;
  return g;
}

inline void check_grad_out(const char* op, const at::Tensor& grad_out,
                           const at::Tensor& x, at::IntArrayRef expected,
                           const char* grad_name = "grad_out", const char* x_name = "x") {
  TORCH_CHECK(grad_out.defined(), op, ": ", grad_name, " is undefined");
  check_same(op, grad_out, grad_name, x, x_name);
  TORCH_CHECK(grad_out.sizes() == expected, op, ": ", grad_name, " has shape ",
              grad_out.sizes(), ", expected ", expected);
}

// Per-channel affine (scale, shift) of the fused BN, and the activation code.
inline void check_affine_act(const char* op, const at::Tensor& x, const at::Tensor& scale,
                             const at::Tensor& shift, int64_t width, int64_t act,
                             const char* scale_name = "scale",
                             const char* shift_name = "shift", const char* x_name = "z") {
  for (const auto& [t, name] : {std::pair{&scale, scale_name}, std::pair{&shift, shift_name}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    check_same(op, *t, name, x, x_name);
    TORCH_CHECK(t->dim() == 1 && t->size(0) == width, op, ": ", name,
                " must be 1-D of the active width ", width, ", got shape ", t->sizes());
  }
  TORCH_CHECK(act == kActIdentity || act == kActReLU || act == kActReLU6, op,
              ": activation code must be 0 (identity), 1 (relu) or 2 (relu6), got ", act);
}

// The full-shaped weight gradient of a masked op, viewed as [size(0), numel / size(0)],
// whose active block (the first `rows` rows, and of those the first `cols` columns) the
// caller's kernel writes in full: only the entries outside the block are zeroed here
// (none at full width), instead of filling the whole tensor first.
inline at::Tensor weight_grad_outside_zeroed(const at::Tensor& weight, int64_t rows,
                                             int64_t cols) {
  at::Tensor gw = at::empty(weight.sizes(), weight.options());
  const int64_t r_max = weight.size(0), c_max = weight.numel() / r_max;
  const at::Tensor gw2 = gw.view({r_max, c_max});
  if (rows < r_max) gw2.narrow(0, rows, r_max - rows).zero_();
  if (cols < c_max) gw2.narrow(0, 0, rows).narrow(1, cols, c_max - cols).zero_();
  return gw;
}

// bsnas::bn_act's and its backward's inputs, for the CPU and CUDA kernels: y [N, C, H,
// W] and its per-channel scale / shift (and the backward's grad_h) checked and dense in
// y's compute format, with the outputs allocated: `out` (h, or the backward's grad_y)
// like y, and the backward's grad_scale / grad_shift [C], uninitialised (the kernels
// write every entry; for an empty y the caller zeroes them).
struct BnActArgs {
  at::Tensor y, scale, shift, grad_h, out, grad_scale, grad_shift;
  bool channels_last;
};
inline BnActArgs prepare_bn_act(const char* op, const at::Tensor& y_in,
                                const at::Tensor& scale_in, const at::Tensor& shift_in,
                                int64_t act, const at::Tensor* grad_h_in = nullptr) {
  TORCH_CHECK(y_in.defined() && y_in.dim() == 4, op, ": y must be 4-D [N, C, H, W], got ",
              y_in.defined() ? y_in.dim() : 0, "-D");
  check_floating(op, y_in);
  check_affine_act(op, y_in, scale_in, shift_in, y_in.size(1), act, "scale", "shift", "y");
  if (grad_h_in != nullptr) check_grad_out(op, *grad_h_in, y_in, y_in.sizes(), "grad_h", "y");
  const auto fmt = compute_format(y_in);
  BnActArgs a;
  a.y = y_in.contiguous(fmt);
  a.scale = scale_in.contiguous();
  a.shift = shift_in.contiguous();
  a.out = at::empty_like(a.y, a.y.options().memory_format(fmt));
  a.channels_last = fmt == at::MemoryFormat::ChannelsLast;
  if (grad_h_in != nullptr) {
    a.grad_h = grad_h_in->contiguous(fmt);
    a.grad_scale = at::empty({a.y.size(1)}, a.y.options());
    a.grad_shift = at::empty({a.y.size(1)}, a.y.options());
  }
  return a;
}

// Arguments of bsnas::_bn_act_dwconv2d_backward (the CPU and CUDA kernels).
inline DwGeometry check_bn_act_dw_backward_args(
    const char* op, const at::Tensor& grad_y, const at::Tensor& grad_sum,
    const at::Tensor& grad_sumsq, const at::Tensor& z, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& weight, const at::Tensor& y, int64_t width,
    int64_t stride, int64_t padding, int64_t dilation, int64_t act) {
  const DwGeometry g = check_dw_args(op, z, weight, width, stride, padding, dilation);
  check_affine_act(op, z, scale, shift, width, act);
  check_grad_out(op, grad_y, z, {g.N, g.C, g.Ho, g.Wo});
  check_grad_out(op, y, z, {g.N, g.C, g.Ho, g.Wo});
  // The statistics are float64 (see bn_act_dwconv2d.cpp), and so are their gradients.
  for (const auto& [t, name] :
       {std::pair{&grad_sum, "grad_sum"}, std::pair{&grad_sumsq, "grad_sumsq"}}) {
    TORCH_CHECK(t->defined(), op, ": ", name, " is undefined");
    TORCH_CHECK(t->device() == z.device(), op, ": ", name, " is on ", t->device(),
                " but z is on ", z.device());
    TORCH_CHECK(t->scalar_type() == at::kDouble, op, ": ", name,
                " must be float64 like the statistics, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C, op, ": ", name, " has shape ",
                t->sizes(), ", expected [", g.C, "]");
  }
  return g;
}

// Arguments of bsnas::_mbconv_folded_depthwise (mbconv_folded.cpp's stage 2, CPU and
// CUDA): the depthwise geometry ("same" padding, dilation 1) and the shape of `out`.
struct FoldedDwArgs {
  DwGeometry g;
  int64_t cout;
};

inline FoldedDwArgs check_folded_dw_args(const char* op, const at::Tensor& z,
                                         const at::Tensor& expand_b, const at::Tensor& dw_w,
                                         const at::Tensor& dw_b, const at::Tensor& project_b,
                                         const std::optional<at::Tensor>& shortcut,
                                         int64_t stride, int64_t act) {
  TORCH_CHECK(z.defined() && z.dim() == 4, op, ": z must be 4-D [N, c, H, W]");
  TORCH_CHECK(dw_w.defined() && dw_w.dim() == 4, op, ": dw_w must be 4-D [c, 1, k, k]");
  TORCH_CHECK(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const DwGeometry g =
      check_dw_args(op, z, dw_w, z.size(1), stride, dw_w.size(2) / 2, /*dilation=*/1);
  check_affine_act(op, z, expand_b, dw_b, g.C, act, "expand_b", "dw_b");
  TORCH_CHECK(project_b.defined() && project_b.dim() == 1 && project_b.size(0) >= 1, op,
              ": project_b must be 1-D [out], got ",
              project_b.defined() ? project_b.sizes() : at::IntArrayRef{});
  check_same(op, project_b, "project_b", z, "z");
  const int64_t cout = project_b.size(0);
  if (shortcut.has_value() && shortcut->defined()) {
    check_same(op, *shortcut, "shortcut", z, "z");
    const std::vector<int64_t> want{g.N, cout, g.Ho, g.Wo};
    TORCH_CHECK(shortcut->sizes() == at::IntArrayRef(want), op, ": shortcut has shape ",
                shortcut->sizes(), ", expected ", at::IntArrayRef(want));
  }
  return {g, cout};
}

struct PwGeometry {
  int64_t N, H, W, in_w, out_w, in_max, out_max;
  bool channels_last;
};

inline PwGeometry check_pw_args(const char* op, const at::Tensor& x,
                                const at::Tensor& weight, int64_t in_width,
                                int64_t out_width) {
  TORCH_CHECK(x.defined() && weight.defined(), op, ": undefined tensor");
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [N, in_width, H, W], got ", x.dim(),
              "-D");
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1, op,
              ": weight must be [Cout_max, Cin_max, 1, 1], got ", weight.sizes());
  check_same(op, x, "x", weight, "weight");
  check_floating(op, x);
  PwGeometry g;
  g.out_max = weight.size(0);
  g.in_max = weight.size(1);
  TORCH_CHECK(in_width >= 1 && in_width <= g.in_max, op,
              ": in_width must be in [1, Cin_max = ", g.in_max, "], got ", in_width);
  TORCH_CHECK(out_width >= 1 && out_width <= g.out_max, op,
              ": out_width must be in [1, Cout_max = ", g.out_max, "], got ", out_width);
  TORCH_CHECK(x.size(1) == in_width, op, ": x has ", x.size(1),
              " channels but in_width is ", in_width);
  g.N = x.size(0);
  g.H = x.size(2);
  g.W = x.size(3);
  g.in_w = in_width;
  g.out_w = out_width;
  g.channels_last = compute_format(x) == at::MemoryFormat::ChannelsLast;
  return g;
}

}  // namespace bsnas
