"""``memory``: the paper's objective, CMC memory banks with the intra-negative bank."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nce import NCEAverage, NCECriterion
from ..ops import nce as nce_ops
from .base import Objective, StepFeatures, positive_probability, top1

__all__ = ["MemoryObjective"]


class MemoryObjective(Objective):
    """IIC's contrast (Tao et al. 2020): each view scored against K + 1 sampled rows of the other view's
    bank and the same rows of the intra-negative bank, softmax cross-entropy with the positive at column
    0 (or the NCE loss), the three banks momentum-updated after the optimiser step.

    The update uses the step's detached features, so moving it after ``optimizer.step()`` gives exactly
    the numbers of the original's update inside the forward.

    Args:
        feat_dim: D, the feature size (the backbone's, or the projection head's output).
        n_data: N, bank rows (the training set size).
        nce_k, nce_t, nce_m: K negatives per sample, temperature, bank momentum.
        intra_neg: keep the negative bank (IIC); False is the CMC baseline.
        nce_criterion: the NCE loss (``NCECriterion``) instead of the softmax cross-entropy.
        normalize: L2-normalise features before the contrast (not in the paper).
        head: optional projection head (the original has none).
        generator: the generator bank rows are drawn from (``self.contrast.generator``).
    """

    name = "memory"

    def __init__(self, feat_dim: int, n_data: int, *, nce_k: int = 1024, nce_t: float = 0.07, nce_m: float = 0.5,
                 intra_neg: bool = True, nce_criterion: bool = False, normalize: bool = False,
                 head: Optional[nn.Module] = None, generator: Optional[torch.Generator] = None):
        super().__init__(head, normalize)
        self.contrast = NCEAverage(feat_dim, n_data, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m,
                                   use_softmax=not nce_criterion, intra_neg=intra_neg, generator=generator)
        self.nce_criterion = nce_criterion
        self.criterion = NCECriterion(n_data) if nce_criterion else None

    @property
    def generator(self) -> torch.Generator:
        return self.contrast.generator

    @property
    def n_rows(self) -> int:
        """N, the bank rows: dataset indices must lie in [0, N)."""
        return self.contrast.memory_l.shape[0]

    def forward(self, features: StepFeatures, index: torch.Tensor):
        c = self.contrast
        l, ab, neg = features.view1, features.view2, features.negative
        if c.intra_neg and neg is None:
            raise ValueError("the memory objective with an intra-negative bank needs the negative's features")
        K, T, _, _, _ = c.hyperparams()
        idx = c.sample_idx(index, int(K))
        banks = (c.memory_l, c.memory_ab, c.memory_neg)
        if self.nce_criterion:
            out_l, out_ab = c.scores(l, ab, idx)
            loss_1, loss_2 = self.criterion(out_l).squeeze(), self.criterion(out_ab).squeeze()
            # out_* are exp(s / T) / Z: the softmax probability of the positive is p_0 / sum(p)
            prob_1 = (out_l[:, 0] / out_l.sum(1)).detach().mean()
            prob_2 = (out_ab[:, 0] / out_ab.sum(1)).detach().mean()
            s_l, s_ab = out_l, out_ab
        else:
            per_l, per_ab = nce_ops.iic_softmax_loss(l, ab, *banks, idx, 1.0 / T)
            loss_1, loss_2 = per_l.mean(), per_ab.mean()
            prob_1, prob_2 = positive_probability(per_l), positive_probability(per_ab)
            with torch.no_grad():
                s_l, s_ab = nce_ops.iic_scores(l.detach(), ab.detach(), *banks, idx, 1.0 / T)
        self._pending = (index, l.detach(), ab.detach(), None if neg is None else neg.detach())
        # the positive's own row drawn again among the K negatives is a copy of the positive, not a rival
        copies = torch.zeros(s_l.shape, dtype=torch.bool, device=s_l.device)
        copies[:, 1:idx.shape[1]] = idx[:, 1:] == idx[:, :1]
        metrics = {"loss_1": loss_1.detach(), "loss_2": loss_2.detach(), "prob_1": prob_1, "prob_2": prob_2,
                   "top1_1": top1(s_l, exclude=copies), "top1_2": top1(s_ab, exclude=copies),
                   "chance": torch.tensor(1.0 / s_l.shape[1])}
        return loss_1 + loss_2, metrics

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        if self._pending is None:
            return
        index, l, ab, neg = self._pending
        self._pending = None
        self.contrast.update(index, l, ab, neg if self.contrast.intra_neg else None)

    def checkpoint_state(self) -> dict:
        # The banks under the original's names (an original ``contrast`` state dict loads into
        # NCEAverage); a projection head, if any, under ``head.``.
        state = dict(self.contrast.state_dict())
        state.update({f"head.{k}": v for k, v in self.head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: dict) -> None:
        head = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
        self.contrast.load_state_dict({k: v for k, v in state.items() if not k.startswith("head.")}, strict=True)
        self.head.load_state_dict(head, strict=True)
