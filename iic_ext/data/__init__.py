"""Video clip datasets for IIC: UCF101, HMDB51 (frames or raw videos) and a synthetic motion set."""
from __future__ import annotations

import os
from typing import Sequence

from .base import MODALITIES, ClipDataset
from .errors import CorruptDataError, DataError, MissingDataError, ShortVideoError, SplitError
from .sampling import sample_generator
from .splits import Split, find_split_dir, read_split
from .synthetic import MOTION_CLASSES, SyntheticMotionDataset
from .video_datasets import VideoClipDataset

__all__ = ["build_dataset", "DATASET_NAMES", "MODALITIES", "MOTION_CLASSES", "ClipDataset",
           "VideoClipDataset", "SyntheticMotionDataset", "DataError", "MissingDataError",
           "CorruptDataError", "ShortVideoError", "SplitError", "Split", "read_split", "find_split_dir",
           "sample_generator"]

DATASET_NAMES = ("ucf101", "hmdb51", "synthetic")


def build_dataset(name: str = "synthetic", root: str | os.PathLike | None = None, split: int = 1,
                  train: bool = True, modalities: Sequence[str] = ("rgb",), clip_len: int = 16,
                  resize=(128, 171), crop_size=112, clips_per_video: int = 1, seed: int = 0,
                  **kw) -> ClipDataset:
    """Build a clip dataset.

    Args:
        name (str): ``ucf101``, ``hmdb51`` or ``synthetic``.
        root (str): dataset folder (required for ucf101/hmdb51; unused for synthetic).
        split (int): 1, 2 or 3.
        train (bool): training list (random window and crop) or test list (linspace clips, centre crop).
        modalities (Sequence[str]): any of ``rgb``, ``u``, ``v``; only these are decoded.
        clip_len (int): frames per clip.
        resize (int | (H, W) | None): frame size before cropping (original: (128, 171)).
        crop_size (int | (H, W) | None): crop, shared by every frame and modality of a clip.
        clips_per_video (int): N clips at linspace positions; items gain a leading N dimension if N > 1.
        seed (int): base of the per-item generator seeded from (seed, epoch, index).
        **kw: ``hflip`` (default False), ``skip_bad`` (skip unreadable videos with a warning, default
            False), ``short`` (``"error"`` or ``"loop"``), and the dataset-specific options of
            :class:`VideoClipDataset` (``split_dir``, ``layout``, ``frames_dir``, ``flow_dir``,
            ``video_dir``, ``fast_jpeg``) or :class:`SyntheticMotionDataset` (``num_videos``,
            ``frame_size``, ``video_len``).

    Returns:
        ClipDataset: items ``{"rgb"/"u"/"v": uint8 [C, T, H, W] or [N, C, T, H, W], "label": int,
        "index": int}``; attributes ``num_classes``, ``classes``; ``set_epoch(e)``.
    """
    common = dict(train=train, modalities=modalities, clip_len=clip_len, resize=resize, crop_size=crop_size,
                  clips_per_video=clips_per_video, seed=seed)
    key = name.lower()
    if key == "synthetic":
        return SyntheticMotionDataset(split=split, **common, **kw)
    if key in ("ucf101", "hmdb51"):
        return VideoClipDataset(key, root, split=split, **common, **kw)
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASET_NAMES}")
