// Temporal gather on the CPU: the primitive behind the intra-negatives (frame repeat, frame shuffle).
//
// temporal_gather: out[b, :, t] = clip[b, :, time_index[b, t]].
//   Args: clip [B, C, T, H, W] (any dtype of residual_frames, any strides), time_index [B, T_out] int64.
//   Returns [B, C, T_out, H, W] in clip's memory format.
// _temporal_gather_backward: grad_clip[b, :, s] = sum over t with time_index[b, t] == s of grad[b, :, t],
//   summed in t order (deterministic), accumulated in float32 for half inputs.
// swap_time_index: the time index of the swap negative from its two piece positions per sample (see
//   csrc/ops.cpp); one pass instead of the dozen small tensor ops that build it in PyTorch.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cstring>

#include "common.h"

namespace iic_ext {
namespace {

// True when the [C, H, W] frame of a [B, C, T, H, W] tensor fills one dense block of memory.
bool frame_is_dense(const at::Tensor& x) {
  int64_t sizes[3] = {x.size(1), x.size(3), x.size(4)};
  int64_t strides[3] = {x.stride(1), x.stride(3), x.stride(4)};
  // sort dims by stride (insertion sort on three items), then check packing
  int order[3] = {0, 1, 2};
  for (int i = 1; i < 3; ++i)
    for (int j = i; j > 0 && strides[order[j]] < strides[order[j - 1]]; --j) std::swap(order[j], order[j - 1]);
  int64_t expected = 1;
  for (int i = 0; i < 3; ++i) {
    const int d = order[i];
    if (sizes[d] != 1 && strides[d] != expected) return false;
    expected *= sizes[d];
  }
  return true;
}

template <typename scalar_t>
void gather_frames(const at::Tensor& clip, const at::Tensor& time_index, const at::Tensor& out) {
  const int64_t B = out.size(0), C = out.size(1), To = out.size(2), H = out.size(3), W = out.size(4);
  const auto idx = time_index.accessor<int64_t, 2>();
  const scalar_t* src = clip.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const auto ss = clip.strides();
  const auto ds = out.strides();
  // Same dense frame layout on both sides: each frame is one memcpy.
  const bool block = frame_is_dense(clip) && frame_is_dense(out) && ss[1] == ds[1] && ss[3] == ds[3] &&
                     ss[4] == ds[4];
  const int64_t frame = C * H * W;
  if (block) {  // a dense frame starts at its lowest address, which is the [0, 0, 0] element here
    at::parallel_for(0, B * To, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        const int64_t b = u / To, t = u % To;
        std::memcpy(dst + b * ds[0] + t * ds[2], src + b * ss[0] + idx[b][t] * ss[2], frame * sizeof(scalar_t));
      }
    });
    return;
  }
  // Otherwise one task per (b, t, c) plane; a plane dense on both sides is one memcpy, else rows.
  const bool plane = ss[4] == 1 && ds[4] == 1 && (H == 1 || (ss[3] == W && ds[3] == W));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(H * W, 1));
  at::parallel_for(0, B * To * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t c = u % C, bt = u / C;
      const int64_t b = bt / To, t = bt % To;
      const scalar_t* s = src + b * ss[0] + idx[b][t] * ss[2] + c * ss[1];
      scalar_t* d = dst + b * ds[0] + t * ds[2] + c * ds[1];
      if (plane) {
        std::memcpy(d, s, H * W * sizeof(scalar_t));
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* sr = s + h * ss[3];
        scalar_t* dr = d + h * ds[3];
        if (ss[4] == 1 && ds[4] == 1) {
          std::memcpy(dr, sr, W * sizeof(scalar_t));
        } else {
          for (int64_t w = 0; w < W; ++w) dr[w * ds[4]] = sr[w * ss[4]];
        }
      }
    }
  });
}

void temporal_gather_out_cpu(const at::Tensor& clip, const at::Tensor& time_index, at::Tensor& out) {
  check_clip(clip);
  check_time_index(clip, time_index);
  check_gather_out(clip, time_index, out);
  if (out.numel() == 0) return;
  const at::Tensor idx = time_index.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kByte, at::kHalf, at::kBFloat16, clip.scalar_type(), "temporal_gather",
                                  [&] { gather_frames<scalar_t>(clip, idx, out); });
}

