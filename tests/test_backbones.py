"""The backbone registry and the new backbones: I3D, S3D-G and torchvision's video ResNets.

Key sets and shapes are checked against the published architectures (the I3D port's key list is
written out below), torchvision's own modules when torchvision imports (the CUDA venv of .ci/run: the
PyPI torchvision does not import beside the CPU torch of the main venv), and every registered model
takes one self-supervised and one fine-tuning step on tiny clips.
"""
import re

import pytest
import torch
import torch.nn.functional as F

from iic_ext.models import (MODEL_NAMES, MODELS, CheckpointError, ModelSpec, build_model, detect_architecture,
                            load_weights, model_spec)
from iic_ext.models.checkpoint import classifier_prefix

TINY = (8, 32, 32)  # (T, H, W) of the smoke tests

# ---------------------------------------------------------------- the I3D port's keys
# Inception-v1 I3D as published (Carreira & Zisserman 2017, Fig. 3) and named by piergiaj/pytorch-i3d:
# unit name, input channels, output channels, cubic kernel size. Every unit is a bias-free conv3d and a
# BatchNorm3d 'bn'; 'logits' is a conv3d with bias and no BN.
I3D_STEM = [("Conv3d_1a_7x7", 3, 64, 7), ("Conv3d_2b_1x1", 64, 64, 1), ("Conv3d_2c_3x3", 64, 192, 3)]
# mixed layer: input channels, then b0, b1a, b1b, b2a, b2b, b3b widths
I3D_MIXED = {
    "Mixed_3b": (192, 64, 96, 128, 16, 32, 32),
    "Mixed_3c": (256, 128, 128, 192, 32, 96, 64),
    "Mixed_4b": (480, 192, 96, 208, 16, 48, 64),
    "Mixed_4c": (512, 160, 112, 224, 24, 64, 64),
    "Mixed_4d": (512, 128, 128, 256, 24, 64, 64),
    "Mixed_4e": (512, 112, 144, 288, 32, 64, 64),
    "Mixed_4f": (528, 256, 160, 320, 32, 128, 128),
    "Mixed_5b": (832, 256, 160, 320, 32, 128, 128),
    "Mixed_5c": (832, 384, 192, 384, 48, 128, 128),
}


def i3d_port_state_dict(num_classes=400, with_counters=False, generator=None):
    """A state dict with the key set and shapes of the port's rgb_imagenet.pt (random values).

    The released file predates BatchNorm's num_batches_tracked; ``with_counters`` adds them.
    """
    g = generator or torch.Generator().manual_seed(0)
    units = list(I3D_STEM)
    for name, (cin, b0, b1a, b1b, b2a, b2b, b3b) in I3D_MIXED.items():
        units += [(f"{name}.b0", cin, b0, 1), (f"{name}.b1a", cin, b1a, 1), (f"{name}.b1b", b1a, b1b, 3),
                  (f"{name}.b2a", cin, b2a, 1), (f"{name}.b2b", b2a, b2b, 3), (f"{name}.b3b", cin, b3b, 1)]
    sd = {"logits.conv3d.weight": torch.randn(num_classes, 1024, 1, 1, 1, generator=g) * 0.01,
          "logits.conv3d.bias": torch.zeros(num_classes)}
    for name, cin, cout, k in units:
        sd[f"{name}.conv3d.weight"] = torch.randn(cout, cin, k, k, k, generator=g) * (2 / (cin * k ** 3)) ** 0.5
        sd[f"{name}.bn.weight"] = 1 + 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.bias"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_mean"] = 0.1 * torch.randn(cout, generator=g)
        sd[f"{name}.bn.running_var"] = 1 + 0.1 * torch.rand(cout, generator=g)
        if with_counters:
            sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(1000)
    return sd


