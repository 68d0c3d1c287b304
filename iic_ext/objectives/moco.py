"""``moco``: a momentum key encoder and queues of keys (He et al. 2020), cross-view as CMC's MoCo
variant, with IIC's intra-negatives."""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import Objective, StepFeatures, softmax_metrics, top1

__all__ = ["MoCoObjective", "moco_logits"]


def moco_logits(q: torch.Tensor, k_pos: torch.Tensor, queue: torch.Tensor, queue_neg: Optional[torch.Tensor],
                k_neg: Optional[torch.Tensor], inv_t: float) -> torch.Tensor:
    """The logits of one query view: ``[q.k_pos | q.queue^T | q.queue_neg^T | q.k_neg] / T``.

    Args:
        q (Tensor[B, D]): queries (unit rows).
        k_pos (Tensor[B, D]): the positive keys (the other view of the same sample).
        queue (Tensor[F, D]): the filled part of the other view's key queue.
        queue_neg (Tensor[F, D] or None): the filled part of the intra-negative key queue.
        k_neg (Tensor[B, D] or None): each sample's own intra-negative key.

    Returns:
        Tensor[B, 1 + F (+ F + 1)], float32; the positive at column 0.
    """
    parts = [(q * k_pos).sum(1, keepdim=True), q @ queue.t()]
    if queue_neg is not None:
        parts.append(q @ queue_neg.t())
    if k_neg is not None:
        parts.append((q * k_neg).sum(1, keepdim=True))
    return torch.cat(parts, 1) * inv_t


class MoCoObjective(Objective):
    """Cross-view MoCo with intra-negatives.

    Queries come from the trained encoder (backbone + head), keys from its exponential moving average
    (``key = m key + (1 - m) query`` after every optimiser step). View 1's queries are scored against
    view 2's key of the same sample (the positive) and view 2's key queue, and the reverse. With an
    intra-negative, each query is also scored against the key of its own sample's negative clip and
    against the queue of earlier negative keys. Keys enter the queues after the step; until a queue is
    full only its filled slots are scored, so an empty slot never contributes a loss term. On one
    process the key encoder runs on the batch as it is (no shuffled BatchNorm).

    Args:
        backbone: the trained backbone (copied into the key encoder at construction: build this after
            moving it to its device).
        feat_dim: D, the size of the (projected) features.
        queue_size: K, keys per queue.
        nce_t: temperature.
        momentum: m of the key encoder's moving average.
        intra_neg: score the intra-negatives (IIC); False is plain cross-view MoCo.
        head: projection head (also copied into the key encoder).
    """

    name = "moco"

    def __init__(self, backbone: nn.Module, feat_dim: int, *, queue_size: int = 16384, nce_t: float = 0.07,
                 momentum: float = 0.999, intra_neg: bool = True, head: Optional[nn.Module] = None):
        super().__init__(head, normalize=True)
        if queue_size < 1:
            raise ValueError(f"queue_size must be positive, got {queue_size}")
        self.momentum = float(momentum)
        self.inv_t = 1.0 / float(nce_t)
        self.intra_neg = intra_neg
        self.key_backbone = copy.deepcopy(backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in list(self.key_backbone.parameters()) + list(self.key_head.parameters()):
            p.requires_grad_(False)
        device = next(backbone.parameters()).device
        for name in ("queue_1", "queue_2") + (("queue_neg",) if intra_neg else ()):
            self.register_buffer(name, torch.zeros(queue_size, feat_dim, device=device))
        if not intra_neg:
            self.queue_neg = None
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long, device=device))
        self._host = None  # host copies (ptr, filled) of the queue buffers: a step does not wait on the device

    @property
    def queue_size(self) -> int:
        return self.queue_1.shape[0]

    def _key_embed(self, clip: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_head(self.key_backbone(clip)).float(), dim=1)

    def encode(self, model, view1, view2, negative) -> StepFeatures:
        q1 = self.embed(model, view1)
        q2 = self.embed(model, view2) if view2 is not None else q1
        with torch.no_grad():
            k1 = self._key_embed(view1)
            k2 = self._key_embed(view2) if view2 is not None else k1
            kn = self._key_embed(negative) if (negative is not None and self.intra_neg) else None
        return StepFeatures(q1, q2, None, keys=(k1, k2, kn))

    def _host_state(self):
        if self._host is None:
            self._host = (int(self.queue_ptr.item()), int(self.queue_filled.item()))
        return self._host

    def filled(self) -> int:
        """Queue slots holding keys (all of them once the queues have wrapped)."""
        return self._host_state()[1]

    def forward(self, features: StepFeatures, index: torch.Tensor):
        if features.keys is None:
            raise ValueError("the moco objective needs the key encoder's features (from MoCoObjective.encode)")
        q1, q2 = features.view1, features.view2
        k1, k2, kn = features.keys
        if self.intra_neg and kn is None:
            raise ValueError("the moco objective with intra-negatives needs the negative clip's key")
        f = self.filled()
        qn = self.queue_neg[:f] if self.intra_neg else None
        logits_1 = moco_logits(q1, k2, self.queue_2[:f], qn, kn, self.inv_t)
        logits_2 = moco_logits(q2, k1, self.queue_1[:f], qn, kn, self.inv_t)
        zero = torch.zeros(q1.shape[0], dtype=torch.long, device=q1.device)
        per_1 = F.cross_entropy(logits_1, zero, reduction="none")
        per_2 = F.cross_entropy(logits_2, zero, reduction="none")
        self._pending = (k1, k2, kn)
        metrics = softmax_metrics(per_1, per_2, top1(logits_1), top1(logits_2), logits_1.shape[1])
        return per_1.mean() + per_2.mean(), metrics

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        m = self.momentum
        online = list(model.parameters()) + list(self.head.parameters())
        target = list(self.key_backbone.parameters()) + list(self.key_head.parameters())
        torch._foreach_mul_(target, m)
        torch._foreach_add_(target, [p.detach() for p in online], alpha=1.0 - m)
        if self._pending is None:
            return
        k1, k2, kn = self._pending
        self._pending = None
        B, K = k1.shape[0], self.queue_size
        ptr, filled = self._host_state()
        slots = (ptr + torch.arange(B, device=k1.device)) % K
        for queue, keys in ((self.queue_1, k1), (self.queue_2, k2), (self.queue_neg, kn)):
            if queue is not None and keys is not None:
                queue.index_copy_(0, slots, keys.to(queue.dtype))
        self._host = ((ptr + B) % K, min(filled + B, K))
        self.queue_ptr.fill_(self._host[0])
        self.queue_filled.fill_(self._host[1])

    def load_checkpoint_state(self, state: dict) -> None:
        super().load_checkpoint_state(state)
        self._host = None

    def _apply(self, fn, *args, **kwargs):  # .to()/.cuda() replace the buffers: re-read them
        self._host = None
        return super()._apply(fn, *args, **kwargs)
