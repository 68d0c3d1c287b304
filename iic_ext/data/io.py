"""Frame and video decoding into resized uint8 arrays.

JPEG frames are decoded with PIL using ``Image.draft`` (DCT-domain downscaling) when the source is at
least twice the target size in both dimensions, then resized with bilinear filtering (what
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


def read_image(path: str, size: tuple[int, int] | None, gray: bool = False, draft: bool = True) -> np.ndarray:
    """Decode one image to ``uint8 [H, W, 3]`` (gray images are replicated to 3 channels).

    Args:
        path: image file.
        size: ``(H, W)`` to resize to, or None to keep the decoded size.
        gray: decode as a single channel (optical-flow frames).
        draft: allow JPEG DCT-scaled decoding when the source is at least twice ``size``.
    """
    mode = "L" if gray else "RGB"
    try:
        with Image.open(path) as img:
            if draft and size is not None and img.format == "JPEG":
                h, w = size
                if img.width >= 2 * w and img.height >= 2 * h:
                    img.draft(mode, (w, h))
            img = img.convert(mode)
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img)
    except FileNotFoundError:
        raise MissingDataError(path, "frame not found") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise CorruptDataError(path, f"cannot decode image ({exc})") from exc
    if gray:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr


def read_frames(folder: str, names: Sequence[str], indices: Iterable[int], size: tuple[int, int] | None,
                gray: bool = False, draft: bool = True) -> dict[int, np.ndarray]:
    """Decode the frames ``names[i]`` for the distinct ``indices``; returns ``{i: uint8 [H, W, 3]}``."""
    out = {}
    for i in sorted(set(indices)):
        out[i] = read_image(os.path.join(folder, names[i]), size, gray=gray, draft=draft)
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


def read_video_frames(path: str, indices: Iterable[int], size: tuple[int, int] | None) -> dict[int, np.ndarray]:
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
            if size is not None and (img.height, img.width) != tuple(size):
                img = img.resize((size[1], size[0]), Image.BILINEAR)
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
