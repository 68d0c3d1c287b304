// Argument checks shared by the CPU and CUDA kernels (each error names the argument at fault), and the
// entry points of iic_views around a backend's writer.
#pragma once
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

namespace iic_ext {

inline void check_clip(const at::Tensor& clip, const char* name = "clip") {
  TORCH_CHECK(clip.dim() == 5, name, " must be [B, C, T, H, W], got shape ", clip.sizes());
  TORCH_CHECK(clip.size(2) >= 1, name, " must have at least one frame (T >= 1), got shape ", clip.sizes());
  const auto dt = clip.scalar_type();
  TORCH_CHECK(dt == at::kByte || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble,
              name, " must be uint8, float16, bfloat16, float32 or float64, got ", dt);
}

inline void check_float_dtype(at::ScalarType dt, const char* name) {
  TORCH_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat || dt == at::kDouble, name,
              " must be float16, bfloat16, float32 or float64, got ", dt);
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

// Whether index arguments on a GPU are range-checked (the default). The check is one reduction whose
// result the host must read, i.e. a device synchronisation per call; callers whose indices are valid
// by construction (the trainer draws them itself) may switch it off around their hot loop
// (iic_ext.ops.unchecked_indices). CPU indices are always checked: there it costs no synchronisation.
inline std::atomic<bool>& gpu_index_checks() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// Whether the NCE forward running on this thread may be followed by its backward: set by the Autograd
// kernels for the length of the forward, when grad mode is on and a feature requires grad. Only then
// does the CPU forward keep its row grouping for the backward, so inference holds none.
inline bool& nce_backward_expected() {
  static thread_local bool expected = false;
  return expected;
}

// Whether this thread holds a row grouping kept by a CPU NCE forward for its backward (nce.cpp).
bool nce_cpu_holds_grouping();

// Whether the index tensors of the op calls made on this thread were range-checked already: set by
// IndicesAlreadyChecked. Their values are not checked again then (on a GPU each check synchronises).
inline bool& indices_already_checked() {
  static thread_local bool checked = false;
  return checked;
}

// For its lifetime, op calls on this thread skip the value check of their index tensors. Used around
// - a backward kernel called by an Autograd kernel: its indices are the ones the forward checked (or was
//   told not to, inside unchecked_indices), and autograd's check of saved tensors' versions guarantees
//   they were not changed in place since;
// - the ops a composite op calls after checking the same indices itself.
class IndicesAlreadyChecked {
 public:
  IndicesAlreadyChecked() : saved_(indices_already_checked()) { indices_already_checked() = true; }
  ~IndicesAlreadyChecked() { indices_already_checked() = saved_; }
  IndicesAlreadyChecked(const IndicesAlreadyChecked&) = delete;
  IndicesAlreadyChecked& operator=(const IndicesAlreadyChecked&) = delete;

