"""Backbones: checkpoint key/shape compatibility with the original modules, forward shapes, loading."""
import argparse
import logging
import warnings

import pytest
import torch

from iic_ext.models import C3D, CheckpointError, R2Plus1DNet, R3DNet, build_model, load_weights

# Expected state-dict entries (in order) of the original IIC modules (models/c3d.py, models/r3d.py,
# models/r21d.py, identical to VCOP's) built with with_classifier=True, num_classes=101. "name BN<c>"
# stands for the five BatchNorm3d entries name.{weight,bias,running_mean,running_var} of shape [c]
# and name.num_batches_tracked (scalar). R(2+1)D intermediate widths follow
# floor(t*h*w*in*out / (h*w*in + t*out)), e.g. 83 for the 3x7x7 stem.

C3D_KEYS = """
conv1.weight 64x3x3x3x3
conv1.bias 64
bn1 BN64
conv2.weight 128x64x3x3x3
conv2.bias 128
bn2 BN128
conv3a.weight 256x128x3x3x3
conv3a.bias 256
bn3a BN256
conv3b.weight 256x256x3x3x3
conv3b.bias 256
bn3b BN256
conv4a.weight 512x256x3x3x3
conv4a.bias 512
bn4a BN512
conv4b.weight 512x512x3x3x3
conv4b.bias 512
bn4b BN512
conv5a.weight 512x512x3x3x3
conv5a.bias 512
bn5a BN512
conv5b.weight 512x512x3x3x3
conv5b.bias 512
bn5b BN512
linear.weight 101x512
linear.bias 101
"""

R3D10_KEYS = """
conv1.temporal_spatial_conv.weight 64x3x3x7x7
bn1 BN64
conv2.block1.conv1.temporal_spatial_conv.weight 64x64x3x3x3
conv2.block1.bn1 BN64
conv2.block1.conv2.temporal_spatial_conv.weight 64x64x3x3x3
conv2.block1.bn2 BN64
conv3.block1.downsampleconv.temporal_spatial_conv.weight 128x64x1x1x1
conv3.block1.downsamplebn BN128
conv3.block1.conv1.temporal_spatial_conv.weight 128x64x3x3x3
conv3.block1.bn1 BN128
conv3.block1.conv2.temporal_spatial_conv.weight 128x128x3x3x3
conv3.block1.bn2 BN128
conv4.block1.downsampleconv.temporal_spatial_conv.weight 256x128x1x1x1
conv4.block1.downsamplebn BN256
conv4.block1.conv1.temporal_spatial_conv.weight 256x128x3x3x3
conv4.block1.bn1 BN256
conv4.block1.conv2.temporal_spatial_conv.weight 256x256x3x3x3
conv4.block1.bn2 BN256
conv5.block1.downsampleconv.temporal_spatial_conv.weight 512x256x1x1x1
conv5.block1.downsamplebn BN512
conv5.block1.conv1.temporal_spatial_conv.weight 512x256x3x3x3
conv5.block1.bn1 BN512
conv5.block1.conv2.temporal_spatial_conv.weight 512x512x3x3x3
conv5.block1.bn2 BN512
linear.weight 101x512
linear.bias 101
"""

