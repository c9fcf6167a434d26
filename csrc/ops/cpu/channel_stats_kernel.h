#pragma once
// CPU kernel of bsnas::channel_stats (channel_stats.cpp): per-channel sum and sum of
// squares in double. NCHW: one task per plane; channels_last: one task per image, the
// channels of each pixel vectorised. Per-plane / per-image partials are summed over the
// images in order, so results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "../masked_conv_common.h"

namespace bsnas {
namespace cpu {
namespace BSNAS_CPU_ISA {

// Sum and sum of squares of p[0, n) in double.
template <typename T>
inline void sum_sumsq(const T* p, int64_t n, double& sum, double& sumsq) {
  double s = 0, q = 0;
#pragma omp simd reduction(+ : s, q)
  for (int64_t i = 0; i < n; ++i) {
    const double v = p[i];
    s += v;
    q += v * v;
  }
  sum = s;
  sumsq = q;
}

// Sums partials laid out [parts][stride] (channel c of part i at i * stride + c: per
// image, plane, or image x strip x block) over the parts, in order, into out[C].
template <typename T>
void reduce_parts(const std::vector<double>& part, int64_t parts, int64_t stride, int64_t C,
                  T* out) {
  for (int64_t c = 0; c < C; ++c) {
    double a = 0;
    for (int64_t i = 0; i < parts; ++i) a += part[i * stride + c];
    out[c] = static_cast<T>(a);
  }
}

template <typename T>
void stats_nchw(const T* z, int64_t N, int64_t C, int64_t P, double* ps, double* pq) {
  at::parallel_for(0, N * C, std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, P)),
                   [&](int64_t b, int64_t e) {
                     for (int64_t nc = b; nc < e; ++nc) sum_sumsq(z + nc * P, P, ps[nc], pq[nc]);
                   });
}

template <typename T>
void stats_nhwc(const T* z, int64_t N, int64_t C, int64_t P, double* ps, double* pq) {
  at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      double* s = ps + n * C;
      double* q = pq + n * C;
      std::fill(s, s + C, 0.0);
      std::fill(q, q + C, 0.0);
      for (int64_t i = 0; i < P; ++i) {
        const T* p = z + (n * P + i) * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double v = p[c];
          s[c] += v;
          q[c] += v * v;
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> channel_stats(const at::Tensor& z_in) {
  const ChannelStatsArgs args = prepare_channel_stats(z_in);
  const at::Tensor& z = args.z;
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  std::vector<double> ps(static_cast<size_t>(N * C)), pq(ps.size());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "channel_stats", [&] {
    if (args.channels_last)
      stats_nhwc(z.const_data_ptr<scalar_t>(), N, C, P, ps.data(), pq.data());
    else
      stats_nchw(z.const_data_ptr<scalar_t>(), N, C, P, ps.data(), pq.data());
  });
  reduce_parts(ps, N, C, C, args.sum.mutable_data_ptr<double>());
  reduce_parts(pq, N, C, C, args.sumsq.mutable_data_ptr<double>());
  return {args.sum, args.sumsq};
}

// g += a[c] + z * b[c] over dense [N, C, P] (NCHW) or [N, P, C] (channels_last) values.
template <typename T>
void stats_grad_add_loop(T* g, const T* z, const T* a, const T* b, int64_t N, int64_t C,
                         int64_t P, bool channels_last) {
  if (channels_last) {
    at::parallel_for(0, N * P, std::max<int64_t>(1, (1 << 14) / C), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        T* gp = g + i * C;
        const T* zp = z + i * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) gp[c] += a[c] + zp[c] * b[c];
      }
    });
  } else {
    at::parallel_for(0, N * C, std::max<int64_t>(1, (1 << 14) / P), [&](int64_t p0, int64_t p1) {
      for (int64_t nc = p0; nc < p1; ++nc) {
        const T ac = a[nc % C], bc = b[nc % C];
        T* gp = g + nc * P;
        const T* zp = z + nc * P;
#pragma omp simd
        for (int64_t i = 0; i < P; ++i) gp[i] += ac + zp[i] * bc;
      }
    });
  }
}

// grad_z += grad_sum[c] + 2 z grad_sumsq[c] (z's gradient through its sums), one pass;
// the per-channel terms in z's dtype, as the ATen composite computed them.
void channel_stats_grad_add(at::Tensor& grad_z, const at::Tensor& z,
                            const at::Tensor& grad_sum, const at::Tensor& grad_sumsq) {
  const bool cl = check_stats_grad_add(grad_z, z, grad_sum, grad_sumsq);
  const int64_t N = z.size(0), C = z.size(1), P = z.size(2) * z.size(3);
  if (z.numel() == 0) return;
  const double* gs = grad_sum.const_data_ptr<double>();
  const double* gq = grad_sumsq.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "_channel_stats_grad_add_", [&] {
    std::vector<scalar_t> a(static_cast<size_t>(C)), b(a.size());
    for (int64_t c = 0; c < C; ++c) {
      a[c] = static_cast<scalar_t>(gs[c]);
      b[c] = static_cast<scalar_t>(2 * gq[c]);
    }
    stats_grad_add_loop(grad_z.mutable_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(),
                        a.data(), b.data(), N, C, P, cl);
  });
}

}  // namespace BSNAS_CPU_ISA
}  // namespace cpu
}  // namespace bsnas
