"""Self-supervised IIC training: ``python -m iic_ext.train``.

One step, as the paper and the original ``train_ssl.py``: view 1 is the RGB clip, view 2 the chosen
modality of the same clip (residual frames computed on the device, optical flow ``u``/``v`` from the
dataset, or RGB itself), the intra-negative is the repeat or shuffle of view 1. The objective
(:mod:`iic_ext.objectives`: ``memory``, the paper's memory banks; ``moco``; ``simclr``) runs the backbone
forwards (each view in its own forward in train mode), returns the loss (the sum of the two views'
terms), and updates its banks, queues or key encoder after the optimiser step.

Without arguments it trains a small demo on the built-in synthetic dataset (see ``DEMO_PRESET``);
``--dataset ucf101|hmdb51`` uses the original recipe (``ORIGINAL_PRESET``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from typing import Optional

import torch
from torch.utils.data import DataLoader

from .models import MODEL_NAMES
from .objectives import OBJECTIVES, build_objective
from .ops import unchecked_indices
from .utils.checkpoint import load_checkpoint, save_checkpoint
from .utils.logging import AverageMeter, MetricWriter
from .utils.misc import (EpochSampler, capture_rng_state, epoch_seed, plain, plain_args, restore_rng_state,
                         seed_everything, select_device)

__all__ = ["get_args_parser", "resolve_args", "main", "train_one_epoch", "train_step", "build_components", "cli",
           "ORIGINAL_PRESET", "DEMO_PRESET"]

CHECKPOINT_VERSION = 2

# The original train_ssl.py (UCF101 / HMDB51): R3D-10, res + repeat, batch 16, 240 epochs, SGD 0.01.
ORIGINAL_PRESET = dict(
    objective="memory", model="r3d", modality="res", neg="repeat", epochs=240, batch_size=16, lr=0.01, momentum=0.9,
    weight_decay=1e-4, lr_schedule="multistep", milestones=[45, 90, 125, 160], lr_gamma=0.2,
    warmup_epochs=0, nce_k=1024, nce_t=0.07, nce_m=0.5, normalize_features=False, clip_len=16,
    resize=[128, 171], crop_size=112, workers=8, save_freq=40, num_videos=None, frame_size=None,
)

# Sized for a few minutes on two CPU cores; each departure from the original is explained by
# DEMO_REASONS and printed when the preset is used.
DEMO_PRESET = dict(
    objective="memory", model="r3d", modality="res", neg="repeat", epochs=40, batch_size=16, lr=0.03, momentum=0.9,
    weight_decay=1e-4, lr_schedule="cosine", milestones=[], lr_gamma=0.2, warmup_epochs=1,
    nce_k=127, nce_t=0.2, nce_m=0.5, normalize_features=True, clip_len=8, resize=[20, 20],
    crop_size=16, workers=0, save_freq=10, num_videos=128, frame_size=None,
)
DEMO_REASONS = {
    "clip_len": "8-frame 16x16 clips keep a step cheap enough for hundreds of steps on a CPU",
    "num_videos": "128 videos: every memory-bank row is refreshed once per epoch, 40 times in the run",
    "nce_k": "K = N - 1 (the original's K=1024 is for 9.5k videos)",
    "normalize_features": "L2-normalised features (as CMC): unnormalised 512-d features with T=0.07 "
                          "start at losses ~100x chance and collapse at this scale",
    "nce_t": "a temperature for unit-norm features",
    "lr": "warm-up and a cosine schedule over the short run",
    "moco_m": "a key encoder averaged over ~100 steps: 0.999 averages over more than the 320-step run",
}
# Reasons that differ by objective, looked up before DEMO_REASONS.
DEMO_OBJECTIVE_REASONS = {
    ("moco", "nce_k"): "a queue of 128 keys holds one epoch of the 128 videos (16384 is for UCF101-size data)",
    ("moco", "nce_t"): "T 0.07, as MoCo v1 and CMC's MoCo",
    ("simclr", "nce_t"): "the memory demo's temperature for unit-norm features",
}

# The other objectives on the same recipe: what differs from the memory objective's settings.
# moco: MoCo v2's queue of 16384 keys, MLP head and T = 0.2 (the key encoder's m = 0.999 is --moco-m);
# simclr: SimCLR's MLP head and T = 0.1 (its negatives are the batch: no K).
OBJECTIVE_PRESETS = {
    "original": {
        "moco": dict(nce_k=16384, nce_t=0.2, proj_dim=128, normalize_features=True, moco_m=0.999),
        "simclr": dict(nce_k=None, nce_t=0.1, proj_dim=128, normalize_features=True),
    },
    "demo": {
        # moco: T 0.07 (MoCo v1, CMC's MoCo); m 0.99, a key encoder averaged over ~100 steps (0.999
        # averages over ~1000, more than the whole 320-step run, so its keys would stay close to the
        # random initialisation's)
        "moco": dict(nce_k=128, nce_t=0.07, proj_dim=128, normalize_features=True, moco_m=0.99),
        "simclr": dict(nce_k=None, nce_t=0.2, proj_dim=128, normalize_features=True),
    },
}

# Options whose default depends on the dataset and the objective (filled by resolve_args).
_PRESET_KEYS = tuple(ORIGINAL_PRESET) + ("proj_dim", "moco_m")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "IIC self-supervised training", add_help=add_help,
        description="Inter-Intra Contrastive self-supervised training. Without arguments: a small demo "
                    "on the built-in synthetic dataset. Options left unset take the original recipe's "
                    "value for ucf101/hmdb51 and the demo preset's value for synthetic.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "ucf101", "hmdb51"])
    g.add_argument("--data-root", "--data_root", dest="data_root", default=None,
                   help="dataset folder (default data/<dataset>)")
    g.add_argument("--split", type=int, default=1)
    g.add_argument("--clip-len", "--clip_len", "--cl", dest="clip_len", type=int, default=None)
    g.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None)
    g.add_argument("--crop-size", "--crop_size", dest="crop_size", type=int, default=None)
    g.add_argument("--workers", "--num-workers", "--num_workers", dest="workers", type=int, default=None)
    g.add_argument("--num-videos", "--num_videos", dest="num_videos", type=int, default=None,
                   help="synthetic only: number of training videos")
    g.add_argument("--frame-size", "--frame_size", dest="frame_size", type=int, default=None,
                   help="synthetic only: render size before resizing")

    g = p.add_argument_group("method")
    g.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help="memory: the paper's memory banks (default for ucf101/hmdb51); moco: momentum key "
                        "encoder and key queues; simclr: in-batch NT-Xent. Each with the intra-negative")
    g.add_argument("--model", default=None, choices=MODEL_NAMES)
    g.add_argument("--init", default=None, metavar="PATH",
                   help="start from these backbone weights (any checkpoint layout load_weights reads)")
    g.add_argument("--modality", default=None, choices=["rgb", "res", "u", "v"], help="view 2")
    g.add_argument("--neg", default=None, choices=["repeat", "shuffle", "none"],
                   help="intra-negative; none = CMC baseline without the negative bank")
    g.add_argument("--shuffle-mode", "--shuffle_mode", dest="shuffle_mode", default="swap",
                   choices=["swap", "permute", "reverse"])
    g.add_argument("--nce-k", "--nce_k", dest="nce_k", type=int, default=None,
                   help="memory: negatives drawn per sample; moco: keys per queue")
    g.add_argument("--nce-t", "--nce_t", dest="nce_t", type=float, default=None, help="temperature")
    g.add_argument("--nce-m", "--nce_m", dest="nce_m", type=float, default=None,
                   help="memory: momentum of the bank update")
    g.add_argument("--moco-m", "--moco_m", dest="moco_m", type=float, default=None,
                   help="moco: momentum of the key encoder's moving average (0.999; demo 0.99)")
    g.add_argument("--proj-dim", "--proj_dim", dest="proj_dim", type=int, default=None,
                   help="output size of an MLP projection head (0: none; default 0 for memory, as the "
                        "original, 128 for moco and simclr)")
    g.add_argument("--nce-criterion", "--nce_criterion", dest="nce_criterion", action="store_true",
                   help="NCE loss (NCECriterion) instead of the softmax cross-entropy")
    g.add_argument("--normalize-features", "--normalize_features", dest="normalize_features",
                   action=argparse.BooleanOptionalAction, default=None,
                   help="L2-normalise backbone features before the contrast (not in the paper; "
                        "on in the synthetic demo)")
    g.add_argument("--feat-dim", "--feat_dim", dest="feat_dim", type=int, default=None,
                   help="feature size of the contrast: the backbone's (512 for the paper's models) or "
                        "--proj-dim; given, it must equal that")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=None)
    g.add_argument("--lr", "--learning-rate", "--learning_rate", dest="lr", type=float, default=None)
    g.add_argument("--momentum", type=float, default=None)
    g.add_argument("--weight-decay", "--weight_decay", dest="weight_decay", type=float, default=None)
    g.add_argument("--lr-schedule", "--lr_schedule", dest="lr_schedule", default=None,
                   choices=["multistep", "cosine", "constant"])
    g.add_argument("--milestones", type=int, nargs="*", default=None, help="MultiStepLR epochs")
    g.add_argument("--lr-gamma", "--lr_gamma", dest="lr_gamma", type=float, default=None)
    g.add_argument("--warmup-epochs", "--warmup_epochs", dest="warmup_epochs", type=float, default=None,
                   help="linear lr warm-up, per step, over this many epochs")
    g.add_argument("--amp", action="store_true", help="mixed precision (bf16 on CPU, fp16 on CUDA)")
    g.add_argument("--amp-dtype", "--amp_dtype", dest="amp_dtype", default=None, choices=["fp16", "bf16"])

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--out", "--output-dir", dest="out", default=None,
                   help="checkpoint folder (default runs/<model>_<modality>_<neg>_<dataset>)")
    g.add_argument("--log-dir", "--log_dir", dest="log_dir", default=None,
                   help="TensorBoard folder (default <out>/tb)")
    g.add_argument("--resume", default="", help="checkpoint to continue from (e.g. <out>/last.pth)")
    g.add_argument("--seed", type=int, default=632)
    g.add_argument("--save-freq", "--save_freq", dest="save_freq", type=int, default=None,
                   help="also keep ckpt_epoch<N>.pth every N epochs (last.pth is written every epoch)")
    g.add_argument("--print-freq", "--print_freq", dest="print_freq", type=int, default=10,
                   help="steps between TensorBoard points and progress-bar updates")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    return p


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill unset options from the dataset's and the objective's preset and check the combination.

    Sets ``args.preset`` (``"original"`` or ``"demo"``) and ``args.from_preset`` (names filled in).
    Raises ValueError naming the flags of a bad combination.
    """
    preset = dict(DEMO_PRESET if args.dataset == "synthetic" else ORIGINAL_PRESET)
    args.preset = "demo" if args.dataset == "synthetic" else "original"
    objective = getattr(args, "objective", None) or preset["objective"]
    preset["proj_dim"] = 0
    preset["moco_m"] = 0.999
    preset.update(OBJECTIVE_PRESETS[args.preset].get(objective, {}))
    preset["objective"] = objective
    filled = []
    for key in _PRESET_KEYS:
        if getattr(args, key, None) is None:
            value = preset[key]
            setattr(args, key, list(value) if isinstance(value, list) else value)
            filled.append(key)
    args.from_preset = filled
    if args.data_root is None and args.dataset != "synthetic":
        args.data_root = os.path.join("data", args.dataset)
    _check_args(args, filled)
    if args.out is None:
        args.out = os.path.join("runs", f"{args.model}_{args.modality}_{args.neg}_{args.dataset}"
                                + ("" if args.objective == "memory" else f"_{args.objective}"))
        if args.resume:
            args.out = os.path.dirname(os.path.abspath(args.resume))
    if args.log_dir is None:
        args.log_dir = os.path.join(args.out, "tb")
    return args


