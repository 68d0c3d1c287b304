// The three inputs of an IIC training step from one read of a decoded clip batch, on CUDA.
//
// iic_views(clip, time_index, mean, std, scaled, out_dtype) -> (rgb, residual, negative)
//   Args: clip [B, C, T, H, W] uint8 (read as x/255) or float, any strides (a [B, T, H, W, C] batch of
//         decoded frames passes as its permuted view); time_index [B, T_out] int64 in [0, T);
//         mean, std: C values (C <= 16) or None.
//   Returns, contiguous, of out_dtype (float32 for uint8 input):
//     rgb      [B, C, T, H, W]      = (x - mean[c]) / std[c]
//     residual [B, C, T, H, W]      = ((x - roll(x, 1, T)) + 1) / 2 (or unscaled), from x, not normalised
//     negative [B, C, T_out, H, W]  = rgb[b, :, time_index[b, t]]
//
// One launch covers the B*C*T*H*W positions of rgb/residual and then the B*C*T_out*H*W of negative.
// The negative is converted again from the (small, uint8) source frames rather than read back from
// rgb. Arithmetic is in the output's opmath type (float32, float64 for float64 outputs) with the CPU
// kernel's expressions, unfused.
//
// Fast path (rows of W contiguous, e.g. a contiguous clip): each thread handles 4 consecutive w of
// one row. It splits its position into (w/4, h, t, c, b) once per 4 elements with multiply-shift
// division (32-bit indices), reads 4 values of frame t and 4 of frame t-1 as one aligned load each,
// and writes 4 rgb and 4 residual values as one aligned store each; the negative likewise from frame
// time_index[b, t]. It applies when clip.stride(4) == 1, W % 4 == 0, clip's data pointer and its
// strides of B, C, T and H (those of size-1 dims excepted) are multiples of 4 elements, and the
// outputs' data pointers are aligned to 4 elements; then every pack of 4 lies in one row of the input
// and of each output.
//
// Channels-last path (uint8 or float32 clips with three channels adjacent in memory, clip.stride(1)
// == 1, as decoded RGB frames; W % 4 == 0 and the outputs aligned to 4 elements): each thread handles
// 4 consecutive w of one row for all three channels. It reads the 12 values of those pixels in frame t
// and in frame t-1 (adjacent when the pixels are packed, so a warp reads one contiguous span; element
// loads, so the input may have any alignment) and writes one aligned pack of 4 per channel to rgb and
// to residual: the same stores as the fast path, with the position split once per 12 elements.
//
// Otherwise each thread writes one output position through the input's strides, so the writes
// coalesce for any input layout; the position is split with multiply-shift division too.
#include <ATen/Dispatch.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>

#include <algorithm>
#include <type_traits>

#include "common.h"
#include "utils.cuh"

