"""Retrieval: top-k on hand-built features, clip positions, merge, cache, key reporting, CLI."""
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from iic_ext.evaluation.common import build_eval_dataset, load_backbone_weights, str2bool
from iic_ext.evaluation.features import extract_features
from iic_ext.evaluation.retrieval import knn_classify, nearest_neighbours, neighbour_mask, topk_retrieval
from iic_ext.models import build_model
from iic_ext.ops import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tiny synthetic settings shared by the end-to-end cases (R3D needs >= 32 px for the conv5 pooling).
TINY = ["--clip-len", "4", "--resize", "32", "32", "--crop-size", "32", "--clips-per-video", "2",
        "--num-videos", "6", "--num-test-videos", "4", "--batch-size", "4", "--workers", "0",
        "--no-progress", "--no-plot", "--ckpt", "none"]


# ---- top-k on hand-built features -------------------------------------------------------------------

def _unit(angles_deg):
    a = torch.tensor(angles_deg, dtype=torch.float64) * torch.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], 1)


def test_topk_known_answers():
    # Gallery on the unit circle; cosine order is angular distance.
    gallery = _unit([0, 10, 20, 90, 180])
    g_labels = torch.tensor([0, 1, 2, 3, 4])
    query = _unit([1, 19, 178, 150]) * torch.tensor([[2.0], [0.5], [3.0], [1.0]], dtype=torch.float64)  # scale-free
    q_labels = torch.tensor([0, 1, 3, 2])
    # q0 nearest: 0 (hit at 1). q1 nearest: 20, 10 -> label 1 at rank 2. q2 nearest: 180, 90 -> label 3 at
    # rank 2. q3 (150 deg): 180, 90, 20, 10, 0 -> label 2 at rank 3.
    correct = topk_retrieval(query, q_labels, gallery, g_labels, ks=(1, 2, 3, 5))
    assert correct == {1: 1, 2: 3, 3: 4, 5: 4}


def test_topk_k_larger_than_gallery_is_clamped():
    gallery = _unit([0, 90])
    correct = topk_retrieval(_unit([45, 45, 45]), torch.tensor([0, 1, 7]), gallery, torch.tensor([0, 1]),
                             ks=(1, 2, 50))
    # k=50 > 2 train videos: every train video is a neighbour; label 7 is never found.
    assert correct[50] == correct[2] == 2


def test_ties_go_to_lower_index():
    # Gallery items 1, 2 and 3 are identical: equally similar to the query.
    gallery = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([9, 5, 6, 7, 8])
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    mask = neighbour_mask(q @ gallery.T, 2)
    assert mask.tolist() == [[False, True, True, False, False]]
    # Exactly k neighbours even with a tie across the boundary: class 7 (index 3) is not among the top-2.
    assert topk_retrieval(q, torch.tensor([7]), gallery, labels, ks=(1, 2, 3)) == {1: 0, 2: 0, 3: 1}
    assert topk_retrieval(q, torch.tensor([6]), gallery, labels, ks=(1, 2)) == {1: 0, 2: 1}
    idx, sim = nearest_neighbours(q, gallery, 4)
    assert idx.tolist() == [[1, 2, 3, 0]]
    assert sim[0, :3].tolist() == [1.0, 1.0, 1.0]


def test_topk_matches_bruteforce_any_chunking():
    g = torch.Generator().manual_seed(0)
    gallery = torch.randn(37, 6, generator=g)
    query = torch.randn(23, 6, generator=g)
    gl = torch.randint(0, 4, (37,), generator=g)
    ql = torch.randint(0, 4, (23,), generator=g)
    order = np.argsort(-(torch.nn.functional.normalize(query, dim=1)
                         @ torch.nn.functional.normalize(gallery, dim=1).T).numpy(), axis=1, kind="stable")
    expected = {k: int(sum(ql[i].item() in gl[order[i, :k]].tolist() for i in range(23))) for k in (1, 5, 10, 20, 50)}
    for chunk in (None, 1, 5, 100):
        assert topk_retrieval(query, ql, gallery, gl, chunk_size=chunk) == expected