def _check_args(args, filled) -> None:
    """Reject values and combinations that cannot train, naming the flags."""
    from .models import model_spec

    if args.dataset != "synthetic" and (args.num_videos is not None or args.frame_size is not None):
        raise ValueError("--num-videos and --frame-size apply to --dataset synthetic only")
    for name in ("epochs", "batch_size", "clip_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if args.nce_t <= 0:
        raise ValueError(f"--nce-t must be positive, got {args.nce_t}")
    if args.proj_dim < 0:
        raise ValueError(f"--proj-dim must be 0 (no head) or positive, got {args.proj_dim}")
    backbone_dim = model_spec(args.model).feature_dim
    dim = args.proj_dim or backbone_dim
    if args.feat_dim is None:
        args.feat_dim = dim
    elif args.feat_dim != dim:
        raise ValueError(f"--feat-dim {args.feat_dim}: the contrast's features are "
                         + (f"--proj-dim {args.proj_dim}" if args.proj_dim else
                            f"{args.model}'s {backbone_dim}-d backbone features (no projection head; "
                            f"--proj-dim adds one)"))
    obj = args.objective
    if obj == "memory":
        if args.nce_k < 1:
            raise ValueError("--nce-k must be positive")
        if not 0 <= args.nce_m < 1:
            raise ValueError("--nce-m must be in [0, 1)")
    else:
        given = lambda key: key not in filled  # noqa: E731
        if args.nce_criterion:
            raise ValueError(f"--nce-criterion is the memory objective's NCE loss; --objective {obj} uses "
                             f"the softmax cross-entropy (InfoNCE)")
        if given("normalize_features") and not args.normalize_features:
            raise ValueError(f"--no-normalize-features: --objective {obj} always L2-normalises its features")
        if given("nce_m"):
            raise ValueError(f"--nce-m is the memory bank's momentum; --objective {obj} has no bank"
                             + (" (the key encoder's is --moco-m)" if obj == "moco" else ""))
    if obj == "moco":
        if args.nce_k < args.batch_size:
            raise ValueError(f"--objective moco: the queue (--nce-k {args.nce_k}) must hold at least one "
                             f"batch of keys (--batch-size {args.batch_size})")
        if args.nce_k % args.batch_size:
            raise ValueError(f"--objective moco: --nce-k {args.nce_k} must be a multiple of --batch-size "
                             f"{args.batch_size}, so that each step's keys take whole queue slots")
        if not 0 <= args.moco_m < 1:
            raise ValueError("--moco-m must be in [0, 1)")
    if obj == "simclr":
        if args.nce_k is not None:
            raise ValueError("--nce-k does not apply to --objective simclr: its negatives are the batch")
        if args.batch_size < 2:
            raise ValueError("--objective simclr needs --batch-size of at least 2: its negatives are the "
                             "other samples of the batch")


# ---- building blocks --------------------------------------------------------------------------------


def build_train_set(args):
    from .data import build_dataset

    modalities = ("rgb",) + ((args.modality,) if args.modality in ("u", "v") else ())
    kw = {}
    if args.dataset == "synthetic":
        if args.num_videos is not None:
            kw["num_videos"] = args.num_videos
        if args.frame_size is not None:
            kw["frame_size"] = args.frame_size
    return build_dataset(args.dataset, root=args.data_root, split=args.split, train=True,
                         modalities=modalities, clip_len=args.clip_len, resize=tuple(args.resize),
                         crop_size=args.crop_size, clips_per_video=1, seed=args.seed, **kw)


def build_loader(dataset, args, device):
    n = len(dataset)
    if n == 0:
        raise ValueError("the training set is empty")
    batch_size = args.batch_size
    if n < batch_size:
        # drop_last would leave no step at all: train on the whole (small) set as one batch instead.
        warnings.warn(f"the training set has {n} clips, fewer than --batch-size {batch_size}: "
                      f"using batch size {n}", stacklevel=2)
        batch_size = n
    sampler = EpochSampler(n, args.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
                        pin_memory=device.type == "cuda", drop_last=True,
                        persistent_workers=False)
    return loader, sampler


def build_lr_scheduler(optimizer, args):
    if args.lr_schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(args.milestones),
                                                    gamma=args.lr_gamma)
    if args.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 1.0)


