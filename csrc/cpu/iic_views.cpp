// The three inputs of an IIC training step from one read of a decoded clip batch, on the CPU.
//
// iic_views(clip, time_index, mean, std, scaled, out_dtype) -> (rgb, residual, negative)
//   Args: clip [B, C, T, H, W] uint8 (read as x/255) or float, any strides (a [B, T, H, W, C] batch of
//         decoded frames passes as its permuted view); time_index [B, T_out] int64 in [0, T);
//         mean, std: C values or None.
//   Returns, contiguous, of out_dtype (float32 for uint8 input):
//     rgb      [B, C, T, H, W]      = (x - mean[c]) / std[c]
//     residual [B, C, T, H, W]      = ((x - roll(x, 1, T)) + 1) / 2 (or unscaled), from x, not normalised
//     negative [B, C, T_out, H, W]  = rgb[b, :, time_index[b, t]]
//   This replaces convert -> roll -> subtract -> add -> divide -> gather, and their temporaries.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common.h"
#include "simd.h"

namespace iic_ext {
namespace {

// One contiguous run of n elements: rgb and residual from the frame and its predecessor.
template <typename in_t, typename out_t>
IIC_EXT_INLINE void rgb_res_run(const in_t* __restrict x, const in_t* __restrict xp, out_t* __restrict r,
                                out_t* __restrict d, int64_t n, at::opmath_type<out_t> sc, at::opmath_type<out_t> m,
                                at::opmath_type<out_t> is, at::opmath_type<out_t> rs, at::opmath_type<out_t> ro) {
  using acc_t = at::opmath_type<out_t>;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]), p = static_cast<acc_t>(xp[i]);
    r[i] = static_cast<out_t>((v * sc - m) * is);
    d[i] = static_cast<out_t>((v - p) * rs + ro);
  }
}

// One contiguous run of n elements of the negative: the normalised source frame.
template <typename in_t, typename out_t>
IIC_EXT_INLINE void norm_run(const in_t* __restrict x, out_t* __restrict o, int64_t n, at::opmath_type<out_t> sc,
                             at::opmath_type<out_t> m, at::opmath_type<out_t> is) {
  using acc_t = at::opmath_type<out_t>;
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<out_t>((static_cast<acc_t>(x[i]) * sc - m) * is);
}

template <typename in_t, typename out_t>
void rgb_res_base(const in_t* x, const in_t* xp, out_t* r, out_t* d, int64_t n, at::opmath_type<out_t> sc,
                  at::opmath_type<out_t> m, at::opmath_type<out_t> is, at::opmath_type<out_t> rs,
                  at::opmath_type<out_t> ro) {
  rgb_res_run(x, xp, r, d, n, sc, m, is, rs, ro);
}
template <typename in_t, typename out_t>
IIC_EXT_AVX2 void rgb_res_avx2(const in_t* x, const in_t* xp, out_t* r, out_t* d, int64_t n,
                               at::opmath_type<out_t> sc, at::opmath_type<out_t> m, at::opmath_type<out_t> is,
                               at::opmath_type<out_t> rs, at::opmath_type<out_t> ro) {
  rgb_res_run(x, xp, r, d, n, sc, m, is, rs, ro);
}
template <typename in_t, typename out_t>
void norm_base(const in_t* x, out_t* o, int64_t n, at::opmath_type<out_t> sc, at::opmath_type<out_t> m,
               at::opmath_type<out_t> is) {
  norm_run(x, o, n, sc, m, is);
}
template <typename in_t, typename out_t>
IIC_EXT_AVX2 void norm_avx2(const in_t* x, out_t* o, int64_t n, at::opmath_type<out_t> sc, at::opmath_type<out_t> m,
                            at::opmath_type<out_t> is) {
  norm_run(x, o, n, sc, m, is);
}

