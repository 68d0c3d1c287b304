// Residual frames on CUDA.
//
// residual_frames: out[:, :, t] = s * (x[:, :, t] - x[:, :, t - 1 mod T]) + o, with x read as x/255 for
//   uint8 and (s, o) = (1/2, 1/2) when scaled (the IIC view), (1, 0) otherwise (the fine-tuning input).
//   Args: clip [B, C, T, H, W] uint8/half/bfloat16/float/double, any strides.
//   Returns [B, C, T, H, W] of a floating dtype, in clip's memory format (.out: writes out, any strides).
// _residual_frames_backward: grad_clip[:, :, t] = s * (g[:, :, t] - g[:, :, t + 1 mod T]).
//   Args: grad [B, C, T, H, W] floating, any strides. Returns grad's shape, dtype and memory format.
//
// One pass: each output element reads its frame and the neighbour frame. When input and output share
// one dense layout (contiguous or channels_last_3d alike) the kernel walks memory linearly with
// 4-wide loads; otherwise each thread maps its output position to a 5-D coordinate and reads through
// the input's strides.
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include "common.h"
#include "utils.cuh"

namespace iic_ext {
namespace {

using cuda::add_rn;
using cuda::mul_rn;
using cuda::Pack;
using cuda::sub_rn;

constexpr int kVec = 4;

// Same dense layout in and out: element i of memory is one position in both, its frame is
// (i / frame_stride) % T and the neighbour frame lies frame_stride away (wrapping at the ends).
template <typename in_t, typename out_t, typename index_t>
__global__ void residual_frames_dense_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, int64_t n_packs,
                                             index_t frame_stride, index_t T, int shift,
                                             at::opmath_type<out_t> scale, at::opmath_type<out_t> offset) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n_packs; j += step) {
    const index_t i = static_cast<index_t>(j) * kVec;
    const index_t t = (i / frame_stride) % T;
    index_t p;
    if (shift < 0) {
      p = t == 0 ? i + (T - 1) * frame_stride : i - frame_stride;
    } else {
      p = t == T - 1 ? i - (T - 1) * frame_stride : i + frame_stride;
    }
    const auto a = *reinterpret_cast<const Pack<in_t, kVec>*>(x + i);
    const auto b = *reinterpret_cast<const Pack<in_t, kVec>*>(x + p);
    Pack<out_t, kVec> r;
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      const acc_t d = sub_rn(static_cast<acc_t>(a.v[k]), static_cast<acc_t>(b.v[k]));
      r.v[k] = static_cast<out_t>(add_rn(mul_rn(d, scale), offset));
    }
    *reinterpret_cast<Pack<out_t, kVec>*>(y + i) = r;
  }
}

// Any strides: position -> 5-D coordinate (in the output's memory order) -> offsets in x and y.
template <typename in_t, typename out_t, typename index_t>
__global__ void residual_frames_kernel(const in_t* __restrict__ x, out_t* __restrict__ y, int64_t n,
                                       cuda::Geometry<index_t> g, int shift, at::opmath_type<out_t> scale,
                                       at::opmath_type<out_t> offset) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += step) {
    index_t r = static_cast<index_t>(j);
    index_t xo = 0, yo = 0, t = 0, T = 1, ts = 0;
#pragma unroll
    for (int d = 4; d >= 0; --d) {
      const index_t c = r % g.size[d];
      r /= g.size[d];
      xo += c * g.in_stride[d];
      yo += c * g.out_stride[d];
      if (g.dim[d] == 2) {
        t = c;
        T = g.size[d];
        ts = g.in_stride[d];
      }
    }
    index_t p;
    if (shift < 0) {
      p = t == 0 ? xo + (T - 1) * ts : xo - ts;
    } else {
      p = t == T - 1 ? xo - (T - 1) * ts : xo + ts;
    }
    const acc_t d = sub_rn(static_cast<acc_t>(x[xo]), static_cast<acc_t>(x[p]));
    y[yo] = static_cast<out_t>(add_rn(mul_rn(d, scale), offset));
  }
}