R21D10_KEYS = """
conv1.spatial_conv.weight 83x3x1x7x7
conv1.bn BN83
conv1.temporal_conv.weight 64x83x3x1x1
bn1 BN64
conv2.block1.conv1.spatial_conv.weight 144x64x1x3x3
conv2.block1.conv1.bn BN144
conv2.block1.conv1.temporal_conv.weight 64x144x3x1x1
conv2.block1.bn1 BN64
conv2.block1.conv2.spatial_conv.weight 144x64x1x3x3
conv2.block1.conv2.bn BN144
conv2.block1.conv2.temporal_conv.weight 64x144x3x1x1
conv2.block1.bn2 BN64
conv3.block1.downsampleconv.spatial_conv.weight 42x64x1x1x1
conv3.block1.downsampleconv.bn BN42
conv3.block1.downsampleconv.temporal_conv.weight 128x42x1x1x1
conv3.block1.downsamplebn BN128
conv3.block1.conv1.spatial_conv.weight 230x64x1x3x3
conv3.block1.conv1.bn BN230
conv3.block1.conv1.temporal_conv.weight 128x230x3x1x1
conv3.block1.bn1 BN128
conv3.block1.conv2.spatial_conv.weight 288x128x1x3x3
conv3.block1.conv2.bn BN288
conv3.block1.conv2.temporal_conv.weight 128x288x3x1x1
conv3.block1.bn2 BN128
conv4.block1.downsampleconv.spatial_conv.weight 85x128x1x1x1
conv4.block1.downsampleconv.bn BN85
conv4.block1.downsampleconv.temporal_conv.weight 256x85x1x1x1
conv4.block1.downsamplebn BN256
conv4.block1.conv1.spatial_conv.weight 460x128x1x3x3
conv4.block1.conv1.bn BN460
conv4.block1.conv1.temporal_conv.weight 256x460x3x1x1
conv4.block1.bn1 BN256
conv4.block1.conv2.spatial_conv.weight 576x256x1x3x3
conv4.block1.conv2.bn BN576
conv4.block1.conv2.temporal_conv.weight 256x576x3x1x1
conv4.block1.bn2 BN256
conv5.block1.downsampleconv.spatial_conv.weight 170x256x1x1x1
conv5.block1.downsampleconv.bn BN170
conv5.block1.downsampleconv.temporal_conv.weight 512x170x1x1x1
conv5.block1.downsamplebn BN512
conv5.block1.conv1.spatial_conv.weight 921x256x1x3x3
conv5.block1.conv1.bn BN921
conv5.block1.conv1.temporal_conv.weight 512x921x3x1x1
conv5.block1.bn1 BN512
conv5.block1.conv2.spatial_conv.weight 1152x512x1x3x3
conv5.block1.conv2.bn BN1152
conv5.block1.conv2.temporal_conv.weight 512x1152x3x1x1
conv5.block1.bn2 BN512
linear.weight 101x512
linear.bias 101
"""

R3D18_KEYS = """
conv1.temporal_spatial_conv.weight 64x3x3x7x7
bn1 BN64
conv2.block1.conv1.temporal_spatial_conv.weight 64x64x3x3x3
conv2.block1.bn1 BN64
conv2.block1.conv2.temporal_spatial_conv.weight 64x64x3x3x3
conv2.block1.bn2 BN64
conv2.blocks.0.conv1.temporal_spatial_conv.weight 64x64x3x3x3
conv2.blocks.0.bn1 BN64
conv2.blocks.0.conv2.temporal_spatial_conv.weight 64x64x3x3x3
conv2.blocks.0.bn2 BN64
conv3.block1.downsampleconv.temporal_spatial_conv.weight 128x64x1x1x1
conv3.block1.downsamplebn BN128
conv3.block1.conv1.temporal_spatial_conv.weight 128x64x3x3x3
conv3.block1.bn1 BN128
conv3.block1.conv2.temporal_spatial_conv.weight 128x128x3x3x3
conv3.block1.bn2 BN128
conv3.blocks.0.conv1.temporal_spatial_conv.weight 128x128x3x3x3
conv3.blocks.0.bn1 BN128
conv3.blocks.0.conv2.temporal_spatial_conv.weight 128x128x3x3x3
conv3.blocks.0.bn2 BN128
conv4.block1.downsampleconv.temporal_spatial_conv.weight 256x128x1x1x1
conv4.block1.downsamplebn BN256
conv4.block1.conv1.temporal_spatial_conv.weight 256x128x3x3x3
conv4.block1.bn1 BN256
conv4.block1.conv2.temporal_spatial_conv.weight 256x256x3x3x3
conv4.block1.bn2 BN256
conv4.blocks.0.conv1.temporal_spatial_conv.weight 256x256x3x3x3
conv4.blocks.0.bn1 BN256
conv4.blocks.0.conv2.temporal_spatial_conv.weight 256x256x3x3x3
conv4.blocks.0.bn2 BN256
conv5.block1.downsampleconv.temporal_spatial_conv.weight 512x256x1x1x1
conv5.block1.downsamplebn BN512
conv5.block1.conv1.temporal_spatial_conv.weight 512x256x3x3x3
conv5.block1.bn1 BN512
conv5.block1.conv2.temporal_spatial_conv.weight 512x512x3x3x3
conv5.block1.bn2 BN512
conv5.blocks.0.conv1.temporal_spatial_conv.weight 512x512x3x3x3
conv5.blocks.0.bn1 BN512
conv5.blocks.0.conv2.temporal_spatial_conv.weight 512x512x3x3x3
conv5.blocks.0.bn2 BN512
linear.weight 101x512
linear.bias 101
"""

