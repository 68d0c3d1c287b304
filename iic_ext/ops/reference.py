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
