"""Group ``nce``: the memory-bank contrast, forward + backward + update, fused against pure PyTorch.

One measured call is what a training step does with the banks: the IIC logits of both views against
``K + 1`` sampled rows of three banks (``iic_scores``), softmax cross-entropy with label 0 on each,
the gradient of that loss with respect to the two features, and the momentum update of the three
banks' positive rows (``bank_update_``). The arms differ only in the score and update functions:

* fused: ``iic_ext.ops.iic_scores`` / ``iic_ext.ops.bank_update_``;
* original: ``reference.iic_scores`` (``index_select`` + ``cat`` + ``bmm``, as the original
  ``NCEAverage``) / ``reference.bank_update_``;
* dense: ``reference.iic_scores_dense`` (one GEMM against each whole bank, then a gather) /
  ``reference.bank_update_``.

A second set of rows times the same step with the loss fused into the scores: ``iic_softmax_loss``
(one pass over the sampled rows gives the loss and its gradient) against the cross-entropy of the
original-style and of the dense logits (``reference.iic_softmax_loss`` / ``iic_softmax_loss_dense``).
Each call returns the same two gradients and leaves the same banks as the rows above.

Every arm's banks are allocated as ``NCEAverage`` allocates its own (``iic_ext.ops.empty_bank``: on
Linux, transparent huge pages for CPU banks of 32 MiB and more), so all arms read the same memory.

Floor: a kernel must read at least the sampled rows of the three banks once, or each whole bank once
when that is smaller, so ``floor = min(3 B (K + 1) D, 3 N D) * itemsize / bandwidth``.
"""
import functools
from typing import List

import torch
import torch.nn.functional as F

from iic_ext import ops
from iic_ext.ops import reference

from .harness import Config, compare

# (B, K, D, N); the last one is ImageNet-sized and runs in the full run only
CONFIGS = [(16, 1024, 512, 9537), (16, 4096, 128, 9537), (32, 16384, 128, 100_000), (32, 16384, 128, 1_281_167)]
TEMPERATURE = 0.07
MOMENTUM = 0.5


def _bank_like(bank):
    """A copy of ``bank`` in memory allocated as ``NCEAverage`` allocates its banks (``ops.empty_bank``)."""
    return ops.empty_bank(*bank.shape, dtype=bank.dtype, device=bank.device).copy_(bank)


def _banks(N, D, device, g):
    stdv = 1.0 / (D / 3) ** 0.5  # the original initialisation, rows then normalised as after updates
    banks = [torch.rand(N, D, generator=g).mul_(2 * stdv).add_(-stdv) for _ in range(3)]
    return [_bank_like(F.normalize(b, dim=1).to(device)) for b in banks]


def step_inputs(B, K, D, N, device):
    """The inputs of one measured step at (B, K, D, N), the same on every call: features l, ab (needing
    grad) and neg [B, D], the three banks [N, D], idx [B, K + 1] with column 0 = y, y [B]."""
    g = torch.Generator().manual_seed(0)
    banks = _banks(N, D, device, g)
    # features as the backbone gives them: post-ReLU, not normalised
    l = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    ab = F.relu(torch.randn(B, D, generator=g)).to(device).requires_grad_()
    neg = F.relu(torch.randn(B, D, generator=g)).to(device)
    y = torch.randperm(N, generator=g)[:B].to(device)
    idx = torch.randint(0, N, (B, K + 1), generator=g).to(device)
    idx[:, 0] = y
    return l, ab, neg, banks, idx, y


def _logits_then_ce(scores):
    """Per-sample cross-entropy of the logits ``scores`` returns: a logits op followed by ``cross_entropy``."""
    return functools.partial(reference.iic_softmax_loss, scores=scores)


def _arms():
    """Row name -> arm -> (per-sample losses of both views, bank update)."""
    return {
        "iic_scores fwd+bwd+update": {
            "fused": (_logits_then_ce(ops.iic_scores), ops.bank_update_),
            "original": (_logits_then_ce(reference.iic_scores), reference.bank_update_),
            "dense": (_logits_then_ce(reference.iic_scores_dense), reference.bank_update_),
        },
        "iic_softmax_loss fwd+bwd+update": {
            "fused": (ops.iic_softmax_loss, ops.bank_update_),
            "original": (reference.iic_softmax_loss, reference.bank_update_),
            "dense": (reference.iic_softmax_loss_dense, reference.bank_update_),
        },
    }


def _make_step(losses, update, l, ab, neg, banks, idx, y):
    bank_l, bank_ab, bank_neg = banks

    def step():
        loss_l, loss_ab = losses(l, ab, bank_l, bank_ab, bank_neg, idx, 1.0 / TEMPERATURE)
        grads = torch.autograd.grad(loss_l.mean() + loss_ab.mean(), (l, ab))
        update(bank_l, y, l.detach(), MOMENTUM)
        update(bank_ab, y, ab.detach(), MOMENTUM)
        update(bank_neg, y, neg, MOMENTUM)
        return grads

    return step


def _check(l, ab, banks, idx):
    """The fused scores equal the reference on these inputs (else the timing compares different work)."""
    got = ops.iic_scores(l, ab, *banks, idx, 1.0 / TEMPERATURE)
    want = reference.iic_scores(l, ab, *banks, idx, 1.0 / TEMPERATURE)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    got = ops.iic_softmax_loss(l, ab, *banks, idx, 1.0 / TEMPERATURE)
    want = reference.iic_softmax_loss(l, ab, *banks, idx, 1.0 / TEMPERATURE)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def run(cfg: Config):
    if not hasattr(ops, "iic_softmax_loss") or not hasattr(reference, "iic_softmax_loss_dense"):
        raise ImportError("the NCE ops (iic_ext.ops.iic_softmax_loss, reference.iic_softmax_loss_dense) are not in "
                          "this checkout")
    rows: List[dict] = []
    notes = []
    configs = CONFIGS[:1] if cfg.quick else CONFIGS
    if cfg.quick:
        notes.append("nce: --quick runs (B=16, K=1024, D=512, N=9537) only")
    for B, K, D, N in configs:
        l, ab, neg, banks, idx, y = step_inputs(B, K, D, N, cfg.device)
        _check(l, ab, banks, idx)
        item = banks[0].element_size()
        floor = min(3 * B * (K + 1) * D, 3 * N * D) * item + 3 * 2 * B * D * item
        for name, arm_fns in _arms().items():
            # every arm updates its own copy of the banks, so the rows each reads stay alike
            arms = {arm: _make_step(losses, update, l, ab, neg, [_bank_like(b) for b in banks], idx, y)
                    for arm, (losses, update) in arm_fns.items()}
            rows += compare(cfg, "nce", name, (B, K, D, N), banks[0].dtype, arms, floor,
                            variant=f"B={B} K={K} D={D} N={N}")
        del arms, banks
    return rows, notes
