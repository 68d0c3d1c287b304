// The three inputs of an IIC training step from one read of a decoded clip batch, on the CPU.
//
// iic_views(clip, time_index, mean, std, scaled, out_dtype) -> (rgb, residual, negative); iic_views.out
// writes the same into given buffers (contiguous, of the output dtype).
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

#include <type_traits>
#include <vector>

#include "common.h"
#include "simd.h"
#if IIC_EXT_X86_DISPATCH
#include <immintrin.h>
#endif

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

#if IIC_EXT_X86_DISPATCH
// Decoded RGB frames (uint8, 3 interleaved channels) to float32: 16 pixels per step, split into
// channels with byte shuffles, then 8 lanes of float arithmetic with the scalar loop's expressions
// (which the compiler contracts the same way in this AVX2+FMA function).
IIC_EXT_AVX2 IIC_EXT_INLINE void split_rgb16(const uint8_t* p, __m128i out[3]) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32));
  // byte j of channel k is byte 3 j + k of the 48, found in a, b or c; -1 zeroes a lane
  const __m128i a0 = _mm_setr_epi8(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i b0 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1);
  const __m128i c0 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13);
  const __m128i a1 = _mm_setr_epi8(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i b1 = _mm_setr_epi8(-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1);
  const __m128i c1 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14);
  const __m128i a2 = _mm_setr_epi8(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i b2 = _mm_setr_epi8(-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1);
  const __m128i c2 = _mm_setr_epi8(-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15);
  out[0] = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, a0), _mm_shuffle_epi8(b, b0)), _mm_shuffle_epi8(c, c0));
  out[1] = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, a1), _mm_shuffle_epi8(b, b1)), _mm_shuffle_epi8(c, c1));
  out[2] = _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(a, a2), _mm_shuffle_epi8(b, b2)), _mm_shuffle_epi8(c, c2));
}

IIC_EXT_AVX2 IIC_EXT_INLINE __m256 bytes_to_float(__m128i v) {  // the low 8 bytes
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

IIC_EXT_AVX2 void rgb_res_rgb8_avx2(const uint8_t* x, const uint8_t* xp, float* const* r, float* const* d, int64_t W,
                                    float sc, const float* m, const float* is, float rs, float ro) {
  const __m256 vsc = _mm256_set1_ps(sc), vrs = _mm256_set1_ps(rs), vro = _mm256_set1_ps(ro);
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    __m128i cx[3], cp[3];
    split_rgb16(x + 3 * w, cx);
    split_rgb16(xp + 3 * w, cp);
    for (int c = 0; c < 3; ++c) {
      const __m256 vm = _mm256_set1_ps(m[c]), vis = _mm256_set1_ps(is[c]);
      for (int h = 0; h < 2; ++h) {
        const __m256 v = bytes_to_float(h ? _mm_srli_si128(cx[c], 8) : cx[c]);
        const __m256 p = bytes_to_float(h ? _mm_srli_si128(cp[c], 8) : cp[c]);
        _mm256_storeu_ps(r[c] + w + 8 * h, _mm256_mul_ps(_mm256_fmsub_ps(v, vsc, vm), vis));
        _mm256_storeu_ps(d[c] + w + 8 * h, _mm256_fmadd_ps(_mm256_sub_ps(v, p), vrs, vro));
      }
    }
  }
  for (; w < W; ++w) {
    for (int c = 0; c < 3; ++c) {
      const float v = x[3 * w + c], p = xp[3 * w + c];
      r[c][w] = (v * sc - m[c]) * is[c];
      d[c][w] = (v - p) * rs + ro;
    }
  }
}

IIC_EXT_AVX2 void norm_rgb8_avx2(const uint8_t* x, float* const* o, int64_t W, float sc, const float* m,
                                 const float* is) {
  const __m256 vsc = _mm256_set1_ps(sc);
  int64_t w = 0;
  for (; w + 16 <= W; w += 16) {
    __m128i cx[3];
    split_rgb16(x + 3 * w, cx);
    for (int c = 0; c < 3; ++c) {
      const __m256 vm = _mm256_set1_ps(m[c]), vis = _mm256_set1_ps(is[c]);
      for (int h = 0; h < 2; ++h) {
        const __m256 v = bytes_to_float(h ? _mm_srli_si128(cx[c], 8) : cx[c]);
        _mm256_storeu_ps(o[c] + w + 8 * h, _mm256_mul_ps(_mm256_fmsub_ps(v, vsc, vm), vis));
      }
    }
  }
  for (; w < W; ++w)
    for (int c = 0; c < 3; ++c) o[c][w] = (static_cast<float>(x[3 * w + c]) * sc - m[c]) * is[c];
}
#endif

