// channels_last depthwise convolution in runs (see dwconv_nhwc_runs_kernel.h).
//
// Each thread computes a run of kRun consecutive outputs of one output row for V
// consecutive channels (V = 16 bytes of the type, at most 4, when the width is a
// multiple of V and the tensors are aligned; V = 1 otherwise). For every kernel row it
// reads the row's span of ST * (kRun - 1) + k input pixels once, V channels per load
// (one 16-byte load for float32), and each value feeds every output of the run whose
// window covers it: (ST * (kRun - 1) + k) * k loads per kRun outputs instead of k * k
// per output, and V times fewer load instructions. Why: the per-pixel channel-tiled
// kernel (dw_fwd_nhwc, one scalar load per output and tap) is bound by load
// instructions, far below the copy bandwidth and cuDNN on a sliced weight
// (docs/performance.md).
//
// The block's taps are staged in shared memory as [k * k][channels of the tile] in the
// accumulation type (flipped for the input gradient), so a thread reads its V channels'
// taps of a kernel row with V-wide loads. Sums run over kernel rows, then columns, as in
// the per-pixel kernels; columns outside the input add w * 0.
#include "dwconv_nhwc_runs_kernel.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "dwconv_cuda.cuh"

namespace bsnas::dw_runs {
namespace {

constexpr int kRun = 8;          // outputs per thread along a row
constexpr int kRunThreads = 256;  // per block
constexpr int kGroupsX = 32;     // channel groups (of V channels) per block, at most

struct RunDims {
  int32_t N, C, Hi, Wi, Ho, Wo, pad;
};

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename scalar_t, int KS, int ST, int V>
__global__ void __launch_bounds__(kRunThreads)
    dw_nhwc_runs(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                 scalar_t* __restrict__ y, const RunDims d, const bool flip) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int KK = KS * KS;
  constexpr int kSpan = ST * (kRun - 1) + KS;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* ws = reinterpret_cast<acc_t*>(smem_raw);
  const int ct = int(blockDim.x) * V;  // channels of this block's tile
  const int c0 = int(blockIdx.x) * ct;
  const int nthreads = int(blockDim.x * blockDim.y);
  for (int i = int(threadIdx.y * blockDim.x + threadIdx.x); i < KK * ct; i += nthreads) {
    const int t = i / ct, c = c0 + (i - t * ct);
    ws[i] = c < d.C ? static_cast<acc_t>(w[c * KK + (flip ? KK - 1 - t : t)]) : acc_t(0);
  }
  __syncthreads();
  const int cb = c0 + int(threadIdx.x) * V;
  if (cb >= d.C) return;  // no barriers below; V divides C, so cb + V <= C
  const acc_t* wt = ws + threadIdx.x * V;  // tap t of this thread's channels: wt + t * ct
  const int Wr = (d.Wo + kRun - 1) / kRun;
  const int runs = d.N * d.Ho * Wr;
  const int WC = d.Wi * d.C;
  for (int r = int(blockIdx.y * blockDim.y + threadIdx.y); r < runs;
       r += int(blockDim.y * gridDim.y)) {
    const int row = r / Wr;  // n * Ho + oh
    const int ow0 = (r - row * Wr) * kRun;
    const int n = row / d.Ho, oh = row - n * d.Ho;
    const int ih0 = oh * ST - d.pad, iw0 = ow0 * ST - d.pad;
    acc_t acc[kRun][V];
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
#pragma unroll
      for (int v = 0; v < V; ++v) acc[j][v] = 0;
    }
#pragma unroll
    for (int kh = 0; kh < KS; ++kh) {
      const int ih = ih0 + kh;
      if (!in_range(ih, d.Hi)) continue;
      const scalar_t* xr = x + (n * d.Hi + ih) * WC + cb;
      acc_t wk[KS][V];
#pragma unroll
      for (int kw = 0; kw < KS; ++kw) {
        const Pack<acc_t, V> p = *reinterpret_cast<const Pack<acc_t, V>*>(wt + (kh * KS + kw) * ct);
#pragma unroll
        for (int v = 0; v < V; ++v) wk[kw][v] = p.v[v];
      }
#pragma unroll
      for (int t = 0; t < kSpan; ++t) {
        const int iw = iw0 + t;
        acc_t xv[V];
        if (in_range(iw, d.Wi)) {
          const Pack<scalar_t, V> p = *reinterpret_cast<const Pack<scalar_t, V>*>(xr + iw * d.C);
#pragma unroll
          for (int v = 0; v < V; ++v) xv[v] = static_cast<acc_t>(p.v[v]);
        } else {
#pragma unroll
          for (int v = 0; v < V; ++v) xv[v] = 0;
        }
#pragma unroll
        for (int j = 0; j < kRun; ++j) {
          const int kw = t - j * ST;
          if (kw >= 0 && kw < KS) {
#pragma unroll
            for (int v = 0; v < V; ++v) acc[j][v] += wk[kw][v] * xv[v];
          }
        }
      }
    }
    scalar_t* yr = y + (row * d.Wo + ow0) * d.C + cb;
#pragma unroll
    for (int j = 0; j < kRun; ++j) {
      if (ow0 + j < d.Wo) {
        Pack<scalar_t, V> p;
#pragma unroll
        for (int v = 0; v < V; ++v) p.v[v] = static_cast<scalar_t>(acc[j][v]);
        *reinterpret_cast<Pack<scalar_t, V>*>(yr + j * d.C) = p;
      }
    }
  }
}