template <typename in_t, typename out_t>
void views_kernel(const at::Tensor& clip, const at::Tensor& time_index, const std::vector<double>& mean,
                  const std::vector<double>& inv_std, double in_scale, bool scaled, const at::Tensor& rgb,
                  const at::Tensor& res, const at::Tensor& neg) {
  using acc_t = at::opmath_type<out_t>;  // float, or double for float64 outputs
  const int64_t B = clip.size(0), C = clip.size(1), T = clip.size(2), H = clip.size(3), W = clip.size(4);
  const int64_t To = time_index.size(1);
  const auto ss = clip.strides();
  const in_t* src = clip.const_data_ptr<in_t>();
  out_t* rgb_p = rgb.mutable_data_ptr<out_t>();
  out_t* res_p = res.mutable_data_ptr<out_t>();
  out_t* neg_p = neg.mutable_data_ptr<out_t>();
  const auto idx = time_index.accessor<int64_t, 2>();
  const int64_t plane = H * W;
  const acc_t sc = static_cast<acc_t>(in_scale);
  const acc_t rs = scaled ? acc_t(0.5) * sc : sc;
  const acc_t ro = scaled ? acc_t(0.5) : acc_t(0);
  const bool dense_w = ss[4] == 1;
  const bool dense_plane = dense_w && (H == 1 || ss[3] == W);
  const bool avx2 = cpu_has_avx2();

  // rgb and residual: one task per (b, t) frame, all channels, so a channels-last frame is read from
  // cache for every channel it holds.
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / T, t = u % T;
      const int64_t tp = t == 0 ? T - 1 : t - 1;
      for (int64_t c = 0; c < C; ++c) {
        const acc_t m = mean[c], is = inv_std[c];
        const in_t* x = src + b * ss[0] + c * ss[1] + t * ss[2];
        const in_t* xp = src + b * ss[0] + c * ss[1] + tp * ss[2];
        out_t* r = rgb_p + ((b * C + c) * T + t) * plane;
        out_t* d = res_p + ((b * C + c) * T + t) * plane;
        if (dense_plane) {  // the whole H x W plane is one run
          if (avx2)
            rgb_res_avx2<in_t, out_t>(x, xp, r, d, plane, sc, m, is, rs, ro);
          else
            rgb_res_base<in_t, out_t>(x, xp, r, d, plane, sc, m, is, rs, ro);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) {
          const in_t* xr = x + h * ss[3];
          const in_t* xpr = xp + h * ss[3];
          out_t* rr = r + h * W;
          out_t* dr = d + h * W;
          if (dense_w) {
            if (avx2)
              rgb_res_avx2<in_t, out_t>(xr, xpr, rr, dr, W, sc, m, is, rs, ro);
            else
              rgb_res_base<in_t, out_t>(xr, xpr, rr, dr, W, sc, m, is, rs, ro);
          } else {
            for (int64_t w = 0; w < W; ++w) {
              const acc_t v = static_cast<acc_t>(xr[w * ss[4]]), p = static_cast<acc_t>(xpr[w * ss[4]]);
              rr[w] = static_cast<out_t>((v * sc - m) * is);
              dr[w] = static_cast<out_t>((v - p) * rs + ro);
            }
          }
        }
      }
    }
  });
  // negative: converted again from the (small, uint8) source frames rather than copied from rgb.
  at::parallel_for(0, B * To, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / To, t = u % To;
      const int64_t ts = idx[b][t];
      for (int64_t c = 0; c < C; ++c) {
        const acc_t m = mean[c], is = inv_std[c];
        const in_t* x = src + b * ss[0] + c * ss[1] + ts * ss[2];
        out_t* n = neg_p + ((b * C + c) * To + t) * plane;
        if (dense_plane) {
          if (avx2)
            norm_avx2<in_t, out_t>(x, n, plane, sc, m, is);
          else
            norm_base<in_t, out_t>(x, n, plane, sc, m, is);
          continue;
        }
        for (int64_t h = 0; h < H; ++h) {
          const in_t* xr = x + h * ss[3];
          out_t* nr = n + h * W;
          for (int64_t w = 0; w < W; ++w) nr[w] = static_cast<out_t>((static_cast<acc_t>(xr[w * ss[4]]) * sc - m) * is);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> iic_views_cpu(const at::Tensor& clip, const at::Tensor& time_index,
                                                           std::optional<at::ArrayRef<double>> mean,
                                                           std::optional<at::ArrayRef<double>> std, bool scaled,
                                                           std::optional<at::ScalarType> out_dtype) {
  check_clip(clip);
  check_time_index(clip, time_index);
  const int64_t C = clip.size(1);
  std::vector<double> m(C), is(C);
  view_normalisation(C, mean, std, m.data(), is.data());
  const auto dt = view_out_dtype(clip, out_dtype);
  auto opts = clip.options().dtype(dt).memory_format(at::MemoryFormat::Contiguous);
  auto neg_sizes = clip.sizes().vec();
  neg_sizes[2] = time_index.size(1);
  at::Tensor rgb = at::empty(clip.sizes(), opts), res = at::empty(clip.sizes(), opts), neg = at::empty(neg_sizes, opts);
  if (clip.numel() == 0) return {rgb, res, neg};
  const double in_scale = clip.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  const at::Tensor idx = time_index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, clip.scalar_type(), "iic_views_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "iic_views_out", [&] {
      views_kernel<in_t, scalar_t>(clip, idx, m, is, in_scale, scaled, rgb, res, neg);
    });
  });
  return {rgb, res, neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CPU, m) { m.impl("iic_views", &iic_views_cpu); }

}  // namespace iic_ext
