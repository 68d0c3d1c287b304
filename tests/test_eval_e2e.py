"""End to end on tiny synthetic data: self-supervised checkpoint -> retrieval -> linear probe ->
fine-tuning -> testing, through the commands and the original command lines."""
import json
import os
import subprocess
import sys

import torch

from iic_ext import finetune, linear, retrieve
from iic_ext.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLIP = ["--clip-len", "4", "--resize", "32", "32", "--crop-size", "32", "--workers", "0", "--no-progress"]


def _ssl_checkpoint(out):
    """A checkpoint of the trainer (a two-step run) or, without the trainer, one in its format."""
    try:
        from iic_ext import train
    except ImportError:
        train = None
    if train is not None:
        args = train.get_args_parser().parse_args(
            CLIP + ["--num-videos", "8", "--batch-size", "4", "--epochs", "1", "--nce-k", "4", "--out", str(out),
                    "--device", "cpu", "--print-freq", "1"])
        train.main(args)
        path = out / "last.pth"
        assert path.is_file()
        return path
    torch.manual_seed(0)
    out.mkdir(parents=True)
    path = out / "last.pth"
    torch.save({"model": build_model("r3d").state_dict(), "epoch": 1,
                "args": {"model": "r3d", "clip_len": 4, "resize": [32, 32], "crop_size": 32, "seed": 632}}, path)
    return path


def test_ssl_to_retrieval_linear_finetune(tmp_path, capsys, monkeypatch):
    # The default training run's folder: the commands pick its checkpoint and clip settings up.
    monkeypatch.chdir(tmp_path)
    ckpt = _ssl_checkpoint(tmp_path / "runs" / "r3d_res_repeat_synthetic")
    data = ["--num-videos", "6", "--num-test-videos", "4", "--clips-per-video", "2"]
    feats = ["--feature-dir", str(tmp_path / "features")]

    r = retrieve.cli(data + feats + ["--out", str(tmp_path / "ret"), "--merge", "--no-plot", "--no-progress",
                                     "--workers", "0"])
    assert set(f"top{k}" for k in (1, 5, 10, 20, 50)) <= set(r)
    out = capsys.readouterr().out
    assert "default training run" in out and "all backbone keys matched" in out and "RANDOM INIT" not in out
    s = r["settings"]
    assert (s["clip_len"], s["resize"], s["crop_size"]) == (4, [32, 32], 32)  # from the checkpoint
    assert r["feature_dim"] == 2 * 512  # merged: rgb + res conv features (512 each at 4x32x32)

    lp = linear.cli(CLIP + data + feats + ["--ckpt", str(ckpt), "--out", str(tmp_path / "lin"), "--wd", "1e-2",
                                          "--knn", "3"])
    assert 0 <= lp["linear_acc"] <= 1 and lp["knn"]["k"] == 3 and lp["feature_dim"] == 512

    ft = finetune.cli(CLIP + data + ["--ckpt", str(ckpt), "--epochs", "1", "--batch-size", "3",
                                     "--out", str(tmp_path / "ft"), "--save-freq", "0"])
    out = capsys.readouterr().out
    assert "linear.weight, linear.bias" in out and "newly initialised as expected" in out
    assert json.loads((tmp_path / "ft" / "results.json").read_text())["test_acc"] == ft["test_acc"]

    # The original command line tests the fine-tuned model.
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "python", "ft_classify.py"), "--ckpt",
         str(tmp_path / "ft" / "best.pth"), "--dataset", "synthetic", "--mode=test", "--bs", "3",
         "--model_dir", str(tmp_path / "orig"), "--cl", "4", "--resize", "32", "32", "--crop-size", "32",
         "--num-videos", "6", "--num-test-videos", "4", "--clips-per-video", "2", "--workers", "0",
         "--no-progress"], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "orig" / "r3d_res_cls" / "results.json").read_text())
    assert res["test_acc"] == ft["test_acc"]