def test_i3d_port_keys_and_bn_settings():
    model = build_model("i3d", with_classifier=True, num_classes=400)
    port = i3d_port_state_dict(with_counters=True)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in port.items()}
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    assert len(bns) == 3 + 6 * 9 and all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert all((m.bias is None) == (n != "logits.conv3d") for n, m in convs)
    assert all(m.padding == (0, 0, 0) for _, m in convs)  # "SAME" padding is computed per input


@pytest.mark.parametrize("with_counters", [False, True])
def test_i3d_port_state_dict_loads_strictly(with_counters):
    port = i3d_port_state_dict(with_counters=with_counters)
    model = build_model("i3d", with_classifier=True, num_classes=400)
    assert load_weights(model, port, strict=True) == ([], [])
    torch.nn.Module.load_state_dict(build_model("i3d", with_classifier=True, num_classes=400), port, strict=True)
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in port.items())
    # the feature extractor takes the same file; only the classifier is left over, and reported
    with pytest.warns(UserWarning, match="logits.conv3d.weight"):
        missing, unexpected = load_weights(build_model("i3d"), port)
    assert missing == [] and sorted(unexpected) == ["logits.conv3d.bias", "logits.conv3d.weight"]


def test_i3d_forward_shapes_16x112():
    torch.manual_seed(0)
    model = build_model("i3d", with_classifier=True, num_classes=400).eval()
    model.load_state_dict(i3d_port_state_dict(), strict=False)
    x = torch.rand(1, 3, 16, 112, 112)
    with torch.no_grad():
        assert model(x).shape == (1, 400)
        assert model.forward_conv(x).shape == (1, 1024, 2, 4, 4)  # strides 8 (time) and 32 (space), rounded up
        model.with_classifier = False
        feat = model(x)
        model.return_conv = True
        conv = model(x)
    assert feat.shape == (1, 1024) and (feat >= 0).all()
    assert conv.shape == (1, 4096)


@pytest.mark.slow
def test_i3d_forward_shapes_64x224():
    model = build_model("i3d", with_classifier=True, num_classes=400).eval()
    x = torch.rand(1, 3, 64, 224, 224)
    with torch.no_grad():
        conv = model.forward_conv(x)
        logits = model(x)
    assert conv.shape == (1, 1024, 8, 7, 7)  # what the port's AvgPool3d([2, 7, 7]) expects
    assert logits.shape == (1, 400)


def test_i3d_logits_swap_for_finetuning():
    torch.manual_seed(0)
    port = i3d_port_state_dict(num_classes=400)
    model = build_model("i3d", with_classifier=True, num_classes=400)
    load_weights(model, port, strict=True)
    model.replace_logits(101)
    assert model.logits.conv3d.weight.shape == (101, 1024, 1, 1, 1) and model.logits.conv3d.bias is not None
    assert torch.equal(model.state_dict()["Mixed_5c.b3b.conv3d.weight"], port["Mixed_5c.b3b.conv3d.weight"])
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, *TINY)).shape == (1, 101)
    # the fine-tuning load: the 400-class logits of the checkpoint give way to a new 101-class head
    fresh = build_model("i3d", with_classifier=True, num_classes=101)
    with pytest.raises(CheckpointError, match="logits.conv3d.weight"):
        load_weights(fresh, port)
    with pytest.warns(UserWarning, match="logits"):
        missing, unexpected = load_weights(fresh, port, new_head=True)
    assert missing == ["logits.conv3d.weight", "logits.conv3d.bias"] or \
        sorted(missing) == ["logits.conv3d.bias", "logits.conv3d.weight"]
    assert sorted(unexpected) == ["logits.conv3d.bias", "logits.conv3d.weight"]


def test_i3d_classifier_averages_per_step_logits():
    torch.manual_seed(0)
    model = build_model("i3d", with_classifier=True, num_classes=7).eval()
    x = torch.rand(1, 3, 24, 32, 32)
    with torch.no_grad():
        pooled = model.spatial_pool(model.forward_conv(x))
        per_step = model.logits(pooled).flatten(2)  # [B, classes, T'] as the port returns
        torch.testing.assert_close(model(x), per_step.mean(2))


