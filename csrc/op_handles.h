// Typed handles of iic_ext ops for C++ code that calls them through the dispatcher (the autograd
// kernels, the unfused loss), with the signatures their schemas in ops.cpp give them.
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace iic_ext {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using OptTensor = std::optional<at::Tensor>;

// iic_scores(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t) -> (out_l, out_ab)
using IicScoresFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const OptTensor&, const at::Tensor&, double);
// _iic_scores_backward(grad_l, grad_ab, bank_l, bank_ab, bank_neg, idx, inv_t, dtype) -> (grad l, grad ab)
using IicBackwardFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                        const at::Tensor&, const OptTensor&, const at::Tensor&, double,
                                                        at::ScalarType);
// iic_softmax_loss(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t) -> (loss_l, loss_ab, grad_l, grad_ab), and
// _iic_softmax_loss_unfused with the same arguments
using LossFn = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                          const at::Tensor&, const at::Tensor&,
                                                                          const OptTensor&, const at::Tensor&, double);

}  // namespace iic_ext
