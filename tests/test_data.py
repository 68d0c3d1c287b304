"""Data path: split readers, both storage layouts, sampling, shared crops, seeding, bad data, synthetic."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data_utils import VIDEOS, folder_name, write_avi, write_frames_dataset, write_video_dataset
from iic_ext.data import (CorruptDataError, DataError, MissingDataError, ShortVideoError, build_dataset,
                          read_split)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = os.path.join(REPO, "..", "shared", "splits")
needs_splits = pytest.mark.skipif(not os.path.isdir(SPLITS), reason=f"real split files not found at {SPLITS}")
T = 8  # clip length in the tiny datasets


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- split files

@needs_splits
def test_ucf101_official_lists():
    tr = read_split(os.path.join(SPLITS, "ucf101"), 1, train=True)
    te = read_split(os.path.join(SPLITS, "ucf101"), 1, train=False)
    assert (len(tr), len(te), len(tr.classes)) == (9537, 3783, 101)
    assert tr.classes[0] == "ApplyEyeMakeup" and tr.classes[36] == "HandstandPushups"
    assert tr.videos[0] == "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi" and tr.labels[0] == 0
    assert set(tr.labels) == set(te.labels) == set(range(101))
    assert not any("\r" in v or " " in v for v in tr.videos + te.videos)
    hs = [(v, l) for v, l in zip(tr.videos, tr.labels) if "HandStandPushups" in v]
    assert hs and all(l == 36 for _, l in hs)
    assert not set(tr.videos) & set(te.videos)
    for s in (2, 3):
        assert len(read_split(os.path.join(SPLITS, "ucf101"), s, True)) + \
            len(read_split(os.path.join(SPLITS, "ucf101"), s, False)) == 13320


@needs_splits
def test_hmdb51_lists():
    tr = read_split(os.path.join(SPLITS, "hmdb51"), 1, train=True)
    te = read_split(os.path.join(SPLITS, "hmdb51"), 1, train=False)
    assert (len(tr), len(te), len(tr.classes)) == (3570, 1530, 51)
    assert tr.classes[:3] == ("brush_hair", "cartwheel", "catch") and tr.classes[-1] == "wave"
    assert set(tr.labels) == set(range(51))
    assert tr.labels[0] == tr.classes.index("shoot_gun")


def test_hmdb51_official_format(tmp_path):
    d = tmp_path / "testTrainMulti_7030_splits"
    d.mkdir()
    (d / "wave_test_split1.txt").write_text("a_wave_0.avi 1 \nb_wave_1.avi 2 \nc_wave_2.avi 0 \n")
    (d / "clap_test_split1.txt").write_text("d_clap_0.avi 2 \ne_clap_1.avi 1 \n")
    ds = build_dataset("hmdb51", tmp_path, train=True, layout="video", video_dir=str(tmp_path))
    assert ds.classes == ("clap", "wave") and ds.num_classes == 2
    assert list(ds.videos) == ["clap/e_clap_1.avi", "wave/a_wave_0.avi"] and list(ds.labels) == [0, 1]
    te = read_split(str(d), 1, train=False)
    assert list(te.videos) == ["clap/d_clap_0.avi", "wave/b_wave_1.avi"]


# ---------------------------------------------------------------- tiny datasets

@pytest.fixture(scope="module")
def frames_root(tmp_path_factory):
    return str(write_frames_dataset(str(tmp_path_factory.mktemp("ucf_frames"))))


@pytest.fixture(scope="module")
def video_root(tmp_path_factory):
    return str(write_video_dataset(str(tmp_path_factory.mktemp("ucf_videos"))))


def read_back(rgb):
    """(frame indices, top, left) of an rgb clip [3, T, H, W] built from data_utils.frame_rgb."""
    r = rgb.float()
    frames = ((r[2].mean((1, 2)) - 10) / 8).round().long().tolist()
    h, w = r.shape[-2:]
    left = round(float(r[0].mean()) / 5 - (w - 1) / 2)
    top = round(float(r[1].mean()) / 5 - (h - 1) / 2)
    return frames, top, left


def decoded(root, entry, sub, frames, gray):
    d = os.path.join(root, sub, folder_name(entry))
    imgs = []
    for f in frames:
        img = np.asarray(Image.open(os.path.join(d, f"frame{f + 1:06d}.jpg")).convert("L" if gray else "RGB"))
        imgs.append(np.repeat(img[..., None], 3, 2) if gray else img)
    return torch.from_numpy(np.stack(imgs)).permute(3, 0, 1, 2)


def test_frames_train_clip_and_shared_crop(frames_root):
    ds = build_dataset("ucf101", frames_root, modalities=("rgb", "u", "v"), clip_len=T, resize=(40, 48),
                       crop_size=24, seed=3)
    assert len(ds) == 4 and ds.num_classes == 3 and ds.layout == "frames"
    crops = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i, (entry, n) in enumerate(VIDEOS):
            item = ds[i]
            assert set(item) == {"rgb", "u", "v", "label", "index"}
            assert item["index"] == i and item["label"] == [0, 1, 2, 2][i]
            for m in ("rgb", "u", "v"):
                assert item[m].shape == (3, T, 24, 24) and item[m].dtype == torch.uint8
                assert item[m].is_contiguous()
            frames, top, left = read_back(item["rgb"])
            start = frames[0]
            assert frames == list(range(start, start + T))
            assert 0 <= start <= (n - 1) - T  # len - 1 usable frames so flow aligns
            assert 0 <= top <= 16 and 0 <= left <= 24
            crops.add((top, left))
            # every frame and every modality carries exactly this one crop
            for m, sub in (("rgb", "jpegs_256"), ("u", "tvl1_flow/u"), ("v", "tvl1_flow/v")):
                full = decoded(frames_root, entry, sub, frames, gray=m != "rgb")
                assert torch.equal(item[m], full[:, :, top:top + 24, left:left + 24]), (m, i)
    assert len(crops) > 3  # crops are random


def test_frames_test_clips_linspace_and_center(frames_root):
    ds = build_dataset("ucf101", frames_root, train=False, clip_len=T, resize=(40, 48), crop_size=24,
                       clips_per_video=3)
    for i, (entry, n) in enumerate(VIDEOS):
        item = ds[i]
        assert item["rgb"].shape == (3, 3, T, 24, 24)
        length = n - 1
        expected = [int(c - T / 2) for c in np.linspace(T / 2, length - T / 2, 3)]
        for k in range(3):
            frames, top, left = read_back(item["rgb"][k])
            assert frames == list(range(expected[k], expected[k] + T))
            assert (top, left) == (8, 12)
    one = build_dataset("ucf101", frames_root, train=False, clip_len=T, resize=(40, 48), crop_size=24)
    assert one[0]["rgb"].shape == (3, T, 24, 24) and read_back(one[0]["rgb"])[0][0] == 0


def test_modalities_decoded_on_demand(frames_root, tmp_path):
    ds = build_dataset("ucf101", frames_root, modalities=("v",), clip_len=T, resize=(40, 48), crop_size=24)
    assert set(ds[0]) == {"v", "label", "index"}
    # rgb only: flow folders are never touched
    root = write_frames_dataset(str(tmp_path), flow=False)
    assert build_dataset("ucf101", root, clip_len=T, resize=(40, 48), crop_size=24)[0]["rgb"].shape[1] == T


def test_resize_with_jpeg_draft(tmp_path):
    root = write_frames_dataset(str(tmp_path), size=(96, 128), videos=VIDEOS[:1], flow=False)
    fast = build_dataset("ucf101", root, train=False, clip_len=T, resize=(32, 40), crop_size=None)[0]["rgb"]
    slow = build_dataset("ucf101", root, train=False, clip_len=T, resize=(32, 40), crop_size=None,
                         fast_jpeg=False)[0]["rgb"]
    assert fast.shape == slow.shape == (3, T, 32, 40)
    assert (fast.float() - slow.float()).abs().mean() < 3


def test_determinism_and_epochs(frames_root):
    kw = dict(clip_len=T, resize=(40, 48), crop_size=24)
    a = build_dataset("ucf101", frames_root, seed=1, **kw)
    b = build_dataset("ucf101", frames_root, seed=1, **kw)
    c = build_dataset("ucf101", frames_root, seed=2, **kw)
    sig = lambda ds: [read_back(ds[i]["rgb"]) for i in range(4)]
    assert sig(a) == sig(b)
    assert sig(a) != sig(c)
    e0 = sig(a)
    a.set_epoch(1)
    assert sig(a) != e0
    a.set_epoch(0)
    assert sig(a) == e0


def test_worker_seeding_matches_single_process(frames_root):
    ds = build_dataset("ucf101", frames_root, modalities=("rgb", "u"), clip_len=T, resize=(40, 48),
                       crop_size=24, seed=5)
    ds.set_epoch(2)
    batches = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=2, shuffle=False, num_workers=workers)
        batches.append(list(loader))
    for x, y in zip(*batches):
        assert torch.equal(x["rgb"], y["rgb"]) and torch.equal(x["u"], y["u"])
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["index"], y["index"])
    assert batches[0][0]["rgb"].shape == (2, 3, T, 24, 24)


def test_video_layout(video_root):
    ds = build_dataset("ucf101", video_root, clip_len=T, resize=(48, 64), crop_size=32, seed=0)
    assert ds.layout == "video" and ds.num_classes == 3
    for i, (entry, n) in enumerate(VIDEOS):
        item = ds[i]
        assert item["rgb"].shape == (3, T, 32, 32) and item["label"] == [0, 1, 2, 2][i]
        frames = read_back(item["rgb"])[0]
        assert frames == list(range(frames[0], frames[0] + T)) and 0 <= frames[0] <= n - T
    te = build_dataset("ucf101", video_root, train=False, clip_len=T, resize=(24, 32), crop_size=16,
                       clips_per_video=3)
    item = te[2]
    assert item["rgb"].shape == (3, 3, T, 16, 16)
    n = VIDEOS[2][1]  # every decoded frame is usable for videos
    for k, c in enumerate(np.linspace(T / 2, n - T / 2, 3)):
        assert read_back(item["rgb"][k])[0][0] == int(c - T / 2)
    with pytest.raises(ValueError, match="flow"):
        build_dataset("ucf101", video_root, modalities=("rgb", "u"))


# ---------------------------------------------------------------- bad data

def test_bad_frames_are_named(tmp_path):
    root = write_frames_dataset(str(tmp_path), flow=False)
    kw = dict(clip_len=T, resize=(40, 48), crop_size=24, train=False)
    # corrupt JPEG
    bad = os.path.join(root, "jpegs_256", folder_name(VIDEOS[0][0]), "frame000001.jpg")
    open(bad, "wb").write(b"\xff\xd8garbage")
    with pytest.raises(CorruptDataError, match="frame000001.jpg"):
        build_dataset("ucf101", root, **kw)[0]
    # missing folder
    missing = os.path.join(root, "jpegs_256", folder_name(VIDEOS[2][0]))
    os.rename(missing, missing + "_gone")
    with pytest.raises(MissingDataError, match="v_YoYo_g01_c01") as info:
        build_dataset("ucf101", root, **kw)[2]
    assert isinstance(info.value, FileNotFoundError) and info.value.path.endswith("v_YoYo_g01_c01")
    # too short for the clip (18 usable frames)
    with pytest.raises(ShortVideoError, match="v_YoYo_g02_c01.*18 usable frames"):
        build_dataset("ucf101", root, **dict(kw, clip_len=20))[3]
    looped = build_dataset("ucf101", root, short="loop", **dict(kw, clip_len=20))[3]["rgb"]
    assert read_back(looped)[0] == list(range(18)) + [0, 1]
    # skip_bad: warn, count, return the next readable video
    ds = build_dataset("ucf101", root, skip_bad=True, **kw)
    with pytest.warns(UserWarning, match="frame000001.jpg"):
        item = ds[0]
    assert item["index"] == 1 and ds.bad_count == 1
    with pytest.warns(UserWarning, match="v_YoYo_g01_c01"):
        assert ds[2]["index"] == 3
    assert ds.bad_count == 2


def test_bad_videos_are_named(tmp_path):
    root = write_video_dataset(str(tmp_path), videos=VIDEOS[:2])
    path = os.path.join(root, "UCF-101", VIDEOS[0][0])
    open(path, "wb").write(open(path, "rb").read()[:200])
    ds = build_dataset("ucf101", root, clip_len=T, resize=(48, 64), crop_size=32)
    with pytest.raises(CorruptDataError, match="v_ApplyEyeMakeup_g01_c01.avi"):
        ds[0]
    os.remove(os.path.join(root, "UCF-101", VIDEOS[1][0]))
    with pytest.raises(MissingDataError, match="v_HandStandPushups_g01_c01.avi"):
        ds[1]
    with pytest.raises(DataError, match="no split files"):
        build_dataset("ucf101", str(tmp_path / "UCF-101"))


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_determinism():
    kw = dict(clip_len=T, resize=(32, 32), crop_size=28, num_videos=20)
    ds = build_dataset("synthetic", modalities=("rgb", "u", "v"), **kw)
    assert len(ds) == 20 and ds.num_classes == 10 and len(ds.classes) == 10
    item = ds[7]
    for m in ("rgb", "u", "v"):
        assert item[m].shape == (3, T, 28, 28) and item[m].dtype == torch.uint8
    assert item["label"] == 7 and item["index"] == 7
    again = build_dataset("synthetic", modalities=("rgb", "u", "v"), **kw)[7]
    assert all(torch.equal(item[m], again[m]) for m in ("rgb", "u", "v"))
    test = build_dataset("synthetic", train=False, clips_per_video=2, **kw)
    assert test[7]["rgb"].shape == (2, 3, T, 28, 28)
    assert not torch.equal(test[7]["rgb"][0], item["rgb"])  # other videos
    # rendering at a native size, then resizing
    small = build_dataset("synthetic", frame_size=16, clip_len=T, resize=(32, 32), crop_size=28, num_videos=2)
    assert small[0]["rgb"].shape == (3, T, 28, 28)
    # loader default collate
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["rgb"].shape == (4, 3, T, 28, 28) and batch["label"].tolist() == [0, 1, 2, 3]


def test_synthetic_classes_differ_by_motion():
    ds = build_dataset("synthetic", modalities=("rgb", "u", "v"), train=False, clip_len=T, resize=(96, 96),
                       crop_size=None, num_videos=40)
    for i in range(40):
        item = ds[i]
        label = ds.classes[item["label"]]
        rgb = item["rgb"].float()
        u = (item["u"][0].float() - 128) * 40 / 255  # pixels
        v = (item["v"][0].float() - 128) * 40 / 255
        moving = (u.abs() + v.abs()) > 0.1  # one encoding step is 40/255 px
        if label == "still":
            assert torch.equal(rgb[:, 0], rgb[:, -1]) and not moving.any()
            continue
        assert not torch.equal(rgb[:, 0], rgb[:, -1]), label
        mu, mv = u[moving].mean(), v[moving].mean()
        yy, xx = torch.meshgrid(torch.arange(96.0), torch.arange(96.0), indexing="ij")
        # object centre per frame from the flow support
        cx = (xx * moving).sum((1, 2)) / moving.sum((1, 2))
        cy = (yy * moving).sum((1, 2)) / moving.sum((1, 2))
        rx, ry = xx - cx[:, None, None], yy - cy[:, None, None]
        r2 = (rx ** 2 + ry ** 2)[moving].mean()
        curl = (rx * v - ry * u)[moving].mean() / r2  # rad per frame, positive clockwise (y down)
        div = (rx * u + ry * v)[moving].mean() / r2  # relative growth per frame
        checks = {"move_right": lambda: mu > 0.3, "move_left": lambda: mu < -0.3, "move_down": lambda: mv > 0.3,
                  "move_up": lambda: mv < -0.3, "rotate_cw": lambda: curl > 0.05, "rotate_ccw": lambda: curl < -0.05,
                  "grow": lambda: div > 0.01, "shrink": lambda: div < -0.01,
                  "oscillate": lambda: mv.abs() < 0.05 and u[moving].abs().mean() > 0.3}
        assert checks[label](), (i, label, float(mu), float(mv), float(curl), float(div))


def test_fixed_sampling_on_the_training_list_is_centre_cropped_and_epoch_independent():
    ds = build_dataset("synthetic", train=True, clip_len=4, resize=(20, 24), crop_size=12, num_videos=10,
                       sampling="fixed")
    a = ds[3]["rgb"]
    ds.set_epoch(5)
    assert torch.equal(a, ds[3]["rgb"])
    full = build_dataset("synthetic", train=True, clip_len=4, resize=(20, 24), crop_size=None, num_videos=10,
                         sampling="fixed")[3]["rgb"]
    assert torch.equal(a, full[:, :, 4:16, 6:18])  # centre 12x12 of 20x24
    rand = build_dataset("synthetic", train=True, clip_len=4, resize=(20, 24), crop_size=12, num_videos=10)
    crops = {tuple(rand[3]["rgb"].flatten()[:50].tolist()) for e in range(6) if rand.set_epoch(e) is None}
    assert len(crops) > 1
    with pytest.raises(ValueError, match="sampling"):
        build_dataset("synthetic", sampling="bogus")


@pytest.mark.parametrize("src,size", [((128, 170), (128, 171)), ((120, 171), (128, 171)), ((128, 171), (128, 171)),
                                      ((100, 150), (128, 171))])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_decoder_crop_equals_box_resample(src, size, mode):
    # a unit-scale axis is cropped instead of resampled: exactly the pixels of PIL's box resample
    from iic_ext.data.io import _resize

    rng = np.random.default_rng(0)
    shape = src + ((3,) if mode == "RGB" else ())
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
    for top, left, h, w in ((0, 0, 112, 112), (16, 59, 112, 112), (7, 3, 50, 90)):
        sy, sx = img.height / size[0], img.width / size[1]
        want = img.resize((w, h), Image.BILINEAR, box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        got = _resize(img, size, (top, left, h, w))
        assert got.size == (w, h)
        assert np.array_equal(np.asarray(got), np.asarray(want)), (top, left, h, w)