 private:
  bool saved_;
};

// Values of int64 index tensors (on one device) must lie in [0, upper); the first tensor with a value
// outside is named. One reduction each; on a GPU the extremes of all of them come back in one copy, so
// the check synchronises once, the price of never reading out of bounds.
inline void check_indices(std::initializer_list<std::pair<const at::Tensor*, const char*>> named, int64_t upper,
                          const char* what) {
  const bool gpu = gpu_index_checks().load(std::memory_order_relaxed);
  std::vector<at::Tensor> extremes;
  std::vector<const char*> names;
  for (const auto& [idx, name] : named) {
    TORCH_CHECK(idx->scalar_type() == at::kLong, name, " must be int64, got ", idx->scalar_type());
    if (idx->numel() == 0 || (!idx->is_cpu() && !gpu) || indices_already_checked()) continue;
    auto mm = at::aminmax(*idx);
    extremes.push_back(std::get<0>(mm));
    extremes.push_back(std::get<1>(mm));
    names.push_back(name);
  }
  if (extremes.empty()) return;
  const at::Tensor all = at::stack(extremes).cpu();  // one copy to the host
  const int64_t* v = all.const_data_ptr<int64_t>();
  for (const char* name : names) {
    const int64_t lo = *v++, hi = *v++;
    TORCH_CHECK(lo >= 0, name, " has a negative entry (", lo, "); entries must lie in [0, ", upper, ") (", what, ")");
    TORCH_CHECK(hi < upper, name, " has an entry out of range (", hi, "); entries must lie in [0, ", upper, ") (",
                what, ")");
  }
}

inline void check_index(const at::Tensor& idx, int64_t upper, const char* name, const char* what) {
  check_indices({{&idx, name}}, upper, what);
}

// Sizes of clip's frames gathered by time_index [B, T_out]: [B, C, T_out, H, W].
inline std::vector<int64_t> gathered_sizes(const at::Tensor& clip, const at::Tensor& time_index) {
  auto sizes = clip.sizes().vec();
  sizes[2] = time_index.size(1);
  return sizes;
}

inline void check_time_index(const at::Tensor& clip, const at::Tensor& time_index) {
  check_same_device(clip, "clip", time_index, "time_index");
  TORCH_CHECK(time_index.dim() == 2, "time_index must be [B, T_out], got shape ", time_index.sizes());
  TORCH_CHECK(time_index.size(0) == clip.size(0), "time_index must have one row per clip: clip has B = ",
              clip.size(0), ", time_index has ", time_index.size(0), " rows");
  check_index(time_index, clip.size(2), "time_index", "frame positions of clip");
}

// How torch.chunk(x, chunks, dim) cuts a dim of T entries: n pieces of size entries, the last one
// shorter (n < chunks when T is small, e.g. T = 5 gives 2, 2, 1).
struct ChunkLayout {
  int64_t size, n;
};
inline ChunkLayout chunk_layout(int64_t T, int64_t chunks) {
  const int64_t size = (T + chunks - 1) / chunks;
  return {size, (T + size - 1) / size};
}

// Arguments of swap_time_index: first, second [B] int64 piece positions in [0, n) on one device.
inline ChunkLayout check_swap_args(const at::Tensor& first, const at::Tensor& second, int64_t num_frames,
                                   int64_t chunks) {
  TORCH_CHECK(num_frames >= 1, "num_frames must be at least 1, got ", num_frames);
  TORCH_CHECK(chunks >= 1, "chunks must be at least 1, got ", chunks);
  TORCH_CHECK(first.dim() == 1, "first must be [B], got shape ", first.sizes());
  TORCH_CHECK(second.dim() == 1 && second.size(0) == first.size(0), "second must be [B] like first (B = ",
              first.size(0), "), got shape ", second.sizes());
  check_same_device(first, "first", second, "second");
  const ChunkLayout c = chunk_layout(num_frames, chunks);
  check_indices({{&first, "first"}, {&second, "second"}}, c.n, "positions of the time chunks");
  return c;
}

// Source frame of output frame t (< T) of swap_time_index: the pieces of the time axis in order, the
// pieces at positions i and j exchanged.
C10_HOST_DEVICE inline int64_t swapped_frame(int64_t t, int64_t i, int64_t j, int64_t T, int64_t size, int64_t n) {
  int64_t start = 0;  // where the piece placed at position p starts in the output
  for (int64_t p = 0; p < n; ++p) {
    const int64_t s = p == i ? j : (p == j ? i : p);
    const int64_t len = T - s * size < size ? T - s * size : size;
    if (t < start + len) return s * size + (t - start);
    start += len;
  }
  return t;
}

// Output dtype of a view op: explicit, else the input's float type, else float32 for uint8.
inline at::ScalarType view_out_dtype(const at::Tensor& clip, std::optional<at::ScalarType> out_dtype) {
  if (out_dtype.has_value()) {
    check_float_dtype(*out_dtype, "out_dtype");
    return *out_dtype;
  }
  return clip.scalar_type() == at::kByte ? at::kFloat : clip.scalar_type();
}

// Per-channel normalisation of the IIC views: m[c] = mean[c] (0 without mean), is[c] = 1 / std[c]
// (1 without std), for c < C; one value per channel, std positive.
inline void view_normalisation(int64_t C, std::optional<at::ArrayRef<double>> mean,
                               std::optional<at::ArrayRef<double>> std, double* m, double* is) {
  for (int64_t c = 0; c < C; ++c) m[c] = 0.0, is[c] = 1.0;
  if (mean.has_value()) {
    TORCH_CHECK(static_cast<int64_t>(mean->size()) == C, "mean must have one value per channel (C = ", C, "), got ",
                mean->size());
    for (int64_t c = 0; c < C; ++c) m[c] = (*mean)[c];
  }
  if (std.has_value()) {
    TORCH_CHECK(static_cast<int64_t>(std->size()) == C, "std must have one value per channel (C = ", C, "), got ",
                std->size());
    for (int64_t c = 0; c < C; ++c) {
      TORCH_CHECK((*std)[c] > 0, "std must be positive, got ", (*std)[c], " for channel ", c);
      is[c] = 1.0 / (*std)[c];
    }
  }
}

// An out= buffer of residual_frames: clip's shape, floating, same device, not overlapping clip.
inline void check_residual_out(const at::Tensor& clip, const at::Tensor& out) {
  check_float_dtype(out.scalar_type(), "out");
  check_same_device(clip, "clip", out, "out");
  TORCH_CHECK(out.sizes() == clip.sizes(), "out must have the shape of clip ", clip.sizes(), ", got ", out.sizes());
  TORCH_CHECK(!out.is_same(clip), "out must not be clip: residual_frames cannot run in place");
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, clip);
}