EXPECTED = {"c3d": C3D_KEYS, "r3d": R3D10_KEYS, "r21d": R21D10_KEYS, "r3d18": R3D18_KEYS}


def expand(spec):
    out = []
    for line in spec.strip().splitlines():
        key, shape = line.split()
        if shape.startswith("BN"):
            c = (int(shape[2:]),)
            out += [(f"{key}.weight", c), (f"{key}.bias", c), (f"{key}.running_mean", c),
                    (f"{key}.running_var", c), (f"{key}.num_batches_tracked", ())]
        else:
            out.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return out


def entries(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


_cache = {}


def model(name, **kw):
    key = (name, tuple(sorted(kw.items())))
    if key not in _cache:
        torch.manual_seed(0)
        _cache[key] = build_model(name, **kw).eval()
    return _cache[key]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_state_dict_matches_original(name):
    expected = expand(EXPECTED[name])
    assert entries(model(name, with_classifier=True)) == expected
    no_head = [e for e in expected if not e[0].startswith("linear.")]
    assert entries(model(name)) == no_head
    assert entries(model(name, return_conv=True)) == no_head


def test_classes_and_factory_agree():
    assert isinstance(model("c3d"), C3D)
    assert isinstance(model("r21d"), R2Plus1DNet)
    assert isinstance(model("r3d"), R3DNet) and model("r3d").layer_sizes == (1, 1, 1, 1)
    assert model("r3d18").layer_sizes == (2, 2, 2, 2)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet50")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_forward_shapes(name):
    t = 8 if name == "c3d" else 4  # C3D halves time three times
    x = torch.rand(2, 3, t, 32, 32)
    with torch.no_grad():
        feat = model(name)(x)
        assert feat.shape == (2, 512)
        assert (feat >= 0).all()  # average of post-ReLU activations, not normalised
        assert model(name, with_classifier=True, num_classes=7)(x).shape == (2, 7)
        # conv5 is 1x2x2 here; MaxPool3d((1, 2, 2)) leaves 512x1x1x1
        assert model(name, return_conv=True)(x).shape == (2, 512)
        # non-square, odd sizes work (adaptive pooling)
        assert model(name)(torch.rand(1, 3, t + 1, 24, 20)).shape == (1, 512)


@pytest.mark.parametrize("name", ["r3d", "c3d"])
def test_memory_formats(name):
    t = 8 if name == "c3d" else 4
    x = torch.rand(2, 3, t, 32, 32)
    m = model(name)
    with torch.no_grad():
        ref = m(x)
        cl = m(x.contiguous(memory_format=torch.channels_last_3d))
        sliced = m(torch.rand(2, 3, t, 32, 64)[..., ::2].copy_(x))
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sliced, ref, rtol=1e-4, atol=1e-5)


def test_r3d_retrieval_feature_is_9216():
    with torch.no_grad():
        out = model("r3d", return_conv=True)(torch.rand(1, 3, 16, 112, 112))
    assert out.shape == (1, 9216)


