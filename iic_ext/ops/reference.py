"""Pure-PyTorch twins of every iic_ext operator.

Each function is written to be visibly the formula of the paper / the original code (``torch.roll``,
per-sample loops, ``index_select`` + ``bmm``). This module is the test oracle, the baseline of the
benchmarks and the fallback when the compiled library is missing; tests and benchmarks import it from
here and nowhere else. ``*_vectorized`` variants are the best plain PyTorch form of the same formula,
used as the second baseline of the benchmarks.
"""
from typing import Optional, Sequence

import torch

from . import indices


def _to_unit_float(clip: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """uint8 -> x / 255 in float32 (or ``dtype``); float stays (cast to ``dtype`` if given)."""
    if clip.dtype == torch.uint8:
        return clip.to(dtype or torch.float32) / 255.0
    return clip if dtype is None else clip.to(dtype)


# ---- views and intra-negatives ----------------------------------------------------------------------


def residual_frames(clip: torch.Tensor, scaled: bool = True, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``((x - roll(x, 1, time)) + 1) / 2`` (scaled, the IIC view) or ``x - roll(x, 1, time)``.

    Args:
        clip (Tensor[B, C, T, H, W] or [C, T, H, W]): uint8 (read as x/255) or float.
    """
    time = clip.dim() - 3
    x = _to_unit_float(clip, out_dtype)
    shift_x = torch.roll(x, 1, time)
    res = x - shift_x
    return (res + 1) / 2 if scaled else res


def temporal_gather(clip: torch.Tensor, time_index: torch.Tensor) -> torch.Tensor:
    """``out[b, :, t] = clip[b, :, time_index[b, t]]``, one sample at a time as the original loops.

    Args:
        clip (Tensor[B, C, T, H, W]); time_index (Tensor[B, T_out], int64).
    """
    return torch.stack([clip[b][:, time_index[b]] for b in range(clip.shape[0])]) if clip.shape[0] else clip[:, :, :0].new_empty(
        (0, clip.shape[1], time_index.shape[1], clip.shape[3], clip.shape[4])
    )


def temporal_gather_vectorized(clip: torch.Tensor, time_index: torch.Tensor) -> torch.Tensor:
    """The same gather as one ``torch.gather`` (the best plain PyTorch form)."""
    B, C, _, H, W = clip.shape
    idx = time_index.view(B, 1, time_index.shape[1], 1, 1).expand(B, C, time_index.shape[1], H, W)
    return torch.gather(clip, 2, idx)


def swap_time_index(first: torch.Tensor, second: torch.Tensor, num_frames: int, chunks: int = 4) -> torch.Tensor:
    """The swap negative's time index from its chunk positions: :func:`indices.swap_index_from_pairs`."""
    return indices.swap_index_from_pairs(first, second, num_frames, chunks)


def repeat_negative(clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Repeat negative as the original: per sample, one random frame tiled over time."""
    B, T = clip.shape[0], clip.shape[2]
    frames = indices.repeat_index(B, T, generator, device=clip.device)[:, 0].tolist()
    out = []
    for b, f in enumerate(frames):
        out.append(clip[b][:, f : f + 1].repeat(1, T, 1, 1))
    return torch.stack(out) if out else clip.clone()


def shuffle_negative(
    clip: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "swap"
) -> torch.Tensor:
    """Shuffle negative; ``swap`` as the original: ``torch.chunk`` into 4, swap two chunks, ``cat``."""
    B, T = clip.shape[0], clip.shape[2]
    if mode != "swap":
        return temporal_gather(clip, indices.shuffle_index(B, T, generator, mode, device=clip.device))
    n = len(indices.chunk_bounds(T))
    if n < 2:
        return clip.clone()
    first, second = indices.swap_pairs(B, n, generator, clip.device)
    out = []
    for b in range(B):
        chunks = list(torch.chunk(clip[b], 4, dim=1))
        i, j = int(first[b]), int(second[b])
        chunks[i], chunks[j] = chunks[j], chunks[i]
        out.append(torch.cat(chunks, dim=1))
    return torch.stack(out) if out else clip.clone()


def iic_views(
    clip: torch.Tensor,
    time_index: torch.Tensor,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scaled: bool = True,
    out_dtype: Optional[torch.dtype] = None,
):
    """The three IIC step inputs the way the original builds them: convert, roll, subtract, gather.

    Args:
        clip (Tensor[B, C, T, H, W]): uint8 or float; time_index (Tensor[B, T_out], int64).
    Returns:
        (rgb, residual, negative): rgb normalised by mean/std, residual from the unnormalised clip,
        negative = rgb gathered in time.
    """
    x = _to_unit_float(clip, out_dtype or (torch.float32 if clip.dtype == torch.uint8 else clip.dtype))
    res = residual_frames(x, scaled)
    rgb = x
    if mean is not None:
        rgb = rgb - torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
    if std is not None:
        rgb = rgb / torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1, 1)
    return rgb.contiguous(), res.contiguous(), temporal_gather(rgb, time_index).contiguous()


# ---- memory bank (NCE) ----------------------------------------------------------------------------
# The original way: gather the sampled rows with ``index_select``, ``cat`` the negative bank's rows,
# ``bmm`` with the features; the update is ``index_select``, mul, add, normalise, ``index_copy_``.
# Mixed precision (half features, float32 bank) computes in the promoted dtype and returns the
# feature dtype. ``*_dense`` forms (one GEMM against the whole bank, then a gather) are the second
# benchmark baseline.


def _compute_dtype(feat: torch.Tensor, bank: torch.Tensor) -> torch.dtype:
    return torch.promote_types(feat.dtype, bank.dtype)


def _sampled_rows(bank: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``bank[idx]`` as ``[B, K, D]`` via ``index_select`` (no gradient to the bank, as the original)."""
    B, K = idx.shape
    return torch.index_select(bank, 0, idx.reshape(-1)).detach().view(B, K, bank.shape[1]).to(dtype)


def bank_scores(feat: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``scores[b, k] = <bank[idx[b, k]], feat[b]>``.

    Args:
        feat (Tensor[B, D]); bank (Tensor[N, D]); idx (Tensor[B, K], int64).
    Returns:
        Tensor[B, K] in feat's dtype.
    """
    B, K = idx.shape
    dt = _compute_dtype(feat, bank)
    weight = _sampled_rows(bank, idx, dt)
    return torch.bmm(weight, feat.to(dt).view(B, feat.shape[1], 1)).view(B, K).to(feat.dtype)


def bank_scores_dense(feat: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """:func:`bank_scores` as one GEMM against the whole bank ``[B, N]`` followed by a gather."""
    dt = _compute_dtype(feat, bank)
    return torch.gather(feat.to(dt) @ bank.detach().to(dt).t(), 1, idx).to(feat.dtype)


def iic_scores(
    l: torch.Tensor,
    ab: torch.Tensor,
    bank_l: torch.Tensor,
    bank_ab: torch.Tensor,
    bank_neg: Optional[torch.Tensor],
    idx: torch.Tensor,
    inv_t: float = 1.0,
):
    """The IIC logits as the original computes them (``lib/NCEAverage.py``).

    ``out_l = [bank_ab[idx] | bank_neg[idx]] . l * inv_t``, ``out_ab = [bank_l[idx] | bank_neg[idx]] . ab * inv_t``.

    Args:
        l, ab (Tensor[B, D]); bank_l, bank_ab, bank_neg (Tensor[N, D]; bank_neg may be None: the CMC
        form); idx (Tensor[B, K+1], int64).
    Returns:
        (out_l, out_ab): Tensor[B, 2(K+1)] each ([B, K+1] without bank_neg), in l's dtype.
    """
    B, D = l.shape
    dt = _compute_dtype(l, bank_l)
    weight_l = _sampled_rows(bank_l, idx, dt)
    weight_ab = _sampled_rows(bank_ab, idx, dt)
    if bank_neg is not None:
        weight_neg = _sampled_rows(bank_neg, idx, dt)
        weight_l = torch.cat((weight_l, weight_neg), 1)
        weight_ab = torch.cat((weight_ab, weight_neg), 1)
    C = weight_l.shape[1]
    out_ab = torch.bmm(weight_l, ab.to(dt).view(B, D, 1)).view(B, C) * inv_t
    out_l = torch.bmm(weight_ab, l.to(dt).view(B, D, 1)).view(B, C) * inv_t
    return out_l.to(l.dtype), out_ab.to(ab.dtype)


def iic_scores_dense(
    l: torch.Tensor,
    ab: torch.Tensor,
    bank_l: torch.Tensor,
    bank_ab: torch.Tensor,
    bank_neg: Optional[torch.Tensor],
    idx: torch.Tensor,
    inv_t: float = 1.0,
):
    """:func:`iic_scores` as GEMMs against the whole banks (``[B, N]`` each) followed by gathers."""
    dt = _compute_dtype(l, bank_l)
    lf, abf = l.to(dt), ab.to(dt)
    out_l = torch.gather(lf @ bank_ab.detach().to(dt).t(), 1, idx)
    out_ab = torch.gather(abf @ bank_l.detach().to(dt).t(), 1, idx)
    if bank_neg is not None:
        neg = bank_neg.detach().to(dt).t()
        out_l = torch.cat((out_l, torch.gather(lf @ neg, 1, idx)), 1)
        out_ab = torch.cat((out_ab, torch.gather(abf @ neg, 1, idx)), 1)
    return (out_l * inv_t).to(l.dtype), (out_ab * inv_t).to(ab.dtype)


def _loss_dtype(l: torch.Tensor, bank: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (l.dtype, bank.dtype) else torch.float32


def iic_softmax_loss(
    l: torch.Tensor,
    ab: torch.Tensor,
    bank_l: torch.Tensor,
    bank_ab: torch.Tensor,
    bank_neg: Optional[torch.Tensor],
    idx: torch.Tensor,
    inv_t: float = 1.0,
    scores=None,
):
    """Per-sample softmax cross-entropy (label 0) of both views' IIC logits, as the original trains.

    ``loss_l = CE([bank_ab[idx] | bank_neg[idx]] . l * inv_t, 0)`` and likewise for ab: the logits of
    :func:`iic_scores` (or ``scores``, e.g. :func:`iic_scores_dense`) followed by
    ``F.cross_entropy(..., reduction="none")``, computed in float32 (float64 when l or the banks are).

    Returns:
        (loss_l, loss_ab): Tensor[B] each, float32 or float64. Differentiable with respect to l and ab.
    """
    dt = _loss_dtype(l, bank_l)
    scores = iic_scores if scores is None else scores
    out_l, out_ab = scores(l.to(dt), ab.to(dt), bank_l, bank_ab, bank_neg, idx, inv_t)
    zero = torch.zeros(idx.shape[0], dtype=torch.long, device=idx.device)
    return (torch.nn.functional.cross_entropy(out_l, zero, reduction="none"),
            torch.nn.functional.cross_entropy(out_ab, zero, reduction="none"))


def iic_softmax_loss_dense(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t: float = 1.0):
    """:func:`iic_softmax_loss` on the logits of :func:`iic_scores_dense` (GEMMs against whole banks)."""
    return iic_softmax_loss(l, ab, bank_l, bank_ab, bank_neg, idx, inv_t, scores=iic_scores_dense)


def bank_update_(bank: torch.Tensor, idx: torch.Tensor, feat: torch.Tensor, momentum: float) -> torch.Tensor:
    """``bank[y] = normalize(m * bank[y] + (1 - m) * feat)`` in place, as the original.

    Every row is read before any is written; with a repeated y, ``index_copy_`` on the CPU keeps the
    last occurrence.

    Args:
        bank (Tensor[N, D]) updated in place; idx (Tensor[B], int64); feat (Tensor[B, D]).
    Returns:
        bank.
    """
    with torch.no_grad():
        pos = torch.index_select(bank, 0, idx.view(-1))
        pos.mul_(momentum)
        pos.add_(torch.mul(feat.detach(), 1 - momentum))
        norm = pos.pow(2).sum(1, keepdim=True).pow(0.5)
        bank.index_copy_(0, idx, pos.div(norm))
    return bank


# ---- objectives beyond the memory bank, written out sample by sample ---------------------------------


def _info_nce(pos: torch.Tensor, negs: list) -> torch.Tensor:
    """``-log(exp(pos) / (exp(pos) + sum exp(negs)))`` for one anchor, from its logits."""
    logits = torch.stack([pos] + list(negs))
    return -(pos - torch.logsumexp(logits, 0))


def moco_losses(q1, q2, k1, k2, kneg, queue_1, queue_2, queue_neg, filled: int, temperature: float):
    """Cross-view MoCo with intra-negatives, one sample and one queue slot at a time.

    For sample b, view 1's query ``q1[b]`` has the positive ``k2[b]`` and the negatives: the first
    ``filled`` slots of view 2's key queue, the same slots of the negative-key queue and its own
    negative's key ``kneg[b]``; view 2 the same with the roles of the views swapped. Every vector is
    L2-normalised here first (the objective normalises its features and keys).

    Args:
        q1, q2, k1, k2 (Tensor[B, D]); kneg (Tensor[B, D] or None); queue_1, queue_2 (Tensor[K, D]);
        queue_neg (Tensor[K, D] or None); filled: the slots holding keys.

    Returns:
        (loss_1, loss_2): Tensor[B] each, the per-sample InfoNCE of the two query views.
    """
    n = torch.nn.functional.normalize
    q1, q2, k1, k2 = n(q1, dim=1), n(q2, dim=1), n(k1, dim=1), n(k2, dim=1)
    kneg = None if kneg is None else n(kneg, dim=1)
    out = []
    for q, k_pos, queue in ((q1, k2, queue_2), (q2, k1, queue_1)):
        per = []
        for b in range(q.shape[0]):
            negs = [torch.dot(q[b], queue[j]) / temperature for j in range(filled)]
            if queue_neg is not None:
                negs += [torch.dot(q[b], queue_neg[j]) / temperature for j in range(filled)]
            if kneg is not None:
                negs.append(torch.dot(q[b], kneg[b]) / temperature)
            per.append(_info_nce(torch.dot(q[b], k_pos[b]) / temperature, negs))
        out.append(torch.stack(per))
    return out[0], out[1]


def simclr_losses(z1, z2, zneg, temperature: float):
    """NT-Xent across two views with the batch's intra-negatives, one anchor at a time.

    Anchor ``z1[i]``: positive ``z2[i]``; negatives ``z1[j]`` and ``z2[j]`` for every other sample j and
    ``zneg[j]`` for every sample j (its own included). Anchor ``z2[i]`` likewise with ``z1[i]`` as the
    positive. Vectors are L2-normalised first.

    Args:
        z1, z2 (Tensor[B, D]); zneg (Tensor[B, D] or None).

    Returns:
        (loss_1, loss_2): Tensor[B] each, the per-anchor losses of view-1 and view-2 anchors.
    """
    n = torch.nn.functional.normalize
    z1, z2 = n(z1, dim=1), n(z2, dim=1)
    zneg = None if zneg is None else n(zneg, dim=1)
    B = z1.shape[0]
    out = []
    for anchors, positives in ((z1, z2), (z2, z1)):
        per = []
        for i in range(B):
            a = anchors[i]
            negs = [torch.dot(a, v[j]) / temperature for j in range(B) if j != i for v in (z1, z2)]
            if zneg is not None:
                negs += [torch.dot(a, zneg[j]) / temperature for j in range(B)]
            per.append(_info_nce(torch.dot(a, positives[i]) / temperature, negs))
        out.append(torch.stack(per))
    return out[0], out[1]
