"""Writers of tiny UCF101-style datasets for the data tests.

Frame content encodes position: R = 5 * x, G = 5 * y, B = 10 + 8 * frame (frame 0-based), so a crop and
the frames of a clip can be read back from the pixels. Flow frames are gray: u = 5 * x, v = 5 * y +
2 * frame.
"""
import os

import numpy as np
from PIL import Image

CLASSES = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
# (list entry, frame count); the HandStandPushups entry lives in a v_HandstandPushups_ folder
VIDEOS = [("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", 24),
          ("HandstandPushups/v_HandStandPushups_g01_c01.avi", 21),
          ("YoYo/v_YoYo_g01_c01.avi", 30),
          ("YoYo/v_YoYo_g02_c01.avi", 19)]


def frame_rgb(f, h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([5 * x, 5 * y, np.full_like(x, 10 + 8 * f)], -1).astype(np.uint8)


def frame_u(f, h, w):
    return (5 * np.mgrid[0:h, 0:w][1]).astype(np.uint8)


def frame_v(f, h, w):
    return (5 * np.mgrid[0:h, 0:w][0] + 2 * f).astype(np.uint8)


def write_splits(root, videos=VIDEOS, classes=CLASSES, folder="split"):
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "classInd.txt"), "w", newline="") as f:
        f.write("".join(f"{i + 1} {c}\r\n" for i, c in enumerate(classes)))
    with open(os.path.join(d, "trainlist01.txt"), "w", newline="") as f:
        f.write("".join(f"{v} {classes.index(v.split('/')[0]) + 1}\r\n" for v, _ in videos))
    with open(os.path.join(d, "testlist01.txt"), "w", newline="") as f:
        f.write("".join(f"{v}\r\n" for v, _ in videos))
    return d


def folder_name(entry):
    stem = os.path.splitext(os.path.basename(entry))[0]
    return stem.replace("HandStandPushups", "HandstandPushups")


def write_frames_dataset(root, size=(40, 48), videos=VIDEOS, flow=True):
    """jpegs_256/<video>/frame%06d.jpg (+ tvl1_flow/{u,v}); ``n`` RGB frames, ``n - 1`` flow frames."""
    write_splits(root, videos)
    h, w = size
    for entry, n in videos:
        name = folder_name(entry)
        for sub, maker, count in [("jpegs_256", frame_rgb, n), ("tvl1_flow/u", frame_u, n - 1),
                                  ("tvl1_flow/v", frame_v, n - 1)]:
            if sub != "jpegs_256" and not flow:
                continue
            d = os.path.join(root, sub, name)
            os.makedirs(d, exist_ok=True)
            for f in range(count):
                Image.fromarray(maker(f, h, w)).save(os.path.join(d, f"frame{f + 1:06d}.jpg"), quality=95)
        open(os.path.join(root, "jpegs_256", name, "n_frames"), "w").write(str(n))
    return root


def write_avi(path, n, size=(48, 64), fps=25):
    import av
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size[1], size[0]
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 4_000_000
        for f in range(n):
            img = np.zeros((size[0], size[1], 3), np.uint8)
            img[..., 2] = 10 + 8 * f
            img[..., 0] = 120
            img[..., 1] = 60
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_video_dataset(root, videos=VIDEOS, size=(48, 64)):
    """UCF-101/<Class>/<video>.avi with the list entry's own file name."""
    write_splits(root, videos, folder="ucfTrainTestlist")
    for entry, n in videos:
        write_avi(os.path.join(root, "UCF-101", entry), n, size)
    return root
