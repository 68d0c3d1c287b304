// Argument checks and dtype dispatch shared by the CPU and CUDA memory-bank (NCE) kernels: both
// backends reject the same inputs with the same messages.
#pragma once
#include <ATen/Dispatch.h>

#include <type_traits>

#include "common.h"

namespace iic_ext {

inline void check_matrix(const at::Tensor& x, const char* name, const char* shape) {
  TORCH_CHECK(x.dim() == 2, name, " must be ", shape, ", got shape ", x.sizes());
  check_float_dtype(x.scalar_type(), name);
}

inline void check_bank(const at::Tensor& bank, const char* name, int64_t D, const char* feat_name) {
  check_matrix(bank, name, "[N, D]");
  TORCH_CHECK(bank.size(1) == D, name, " rows have D = ", bank.size(1), " but ", feat_name, " has D = ", D);
}

inline void check_idx2(const at::Tensor& idx, int64_t B, int64_t N, const char* bank_name) {
  TORCH_CHECK(idx.dim() == 2, "idx must be [B, K], got shape ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.size(0) == B, "idx must have one row per feature: B = ", B, ", idx has ", idx.size(0), " rows");
  check_index(idx, N, "idx", bank_name);
}

inline at::ScalarType acc_type_of(at::ScalarType feat, at::ScalarType bank) {
  return (feat == at::kDouble || bank == at::kDouble) ? at::kDouble : at::kFloat;
}

// Dispatch on the bank dtype and the accumulation type (float32, or float64 when anything is float64).
template <typename F>
inline void dispatch_bank(at::ScalarType bank, at::ScalarType acc, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank, "nce_bank", [&] {
    using bank_t = scalar_t;
    if (acc == at::kDouble) {
      f(bank_t{}, double{});
    } else {
      if constexpr (!std::is_same_v<bank_t, double>) f(bank_t{}, float{});
    }
  });
}

// The arguments of bank_scores: feat [B, D], bank [N, D], idx [B, K] in [0, N).
inline void check_bank_scores(const at::Tensor& feat, const at::Tensor& bank, const at::Tensor& idx) {
  check_matrix(feat, "feat", "[B, D]");
  check_same_device(feat, "feat", bank, "bank");
  check_same_device(feat, "feat", idx, "idx");
  check_bank(bank, "bank", feat.size(1), "feat");
  check_idx2(idx, feat.size(0), bank.size(0), "rows of bank");
}

// The arguments of _bank_scores_backward: grad [B, K] like idx, bank [N, D], a floating dtype.
inline void check_bank_scores_backward(const at::Tensor& grad, const at::Tensor& bank, const at::Tensor& idx,
                                       at::ScalarType dtype) {
  check_matrix(grad, "grad", "[B, K]");
  check_float_dtype(dtype, "dtype");
  check_same_device(grad, "grad", bank, "bank");
  check_same_device(grad, "grad", idx, "idx");
  check_matrix(bank, "bank", "[N, D]");
  check_idx2(idx, grad.size(0), bank.size(0), "rows of bank");
  TORCH_CHECK(grad.size(1) == idx.size(1), "grad must be [B, K] like idx ", idx.sizes(), ", got ", grad.sizes());
}

// The arguments of bank_update_: bank [N, D], idx [B] in [0, N), feat [B, D].
inline void check_bank_update(const at::Tensor& bank, const at::Tensor& idx, const at::Tensor& feat) {
  check_matrix(bank, "bank", "[N, D]");
  check_matrix(feat, "feat", "[B, D]");
  check_same_device(bank, "bank", feat, "feat");
  check_same_device(bank, "bank", idx, "idx");
  TORCH_CHECK(feat.size(1) == bank.size(1), "feat has D = ", feat.size(1), " but bank rows have D = ", bank.size(1));
  TORCH_CHECK(idx.dim() == 1, "idx must be [B], got shape ", idx.sizes());
  TORCH_CHECK(idx.size(0) == feat.size(0), "idx must have one entry per row of feat: feat has B = ", feat.size(0),
              ", idx has ", idx.size(0));
  check_index(idx, bank.size(0), "idx", "rows of bank");
}

struct IicArgs {
  int64_t B, K1, D, N;
  bool neg;
};

inline IicArgs check_iic(const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l, const at::Tensor& bank_ab,
                  const std::optional<at::Tensor>& bank_neg, const at::Tensor& idx) {
  check_matrix(l, "l", "[B, D]");
  check_matrix(ab, "ab", "[B, D]");
  TORCH_CHECK(l.sizes() == ab.sizes(), "l and ab must have the same shape, got ", l.sizes(), " and ", ab.sizes());
  TORCH_CHECK(l.scalar_type() == ab.scalar_type(), "l and ab must have the same dtype, got ", l.scalar_type(),
              " and ", ab.scalar_type());
  const int64_t D = l.size(1);
  check_same_device(l, "l", ab, "ab");
  check_same_device(l, "l", bank_l, "bank_l");
  check_same_device(l, "l", bank_ab, "bank_ab");
  check_same_device(l, "l", idx, "idx");
  check_bank(bank_l, "bank_l", D, "l");
  check_bank(bank_ab, "bank_ab", D, "l");
  TORCH_CHECK(bank_l.sizes() == bank_ab.sizes(), "bank_l and bank_ab must have the same shape, got ", bank_l.sizes(),
              " and ", bank_ab.sizes());
  TORCH_CHECK(bank_l.scalar_type() == bank_ab.scalar_type(), "bank_l and bank_ab must have the same dtype, got ",
              bank_l.scalar_type(), " and ", bank_ab.scalar_type());
  if (bank_neg.has_value()) {
    check_same_device(l, "l", *bank_neg, "bank_neg");
    check_bank(*bank_neg, "bank_neg", D, "l");
    TORCH_CHECK(bank_neg->sizes() == bank_l.sizes(), "bank_neg must have bank_l's shape ", bank_l.sizes(), ", got ",
                bank_neg->sizes());
    TORCH_CHECK(bank_neg->scalar_type() == bank_l.scalar_type(), "bank_neg must have bank_l's dtype ",
                bank_l.scalar_type(), ", got ", bank_neg->scalar_type());
  }
  check_idx2(idx, l.size(0), bank_l.size(0), "rows of the banks");
  return {l.size(0), idx.size(1), D, bank_l.size(0), bank_neg.has_value()};
}

// The arguments of iic_softmax_loss: those of iic_scores, and the positive's column.
inline IicArgs check_iic_loss(const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l,
                              const at::Tensor& bank_ab, const std::optional<at::Tensor>& bank_neg,
                              const at::Tensor& idx) {
  const IicArgs a = check_iic(l, ab, bank_l, bank_ab, bank_neg, idx);
  TORCH_CHECK(a.K1 >= 1, "idx must have at least one column (column 0 is the positive), got shape ", idx.sizes());
  return a;
}

// The arguments of _iic_scores_backward: gradients [B, C] with C = 2 (K+1) with bank_neg, else K+1.
inline IicArgs check_iic_backward(const at::Tensor& grad_l, const at::Tensor& grad_ab, const at::Tensor& bank_l,
                                  const at::Tensor& bank_ab, const std::optional<at::Tensor>& bank_neg,
                                  const at::Tensor& idx, at::ScalarType dtype) {
  check_float_dtype(dtype, "dtype");
  check_matrix(grad_l, "grad_l", "[B, C]");
  check_matrix(grad_ab, "grad_ab", "[B, C]");
  TORCH_CHECK(grad_l.sizes() == grad_ab.sizes(), "grad_l and grad_ab must have the same shape, got ",
              grad_l.sizes(), " and ", grad_ab.sizes());
  check_same_device(grad_l, "grad_l", grad_ab, "grad_ab");
  check_same_device(grad_l, "grad_l", bank_l, "bank_l");
  check_same_device(grad_l, "grad_l", bank_ab, "bank_ab");
  check_same_device(grad_l, "grad_l", idx, "idx");
  check_matrix(bank_l, "bank_l", "[N, D]");
  check_bank(bank_ab, "bank_ab", bank_l.size(1), "bank_l");
  TORCH_CHECK(bank_l.sizes() == bank_ab.sizes() && bank_l.scalar_type() == bank_ab.scalar_type(),
              "bank_l and bank_ab must have the same shape and dtype");
  if (bank_neg.has_value()) {
    check_same_device(grad_l, "grad_l", *bank_neg, "bank_neg");
    TORCH_CHECK(bank_neg->sizes() == bank_l.sizes() && bank_neg->scalar_type() == bank_l.scalar_type(),
                "bank_neg must have bank_l's shape and dtype");
  }
  check_idx2(idx, grad_l.size(0), bank_l.size(0), "rows of the banks");
  const int64_t B = grad_l.size(0), K1 = idx.size(1), D = bank_l.size(1);
  const int64_t C = bank_neg.has_value() ? 2 * K1 : K1;
  TORCH_CHECK(grad_l.size(1) == C, "grad_l must be [B, ", C, "] for idx ", idx.sizes(),
              bank_neg.has_value() ? " with bank_neg" : " without bank_neg", ", got ", grad_l.sizes());
  return {B, K1, D, bank_l.size(0), bank_neg.has_value()};
}

}  // namespace iic_ext
