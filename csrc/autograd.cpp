// Autograd of the differentiable iic_ext ops, for every backend (the Autograd dispatch key).
//
// Written in C++ so that a call costs no Python: on a GPU these ops run in microseconds and a Python
// autograd formula would take longer than the kernel. Each forward calls the op below autograd (the
// CPU or CUDA kernel, or the fake kernel under torch.compile) and records a node whose backward calls
// the op's backward kernel. The banks and indices are constants (no gradient), as in the original.
//
//   residual_frames(clip, scaled, out_dtype)  grad_clip = _residual_frames_backward(grad, scaled), in clip's dtype
//   temporal_gather(clip, time_index)          grad_clip = _temporal_gather_backward(grad, time_index, T)
//   bank_scores(feat, bank, idx)               grad_feat = _bank_scores_backward(grad, bank, idx, feat.dtype)
//   iic_scores(l, ab, banks, idx, inv_t)       (grad_l, grad_ab) = _iic_scores_backward(...)
//   iic_softmax_loss(l, ab, banks, idx, inv_t) grad = saved d loss / d feature (an output of the forward)
//                                              times the incoming per-sample gradient
#include <torch/autograd.h>
#include <torch/library.h>

#include "common.h"
#include "op_handles.h"

namespace iic_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::ScalarType saved_dtype(AutogradContext* ctx, const char* key) {
  return static_cast<at::ScalarType>(ctx->saved_data[key].toInt());
}

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// ---- views ---------------------------------------------------------------------------------------

class ResidualFrames : public torch::autograd::Function<ResidualFrames> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& clip, bool scaled,
                            std::optional<at::ScalarType> out_dtype) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd =
        op_handle<at::Tensor(const at::Tensor&, bool, std::optional<at::ScalarType>)>("iic_ext::residual_frames");
    ctx->saved_data["scaled"] = scaled;
    ctx->saved_data["dtype"] = static_cast<int64_t>(clip.scalar_type());
    return fwd.call(clip, scaled, out_dtype);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op_handle<at::Tensor(const at::Tensor&, bool)>("iic_ext::_residual_frames_backward");
    at::Tensor g = bwd.call(grads[0], ctx->saved_data["scaled"].toBool()).to(saved_dtype(ctx, "dtype"));
    return {g, at::Tensor(), at::Tensor()};
  }
};

at::Tensor residual_frames_autograd(const at::Tensor& clip, bool scaled, std::optional<at::ScalarType> out_dtype) {
  return ResidualFrames::apply(clip, scaled, out_dtype);
}

class TemporalGather : public torch::autograd::Function<TemporalGather> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& clip, const at::Tensor& time_index) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&)>("iic_ext::temporal_gather");
    ctx->save_for_backward({time_index});
    ctx->saved_data["frames"] = clip.sym_size(2);
    return fwd.call(clip, time_index);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt)>("iic_ext::_temporal_gather_backward");
    const auto saved = ctx->get_saved_variables();
    const IndicesAlreadyChecked checked;  // by the forward
    return {bwd.call(grads[0], saved[0], ctx->saved_data["frames"].toSymInt()), at::Tensor()};
  }
};

at::Tensor temporal_gather_autograd(const at::Tensor& clip, const at::Tensor& time_index) {
  return TemporalGather::apply(clip, time_index);
}

// ---- memory bank -----------------------------------------------------------------------------------

// Marks, for the length of an NCE forward, whether its backward may follow (nce_backward_expected).
class ExpectBackward {
 public:
  explicit ExpectBackward(bool expected) : saved_(nce_backward_expected()) { nce_backward_expected() = expected; }
  ~ExpectBackward() { nce_backward_expected() = saved_; }

 private:
  bool saved_;
};

bool grad_follows(const at::Tensor& a, const at::Tensor& b = at::Tensor()) {
  return at::GradMode::is_enabled() && (a.requires_grad() || (b.defined() && b.requires_grad()));
}

class BankScores : public torch::autograd::Function<BankScores> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& feat, const at::Tensor& bank,
                            const at::Tensor& idx) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd =
        op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>("iic_ext::bank_scores");
    ctx->save_for_backward({bank, idx});
    ctx->saved_data["dtype"] = static_cast<int64_t>(feat.scalar_type());
    return fwd.call(feat, bank, idx);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op_handle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType)>(
        "iic_ext::_bank_scores_backward");
    const auto saved = ctx->get_saved_variables();
    const IndicesAlreadyChecked checked;  // by the forward
    at::Tensor g;
    if (ctx->needs_input_grad(0)) g = bwd.call(grads[0], saved[0], saved[1], saved_dtype(ctx, "dtype"));
    return {g, at::Tensor(), at::Tensor()};
  }
};

