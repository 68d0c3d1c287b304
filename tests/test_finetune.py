"""Fine-tuning: validation split, residual input, training/test runs, resume, --split all, CLI."""
import json
import os
import sys

import pytest
import torch

from iic_ext import finetune
from iic_ext.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--clip-len", "4", "--resize", "32", "32", "--crop-size", "32", "--clips-per-video", "2",
        "--num-videos", "4", "--num-test-videos", "2", "--batch-size", "3", "--workers", "0", "--no-progress",
        "--save-freq", "0"]


def test_validation_size():
    assert finetune.validation_size("ucf101", 9537) == 800
    assert finetune.validation_size("hmdb51", 3570) == 400
    assert finetune.validation_size("synthetic", 120) == 10  # 800 / 9537 of the training list
    assert finetune.validation_size("synthetic", 5) == 1
    assert finetune.validation_size("synthetic", 50, override=0) == 0
    with pytest.raises(ValueError):
        finetune.validation_size("synthetic", 5, override=5)


def test_finetune_residual_input_is_unscaled():
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(["--modality", "res", "--ckpt", "none"]))
    clip = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8)
    x = clip.float() / 255
    torch.testing.assert_close(finetune._inputs({"rgb": clip}, args, torch.device("cpu")), x - x.roll(1, 2))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_then_test_and_exact_resume(tmp_path):
    ssl = tmp_path / "ssl.pth"
    torch.manual_seed(0)
    torch.save({"model": build_model("r3d").state_dict(), "epoch": 1}, ssl)
    a = tmp_path / "a"
    res = finetune.cli(TINY + ["--ckpt", str(ssl), "--epochs", "2", "--out", str(a)])
    saved = json.loads((a / "results.json").read_text())
    assert saved["test_acc"] == res["test_acc"] and 0 <= res["test_acc"] <= 1
    split = saved["splits"]["1"]
    assert split["num_test"] == 2 and split["clips_per_video"] == 2 and split["best_epoch"] in (1, 2)
    for f in ("best.pth", "last.pth", "finetune.json"):
        assert (a / f).is_file()
    assert not any(n.startswith(".tmp") for n in os.listdir(a))
    # --mode test reloads best.pth (strictly) and reproduces the number.
    t = finetune.cli(TINY + ["--mode", "test", "--out", str(a)])
    assert t["test_acc"] == res["test_acc"]
    # One epoch, then --resume to two: the same model as the uninterrupted run.
    b = tmp_path / "b"
    finetune.cli(TINY + ["--ckpt", str(ssl), "--epochs", "1", "--out", str(b)])
    finetune.cli(TINY + ["--ckpt", str(ssl), "--epochs", "2", "--out", str(b), "--resume"])
    sa = torch.load(a / "last.pth", weights_only=True)
    sb = torch.load(b / "last.pth", weights_only=True)
    assert sb["epoch"] == 2 and len(sb["history"]) == 2
    for k in sa["model"]:
        torch.testing.assert_close(sa["model"][k], sb["model"][k], rtol=0, atol=0, msg=k)
    assert [h["val_loss"] for h in sa["history"]] == [h["val_loss"] for h in sb["history"]]


def test_test_mode_rejects_self_supervised_weights(tmp_path):
    ssl = tmp_path / "ssl.pth"
    torch.save({"model": build_model("r3d").state_dict()}, ssl)
    with pytest.raises(Exception, match="linear"):
        finetune.cli(TINY + ["--mode", "test", "--ckpt", str(ssl), "--out", str(tmp_path / "o")])


def test_split_all_reports_the_mean(tmp_path, capsys):
    torch.manual_seed(0)
    m = build_model("r3d", with_classifier=True, num_classes=10)
    path = tmp_path / "ft.pth"
    torch.save({"model": m.state_dict()}, path)
    out = tmp_path / "all"
    res = finetune.cli(TINY + ["--mode", "test", "--ckpt", str(path), "--split", "all", "--out", str(out)])
    accs = [res["splits"][s]["test_acc"] for s in ("1", "2", "3")]
    assert res["test_acc"] == pytest.approx(sum(accs) / 3)
    for s in (1, 2, 3):
        assert json.loads((out / f"split{s}" / "finetune.json").read_text())["split"] == s
    assert json.loads((out / "results.json").read_text())["test_acc"] == pytest.approx(res["test_acc"])
    assert "Mean video accuracy over splits [1, 2, 3]" in capsys.readouterr().out


def test_original_flags_parse():
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import ft_classify
    finally:
        sys.path.pop(0)
    a = ft_classify.parse_args(["--ckpt", "x.pt", "--dataset", "ucf101", "--mode=test", "--cl", "16", "--bs", "16",
                                "--wd", "5e-4", "--ft_lr", "1e-2", "--lr", "1e-3", "--momentum", "0.9", "--gpu", "0",
                                "--desp", "exp", "--split", "2", "--epochs", "150", "--seed", "632",
                                "--model_dir", "ck", "--modality", "rgb", "--workers", "2", "--model", "r21d"])
    assert (a.mode, a.clip_len, a.batch_size, a.weight_decay, a.ft_lr, a.gpu, a.split) == \
        ("test", 16, 16, 5e-4, 1e-2, 0, "2")
    assert a.out == os.path.join("ck", "r21d_rgb_cls_exp") and a.workers == 2 and a.model == "r21d"
    b = ft_classify.parse_args([])
    assert b.dataset == "ucf101" and b.modality == "res" and b.mode == "train" and b.workers == 4