class _Negatives:
    """Draws the negative's time index from a dedicated generator (on the CPU, so CPU and CUDA runs
    see the same negatives)."""

    def __init__(self, kind: str, shuffle_mode: str, generator: torch.Generator):
        self.kind = kind
        self.shuffle_mode = shuffle_mode
        self.generator = generator

    def index(self, batch: int, num_frames: int, device) -> torch.Tensor:
        from .ops import indices

        if self.kind == "repeat":
            idx = indices.repeat_index(batch, num_frames, self.generator, device="cpu")
        else:
            idx = indices.shuffle_index(batch, num_frames, self.generator, self.shuffle_mode, device="cpu")
        return idx.to(device, non_blocking=True)


def _autocast(device: torch.device, args):
    if not args.amp:
        return contextlib.nullcontext()
    dtype = torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_views(batch: dict, args, negatives: Optional[_Negatives], device):
    """The step inputs from a collated batch.

    Returns:
        (rgb [B, C, T, H, W], view2 or None (None: view 2 is RGB itself), negative or None), float32.
    """
    from .ops import iic_views, residual_frames

    clip = batch["rgb"].to(device, non_blocking=True)
    B, _, T = clip.shape[:3]
    if negatives is not None:
        rgb, res, neg = iic_views(clip, negatives.index(B, T, device))
    else:
        rgb = clip.to(torch.float32) / 255.0
        res = residual_frames(clip) if args.modality == "res" else None
        neg = None
    if args.modality == "res":
        view2 = res
    elif args.modality in ("u", "v"):
        view2 = batch[args.modality].to(device, non_blocking=True).to(torch.float32) / 255.0
    else:
        view2 = None
    return rgb, view2, neg


