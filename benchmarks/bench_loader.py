"""Group ``loader``: clips per second of ``iic_ext.data`` against the original loading strategy.

Both read the same JPEG files (a temporary ``jpegs_256`` + ``tvl1_flow/{u,v}`` tree of 340×256 frames,
the layout and size of the released UCF101 frames) through a ``DataLoader`` with the same number of
workers and batch size, and return 16×112×112 clips.

The original strategy, written here after the original dataset class: every frame of the window is
opened with PIL and turned into a numpy array for RGB, u and v whatever the modality, then each frame of
each used modality is converted back to a PIL image, resized to 128×171, cropped to 112 and converted
to a float tensor (ToTensor: HWC uint8 -> CHW float / 255), and the frames are stacked. torchvision is
not a dependency, so ``Resize`` (bilinear on PIL images), ``RandomCrop`` and ``ToTensor`` are written out
with PIL and torch; they cost what torchvision's do on PIL images. The crop is drawn once per clip (the
fixed behaviour): this changes the pixels, not the work.

``iic_ext.data`` returns uint8 ``[C, T, H, W]``; its conversion to float happens later, inside
``iic_views`` (measured in the ``views`` group), so the arms are compared clip for clip as the training
step receives them.
"""
import os
import random
import shutil
import tempfile
import time
from typing import List

import numpy as np
import torch
from PIL import Image

from .harness import Config, Stats, make_rows

MODALITIES = ("rgb", "u", "v")


def write_frames(root: str, videos: int, frames: int, size=(256, 340), seed: int = 0) -> List[str]:
    """A UCF101-like frames tree with smooth moving content (JPEG sizes near real frames')."""
    rng = np.random.default_rng(seed)
    h, w = size
    split = os.path.join(root, "split")
    os.makedirs(split, exist_ok=True)
    names = []
    for v in range(videos):
        name = f"v_Synthetic_g{v // 4 + 1:02d}_c{v % 4 + 1:02d}"
        names.append(name)
        base = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3)).astype(np.uint8)
        big = np.asarray(Image.fromarray(base).resize((w + 64, h + 64), Image.BICUBIC))
        for sub in ("jpegs_256", "tvl1_flow/u", "tvl1_flow/v"):
            os.makedirs(os.path.join(root, sub, name), exist_ok=True)
        for f in range(frames):
            dx, dy = (2 * f) % 64, f % 64
            img = big[dy:dy + h, dx:dx + w]
            noise = rng.integers(0, 12, img.shape, dtype=np.uint8)
            Image.fromarray(img + noise).save(os.path.join(root, "jpegs_256", name, f"frame{f + 1:06d}.jpg"), quality=90)
            if f < frames - 1:  # flow has one frame fewer, as the released frames
                for k, sub in enumerate(("u", "v")):
                    flow = (128 + (img[..., k].astype(np.int16) - 128) // 8).astype(np.uint8)
                    Image.fromarray(flow).save(os.path.join(root, "tvl1_flow", sub, name, f"frame{f + 1:06d}.jpg"), quality=90)
    with open(os.path.join(split, "classInd.txt"), "w") as f:
        f.write("1 Synthetic\n")
    with open(os.path.join(split, "trainlist01.txt"), "w") as f:
        f.write("".join(f"Synthetic/{n}.avi 1\n" for n in names))
    with open(os.path.join(split, "testlist01.txt"), "w") as f:
        f.write("".join(f"Synthetic/{n}.avi\n" for n in names))
    return names


class OriginalStrategyClips(torch.utils.data.Dataset):
    """The original loading strategy (see the module docstring); items ``{modality: float [3, T, 112, 112]}``."""

    def __init__(self, root: str, names: List[str], modalities, clip_len: int = 16, resize=(128, 171), crop: int = 112):
        self.root, self.names, self.modalities = root, names, tuple(modalities)
        self.clip_len, self.resize, self.crop = clip_len, resize, crop

    def __len__(self):
        return len(self.names)

    def _load(self, folder, start):
        out = []
        for i in range(start, start + self.clip_len):
            with Image.open(os.path.join(folder, f"frame{i + 1:06d}.jpg")) as img:
                out.append(np.array(img.convert("RGB")))  # flow: one channel read as 3
        return np.stack(out)

    def __getitem__(self, index):
        name = self.names[index]
        length = len([f for f in os.listdir(os.path.join(self.root, "jpegs_256", name)) if f.endswith(".jpg")]) - 1
        start = random.randint(0, length - self.clip_len)
        videos = {  # every modality is decoded, whatever is used
            "rgb": self._load(os.path.join(self.root, "jpegs_256", name), start),
            "u": self._load(os.path.join(self.root, "tvl1_flow", "u", name), start),
            "v": self._load(os.path.join(self.root, "tvl1_flow", "v", name), start),
        }
        h, w = self.resize
        top, left = random.randint(0, h - self.crop), random.randint(0, w - self.crop)
        item = {}
        for m in self.modalities:
            frames = []
            for frame in videos[m]:
                img = Image.fromarray(frame)  # ToPILImage
                img = img.resize((w, h), Image.BILINEAR)  # Resize((128, 171))
                img = img.crop((left, top, left + self.crop, top + self.crop))  # RandomCrop(112)
                t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)  # ToTensor
                frames.append(t)
            item[m] = torch.stack(frames).permute(1, 0, 2, 3)
        item["index"] = index
        return item


