"""Logistic-regression probe on frozen features (a torch linear layer, L-BFGS or SGD)."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
import torch.nn.functional as F

__all__ = ["standardize", "fit_logistic", "accuracy", "select_weight_decay"]


def standardize(train: torch.Tensor, *others: torch.Tensor, eps: float = 1e-6):
    """Z-score every feature with the training set's mean and std."""
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(eps)
    return tuple((x - mean) / std for x in (train,) + others)


@torch.enable_grad()
def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float = 1e-3,
                 optimizer: str = "lbfgs", max_iter: int = 300, lr: float = 0.1, epochs: int = 100,
                 batch_size: int = 256, seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression ``softmax(W x + b)`` minimising
    ``mean cross-entropy + weight_decay * ||W||^2 / 2``.

    Args:
        x (Tensor[N, D]), y (Tensor[N] int64): training features and labels.
        optimizer (str): ``lbfgs`` (full batch, strong-Wolfe line search) or ``sgd`` (mini-batch, momentum
            0.9, cosine lr over ``epochs``).
    """
    g = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], num_classes).to(x.device, x.dtype)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
    y = y.to(x.device).long()

    def objective(xb, yb):
        return F.cross_entropy(layer(xb), yb) + 0.5 * weight_decay * layer.weight.pow(2).sum()

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = objective(x, y)
            loss.backward()
            return loss

        opt.step(closure)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
        for _ in range(epochs):
            perm = torch.randperm(x.shape[0], generator=g).to(x.device)
            for i in range(0, x.shape[0], batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                objective(x[idx], y[idx]).backward()
                opt.step()
            sched.step()
    else:
        raise ValueError(f"optimizer must be 'lbfgs' or 'sgd', got {optimizer!r}")
    return layer


@torch.no_grad()
def accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((layer(x).argmax(1) == y.to(x.device)).float().mean()) if x.shape[0] else float("nan")


def select_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int, candidates: Sequence[float],
                        val_fraction: float = 0.1, seed: int = 0, **fit_kw) -> Dict[str, object]:
    """Pick the weight decay with the best accuracy on a seeded held-out part of the training set.

    Returns:
        ``{"weight_decay": best, "val_acc": {wd: acc}}`` (no search with a single candidate).
    """
    candidates = list(candidates)
    if len(candidates) == 1:
        return {"weight_decay": candidates[0], "val_acc": {}}
    n = x.shape[0]
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        return {"weight_decay": candidates[0], "val_acc": {}}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    va, tr = perm[:n_val], perm[n_val:]
    xtr, xva = standardize(x[tr], x[va])
    scores: Dict[float, float] = {}
    for wd in candidates:
        layer = fit_logistic(xtr, y[tr], num_classes, weight_decay=wd, seed=seed, **fit_kw)
        scores[wd] = accuracy(layer, xva, y[va])
    best = max(candidates, key=lambda wd: (scores[wd], wd))  # ties: the stronger regularisation
    return {"weight_decay": best, "val_acc": scores}