# ---------------------------------------------------------------- S3D-G

def test_s3dg_port_names():
    sd = build_model("s3dg", with_classifier=True, num_classes=512).state_dict()
    for key, shape in [("conv1.conv1.weight", (64, 3, 3, 7, 7)), ("conv_2b.conv1.weight", (64, 64, 1, 1, 1)),
                       ("conv_2c.conv1.weight", (192, 64, 1, 3, 3)), ("conv_2c.conv2.weight", (192, 192, 3, 1, 1)),
                       ("gating.fc.weight", (192, 192)), ("mixed_3b.conv_b1_b.conv2.weight", (128, 128, 3, 1, 1)),
                       ("mixed_3b.gating_b3.fc.bias", (32,)), ("mixed_5c.conv_b3_b.bn1.running_var", (128,)),
                       ("fc.weight", (512, 1024))]:
        assert tuple(sd[key].shape) == shape, key
    # HowTo100M's TPU stem: 2x2x2 space-to-depth, then a 2x4x4 conv on 24 channels
    s2d = build_model("s3dg", space_to_depth=True)
    assert tuple(s2d.state_dict()["conv1.conv1.weight"].shape) == (64, 24, 2, 4, 4)
    with torch.no_grad():
        assert s2d.eval()(torch.rand(1, 3, *TINY)).shape == (1, 1024)
    with pytest.raises(ValueError, match="even"):
        s2d(torch.rand(1, 3, 7, 32, 32))
    plain = build_model("s3dg", gating=False).state_dict()
    assert not any("gating" in k for k in plain)


def test_s3dg_gating_is_per_channel_sigmoid():
    from iic_ext.models.s3dg import SelfGating

    gate = SelfGating(4)
    x = torch.rand(2, 4, 3, 5, 5)
    w = torch.sigmoid(gate.fc(x.mean((2, 3, 4))))
    torch.testing.assert_close(gate(x), x * w[:, :, None, None, None])


# ---------------------------------------------------------------- torchvision's video ResNets

TORCHVISION = ["r3d_18", "r2plus1d_18", "mc3_18"]


@pytest.fixture(scope="module")
def tv_video():
    try:
        from torchvision.models import video
    except Exception as exc:  # not installed, or built for another torch (ImportError, OSError, RuntimeError)
        pytest.skip(f"torchvision does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                    f"these cases run in the CUDA venv of .ci/run")
    return video


def _randomise_(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g, dtype=torch.float64))
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype))
    return module


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_state_dict_and_features_match(tv_video, name):
    torch.manual_seed(0)
    theirs = _randomise_(getattr(tv_video, name)(weights=None), 1).double().eval()
    sd = theirs.state_dict()
    ours = build_model(name, with_classifier=True, num_classes=400).double().eval()
    assert list(ours.state_dict()) == list(sd)  # same names, same order
    assert load_weights(ours, sd, strict=True) == ([], [])
    feat = build_model(name).double().eval()
    assert load_weights(feat, {k: v for k, v in sd.items() if not k.startswith("fc.")}, strict=True) == ([], [])
    x = torch.rand(2, 3, 8, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))
        theirs.fc = torch.nn.Identity()
        torch.testing.assert_close(feat(x), theirs(x))
    assert detect_architecture(sd) == name


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_names_without_torchvision(name):
    sd = build_model(name, with_classifier=True, num_classes=400).state_dict()
    stem = "stem.3.weight" if name == "r2plus1d_18" else "stem.0.weight"
    conv = "layer1.0.conv1.0.0.weight" if name == "r2plus1d_18" else "layer1.0.conv1.0.weight"
    for key in (stem, conv, "layer2.0.downsample.0.weight", "layer4.1.conv2.1.running_var", "fc.weight"):
        assert key in sd, key
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "tracked"))) == \
        {"r3d_18": 33371472, "r2plus1d_18": 31505325, "mc3_18": 11695440}[name]  # torchvision's counts


