"""Pieces shared by the evaluation commands: presets, device, datasets, backbones and checkpoints."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from ..utils.misc import select_device  # noqa: F401  (re-exported: one device selection for every command)

__all__ = ["DEFAULT_SSL_CHECKPOINT", "ORIGINAL_EVAL", "SYNTHETIC_EVAL", "str2bool", "select_device",
           "checkpoint_args", "resolve_common", "build_eval_dataset", "build_backbone", "report_keys",
           "describe_init", "describe_departures", "load_backbone_weights", "feature_description"]

# The checkpoint of ``python -m iic_ext.train`` run without arguments (R3D-10, res, repeat, synthetic).
DEFAULT_SSL_CHECKPOINT = os.path.join("runs", "r3d_res_repeat_synthetic", "last.pth")

# Clip settings of the original evaluation scripts (UCF101 / HMDB51).
ORIGINAL_EVAL = dict(model="r3d", clip_len=16, resize=[128, 171], crop_size=112, clips_per_video=10,
                     workers=4, num_videos=None, num_test_videos=None)
# The synthetic demo: the geometry and training set of the training demo preset (8 frames, 16x16 crops
# of 20x20 frames, 128 training videos; taken from the checkpoint when it records them), 200 test
# videos of the synthetic test split (one video is half a point of top-k), and the original 10 clips
# per video.
SYNTHETIC_EVAL = dict(model="r3d", clip_len=8, resize=[20, 20], crop_size=16, clips_per_video=10,
                      workers=0, num_videos=128, num_test_videos=200)
# The synthetic training set is generated from the training seed; the demo trains with 632.
SYNTHETIC_DATA_SEED = 632


def str2bool(value: Any) -> bool:
    """Parse ``True``/``False`` (the original scripts' ``ast.literal_eval`` style), ``1``/``0``,
    ``yes``/``no``."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def checkpoint_args(path: Optional[str]) -> Dict[str, Any]:
    """The ``args`` dict saved by ``iic_ext.train`` in a checkpoint (empty if absent or unreadable)."""
    if not path or not os.path.isfile(path):
        return {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return {}
    saved = obj.get("args") if isinstance(obj, dict) else None
    return dict(saved) if isinstance(saved, dict) else {}


def resolve_common(args: argparse.Namespace, keys: Sequence[str] = tuple(ORIGINAL_EVAL)) -> argparse.Namespace:
    """Fill unset data/model options.

    Order: the value given on the command line; for synthetic data, the clip settings the checkpoint
    was trained with (``clip_len``, ``resize``, ``crop_size``, ``model``); the dataset's preset.
    Also picks the default self-supervised checkpoint when ``--ckpt`` is not given and it exists
    (``args.ckpt_source`` says which).
    """
    if getattr(args, "ckpt", None) in ("", "none", "None"):
        args.ckpt = None
        args.ckpt_source = "random init (--ckpt none)"
    elif getattr(args, "ckpt", None) is None and getattr(args, "dataset", "synthetic") == "synthetic" \
            and os.path.isfile(DEFAULT_SSL_CHECKPOINT) and not getattr(args, "random_init", False):
        args.ckpt = DEFAULT_SSL_CHECKPOINT
        args.ckpt_source = f"default training run {DEFAULT_SSL_CHECKPOINT}"
    elif getattr(args, "ckpt", None) is None:
        args.ckpt_source = "random init"
    else:
        args.ckpt_source = args.ckpt
    preset = SYNTHETIC_EVAL if args.dataset == "synthetic" else ORIGINAL_EVAL
    saved = checkpoint_args(args.ckpt) if args.dataset == "synthetic" else {}
    filled = []
    for key in keys:
        if getattr(args, key, None) is None:
            if key in ("clip_len", "resize", "crop_size", "model", "num_videos") and saved.get(key) is not None:
                value = saved[key]
            elif key == "model" and checkpoint_args(args.ckpt).get("model") is not None:
                value = checkpoint_args(args.ckpt)["model"]
            else:
                value = preset[key]
            setattr(args, key, list(value) if isinstance(value, (list, tuple)) else value)
            filled.append(key)
    if args.dataset != "synthetic" and getattr(args, "data_root", None) is None:
        args.data_root = os.path.join("data", args.dataset)
    if getattr(args, "data_seed", None) is None:
        args.data_seed = int(saved.get("seed", SYNTHETIC_DATA_SEED)) if args.dataset == "synthetic" else 0
    args.from_preset = filled
    return args


def build_eval_dataset(args: argparse.Namespace, train: bool, modalities: Sequence[str],
                       clips_per_video: Optional[int] = None, split: Optional[int] = None,
                       augment: bool = False):
    """Dataset for evaluation.

    Args:
        train (bool): the training list (gallery / classifier training) or the test list.
        modalities: dataset modalities to decode.
        clips_per_video (int): clips per video (default ``args.clips_per_video``); with more than one,
            clips sit at linspace positions.
        split (int): dataset split (default ``args.split``).
        augment (bool): keep the training augmentation of the training list (random window and crop,
            one clip). Without it every clip is centre-cropped, as the original retrieval extracts the
            training list.
    """
    from ..data import build_dataset

    kw: Dict[str, Any] = {}
    if args.dataset == "synthetic":
        n = getattr(args, "num_videos", None) if train else getattr(args, "num_test_videos", None)
        if n is not None:
            kw["num_videos"] = int(n)
    n_clips = int(clips_per_video if clips_per_video is not None else args.clips_per_video)
    # The original extracts the training list like the test list: fixed windows, centre crop.
    sampling = "random" if (train and augment) else "fixed"
    ds = build_dataset(args.dataset, root=getattr(args, "data_root", None),
                       split=int(split if split is not None else args.split), train=train,
                       modalities=tuple(modalities), clip_len=args.clip_len, resize=tuple(args.resize),
                       crop_size=args.crop_size, clips_per_video=n_clips, seed=args.data_seed,
                       sampling=sampling, **kw)
    return ds


def build_backbone(name: str, *, return_conv: bool = False, with_classifier: bool = False,
                   num_classes: int = 101) -> nn.Module:
    from ..models import build_model

    return build_model(name, with_classifier=with_classifier, num_classes=num_classes,
                       return_conv=return_conv)


def feature_description(model_name: str, feature: str) -> str:
    """``"pooled conv5"`` style label of a ``--feature`` choice, with the model's pooled-feature size."""
    from ..models import model_spec

    spec = model_spec(model_name)
    # the retrieval line starts with the layer it pools: conv5, conv5b, Mixed_5c, layer4
    return f"pooled {spec.retrieval.split()[0]}" if feature == "conv" else f"{spec.feature_dim}-d pool"


def report_keys(missing: Sequence[str], unexpected: Sequence[str], expected_missing: str = "linear.",
                strict: bool = False, source: str = "checkpoint", stream=None) -> None:
    """Print every key mismatch of a weight load; raise with ``strict`` on an unexpected mismatch.

    Missing keys under ``expected_missing`` (the new classifier when fine-tuning) are listed as expected.
    """
    stream = stream or sys.stdout
    exp = [k for k in missing if expected_missing and k.startswith(expected_missing)]
    other = [k for k in missing if k not in exp]
    if exp:
        print(f"  {source}: {len(exp)} key(s) newly initialised as expected: {', '.join(exp)}", file=stream)
    if other:
        print(f"  {source}: WARNING {len(other)} model key(s) missing from the checkpoint, left at "
              f"random init: {', '.join(other[:20])}{' ...' if len(other) > 20 else ''}", file=stream)
    if unexpected:
        print(f"  {source}: WARNING {len(unexpected)} checkpoint key(s) not used by the model: "
              f"{', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}", file=stream)
    if not other and not unexpected:
        print(f"  {source}: all backbone keys matched", file=stream)
    if strict and (other or unexpected):
        raise RuntimeError(f"{source}: key mismatch with --strict: {len(other)} missing {other[:5]}, "
                           f"{len(unexpected)} unexpected {unexpected[:5]}")


def load_backbone_weights(model: nn.Module, path: str, *, expected_missing: Optional[str] = None,
                          strict: bool = False, stream=None):
    """Load ``path`` into ``model`` with :func:`iic_ext.models.load_weights`, printing the mismatches.

    Args:
        expected_missing (str | None): prefix of the keys expected to be missing; None: the model's
            classifier (``linear.``, ``fc.`` or ``logits.``), whose checkpoint tensors of another shape
            are then dropped (a new head); ``""``: none.

    Returns:
        (missing, unexpected) key lists.
    """
    from ..models import load_weights
    from ..models.checkpoint import classifier_prefix

    new_head = expected_missing is None
    if new_head:
        expected_missing = classifier_prefix(model)
    with warnings.catch_warnings():
        # Printed by report_keys in a fuller form.
        warnings.simplefilter("ignore")
        missing, unexpected = load_weights(model, path, strict=False, new_head=new_head)
    n_model = len(model.state_dict())
    if len(missing) == n_model:
        raise RuntimeError(f"{path}: no tensor of the checkpoint matches the model (wrong --model?); "
                           f"checkpoint keys: {unexpected[:5]}")
    report_keys(missing, unexpected, expected_missing, strict, source=os.fspath(path), stream=stream)
    return missing, unexpected


def describe_departures(args: argparse.Namespace, *originals: Dict[str, Any]) -> str:
    """``key=value`` of the options filled from the synthetic preset that differ from the original."""
    ref: Dict[str, Any] = {}
    for o in (ORIGINAL_EVAL,) + originals:
        ref.update(o)
    items = [f"{k}={getattr(args, k)}" for k in getattr(args, "from_preset", [])
             if k in ref and ref[k] != getattr(args, k) and ref[k] is not None]
    return ", ".join(items)


def describe_init(args: argparse.Namespace) -> str:
    if args.ckpt:
        return f"weights: {args.ckpt_source}"
    return f"weights: RANDOM INIT (seed {args.seed}) -- the baseline, no checkpoint given"