def train_step(model, objective, optimizer, batch, args, *, negatives, device, scaler=None):
    """One IIC step; returns a dict of detached scalars: ``loss`` and the objective's metrics
    (``loss_1``, ``loss_2``, ``prob_1``, ``prob_2``, ``top1_1``, ``top1_2``, ``chance``).

    The objective's state updates (banks, queues, key encoder) run after ``optimizer.step()``.
    Every index the step's ops take is valid by construction (frame indices and bank rows are drawn
    here in range) except the dataset indices, which are checked on the host before they move. On a
    GPU the ops' own range checks, one device synchronisation each, are then skipped.
    """
    index = batch["index"]
    n_data = getattr(objective, "n_rows", None)
    if n_data is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= n_data):
        raise IndexError(f"batch['index'] has entries outside [0, {n_data}) (the memory bank's rows): "
                         f"min {int(index.min())}, max {int(index.max())}")
    checks = contextlib.nullcontext() if device.type == "cpu" else unchecked_indices()
    with checks:
        return _step(model, objective, optimizer, batch, args, negatives, device, scaler)


def _step(model, objective, optimizer, batch, args, negatives, device, scaler):
    rgb, view2, neg_clip = make_views(batch, args, negatives, device)
    index = batch["index"].to(device, non_blocking=True)
    with _autocast(device, args):
        features = objective.encode(model, rgb, view2, neg_clip)
    loss, metrics = objective(features, index)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    objective.after_step(model)
    return {"loss": loss.detach(), **metrics}


