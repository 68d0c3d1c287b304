// iic_softmax_loss from the scores ops and ATen: the CPU op's route at many draws per bank row, and the
// check of the one-pass CPU kernel and of the CUDA kernel.
//
// _iic_softmax_loss_unfused(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t)
//   -> (loss_l [B], loss_ab [B], grad_l [B, D], grad_ab [B, D]), the contract of iic_softmax_loss:
//   logits = iic_scores(l, ab, ...) in the accumulation dtype (float32, float64 when l or the banks are),
//   loss = logsumexp(logits) - logits[:, 0] (cross-entropy, label 0), and
//   grad = _iic_scores_backward(softmax(logits) - onehot(0)), i.e. inv_t * (sum_j p_j row_j - row_0).
// The sampled rows are read twice (scores, then gradient), as the CUDA kernel of iic_softmax_loss
// does (nce.cu) with its own softmax kernel in between. The CPU op calls it when two GEMMs against the
// whole banks beat the one-pass kernel (csrc/cpu/nce.cpp); it runs on every device, so that the tests
// can check the one-pass CPU kernel and the CUDA kernel against it.
#include <torch/library.h>

#include "nce_checks.h"
#include "op_handles.h"

namespace iic_ext {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> iic_softmax_loss_unfused(
    const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l, const at::Tensor& bank_ab,
    const OptTensor& bank_neg, const at::Tensor& idx, double inv_t) {
  static auto scores = op_handle<IicScoresFn>("iic_ext::iic_scores");
  static auto backward = op_handle<IicBackwardFn>("iic_ext::_iic_scores_backward");
  check_iic_loss(l, ab, bank_l, bank_ab, bank_neg, idx);
  const IndicesAlreadyChecked checked;  // idx, above: the two ops below do not read it back again
  const auto acc = acc_type_of(l.scalar_type(), bank_l.scalar_type());
  auto [out_l, out_ab] = scores.call(l.to(acc), ab.to(acc), bank_l, bank_ab, bank_neg, idx, inv_t);
  // loss and d loss / d logits of one view: softmax - onehot(0)
  auto one = [](const at::Tensor& logits) {
    at::Tensor logp = at::log_softmax(logits, 1);
    at::Tensor loss = logp.select(1, 0).neg();
    at::Tensor coef = logp.exp_();
    coef.select(1, 0).sub_(1);
    return std::make_pair(loss, coef);
  };
  auto [loss_l, coef_l] = one(out_l);
  auto [loss_ab, coef_ab] = one(out_ab);
  auto [grad_l, grad_ab] = backward.call(coef_l, coef_ab, bank_l, bank_ab, bank_neg, idx, inv_t, acc);
  return {loss_l, loss_ab, grad_l, grad_ab};
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, CompositeExplicitAutograd, m) {
  m.impl("_iic_softmax_loss_unfused", &iic_softmax_loss_unfused);
}

}  // namespace iic_ext
