"""Contrastive objectives of the IIC framework behind one interface (:class:`Objective`).

* ``memory``: the paper's CMC memory banks with the intra-negative bank (:class:`MemoryObjective`).
* ``moco``: a momentum key encoder with key queues, cross-view, intra-negative keys (:class:`MoCoObjective`).
* ``simclr``: in-batch NT-Xent with the batch's intra-negatives (:class:`SimCLRObjective`).

Each has a pure-PyTorch reference written from its formula in :mod:`iic_ext.ops.reference`
(``memory``: ``iic_softmax_loss`` and ``bank_update_``; ``moco_losses``; ``simclr_losses``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Objective, ProjectionHead, StepFeatures, positive_probability, top1
from .memory import MemoryObjective
from .moco import MoCoObjective, moco_logits
from .simclr import SimCLRObjective, simclr_logits

__all__ = ["Objective", "StepFeatures", "ProjectionHead", "MemoryObjective", "MoCoObjective", "SimCLRObjective",
           "OBJECTIVES", "build_objective", "moco_logits", "simclr_logits", "top1", "positive_probability"]

OBJECTIVES = ("memory", "moco", "simclr")


def build_objective(name: str, backbone: nn.Module, feature_dim: int, n_data: int, *, proj_dim: int = 0,
                    nce_k: Optional[int] = None, nce_t: float = 0.07, nce_m: float = 0.5, moco_m: float = 0.999,
                    intra_neg: bool = True, nce_criterion: bool = False, normalize_features: bool = False,
                    generator: Optional[torch.Generator] = None) -> Objective:
    """An objective by name, on the backbone's device.

    Args:
        name: ``memory``, ``moco`` or ``simclr``.
        backbone: the trained backbone (moco copies it into its key encoder).
        feature_dim: the backbone's feature size.
        n_data: training set size (memory-bank rows).
        proj_dim: output size of an MLP projection head (0: none).
        nce_k: memory: negatives per sample; moco: keys per queue; simclr: unused (None).
        nce_t: temperature. nce_m: memory-bank momentum. moco_m: key-encoder momentum.
        intra_neg: use the intra-negative. nce_criterion, normalize_features: memory only.
        generator: memory: the generator bank rows are drawn from.
    """
    device = next(backbone.parameters()).device
    head = ProjectionHead(feature_dim, proj_dim).to(device) if proj_dim else None
    dim = proj_dim or feature_dim
    if name == "memory":
        obj = MemoryObjective(dim, n_data, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m, intra_neg=intra_neg,
                              nce_criterion=nce_criterion, normalize=normalize_features, head=head,
                              generator=generator)
    elif name == "moco":
        obj = MoCoObjective(backbone, dim, queue_size=nce_k, nce_t=nce_t, momentum=moco_m, intra_neg=intra_neg,
                            head=head)
    elif name == "simclr":
        obj = SimCLRObjective(nce_t=nce_t, intra_neg=intra_neg, head=head)
    else:
        raise ValueError(f"unknown objective {name!r}; choose from {OBJECTIVES}")
    return obj.to(device)