def test_return_conv_can_be_switched():
    m = build_model("r3d")
    m.return_conv = True
    with torch.no_grad():
        assert m.eval()(torch.rand(1, 3, 8, 64, 64)).shape == (1, 512 * 2 * 2)


# ---------------------------------------------------------------- load_weights

def _randomised(name, **kw):
    m = build_model(name, **kw)
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.uniform_(-1, 1)
    return m


def _same(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if k not in skip)


def test_load_ssl_checkpoint_into_classifier(tmp_path, caplog):
    src = _randomised("r3d")
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"opt": argparse.Namespace(model="r3d", nce_k=1024), "model": src.state_dict(),
                "contrast": {"params": torch.zeros(5)}, "optimizer": {"state": {}}, "epoch": 240}, path)
    dst = build_model("r3d", with_classifier=True, num_classes=51)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # expected-missing classifier keys are not warned
        with caplog.at_level(logging.INFO, logger="iic_ext.models.checkpoint"):
            missing, unexpected = load_weights(dst, path)
    assert missing == ["linear.weight", "linear.bias"]
    assert unexpected == []
    assert "linear.weight" in caplog.text
    assert _same(src, dst, skip=("linear.weight", "linear.bias"))
    with pytest.raises(CheckpointError, match="linear.weight"):
        load_weights(build_model("r3d", with_classifier=True), path, strict=True)


@pytest.mark.parametrize("wrap", ["module.", "base_network.", "module.base_network."])
def test_load_prefixed_state_dicts(wrap):
    src = _randomised("r21d", with_classifier=True)
    sd = {wrap + k: v for k, v in src.state_dict().items()}
    dst = build_model("r21d", with_classifier=True)
    assert load_weights(dst, sd, strict=True) == ([], [])
    assert _same(src, dst)


def test_base_network_checkpoint_reports_other_keys():
    src = _randomised("r3d")
    sd = {"base_network." + k: v for k, v in src.state_dict().items()}
    sd["fc7.weight"] = torch.zeros(3, 3)
    dst = build_model("r3d")
    with pytest.warns(UserWarning, match="fc7.weight"):
        missing, unexpected = load_weights(dst, {"model": sd})
    assert missing == [] and unexpected == ["fc7.weight"]
    assert _same(src, dst)
    with pytest.raises(CheckpointError, match="fc7.weight"):
        load_weights(dst, {"model": sd}, strict=True)


def test_missing_and_unexpected_are_warned():
    sd = _randomised("r3d").state_dict()
    del sd["conv5.block1.bn2.running_var"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.warns(UserWarning) as record:
        missing, unexpected = load_weights(build_model("r3d"), sd)
    assert missing == ["conv5.block1.bn2.running_var"] and unexpected == ["extra.weight"]
    text = " ".join(str(w.message) for w in record)
    assert "conv5.block1.bn2.running_var" in text and "extra.weight" in text


def test_shape_mismatch_names_the_key():
    sd = build_model("r3d", with_classifier=True, num_classes=101).state_dict()
    with pytest.raises(CheckpointError, match=r"linear\.weight.*\(101, 512\).*\(51, 512\)"):
        load_weights(build_model("r3d", with_classifier=True, num_classes=51), sd)
    # a checkpoint of another width is a shape mismatch, not a silent partial load
    with pytest.raises(CheckpointError, match="conv2.block1"):
        load_weights(build_model("r3d"), {"conv2.block1.bn1.weight": torch.zeros(3)})


def test_bad_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        load_weights(build_model("r3d"), bad)
    good = tmp_path / "good.pth"
    torch.save({"model": build_model("r3d").state_dict()}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_weights(build_model("r3d"), truncated)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        load_weights(build_model("r3d"), tmp_path / "nothere.pth")
    with pytest.raises(CheckpointError, match="no state dict"):
        load_weights(build_model("r3d"), {"epoch": 3})