namespace iic_ext {
namespace {

using cuda::add_rn;
using cuda::mul_rn;
using cuda::Pack;
using cuda::sub_rn;

constexpr int kMaxChannels = 16;
constexpr int kVec = 4;  // elements per thread of the fast path

// Division by a fixed divisor: multiply-shift for 32-bit indices, plain division for 64-bit ones.
template <typename index_t>
using Divider = at::cuda::detail::IntDivider<std::make_unsigned_t<index_t>>;

// Per-channel normalisation, passed by value to the kernel. The kernels take it __grid_constant__ so that
// norm.mean[c] is one indexed constant load rather than a select over all kMaxChannels entries.
template <typename acc_t>
struct Norm {
  acc_t mean[kMaxChannels];
  acc_t inv_std[kMaxChannels];
};

// The values the kernels write, as the CPU kernel computes them (unfused): rgb and negative
// (v * in_scale - mean) * inv_std, residual (v - p) * res_scale + res_offset.
template <typename acc_t>
__device__ __forceinline__ acc_t rgb_value(acc_t v, acc_t in_scale, acc_t m, acc_t is) {
  return mul_rn(sub_rn(mul_rn(v, in_scale), m), is);
}

template <typename acc_t>
__device__ __forceinline__ acc_t res_value(acc_t v, acc_t p, acc_t res_scale, acc_t res_offset) {
  return add_rn(mul_rn(sub_rn(v, p), res_scale), res_offset);
}

// Flat position q of a [rest, T, H, W] iteration split into (w, h, t) and the index over the outer dims.
template <typename index_t>
struct Position {
  index_t w, h, t;
  std::make_unsigned_t<index_t> rest;
};

template <typename index_t>
__device__ __forceinline__ Position<index_t> split_position(std::make_unsigned_t<index_t> q, const Divider<index_t>& W,
                                                            const Divider<index_t>& H, const Divider<index_t>& T) {
  Position<index_t> p;
  auto d = W.divmod(q);
  p.w = static_cast<index_t>(d.mod);
  d = H.divmod(d.div);
  p.h = static_cast<index_t>(d.mod);
  d = T.divmod(d.div);
  p.t = static_cast<index_t>(d.mod);
  p.rest = d.div;
  return p;
}

template <typename in_t, typename out_t, typename index_t>
__global__ void iic_views_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ time_index,
                                 out_t* __restrict__ rgb, out_t* __restrict__ res, out_t* __restrict__ neg,
                                 int64_t n_frames, int64_t n_total, Divider<index_t> C, Divider<index_t> T,
                                 Divider<index_t> H, Divider<index_t> W, Divider<index_t> To, index_t sb, index_t sc,
                                 index_t st, index_t sh, index_t sw,
                                 const __grid_constant__ Norm<at::opmath_type<out_t>> norm, bool normalise,
                                 at::opmath_type<out_t> in_scale, at::opmath_type<out_t> res_scale,
                                 at::opmath_type<out_t> res_offset) {
  using acc_t = at::opmath_type<out_t>;
  using uindex_t = std::make_unsigned_t<index_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_total; j += step) {
    const bool is_neg = j >= n_frames;
    const index_t i = static_cast<index_t>(is_neg ? j - n_frames : j);
    const auto p = split_position<index_t>(static_cast<uindex_t>(i), W, H, is_neg ? To : T);
    const index_t w = p.w, h = p.h, t = p.t;
    const auto d = C.divmod(p.rest);
    const index_t c = static_cast<index_t>(d.mod);
    const index_t b = static_cast<index_t>(d.div);
    const acc_t m = normalise ? norm.mean[c] : acc_t(0);
    const acc_t is = normalise ? norm.inv_std[c] : acc_t(1);
    const index_t base = b * sb + c * sc + h * sh + w * sw;
    if (is_neg) {
      const index_t ts = static_cast<index_t>(time_index[b * static_cast<index_t>(To.divisor) + t]);
      const acc_t v = static_cast<acc_t>(x[base + ts * st]);
      neg[i] = static_cast<out_t>(rgb_value(v, in_scale, m, is));
    } else {
      const index_t tp = t == 0 ? static_cast<index_t>(T.divisor) - 1 : t - 1;
      const acc_t v = static_cast<acc_t>(x[base + t * st]);
      const acc_t p = static_cast<acc_t>(x[base + tp * st]);
      rgb[i] = static_cast<out_t>(rgb_value(v, in_scale, m, is));
      res[i] = static_cast<out_t>(res_value(v, p, res_scale, res_offset));
    }
  }
}