def _set_lr(optimizer, scheduled, factor):
    for group, lr in zip(optimizer.param_groups, scheduled):
        group["lr"] = lr * factor


_METRICS = ("loss", "loss_1", "loss_2", "prob_1", "prob_2", "top1_1", "top1_2", "chance")


def train_one_epoch(model, objective, optimizer, loader, epoch, args, *, negatives, device,
                    scheduler, scaler=None, writer: Optional[MetricWriter] = None, global_step: int = 0,
                    step_callback=None):
    """Train one epoch (``epoch`` counts from 1).

    Returns:
        dict: averages (``loss``, ``loss_1``, ``loss_2``, ``prob_1``, ``prob_2``, ``top1_1``,
        ``top1_2``, ``chance``), ``clips_per_s``, ``time``, ``steps``, ``step_losses`` (list of float,
        one per step) and ``global_step``.
    """
    model.train()
    objective.train()
    meters = {k: AverageMeter() for k in _METRICS}
    step_losses = []
    steps_per_epoch = len(loader)
    warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
    scheduled = scheduler.get_last_lr()
    bar = None
    iterator = loader
    if args.progress:
        from tqdm import tqdm

        bar = tqdm(loader, total=steps_per_epoch, desc=f"epoch {epoch}/{args.epochs}", leave=False,
                   dynamic_ncols=True, file=sys.stderr)
        iterator = bar
    start = time.perf_counter()
    window_start, window_clips, clips = start, 0, 0
    for i, batch in enumerate(iterator):
        factor = min(1.0, (global_step + 1) / warmup_steps) if global_step < warmup_steps else 1.0
        _set_lr(optimizer, scheduled, factor)
        stats = train_step(model, objective, optimizer, batch, args, negatives=negatives,
                           device=device, scaler=scaler)
        loss = stats["loss"].item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at epoch {epoch}, step {i + 1}: stopping "
                                     f"(lower --lr, or try --normalize-features)")
        bsz = batch["index"].shape[0]
        for k, m in meters.items():
            m.update(stats[k].item(), bsz)
        step_losses.append(loss)
        clips += bsz
        window_clips += bsz
        global_step += 1
        if step_callback is not None:
            step_callback(epoch, i, stats)
        if (i + 1) % args.print_freq == 0 or i + 1 == steps_per_epoch:
            now = time.perf_counter()
            rate = window_clips / max(now - window_start, 1e-9)
            window_start, window_clips = now, 0
            if writer is not None:
                writer.scalars({"train/loss": loss, "train/loss_view1": stats["loss_1"].item(),
                                "train/loss_view2": stats["loss_2"].item(),
                                "train/prob_view1": stats["prob_1"].item(),
                                "train/prob_view2": stats["prob_2"].item(),
                                "train/top1_view1": stats["top1_1"].item(),
                                "train/top1_view2": stats["top1_2"].item(),
                                "train/lr": optimizer.param_groups[0]["lr"], "train/clips_per_s": rate},
                               global_step)
            if bar is not None:
                bar.set_postfix(loss=f"{meters['loss'].avg:.3f}",
                                top1=f"{(meters['top1_1'].avg + meters['top1_2'].avg) / 2:.3f}",
                                clips_s=f"{rate:.1f}")
    if bar is not None:
        bar.close()
    _set_lr(optimizer, scheduled, 1.0)  # the scheduler steps from the un-warmed value
    elapsed = time.perf_counter() - start
    out = {k: m.avg for k, m in meters.items()}
    out.update(clips_per_s=clips / max(elapsed, 1e-9), time=elapsed, steps=len(step_losses),
               step_losses=step_losses, global_step=global_step)
    return out


