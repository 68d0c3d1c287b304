"""Residual frames, temporal gather (intra-negatives) and the fused IIC views.

Thin wrappers over ``torch.ops.iic_ext.*`` with their fake (meta) kernels; the autograd formulas are
registered in C++ (csrc/autograd.cpp). When the compiled library is missing they run the pure-PyTorch reference (and warn once).
"""
from typing import Optional, Sequence, Tuple

import torch
from torch._prims_common import suggest_memory_format

from . import indices, reference
from ._library import HAS_C, use_compiled

_VIEW_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _out_dtype(clip, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return torch.float32 if clip.dtype == torch.uint8 else clip.dtype


def _batched(clip: torch.Tensor, name: str = "clip"):
    """[C, T, H, W] -> [1, C, T, H, W]; returns (clip5d, was_unbatched)."""
    if not isinstance(clip, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(clip).__name__}")
    if clip.dim() == 4:
        return clip.unsqueeze(0), True
    if clip.dim() != 5:
        raise RuntimeError(f"{name} must be [B, C, T, H, W] or [C, T, H, W], got shape {tuple(clip.shape)}")
    return clip, False


def residual_frames(
    clip: torch.Tensor, *, scaled: bool = True, out_dtype: Optional[torch.dtype] = None, out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Residual-frame view ``((x - roll(x, 1, time)) + 1) / 2`` in one pass.

    Args:
        clip (Tensor[B, C, T, H, W] or [C, T, H, W]): uint8 (read as x/255), float16, bfloat16, float32 or
            float64, any strides (contiguous, channels_last_3d, sliced views).
        scaled: True for the IIC training/retrieval view; False for ``x - roll(x, 1, time)``, the
            fine-tuning input.
        out_dtype: output dtype; default float32 for uint8, else the input's dtype.
        out (Tensor, optional): written in place (same shape, floating dtype); returned.

    Returns:
        Tensor of clip's shape and memory format. Differentiable for float inputs.
    """
    x, unbatched = _batched(clip)
    if out is not None:
        o = out.unsqueeze(0) if unbatched else out
        if use_compiled():
            torch.ops.iic_ext.residual_frames.out(x, scaled, out=o)
        else:
            o.copy_(reference.residual_frames(x, scaled, o.dtype))
        return out
    if use_compiled():
        y = torch.ops.iic_ext.residual_frames(x, scaled, out_dtype)
    else:
        y = reference.residual_frames(x, scaled, out_dtype)
    return y.squeeze(0) if unbatched else y


def temporal_gather(clip: torch.Tensor, time_index: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out[b, :, t] = clip[b, :, time_index[b, t]]``: the primitive behind the intra-negatives.

    Args:
        clip (Tensor[B, C, T, H, W] or [C, T, H, W]): any dtype of :func:`residual_frames`, any strides.
        time_index (Tensor[B, T_out] or [T_out], int64): frame positions in ``[0, T)``.
        out (Tensor[B, C, T_out, H, W], optional): written in place; returned.

    Returns:
        Tensor[B, C, T_out, H, W] (or unbatched), clip's dtype. Differentiable for float inputs
        (the backward is a scatter-add over time).
    """
    x, unbatched = _batched(clip)
    idx = time_index.unsqueeze(0) if unbatched and time_index.dim() == 1 else time_index
    if out is not None:
        o = out.unsqueeze(0) if unbatched else out
        if use_compiled():
            torch.ops.iic_ext.temporal_gather.out(x, idx, out=o)
        else:
            o.copy_(reference.temporal_gather(x, idx))
        return out
    y = torch.ops.iic_ext.temporal_gather(x, idx) if use_compiled() else reference.temporal_gather(x, idx)
    return y.squeeze(0) if unbatched else y


def repeat_negative(
    clip: torch.Tensor, generator: Optional[torch.Generator] = None, *, return_index: bool = False
):
    """Repeat negative: per sample one frame drawn uniformly from ``generator``, tiled over time.

    Args:
        clip (Tensor[B, C, T, H, W]). Returns Tensor[B, C, T, H, W] (and the time_index [B, T] if asked).
    """
    x, _ = _batched(clip)
    index = indices.repeat_index(x.shape[0], x.shape[2], generator, device=x.device)
    out = temporal_gather(clip, index if clip.dim() == 5 else index[0])
    return (out, index) if return_index else out


def shuffle_negative(
    clip: torch.Tensor, generator: Optional[torch.Generator] = None, mode: str = "swap", *, return_index: bool = False
):
    """Shuffle negative. ``mode``: ``swap`` (the original: 4 ``torch.chunk`` chunks, two distinct ones
    exchanged), ``permute`` (a random non-identity frame permutation) or ``reverse``.

    Args:
        clip (Tensor[B, C, T, H, W]). Returns Tensor[B, C, T, H, W] (and the time_index [B, T] if asked).
    """
    x, _ = _batched(clip)
    B, T = x.shape[0], x.shape[2]
    if mode == "swap":  # the sampler's draws, the index built in one kernel
        index = indices.swap_index(B, T, generator, x.device, build=swap_time_index)
    else:
        index = indices.shuffle_index(B, T, generator, mode, device=x.device)
    out = temporal_gather(clip, index if clip.dim() == 5 else index[0])
    return (out, index) if return_index else out


def swap_time_index(first: torch.Tensor, second: torch.Tensor, num_frames: int, chunks: int = 4) -> torch.Tensor:
    """Time index of the swap negative from its two chunk positions per sample, in one kernel.

    The time axis is cut as ``torch.chunk(x, chunks, dim=time)`` cuts it (n pieces, see
    :func:`iic_ext.ops.indices.chunk_bounds`); row b lists the frames of the pieces in order, with the
    pieces at ``first[b]`` and ``second[b]`` exchanged (equal positions: the frames in order).

    Args:
        first, second (Tensor[B], int64): piece positions in ``[0, n)``, on one device.
        num_frames: T. chunks: as ``torch.chunk``'s (4 in the original).

    Returns:
        Tensor[B, num_frames] (int64), on first's device.
    """
    if use_compiled():
        return torch.ops.iic_ext.swap_time_index(first, second, num_frames, chunks)
    return reference.swap_time_index(first, second, num_frames, chunks)


def iic_views(
    clip: torch.Tensor,
    time_index: torch.Tensor,
    *,
    layout: str = "BCTHW",
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    scaled: bool = True,
    out_dtype: Optional[torch.dtype] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three inputs of an IIC step from one read of a decoded clip batch.

    Args:
        clip: uint8 (read as x/255) or float clips, ``[B, C, T, H, W]`` (``layout="BCTHW"``) or
            ``[B, T, H, W, C]`` as decoded frames come (``layout="BTHWC"``); any strides.
        time_index (Tensor[B, T_out], int64): frames of the negative (see :mod:`iic_ext.ops.indices`).
        mean, std: optional per-channel normalisation of the RGB and negative views.
        scaled: residual view scaled to [0, 1] (``(r + 1) / 2``, IIC training) or not (fine-tuning).
        out_dtype: float32 by default for uint8.
        out (optional): buffers (rgb, residual, negative) of those shapes to write into, contiguous and
            of one floating dtype (the output dtype), e.g. kept from the previous step so that a training
            loop does not allocate and fault in ~55 MB of fresh memory per batch of 8 clips.

    Returns:
        (rgb [B, C, T, H, W], residual [B, C, T, H, W], negative [B, C, T_out, H, W]), contiguous
        (``out`` itself when given).
    """
    if layout == "BTHWC":
        if clip.dim() != 5:
            raise RuntimeError(f"clip must be [B, T, H, W, C] for layout='BTHWC', got shape {tuple(clip.shape)}")
        clip = clip.permute(0, 4, 1, 2, 3)
    elif layout != "BCTHW":
        raise ValueError(f"layout must be 'BCTHW' or 'BTHWC', got {layout!r}")
    mean = None if mean is None else [float(v) for v in mean]
    std = None if std is None else [float(v) for v in std]
    if out is not None:
        rgb, res, neg = out
        if out_dtype is not None and out_dtype != rgb.dtype:
            raise ValueError(f"out_dtype {out_dtype} differs from the dtype of the out buffers ({rgb.dtype})")
        if use_compiled():
            torch.ops.iic_ext.iic_views.out(clip, time_index, mean, std, scaled, rgb=rgb, residual=res, negative=neg)
        else:
            for o, v in zip(out, reference.iic_views(clip, time_index, mean, std, scaled, rgb.dtype)):
                o.copy_(v)
        return out
    if use_compiled():
        return torch.ops.iic_ext.iic_views(clip, time_index, mean, std, scaled, out_dtype)
    return reference.iic_views(clip, time_index, mean, std, scaled, out_dtype)


# ---- fake kernels and autograd ---------------------------------------------------------------------

if HAS_C:

    @torch.library.register_fake("iic_ext::residual_frames")
    def _residual_frames_fake(clip, scaled=True, out_dtype=None):
        return torch.empty(
            clip.shape, dtype=_out_dtype(clip, out_dtype), device=clip.device, memory_format=suggest_memory_format(clip)
        )

    @torch.library.register_fake("iic_ext::residual_frames.out")
    def _residual_frames_out_fake(clip, scaled=True, *, out):
        return None

    @torch.library.register_fake("iic_ext::_residual_frames_backward")
    def _residual_frames_backward_fake(grad, scaled):
        return torch.empty(grad.shape, dtype=grad.dtype, device=grad.device, memory_format=suggest_memory_format(grad))

    @torch.library.register_fake("iic_ext::temporal_gather")
    def _temporal_gather_fake(clip, time_index):
        shape = list(clip.shape)
        shape[2] = time_index.shape[1]
        return torch.empty(shape, dtype=clip.dtype, device=clip.device, memory_format=suggest_memory_format(clip))

    @torch.library.register_fake("iic_ext::temporal_gather.out")
    def _temporal_gather_out_fake(clip, time_index, *, out):
        return None

    @torch.library.register_fake("iic_ext::_temporal_gather_backward")
    def _temporal_gather_backward_fake(grad, time_index, num_frames):
        shape = list(grad.shape)
        shape[2] = num_frames
        return grad.new_empty(shape)

    @torch.library.register_fake("iic_ext::iic_views.out")
    def _iic_views_out_fake(clip, time_index, mean=None, std=None, scaled=True, *, rgb, residual, negative):
        return None

    @torch.library.register_fake("iic_ext::swap_time_index")
    def _swap_time_index_fake(first, second, num_frames, chunks=4):
        return first.new_empty((first.shape[0], num_frames))

    @torch.library.register_fake("iic_ext::iic_views")
    def _iic_views_fake(clip, time_index, mean=None, std=None, scaled=True, out_dtype=None):
        dt = _out_dtype(clip, out_dtype)
        neg_shape = list(clip.shape)
        neg_shape[2] = time_index.shape[1]
        return (
            clip.new_empty(clip.shape, dtype=dt),
            clip.new_empty(clip.shape, dtype=dt),
            clip.new_empty(neg_shape, dtype=dt),
        )
