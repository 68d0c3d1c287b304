"""The objectives (memory, moco, simclr) against their references written from the formulas (values and
gradients in float64), their state updates, and their training runs through the trainer."""
import pytest
import torch
from torch import nn

from conftest import TINY_TRAIN
from iic_ext import train as T
from iic_ext.objectives import (MemoryObjective, MoCoObjective, ProjectionHead, SimCLRObjective, StepFeatures,
                                build_objective, top1)
from iic_ext.ops import reference


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(*shape, g, dtype=torch.float64):
    return nn.functional.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=1)


# ---- simclr -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_neg", [True, False])
@pytest.mark.parametrize("B", [2, 5])
def test_simclr_matches_reference_values_and_gradients(with_neg, B):
    g = torch.Generator().manual_seed(B)
    D, t = 7, 0.3
    z1, z2, zn = (torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    obj = SimCLRObjective(nce_t=t, intra_neg=with_neg)
    n = nn.functional.normalize
    feats = StepFeatures(n(z1, dim=1), n(z2, dim=1), n(zn, dim=1) if with_neg else None)
    loss, m = obj(feats, torch.arange(B))
    r1, r2 = reference.simclr_losses(z1, z2, zn if with_neg else None, t)
    torch.testing.assert_close(m["loss_1"], r1.mean())
    torch.testing.assert_close(m["loss_2"], r2.mean())
    want = r1.mean() + r2.mean()
    torch.testing.assert_close(loss, want)
    grads = torch.autograd.grad(loss, (z1, z2, zn) if with_neg else (z1, z2))
    want_grads = torch.autograd.grad(want, (z1, z2, zn) if with_neg else (z1, z2))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b)
    candidates = 3 * B - 1 if with_neg else 2 * B - 1
    assert m["chance"].item() == pytest.approx(1 / candidates)


def test_simclr_gradcheck():
    g = torch.Generator().manual_seed(0)
    obj = SimCLRObjective(nce_t=0.5)
    z = [torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]

    def f(a, b, c):
        n = nn.functional.normalize
        return obj(StepFeatures(n(a, dim=1), n(b, dim=1), n(c, dim=1)), torch.arange(3))[0]

    assert torch.autograd.gradcheck(f, z)


def test_simclr_own_negative_is_a_candidate():
    """The sample's own intra-negative is scored: making it identical to the anchor raises the loss."""
    g = torch.Generator().manual_seed(1)
    z1, z2, zn = _unit(4, 8, g=g), _unit(4, 8, g=g), _unit(4, 8, g=g)
    obj = SimCLRObjective(nce_t=0.2)
    base = obj(StepFeatures(z1, z2, zn), torch.arange(4))[1]["loss_1"]
    zn_own = zn.clone()
    zn_own[0] = z1[0]
    worse = obj(StepFeatures(z1, z2, zn_own), torch.arange(4))[1]["loss_1"]
    assert worse > base


def test_simclr_rejects_batch_of_one():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        SimCLRObjective()(StepFeatures(_unit(1, 4, g=g), _unit(1, 4, g=g), _unit(1, 4, g=g)), torch.arange(1))


# ---- moco -------------------------------------------------------------------------------------------


def _moco(K=6, D=5, intra_neg=True, m=0.9, t=0.25):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, D)).double()
    obj = MoCoObjective(backbone, D, queue_size=K, nce_t=t, momentum=m, intra_neg=intra_neg).double()
    return backbone, obj