def build_components(args, n_data: int, device) -> dict:
    """Model, objective, optimizer, scheduler, grad scaler and the two generators.

    Everything random here draws from the global torch RNG (seeded by :func:`main`) except the
    negative-index and NCE-index generators, which get their own seeds from ``args.seed``.

    Returns:
        dict with ``model``, ``objective``, ``contrast`` (the memory objective's
        :class:`~iic_ext.nce.NCEAverage`, else None), ``optimizer``, ``scheduler``, ``scaler`` (None
        unless fp16 on CUDA) and ``generators`` (``{"negative", "nce"}``).
    """
    from .models import build_model

    model = build_model(args.model).to(device)
    if getattr(args, "init", None):
        from .evaluation.common import load_backbone_weights

        print(f"initial backbone weights from {args.init}:")
        load_backbone_weights(model, args.init, expected_missing="")
    neg_gen = torch.Generator().manual_seed(epoch_seed(args.seed, 0, stream=2))
    nce_gen = torch.Generator().manual_seed(epoch_seed(args.seed, 0, stream=3))
    objective = build_objective(args.objective, model, model.feature_dim, n_data, proj_dim=args.proj_dim,
                                nce_k=args.nce_k, nce_t=args.nce_t, nce_m=args.nce_m, moco_m=args.moco_m,
                                intra_neg=args.neg != "none", nce_criterion=args.nce_criterion,
                                normalize_features=args.normalize_features, generator=nce_gen)
    contrast = getattr(objective, "contrast", None)
    params = list(model.parameters()) + objective.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scheduler = build_lr_scheduler(optimizer, args)
    scaler = None
    if args.amp and device.type == "cuda" and args.amp_dtype == "fp16":
        scaler = torch.amp.GradScaler("cuda")
    return {"model": model, "objective": objective, "contrast": contrast, "optimizer": optimizer,
            "scheduler": scheduler, "scaler": scaler, "generators": {"negative": neg_gen, "nce": nce_gen}}


# ---- checkpoints ------------------------------------------------------------------------------------