def test_knn_weighted_vote():
    gallery = _unit([0, 5, 10, 100, 110])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Query at 2 deg: 3-NN are 0, 5, 10 -> class 0 (2 votes vs 1).
    assert knn_classify(_unit([2]), gallery, labels, k=3).tolist() == [0]
    # k=5 majority (no weighting): class 1 has 3 of 5.
    assert knn_classify(_unit([2]), gallery, labels, k=5, temperature=0).tolist() == [1]
    # Weighted: the two near class-0 items outweigh the far class-1 ones.
    assert knn_classify(_unit([2]), gallery, labels, k=5, temperature=0.07).tolist() == [0]


# ---- clip positions and crops -----------------------------------------------------------------------

class _Args:
    dataset, data_root, split, clip_len, resize, crop_size, data_seed = "synthetic", None, 1, 8, [36, 40], 32, 5
    num_videos, num_test_videos, clips_per_video = 3, 3, 10


@pytest.mark.parametrize("train", [True, False])
def test_ten_clips_at_linspace_positions_centre_crop(train):
    ds = build_eval_dataset(_Args(), train=train, modalities=("rgb",))
    item = ds[1]
    clips = item["rgb"]
    assert clips.shape == (10, 3, 8, 32, 32)
    length = ds._length(1)
    starts = [int(c - 8 / 2) for c in np.linspace(8 / 2, length - 8 / 2, 10)]
    frames = ds._load(1, "rgb", list(range(length)), (36, 40))
    video = torch.from_numpy(np.stack([frames[f] for f in range(length)])).permute(3, 0, 1, 2)  # [3, L, H, W]
    top, left = 2, 4  # centre of 36x40 -> 32x32
    for k, s in enumerate(starts):
        expect = video[:, s:s + 8, top:top + 32, left:left + 32]
        assert torch.equal(clips[k], expect), f"clip {k} (start {s}) differs"


# ---- feature extraction: merge and averaging ----------------------------------------------------------

class _MeanModel(nn.Module):
    """Feature = per-channel mean of the clip and of its first frame (6-d)."""

    def forward(self, x):
        return torch.cat([x.mean((2, 3, 4)), x[:, :, 0].mean((2, 3))], 1)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n=5, clips=3, u=False):
        g = torch.Generator().manual_seed(1)
        self.items = []
        for i in range(n):
            item = {"rgb": torch.randint(0, 256, (clips, 3, 4, 5, 5), generator=g, dtype=torch.uint8),
                    "label": i % 2, "index": i}
            if u:
                item["u"] = torch.randint(0, 256, (clips, 3, 4, 5, 5), generator=g, dtype=torch.uint8)
            self.items.append(item)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_merge_concatenates_rgb_then_modality_and_averages_clips():
    ds = _ListDataset()
    m = _MeanModel()
    out = extract_features(m, ds, "res", merge=True, batch_size=2, progress=False)
    f = out["features"]
    assert f.shape == (5, 12) and out["labels"].tolist() == [0, 1, 0, 1, 0]
    assert out["indices"].tolist() == list(range(5))  # batch 2 over 5 videos: the last one kept
    for i, item in enumerate(ds.items):
        rgb = item["rgb"].float() / 255
        res = reference.residual_frames(item["rgb"], True, torch.float32)
        expect = torch.cat([m(rgb), m(res)], 1).mean(0)  # per clip concat, then the mean over clips
        torch.testing.assert_close(f[i], expect)
    plain = extract_features(m, ds, "res", merge=False, batch_size=3, progress=False)["features"]
    torch.testing.assert_close(f[:, 6:], plain)  # no per-part normalisation
    flow = _ListDataset(u=True)
    fu = extract_features(m, flow, "u", merge=True, batch_size=5, progress=False)["features"]
    torch.testing.assert_close(fu[0], torch.cat([m(flow.items[0]["rgb"].float() / 255),
                                                 m(flow.items[0]["u"].float() / 255)], 1).mean(0))


# ---- checkpoint key reporting -------------------------------------------------------------------------

