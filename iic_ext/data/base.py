"""Common machinery of the clip datasets: sampling, shared crops, items, bad-data policy."""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError, ShortVideoError
from .sampling import apply_crop, center_crop, clip_starts, draw_crop, sample_generator

__all__ = ["ClipDataset", "MODALITIES"]

MODALITIES = ("rgb", "u", "v")


def _pair(x, name: str) -> tuple[int, int] | None:
    if x is None:
        return None
    if isinstance(x, int):
        return (x, x)
    if len(x) != 2:
        raise ValueError(f"{name} must be an int or (H, W), got {x!r}")
    return (int(x[0]), int(x[1]))


class ClipDataset(Dataset):
    # subclasses whose _load accepts box=(top, left, h, w) and returns that crop of the resized frames
    crops_in_decoder = False

    """Base of the clip datasets. Subclasses provide ``classes``, ``labels``, ``_length(i)``,
    ``_describe(i)`` and ``_load(i, modality, frame_indices, size) -> {frame: uint8 [H, W, 3]}`` (or
    ``[H, W]`` for a single-channel modality, broadcast to 3 channels when the clip is assembled).

    Items are dicts: ``{modality: uint8 [C, T, H, W]}`` (``[N, C, T, H, W]`` when
    ``clips_per_video = N > 1``), ``"label"`` (0-based int) and ``"index"`` (int, the position of the
    video in the dataset; with ``skip_bad`` the position of the video actually returned).
    """

    def __init__(self, *, train: bool = True, modalities: Sequence[str] = ("rgb",), clip_len: int = 16,
                 resize=(128, 171), crop_size=112, clips_per_video: int = 1, seed: int = 0,
                 hflip: bool = False, skip_bad: bool = False, short: str = "error", sampling: str = "auto"):
        if isinstance(modalities, str):
            modalities = (modalities,)
        modalities = tuple(modalities)
        bad = [m for m in modalities if m not in MODALITIES]
        if bad or not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {modalities}")
        if clip_len < 1 or clips_per_video < 1:
            raise ValueError("clip_len and clips_per_video must be positive")
        if short not in ("error", "loop"):
            raise ValueError(f"short must be 'error' or 'loop', got {short!r}")
        if sampling not in ("auto", "random", "fixed"):
            raise ValueError(f"sampling must be 'auto', 'random' or 'fixed', got {sampling!r}")
        # auto: the training list samples at random (window and crop), the test list at fixed
        # positions (linspace windows, centre crop); evaluation extracts the training list 'fixed'.
        self.random_sampling = bool(train) if sampling == "auto" else sampling == "random"
        self.train = bool(train)
        self.modalities = modalities
        self.clip_len = int(clip_len)
        self.resize = _pair(resize, "resize")
        self.crop_size = _pair(crop_size, "crop_size")
        self.clips_per_video = int(clips_per_video)
        self.seed = int(seed)
        self.hflip = bool(hflip)
        self.skip_bad = bool(skip_bad)
        self.short = short
        self.epoch = 0
        self.bad_count = 0  # per process: each DataLoader worker counts its own
        self.bad_videos: set[str] = set()

    # -- interface for subclasses
    classes: tuple[str, ...] = ()
    labels: Sequence[int] = ()

    def _length(self, index: int) -> int:
        raise NotImplementedError

    def _describe(self, index: int) -> str:
        raise NotImplementedError

    def _load(self, index: int, modality: str, frames: Sequence[int], size) -> dict[int, np.ndarray]:
        raise NotImplementedError

    # -- public
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation randomness of an epoch (call before iterating the DataLoader;
        with ``persistent_workers=True`` the workers keep the epoch they were started with)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            if -len(self) <= index < 0:
                index += len(self)
            else:
                raise IndexError(f"index {index} out of range for {len(self)} videos")
        if not self.skip_bad:
            return self._get(index)
        for attempt in range(min(len(self), 100)):
            i = (index + attempt) % len(self)
            try:
                return self._get(i)
            except DataError as exc:
                self.bad_count += 1
                if exc.path not in self.bad_videos:
                    self.bad_videos.add(exc.path)
                    warnings.warn(f"skipping bad video #{i} ({exc}); {self.bad_count} skipped so far",
                                  stacklevel=2)
        raise DataError(self._describe(index), "no readable video among the next 100 entries")

    # -- implementation
    def _get(self, index: int) -> dict:
        T, N = self.clip_len, self.clips_per_video
        length = self._length(index)
        if length < T and (self.short != "loop" or length < 1):
            raise ShortVideoError(self._describe(index),
                                  f"{length} usable frames, a clip needs {T} (short='loop' repeats frames)")
        g = sample_generator(self.seed, self.epoch, index)
        random_window = self.random_sampling and N == 1
        starts = clip_starts(length, T, N, random_window, g)
        indices = [[(s + j) % length for j in range(T)] for s in starts]
        needed = sorted({i for clip in indices for i in clip})

        crops, item, box = None, {}, None
        if self.crops_in_decoder and self.resize is not None and self.crop_size is not None:
            # The frame size is known before decoding: draw the crops now and, when every clip shares
            # one, let the decoder resample just that region of each frame.
            crops = [self._crop(*self.resize, g) for _ in range(N)]
            boxes = {(c.top, c.left, c.height, c.width) for c in crops}
            if len(boxes) == 1:
                box = boxes.pop()
            size = self.crop_size if box else self.resize
        for modality in self.modalities:
            if box is None:
                frames = self._load(index, modality, needed, self.resize)
            else:
                frames = self._load(index, modality, needed, self.resize, box=box)
            h, w = frames[needed[0]].shape[:2]
            if any(a.shape[:2] != (h, w) for a in frames.values()):
                raise DataError(self._describe(index), f"{modality} frames of different sizes (set resize=)")
            if crops is None:
                crops = [self._crop(h, w, g) for _ in range(N)]
                size = (h, w)
            elif (h, w) != size:
                raise DataError(self._describe(index), f"{modality} frames are {h}x{w}, {self.modalities[0]} "
                                                       f"frames {size[0]}x{size[1]} (set resize=)")
            clips = []
            for clip, crop in zip(indices, crops):
                # frames in clip order: [T, H, W, 3], or [T, H, W] for single-channel (flow) frames,
                # broadcast to 3 channels by the one copy that also moves channels first
                sel = torch.from_numpy(np.stack([frames[f] for f in clip]))
                sel = sel.permute(3, 0, 1, 2) if sel.dim() == 4 else sel.unsqueeze(0).expand(3, -1, -1, -1)
                if box is not None:  # already cropped by the decoder; only a flip is left
                    sel = sel.flip(-1) if crop.flip else sel
                elif crop:
                    sel = apply_crop(sel, crop)
                clips.append(sel.contiguous())
            item[modality] = clips[0] if N == 1 else torch.stack(clips)
        item["label"] = int(self.labels[index])
        item["index"] = int(index)
        return item

    def _crop(self, h: int, w: int, g: torch.Generator):
        if self.crop_size is None:
            return None
        if self.random_sampling:
            return draw_crop(h, w, self.crop_size, g, self.hflip)
        return center_crop(h, w, self.crop_size)
