"""Nearest-neighbour retrieval and kNN classification over video features, in torch.

Similarities are computed chunk by chunk (``[chunk, G]`` at a time) on the features' device; nothing
sorts a full row. Ties are broken deterministically in favour of the lower gallery index: the
neighbours at rank ``k`` are every gallery item strictly more similar than the ``k``-th largest
similarity, completed by the lowest-indexed items equal to it. This makes the result independent of
the ``topk`` implementation and the device.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["DEFAULT_KS", "cosine_similarity_chunks", "neighbour_mask", "topk_retrieval",
           "knn_classify", "nearest_neighbours"]

DEFAULT_KS = (1, 5, 10, 20, 50)


def _auto_chunk(num_gallery: int, budget: int = 1 << 24) -> int:
    """Rows of queries per chunk so that a ``[chunk, G]`` similarity block holds ~16M elements."""
    return max(1, min(4096, budget // max(num_gallery, 1)))


def cosine_similarity_chunks(query: torch.Tensor, gallery: torch.Tensor, chunk_size: int | None = None,
                             ) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(start, sims)`` with ``sims (Tensor[chunk, G])`` the cosine similarity of
    ``query[start:start + chunk]`` to every gallery row.

    Args:
        query (Tensor[Q, D]), gallery (Tensor[G, D]): features on one device (not normalised).
        chunk_size (int, optional): queries per block (default: ~16M similarities per block).
    """
    if query.dim() != 2 or gallery.dim() != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query [Q, D] and gallery [G, D] must share D, got {tuple(query.shape)} and "
                         f"{tuple(gallery.shape)}")
    g = F.normalize(gallery, dim=1)
    step = chunk_size or _auto_chunk(gallery.shape[0])
    for start in range(0, query.shape[0], step):
        q = F.normalize(query[start:start + step], dim=1)
        yield start, q @ g.T


def neighbour_mask(sims: torch.Tensor, k: int, kth: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean ``[Q, G]`` mask of the ``k`` nearest gallery items of each query row.

    Exactly ``min(k, G)`` items per row; ties at the boundary go to the lower gallery index.

    Args:
        sims (Tensor[Q, G]): similarities (larger is nearer).
        k (int): neighbours; clamped to ``G``.
        kth (Tensor[Q], optional): the ``k``-th largest similarity per row, if already known.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    G = sims.shape[1]
    k = min(k, G)
    if k == G:
        return torch.ones_like(sims, dtype=torch.bool)
    if kth is None:
        kth = sims.topk(k, dim=1).values[:, k - 1]
    kth = kth.unsqueeze(1)
    above = sims > kth
    need = k - above.sum(1, keepdim=True)
    equal = sims == kth
    take_equal = equal & (equal.cumsum(1) <= need)
    return above | take_equal


def topk_retrieval(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor,
                   gallery_labels: torch.Tensor, ks: Sequence[int] = DEFAULT_KS,
                   chunk_size: int | None = None) -> Dict[int, int]:
    """Count the queries whose ``k`` nearest gallery items (cosine) include one of their class.

    Args:
        query (Tensor[Q, D]), query_labels (Tensor[Q], int): test videos.
        gallery (Tensor[G, D]), gallery_labels (Tensor[G], int): train videos.
        ks (Sequence[int]): the ``k`` to report; values above ``G`` are clamped to ``G``.
        chunk_size (int, optional): queries per similarity block.

    Returns:
        dict ``{k: number of correct queries}`` (divide by ``Q`` for the accuracy).
    """
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if gallery.shape[0] == 0:
        raise ValueError("the gallery (train set) is empty")
    device = gallery.device
    query_labels = query_labels.to(device)
    gallery_labels = gallery_labels.to(device)
    kmax = min(max(ks), gallery.shape[0])
    correct = {k: 0 for k in ks}
    for start, sims in cosine_similarity_chunks(query.to(device), gallery, chunk_size):
        top = sims.topk(kmax, dim=1).values
        same = gallery_labels.unsqueeze(0) == query_labels[start:start + sims.shape[0]].unsqueeze(1)
        for k in ks:
            kk = min(k, gallery.shape[0])
            mask = neighbour_mask(sims, kk, top[:, kk - 1])
            correct[k] += int((mask & same).any(1).sum())
    return correct


def nearest_neighbours(query: torch.Tensor, gallery: torch.Tensor, k: int,
                       chunk_size: int | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest gallery items of each query, nearest first (ties: lower index first).

    Returns:
        (indices Tensor[Q, k] int64, similarities Tensor[Q, k]), ``k`` clamped to ``G``.
    """
    k = min(int(k), gallery.shape[0])
    out_i, out_s = [], []
    for _, sims in cosine_similarity_chunks(query.to(gallery.device), gallery, chunk_size):
        mask = neighbour_mask(sims, k)
        # Selected items are exactly k per row: order them by (-similarity, index).
        idx = mask.nonzero()[:, 1].view(-1, k)
        val = sims.gather(1, idx)
        order = torch.sort(val, dim=1, descending=True, stable=True).indices
        out_i.append(idx.gather(1, order))
        out_s.append(val.gather(1, order))
    if not out_i:
        return (torch.empty(0, k, dtype=torch.long, device=gallery.device),
                torch.empty(0, k, dtype=gallery.dtype, device=gallery.device))
    return torch.cat(out_i), torch.cat(out_s)


def knn_classify(query: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None) -> torch.Tensor:
    """Weighted kNN vote (InstDisc / DINO style): each of the ``k`` nearest gallery items votes for its
    class with weight ``exp(cosine / temperature)``; ``temperature <= 0`` gives a plain majority vote.

    Returns:
        Tensor[Q] int64: predicted classes (ties between classes go to the lower class id).
    """
    device = gallery.device
    gallery_labels = gallery_labels.to(device).long()
    C = int(num_classes if num_classes is not None else int(gallery_labels.max()) + 1)
    onehot = F.one_hot(gallery_labels, C).to(gallery.dtype if gallery.is_floating_point() else torch.float32)
    k = min(int(k), gallery.shape[0])
    preds = []
    for _, sims in cosine_similarity_chunks(query.to(device), gallery, chunk_size):
        mask = neighbour_mask(sims, k)
        w = torch.exp(sims / temperature) if temperature > 0 else torch.ones_like(sims)
        votes = (w * mask).to(onehot.dtype) @ onehot
        preds.append(votes.argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=device)


def accuracies(correct: Dict[int, int], total: int) -> Dict[str, float]:
    """``{k: count}`` -> ``{"top{k}": fraction}``."""
    return {f"top{k}": (correct[k] / total if total else float("nan")) for k in correct}


def iter_ks(ks: Iterable[int]) -> list[int]:
    return sorted({int(k) for k in ks})