at::Tensor temporal_gather_cpu(const at::Tensor& clip, const at::Tensor& time_index) {
  check_clip(clip);
  TORCH_CHECK(time_index.dim() == 2, "time_index must be [B, T_out], got shape ", time_index.sizes());
  at::Tensor out =
      at::empty(gathered_sizes(clip, time_index), clip.options().memory_format(clip.suggest_memory_format()));
  temporal_gather_out_cpu(clip, time_index, out);
  return out;
}

template <typename scalar_t>
void scatter_frames(const at::Tensor& grad, const at::Tensor& time_index, const at::Tensor& acc) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), C = grad.size(1), To = grad.size(2), H = grad.size(3), W = grad.size(4);
  const auto idx = time_index.accessor<int64_t, 2>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  acc_t* a = acc.mutable_data_ptr<acc_t>();
  const auto gs = grad.strides();
  const auto as = acc.strides();  // contiguous
  // One task per (b, c): all t of one (b, c) are summed by one thread, in t order.
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / C, c = u % C;
      for (int64_t t = 0; t < To; ++t) {
        const scalar_t* gp = g + b * gs[0] + c * gs[1] + t * gs[2];
        acc_t* ap = a + b * as[0] + c * as[1] + idx[b][t] * as[2];
        for (int64_t h = 0; h < H; ++h) {
          const scalar_t* gr = gp + h * gs[3];
          acc_t* ar = ap + h * as[3];
          if (gs[4] == 1) {
            for (int64_t w = 0; w < W; ++w) ar[w] += static_cast<acc_t>(gr[w]);
          } else {
            for (int64_t w = 0; w < W; ++w) ar[w] += static_cast<acc_t>(gr[w * gs[4]]);
          }
        }
      }
    }
  });
}

at::Tensor temporal_gather_backward_cpu(const at::Tensor& grad, const at::Tensor& time_index, c10::SymInt num_frames) {
  check_clip(grad, "grad");
  check_float_dtype(grad.scalar_type(), "grad");
  const int64_t T = num_frames.expect_int();
  TORCH_CHECK(T >= 1, "num_frames must be >= 1, got ", T);
  check_same_device(grad, "grad", time_index, "time_index");
  TORCH_CHECK(time_index.dim() == 2 && time_index.size(0) == grad.size(0) && time_index.size(1) == grad.size(2),
              "time_index must be [B, T_out] = [", grad.size(0), ", ", grad.size(2), "], got ", time_index.sizes());
  check_index(time_index, T, "time_index", "frame positions of the gathered clip");
  auto sizes = grad.sizes().vec();
  sizes[2] = T;
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor acc = at::zeros(sizes, grad.options().dtype(acc_type));
  if (grad.numel() > 0) {
    const at::Tensor idx = time_index.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "temporal_gather_backward",
                                    [&] { scatter_frames<scalar_t>(grad, idx, acc); });
  }
  return acc_type == grad.scalar_type() ? acc : acc.to(grad.scalar_type());
}

at::Tensor swap_time_index_cpu(const at::Tensor& first, const at::Tensor& second, c10::SymInt num_frames,
                               int64_t chunks) {
  const int64_t T = num_frames.expect_int();
  const ChunkLayout c = check_swap_args(first, second, T, chunks);
  const int64_t B = first.size(0);
  at::Tensor out = at::empty({B, T}, first.options());
  const at::Tensor fi = first.contiguous(), se = second.contiguous();
  const int64_t* f = fi.const_data_ptr<int64_t>();
  const int64_t* g = se.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 4096 / T), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) o[b * T + t] = swapped_frame(t, f[b], g[b], T, c.size, c.n);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CPU, m) {
  m.impl("temporal_gather", &temporal_gather_cpu);
  m.impl("temporal_gather.out", &temporal_gather_out_cpu);
  m.impl("_temporal_gather_backward", &temporal_gather_backward_cpu);
  m.impl("swap_time_index", &swap_time_index_cpu);
}

}  // namespace iic_ext
