"""Vectorised pure-PyTorch baselines that ``iic_ext.ops.reference`` does not (yet) provide.

``reference`` holds the original-style twins (``torch.roll``, per-sample loops) and
``temporal_gather_vectorized``. The functions below are the best plain PyTorch forms of the other
ops that we could write: no Python loop over samples, as few passes over memory as the stock
operators allow, outputs written in place where a buffer is given. They compute the same values as
the reference (checked by :func:`check`), draw their random indices the same way as the fused
wrappers, and belong in ``iic_ext/ops/reference.py`` next to the other ``*_vectorized`` forms.
"""
from typing import Optional

import torch

from iic_ext.ops import indices, reference


def _unit_float(clip: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 -> float32 in [0, 1] in one pass (convert and scale in one multiply); float unchanged."""
    if clip.dtype != torch.uint8:
        return clip if out is None else out.copy_(clip)
    if out is None:
        out = torch.empty_like(clip, dtype=torch.float32)
    return torch.mul(clip, 1.0 / 255.0, out=out)


def residual_frames_vectorized(
    clip: torch.Tensor, scaled: bool = True, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``((x - roll(x, 1, time)) + 1) / 2`` without the rolled copy: two slice subtractions, then the
    affine map in place (``lerp_`` towards 1 by 1/2 is ``(r + 1) / 2`` in one pass).

    Args:
        clip (Tensor[B, C, T, H, W]): uint8 (read as x/255) or float, any memory format (kept).
        out (Tensor[B, C, T, H, W], optional): float buffer to write into.
    """
    x = _unit_float(clip)
    if out is None:
        out = torch.empty_like(x)
    torch.sub(x[:, :, 1:], x[:, :, :-1], out=out[:, :, 1:])
    torch.sub(x[:, :, :1], x[:, :, -1:], out=out[:, :, :1])
    if scaled:
        out.lerp_(torch.ones((), dtype=out.dtype, device=out.device), 0.5)
    return out


def repeat_negative_vectorized(clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Repeat negative as one advanced-indexing read of the chosen frames, expanded over time."""
    B, C, T, H, W = clip.shape
    frame = indices.repeat_index(B, T, generator, device=clip.device)[:, 0]
    frames = clip[torch.arange(B, device=clip.device), :, frame]  # [B, C, H, W]
    return frames.unsqueeze(2).expand(B, C, T, H, W).contiguous()


def shuffle_negative_vectorized(clip: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Shuffle (swap) negative as one ``torch.gather`` over time with the swap index."""
    B, T = clip.shape[0], clip.shape[2]
    index = indices.swap_index(B, T, generator, device=clip.device)
    return reference.temporal_gather_vectorized(clip, index)


def iic_views_vectorized(clip: torch.Tensor, time_index: torch.Tensor, scaled: bool = True, out=None):
    """(rgb, residual, negative) with one conversion pass, the slice residual and one gather.

    Without mean/std (as IIC trains). A float contiguous clip is returned as rgb itself, as the
    reference does. ``out``: float32 buffers (rgb, residual, negative) to write into (each op's ``out=``).
    """
    if out is not None:
        rgb, res, neg = out
        _unit_float(clip, rgb)
        residual_frames_vectorized(rgb, scaled, out=res)
        B, C, _, H, W = rgb.shape
        To = time_index.shape[1]
        torch.gather(rgb, 2, time_index.view(B, 1, To, 1, 1).expand(B, C, To, H, W), out=neg)
        return out
    if clip.dtype == torch.uint8:
        rgb = torch.empty(clip.shape, dtype=torch.float32, device=clip.device)
        _unit_float(clip, rgb)
    else:
        rgb = clip.contiguous()
    res = residual_frames_vectorized(rgb, scaled)
    return rgb, res, reference.temporal_gather_vectorized(rgb, time_index)


def check():
    """The baselines compute what the reference computes (run by ``python -m benchmarks --check``)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.uint8, torch.float32):
        clip = (torch.rand(3, 3, 16, 6, 5, generator=g) * 255).to(dtype)
        if dtype == torch.float32:
            clip = clip / 255
        for fmt in (torch.contiguous_format, torch.channels_last_3d):
            c = clip.contiguous(memory_format=fmt)
            for scaled in (True, False):
                torch.testing.assert_close(residual_frames_vectorized(c, scaled), reference.residual_frames(c, scaled))
            idx = indices.repeat_index(3, 16, torch.Generator().manual_seed(1))
            want = reference.iic_views(c, idx)
            for a, b in zip(iic_views_vectorized(c, idx), want):
                torch.testing.assert_close(a, b)
            bufs = tuple(torch.full(w.shape, float("nan")) for w in want)
            for a, b in zip(iic_views_vectorized(c, idx, out=bufs), want):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(
                repeat_negative_vectorized(c, torch.Generator().manual_seed(2)),
                reference.repeat_negative(c, torch.Generator().manual_seed(2)),
            )
            torch.testing.assert_close(
                shuffle_negative_vectorized(c, torch.Generator().manual_seed(3)),
                reference.shuffle_negative(c, torch.Generator().manual_seed(3)),
            )