at::Tensor bank_scores_autograd(const at::Tensor& feat, const at::Tensor& bank, const at::Tensor& idx) {
  const ExpectBackward expect(grad_follows(feat));
  return BankScores::apply(feat, bank, idx);
}

class IicScores : public torch::autograd::Function<IicScores> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& l, const at::Tensor& ab,
                               const at::Tensor& bank_l, const at::Tensor& bank_ab, const OptTensor& bank_neg,
                               const at::Tensor& idx, double inv_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op_handle<IicScoresFn>("iic_ext::iic_scores");
    ctx->save_for_backward({bank_l, bank_ab, bank_neg.value_or(at::Tensor()), idx});
    ctx->saved_data["inv_t"] = inv_t;
    ctx->saved_data["dtype"] = static_cast<int64_t>(l.scalar_type());
    auto [out_l, out_ab] = fwd.call(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t);
    return {out_l, out_ab};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto bwd = op_handle<IicBackwardFn>("iic_ext::_iic_scores_backward");
    if (!ctx->needs_input_grad(0) && !ctx->needs_input_grad(1)) return variable_list(7);
    const auto s = ctx->get_saved_variables();
    const IndicesAlreadyChecked checked;  // by the forward
    auto [gl, gab] = bwd.call(grads[0], grads[1], s[0], s[1], optional_of(s[2]), s[3],
                              ctx->saved_data["inv_t"].toDouble(), saved_dtype(ctx, "dtype"));
    variable_list out(7);
    if (ctx->needs_input_grad(0)) out[0] = gl;
    if (ctx->needs_input_grad(1)) out[1] = gab;
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> iic_scores_autograd(const at::Tensor& l, const at::Tensor& ab,
                                                       const at::Tensor& bank_l, const at::Tensor& bank_ab,
                                                       const OptTensor& bank_neg, const at::Tensor& idx, double inv_t) {
  const ExpectBackward expect(grad_follows(l, ab));
  auto out = IicScores::apply(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t);
  return {out[0], out[1]};
}

class IicSoftmaxLoss : public torch::autograd::Function<IicSoftmaxLoss> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& l, const at::Tensor& ab,
                               const at::Tensor& bank_l, const at::Tensor& bank_ab, const OptTensor& bank_neg,
                               const at::Tensor& idx, double inv_t) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto fwd = op_handle<LossFn>("iic_ext::iic_softmax_loss");
    auto [loss_l, loss_ab, grad_l, grad_ab] = fwd.call(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t);
    // the per-sample gradients are results, not functions of the inputs to differentiate through
    ctx->mark_non_differentiable({grad_l, grad_ab});
    ctx->save_for_backward({grad_l, grad_ab});
    ctx->saved_data["dtype"] = static_cast<int64_t>(l.scalar_type());  // ab's too: the op requires it
    return {loss_l, loss_ab, grad_l, grad_ab};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::ScalarType dtype = saved_dtype(ctx, "dtype");
    variable_list out(7);
    if (ctx->needs_input_grad(0)) out[0] = s[0].mul(grads[0].unsqueeze(1)).to(dtype);
    if (ctx->needs_input_grad(1)) out[1] = s[1].mul(grads[1].unsqueeze(1)).to(dtype);
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> iic_softmax_loss_autograd(
    const at::Tensor& l, const at::Tensor& ab, const at::Tensor& bank_l, const at::Tensor& bank_ab,
    const OptTensor& bank_neg, const at::Tensor& idx, double inv_t) {
  auto out = IicSoftmaxLoss::apply(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(iic_ext, Autograd, m) {
  m.impl("residual_frames", &residual_frames_autograd);
  m.impl("temporal_gather", &temporal_gather_autograd);
  m.impl("bank_scores", &bank_scores_autograd);
  m.impl("iic_scores", &iic_scores_autograd);
  m.impl("iic_softmax_loss", &iic_softmax_loss_autograd);
}

}  // namespace iic_ext