def make_checkpoint(model, objective, optimizer, scheduler, scaler, epoch, global_step, args, generators):
    """The checkpoint of a run: ``model`` is the trained backbone's plain state dict (the query encoder
    for moco), ``objective`` its name and ``contrast`` its whole state (for memory, the original's
    ``NCEAverage`` state dict)."""
    return {
        "version": CHECKPOINT_VERSION,
        "model": model.state_dict(),
        "objective": objective.name,
        "contrast": objective.checkpoint_state(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "global_step": global_step,
        "args": plain_args(args),
        "rng": capture_rng_state(**generators),
        "data": {"seed": args.seed, "next_epoch": epoch + 1},
    }


_RESUME_MUST_MATCH = ("dataset", "split", "objective", "model", "modality", "neg", "nce_k", "nce_criterion",
                      "proj_dim", "batch_size", "clip_len", "num_videos")


def _check_resume_args(saved: dict, args, path: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(args, k)!r}" for k in _RESUME_MUST_MATCH
             if k in saved and plain(getattr(args, k)) != saved[k]]
    if diffs:
        raise ValueError(f"{path}: cannot resume with different settings ({'; '.join(diffs)})")
    if "objective" not in saved and args.objective != "memory":  # written before other objectives existed
        raise ValueError(f"{path}: cannot resume with different settings (objective: checkpoint 'memory', "
                         f"now {args.objective!r})")
    soft = [k for k in ("lr", "epochs", "nce_t", "nce_m", "moco_m", "momentum", "weight_decay", "seed", "lr_schedule",
                        "warmup_epochs", "normalize_features", "amp")
            if k in saved and plain(getattr(args, k)) != saved[k]]
    if soft:
        warnings.warn(f"resuming {path} with changed settings {soft}: the run will not match an "
                      f"uninterrupted one", stacklevel=2)


# ---- main -------------------------------------------------------------------------------------------


def _describe(args, n_data, steps, device) -> str:
    if args.objective == "memory":
        contrast = (f"memory banks, K={args.nce_k}, T={args.nce_t}, m={args.nce_m}, "
                    f"{'NCE' if args.nce_criterion else 'softmax'} loss")
    elif args.objective == "moco":
        contrast = f"momentum encoder (m={args.moco_m}) and key queues of {args.nce_k}, T={args.nce_t}"
    else:
        contrast = f"in-batch NT-Xent, T={args.nce_t}"
    head = f", projection head to {args.proj_dim}" if args.proj_dim else ""
    lines = [f"IIC training on {args.dataset} ({n_data} videos, {steps} steps/epoch) on {device}: "
             f"{args.model}, views rgb+{args.modality}, negative {args.neg}, objective {args.objective} "
             f"({contrast}{head}), batch {args.batch_size}, "
             f"{args.epochs} epochs, lr {args.lr} ({args.lr_schedule}"
             f"{', milestones ' + str(args.milestones) if args.lr_schedule == 'multistep' else ''}"
             f"{', warm-up ' + str(args.warmup_epochs) + ' ep' if args.warmup_epochs else ''}), "
             f"momentum {args.momentum}, wd {args.weight_decay}, clips {args.clip_len}x{args.crop_size}"
             f"x{args.crop_size} from {args.resize[0]}x{args.resize[1]}, "
             f"features {'L2-normalised' if args.normalize_features else 'unnormalised'}, seed {args.seed}"]
    if args.preset == "demo":
        demo_obj = OBJECTIVE_PRESETS["demo"].get(args.objective, {})
        orig_obj = OBJECTIVE_PRESETS["original"].get(args.objective, {})
        changed = [k for k in args.from_preset
                   if (k in demo_obj and demo_obj[k] != orig_obj.get(k))
                   or (k not in demo_obj and k in DEMO_PRESET and DEMO_PRESET[k] != ORIGINAL_PRESET[k])]
        lines.append("demo preset for the synthetic dataset (sized to finish in minutes on a CPU; "
                     "--dataset ucf101|hmdb51 uses the original recipe). Departures from the original: "
                     + ", ".join(f"{k}={getattr(args, k)}" for k in changed) + ".")
        for k in changed:
            reason = DEMO_OBJECTIVE_REASONS.get((args.objective, k), DEMO_REASONS.get(k))
            if reason:
                lines.append(f"  {k}: {reason}")
    return "\n".join(lines)


def _epoch_line(epoch: int, epochs: int, stats: dict, lr: float) -> str:
    """The epoch's summary: loss against the uniform level 2 ln(candidates), the contrastive top-1 of
    both views against chance, the positive's probability, lr and speed."""
    chance = stats["chance"]
    uniform = 2 * math.log(1.0 / chance) if chance > 0 else float("nan")
    return (f"epoch {epoch}/{epochs}  loss {stats['loss']:.4f} (view1 {stats['loss_1']:.4f}, view2 "
            f"{stats['loss_2']:.4f}; uniform {uniform:.2f})  top1 {stats['top1_1']:.3f}/{stats['top1_2']:.3f} "
            f"(chance {chance:.4f})  p_pos {stats['prob_1']:.3f}/{stats['prob_2']:.3f}  lr {lr:.4g}  "
            f"{stats['clips_per_s']:.1f} clips/s  {stats['time']:.1f}s")