// int32 indices: fits_int32's span bound (2^29) leaves ample room for a run's window
// reaching kRun * stride columns past the row.
bool common(const DwGeometry& g, int64_t weight_numel) {
  return g.channels_last && g.dil == 1 && (g.K == 3 || g.K == 5 || g.K == 7) &&
         fits_int32(g, weight_numel);
}

// V channels per thread: 16 bytes of scalar_t (at most 4) when V divides the width and
// both tensors are aligned to V elements, otherwise 1.
template <typename scalar_t>
int vector_width(int64_t C, const void* in, const void* out) {
  constexpr int kV = std::min<int>(4, 16 / int(sizeof(scalar_t)));
  const auto aligned = [](const void* p) {
    return reinterpret_cast<std::uintptr_t>(p) % (kV * sizeof(scalar_t)) == 0;
  };
  return C % kV == 0 && aligned(in) && aligned(out) ? kV : 1;
}

template <typename scalar_t, int KS, int ST, int V>
void launch(const scalar_t* in, const scalar_t* w, scalar_t* out, const RunDims& d,
            bool flip, int device) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t groups = d.C / V;
  const int64_t tiles = ceil_div(groups, kGroupsX);
  const int bx = static_cast<int>(ceil_div(groups, tiles));
  const int by = std::max(1, kRunThreads / bx);
  const int64_t runs = int64_t{d.N} * d.Ho * ceil_div(d.Wo, kRun);
  const int64_t want = std::max<int64_t>(1, int64_t{sm_count(device)} * 16 / tiles);
  const auto blocks_y = static_cast<unsigned>(
      std::clamp<int64_t>(std::min(ceil_div(runs, by), want), 1, 65535));
  const size_t smem = size_t(KS) * KS * bx * V * sizeof(acc_t);
  const dim3 grid(static_cast<unsigned>(tiles), blocks_y), block(bx, by);
  dw_nhwc_runs<scalar_t, KS, ST, V>
      <<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(in, w, out, d, flip);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch(const scalar_t* in, const scalar_t* w, scalar_t* out, const RunDims& d,
              int64_t K, int64_t stride, bool flip, int device) {
  constexpr int kV = std::min<int>(4, 16 / int(sizeof(scalar_t)));
  const bool vec = vector_width<scalar_t>(d.C, in, out) > 1;
  const auto by_v = [&]<int KS, int ST>() {
    if (vec) launch<scalar_t, KS, ST, kV>(in, w, out, d, flip, device);
    else launch<scalar_t, KS, ST, 1>(in, w, out, d, flip, device);
  };
  const auto by_stride = [&]<int KS>() {
    if (stride == 1) by_v.template operator()<KS, 1>();
    else by_v.template operator()<KS, 2>();
  };
  switch (K) {
    case 3: return by_stride.template operator()<3>();
    case 5: return by_stride.template operator()<5>();
    default: return by_stride.template operator()<7>();
  }
}

RunDims dims(const DwGeometry& g, bool input_grad) {
  const auto i32 = [](int64_t v) { return static_cast<int32_t>(v); };
  if (input_grad)  // the forward over grad_y: input Ho x Wo, output H x W
    return {i32(g.N), i32(g.C), i32(g.Ho), i32(g.Wo), i32(g.H), i32(g.W), i32(g.K - 1 - g.pad)};
  return {i32(g.N), i32(g.C), i32(g.H), i32(g.W), i32(g.Ho), i32(g.Wo), i32(g.pad)};
}

}  // namespace

bool handles_forward(const DwGeometry& g, int64_t weight_numel) {
  return common(g, weight_numel) && (g.stride == 1 || g.stride == 2);
}

bool handles_input_grad(const DwGeometry& g, int64_t weight_numel) {
  return common(g, weight_numel) && g.stride == 1;
}

void run_forward(const at::Tensor& x, const at::Tensor& weight, at::Tensor& y,
                 const DwGeometry& g) {
  TORCH_CHECK(handles_forward(g, weight.numel()), "dw_runs::run_forward: unsupported geometry");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  x.scalar_type(), "masked_dwconv2d", [&] {
    dispatch<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                       y.mutable_data_ptr<scalar_t>(), dims(g, false), g.K, g.stride,
                       /*flip=*/false, x.get_device());
  });
}

void run_input_grad(const at::Tensor& gy, const at::Tensor& weight, at::Tensor& gx,
                    const DwGeometry& g) {
  TORCH_CHECK(handles_input_grad(g, weight.numel()),
              "dw_runs::run_input_grad: unsupported geometry");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16,
                                  gy.scalar_type(), "masked_dwconv2d_backward", [&] {
    dispatch<scalar_t>(gy.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                       gx.mutable_data_ptr<scalar_t>(), dims(g, true), g.K, /*stride=*/1,
                       /*flip=*/true, gy.get_device());
  });
}

}  // namespace bsnas::dw_runs