// Fast path: x has W-stride 1, W % kVec == 0, and x, its other strides and the outputs are aligned to
// kVec elements. Pack j < n_frame_packs covers rgb/res elements [j*kVec, j*kVec + kVec) of one row;
// pack j >= n_frame_packs the same of the negative. W4 = W / kVec.
template <typename in_t, typename out_t, typename index_t>
__global__ void iic_views_vec_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ time_index,
                                     out_t* __restrict__ rgb, out_t* __restrict__ res, out_t* __restrict__ neg,
                                     int64_t n_frame_packs, int64_t n_total_packs, Divider<index_t> C,
                                     Divider<index_t> T, Divider<index_t> H, Divider<index_t> W4, Divider<index_t> To,
                                     index_t sb, index_t sc, index_t st, index_t sh,
                                     const __grid_constant__ Norm<at::opmath_type<out_t>> norm, bool normalise,
                                     at::opmath_type<out_t> in_scale, at::opmath_type<out_t> res_scale,
                                     at::opmath_type<out_t> res_offset) {
  using acc_t = at::opmath_type<out_t>;
  using uindex_t = std::make_unsigned_t<index_t>;
  using in_pack = Pack<in_t, kVec>;
  using out_pack = Pack<out_t, kVec>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_total_packs; j += step) {
    const bool is_neg = j >= n_frame_packs;
    const uindex_t q = static_cast<uindex_t>(is_neg ? j - n_frame_packs : j);
    const auto p = split_position<index_t>(q, W4, H, is_neg ? To : T);
    const index_t w = p.w * kVec, h = p.h, t = p.t;
    const auto d = C.divmod(p.rest);
    const index_t c = static_cast<index_t>(d.mod);
    const index_t b = static_cast<index_t>(d.div);
    const index_t i = static_cast<index_t>(q) * kVec;
    const acc_t m = normalise ? norm.mean[c] : acc_t(0);
    const acc_t is = normalise ? norm.inv_std[c] : acc_t(1);
    const index_t base = b * sb + c * sc + h * sh + w;
    if (is_neg) {
      const index_t ts = static_cast<index_t>(time_index[b * static_cast<index_t>(To.divisor) + t]);
      const in_pack v = *reinterpret_cast<const in_pack*>(x + base + ts * st);
      out_pack o;
#pragma unroll
      for (int k = 0; k < kVec; ++k)
        o.v[k] = static_cast<out_t>(rgb_value(static_cast<acc_t>(v.v[k]), in_scale, m, is));
      *reinterpret_cast<out_pack*>(neg + i) = o;
    } else {
      const index_t tp = t == 0 ? static_cast<index_t>(T.divisor) - 1 : t - 1;
      const in_pack v = *reinterpret_cast<const in_pack*>(x + base + t * st);
      const in_pack p = *reinterpret_cast<const in_pack*>(x + base + tp * st);
      out_pack r, e;
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const acc_t vk = static_cast<acc_t>(v.v[k]);
        const acc_t pk = static_cast<acc_t>(p.v[k]);
        r.v[k] = static_cast<out_t>(rgb_value(vk, in_scale, m, is));
        e.v[k] = static_cast<out_t>(res_value(vk, pk, res_scale, res_offset));
      }
      *reinterpret_cast<out_pack*>(rgb + i) = r;
      *reinterpret_cast<out_pack*>(res + i) = e;
    }
  }
}

// Channels-last path: NC channels adjacent in x (channel stride 1), W % kVec == 0, the outputs aligned
// to kVec elements. Pack j < n_frame_packs covers w in [w0, w0 + kVec) of row (b, t, h) of rgb/res for
// every channel; pack j >= n_frame_packs the same of the negative. HW = H * W (the outputs' plane).
template <int NC, typename in_t, typename out_t, typename index_t>
__global__ void iic_views_cl_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ time_index,
                                    out_t* __restrict__ rgb, out_t* __restrict__ res, out_t* __restrict__ neg,
                                    int64_t n_frame_packs, int64_t n_total_packs, Divider<index_t> T,
                                    Divider<index_t> H, Divider<index_t> W4, Divider<index_t> To, index_t sb,
                                    index_t st, index_t sh, index_t sw,
                                    const __grid_constant__ Norm<at::opmath_type<out_t>> norm, bool normalise,
                                    at::opmath_type<out_t> in_scale, at::opmath_type<out_t> res_scale,
                                    at::opmath_type<out_t> res_offset) {
  using acc_t = at::opmath_type<out_t>;
  using uindex_t = std::make_unsigned_t<index_t>;
  using out_pack = Pack<out_t, kVec>;
  const index_t W = static_cast<index_t>(W4.divisor) * kVec;
  const index_t HW = static_cast<index_t>(H.divisor) * W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_total_packs; j += step) {
    const bool is_neg = j >= n_frame_packs;
    const uindex_t q = static_cast<uindex_t>(is_neg ? j - n_frame_packs : j);
    const Divider<index_t>& Tn = is_neg ? To : T;
    const auto p = split_position<index_t>(q, W4, H, Tn);
    const index_t w = p.w * kVec, h = p.h, t = p.t, b = static_cast<index_t>(p.rest);
    const index_t n_t = static_cast<index_t>(Tn.divisor);
    // offset of channel c's pack in the output: ((b * NC + c) * n_t + t) * HW + h * W + w
    const index_t o0 = (b * NC * n_t + t) * HW + h * W + w;
    const index_t base = b * sb + h * sh + w * sw;
    acc_t m[NC], is[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      m[c] = normalise ? norm.mean[c] : acc_t(0);
      is[c] = normalise ? norm.inv_std[c] : acc_t(1);
    }
    if (is_neg) {
      const in_t* src = x + base + static_cast<index_t>(time_index[b * n_t + t]) * st;
      acc_t v[kVec][NC];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
#pragma unroll
        for (int c = 0; c < NC; ++c) v[k][c] = static_cast<acc_t>(src[k * sw + c]);
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        out_pack o;
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          o.v[k] = static_cast<out_t>(rgb_value(v[k][c], in_scale, m[c], is[c]));
        *reinterpret_cast<out_pack*>(neg + o0 + c * n_t * HW) = o;
      }
    } else {
      const index_t tp = t == 0 ? n_t - 1 : t - 1;
      const in_t* src = x + base + t * st;
      const in_t* prv = x + base + tp * st;
      acc_t v[kVec][NC], p[kVec][NC];
#pragma unroll
      for (int k = 0; k < kVec; ++k)
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          v[k][c] = static_cast<acc_t>(src[k * sw + c]);
          p[k][c] = static_cast<acc_t>(prv[k * sw + c]);
        }
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        out_pack r, e;
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          r.v[k] = static_cast<out_t>(rgb_value(v[k][c], in_scale, m[c], is[c]));
          e.v[k] = static_cast<out_t>(res_value(v[k][c], p[k][c], res_scale, res_offset));
        }
        *reinterpret_cast<out_pack*>(rgb + o0 + c * n_t * HW) = r;
        *reinterpret_cast<out_pack*>(res + o0 + c * n_t * HW) = e;
      }
    }
  }
}