// Channels-last rows (pixels of CC interleaved channels, C innermost): one pass over the W pixels of a
// row writes all CC output rows, so each pixel is read once and the loop has no runtime stride (the
// compiler de-interleaves with shuffles instead of strided scalar loads).
template <typename in_t, typename out_t, int CC>
IIC_EXT_INLINE void rgb_res_pixels_run(const in_t* __restrict x, const in_t* __restrict xp, out_t* const* r,
                                       out_t* const* d, int64_t W, at::opmath_type<out_t> sc,
                                       const at::opmath_type<out_t>* m, const at::opmath_type<out_t>* is,
                                       at::opmath_type<out_t> rs, at::opmath_type<out_t> ro) {
  using acc_t = at::opmath_type<out_t>;
  out_t* __restrict rr[CC];
  out_t* __restrict dd[CC];
  acc_t mm[CC], ii[CC];
  for (int c = 0; c < CC; ++c) rr[c] = r[c], dd[c] = d[c], mm[c] = m[c], ii[c] = is[c];
  for (int64_t w = 0; w < W; ++w) {
    for (int c = 0; c < CC; ++c) {
      const acc_t v = static_cast<acc_t>(x[w * CC + c]), p = static_cast<acc_t>(xp[w * CC + c]);
      rr[c][w] = static_cast<out_t>((v * sc - mm[c]) * ii[c]);
      dd[c][w] = static_cast<out_t>((v - p) * rs + ro);
    }
  }
}

template <typename in_t, typename out_t, int CC>
IIC_EXT_INLINE void norm_pixels_run(const in_t* __restrict x, out_t* const* o, int64_t W, at::opmath_type<out_t> sc,
                                    const at::opmath_type<out_t>* m, const at::opmath_type<out_t>* is) {
  using acc_t = at::opmath_type<out_t>;
  out_t* __restrict oo[CC];
  acc_t mm[CC], ii[CC];
  for (int c = 0; c < CC; ++c) oo[c] = o[c], mm[c] = m[c], ii[c] = is[c];
  for (int64_t w = 0; w < W; ++w)
    for (int c = 0; c < CC; ++c) oo[c][w] = static_cast<out_t>((static_cast<acc_t>(x[w * CC + c]) * sc - mm[c]) * ii[c]);
}

template <typename in_t, typename out_t, int CC>
void rgb_res_pixels_base(const in_t* x, const in_t* xp, out_t* const* r, out_t* const* d, int64_t W,
                         at::opmath_type<out_t> sc, const at::opmath_type<out_t>* m, const at::opmath_type<out_t>* is,
                         at::opmath_type<out_t> rs, at::opmath_type<out_t> ro) {
  rgb_res_pixels_run<in_t, out_t, CC>(x, xp, r, d, W, sc, m, is, rs, ro);
}
template <typename in_t, typename out_t, int CC>
IIC_EXT_AVX2 void rgb_res_pixels_avx2(const in_t* x, const in_t* xp, out_t* const* r, out_t* const* d, int64_t W,
                                      at::opmath_type<out_t> sc, const at::opmath_type<out_t>* m,
                                      const at::opmath_type<out_t>* is, at::opmath_type<out_t> rs,
                                      at::opmath_type<out_t> ro) {
#if IIC_EXT_X86_DISPATCH
  if constexpr (CC == 3 && std::is_same_v<in_t, uint8_t> && std::is_same_v<out_t, float>) {
    rgb_res_rgb8_avx2(x, xp, r, d, W, sc, m, is, rs, ro);
    return;
  }
#endif
  rgb_res_pixels_run<in_t, out_t, CC>(x, xp, r, d, W, sc, m, is, rs, ro);
}
template <typename in_t, typename out_t, int CC>
void norm_pixels_base(const in_t* x, out_t* const* o, int64_t W, at::opmath_type<out_t> sc,
                      const at::opmath_type<out_t>* m, const at::opmath_type<out_t>* is) {
  norm_pixels_run<in_t, out_t, CC>(x, o, W, sc, m, is);
}
template <typename in_t, typename out_t, int CC>
IIC_EXT_AVX2 void norm_pixels_avx2(const in_t* x, out_t* const* o, int64_t W, at::opmath_type<out_t> sc,
                                   const at::opmath_type<out_t>* m, const at::opmath_type<out_t>* is) {
#if IIC_EXT_X86_DISPATCH
  if constexpr (CC == 3 && std::is_same_v<in_t, uint8_t> && std::is_same_v<out_t, float>) {
    norm_rgb8_avx2(x, o, W, sc, m, is);
    return;
  }
#endif
  norm_pixels_run<in_t, out_t, CC>(x, o, W, sc, m, is);
}