// An out= buffer of temporal_gather: [B, C, T_out, H, W] of clip's dtype, not overlapping clip.
inline void check_gather_out(const at::Tensor& clip, const at::Tensor& time_index, const at::Tensor& out) {
  check_same_device(clip, "clip", out, "out");
  TORCH_CHECK(out.scalar_type() == clip.scalar_type(), "out must have clip's dtype ", clip.scalar_type(), ", got ",
              out.scalar_type());
  const auto want = gathered_sizes(clip, time_index);
  TORCH_CHECK(out.sizes() == c10::IntArrayRef(want), "out must be [B, C, T_out, H, W] = ", c10::IntArrayRef(want),
              ", got ", out.sizes());
  TORCH_CHECK(!out.is_same(clip), "out must not be clip: temporal_gather cannot run in place");
  at::assert_no_internal_overlap(out);
  at::assert_no_overlap(out, clip);
}

// out= buffers of iic_views: rgb and residual of clip's shape, negative [B, C, T_out, H, W], all
// contiguous (the layout the kernels write), of one floating dtype, on clip's device, overlapping neither
// clip nor each other.
inline void check_views_out(const at::Tensor& clip, const at::Tensor& time_index, const at::Tensor& rgb,
                            const at::Tensor& res, const at::Tensor& neg) {
  const at::Tensor* outs[3] = {&rgb, &res, &neg};
  const char* names[3] = {"rgb", "residual", "negative"};
  const auto neg_sizes = gathered_sizes(clip, time_index);
  for (int i = 0; i < 3; ++i) {
    const at::Tensor& o = *outs[i];
    check_float_dtype(o.scalar_type(), names[i]);
    TORCH_CHECK(o.scalar_type() == rgb.scalar_type(), names[i], " must have rgb's dtype ", rgb.scalar_type(),
                ", got ", o.scalar_type());
    check_same_device(clip, "clip", o, names[i]);
    const at::IntArrayRef want = i < 2 ? clip.sizes() : at::IntArrayRef(neg_sizes);
    TORCH_CHECK(o.sizes() == want, names[i], " must have shape ", want, ", got ", o.sizes());
    TORCH_CHECK(o.is_contiguous(), names[i], " must be contiguous (iic_views writes the contiguous layout)");
    at::assert_no_overlap(o, clip);
    for (int k = 0; k < i; ++k) at::assert_no_overlap(o, *outs[k]);
  }
}

// A backend's writer of the IIC views: into(clip, time_index, mean, std, scaled, rgb, residual, negative)
// fills the three buffers, which the entry points below have checked or allocated.
using ViewsInto = void (*)(const at::Tensor&, const at::Tensor&, std::optional<at::ArrayRef<double>>,
                           std::optional<at::ArrayRef<double>>, bool, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&);

// iic_views for one backend: its three outputs allocated contiguous, of the view dtype.
template <ViewsInto into>
std::tuple<at::Tensor, at::Tensor, at::Tensor> iic_views_entry(const at::Tensor& clip, const at::Tensor& time_index,
                                                             std::optional<at::ArrayRef<double>> mean,
                                                             std::optional<at::ArrayRef<double>> std, bool scaled,
                                                             std::optional<at::ScalarType> out_dtype) {
  check_clip(clip);
  check_time_index(clip, time_index);
  const auto opts = clip.options().dtype(view_out_dtype(clip, out_dtype)).memory_format(at::MemoryFormat::Contiguous);
  at::Tensor rgb = at::empty(clip.sizes(), opts), res = at::empty(clip.sizes(), opts),
             neg = at::empty(gathered_sizes(clip, time_index), opts);
  into(clip, time_index, mean, std, scaled, rgb, res, neg);
  return {rgb, res, neg};
}

// iic_views.out for one backend.
template <ViewsInto into>
void iic_views_out_entry(const at::Tensor& clip, const at::Tensor& time_index, std::optional<at::ArrayRef<double>> mean,
                         std::optional<at::ArrayRef<double>> std, bool scaled, at::Tensor& rgb, at::Tensor& residual,
                         at::Tensor& negative) {
  check_clip(clip);
  check_time_index(clip, time_index);
  check_views_out(clip, time_index, rgb, residual, negative);
  into(clip, time_index, mean, std, scaled, rgb, residual, negative);
}

}  // namespace iic_ext