def test_key_mismatch_is_reported(tmp_path):
    src = build_model("r3d")
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("conv5.block1.bn2")}
    sd["contrast_bank"] = torch.zeros(3)
    path = tmp_path / "ssl.pth"
    torch.save({"model": sd}, path)
    model = build_model("r3d", with_classifier=True, num_classes=10)
    buf = io.StringIO()
    missing, unexpected = load_backbone_weights(model, str(path), stream=buf)
    text = buf.getvalue()
    assert "linear.weight" in missing and "newly initialised as expected" in text
    assert "conv5.block1.bn2.weight" in text and "missing from the checkpoint" in text
    assert unexpected == ["contrast_bank"] and "not used by the model" in text
    with pytest.raises(RuntimeError, match="strict"):
        load_backbone_weights(model, str(path), strict=True, stream=io.StringIO())
    torch.save({"model": {"foo": torch.zeros(1)}}, path)
    with pytest.raises(RuntimeError, match="no tensor"):
        load_backbone_weights(model, str(path), stream=io.StringIO())


# ---- the command: json, cache reuse, original flags ---------------------------------------------------

def test_retrieve_cli_json_and_cache_reuse(tmp_path, capsys):
    from iic_ext import retrieve

    out = tmp_path / "r"
    TINY_OUT = TINY + ["--feature-dir", str(out / "features")]
    res = retrieve.cli(TINY_OUT + ["--out", str(out), "--knn", "3", "--modality", "res"])
    saved = json.loads((out / "retrieval.json").read_text())
    for k in (1, 5, 10, 20, 50):
        assert 0.0 <= saved[f"top{k}"] <= 1.0
    assert saved["top50"] == 1.0 or saved["top50"] == saved["top20"]  # 6 train videos: k clamped
    assert saved["num_test"] == 4 and saved["num_train"] == 6
    assert saved["settings"]["extracted"] == ["train", "test"]
    assert "RANDOM INIT" in capsys.readouterr().out
    # Same settings: features come from the cache, same numbers.
    res2 = retrieve.cli(TINY_OUT + ["--out", str(out), "--modality", "res", "--no-extract"])
    assert res2["settings"]["extracted"] == []
    assert all(res2[f"top{k}"] == res[f"top{k}"] for k in (1, 5, 10, 20, 50))
    # Other settings: another cache key; --no-extract refuses to compute.
    with pytest.raises(FileNotFoundError, match="no cached"):
        retrieve.cli(TINY_OUT + ["--out", str(out), "--modality", "rgb", "--no-extract"])
    assert len([d for d in os.listdir(out / "features") if not d.startswith(".")]) == 1


def test_original_flags_parse():
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import retrieve_clips
    finally:
        sys.path.pop(0)
    a = retrieve_clips.parse_args(["--ckpt", "x.pth", "--dataset", "ucf101", "--merge=True", "--cl", "16",
                                   "--bs", "8", "--gpu", "0", "--extract=False", "--modality", "rgb",
                                   "--feature_dir", "feats", "--id", "run1", "--workers", "2"])
    assert a.merge is True and a.extract is False and a.clip_len == 16 and a.batch_size == 8 and a.gpu == 0
    assert a.dataset == "ucf101" and a.modality == "rgb" and a.workers == 2 and a.out == os.path.join("feats", "run1")
    b = retrieve_clips.parse_args(["--merge", "False"])
    assert b.merge is False and b.dataset == "ucf101" and b.modality == "res" and b.workers == 8
    assert str2bool("True") and not str2bool("False")


# ---- linear probe ---------------------------------------------------------------------------------------

def test_logistic_probe_separable_and_wd_selection():
    from iic_ext.evaluation.probe import accuracy, fit_logistic, select_weight_decay, standardize

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=g, dtype=torch.float64) * 4
    y = torch.arange(60) % 3
    x = centres[y] + torch.randn(60, 8, generator=g, dtype=torch.float64)
    xt, = standardize(x)
    for opt in ("lbfgs", "sgd"):
        layer = fit_logistic(xt, y, 3, weight_decay=1e-3, optimizer=opt, epochs=10, max_iter=50)
        assert accuracy(layer, xt, y) == 1.0
    chosen = select_weight_decay(x, y, 3, [1e-4, 1e2], max_iter=50)
    assert chosen["weight_decay"] in (1e-4, 1e2) and set(chosen["val_acc"]) == {1e-4, 1e2}
    assert select_weight_decay(x, y, 3, [0.5]) == {"weight_decay": 0.5, "val_acc": {}}