// Channels-last clip with CC channels (stride(1) == 1, stride(4) == CC): every (b, t, h) row at once.
template <typename in_t, typename out_t, int CC>
void views_pixels(const in_t* src, at::IntArrayRef ss, const at::TensorAccessor<int64_t, 2>& idx, int64_t B, int64_t T,
                  int64_t H, int64_t W, int64_t To, const std::vector<double>& mean, const std::vector<double>& inv_std,
                  at::opmath_type<out_t> sc, at::opmath_type<out_t> rs, at::opmath_type<out_t> ro, out_t* rgb_p,
                  out_t* res_p, out_t* neg_p) {
  using acc_t = at::opmath_type<out_t>;
  acc_t m[CC], is[CC];
  for (int c = 0; c < CC; ++c) m[c] = static_cast<acc_t>(mean[c]), is[c] = static_cast<acc_t>(inv_std[c]);
  const int64_t plane = H * W;
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, B * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / T, t = u % T, tp = t == 0 ? T - 1 : t - 1;
      for (int64_t h = 0; h < H; ++h) {
        const in_t* x = src + b * ss[0] + t * ss[2] + h * ss[3];
        const in_t* xp = src + b * ss[0] + tp * ss[2] + h * ss[3];
        out_t* r[CC];
        out_t* d[CC];
        for (int c = 0; c < CC; ++c) {
          const int64_t o = ((b * CC + c) * T + t) * plane + h * W;
          r[c] = rgb_p + o, d[c] = res_p + o;
        }
        if (avx2)
          rgb_res_pixels_avx2<in_t, out_t, CC>(x, xp, r, d, W, sc, m, is, rs, ro);
        else
          rgb_res_pixels_base<in_t, out_t, CC>(x, xp, r, d, W, sc, m, is, rs, ro);
      }
    }
  });
  at::parallel_for(0, B * To, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / To, t = u % To, ts = idx[b][t];
      for (int64_t h = 0; h < H; ++h) {
        const in_t* x = src + b * ss[0] + ts * ss[2] + h * ss[3];
        out_t* o[CC];
        for (int c = 0; c < CC; ++c) o[c] = neg_p + ((b * CC + c) * To + t) * plane + h * W;
        if (avx2)
          norm_pixels_avx2<in_t, out_t, CC>(x, o, W, sc, m, is);
        else
          norm_pixels_base<in_t, out_t, CC>(x, o, W, sc, m, is);
      }
    }
  });
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
  if (W > 1 && ss[1] == 1 && ss[4] == C && (C == 3 || C == 1 || C == 2 || C == 4)) {  // channels-last pixels
    switch (C) {
      case 1: views_pixels<in_t, out_t, 1>(src, ss, idx, B, T, H, W, To, mean, inv_std, sc, rs, ro, rgb_p, res_p, neg_p); return;
      case 2: views_pixels<in_t, out_t, 2>(src, ss, idx, B, T, H, W, To, mean, inv_std, sc, rs, ro, rgb_p, res_p, neg_p); return;
      case 3: views_pixels<in_t, out_t, 3>(src, ss, idx, B, T, H, W, To, mean, inv_std, sc, rs, ro, rgb_p, res_p, neg_p); return;
      default: views_pixels<in_t, out_t, 4>(src, ss, idx, B, T, H, W, To, mean, inv_std, sc, rs, ro, rgb_p, res_p, neg_p); return;
    }
  }

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

// The views into rgb, res, neg (checked, contiguous, of the output dtype).
void iic_views_into(const at::Tensor& clip, const at::Tensor& time_index, std::optional<at::ArrayRef<double>> mean,
                    std::optional<at::ArrayRef<double>> std, bool scaled, const at::Tensor& rgb, const at::Tensor& res,
                    const at::Tensor& neg) {
  const int64_t C = clip.size(1);
  std::vector<double> m(C), is(C);
  view_normalisation(C, mean, std, m.data(), is.data());
  if (clip.numel() == 0) return;
  const double in_scale = clip.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  const at::Tensor idx = time_index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, clip.scalar_type(), "iic_views_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rgb.scalar_type(), "iic_views_out", [&] {
      views_kernel<in_t, scalar_t>(clip, idx, m, is, in_scale, scaled, rgb, res, neg);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CPU, m) {
  m.impl("iic_views", &iic_views_entry<iic_views_into>);
  m.impl("iic_views.out", &iic_views_out_entry<iic_views_into>);
}

}  // namespace iic_ext
