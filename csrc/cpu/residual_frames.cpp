// Residual frames on the CPU.
//
// residual_frames: out[:, :, t] = s * (x[:, :, t] - x[:, :, t - 1 mod T]) + o, with x read as x/255 for
//   uint8 and (s, o) = (1/2, 1/2) when scaled (the IIC view), (1, 0) otherwise (the fine-tuning input).
//   Args: clip [B, C, T, H, W] of any strides. Returns [B, C, T, H, W] in clip's memory format.
// _residual_frames_backward: grad_clip[:, :, t] = s * (g[:, :, t] - g[:, :, t + 1 mod T]).
//
// Each is one pass: the wrap-around frame is a second, one-frame-deep pass over the same buffers, so
// nothing is materialised (no rolled copy, no temporaries).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/native/cpu/Loops.h>

#include "common.h"
#include "simd.h"

namespace iic_ext {
namespace {

// dst = scale * (a - b) + offset, element-wise, with a, b of type in_t and dst of type out_t.
template <typename in_t, typename out_t>
void diff_kernel(const at::Tensor& dst, const at::Tensor& a, const at::Tensor& b, double scale, double offset) {
  using acc_t = at::opmath_type<out_t>;
  auto iter = at::TensorIteratorConfig()
                  .add_output(dst)
                  .add_const_input(a)
                  .add_const_input(b)
                  .check_all_same_dtype(false)
                  .resize_outputs(false)
                  .build();
  const acc_t s = static_cast<acc_t>(scale);
  const acc_t o = static_cast<acc_t>(offset);
  at::native::cpu_kernel(iter, [s, o](in_t x, in_t y) -> out_t {
    return static_cast<out_t>((static_cast<acc_t>(x) - static_cast<acc_t>(y)) * s + o);
  });
}

// d[i] = s * (a[i] - p[i]) + o over one contiguous block: the loop the compiler vectorises.
template <typename in_t, typename out_t>
IIC_EXT_INLINE void diff_block(const in_t* __restrict a, const in_t* __restrict p, out_t* __restrict d, int64_t n,
                               at::opmath_type<out_t> s, at::opmath_type<out_t> o) {
  using acc_t = at::opmath_type<out_t>;
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<out_t>((static_cast<acc_t>(a[i]) - static_cast<acc_t>(p[i])) * s + o);
}

template <typename in_t, typename out_t>
void diff_block_base(const in_t* a, const in_t* p, out_t* d, int64_t n, at::opmath_type<out_t> s,
                     at::opmath_type<out_t> o) {
  diff_block(a, p, d, n, s, o);
}

template <typename in_t, typename out_t>
IIC_EXT_AVX2 void diff_block_avx2(const in_t* a, const in_t* p, out_t* d, int64_t n, at::opmath_type<out_t> s,
                                  at::opmath_type<out_t> o) {
  diff_block(a, p, d, n, s, o);
}

template <typename in_t, typename out_t>
IIC_EXT_AVX512 void diff_block_avx512(const in_t* a, const in_t* p, out_t* d, int64_t n, at::opmath_type<out_t> s,
                                      at::opmath_type<out_t> o) {
  diff_block(a, p, d, n, s, o);
}

// Number of leading units and the block length when x and out share a dense layout in which every
// frame of a unit is one contiguous block: contiguous ([B*C] units of H*W) or channels_last_3d
// ([B] units of H*W*C). Returns false for any other pair of layouts.
bool frame_blocks(const at::Tensor& x, const at::Tensor& out, int64_t& units, int64_t& block) {
  if (x.is_contiguous() && out.is_contiguous()) {
    units = x.size(0) * x.size(1);
    block = x.size(3) * x.size(4);
    return true;
  }
  const auto cl = at::MemoryFormat::ChannelsLast3d;
  if (x.is_contiguous(cl) && out.is_contiguous(cl)) {
    units = x.size(0);
    block = x.size(1) * x.size(3) * x.size(4);
    return true;
  }
  return false;
}

template <typename in_t, typename out_t>
void time_diff_blocks(const at::Tensor& x, const at::Tensor& out, int shift, double scale, double offset,
                      int64_t units, int64_t block) {
  using acc_t = at::opmath_type<out_t>;
  const int64_t T = x.size(2);
  const in_t* src = x.const_data_ptr<in_t>();
  out_t* dst = out.mutable_data_ptr<out_t>();
  const acc_t s = static_cast<acc_t>(scale), o = static_cast<acc_t>(offset);
  const Isa isa = cpu_isa();
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(block, 1));
  at::parallel_for(0, units * T, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t unit = u / T, t = u % T;
      const int64_t tn = (t + shift + T) % T;
      const in_t* a = src + (unit * T + t) * block;
      const in_t* p = src + (unit * T + tn) * block;
      out_t* d = dst + (unit * T + t) * block;
      if (isa == Isa::kAvx512)
        diff_block_avx512<in_t, out_t>(a, p, d, block, s, o);
      else if (isa == Isa::kAvx2)
        diff_block_avx2<in_t, out_t>(a, p, d, block, s, o);
      else
        diff_block_base<in_t, out_t>(a, p, d, block, s, o);
    }
  });
}