def test_r3d18_original_and_torchvision_are_different_models():
    assert model_spec("r3d18").name == "r3d18" and model_spec("R3D-18").name == "r3d18"
    assert model_spec("r3d_18").name == "r3d_18"
    assert "conv2.block1.conv1.temporal_spatial_conv.weight" in build_model("r3d18").state_dict()


# ---------------------------------------------------------------- the registry

def test_registry_entries():
    assert MODEL_NAMES == tuple(MODELS) and len(MODEL_NAMES) == 9
    assert set(MODEL_NAMES) >= {"c3d", "r3d", "r21d", "r3d18", "i3d", "s3dg", "r3d_18", "r2plus1d_18", "mc3_18"}
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec) and spec.name == name
        assert len(spec.min_clip) == 3 and all(isinstance(s, int) and s >= 1 for s in spec.min_clip)
        assert spec.retrieval and spec.description and "\n" not in spec.retrieval
    with pytest.raises(Exception):
        MODELS["r3d"].feature_dim = 3  # frozen
    for alias, name in [("r3d10", "r3d"), ("R(2+1)D", "r21d"), ("R3D-10", "r3d"), ("C3D", "c3d"), ("S3D-G", "s3dg"),
                        ("I3D", "i3d"), ("MC3-18", "mc3_18"), ("R2Plus1D_18", "r2plus1d_18")]:
        assert model_spec(alias).name == name, alias
    with pytest.raises(ValueError, match="unknown model 'resnet50'.*i3d"):
        build_model("resnet50")
    with pytest.raises(TypeError, match="layer_sizes"):
        build_model("i3d", layer_sizes=(1, 1, 1, 1))


_models = {}


def cached(name):
    if name not in _models:
        torch.manual_seed(0)
        _models[name] = build_model(name).eval()
    return _models[name]