def main(args: argparse.Namespace, step_callback=None) -> dict:
    """Train; returns ``{"history": [per-epoch dicts], "last": path, "out": folder, "log_dir": ...}``.

    ``step_callback(epoch, step, stats)`` is called after every step (tests use it to interrupt a run).
    """
    if not hasattr(args, "preset"):
        args = resolve_args(args)
    device = select_device(args.device)
    if args.amp and args.amp_dtype is None:
        args.amp_dtype = "fp16" if device.type == "cuda" else "bf16"
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    seed_everything(args.seed)

    dataset = build_train_set(args)
    loader, sampler = build_loader(dataset, args, device)
    n_data = len(dataset)

    c = build_components(args, n_data, device)
    model, objective, optimizer, scheduler, scaler = (
        c["model"], c["objective"], c["optimizer"], c["scheduler"], c["scaler"])
    generators = c["generators"]
    negatives = _Negatives(args.neg, args.shuffle_mode, generators["negative"]) if args.neg != "none" else None

    start_epoch, global_step = 1, 0
    if args.resume:
        ckpt = load_checkpoint(args.resume, map_location="cpu",
                               required=("model", "contrast", "optimizer", "epoch"))
        _check_resume_args(ckpt.get("args", {}), args, args.resume)
        model.load_state_dict(ckpt["model"])
        objective.load_checkpoint_state(ckpt["contrast"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        else:  # a checkpoint without scheduler state: fast-forward instead of restarting the schedule
            for _ in range(int(ckpt["epoch"])):
                scheduler.step()
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if "rng" in ckpt:
            restore_rng_state(ckpt["rng"], **generators)
        else:
            warnings.warn(f"{args.resume}: no RNG state saved; the resumed run is not exact", stacklevel=2)
        start_epoch = int(ckpt["epoch"]) + 1
        global_step = int(ckpt.get("global_step", (start_epoch - 1) * len(loader)))
        print(f"resumed from {args.resume} (epoch {ckpt['epoch']}); continuing at epoch {start_epoch}")
        del ckpt

    os.makedirs(args.out, exist_ok=True)
    print(_describe(args, n_data, len(loader), device), flush=True)
    writer = MetricWriter(args.log_dir, os.path.join(args.out, "metrics.jsonl"),
                          purge_step=global_step if args.resume else None)
    if not writer.has_tensorboard:
        print("tensorboard is not installed: no event files (metrics.jsonl is written)")
    with open(os.path.join(args.out, "args.json"), "w", encoding="utf-8") as f:
        json.dump(plain_args(args), f, indent=1)

    history = []
    last = os.path.join(args.out, "last.pth")
    t_run = time.perf_counter()
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            stats = train_one_epoch(model, objective, optimizer, loader, epoch, args,
                                    negatives=negatives, device=device, scheduler=scheduler, scaler=scaler,
                                    writer=writer, global_step=global_step, step_callback=step_callback)
            global_step = stats["global_step"]
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            state = make_checkpoint(model, objective, optimizer, scheduler, scaler, epoch, global_step, args,
                                    generators)
            save_checkpoint(state, last)
            if args.save_freq and epoch % args.save_freq == 0:
                save_checkpoint(state, os.path.join(args.out, f"ckpt_epoch{epoch}.pth"))
            del state
            record = {"epoch": epoch, "lr": lr, **{k: v for k, v in stats.items() if k != "step_losses"}}
            writer.log_epoch(record)
            writer.scalars({"epoch/loss": stats["loss"], "epoch/prob_view1": stats["prob_1"],
                            "epoch/prob_view2": stats["prob_2"], "epoch/top1_view1": stats["top1_1"],
                            "epoch/top1_view2": stats["top1_2"]}, epoch)
            history.append({**record, "step_losses": stats["step_losses"]})
            print(_epoch_line(epoch, args.epochs, stats, lr), flush=True)
    finally:
        writer.close()
    total = time.perf_counter() - t_run
    where = last if os.path.isfile(last) else "(no epoch finished)"
    print(f"done in {total:.0f}s: checkpoint {where}, logs {args.log_dir}", flush=True)
    return {"history": history, "last": last, "out": args.out, "log_dir": args.log_dir, "time": total}


def cli(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    return main(resolve_args(args))


if __name__ == "__main__":
    cli()
