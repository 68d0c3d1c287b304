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
// One launch covers the B*C*T*H*W positions of rgb/residual and then the B*C*T_out*H*W of negative;
// each thread writes one contiguous output position, so the writes coalesce for any input layout.
// The negative is converted again from the (small, uint8) source frames rather than read back from
// rgb. Arithmetic is in the output's opmath type (float32, float64 for float64 outputs) with the CPU
// kernel's expressions, unfused.
#include <ATen/Dispatch.h>

#include "common.h"
#include "utils.cuh"

namespace iic_ext {
namespace {

using cuda::add_rn;
using cuda::mul_rn;
using cuda::sub_rn;

constexpr int kMaxChannels = 16;

// Per-channel normalisation, passed by value to the kernel.
template <typename acc_t>
struct Norm {
  acc_t mean[kMaxChannels];
  acc_t inv_std[kMaxChannels];
};

template <typename in_t, typename out_t, typename index_t>
__global__ void iic_views_kernel(const in_t* __restrict__ x, const int64_t* __restrict__ time_index,
                                 out_t* __restrict__ rgb, out_t* __restrict__ res, out_t* __restrict__ neg,
                                 int64_t n_frames, int64_t n_total, index_t C, index_t T, index_t H, index_t W,
                                 index_t To, index_t sb, index_t sc, index_t st, index_t sh, index_t sw,
                                 Norm<at::opmath_type<out_t>> norm, bool normalise, at::opmath_type<out_t> in_scale,
                                 at::opmath_type<out_t> res_scale, at::opmath_type<out_t> res_offset) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_total; j += step) {
    const bool is_neg = j >= n_frames;
    const index_t i = static_cast<index_t>(is_neg ? j - n_frames : j);
    const index_t Tn = is_neg ? To : T;
    index_t r = i;
    const index_t w = r % W;
    r /= W;
    const index_t h = r % H;
    r /= H;
    const index_t t = r % Tn;
    r /= Tn;
    const index_t c = r % C;
    const index_t b = r / C;
    const acc_t m = normalise ? norm.mean[c] : acc_t(0);
    const acc_t is = normalise ? norm.inv_std[c] : acc_t(1);
    const index_t base = b * sb + c * sc + h * sh + w * sw;
    if (is_neg) {
      const index_t ts = static_cast<index_t>(time_index[b * To + t]);
      const acc_t v = static_cast<acc_t>(x[base + ts * st]);
      neg[i] = static_cast<out_t>(mul_rn(sub_rn(mul_rn(v, in_scale), m), is));
    } else {
      const index_t tp = t == 0 ? T - 1 : t - 1;
      const acc_t v = static_cast<acc_t>(x[base + t * st]);
      const acc_t p = static_cast<acc_t>(x[base + tp * st]);
      rgb[i] = static_cast<out_t>(mul_rn(sub_rn(mul_rn(v, in_scale), m), is));
      res[i] = static_cast<out_t>(add_rn(mul_rn(sub_rn(v, p), res_scale), res_offset));
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> iic_views_cuda(const at::Tensor& clip, const at::Tensor& time_index,
                                                            std::optional<at::ArrayRef<double>> mean,
                                                            std::optional<at::ArrayRef<double>> std, bool scaled,
                                                            std::optional<at::ScalarType> out_dtype) {
  check_clip(clip);
  check_time_index(clip, time_index);
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
  const auto dt = view_out_dtype(clip, out_dtype);
  c10::cuda::CUDAGuard device_guard(clip.device());
  auto opts = clip.options().dtype(dt).memory_format(at::MemoryFormat::Contiguous);
  auto neg_sizes = clip.sizes().vec();
  neg_sizes[2] = time_index.size(1);
  at::Tensor rgb = at::empty(clip.sizes(), opts), res = at::empty(clip.sizes(), opts), neg = at::empty(neg_sizes, opts);
  if (clip.numel() == 0) return {rgb, res, neg};
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
      auto launch = [&](auto index_tag) {
        using index_t = decltype(index_tag);
        auto I = [](int64_t v) { return static_cast<index_t>(v); };
        iic_views_kernel<in_t, out_t, index_t><<<cuda::blocks_for(n_total), cuda::kThreads, 0, stream>>>(
            clip.const_data_ptr<in_t>(), idx.const_data_ptr<int64_t>(), rgb.mutable_data_ptr<out_t>(),
            res.mutable_data_ptr<out_t>(), neg.mutable_data_ptr<out_t>(), n_frames, n_total, I(C), I(clip.size(2)),
            I(clip.size(3)), I(clip.size(4)), I(idx.size(1)), I(clip.stride(0)), I(clip.stride(1)), I(clip.stride(2)),
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
  return {rgb, res, neg};
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CUDA, m) { m.impl("iic_views", &iic_views_cuda); }

}  // namespace iic_ext
