"""The interface every IIC objective implements, and the pieces they share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Objective", "StepFeatures", "ProjectionHead", "top1", "positive_probability", "softmax_metrics"]


@dataclass
class StepFeatures:
    """The features of one step, from :meth:`Objective.encode`.

    Attributes:
        view1 (Tensor[B, D]): view 1 (RGB) through the trained encoder (with gradient).
        view2 (Tensor[B, D]): view 2 (the second modality; view 1's tensor itself when view 2 is RGB).
        negative (Tensor[B, D] or None): the intra-negative (None with ``--neg none``).
        keys (tuple or None): the momentum encoder's features ``(view1, view2, negative or None)``
            (MoCo only), without gradient.
    """

    view1: torch.Tensor
    view2: torch.Tensor
    negative: Optional[torch.Tensor] = None
    keys: Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None


class ProjectionHead(nn.Sequential):
    """The MLP head of SimCLR: ``Linear(d, d) -> BatchNorm1d -> ReLU -> Linear(d, out_dim)``.

    The BatchNorm matters here: the backbones' features are average-pooled ReLU outputs with a large
    component common to every clip, and without centring that component dominates the projected
    features (cosine similarity ~0.97 between any two clips at initialisation), which stalls the loss at
    the uniform level.

    Input Tensor[B, d], output Tensor[B, out_dim].
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: Optional[int] = None):
        hidden_dim = hidden_dim or in_dim
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class Objective(nn.Module):
    """One contrastive objective of the IIC framework.

    A training step calls, in order: :meth:`encode` (the backbone forwards, under autocast), the
    module itself (``loss, metrics = objective(features, index)``), ``backward`` and
    ``optimizer.step()``, then :meth:`after_step` (no gradient: bank, queue and momentum-encoder
    updates). Everything the objective keeps (banks, queues, a key encoder, a projection head) is in its
    state and goes into checkpoints through :meth:`checkpoint_state`.

    Subclasses set ``name`` and implement :meth:`forward`; ``head`` is the projection head applied to
    the backbone's features (``nn.Identity`` without one).
    """

    name = ""
    #: whether the intra-negative's features need a gradient (in-batch use) or only feed a bank/queue
    negative_grad = False

    def __init__(self, head: Optional[nn.Module] = None, normalize: bool = True):
        super().__init__()
        self.head = head if head is not None else nn.Identity()
        self.normalize = normalize
        self._pending = None

    # -- the step
    def embed(self, model: nn.Module, clip: torch.Tensor) -> torch.Tensor:
        """``head(model(clip))``, L2-normalised when the objective normalises. Tensor[B, D] float32."""
        z = self.head(model(clip)).float()
        return F.normalize(z, dim=1) if self.normalize else z

    def encode(self, model: nn.Module, view1: torch.Tensor, view2: Optional[torch.Tensor],
               negative: Optional[torch.Tensor]) -> StepFeatures:
        """The backbone forwards of one step, each view in its own forward (BatchNorm statistics are
        not pooled across views, as the original).

        Args:
            model: the backbone being trained, in train mode.
            view1 (Tensor[B, C, T, H, W]): the RGB clips.
            view2 (Tensor[B, C, T, H, W] or None): the second view; None when it is RGB itself.
            negative (Tensor[B, C, T, H, W] or None): the intra-negative clips.
        """
        f1 = self.embed(model, view1)
        f2 = self.embed(model, view2) if view2 is not None else f1
        fn = None
        if negative is not None:
            if self.negative_grad:
                fn = self.embed(model, negative)
            else:
                with torch.no_grad():  # it only feeds a bank or queue: no gradient, exactly
                    fn = self.embed(model, negative)
        return StepFeatures(f1, f2, fn)

    def forward(self, features: StepFeatures, index: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The loss of one step.

        Args:
            features: from :meth:`encode`.
            index (Tensor[B], int64): dataset indices of the samples (on the features' device).

        Returns:
            (loss, metrics): the scalar loss (the sum of the two views' terms, each a mean over the
            batch) and detached scalars ``loss_1``, ``loss_2`` (the terms), ``prob_1``, ``prob_2``
            (the positive's mean probability), ``top1_1``, ``top1_2`` (the fraction of samples whose
            positive scores strictly above every other candidate, :func:`top1`) and ``chance`` (one over
            the number of candidates).
        """
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        """State updates that follow ``optimizer.step()`` (the default: nothing)."""
        self._pending = None

    # -- checkpoints
    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of the objective (its ``contrast`` entry)."""
        return self.state_dict()

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state, strict=True)

    def trainable_parameters(self):
        """The objective's parameters the optimiser trains (the projection head's)."""
        return [p for p in self.parameters() if p.requires_grad]


@torch.no_grad()
def top1(logits: torch.Tensor, target: Optional[torch.Tensor] = None,
         exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fraction of rows of ``logits [B, C]`` whose positive (column ``target``, default 0) scores strictly
    above every other candidate; a tie counts against it, so collapsed features score 0.

    ``exclude`` (bool Tensor[B, C]) leaves candidates out of the ranking: copies of the positive itself
    (a memory bank row drawn again among the negatives scores exactly as the positive).
    """
    s = logits.detach().float()
    rows = torch.arange(s.shape[0], device=s.device)
    t = torch.zeros_like(rows) if target is None else target
    pos = s[rows, t]
    others = s.index_put((rows, t), torch.tensor(float("-inf"), device=s.device))
    if exclude is not None:
        others = others.masked_fill(exclude, float("-inf"))
    return (pos > others.max(dim=1).values).float().mean()


@torch.no_grad()
def positive_probability(per_sample_loss: torch.Tensor) -> torch.Tensor:
    """Mean softmax probability of the positive from per-sample cross-entropies ``Tensor[B]``."""
    return torch.exp(-per_sample_loss.detach().float()).mean()


@torch.no_grad()
def softmax_metrics(per_1: torch.Tensor, per_2: torch.Tensor, top1_1: torch.Tensor, top1_2: torch.Tensor,
                    candidates: int) -> Dict[str, torch.Tensor]:
    """The metrics of :meth:`Objective.forward` from the two views' per-sample cross-entropies
    ``Tensor[B]``, their top-1 and the number of candidates each positive is ranked among."""
    return {"loss_1": per_1.detach().mean(), "loss_2": per_2.detach().mean(),
            "prob_1": positive_probability(per_1), "prob_2": positive_probability(per_2),
            "top1_1": top1_1, "top1_2": top1_2, "chance": torch.tensor(1.0 / candidates)}