@pytest.mark.parametrize("filled", [0, 3, 6])
@pytest.mark.parametrize("intra_neg", [True, False])
def test_moco_matches_reference_values_and_gradients(filled, intra_neg):
    g = torch.Generator().manual_seed(filled)
    B, D, K, t = 4, 5, 6, 0.25
    _, obj = _moco(K, D, intra_neg, t=t)
    obj.queue_1.copy_(_unit(K, D, g=g))
    obj.queue_2.copy_(_unit(K, D, g=g))
    if intra_neg:
        obj.queue_neg.copy_(_unit(K, D, g=g))
    obj.queue_filled.fill_(filled)
    obj._host = None
    q1, q2 = (torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    k1, k2, kn = _unit(B, D, g=g), _unit(B, D, g=g), _unit(B, D, g=g)
    n = nn.functional.normalize
    feats = StepFeatures(n(q1, dim=1), n(q2, dim=1), keys=(k1, k2, kn if intra_neg else None))
    loss, m = obj(feats, torch.arange(B))
    r1, r2 = reference.moco_losses(q1, q2, k1, k2, kn if intra_neg else None, obj.queue_1, obj.queue_2,
                                   obj.queue_neg if intra_neg else None, filled, t)
    torch.testing.assert_close(m["loss_1"], r1.mean())
    torch.testing.assert_close(m["loss_2"], r2.mean())
    want = r1.mean() + r2.mean()
    torch.testing.assert_close(loss, want)
    for a, b in zip(torch.autograd.grad(loss, (q1, q2)), torch.autograd.grad(want, (q1, q2))):
        torch.testing.assert_close(a, b)
    # warm-up: only filled slots are candidates
    assert m["chance"].item() == pytest.approx(1 / (1 + filled * (2 if intra_neg else 1) + (1 if intra_neg else 0)))


def test_moco_queue_wraps_around_and_key_encoder_follows_the_average():
    g = torch.Generator().manual_seed(3)
    B, D, K, m = 4, 5, 6, 0.9
    backbone, obj = _moco(K, D, m=m)
    online0 = [p.detach().clone() for p in backbone.parameters()]
    keys = []
    for step in range(3):
        with torch.no_grad():
            for p in backbone.parameters():  # an "optimiser step"
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        k = tuple(_unit(B, D, g=g) for _ in range(3))
        keys.append(k)
        q = _unit(B, D, g=g)
        obj(StepFeatures(q, q, keys=k), torch.arange(B))
        before = [p.detach().clone() for p in obj.key_backbone.parameters()]
        obj.after_step(backbone)
        for kp, b, p in zip(obj.key_backbone.parameters(), before, backbone.parameters()):
            torch.testing.assert_close(kp, m * b + (1 - m) * p)
    assert all(not p.requires_grad for p in obj.key_backbone.parameters())
    assert online0[0].shape == next(obj.key_backbone.parameters()).shape
    # 12 keys into 6 slots: step 0 -> slots 0-3, step 1 -> 4,5,0,1, step 2 -> 2,3,4,5
    assert int(obj.queue_ptr) == (3 * B) % K and int(obj.queue_filled) == K
    for which in range(3):
        queue = (obj.queue_1, obj.queue_2, obj.queue_neg)[which]
        expect = torch.empty(K, D, dtype=torch.float64)
        for step, k in enumerate(keys):
            slots = (step * B + torch.arange(B)) % K
            expect[slots] = k[which]
        torch.testing.assert_close(queue, expect)


def test_moco_warm_up_scores_no_empty_slot():
    _, obj = _moco(K=8)
    g = torch.Generator().manual_seed(0)
    q = _unit(4, 5, g=g)
    k = tuple(_unit(4, 5, g=g) for _ in range(3))
    _, m = obj(StepFeatures(q, q, keys=k), torch.arange(4))
    assert m["chance"].item() == pytest.approx(1 / 2)  # the positive and the own negative only
    obj.after_step(nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double())
    _, m = obj(StepFeatures(q, q, keys=k), torch.arange(4))
    assert m["chance"].item() == pytest.approx(1 / (2 + 2 * 4))


# ---- memory -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("intra_neg", [True, False])
def test_memory_objective_matches_reference_and_updates_after_the_step(intra_neg):
    g = torch.Generator().manual_seed(5)
    N, D, K, B, t, mom = 20, 6, 7, 4, 0.1, 0.5
    torch.manual_seed(0)
    obj = MemoryObjective(D, N, nce_k=K, nce_t=t, nce_m=mom, intra_neg=intra_neg,
                          generator=torch.Generator().manual_seed(9)).double()
    c = obj.contrast
    banks0 = [b.clone() if b is not None else None for b in (c.memory_l, c.memory_ab, c.memory_neg)]
    l, ab = (torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    neg = torch.randn(B, D, generator=g, dtype=torch.float64) if intra_neg else None
    y = torch.tensor([3, 0, 17, 3])
    idx = torch.Generator().manual_seed(9)
    want_idx = torch.randint(0, N, (B, K + 1), generator=idx)
    want_idx[:, 0] = y
    loss, m = obj(StepFeatures(l, ab, neg), y)
    for b, b0 in zip((c.memory_l, c.memory_ab, c.memory_neg), banks0):  # forward leaves the banks
        assert b is None or torch.equal(b, b0)
    r_l, r_ab = reference.iic_softmax_loss(l, ab, *banks0, want_idx, 1 / t)
    torch.testing.assert_close(loss, r_l.mean() + r_ab.mean())
    for a, b in zip(torch.autograd.grad(loss, (l, ab)), torch.autograd.grad(r_l.mean() + r_ab.mean(), (l, ab))):
        torch.testing.assert_close(a, b)
    obj.after_step(None)
    for bank, b0, f in zip((c.memory_l, c.memory_ab, c.memory_neg), banks0, (l, ab, neg)):
        if b0 is not None:
            torch.testing.assert_close(bank, reference.bank_update_(b0.clone(), y, f.detach(), mom))
    s_l, _ = reference.iic_scores(l.detach(), ab.detach(), *banks0, want_idx, 1 / t)
    copies = torch.zeros(s_l.shape, dtype=torch.bool)
    copies[:, 1:K + 1] = want_idx[:, 1:] == y[:, None]
    assert m["top1_1"] == top1(s_l, exclude=copies)


def test_top1_counts_a_strict_first_place():
    logits = torch.tensor([[3.0, 1.0, 3.0], [0.0, 2.0, 1.0], [5.0, 4.0, 1.0], [1.0, 1.0, 1.0]])
    assert top1(logits).item() == pytest.approx(1 / 4)  # a tie (rows 0 and 3) counts against the positive
    assert top1(logits, torch.tensor([2, 1, 1, 0])).item() == pytest.approx(1 / 4)
    exclude = torch.zeros(4, 3, dtype=torch.bool)
    exclude[0, 2] = True  # row 0's tie is a copy of its positive
    assert top1(logits, exclude=exclude).item() == pytest.approx(2 / 4)


def test_memory_top1_ignores_copies_of_the_positive_row():
    """A bank row drawn again among the negatives scores like the positive: not a rival of it."""
    torch.manual_seed(0)
    obj = MemoryObjective(4, 3, nce_k=6, nce_t=0.1, intra_neg=False, generator=torch.Generator().manual_seed(0))
    c = obj.contrast
    c.memory_ab.copy_(torch.eye(3, 4))
    c.memory_l.copy_(torch.eye(3, 4))
    y = torch.tensor([0, 1])
    feats = torch.eye(3, 4)[:2].clone()  # each sample aligned with its own bank row
    _, m = obj(StepFeatures(feats, feats), y)
    idx = torch.Generator().manual_seed(0)
    drawn = torch.randint(0, 3, (2, 7), generator=idx)
    assert (drawn[:, 1:] == y[:, None]).any()  # the draw does contain copies
    assert m["top1_1"].item() == 1.0 and m["top1_2"].item() == 1.0


def test_projection_head_and_feature_sizes():
    torch.manual_seed(0)
    backbone = nn.Linear(3, 10)
    obj = build_objective("simclr", backbone, 10, 5, proj_dim=4, nce_t=0.1)
    assert isinstance(obj.head, ProjectionHead)
    z = obj.embed(backbone, torch.randn(2, 3))
    assert z.shape == (2, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2))
    assert len(obj.trainable_parameters()) == 6  # Linear, BatchNorm1d, Linear
    moco = build_objective("moco", backbone, 10, 5, proj_dim=4, nce_k=8, nce_t=0.1)
    assert moco.queue_1.shape == (8, 4) and len(moco.trainable_parameters()) == 6  # key encoder frozen
    mem = build_objective("memory", backbone, 10, 5, nce_k=3)
    assert mem.contrast.memory_l.shape == (5, 10) and isinstance(mem.head, nn.Identity)


# ---- through the trainer ----------------------------------------------------------------------------

OBJ_ARGS = {
    "memory": ["--objective", "memory"],
    "moco": ["--objective", "moco", "--nce-k", "8", "--moco-m", "0.9", "--proj-dim", "16"],
    "simclr": ["--objective", "simclr", "--proj-dim", "16"],
}


def parse(argv):
    return T.resolve_args(T.get_args_parser().parse_args(argv))


def _tiny(objective):
    argv = [a for a in TINY_TRAIN]
    if objective != "memory":
        i = argv.index("--nce-k")
        del argv[i:i + 2]
    return argv + OBJ_ARGS[objective]


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("objective", ["memory", "moco", "simclr"])
def test_resume_is_exact_for_every_objective(tmp_path, objective):
    argv = _tiny(objective) + ["--epochs", "3", "--neg", "repeat"]
    full = T.main(parse(argv + ["--out", str(tmp_path / "full")]))

    def kill(epoch, step, stats):
        if epoch == 2 and step == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        T.main(parse(argv + ["--out", str(tmp_path / "cut")]), step_callback=kill)
    last = tmp_path / "cut" / "last.pth"
    resumed = T.main(parse(argv + ["--out", str(tmp_path / "cut"), "--resume", str(last)]))
    assert [h["epoch"] for h in resumed["history"]] == [2, 3]
    for a, b in zip(full["history"][1:], resumed["history"]):
        assert a["step_losses"] == b["step_losses"]  # bit for bit
    fa = torch.load(full["last"], weights_only=True)
    fb = torch.load(resumed["last"], weights_only=True)
    assert fa["objective"] == fb["objective"] == objective
    for part in ("model", "contrast"):
        assert fa[part].keys() == fb[part].keys()
        for k in fa[part]:
            assert torch.equal(fa[part][k], fb[part][k]), (part, k)
    if objective == "moco":
        assert {"queue_1", "queue_2", "queue_neg", "queue_ptr", "queue_filled"} <= set(fa["contrast"])
        assert any(k.startswith("key_backbone.") for k in fa["contrast"])
    if objective != "memory":
        assert any(k.startswith("head.") for k in fa["contrast"])
    # the backbone is the plain (query) encoder: it loads into the original R3DNet strictly
    from iic_ext.models import R3DNet

    R3DNet((1, 1, 1, 1)).load_state_dict(fa["model"], strict=True)


@pytest.mark.parametrize("objective", ["moco", "simclr"])
def test_objectives_train_with_flow_and_without_negative(tmp_path, objective):
    for extra in (["--neg", "none", "--modality", "u"], ["--neg", "shuffle", "--modality", "rgb"]):
        res = T.main(parse(_tiny(objective) + extra + ["--epochs", "1", "--out", str(tmp_path / extra[1])]))
        h = res["history"][0]
        assert h["steps"] == 2 and all(torch.isfinite(torch.tensor(h["step_losses"])))
        assert 0 <= h["top1_1"] <= 1 and 0 < h["chance"] < 1


def test_resume_refuses_another_objective(tmp_path):
    res = T.main(parse(_tiny("simclr") + ["--epochs", "1", "--out", str(tmp_path / "a")]))
    with pytest.raises(ValueError, match="objective"):
        T.main(parse(_tiny("moco") + ["--epochs", "2", "--out", str(tmp_path / "a"), "--resume", res["last"]]))


@pytest.mark.parametrize("argv, message", [
    (["--objective", "moco", "--nce-k", "6", "--batch-size", "4"], "multiple of --batch-size"),
    (["--objective", "moco", "--nce-k", "2", "--batch-size", "4"], "at least one batch"),
    (["--objective", "simclr", "--batch-size", "1"], "--batch-size of at least 2"),
    (["--objective", "simclr", "--nce-k", "16"], "--nce-k does not apply"),
    (["--objective", "moco", "--nce-criterion"], "--nce-criterion"),
    (["--objective", "simclr", "--no-normalize-features"], "always L2-normalises"),
    (["--objective", "moco", "--nce-m", "0.5"], "--moco-m"),
    (["--objective", "moco", "--moco-m", "1.0"], "--moco-m must be in"),
    (["--feat-dim", "128"], "--feat-dim 128"),
    (["--proj-dim", "64", "--feat-dim", "32"], "--proj-dim 64"),
    (["--nce-t", "0"], "--nce-t must be positive"),
])
def test_bad_combinations_name_the_flags(argv, message):
    with pytest.raises(ValueError, match=message):
        parse(["--dataset", "synthetic"] + argv)


def test_objective_presets():
    a = parse(["--objective", "moco"])
    assert (a.nce_k, a.proj_dim, a.normalize_features) == (T.OBJECTIVE_PRESETS["demo"]["moco"]["nce_k"], 128, True)
    a = parse(["--objective", "simclr", "--dataset", "ucf101"])
    assert a.nce_k is None and a.proj_dim == 128 and a.nce_t == 0.1
    a = parse(["--dataset", "ucf101"])
    assert (a.objective, a.nce_k, a.nce_t, a.proj_dim, a.feat_dim) == ("memory", 1024, 0.07, 0, 512)
    a = parse(["--dataset", "ucf101", "--objective", "moco"])
    assert (a.nce_k, a.moco_m, a.out) == (16384, 0.999, "runs/r3d_res_repeat_ucf101_moco")


def test_memory_with_projection_head_trains_and_resumes_its_head(tmp_path):
    argv = _tiny("memory") + ["--proj-dim", "8", "--epochs", "1", "--out", str(tmp_path / "m")]
    res = T.main(parse(argv))
    ck = torch.load(res["last"], weights_only=True)
    assert ck["contrast"]["memory_l"].shape[1] == 8 and "head.0.weight" in ck["contrast"]
    resumed = T.main(parse(argv[:-4] + ["--epochs", "2", "--out", str(tmp_path / "m"), "--resume", res["last"]]))
    assert [h["epoch"] for h in resumed["history"]] == [2]


@pytest.mark.parametrize("objective", ["moco", "simclr"])
def test_evaluation_commands_take_the_trained_encoder(tmp_path, capsys, objective):
    """retrieve / linear / finetune read the checkpoint's ``model`` (the query encoder for moco): every
    backbone key matches, and the features are the trained encoder's, not the key encoder's."""
    from iic_ext import finetune, linear, retrieve
    from iic_ext.models import build_model

    res = T.main(parse(_tiny(objective) + ["--epochs", "1", "--out", str(tmp_path / "ssl")]))
    ck = torch.load(res["last"], weights_only=True)
    clip = ["--clip-len", "4", "--resize", "32", "32", "--crop-size", "32", "--workers", "0", "--no-progress"]
    data = ["--num-videos", "8", "--num-test-videos", "4", "--clips-per-video", "2"]
    r = retrieve.cli(clip + data + ["--ckpt", res["last"], "--out", str(tmp_path / "ret"), "--no-plot",
                                    "--feature-dir", str(tmp_path / "f"), "--feature", "pool"])
    assert "all backbone keys matched" in capsys.readouterr().out
    assert 0 <= r["top1"] <= 1
    lp = linear.cli(clip + data + ["--ckpt", res["last"], "--out", str(tmp_path / "lin"), "--wd", "1e-2",
                                   "--feature-dir", str(tmp_path / "f2")])
    assert 0 <= lp["linear_acc"] <= 1
    ft = finetune.cli(clip + data + ["--ckpt", res["last"], "--epochs", "1", "--batch-size", "4",
                                     "--out", str(tmp_path / "ft"), "--save-freq", "0"])
    assert 0 <= ft["test_acc"] <= 1
    if objective == "moco":  # the key encoder is a different network after a step (its moving average)
        key = {k[len("key_backbone."):]: v for k, v in ck["contrast"].items() if k.startswith("key_backbone.")}
        assert any(not torch.equal(key[k], v) for k, v in ck["model"].items() if v.is_floating_point())
        build_model("r3d").load_state_dict(key, strict=True)


def test_init_starts_from_given_backbone_weights(tmp_path, capsys):
    from iic_ext.models import build_model

    torch.manual_seed(3)
    src = build_model("r3d")
    torch.save({"model": src.state_dict()}, tmp_path / "init.pth")
    args = parse(_tiny("simclr") + ["--epochs", "1", "--out", str(tmp_path / "a"), "--init", str(tmp_path / "init.pth")])
    c = T.build_components(args, 8, torch.device("cpu"))
    assert "all backbone keys matched" in capsys.readouterr().out
    for k, v in src.state_dict().items():
        assert torch.equal(c["model"].state_dict()[k], v), k
    torch.save({"model": build_model("c3d").state_dict()}, tmp_path / "c3d.pth")
    with pytest.raises(Exception, match="c3d"):
        T.build_components(parse(_tiny("memory") + ["--init", str(tmp_path / "c3d.pth")]), 8, torch.device("cpu"))


def test_demo_banner_lists_each_objectives_departures_with_reasons():
    text = T._describe(parse(["--objective", "moco"]), 128, 8, "cpu")
    assert "moco_m=0.99" in text and "nce_k=128" in text and "nce_t=0.07" in text
    assert "one epoch of the 128 videos" in text and "K = N - 1" not in text
    text = T._describe(parse([]), 128, 8, "cpu")
    assert "nce_k=127" in text and "K = N - 1" in text and "moco_m" not in text
