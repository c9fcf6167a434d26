// CUDA kernel of bsnas::_mbconv_folded_depthwise, the middle launch of the folded spring
// block in inference (mbconv_folded.cpp), float32/float64/float16/bfloat16, NCHW and
// channels_last, float (double for float64) arithmetic:
//
//   h   = act(dwconv(act(z + expand_b), dw_w) + dw_b)   ("same" padding, dilation 1)
//   out = project_b (+ shortcut)                         (the project GEMM's beta = 1 input)
//
// One kernel does both: the depthwise part has the block layout of the fused training
// kernels (bn_act_dwconv2d_kernel.cu: NCHW one block per channel and chunk of positions
// with the taps in registers; channels_last channel tiles x pixel lanes; strips of kStrip
// outputs per thread for k = 3, 5, 7), reading z through BiasActInput; then every thread
// of the grid takes a grid-stride share of `out`.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "dwconv_cuda.cuh"

namespace bsnas {
namespace {

constexpr const char* kOp = "_mbconv_folded_depthwise";

// out = project_b (+ shortcut): what the project GEMM accumulates into.
template <typename scalar_t>
struct OutInit {
  scalar_t* __restrict__ out;
  const scalar_t* __restrict__ bias;
  const scalar_t* __restrict__ shortcut;  // null: no residual
  int64_t total, cout, plane;            // plane = Ho * Wo (NCHW), 1 (channels_last)

