"""Frame and video decoding into resized uint8 arrays.

JPEG frames are decoded with PIL using ``Image.draft`` (DCT-domain downscaling by 2, 4 or 8) when the
reduced image still covers the target size (within 2%: 340x256 frames decode at 170x128 for a 128x171
target), then resized with bilinear filtering (what
torchvision's ``Resize`` does on PIL images). Videos are decoded with PyAV on one thread, stopping
after the last frame needed.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import CorruptDataError, MissingDataError

__all__ = ["list_frames", "read_image", "read_frames", "video_frame_count", "read_video_frames"]

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_frames(folder: str) -> list[str]:
    """Sorted frame file names in ``folder`` (non-image files such as ``n_frames`` are ignored)."""
    if not os.path.isdir(folder):
        raise MissingDataError(folder, "frame folder not found")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(FRAME_EXTENSIONS))


# A DCT-scaled decode may land this much below the target and be resized up the rest of the way:
# jpegs_256 frames (340 x 256) decode at half size to 170 x 128 for the 171 x 128 target.
DRAFT_TOLERANCE = 0.98


def _draft(img, mode: str, size: tuple[int, int]) -> None:
    """Ask the JPEG decoder for the largest 1/2, 1/4 or 1/8 reduction that still (nearly) covers ``size``."""
    h, w = size
    for k in (8, 4, 2):
        dw, dh = -(-img.width // k), -(-img.height // k)
        if dw >= DRAFT_TOLERANCE * w and dh >= DRAFT_TOLERANCE * h:
            img.draft(mode, (dw, dh))
            return


def _resize(img, size, box):
    """Resize ``img`` to ``size`` (H, W), or only the region ``box`` = (top, left, h, w) of that resized
    image: resampling just the crop gives the same pixels (to a rounding step) for less work. An axis
    that keeps its size is cropped before resampling, so the filter runs along the other axis only
    (the same pixels: a unit-scale bilinear pass is the identity)."""
    if box is None:
        if (img.height, img.width) != tuple(size):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return img
    top, left, h, w = box
    same_h, same_w = img.height == size[0], img.width == size[1]
    if same_h or same_w:
        img = img.crop((left if same_w else 0, top if same_h else 0,
                        left + w if same_w else img.width, top + h if same_h else img.height))
        if same_h and same_w:
            return img
        top, left = (0 if same_h else top), (0 if same_w else left)
        size = (h if same_h else size[0], w if same_w else size[1])
    sy, sx = img.height / size[0], img.width / size[1]
    return img.resize((w, h), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))


def read_image(path: str, size: tuple[int, int] | None, gray: bool = False, draft: bool = True,
               box: tuple[int, int, int, int] | None = None, replicate: bool = True) -> np.ndarray:
    """Decode one image to ``uint8 [H, W, 3]`` (gray images are replicated to 3 channels).

    Args:
        path: image file.
        size: ``(H, W)`` to resize to, or None to keep the decoded size.
        gray: decode as a single channel (optical-flow frames).
        draft: allow JPEG DCT-scaled decoding when the source is (nearly) twice ``size`` or more.
        box: ``(top, left, h, w)``: return only this crop of the resized image (requires ``size``).
        replicate: with ``gray``, False returns ``uint8 [H, W]`` (one channel, to be broadcast later).
    """
    mode = "L" if gray else "RGB"
    try:
        with Image.open(path) as img:
            if draft and size is not None and img.format == "JPEG":
                _draft(img, mode, size)
            if img.mode != mode:
                img = img.convert(mode)
            else:
                img.load()
            if size is not None:
                img = _resize(img, size, box)
            arr = np.asarray(img)
    except FileNotFoundError:
        raise MissingDataError(path, "frame not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(path, f"cannot decode image ({exc})") from exc
    if gray and replicate:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def read_frames(folder: str, names: Sequence[str], indices: Iterable[int], size: tuple[int, int] | None,
                gray: bool = False, draft: bool = True, box=None, replicate: bool = True) -> dict[int, np.ndarray]:
    """Decode the frames ``names[i]`` for the distinct ``indices``; returns ``{i: uint8 [H, W, 3]}``
    (``[H, W]`` for gray frames with ``replicate=False``)."""
    out = {}
    for i in sorted(set(indices)):
        out[i] = read_image(os.path.join(folder, names[i]), size, gray=gray, draft=draft, box=box,
                            replicate=replicate)
    return out


def _open(path: str):
    import av
    if not os.path.isfile(path):
        raise MissingDataError(path, "video file not found")
    try:
        container = av.open(path)
    except Exception as exc:  # PyAV raises FFmpegError subclasses, also for truncated files
        raise CorruptDataError(path, f"cannot open video ({exc})") from exc
    if not container.streams.video:
        container.close()
        raise CorruptDataError(path, "no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = 1
    return container, stream


def video_frame_count(path: str) -> int:
    """Number of decodable frames, counted by decoding (container headers are not always exact)."""
    container, stream = _open(path)
    try:
        n = 0
        for _ in container.decode(stream):
            n += 1
        return n
    except Exception as exc:
        raise CorruptDataError(path, f"decoding failed after {n} frames ({exc})") from exc
    finally:
        container.close()


def read_video_frames(path: str, indices: Iterable[int], size: tuple[int, int] | None,
                      box=None) -> dict[int, np.ndarray]:
    """Decode frames at the given 0-based indices; returns ``{i: uint8 [H, W, 3]}``.

    Decodes sequentially from the start and stops after the largest index, converting only the
    requested frames (decoding order is exact for any codec; no reliance on timestamps).
    """
    wanted_set = set(indices)
    wanted = sorted(wanted_set)
    if not wanted:
        return {}
    container, stream = _open(path)
    out: dict[int, np.ndarray] = {}
    n = -1
    try:
        for n, frame in enumerate(container.decode(stream)):
            if n not in wanted_set:
                if n >= wanted[-1]:
                    break
                continue
            img = frame.to_image()
            if size is not None:
                img = _resize(img, size, box)
            out[n] = np.asarray(img)
            if n >= wanted[-1]:
                break
    except Exception as exc:
        raise CorruptDataError(path, f"decoding failed at frame {n + 1} ({exc})") from exc
    finally:
        container.close()
    if len(out) != len(wanted):
        raise CorruptDataError(path, f"video ended after {n + 1} frames, frame {wanted[-1]} requested")
    return out
