"""Fine-tuning on action recognition with 10-clip testing: ``python -m iic_ext.finetune``.

As the original ``ft_classify.py``: the self-supervised weights are loaded into the backbone (every
key mismatch is printed; the new classifier ``linear.*`` is the expected one), a new linear classifier
is added and all layers are trained with SGD (lr 1e-3, momentum 0.9, weight decay 5e-4, batch 16,
150 epochs; conv4, conv5 and the classifier in a second parameter group at ``--ft-lr``, equal by
default), ReduceLROnPlateau on the validation loss (patience 50, factor 0.1, min lr 1e-5). The
validation videos (800 for UCF101, 400 for HMDB51, the same fraction of a synthetic training set) are
drawn at random, seeded, from the training list and see the training augmentation. The model with
the lowest validation loss is tested on the test list with ``clips_per_video`` centre-cropped clips per
video at linspace positions, logits averaged: the video-level accuracy is reported.

Residual-frame inputs are the unscaled ``x - roll(x, 1, time)`` of the original fine-tuning.

Differences from the original: validation clips are drawn once (fixed windows and crops; the original
draws new ones every epoch, which makes the best-model choice noisier); checkpoints are written
atomically and a run resumes exactly (``--resume``); ``--split all`` runs the three splits and reports
the mean; the test loss is averaged per video rather than per batch.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from .evaluation.common import (build_backbone, build_eval_dataset, describe_departures, describe_init,
                                load_backbone_weights, resolve_common, select_device)
from .evaluation.features import clip_input, needed_modalities
from .evaluation.io import write_json
from .models.registry import MODEL_NAMES, MODELS, model_spec
from .utils.checkpoint import load_checkpoint, save_checkpoint
from .utils.misc import plain_args, seed_everything

__all__ = ["get_args_parser", "resolve_args", "main", "run_split", "train_one_epoch", "evaluate",
           "test_videos", "validation_size", "cli", "ORIGINAL_FT", "DEMO_FT"]

CHECKPOINT_VERSION = 1

# The original ft_classify.py.
ORIGINAL_FT = dict(epochs=150, batch_size=16, lr=1e-3, momentum=0.9, weight_decay=5e-4, patience=50,
                   lr_factor=0.1, min_lr=1e-5)
# Synthetic demo: same optimiser, a few epochs so that it finishes in about a minute on two CPU cores.
DEMO_FT = dict(epochs=3, batch_size=16, lr=1e-3, momentum=0.9, weight_decay=5e-4, patience=50,
               lr_factor=0.1, min_lr=1e-5)
# Validation videos taken from the training list (the original's fixed counts).
VAL_SIZE = {"ucf101": 800, "hmdb51": 400}
UCF101_TRAIN_VIDEOS = 9537  # split 1 training list: 800 of them is the validation fraction


def validation_size(dataset: str, num_train: int, override: Optional[int] = None) -> int:
    """Validation videos: ``override``, else 800 (UCF101) / 400 (HMDB51), else the UCF101 fraction
    (800 / 9537) of ``num_train`` (at least 1, leaving at least one training video)."""
    if override is not None:
        n = int(override)
    elif dataset in VAL_SIZE:
        n = VAL_SIZE[dataset]
    else:
        n = max(1, round(num_train * VAL_SIZE["ucf101"] / UCF101_TRAIN_VIDEOS))
    if not 0 <= n < num_train:
        raise ValueError(f"validation size {n} must be in [0, {num_train}) for {num_train} training videos")
    return n


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "IIC fine-tuning", add_help=add_help,
        description="Fine-tune a self-supervised backbone for action recognition and test it with several "
                    "clips per video. Without arguments: the synthetic dataset, starting from the default "
                    "training run's checkpoint if present, else from random init.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "ucf101", "hmdb51"])
    g.add_argument("--data-root", "--data_root", dest="data_root", default=None)
    g.add_argument("--split", default="1", choices=["1", "2", "3", "all"],
                   help="dataset split; 'all' runs the three and reports the mean")
    g.add_argument("--clip-len", "--clip_len", "--cl", dest="clip_len", type=int, default=None)
    g.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None)
    g.add_argument("--crop-size", "--crop_size", dest="crop_size", type=int, default=None)
    g.add_argument("--clips-per-video", "--clips_per_video", dest="clips_per_video", type=int, default=None,
                   help="test clips per video (10 for ucf101/hmdb51)")
    g.add_argument("--val-size", "--val_size", dest="val_size", type=int, default=None,
                   help="validation videos from the training list (800 UCF101, 400 HMDB51)")
    g.add_argument("--num-videos", "--num_videos", dest="num_videos", type=int, default=None,
                   help="synthetic only: training-list videos")
    g.add_argument("--num-test-videos", "--num_test_videos", dest="num_test_videos", type=int, default=None)
    g.add_argument("--data-seed", "--data_seed", dest="data_seed", type=int, default=None)
    g.add_argument("--workers", type=int, default=None)

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=MODEL_NAMES)
    g.add_argument("--ckpt", default=None,
                   help="train: self-supervised weights ('none' = from scratch); test: the fine-tuned model "
                        "(default <out>/best.pth)")
    g.add_argument("--strict", action="store_true", help="train: fail on any backbone key mismatch")
    g.add_argument("--modality", default="res", choices=["rgb", "res", "u", "v"])
    g.add_argument("--mode", default="train", choices=["train", "test"])

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", "--batch_size", "--bs", dest="batch_size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--ft-lr", "--ft_lr", dest="ft_lr", type=float, default=None,
                   help="lr of conv4, conv5 and the classifier (default: --lr)")
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", "--weight_decay", "--wd", dest="weight_decay", type=float, default=None)
    g.add_argument("--patience", type=int, default=None, help="ReduceLROnPlateau patience (epochs)")
    g.add_argument("--lr-factor", "--lr_factor", dest="lr_factor", type=float, default=None)
    g.add_argument("--min-lr", "--min_lr", dest="min_lr", type=float, default=None)

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--gpu", type=int, default=None)
    g.add_argument("--seed", type=int, default=632)
    g.add_argument("--out", "--output-dir", dest="out", default=None,
                   help="output folder (default runs/finetune/<run name>)")
    g.add_argument("--desp", default=None, help="added to the default run name (the original flag)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from a last.pth (no value: <out>/last.pth)")
    g.add_argument("--save-freq", "--save_freq", dest="save_freq", type=int, default=20,
                   help="also keep model_<epoch>.pth every N epochs (0: never)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "_resolved", False):
        return args
    # In test mode --ckpt is the fine-tuned model; the self-supervised default is still resolved so that
    # the default output folder is the one the matching training run wrote.
    args.test_ckpt = args.ckpt if args.mode == "test" else None
    if args.mode == "test":
        args.ckpt = None
    resolve_common(args)
    preset = DEMO_FT if args.dataset == "synthetic" else ORIGINAL_FT
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
            args.from_preset.append(key)
    if args.ft_lr is None:
        args.ft_lr = args.lr
    for name in ("epochs", "batch_size", "clip_len", "crop_size", "clips_per_video"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.dataset != "synthetic" and (args.num_videos is not None or args.num_test_videos is not None):
        raise ValueError("--num-videos / --num-test-videos apply to --dataset synthetic only")
    if args.out is None:
        init = "scratch" if not args.ckpt else \
            os.path.basename(os.path.dirname(os.path.abspath(args.ckpt))) or "ckpt"
        name = f"{args.dataset}_{args.model}_{args.modality}_{init}" + (f"_{args.desp}" if args.desp else "")
        args.out = os.path.join("runs", "finetune", name)
    args.splits = [1, 2, 3] if str(args.split) == "all" else [int(args.split)]
    if args.mode == "test":
        args.ckpt = args.test_ckpt
    args._resolved = True
    return args


# ---- building blocks --------------------------------------------------------------------------------


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """SGD with the original two groups: conv4, conv5 and the classifier at ``ft_lr``, the rest at ``lr``.

    For the other backbones the late group is their last two stages and classifier
    (``ModelSpec.late_layers``: ``layer3``, ``layer4``, ``fc``; ``Mixed_4*``, ``Mixed_5*``, ``logits``...).
    """
    arch = getattr(model, "arch", None)
    prefixes = MODELS[arch].late_layers if arch in MODELS else None

    def late(name):
        if prefixes is not None:
            return name.startswith(prefixes)
        return "linear" in name or "conv5" in name or "conv4" in name

    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not late(n)]},
              {"params": [p for n, p in named if late(n)], "lr": args.ft_lr}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=args.lr, momentum=args.momentum,
                           weight_decay=args.weight_decay)


def _inputs(batch: dict, args, device) -> torch.Tensor:
    source = "rgb" if args.modality in ("rgb", "res") else args.modality
    return clip_input(batch[source].to(device, non_blocking=True), args.modality, residual_scaled=False)


def _bar(total, desc, args):
    if not args.progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


@torch.enable_grad()
def train_one_epoch(model, optimizer, loader, epoch: int, args, device) -> Dict[str, float]:
    model.train()
    total_loss, total_correct, n = 0.0, 0, 0
    bar = _bar(len(loader), f"epoch {epoch}/{args.epochs} train", args)
    for batch in loader:
        x = _inputs(batch, args, device)
        y = torch.as_tensor(batch["label"]).to(device)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        b = y.shape[0]
        total_loss += loss.item() * b
        total_correct += int((logits.argmax(1) == y).sum())
        n += b
        if bar is not None:
            bar.set_postfix(loss=f"{total_loss / n:.3f}", acc=f"{total_correct / n:.3f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.1e}")
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"loss": total_loss / max(n, 1), "acc": total_correct / max(n, 1)}


@torch.no_grad()
def evaluate(model, loader, args, device, desc: str = "val") -> Dict[str, float]:
    """Clip-level loss and accuracy of one clip per video (validation)."""
    model.eval()
    total_loss, total_correct, n = 0.0, 0, 0
    for batch in loader:
        x = _inputs(batch, args, device)
        y = torch.as_tensor(batch["label"]).to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        total_correct += int((logits.argmax(1) == y).sum())
        n += y.shape[0]
    return {"loss": total_loss / max(n, 1), "acc": total_correct / max(n, 1)}


@torch.no_grad()
def test_videos(model, dataset, args, device) -> Dict[str, Any]:
    """Video-level accuracy: logits averaged over each video's clips (``[N, C, T, H, W]`` items).

    Clips go through the model ``batch_size`` at a time whatever the clips per video.
    """
    model.eval()
    loader = DataLoader(dataset, batch_size=max(1, args.batch_size // max(args.clips_per_video, 1)) or 1,
                        shuffle=False, num_workers=args.workers, pin_memory=device.type == "cuda")
    all_logits, labels = [], []
    bar = _bar(len(dataset), "test", args)
    for batch in loader:
        source = "rgb" if args.modality in ("rgb", "res") else args.modality
        clips = batch[source]
        if clips.dim() == 5:  # one clip per video
            clips = clips.unsqueeze(1)
        B, N = clips.shape[:2]
        logits = torch.cat([model(_inputs({source: chunk}, args, device))
                            for chunk in clips.flatten(0, 1).split(args.batch_size)])
        all_logits.append(logits.view(B, N, -1).mean(1).float().cpu())
        labels.append(torch.as_tensor(batch["label"]).long())
        if bar is not None:
            bar.update(B)
    if bar is not None:
        bar.close()
    logits = torch.cat(all_logits)
    labels = torch.cat(labels)
    pred = logits.argmax(1)
    return {"acc": float((pred == labels).float().mean()), "loss": float(F.cross_entropy(logits, labels)),
            "num_videos": int(labels.numel()), "clips_per_video": int(args.clips_per_video),
            "predictions": pred.tolist(), "labels": labels.tolist()}


def _save(state: dict, path: str) -> None:
    save_checkpoint(state, path)


def _rng_state() -> dict:
    # Data randomness is keyed by (seed, epoch, index) and the shuffle order by (seed, epoch); the
    # global torch generator is the only other state a resumed run needs.
    return {"torch": torch.get_rng_state()}


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])


def _loader(dataset, args, device, shuffle: bool, epoch: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=g if shuffle else None,
                      num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=False)


def run_split(args, split: int, device, out: str) -> Dict[str, Any]:
    """Fine-tune (``--mode train``) and test on one split; writes ``<out>/finetune.json``."""
    os.makedirs(out, exist_ok=True)
    modalities = needed_modalities(args.modality)
    test_set = build_eval_dataset(args, train=False, modalities=modalities, split=split)
    num_classes = test_set.num_classes
    seed_everything(args.seed)
    model = build_backbone(args.model, with_classifier=True, num_classes=num_classes).to(device)
    history: List[Dict[str, float]] = []
    best_path = os.path.join(out, "best.pth")
    result: Dict[str, Any] = {"split": split}

    if args.mode == "train":
        if args.ckpt:
            # the new classifier (linear, fc or logits by model) is the expected missing part
            load_backbone_weights(model, args.ckpt, strict=args.strict)
        model.to(device)
        full = build_eval_dataset(args, train=True, modalities=modalities, clips_per_video=1, split=split,
                                  augment=True)
        n_val = validation_size(args.dataset, len(full), args.val_size)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(args.seed)).tolist()
        train_idx, val_idx = sorted(perm[n_val:]), sorted(perm[:n_val])
        val_full = build_eval_dataset(args, train=True, modalities=modalities, clips_per_video=1, split=split,
                                      augment=True)
        val_full.set_epoch(10**6)  # one fixed draw of windows and crops, unlike any training epoch
        train_set, val_set = Subset(full, train_idx), Subset(val_full, val_idx)
        print(f"  split {split}: {len(train_set)} training, {len(val_set)} validation, {len(test_set)} test "
              f"videos, {num_classes} classes")
        optimizer = make_optimizer(model, args)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, "min", factor=args.lr_factor,
                                                               patience=args.patience, min_lr=args.min_lr)
        start, best = 1, {"val_loss": math.inf, "epoch": 0}
        last_path = os.path.join(out, "last.pth")
        resume = args.resume
        if resume == "auto":
            resume = last_path if os.path.isfile(last_path) else None
            if resume is None:
                print(f"  --resume: no {last_path} yet, starting fresh")
        if resume:
            state = load_checkpoint(resume, required=("model", "optimizer", "scheduler", "epoch", "best",
                                                      "history", "rng"))
            saved = state.get("args", {})
            for key in ("dataset", "model", "modality", "batch_size", "seed", "clip_len"):
                if key in saved and saved[key] != getattr(args, key):
                    raise ValueError(f"{resume}: cannot resume with {key}={getattr(args, key)!r} "
                                     f"(checkpoint: {saved[key]!r})")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start, best, history = int(state["epoch"]) + 1, dict(state["best"]), list(state["history"])
            _restore_rng(state["rng"])
            print(f"  resumed from {resume} at epoch {start}")
        for epoch in range(start, args.epochs + 1):
            t0 = time.time()
            full.set_epoch(epoch)
            tr = train_one_epoch(model, optimizer, _loader(train_set, args, device, True, epoch), epoch, args,
                                 device)
            va = evaluate(model, _loader(val_set, args, device, False), args, device) if len(val_set) else \
                {"loss": tr["loss"], "acc": tr["acc"]}
            scheduler.step(va["loss"])
            rec = {"epoch": epoch, "train_loss": tr["loss"], "train_acc": tr["acc"], "val_loss": va["loss"],
                   "val_acc": va["acc"], "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            history.append(rec)
            print(f"  epoch {epoch:3d}/{args.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.3f}  "
                  f"val loss {va['loss']:.4f} acc {va['acc']:.3f}  lr {rec['lr']:.1e}  {rec['seconds']:.1f}s")
            if va["loss"] < best["val_loss"]:
                best = {"val_loss": va["loss"], "epoch": epoch}
                _save({"version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
                       "val_loss": va["loss"], "args": plain_args(args), "num_classes": num_classes}, best_path)
            if args.save_freq and epoch % args.save_freq == 0:
                _save({"version": CHECKPOINT_VERSION, "model": model.state_dict(), "epoch": epoch,
                       "num_classes": num_classes}, os.path.join(out, f"model_{epoch}.pth"))
            _save({"version": CHECKPOINT_VERSION, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "history": history,
                   "rng": _rng_state(), "args": plain_args(args), "num_classes": num_classes}, last_path)
        if not os.path.isfile(best_path):
            raise RuntimeError(f"{out}: no best.pth (no epoch was run?)")
        model.load_state_dict(load_checkpoint(best_path, required=("model",))["model"])
        print(f"  testing the best-validation model (epoch {best['epoch']}, val loss {best['val_loss']:.4f})")
        result["best_epoch"], result["best_val_loss"] = best["epoch"], best["val_loss"]
        result["history"] = history
    else:
        ckpt = args.ckpt or best_path
        if not os.path.isfile(ckpt):
            raise FileNotFoundError(f"--mode test: no fine-tuned model at {ckpt} (give --ckpt)")
        print(f"  testing {ckpt}")
        load_backbone_weights(model, ckpt, expected_missing="", strict=True)
        result["ckpt"] = ckpt
    model.to(device)
    t0 = time.time()
    test = test_videos(model, test_set, args, device)
    print(f"  split {split}: video accuracy {100 * test['acc']:.2f}% ({test['num_videos']} videos x "
          f"{test['clips_per_video']} clips, logits averaged), loss {test['loss']:.4f}, {time.time() - t0:.1f}s")
    result.update(test_acc=test["acc"], test_loss=test["loss"], num_test=test["num_videos"],
                  clips_per_video=test["clips_per_video"])
    write_json({**result, "predictions": test["predictions"], "labels": test["labels"]},
               os.path.join(out, "finetune.json"))
    return result


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Fine-tune/test on each requested split; returns the dict written to ``<out>/results.json``."""
    args = resolve_args(args)
    device = select_device(args.device, args.gpu)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    init = describe_init(args) if args.mode == "train" else "weights: fine-tuned model (--mode test)"
    print(f"Fine-tuning ({args.mode}) on {args.dataset} split {args.split}: {args.model}, input {args.modality}"
          f"{' (x - roll(x), unscaled)' if args.modality == 'res' else ''}, clips {args.clip_len}x{args.crop_size}"
          f"x{args.crop_size} from {args.resize[0]}x{args.resize[1]}, {args.clips_per_video} test clips/video, "
          f"device {device}")
    print(f"  {init}")
    if args.mode == "train":
        late = "/".join(model_spec(args.model).late_layers)  # conv4/conv5/linear for the original nets
        print(f"  SGD lr {args.lr} ({late} {args.ft_lr}), momentum {args.momentum}, wd "
              f"{args.weight_decay}, batch {args.batch_size}, {args.epochs} epochs, ReduceLROnPlateau(patience "
              f"{args.patience}, factor {args.lr_factor}, min {args.min_lr})")
    if args.dataset == "synthetic" and describe_departures(args, ORIGINAL_FT):
        print(f"  synthetic demo settings (the original's differ): {describe_departures(args, ORIGINAL_FT)}")
    t0 = time.time()
    per_split = {}
    for split in args.splits:
        out = args.out if len(args.splits) == 1 else os.path.join(args.out, f"split{split}")
        per_split[str(split)] = run_split(args, split, device, out)
    accs = [r["test_acc"] for r in per_split.values()]
    summary: Dict[str, Any] = {
        "test_acc": float(np.mean(accs)), "test_acc_std": float(np.std(accs)) if len(accs) > 1 else 0.0,
        "splits": {s: {k: v for k, v in r.items() if k != "history"} for s, r in per_split.items()},
        "settings": {**plain_args(args), "device": str(device), "weights": init,
                     "seconds": round(time.time() - t0, 2)}}
    if len(accs) > 1:
        print(f"Mean video accuracy over splits {args.splits}: {100 * summary['test_acc']:.2f}% "
              f"(std {100 * summary['test_acc_std']:.2f}; " +
              ", ".join(f"split {s}: {100 * r['test_acc']:.2f}%" for s, r in per_split.items()) + ")")
    write_json(summary, os.path.join(args.out, "results.json"))
    print(f"  wrote {os.path.join(args.out, 'results.json')}")
    return summary


def cli(argv=None) -> Dict[str, Any]:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