template <typename in_t, typename out_t, typename index_t>
void launch_time_diff(const at::Tensor& x, const at::Tensor& out, int shift, double scale, double offset) {
  using acc_t = at::opmath_type<out_t>;
  const in_t* xp = x.const_data_ptr<in_t>();
  out_t* yp = out.mutable_data_ptr<out_t>();
  const int64_t n = out.numel();
  const int64_t T = x.size(2);
  const cudaStream_t stream = cuda::current_stream();
  const acc_t s = static_cast<acc_t>(scale), o = static_cast<acc_t>(offset);
  const bool same_dense = x.is_non_overlapping_and_dense() && out.is_non_overlapping_and_dense() &&
                          x.strides() == out.strides();
  const int64_t frame_stride = x.stride(2);
  if (same_dense && frame_stride % kVec == 0 && cuda::aligned(xp, sizeof(in_t) * kVec) &&
      cuda::aligned(yp, sizeof(out_t) * kVec)) {
    // frame_stride % kVec == 0 makes n a multiple of kVec and keeps every pack inside one frame
    const int64_t packs = n / kVec;
    residual_frames_dense_kernel<in_t, out_t, index_t><<<cuda::blocks_for(packs), cuda::kThreads, 0, stream>>>(
        xp, yp, packs, static_cast<index_t>(frame_stride), static_cast<index_t>(T), shift, s, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto g = cuda::make_geometry<index_t>(out.sizes(), x.strides(), out.strides());
  residual_frames_kernel<in_t, out_t, index_t>
      <<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(xp, yp, n, g, shift, s, o);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// out[:, :, t] = scale * (x[:, :, t] - x[:, :, t + shift mod T]) + offset, shift = -1 or +1.
void time_diff_cuda(const at::Tensor& x, const at::Tensor& out, int shift, double scale, double offset) {
  if (x.numel() == 0) return;
  if (x.size(2) == 1) {  // every frame is its own neighbour: the difference is zero
    out.fill_(offset);
    return;
  }
  const bool small = cuda::fits_int32({&x, &out});
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, x.scalar_type(), "residual_frames_cuda_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "residual_frames_cuda_out", [&] {
      using out_t = scalar_t;
      if (small) {
        launch_time_diff<in_t, out_t, int32_t>(x, out, shift, scale, offset);
      } else {
        launch_time_diff<in_t, out_t, int64_t>(x, out, shift, scale, offset);
      }
    });
  });
}

double input_scale(const at::Tensor& clip) { return clip.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0; }

void residual_frames_out_impl(const at::Tensor& clip, bool scaled, const at::Tensor& out) {
  check_clip(clip);
  check_residual_out(clip, out);
  c10::cuda::CUDAGuard device_guard(clip.device());
  const double s = (scaled ? 0.5 : 1.0) * input_scale(clip);
  time_diff_cuda(clip, out, -1, s, scaled ? 0.5 : 0.0);
}

void residual_frames_out_cuda(const at::Tensor& clip, bool scaled, at::Tensor& out) {
  residual_frames_out_impl(clip, scaled, out);
}

at::Tensor residual_frames_cuda(const at::Tensor& clip, bool scaled, std::optional<at::ScalarType> out_dtype) {
  check_clip(clip);
  const auto dt = view_out_dtype(clip, out_dtype);
  c10::cuda::CUDAGuard device_guard(clip.device());
  at::Tensor out = at::empty(clip.sizes(), clip.options().dtype(dt).memory_format(clip.suggest_memory_format()));
  residual_frames_out_impl(clip, scaled, out);
  return out;
}

at::Tensor residual_frames_backward_cuda(const at::Tensor& grad, bool scaled) {
  check_clip(grad, "grad");
  check_float_dtype(grad.scalar_type(), "grad");
  c10::cuda::CUDAGuard device_guard(grad.device());
  at::Tensor out = at::empty(grad.sizes(), grad.options().memory_format(grad.suggest_memory_format()));
  time_diff_cuda(grad, out, +1, scaled ? 0.5 : 1.0, 0.0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CUDA, m) {
  m.impl("residual_frames", &residual_frames_cuda);
  m.impl("residual_frames.out", &residual_frames_out_cuda);
  m.impl("_residual_frames_backward", &residual_frames_backward_cuda);
}

}  // namespace iic_ext
