// Temporal gather on CUDA: the primitive behind the intra-negatives (frame repeat, frame shuffle).
//
// temporal_gather: out[b, :, t] = clip[b, :, time_index[b, t]].
//   Args: clip [B, C, T, H, W] (uint8/half/bfloat16/float/double, any strides), time_index [B, T_out]
//   int64 in [0, T). Returns [B, C, T_out, H, W] in clip's memory format (.out: writes out, any strides).
// _temporal_gather_backward: grad_clip[b, :, s] = sum over t with time_index[b, t] == s of grad[b, :, t].
//   Args: grad [B, C, T_out, H, W] floating, any strides; time_index [B, T_out]; num_frames T.
//   Returns [B, C, T, H, W] contiguous, grad's dtype; summed in t order in float32 for half types.
//
// The gather is a copy, so it is dispatched on the element size, not the dtype. When input and output
// store a frame ([C, H, W], channels-last) or a plane ([H, W], contiguous) as the same dense block, whole
// blocks are copied in the widest aligned unit (up to 16 bytes); otherwise element by element through
// the strides. The backward gives every output element to one thread, which walks t in order: no
// atomics, so the result is deterministic and equal to the CPU kernel's.
// swap_time_index: one thread per output entry (see csrc/ops.cpp).
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>

#include "common.h"
#include "utils.cuh"

namespace iic_ext {
namespace {

// Blocks of `block` units: row r = (b, c, t) of rows = B * Cn * T_out; Cn = 1 when a block is a frame.
template <typename unit_t, typename index_t>
__global__ void temporal_gather_blocks_kernel(const unit_t* __restrict__ src, unit_t* __restrict__ dst,
                                              const int64_t* __restrict__ time_index, int64_t n, index_t block,
                                              index_t Cn, index_t To, index_t sb, index_t sc, index_t st, index_t db,
                                              index_t dc, index_t dt) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += step) {
    const index_t i = static_cast<index_t>(j);
    const index_t row = i / block, e = i - row * block;
    const index_t t = row % To, bc = row / To;
    const index_t c = bc % Cn, b = bc / Cn;
    const index_t s = static_cast<index_t>(time_index[b * To + t]);
    dst[b * db + c * dc + t * dt + e] = src[b * sb + c * sc + s * st + e];
  }
}

// Any strides: output position -> 5-D coordinate (output memory order) -> source frame from time_index.
template <typename unit_t, typename index_t>
__global__ void temporal_gather_kernel(const unit_t* __restrict__ src, unit_t* __restrict__ dst,
                                       const int64_t* __restrict__ time_index, int64_t n, cuda::Geometry<index_t> g,
                                       index_t To, index_t src_time_stride) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += step) {
    index_t r = static_cast<index_t>(j);
    index_t so = 0, o = 0, b = 0, t = 0;
#pragma unroll
    for (int d = 4; d >= 0; --d) {
      const index_t c = r % g.size[d];
      r /= g.size[d];
      so += c * g.in_stride[d];  // the time dim has in_stride 0 here
      o += c * g.out_stride[d];
      if (g.dim[d] == 0) b = c;
      if (g.dim[d] == 2) t = c;
    }
    dst[o] = src[so + static_cast<index_t>(time_index[b * To + t]) * src_time_stride];
  }
}

template <int bytes>
struct Unit;
template <>
struct Unit<1> {
  using type = uint8_t;
};
template <>
struct Unit<2> {
  using type = uint16_t;
};
template <>
struct Unit<4> {
  using type = uint32_t;
};
template <>
struct Unit<8> {
  using type = uint64_t;
};
template <>
struct Unit<16> {
  using type = uint4;
};

// Dispatch on a byte count in {1, 2, 4, 8, 16}: f receives the unit type.
template <typename F>
void with_unit(int64_t bytes, F&& f) {
  switch (bytes) {
    case 16: f(typename Unit<16>::type{}); break;
    case 8: f(typename Unit<8>::type{}); break;
    case 4: f(typename Unit<4>::type{}); break;
    case 2: f(typename Unit<2>::type{}); break;
    default: f(typename Unit<1>::type{}); break;
  }
}

// The dense block both sides share, if any: (block length in elements, Cn, whether a block is a frame).
struct BlockPlan {
  bool ok = false;
  int64_t len = 0;
  int64_t Cn = 1;
};

// True when the dims of x listed innermost first pack densely: the first has stride 1 and each next one
// the product of the sizes inside it (size-1 dims are free).
bool packs_densely(const at::Tensor& x, std::initializer_list<int> dims_inner_first) {
  int64_t expected = 1;
  for (int d : dims_inner_first) {
    if (x.size(d) != 1 && x.stride(d) != expected) return false;
    expected *= x.size(d);
  }
  return true;
}

