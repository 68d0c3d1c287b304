"""``simclr``: in-batch NT-Xent (Chen et al. 2020) across the two views, with IIC's intra-negatives."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Objective, StepFeatures, softmax_metrics, top1

__all__ = ["SimCLRObjective", "simclr_logits"]


def simclr_logits(z1: torch.Tensor, z2: torch.Tensor, zn: Optional[torch.Tensor], inv_t: float):
    """Logits of all 2B anchors against the batch, the anchor itself masked out.

    Rows are the anchors ``[z1; z2]``; columns the candidates ``[z1; z2; zn]``. Row i (view 1 of sample
    i) has its positive at column B + i, row B + i at column i; every other column is a negative: the
    other samples' views and every intra-negative of the batch (the row's own among them).

    Args:
        z1, z2 (Tensor[B, D]): the two views' unit features; zn (Tensor[B, D] or None): the negatives'.

    Returns:
        (logits Tensor[2B, 2B (+ B)] float32 with -inf at each anchor's own column, target Tensor[2B] int64).
    """
    B = z1.shape[0]
    anchors = torch.cat((z1, z2), 0)
    candidates = anchors if zn is None else torch.cat((anchors, zn), 0)
    logits = (anchors @ candidates.t()) * inv_t
    eye = torch.arange(2 * B, device=z1.device)
    logits = logits.index_put((eye, eye), torch.tensor(float("-inf"), device=z1.device, dtype=logits.dtype))
    target = torch.cat((eye[B:], eye[:B]))
    return logits, target


class SimCLRObjective(Objective):
    """NT-Xent over the batch: for each sample's view 1 the positive is its view 2 (and the reverse);
    negatives are every other sample's two views and the intra-negatives of the whole batch (the
    sample's own above all). The intra-negatives go through the trained encoder with gradient, since
    pushing them away trains it too.

    Args:
        nce_t: temperature.
        intra_neg: add the intra-negatives as candidates.
        head: projection head (SimCLR's is on by default in the trainer).
    """

    name = "simclr"
    negative_grad = True

    def __init__(self, *, nce_t: float = 0.1, intra_neg: bool = True, head: Optional[nn.Module] = None):
        super().__init__(head, normalize=True)
        self.inv_t = 1.0 / float(nce_t)
        self.intra_neg = intra_neg

    def forward(self, features: StepFeatures, index: torch.Tensor):
        z1, z2, zn = features.view1, features.view2, features.negative
        B = z1.shape[0]
        if B < 2:
            raise ValueError("the simclr objective needs at least 2 samples per batch (its negatives are the batch)")
        if self.intra_neg and zn is None:
            raise ValueError("the simclr objective with intra-negatives needs the negative's features")
        logits, target = simclr_logits(z1, z2, zn if self.intra_neg else None, self.inv_t)
        per = F.cross_entropy(logits, target, reduction="none")
        per_1, per_2 = per[:B], per[B:]
        # every column but the anchor's own is a candidate
        metrics = softmax_metrics(per_1, per_2, top1(logits[:B], target[:B]), top1(logits[B:], target[B:]),
                                  logits.shape[1] - 1)
        return per_1.mean() + per_2.mean(), metrics