// The views into rgb, res, neg (checked, contiguous, of the output dtype).
void iic_views_into(const at::Tensor& clip, const at::Tensor& time_index, std::optional<at::ArrayRef<double>> mean,
                    std::optional<at::ArrayRef<double>> std, bool scaled, const at::Tensor& rgb, const at::Tensor& res,
                    const at::Tensor& neg) {
  const int64_t C = clip.size(1);
  // in double here; each kernel rounds them to its accumulation type, as the CPU kernel does
  double mean_v[kMaxChannels], inv_std_v[kMaxChannels];
  for (int c = 0; c < kMaxChannels; ++c) {
    mean_v[c] = 0.0;
    inv_std_v[c] = 1.0;
  }
  if (mean.has_value() || std.has_value()) {
    TORCH_CHECK(C <= kMaxChannels, "mean and std support at most ", kMaxChannels, " channels on CUDA, got C = ", C);
    view_normalisation(C, mean, std, mean_v, inv_std_v);
  }
  const bool normalise = mean.has_value() || std.has_value();
  const auto dt = rgb.scalar_type();
  c10::cuda::CUDAGuard device_guard(clip.device());
  if (clip.numel() == 0) return;
  const double in_scale = clip.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0;
  const at::Tensor idx = time_index.contiguous();
  const int64_t n_frames = rgb.numel();
  const int64_t n_total = n_frames + neg.numel();
  const bool small = n_total <= std::numeric_limits<int32_t>::max() && cuda::fits_int32({&clip, &rgb, &neg, &idx});
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, clip.scalar_type(), "iic_views_cuda_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "iic_views_cuda_out", [&] {
      using out_t = scalar_t;
      using acc_t = at::opmath_type<out_t>;
      Norm<acc_t> norm;
      for (int c = 0; c < kMaxChannels; ++c) {
        norm.mean[c] = static_cast<acc_t>(mean_v[c]);
        norm.inv_std[c] = static_cast<acc_t>(inv_std_v[c]);
      }
      const acc_t sc = static_cast<acc_t>(in_scale);
      const acc_t rs = scaled ? acc_t(0.5) * sc : sc;
      const acc_t ro = scaled ? acc_t(0.5) : acc_t(0);
      // Pack loads of x need W-stride 1 and every row start aligned to kVec elements; a size-1 dim's
      // stride is never multiplied by a nonzero index, so it may be anything.
      auto stride_ok = [&](int d) { return clip.size(d) == 1 || clip.stride(d) % kVec == 0; };
      const bool out_aligned = cuda::aligned(rgb.const_data_ptr(), sizeof(out_t) * kVec) &&
                               cuda::aligned(res.const_data_ptr(), sizeof(out_t) * kVec) &&
                               cuda::aligned(neg.const_data_ptr(), sizeof(out_t) * kVec);
      const bool vec = clip.stride(4) == 1 && clip.size(4) % kVec == 0 && stride_ok(0) && stride_ok(1) &&
                       stride_ok(2) && stride_ok(3) && cuda::aligned(clip.const_data_ptr(), sizeof(in_t) * kVec) &&
                       out_aligned;
      // channels adjacent: three of them (RGB; other counts take the element kernel)
      const bool channels_last = !vec && C == 3 && clip.stride(1) == 1 && clip.size(4) % kVec == 0 && out_aligned;
      auto launch = [&](auto index_tag) {
        using index_t = decltype(index_tag);
        auto I = [](int64_t v) { return static_cast<index_t>(v); };
        // T_out may be 0 (nothing of the negative to write, so To is never used); a divider needs a
        // positive divisor.
        auto D = [](int64_t v) { return Divider<index_t>(static_cast<std::make_unsigned_t<index_t>>(v)); };
        const auto To = D(std::max<int64_t>(idx.size(1), 1));
        if (vec) {
          // W % kVec == 0 makes both element counts multiples of kVec
          const int64_t n_frame_packs = n_frames / kVec, n_total_packs = n_total / kVec;
          iic_views_vec_kernel<in_t, out_t, index_t><<<cuda::blocks_for(n_total_packs), cuda::kThreads, 0, stream>>>(
              clip.const_data_ptr<in_t>(), idx.const_data_ptr<int64_t>(), rgb.mutable_data_ptr<out_t>(),
              res.mutable_data_ptr<out_t>(), neg.mutable_data_ptr<out_t>(), n_frame_packs, n_total_packs, D(C),
              D(clip.size(2)), D(clip.size(3)), D(clip.size(4) / kVec), To, I(clip.stride(0)), I(clip.stride(1)),
              I(clip.stride(2)), I(clip.stride(3)), norm, normalise, sc, rs, ro);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        // uint8 and float32 clips (decoded and converted frames); other dtypes take the element kernel
        if constexpr (std::is_same_v<in_t, uint8_t> || std::is_same_v<in_t, float>) {
          if (channels_last) {
            // a pack: kVec pixels of one row, all 3 channels
            constexpr int64_t per_pack = 3 * kVec;
            const int64_t n_frame_packs = n_frames / per_pack, n_total_packs = n_total / per_pack;
            iic_views_cl_kernel<3, in_t, out_t, index_t>
                <<<cuda::blocks_for(n_total_packs), cuda::kThreads, 0, stream>>>(
                    clip.const_data_ptr<in_t>(), idx.const_data_ptr<int64_t>(), rgb.mutable_data_ptr<out_t>(),
                    res.mutable_data_ptr<out_t>(), neg.mutable_data_ptr<out_t>(), n_frame_packs, n_total_packs,
                    D(clip.size(2)), D(clip.size(3)), D(clip.size(4) / kVec), To, I(clip.stride(0)),
                    I(clip.stride(2)), I(clip.stride(3)), I(clip.stride(4)), norm, normalise, sc, rs, ro);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        iic_views_kernel<in_t, out_t, index_t><<<cuda::blocks_for(n_total), cuda::kThreads, 0, stream>>>(
            clip.const_data_ptr<in_t>(), idx.const_data_ptr<int64_t>(), rgb.mutable_data_ptr<out_t>(),
            res.mutable_data_ptr<out_t>(), neg.mutable_data_ptr<out_t>(), n_frames, n_total, D(C), D(clip.size(2)),
            D(clip.size(3)), D(clip.size(4)), To, I(clip.stride(0)), I(clip.stride(1)), I(clip.stride(2)),
            I(clip.stride(3)), I(clip.stride(4)), norm, normalise, sc, rs, ro);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (small) {
        launch(int32_t{});
      } else {
        launch(int64_t{});
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CUDA, m) {
  m.impl("iic_views", &iic_views_entry<iic_views_into>);
  m.impl("iic_views.out", &iic_views_out_entry<iic_views_into>);
}

}  // namespace iic_ext