// out[:, :, t] = scale * (x[:, :, t] - x[:, :, t + shift mod T]) + offset, shift = -1 or +1.
void time_diff_cpu(const at::Tensor& x, const at::Tensor& out, int shift, double scale, double offset) {
  const int64_t T = x.size(2);
  if (x.numel() == 0) return;
  if (T == 1) {  // every frame is its own neighbour: the difference is zero
    out.fill_(offset);
    return;
  }
  int64_t units = 0, block = 0;
  if (frame_blocks(x, out, units, block)) {
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, x.scalar_type(), "time_diff_in", [&] {
      using in_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "time_diff_out", [&] {
        time_diff_blocks<in_t, scalar_t>(x, out, shift, scale, offset, units, block);
      });
    });
    return;
  }
  // Any other layout: strided element-wise passes through TensorIterator.
  // The frames whose neighbour does not wrap: one shifted view against another.
  at::Tensor dst_body, a_body, b_body, dst_edge, a_edge, b_edge;
  if (shift < 0) {  // neighbour t - 1: frames 1..T-1 against 0..T-2, frame 0 against T-1
    dst_body = out.narrow(2, 1, T - 1);
    a_body = x.narrow(2, 1, T - 1);
    b_body = x.narrow(2, 0, T - 1);
    dst_edge = out.narrow(2, 0, 1);
    a_edge = x.narrow(2, 0, 1);
    b_edge = x.narrow(2, T - 1, 1);
  } else {  // neighbour t + 1: frames 0..T-2 against 1..T-1, frame T-1 against 0
    dst_body = out.narrow(2, 0, T - 1);
    a_body = x.narrow(2, 0, T - 1);
    b_body = x.narrow(2, 1, T - 1);
    dst_edge = out.narrow(2, T - 1, 1);
    a_edge = x.narrow(2, T - 1, 1);
    b_edge = x.narrow(2, 0, 1);
  }
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, x.scalar_type(), "time_diff_in", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "time_diff_out", [&] {
      using out_t = scalar_t;
      diff_kernel<in_t, out_t>(dst_body, a_body, b_body, scale, offset);
      diff_kernel<in_t, out_t>(dst_edge, a_edge, b_edge, scale, offset);
    });
  });
}

double input_scale(const at::Tensor& clip) { return clip.scalar_type() == at::kByte ? 1.0 / 255.0 : 1.0; }

void residual_frames_out_impl(const at::Tensor& clip, bool scaled, const at::Tensor& out) {
  check_clip(clip);
  check_residual_out(clip, out);
  const double s = (scaled ? 0.5 : 1.0) * input_scale(clip);
  time_diff_cpu(clip, out, -1, s, scaled ? 0.5 : 0.0);
}

void residual_frames_out_cpu(const at::Tensor& clip, bool scaled, at::Tensor& out) {
  residual_frames_out_impl(clip, scaled, out);
}

at::Tensor residual_frames_cpu(const at::Tensor& clip, bool scaled, std::optional<at::ScalarType> out_dtype) {
  check_clip(clip);
  const auto dt = view_out_dtype(clip, out_dtype);
  at::Tensor out = at::empty(clip.sizes(), clip.options().dtype(dt).memory_format(clip.suggest_memory_format()));
  residual_frames_out_impl(clip, scaled, out);
  return out;
}

at::Tensor residual_frames_backward_cpu(const at::Tensor& grad, bool scaled) {
  check_clip(grad, "grad");
  check_float_dtype(grad.scalar_type(), "grad");
  at::Tensor out = at::empty(grad.sizes(), grad.options().memory_format(grad.suggest_memory_format()));
  time_diff_cpu(grad, out, +1, scaled ? 0.5 : 1.0, 0.0);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CPU, m) {
  m.impl("residual_frames", &residual_frames_cpu);
  m.impl("residual_frames.out", &residual_frames_out_cpu);
  m.impl("_residual_frames_backward", &residual_frames_backward_cpu);
}

}  // namespace iic_ext