BlockPlan plan_blocks(const at::Tensor& clip, const at::Tensor& out) {
  BlockPlan p;
  if (clip.stride(3) != out.stride(3) || clip.stride(4) != out.stride(4)) return p;
  // channels-last frame: (C innermost, then W, then H) one dense block
  if (clip.stride(1) == out.stride(1) && packs_densely(clip, {1, 4, 3}) && packs_densely(out, {1, 4, 3})) {
    p = {true, clip.size(1) * clip.size(3) * clip.size(4), 1};
    return p;
  }
  // contiguous plane: (W innermost, then H) one dense block per channel
  if (packs_densely(clip, {4, 3}) && packs_densely(out, {4, 3})) {
    p = {true, clip.size(3) * clip.size(4), clip.size(1)};
  }
  return p;
}

template <typename index_t>
void launch_gather(const at::Tensor& clip, const at::Tensor& idx, const at::Tensor& out) {
  const int64_t esize = clip.element_size();
  const int64_t To = out.size(2);
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const cudaStream_t stream = cuda::current_stream();
  const char* src = static_cast<const char*>(clip.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const BlockPlan plan = plan_blocks(clip, out);
  if (plan.ok) {
    const int64_t c_stride_src = plan.Cn > 1 ? clip.stride(1) : 0, c_stride_dst = plan.Cn > 1 ? out.stride(1) : 0;
    // widest unit dividing the block and every block start, and aligning both pointers (1 always does)
    int64_t unit = 16;
    for (; unit > 1; unit /= 2) {
      const int64_t starts[] = {plan.len,      clip.stride(0), c_stride_src, clip.stride(2),
                                out.stride(0), c_stride_dst,   out.stride(2)};
      bool ok = cuda::aligned(src, unit) && cuda::aligned(dst, unit);
      for (int64_t v : starts) ok = ok && (v * esize) % unit == 0;
      if (ok) break;
    }
    with_unit(unit, [&](auto u) {
      using unit_t = decltype(u);
      constexpr int64_t ub = sizeof(unit_t);
      auto in_units = [&](int64_t elems) { return static_cast<index_t>(elems * esize / ub); };
      const int64_t n = out.numel() * esize / ub;
      temporal_gather_blocks_kernel<unit_t, index_t><<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
          reinterpret_cast<const unit_t*>(src), reinterpret_cast<unit_t*>(dst), ip, n, in_units(plan.len),
          static_cast<index_t>(plan.Cn), static_cast<index_t>(To), in_units(clip.stride(0)), in_units(c_stride_src),
          in_units(clip.stride(2)), in_units(out.stride(0)), in_units(c_stride_dst), in_units(out.stride(2)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  auto in_strides = clip.strides().vec();
  const int64_t src_time_stride = in_strides[2];
  in_strides[2] = 0;
  const auto g = cuda::make_geometry<index_t>(out.sizes(), in_strides, out.strides());
  const int64_t n = out.numel();
  with_unit(esize, [&](auto u) {
    using unit_t = decltype(u);
    temporal_gather_kernel<unit_t, index_t><<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
        reinterpret_cast<const unit_t*>(src), reinterpret_cast<unit_t*>(dst), ip, n, g, static_cast<index_t>(To),
        static_cast<index_t>(src_time_stride));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void temporal_gather_out_impl(const at::Tensor& clip, const at::Tensor& time_index, const at::Tensor& out) {
  check_clip(clip);
  check_time_index(clip, time_index);
  check_gather_out(clip, time_index, out);
  if (out.numel() == 0) return;
  c10::cuda::CUDAGuard device_guard(clip.device());
  const at::Tensor idx = time_index.contiguous();
  if (cuda::fits_int32({&clip, &out, &idx})) {
    launch_gather<int32_t>(clip, idx, out);
  } else {
    launch_gather<int64_t>(clip, idx, out);
  }
}

void temporal_gather_out_cuda(const at::Tensor& clip, const at::Tensor& time_index, at::Tensor& out) {
  temporal_gather_out_impl(clip, time_index, out);
}

at::Tensor temporal_gather_cuda(const at::Tensor& clip, const at::Tensor& time_index) {
  check_clip(clip);
  TORCH_CHECK(time_index.dim() == 2, "time_index must be [B, T_out], got shape ", time_index.sizes());
  check_same_device(clip, "clip", time_index, "time_index");
  c10::cuda::CUDAGuard device_guard(clip.device());
  at::Tensor out =
      at::empty(gathered_sizes(clip, time_index), clip.options().memory_format(clip.suggest_memory_format()));
  temporal_gather_out_impl(clip, time_index, out);
  return out;
}

// grad_clip (contiguous [B, C, T, H, W]) element by element: sum over t in order of the gathered frames
// that came from its frame s.
template <typename scalar_t, typename index_t>
__global__ void temporal_gather_backward_kernel(const scalar_t* __restrict__ grad, scalar_t* __restrict__ out,
                                                const int64_t* __restrict__ time_index, int64_t n, index_t C,
                                                index_t T, index_t H, index_t W, index_t To, index_t gb, index_t gc,
                                                index_t gt, index_t gh, index_t gw) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; j < n; j += step) {
    index_t r = static_cast<index_t>(j);
    const index_t w = r % W;
    r /= W;
    const index_t h = r % H;
    r /= H;
    const index_t s = r % T;
    r /= T;
    const index_t c = r % C;
    const index_t b = r / C;
    const int64_t* row = time_index + b * To;
    const scalar_t* g = grad + b * gb + c * gc + h * gh + w * gw;
    acc_t acc = 0;
    for (index_t t = 0; t < To; ++t) {
      if (row[t] == s) acc += static_cast<acc_t>(g[t * gt]);
    }
    out[j] = static_cast<scalar_t>(acc);
  }
}

at::Tensor temporal_gather_backward_cuda(const at::Tensor& grad, const at::Tensor& time_index,
                                         c10::SymInt num_frames) {
  check_clip(grad, "grad");
  check_float_dtype(grad.scalar_type(), "grad");
  const int64_t T = num_frames.expect_int();
  TORCH_CHECK(T >= 1, "num_frames must be >= 1, got ", T);
  check_same_device(grad, "grad", time_index, "time_index");
  TORCH_CHECK(time_index.dim() == 2 && time_index.size(0) == grad.size(0) && time_index.size(1) == grad.size(2),
              "time_index must be [B, T_out] = [", grad.size(0), ", ", grad.size(2), "], got ", time_index.sizes());
  check_index(time_index, T, "time_index", "frame positions of the gathered clip");
  c10::cuda::CUDAGuard device_guard(grad.device());
  auto sizes = grad.sizes().vec();
  sizes[2] = T;
  if (grad.numel() == 0) return at::zeros(sizes, grad.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor out = at::empty(sizes, grad.options().memory_format(at::MemoryFormat::Contiguous));
  const at::Tensor idx = time_index.contiguous();
  const int64_t n = out.numel();
  const bool small = cuda::fits_int32({&grad, &out, &idx});
  const cudaStream_t stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "temporal_gather_backward_cuda", [&] {
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      temporal_gather_backward_kernel<scalar_t, index_t><<<cuda::blocks_for(n), cuda::kThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), n,
          static_cast<index_t>(grad.size(1)), static_cast<index_t>(T), static_cast<index_t>(grad.size(3)),
          static_cast<index_t>(grad.size(4)), static_cast<index_t>(grad.size(2)), static_cast<index_t>(grad.stride(0)),
          static_cast<index_t>(grad.stride(1)), static_cast<index_t>(grad.stride(2)),
          static_cast<index_t>(grad.stride(3)), static_cast<index_t>(grad.stride(4)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (small) {
      launch(int32_t{});
    } else {
      launch(int64_t{});
    }
  });
  return out;
}

__global__ void swap_time_index_kernel(const int64_t* __restrict__ first, const int64_t* __restrict__ second,
                                       int64_t* __restrict__ out, int64_t n, int64_t T, int64_t size, int64_t pieces) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n; k += step) {
    const int64_t b = k / T, t = k - b * T;
    out[k] = swapped_frame(t, first[b], second[b], T, size, pieces);
  }
}

at::Tensor swap_time_index_cuda(const at::Tensor& first, const at::Tensor& second, c10::SymInt num_frames,
                                int64_t chunks) {
  const int64_t T = num_frames.expect_int();
  const ChunkLayout c = check_swap_args(first, second, T, chunks);
  c10::cuda::CUDAGuard device_guard(first.device());
  at::Tensor out = at::empty({first.size(0), T}, first.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const at::Tensor fi = first.contiguous(), se = second.contiguous();
  swap_time_index_kernel<<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::current_stream()>>>(
      fi.const_data_ptr<int64_t>(), se.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n, T, c.size, c.n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CUDA, m) {
  m.impl("temporal_gather", &temporal_gather_cuda);
  m.impl("temporal_gather.out", &temporal_gather_out_cuda);
  m.impl("_temporal_gather_backward", &temporal_gather_backward_cuda);
  m.impl("swap_time_index", &swap_time_index_cuda);
}

}  // namespace iic_ext