# retrieval feature size at TINY (8x32x32)
TINY_RETRIEVAL = {"c3d": 512, "r3d": 512, "r21d": 512, "r3d18": 512, "i3d": 4096, "s3dg": 4096, "r3d_18": 512,
                  "r2plus1d_18": 512, "mc3_18": 1024}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_smoke_forward_and_retrieval_feature(name):
    model = cached(name)
    assert isinstance(model.feature_dim, int) and model.feature_dim == MODELS[name].feature_dim
    assert model.arch == name and classifier_prefix(model) == MODELS[name].classifier + "."
    x = torch.rand(2, 3, *TINY)
    with torch.no_grad():
        feat = model(x)
        model.return_conv = True
        try:
            conv = model(x)
        finally:
            model.return_conv = False
    assert feat.shape == (2, model.feature_dim) and torch.isfinite(feat).all() and (feat >= 0).all()
    assert conv.shape == (2, TINY_RETRIEVAL[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_retrieval_feature_size_at_16x112(name):
    """The size each registry entry states for 16x112x112 clips."""
    claimed = int(re.search(r"(\d+)-d", MODELS[name].retrieval).group(1))
    model = cached(name)
    model.return_conv = True
    try:
        with torch.no_grad():
            assert model(torch.rand(1, 3, 16, 112, 112)).shape == (1, claimed)
    finally:
        model.return_conv = False


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_min_clip(name):
    model = cached(name)
    t, h, w = MODELS[name].min_clip
    with torch.no_grad():
        assert model(torch.rand(1, 3, t, h, w)).shape == (1, model.feature_dim)
    for small in [(t - 1, h, w), (t, h - 1, w), (t, h, w - 1)]:
        shape = (1, 3) + small
        with pytest.raises(ValueError) as info:
            model(torch.rand(shape))
        text = str(info.value)
        assert name in text and str((t, h, w)) in text and str(shape) in text
    with pytest.raises(ValueError, match=rf"{name}: expected a clip \[B, C, T, H, W\]"):
        model(torch.rand(3, t, h, w))


def _contrastive_loss(a, b, temperature=0.07):
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.t() / temperature
    return F.cross_entropy(logits, torch.arange(len(a)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_ssl_step(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    clip = torch.rand(2, 3, *TINY)
    residual = ((clip - torch.roll(clip, 1, 2)) + 1) / 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = _contrastive_loss(model(clip), model(residual))
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    opt.step()
    after = model.state_dict()
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(moved) > len(before) // 2


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_finetune_step(name):
    torch.manual_seed(0)
    src = build_model(name)
    model = build_model(name, with_classifier=True, num_classes=5)
    missing, unexpected = load_weights(model, src.state_dict())
    head = classifier_prefix(model)
    assert missing and all(k.startswith(head) for k in missing) and unexpected == []
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    x, y = torch.rand(2, 3, *TINY), torch.tensor([1, 4])
    logits = model(x)
    assert logits.shape == (2, 5)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    head_w = dict(model.named_parameters())[head + ("conv3d.weight" if head == "logits." else "weight")]
    old = head_w.detach().clone()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(old, head_w.detach())


def test_finetune_optimizer_groups_follow_the_registry():
    import argparse

    from iic_ext.finetune import make_optimizer

    args = argparse.Namespace(lr=1e-3, ft_lr=1e-2, momentum=0.9, weight_decay=5e-4)
    for name, late in [("r3d", "conv5.block1.conv1.temporal_spatial_conv.weight"), ("i3d", "Mixed_5c.b0.conv3d.weight"),
                       ("s3dg", "mixed_4b.conv_b0.conv1.weight"), ("mc3_18", "layer4.0.conv1.0.weight")]:
        model = build_model(name, with_classifier=True, num_classes=3)
        opt = make_optimizer(model, args)
        fast = {id(p) for p in opt.param_groups[1]["params"]}
        params = dict(model.named_parameters())
        assert id(params[late]) in fast and opt.param_groups[1]["lr"] == 1e-2
        head = classifier_prefix(model)
        assert all(id(p) in fast for n, p in params.items() if n.startswith(head))
        assert 0 < len(fast) < len(params)


# ---------------------------------------------------------------- telling architectures apart

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_detect_architecture(name):
    with torch.device("meta"):  # shapes only: no weights to allocate
        plain = build_model(name).state_dict()
        head = build_model(name, with_classifier=True, num_classes=11).state_dict()
    assert detect_architecture(plain) == name
    assert detect_architecture(head) == name
    assert detect_architecture({"module.x": torch.zeros(1)}) is None


def test_wrong_architecture_is_one_clear_error(tmp_path):
    path = tmp_path / "kinetics_i3d.pth"
    torch.save(i3d_port_state_dict(), path)
    with pytest.raises(CheckpointError, match=r"kinetics_i3d\.pth holds an i3d state dict \(.*\), the model is r3d_18"):
        load_weights(build_model("r3d_18"), path)
    # same key names, other shapes: still told apart
    with torch.device("meta"):
        mc3 = build_model("mc3_18").state_dict()
    with pytest.raises(CheckpointError, match="holds an mc3_18 state dict.*the model is r3d_18"):
        load_weights(build_model("r3d_18"), mc3)
    # R3D-10 weights into R3D-18 (a key subset) are the wrong depth, not a partial load
    with pytest.raises(CheckpointError, match="holds an r3d state dict.*the model is r3d18"):
        load_weights(build_model("r3d18"), build_model("r3d").state_dict())
    # a deeper r3d built by option takes r3d18 weights: architectures compare by structure
    assert load_weights(build_model("r3d", layer_sizes=(2, 2, 2, 2)), build_model("r3d18").state_dict(),
                        strict=True) == ([], [])