def _pass_s(loader) -> float:
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        n += 1
    return time.perf_counter() - t0


def run(cfg: Config):
    if cfg.device != "cpu":
        return [], []  # data loading runs on the CPU; measured once, in the cpu results
    from iic_ext.data import build_dataset

    workers = min(4, os.cpu_count() or 1)
    videos, frames = (8, 24) if cfg.quick else (32, 48)
    batch = 4 if cfg.quick else 8
    passes = 2 if cfg.quick else 5
    rows, notes = [], []
    root = tempfile.mkdtemp(prefix="iic_bench_frames_")
    try:
        t0 = time.perf_counter()
        names = write_frames(root, videos, frames)
        cfg.log(f"  wrote {videos} videos × {frames} frames (340×256, rgb + u + v) in {time.perf_counter() - t0:.1f} s")
        for mods in (("rgb",), ("rgb", "u", "v")):
            fused_ds = build_dataset("ucf101", root, split=1, train=True, modalities=mods, clip_len=16,
                                     resize=(128, 171), crop_size=112)
            orig_ds = OriginalStrategyClips(root, names, mods)
            a, b = fused_ds[0], orig_ds[0]
            assert a[mods[0]].shape == b[mods[0]].shape == (3, 16, 112, 112), (a[mods[0]].shape, b[mods[0]].shape)
            loaders = {
                name: torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=False, num_workers=workers,
                                                  persistent_workers=workers > 0, drop_last=False)
                for name, ds in (("fused", fused_ds), ("original", orig_ds))
            }
            for ld in loaders.values():
                _pass_s(ld)  # start the workers, fill the page cache
            times = {k: [] for k in loaders}
            for _ in range(passes):
                for k, ld in loaders.items():
                    times[k].append(_pass_s(ld) / videos * 1e3)  # ms per clip, all workers together
            stats = {k: Stats.of(s) for k, s in times.items()}
            rows += make_rows(cfg, "loader", "clip loader (frames)", (3, 16, 112, 112), torch.uint8, stats, {}, None,
                              ["original"], variant="+".join(mods), workers=workers, batch_size=batch,
                              clips_per_s=1e3 / stats["fused"].median_ms,
                              reference_clips_per_s=1e3 / stats["original"].median_ms,
                              source="340×256 JPEG frames")
            r = rows[-1]
            cfg.log(f"  loader    {'+'.join(mods):12s} iic_ext.data {r['clips_per_s']:.1f} clips/s, original "
                    f"{r['reference_clips_per_s']:.1f} clips/s ({r['ratio']:.2f}x), {workers} workers")
            del loaders
        notes.append(f"loader: {videos} videos of {frames} frames, {workers} DataLoader workers, batch {batch}; "
                     "times are ms per clip (1000 / clips per second); peak memory is not measured (workers)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows, notes
