"""UCF101 and HMDB51 readers for pre-decoded frames and for raw videos.

Storage layouts (detected from ``root`` unless ``layout=`` is given):

* ``"frames"``: ``<root>/jpegs_256/<video>/frame000001.jpg ...`` and optical flow
  ``<root>/tvl1_flow/{u,v}/<video>/frame000001.jpg ...`` (single-channel JPEGs, returned replicated to
  3 channels). As in the original code, a video's usable length is ``len(rgb frames) - 1`` so that RGB
  frame ``i`` aligns with flow frame ``i``, and flow frames are read under the RGB frame names. When
  only flow is requested and the RGB folder is absent, the length is the number of ``u`` frames.
* ``"video"``: ``<root>/UCF-101/<Class>/<video>.avi`` (UCF101) or ``<root>/<class>/<video>.avi``
  (HMDB51; also ``<root>/videos/``, ``<root>/hmdb51/``), decoded with PyAV. Every decodable frame is
  usable; flow modalities are not available.

Video folder names are looked up case-insensitively when the exact name is absent, which covers the
UCF101 list entries ``v_HandStandPushups_*`` whose frame folders are named ``v_HandstandPushups_*``.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .base import ClipDataset
from .errors import MissingDataError
from .io import list_frames, read_frames, read_video_frames, video_frame_count
from .splits import find_split_dir, read_split

__all__ = ["VideoClipDataset"]

_VIDEO_ROOTS = {"ucf101": ("UCF-101", "UCF101", "videos", ""), "hmdb51": ("hmdb51", "HMDB51", "videos", "")}


class VideoClipDataset(ClipDataset):
    """UCF101 / HMDB51 clips. See :func:`iic_ext.data.build_dataset` for the arguments.

    Extra keyword arguments:
        split_dir (str): folder with the split files (default: searched under ``root``).
        layout (str): ``"auto"``, ``"frames"`` or ``"video"``.
        frames_dir (str), flow_dir (str), video_dir (str): override the layout folders.
        fast_jpeg (bool): allow PIL ``draft`` DCT-scaled JPEG decoding (default True).
    """

    def __init__(self, name: str, root: str | os.PathLike | None, split: int = 1, train: bool = True, *,
                 split_dir: str | None = None, layout: str = "auto", frames_dir: str | None = None,
                 flow_dir: str | None = None, video_dir: str | None = None, fast_jpeg: bool = True, **kw):
        super().__init__(train=train, **kw)
        if name not in _VIDEO_ROOTS:
            raise ValueError(f"unknown dataset {name!r}")
        if root is None:
            raise ValueError(f"{name}: root= (the dataset folder) is required")
        self.name = name
        self.root = os.fspath(root)
        if not os.path.isdir(self.root):
            raise MissingDataError(self.root, "dataset root not found")
        self.split_dir = os.fspath(split_dir) if split_dir is not None else find_split_dir(self.root)
        s = read_split(self.split_dir, split, train)
        self.split = int(split)
        self.classes = s.classes
        self.videos = s.videos
        self.labels = s.labels
        self.fast_jpeg = fast_jpeg

        self.frames_dir = os.fspath(frames_dir) if frames_dir else os.path.join(self.root, "jpegs_256")
        self.flow_dir = os.fspath(flow_dir) if flow_dir else os.path.join(self.root, "tvl1_flow")
        if layout == "auto":
            layout = "frames" if (frames_dir or flow_dir or os.path.isdir(self.frames_dir)
                                  or os.path.isdir(self.flow_dir)) and not video_dir else "video"
        if layout not in ("frames", "video"):
            raise ValueError(f"layout must be 'auto', 'frames' or 'video', got {layout!r}")
        self.layout = layout
        if layout == "video":
            if set(self.modalities) - {"rgb"}:
                raise ValueError(f"{name}: flow modalities need pre-decoded tvl1_flow frames "
                                 f"(not found at {self.flow_dir})")
            self.video_dir = os.fspath(video_dir) if video_dir else self._find_video_dir()
        self._listings: dict[str, dict[str, str]] = {}
        self._counts: dict[int, int] = {}
        self._names_cache: tuple[int, list[str]] = (-1, [])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, split={self.split}, train={self.train}, "
                f"{len(self)} videos, {self.num_classes} classes, layout={self.layout}, "
                f"modalities={self.modalities})")

    # -- paths
    def _find_video_dir(self) -> str:
        first_class = self.videos[0].split("/")[0] if self.videos else ""
        for sub in _VIDEO_ROOTS[self.name]:
            cand = os.path.join(self.root, sub) if sub else self.root
            if os.path.isdir(os.path.join(cand, first_class)):
                return cand
        raise MissingDataError(self.root, f"neither jpegs_256/ nor a video folder holding {first_class}/ "
                                          f"(looked in {[s or '.' for s in _VIDEO_ROOTS[self.name]]})")

    def _resolve(self, parent: str, name: str, what: str, entry: str) -> str:
        path = os.path.join(parent, name)
        if os.path.exists(path):
            return path
        if parent not in self._listings:
            try:
                self._listings[parent] = {n.lower(): n for n in os.listdir(parent)}
            except OSError:
                self._listings[parent] = {}
        actual = self._listings[parent].get(name.lower())
        if actual is None:
            raise MissingDataError(path, f"{what} for '{entry}' not found")
        return os.path.join(parent, actual)

    def _describe(self, index: int) -> str:
        entry = self.videos[index]
        if self.layout == "video":
            return os.path.join(self.video_dir, entry)
        return os.path.join(self.frames_dir, os.path.splitext(os.path.basename(entry))[0])

    def video_path(self, index: int, modality: str = "rgb") -> str:
        """The video file or frame folder of item ``index``."""
        entry = self.videos[index]
        if self.layout == "video":
            cls, fname = entry.split("/", 1)
            cls_dir = self._resolve(self.video_dir, cls, "class folder", entry)
            return self._resolve(cls_dir, fname, "video file", entry)
        stem = os.path.splitext(os.path.basename(entry))[0]
        parent = self.frames_dir if modality == "rgb" else os.path.join(self.flow_dir, modality)
        return self._resolve(parent, stem, f"{modality} frame folder", entry)

    def _frame_names(self, index: int) -> list[str]:
        # One listing serves the length and every modality of the item being built.
        if self._names_cache[0] != index:
            if "rgb" in self.modalities or os.path.isdir(self.frames_dir):
                names = list_frames(self.video_path(index, "rgb"))
            else:
                names = list_frames(self.video_path(index, "u"))
            self._names_cache = (index, names)
        return self._names_cache[1]

    # -- ClipDataset interface
    def _length(self, index: int) -> int:
        if self.layout == "video":
            if index not in self._counts:
                self._counts[index] = video_frame_count(self.video_path(index))
            return self._counts[index]
        names = self._frame_names(index)
        aligned = "rgb" in self.modalities or os.path.isdir(self.frames_dir)
        return len(names) - 1 if aligned else len(names)

    # the decoder resamples only the crop of each resized frame (see ClipDataset._get)
    crops_in_decoder = True

    def _load(self, index: int, modality: str, frames: Sequence[int], size, box=None) -> dict[int, np.ndarray]:
        if self.layout == "video":
            return read_video_frames(self.video_path(index), frames, size, box=box)
        names = self._frame_names(index)
        return read_frames(self.video_path(index, modality), names, frames, size, gray=modality != "rgb",
                           draft=self.fast_jpeg, box=box, replicate=False)
