"""Clip sampling, shared crops and the per-sample random generator.

Seeding: every random choice for item ``index`` in epoch ``epoch`` comes from one ``torch.Generator``
seeded with ``numpy.random.SeedSequence([seed, epoch, index])``. It does not depend on the process,
the worker or the order of requests, so ``num_workers=0`` and ``num_workers>0`` give the same items,
and ``set_epoch(e)`` gives fresh but reproducible windows and crops each epoch.

Draw order per item: the window start of every clip (training with one clip only), then for each clip
the crop top, the crop left and (only with ``hflip=True``) the flip coin (training only; test crops are
centred).

Temporal positions, with ``length`` usable frames and clip length ``T``:

* training (``train=True``, one clip): start ~ uniform integer in ``[0, length - T]``;
* test/retrieval (``train=False`` or ``clips_per_video > 1``): as the original code, clip ``k`` has
  centre ``c_k = numpy.linspace(T/2, length - T/2, N)[k]`` and starts at ``int(c_k - T/2)``
  (truncation; with ``N = 1`` the single clip starts at frame 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["sample_generator", "clip_starts", "Crop", "draw_crop", "center_crop"]


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def _randint(low: int, high: int, g: torch.Generator) -> int:
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def clip_starts(length: int, clip_len: int, num_clips: int, random: bool, g: torch.Generator | None) -> list[int]:
    """Start frames of the clips; ``length`` may be shorter than ``clip_len`` (looping), giving 0."""
    if random:
        return [_randint(0, max(length - clip_len, 0), g) for _ in range(num_clips)]
    centres = np.linspace(clip_len / 2, length - clip_len / 2, num_clips)
    return [max(int(c - clip_len / 2), 0) for c in centres]


@dataclass(frozen=True)
class Crop:
    top: int
    left: int
    height: int
    width: int
    flip: bool = False


def draw_crop(h: int, w: int, size: tuple[int, int], g: torch.Generator, hflip: bool = False) -> Crop:
    ch, cw = size
    if ch > h or cw > w:
        raise ValueError(f"crop {size} larger than frame {(h, w)}")
    top = _randint(0, h - ch, g)
    left = _randint(0, w - cw, g)
    flip = bool(torch.rand((), generator=g) < 0.5) if hflip else False
    return Crop(top, left, ch, cw, flip)


def center_crop(h: int, w: int, size: tuple[int, int]) -> Crop:
    ch, cw = size
    if ch > h or cw > w:
        raise ValueError(f"crop {size} larger than frame {(h, w)}")
    # torchvision's CenterCrop rounding
    return Crop(int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0)), ch, cw)


def apply_crop(frames: torch.Tensor, crop: Crop) -> torch.Tensor:
    """Crop ``[..., H, W]`` (and flip) with one crop for every frame; returns a view when not flipped."""
    out = frames[..., crop.top:crop.top + crop.height, crop.left:crop.left + crop.width]
    return out.flip(-1) if crop.flip else out
