"""Procedural action videos whose class is defined by motion only.

Each video shows one textured object (rectangle, ellipse or triangle, striped in two colours) over a
textured static background. Appearance (background colour and texture, shape, colours, stripe
frequency, size, start position and orientation, video length) is random per video; the class is
the motion:

    0 move_right   1 move_left   2 move_down   3 move_up   4 rotate_cw   5 rotate_ccw
    6 grow         7 shrink      8 oscillate (horizontal back and forth)  9 still

Videos are generated in memory, deterministic per ``(seed, split, index)`` (train and test videos use
different streams), and rendered analytically with torch at the output resolution, only for the
frames a clip needs. Labels are balanced: ``label = index % 10``.

Optical flow (``"u"``, ``"v"``) is the exact motion of each object pixel from frame ``t`` to ``t + 1``
(zero on the background), in pixels at the rendered resolution, encoded like the TV-L1 JPEGs of the
real datasets (a bound of 20 px over the uint8 range) but centred so that zero motion is exactly 128:
``uint8(clip(round(128 + flow * 255 / 40), 0, 255))``, replicated to 3 channels.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import ClipDataset

__all__ = ["SyntheticMotionDataset", "MOTION_CLASSES"]

MOTION_CLASSES = ("move_right", "move_left", "move_down", "move_up", "rotate_cw", "rotate_ccw", "grow",
                  "shrink", "oscillate", "still")
_FLOW_BOUND = 20.0


class SyntheticMotionDataset(ClipDataset):
    """Motion-defined synthetic clips. See :func:`iic_ext.data.build_dataset` for common arguments.

    Extra keyword arguments:
        num_videos (int): videos in this split (default 300 for train, 100 for test).
        frame_size (int | (H, W)): render at this size and resize to ``resize`` (default: render
            directly at ``resize``).
        video_len ((int, int)): range of video lengths in frames, inclusive (default (8, 12); raised
            to at least ``clip_len``). A translation, growth or shrinkage spans the whole video, so
            shorter videos move faster: at the demo's 20x20 frames objects move 0.5-1.25 px per frame.
            At (32, 48) they moved 0.1-0.3 px per frame, under 2% of the residual pixels differed from
            zero and no contrastive objective got above chance in a CPU-sized run.
    """

    def __init__(self, split: int = 1, train: bool = True, *, num_videos: int | None = None,
                 frame_size=None, video_len: tuple[int, int] = (8, 12), **kw):
        super().__init__(train=train, **kw)
        self.split = int(split)
        n = num_videos if num_videos is not None else (300 if train else 100)
        if n < 1:
            raise ValueError("num_videos must be positive")
        self.classes = MOTION_CLASSES
        self.labels = tuple(i % len(MOTION_CLASSES) for i in range(n))
        lo, hi = int(video_len[0]), int(video_len[1])
        lo = max(lo, self.clip_len)
        self.video_len = (lo, max(hi, lo))
        self.frame_size = None if frame_size is None else (
            (frame_size, frame_size) if isinstance(frame_size, int) else tuple(frame_size))
        if self.frame_size is None and self.resize is None:
            raise ValueError("synthetic data needs resize= or frame_size= to know the frame size")
        self._params_cache: tuple[int, dict] = (-1, {})

    def __repr__(self) -> str:
        return (f"SyntheticMotionDataset(train={self.train}, {len(self)} videos, {self.num_classes} classes, "
                f"modalities={self.modalities})")

    def _describe(self, index: int) -> str:
        return f"synthetic:{'train' if self.train else 'test'}/{index}"

    # -- per-video parameters
    def _params(self, index: int) -> dict:
        if self._params_cache[0] == index:
            return self._params_cache[1]
        state = np.random.SeedSequence([self.seed & 0xFFFFFFFF, 0x5EED, self.split, int(self.train), index])
        g = torch.Generator().manual_seed(int(state.generate_state(1, np.uint64)[0] >> 1))

        def u(a, b, shape=()):
            return a + (b - a) * torch.rand(shape, generator=g, dtype=torch.float64).float()

        label = self.labels[index]
        p = {"label": label}
        p["length"] = int(torch.randint(self.video_len[0], self.video_len[1] + 1, (1,), generator=g))
        p["bg"] = u(0.1, 0.9, (3,))
        p["bg_freq"] = u(1.0, 6.0, (3, 2)) * torch.where(torch.rand(3, 2, generator=g) < 0.5, -1.0, 1.0)
        p["bg_phase"] = u(0, 2 * math.pi, (3,))
        p["bg_amp"] = u(0.03, 0.12, (3, 3))
        p["shape"] = int(torch.randint(0, 3, (1,), generator=g))
        p["aspect"] = float(u(0.45, 0.75))
        p["c1"], p["c2"] = u(0, 1, (3,)), u(0, 1, (3,))
        p["stripe_freq"] = float(u(3.0, 7.0))
        p["stripe_phase"] = float(u(0, 2 * math.pi))
        p["theta0"] = float(u(0, 2 * math.pi))
        p["s0"] = float(u(0.2, 0.3))
        p["cx0"], p["cy0"] = float(u(-0.4, 0.4)), float(u(-0.4, 0.4))
        # motion parameters (aspect-independent coordinates: y in [-1, 1], x in [-W/H, W/H])
        p["travel"] = float(u(0.6, 1.0))
        p["omega"] = float(u(0.1, 0.18))  # rad per frame
        p["growth"] = float(u(math.log(3.0), math.log(4.0)))
        p["amp"] = float(u(0.25, 0.4))
        p["period"] = float(u(8.0, 12.0))
        p["phase"] = float(u(0, 2 * math.pi))
        p["start"] = float(u(0, 1))  # where along the allowed range a translation starts
        self._params_cache = (index, p)
        return p

    def _length(self, index: int) -> int:
        return self._params(index)["length"]

    def _pose(self, p: dict, t: torch.Tensor, ext_x: float):
        """Object centre, angle and scale at frame times ``t`` (float tensor)."""
        L, label = p["length"], p["label"]
        tau = t / max(L - 1, 1)
        cx = torch.full_like(t, p["cx0"])
        cy = torch.full_like(t, p["cy0"])
        theta = torch.full_like(t, p["theta0"])
        s = torch.full_like(t, p["s0"])
        if label in (0, 1, 2, 3):
            ext = ext_x if label in (0, 1) else 1.0
            margin = p["s0"] * 1.1
            room = max(2 * ext - 2 * margin - p["travel"], 0.0)
            begin = -ext + margin + p["start"] * room
            pos = begin + p["travel"] * tau
            if label in (1, 3):  # left / up: run the same path backwards
                pos = begin + p["travel"] * (1 - tau)
            if label in (0, 1):
                cx = pos
            else:
                cy = pos
        elif label in (4, 5):
            theta = p["theta0"] + (1 if label == 4 else -1) * p["omega"] * t
        elif label == 6:
            s = 0.1 * torch.exp(p["growth"] * tau)
        elif label == 7:
            s = 0.45 * torch.exp(-p["growth"] * tau)
        elif label == 8:
            cx = p["cx0"] + p["amp"] * torch.sin(2 * math.pi * t / p["period"] + p["phase"])
        return cx, cy, theta, s

    def _render(self, index: int, frames: Sequence[int], modality: str, size: tuple[int, int]) -> torch.Tensor:
        """Render ``[F, H, W, 3]`` uint8 for the given frame indices."""
        p = self._params(index)
        H, W = size
        ext_x = W / H
        t = torch.tensor(list(frames), dtype=torch.float32)
        ys = ((torch.arange(H, dtype=torch.float32) + 0.5) / H * 2 - 1).view(1, H, 1)
        xs = ((torch.arange(W, dtype=torch.float32) + 0.5) / W * 2 - 1).mul(ext_x).view(1, 1, W)
        cx, cy, theta, s = (v.view(-1, 1, 1) for v in self._pose(p, t, ext_x))
        dx, dy = xs - cx, ys - cy
        cos, sin = torch.cos(theta), torch.sin(theta)
        lu = (cos * dx + sin * dy) / s  # object-local coordinates
        lv = (-sin * dx + cos * dy) / s
        a = p["aspect"]
        if p["shape"] == 0:
            inside = (lu.abs() < 1) & (lv.abs() < a)
        elif p["shape"] == 1:
            inside = lu ** 2 + (lv / a) ** 2 < 1
        else:  # triangle pointing along +u
            inside = (lu > -1) & (lu < 1) & (lv.abs() < a * (1 - lu) / 2)

        if modality == "rgb":
            stripe = (torch.sin(lu * p["stripe_freq"] + p["stripe_phase"]) > 0).unsqueeze(-1)
            obj = torch.where(stripe, p["c1"], p["c2"])  # [F, H, W, 3]
            y2, x2 = ys.view(H, 1, 1), xs.view(1, W, 1)
            f = p["bg_freq"]
            tex = (p["bg_amp"][0] * torch.sin(f[0, 0] * x2 + f[0, 1] * y2 + p["bg_phase"][0])
                   + p["bg_amp"][1] * torch.sin(f[1, 0] * x2 + f[1, 1] * y2 + p["bg_phase"][1])
                   + p["bg_amp"][2] * torch.sin(f[2, 0] * x2 + f[2, 1] * y2 + p["bg_phase"][2]))
            bg = (p["bg"] + tex).clamp(0, 1)  # [H, W, 3]
            out = torch.where(inside.unsqueeze(-1), obj, bg)
            return (out * 255).round_().to(torch.uint8)

        # flow: where each object point is one frame later, minus where it is now (pixels)
        cx1, cy1, theta1, s1 = (v.view(-1, 1, 1) for v in self._pose(p, t + 1, ext_x))
        c1, s1n = torch.cos(theta1), torch.sin(theta1)
        x1 = cx1 + s1 * (c1 * lu - s1n * lv)
        y1 = cy1 + s1 * (s1n * lu + c1 * lv)
        flow = (x1 - xs) if modality == "u" else (y1 - ys)
        flow = torch.where(inside, flow * (H / 2), torch.zeros(()))
        enc = (128 + flow * (255 / (2 * _FLOW_BOUND))).round_().clamp_(0, 255).to(torch.uint8)
        return enc.unsqueeze(-1).expand(-1, -1, -1, 3)

    def _load(self, index: int, modality: str, frames: Sequence[int], size) -> dict[int, np.ndarray]:
        render_size = self.frame_size or size
        video = self._render(index, frames, modality, render_size)
        if size is not None and tuple(size) != tuple(render_size):
            x = video.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
            video = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        video = video.contiguous().numpy()
        return {f: video[k] for k, f in enumerate(frames)}