  // Thread `t` of `threads` in the whole grid.
  __device__ __forceinline__ void run(int64_t t, int64_t threads) const {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t i = t; i < total; i += threads) {
      acc_t v = static_cast<acc_t>(bias[(i / plane) % cout]);
      if (shortcut != nullptr) v += static_cast<acc_t>(shortcut[i]);
      out[i] = static_cast<scalar_t>(v);
    }
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t bias_act(acc_t v, acc_t b, int act) {
  return activate(v + b, act);
}

// Block (kThreads): channel blockIdx.x, positions [q0, q1) of N*Ho*(outputs or strips
// per row), chunk blockIdx.y. ST > 0: strips (stride ST, dilation 1).
template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kThreads)
    folded_dw_nchw(const BiasActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ db, scalar_t* __restrict__ h,
                   const OutInit<scalar_t> init, const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  const index_t c = blockIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t HoWo = d.Ho * d.Wo, HW = d.H * d.W;
  const index_t Wq = row_positions<ST>(d.Wo), HoWq = d.Ho * Wq;
  const index_t M = d.N * HoWq;
  const index_t q0 = index_t(blockIdx.y) * chunk;
  const index_t q1 = q0 + (chunk < M - q0 ? chunk : M - q0);
  const auto ch = in.channel(c);
  const acc_t bias = static_cast<acc_t>(db[c]);
  const scalar_t* wp = w + c * K * K;
  acc_t wr[kR];
  if constexpr (KS > 0) {
#pragma unroll
    for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
  }
  for (index_t q = q0 + threadIdx.x; q < q1; q += blockDim.x) {
    const index_t n = q / HoWq;
    const index_t r = q - n * HoWq;
    const index_t oh = r / Wq, oq = r - oh * Wq;
    const index_t nc = n * d.C + c;
    if constexpr (ST > 0) {
      acc_t out[kStrip];
      const index_t ow0 = oq * kStrip;
      conv_strip<KS, ST>(in, ch, wr, d, nc * HW, d.W, index_t(1), oh * ST - d.pad,
                         ow0 * ST - d.pad, out);
      const index_t hb = nc * HoWo + oh * d.Wo;
#pragma unroll
      for (int j = 0; j < kStrip; ++j)
        if (ow0 + j < d.Wo) h[hb + ow0 + j] = static_cast<scalar_t>(bias_act(out[j], bias, in.act));
    } else {
      const acc_t s = conv_at<KS>(in, ch, wr, wp, d, nc * HW, d.W, index_t(1),
                                  oh * d.stride - d.pad, oq * d.stride - d.pad);
      h[nc * HoWo + r] = static_cast<scalar_t>(bias_act(s, bias, in.act));
    }
  }
  const int64_t block = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  init.run(block * blockDim.x + threadIdx.x, int64_t(gridDim.x) * gridDim.y * blockDim.x);
}

// Block (ct channels) x (py pixel lanes): channel tile blockIdx.x, positions [p0, p1)
// of N*Ho*(outputs or strips per row), chunk blockIdx.y.
template <typename scalar_t, typename index_t, int KS, int ST>
__global__ void __launch_bounds__(kTileThreads)
    folded_dw_nhwc(const BiasActInput<scalar_t> in, const scalar_t* __restrict__ w,
                   const scalar_t* __restrict__ db, scalar_t* __restrict__ h,
                   const OutInit<scalar_t> init, const Dims<index_t> d, const index_t chunk) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kR = KS > 0 ? KS * KS : 1;
  const index_t c = index_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t K = KS > 0 ? index_t(KS) : d.K;
  const index_t Wq = row_positions<ST>(d.Wo);
  const index_t P = d.N * d.Ho * Wq;
  const index_t p0 = index_t(blockIdx.y) * chunk;
  const index_t p1 = p0 + (chunk < P - p0 ? chunk : P - p0);
  if (c < d.C) {
    const auto ch = in.channel(c);
    const acc_t bias = static_cast<acc_t>(db[c]);
    const scalar_t* wp = w + c * K * K;
    acc_t wr[kR];
    if constexpr (KS > 0) {
#pragma unroll
      for (int t = 0; t < kR; ++t) wr[t] = static_cast<acc_t>(wp[t]);
    }
    const index_t WC = d.W * d.C, HWC = d.H * WC;
    for (index_t p = p0 + threadIdx.y; p < p1; p += blockDim.y) {
      const index_t oq = p % Wq;
      const index_t t = p / Wq;  // n * Ho + oh
      const index_t oh = t % d.Ho, n = t / d.Ho;
      if constexpr (ST > 0) {
        acc_t out[kStrip];
        const index_t ow0 = oq * kStrip;
        conv_strip<KS, ST>(in, ch, wr, d, n * HWC + c, WC, d.C, oh * ST - d.pad,
                           ow0 * ST - d.pad, out);
        const index_t hb = t * d.Wo * d.C + c;
#pragma unroll
        for (int j = 0; j < kStrip; ++j)
          if (ow0 + j < d.Wo)
            h[hb + (ow0 + j) * d.C] = static_cast<scalar_t>(bias_act(out[j], bias, in.act));
      } else {
        const acc_t s = conv_at<KS>(in, ch, wr, wp, d, n * HWC + c, WC, d.C,
                                    oh * d.stride - d.pad, oq * d.stride - d.pad);
        h[p * d.C + c] = static_cast<scalar_t>(bias_act(s, bias, in.act));
      }
    }
  }
  const int64_t threads = int64_t(blockDim.x) * blockDim.y;
  const int64_t block = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  init.run(block * threads + threadIdx.y * blockDim.x + threadIdx.x,
           int64_t(gridDim.x) * gridDim.y * threads);
}

template <typename scalar_t>
void launch(const at::Tensor& z, const at::Tensor& eb, const at::Tensor& w,
            const at::Tensor& db, at::Tensor& h, const OutInit<scalar_t>& init, int64_t act,
            const DwGeometry& g) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(z.get_device());
  const BiasActInput<scalar_t> in{z.const_data_ptr<scalar_t>(), eb.const_data_ptr<scalar_t>(),
                                  static_cast<int>(act)};
  const scalar_t* wp = w.const_data_ptr<scalar_t>();
  const scalar_t* dbp = db.const_data_ptr<scalar_t>();
  scalar_t* hp = h.mutable_data_ptr<scalar_t>();
  const Tile tile = g.channels_last ? channel_tile(g.C) : Tile{0, 0, 0};
  dispatch_strips(g, w.numel(), [&]<typename index_t, int KS, int ST>() {
    const int64_t M = g.N * g.Ho * row_positions<ST>(g.Wo);
    const Split sp = g.channels_last ? split_positions(M, tile.tiles, tile.py, sms)
                                     : split_positions(M, g.C, kThreads, sms);
    const Dims<index_t> d = make_dims<index_t>(g);
    const auto chunk = static_cast<index_t>(sp.chunk);
    if (g.channels_last) {
      const dim3 grid(static_cast<unsigned>(tile.tiles), static_cast<unsigned>(sp.splits));
      folded_dw_nhwc<scalar_t, index_t, KS, ST><<<grid, dim3(tile.ct, tile.py), 0, stream>>>(
          in, wp, dbp, hp, init, d, chunk);
    } else {
      const dim3 grid(static_cast<unsigned>(g.C), static_cast<unsigned>(sp.splits));
      folded_dw_nchw<scalar_t, index_t, KS, ST><<<grid, kThreads, 0, stream>>>(
          in, wp, dbp, hp, init, d, chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor> folded_dw_cuda(
    const at::Tensor& z_in, const at::Tensor& expand_b, const at::Tensor& dw_w,
    const at::Tensor& dw_b, const at::Tensor& project_b,
    const std::optional<at::Tensor>& shortcut, int64_t stride, int64_t act) {
  const FoldedDwArgs a =
      check_folded_dw_args(kOp, z_in, expand_b, dw_w, dw_b, project_b, shortcut, stride, act);
  const DwGeometry& g = a.g;
  TORCH_CHECK(z_in.is_cuda(), kOp, ": expected CUDA tensors, got ", z_in.device());
  const c10::cuda::CUDAGuard guard(z_in.device());
  const auto fmt = compute_format(z_in);
  const at::Tensor z = z_in.contiguous(fmt), w = dw_w.contiguous();
  const at::Tensor eb = expand_b.contiguous(), db = dw_b.contiguous(), pb = project_b.contiguous();
  const bool has_s = shortcut.has_value() && shortcut->defined();
  const at::Tensor s = has_s ? shortcut->contiguous(fmt) : at::Tensor();
  at::Tensor h = at::empty({g.N, g.C, g.Ho, g.Wo}, z.options().memory_format(fmt));
  at::Tensor out = at::empty({g.N, a.cout, g.Ho, g.Wo}, z.options().memory_format(fmt));
  if (h.numel() == 0) return {h, out};  // N == 0: nothing to compute or initialise
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, z.scalar_type(), kOp, [&] {
        const OutInit<scalar_t> init{out.mutable_data_ptr<scalar_t>(),
                                     pb.const_data_ptr<scalar_t>(),
                                     has_s ? s.const_data_ptr<scalar_t>() : nullptr,
                                     out.numel(), a.cout,
                                     g.channels_last ? int64_t{1} : g.Ho * g.Wo};
        launch<scalar_t>(z, eb, w, db, h, init, act, g);
      });
  return {h, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(bsnas, CUDA, m) { m.impl("_mbconv_folded_depthwise", &folded_dw_cuda); }

}  // namespace bsnas
