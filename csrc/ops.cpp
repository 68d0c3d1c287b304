// The schema of every iic_ext operator, in one place. Backends register kernels in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*.cu (CUDA); autograd is registered in C++ (csrc/autograd.cpp),
// fake (meta) kernels from Python next to the wrappers (iic_ext/ops/views.py, iic_ext/ops/nce.py).
// Ops are reached as torch.ops.iic_ext.<name>.
#include <Python.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/simd.h"

extern "C" {
// Importing iic_ext._C loads this library, which runs the registrations below; the module itself
// is empty because operators are reached through torch.ops, not Python bindings.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(iic_ext, m) {
  // ---- views and intra-negatives -------------------------------------------------------------
  // clip [B, C, T, H, W] (any strides; uint8 read as x/255, or float) -> [B, C, T, H, W]
  // ((x - roll(x, 1, T)) + 1) / 2 when scaled, else x - roll(x, 1, T)
  m.def("residual_frames(Tensor clip, bool scaled=True, ScalarType? out_dtype=None) -> Tensor");
  // same, written into out [B, C, T, H, W] (floating, any strides)
  m.def("residual_frames.out(Tensor clip, bool scaled=True, *, Tensor(a!) out) -> ()");
  // grad [B, C, T, H, W] -> grad_clip [B, C, T, H, W]: s * (g - roll(g, -1, T)), s = 1/2 or 1
  m.def("_residual_frames_backward(Tensor grad, bool scaled) -> Tensor");
  // clip [B, C, T, H, W], time_index [B, T_out] int64 in [0, T) -> [B, C, T_out, H, W]
  m.def("temporal_gather(Tensor clip, Tensor time_index) -> Tensor");
  // same, written into out [B, C, T_out, H, W] (clip's dtype, any strides)
  m.def("temporal_gather.out(Tensor clip, Tensor time_index, *, Tensor(a!) out) -> ()");
  // grad [B, C, T_out, H, W], time_index [B, T_out] -> grad_clip [B, C, T, H, W] (scatter-add over time)
  m.def("_temporal_gather_backward(Tensor grad, Tensor time_index, SymInt num_frames) -> Tensor");
  // first, second [B] int64 in [0, n) -> time_index [B, num_frames] int64: the time axis cut as
  // torch.chunk(x, chunks) cuts it (n pieces), the pieces in order with those at first[b] and second[b]
  // exchanged (the original shuffle negative's frame order when first != second)
  m.def("swap_time_index(Tensor first, Tensor second, SymInt num_frames, int chunks=4) -> Tensor");
  // clip [B, C, T, H, W] (uint8 or float, any strides), time_index [B, T_out] ->
  // (rgb [B, C, T, H, W], residual [B, C, T, H, W], negative [B, C, T_out, H, W]), contiguous.
  // rgb = (x/255 - mean) / std; residual from x/255 as residual_frames; negative = rgb gathered in time.
  m.def("iic_views(Tensor clip, Tensor time_index, float[]? mean=None, float[]? std=None, bool scaled=True, ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor)");
  // same, written into rgb, residual [B, C, T, H, W] and negative [B, C, T_out, H, W] (contiguous, one
  // floating dtype, which is the output dtype)
  m.def("iic_views.out(Tensor clip, Tensor time_index, float[]? mean=None, float[]? std=None, bool scaled=True, *, Tensor(a!) rgb, Tensor(b!) residual, Tensor(c!) negative) -> ()");

  // ---- memory bank (NCE) ---------------------------------------------------------------------
  // feat [B, D], bank [N, D], idx [B, K] int64 in [0, N) -> scores [B, K] = <bank[idx[b, k]], feat[b]>
  m.def("bank_scores(Tensor feat, Tensor bank, Tensor idx) -> Tensor");
  // grad [B, K], bank [N, D], idx [B, K] -> grad_feat [B, D] = sum_k grad[b, k] * bank[idx[b, k]]
  m.def("_bank_scores_backward(Tensor grad, Tensor bank, Tensor idx, ScalarType dtype) -> Tensor");
  // l, ab [B, D]; bank_l, bank_ab [N, D]; bank_neg [N, D] or None; idx [B, K+1] ->
  // out_l = [bank_ab[idx] | bank_neg[idx]] . l * inv_t, out_ab = [bank_l[idx] | bank_neg[idx]] . ab * inv_t,
  // each [B, 2(K+1)] ([B, K+1] without bank_neg)
  m.def("iic_scores(Tensor l, Tensor ab, Tensor bank_l, Tensor bank_ab, Tensor? bank_neg, Tensor idx, float inv_t=1.0) -> (Tensor, Tensor)");
  // grad_l, grad_ab [B, 2(K+1)] or [B, K+1] -> (grad l [B, D], grad ab [B, D])
  m.def("_iic_scores_backward(Tensor grad_l, Tensor grad_ab, Tensor bank_l, Tensor bank_ab, Tensor? bank_neg, Tensor idx, float inv_t, ScalarType dtype) -> (Tensor, Tensor)");
  // the softmax cross-entropy (label 0) of iic_scores' logits, in one pass over the sampled rows:
  // (loss_l [B], loss_ab [B], grad_l [B, D], grad_ab [B, D]), grad_* = d loss_* / d (l or ab) per sample,
  // all in the accumulation dtype (float32, float64 when l or the banks are float64)
  m.def("iic_softmax_loss(Tensor l, Tensor ab, Tensor bank_l, Tensor bank_ab, Tensor? bank_neg, Tensor idx, float inv_t=1.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // the same from iic_scores, log_softmax and _iic_scores_backward (any device; the CUDA kernel of
  // iic_softmax_loss, and on the CPU a check of the one-pass kernel)
  m.def("_iic_softmax_loss_unfused(Tensor l, Tensor ab, Tensor bank_l, Tensor bank_ab, Tensor? bank_neg, Tensor idx, float inv_t=1.0) -> (Tensor, Tensor, Tensor, Tensor)");
  // bank [N, D] in place: bank[y] = normalize(m * bank[y] + (1 - m) * feat[b]) for y = idx[b];
  // with repeated y in idx the last occurrence wins (as index_copy_ on CPU), deterministically.
  m.def("bank_update_(Tensor(a!) bank, Tensor idx, Tensor feat, float momentum) -> ()");

  // ---- settings ------------------------------------------------------------------------------
  // range checks of index arguments on GPUs (each synchronises the device) on or off; returns the
  // previous setting. CPU indices are always checked.
  m.def("_set_gpu_index_checks(bool enabled) -> bool",
        [](bool enabled) { return iic_ext::gpu_index_checks().exchange(enabled); });
  // whether this thread holds a row grouping that a CPU NCE forward kept for its backward
  m.def("_nce_holds_grouping() -> bool", [] { return iic_ext::nce_cpu_holds_grouping(); });
  // the instruction set the CPU kernels use: "avx512", "avx2" or "base" (capped by IIC_EXT_CPU_ISA)
  m.def("_cpu_isa() -> str", [] { return std::string(iic_ext::isa_name(iic_ext::cpu_isa())); });
}
