"""Video retrieval (nearest neighbours) of test videos among training videos: ``python -m iic_ext.retrieve``.

As the original ``retrieve_clips.py``: every video gives ``clips_per_video`` clips at linspace positions
(centre crop); each clip's pooled conv5 map (conv5 -> MaxPool3d((1, 2, 2)) -> flatten) is averaged per
video; each test video is compared by cosine similarity with every training video, and counts as
correct at ``k`` when one of its ``k`` nearest training videos has its class.

Differences from the original, all in its favour of correctness: no video is dropped (the original's
``drop_last=True`` loses 1 train and 7 test videos of UCF101); similarities and top-k run in torch by
chunks on the device (no full argsort); ``k`` above the training-set size is clamped; ties at the k-th
neighbour are broken by the lower training index; features are cached under a key of every setting
that changes them. ``--knn K`` adds a weighted kNN classifier on the same features.

Without arguments it evaluates on the built-in synthetic dataset, with the checkpoint of the default
training run (``runs/r3d_res_repeat_synthetic/last.pth``) when it exists, else a random init.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Dict, Optional

import torch

from .evaluation.common import (build_backbone, build_eval_dataset, describe_departures, describe_init,
                                feature_description, load_backbone_weights, resolve_common, select_device,
                                str2bool)
from .evaluation.features import FeatureCache, extract_features, file_fingerprint, needed_modalities
from .evaluation.io import write_json
from .evaluation.plot import plot_topk
from .evaluation.retrieval import DEFAULT_KS, knn_classify, topk_retrieval
from .models.registry import MODEL_NAMES

__all__ = ["get_args_parser", "resolve_args", "main", "video_features", "cli"]

FEATURE_FORMAT = 1


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "IIC clip retrieval", add_help=add_help,
        description="Top-k video retrieval (test videos against training videos). Without arguments: the "
                    "synthetic dataset with the default training run's checkpoint if present, else random "
                    "init. Unset data options take the original values for ucf101/hmdb51 and small demo "
                    "values for synthetic.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="synthetic", choices=["synthetic", "ucf101", "hmdb51"])
    g.add_argument("--data-root", "--data_root", dest="data_root", default=None,
                   help="dataset folder (default data/<dataset>)")
    g.add_argument("--split", type=int, default=1, choices=[1, 2, 3])
    g.add_argument("--clip-len", "--clip_len", "--cl", dest="clip_len", type=int, default=None)
    g.add_argument("--resize", type=int, nargs=2, metavar=("H", "W"), default=None)
    g.add_argument("--crop-size", "--crop_size", dest="crop_size", type=int, default=None)
    g.add_argument("--clips-per-video", "--clips_per_video", dest="clips_per_video", type=int, default=None,
                   help="clips per video at linspace positions (10 for ucf101/hmdb51)")
    g.add_argument("--num-videos", "--num_videos", dest="num_videos", type=int, default=None,
                   help="synthetic only: training videos")
    g.add_argument("--num-test-videos", "--num_test_videos", dest="num_test_videos", type=int, default=None,
                   help="synthetic only: test videos")
    g.add_argument("--data-seed", "--data_seed", dest="data_seed", type=int, default=None,
                   help="synthetic only: generator seed of the videos (default: the checkpoint's training "
                        "seed, else 632)")
    g.add_argument("--batch-size", "--batch_size", "--bs", dest="batch_size", type=int, default=8,
                   help="videos per batch (each gives clips-per-video clips)")
    g.add_argument("--workers", type=int, default=None, help="data loading workers")

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, choices=MODEL_NAMES)
    g.add_argument("--ckpt", default=None, help="self-supervised checkpoint; 'none' forces random init")
    g.add_argument("--seed", type=int, default=632, help="seed of the random init")
    g.add_argument("--strict", action="store_true", help="fail on any key mismatch when loading --ckpt")
    g.add_argument("--modality", default="res", choices=["rgb", "res", "u", "v"])
    g.add_argument("--merge", type=str2bool, nargs="?", const=True, default=False,
                   help="concatenate the RGB feature with the modality's (--merge or --merge=True)")
    g.add_argument("--feature", default="conv", choices=["conv", "pool"],
                   help="conv: the pooled last conv map (the original's conv5 feature; each model's in "
                        "iic_ext.models.MODELS); pool: the average-pooled feature (512-d, 1024-d for i3d/s3dg)")

    g = p.add_argument_group("retrieval")
    g.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS))
    g.add_argument("--knn", type=int, default=0, metavar="K",
                   help="also classify test videos by a weighted vote of their K nearest training videos")
    g.add_argument("--knn-t", "--knn_t", dest="knn_t", type=float, default=0.07,
                   help="kNN vote weight exp(cos / t); 0 for a plain majority vote")
    g.add_argument("--chunk-size", "--chunk_size", dest="chunk_size", type=int, default=None,
                   help="test videos per similarity block (default: ~16M similarities per block)")
    g.add_argument("--extract", type=str2bool, nargs="?", const=True, default=None,
                   help="--extract: always extract features; --no-extract (or --extract=False): only use "
                        "cached ones; default: use the cache when it matches, else extract")
    g.add_argument("--no-extract", dest="extract", action="store_false")

    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--gpu", type=int, default=None, help="CUDA device index (the original flag)")
    g.add_argument("--out", default=None, help="output folder (default runs/retrieve/<run name>)")
    g.add_argument("--feature-dir", "--feature_dir", dest="feature_dir", default=None,
                   help="feature cache folder, shared by retrieve and linear (default runs/features)")
    g.add_argument("--id", default=None, help="sub-folder of --feature-dir (the original flag)")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _init_tag(args) -> str:
    if not args.ckpt:
        return f"random{args.seed}"
    parent = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    return f"{parent}-{stem}" if parent else stem


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill dataset-dependent defaults and check the options (idempotent)."""
    if getattr(args, "_resolved", False):
        return args
    resolve_common(args)
    if args.dataset != "synthetic" and (args.num_videos is not None or args.num_test_videos is not None):
        raise ValueError("--num-videos / --num-test-videos apply to --dataset synthetic only")
    for name in ("clip_len", "crop_size", "clips_per_video", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive")
    if min(args.ks) < 1:
        raise ValueError("--ks must be positive")
    if args.merge and args.modality == "rgb":
        print("note: --merge with --modality rgb concatenates the RGB feature with itself (as the original)")
    if args.out is None:
        name = f"{args.dataset}_s{args.split}_{args.model}_{args.modality}{'_merge' if args.merge else ''}" \
               f"_{args.feature}_{_init_tag(args)}"
        args.out = os.path.join("runs", "retrieve", name)
    if args.feature_dir is None:
        args.feature_dir = os.path.join("runs", "features")
    if args.id:
        args.feature_dir = os.path.join(args.feature_dir, args.id)
    args._resolved = True
    return args


def feature_settings(args, feature: str) -> Dict[str, Any]:
    """Everything that changes the extracted features (the cache key)."""
    init: Dict[str, Any] = {"random_init_seed": args.seed} if not args.ckpt else {"ckpt": file_fingerprint(args.ckpt)}
    return dict(format=FEATURE_FORMAT, model=args.model, feature=feature, modality=args.modality,
                merge=bool(args.merge), dataset=args.dataset,
                data_root=os.path.abspath(args.data_root) if args.data_root else None, split=args.split,
                clip_len=args.clip_len, resize=list(args.resize), crop_size=args.crop_size,
                clips_per_video=args.clips_per_video, data_seed=args.data_seed,
                num_videos=args.num_videos if args.dataset == "synthetic" else None,
                num_test_videos=args.num_test_videos if args.dataset == "synthetic" else None, **init)


def build_feature_model(args, feature: str, stream=None):
    torch.manual_seed(args.seed)
    model = build_backbone(args.model, return_conv=feature == "conv")
    if args.ckpt:
        load_backbone_weights(model, args.ckpt, strict=args.strict, stream=stream)
    return model


def video_features(args, feature: Optional[str] = None, device: Optional[torch.device] = None,
                   ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Training- and test-list video features, from the cache when it matches.

    Returns:
        ``{"train": {...}, "test": {...}}`` as :func:`extract_features`, plus ``"cache"`` (folder) and
        ``"extracted"`` (list of parts computed now).
    """
    args = resolve_args(args)
    feature = feature or args.feature
    device = device or select_device(args.device, args.gpu)
    cache = FeatureCache(args.feature_dir, feature_settings(args, feature))
    out: Dict[str, Any] = {"cache": cache.dir, "extracted": []}
    model = None
    for part, train in (("train", True), ("test", False)):
        data = None if args.extract else cache.load(part)
        if data is None and args.extract is False:
            raise FileNotFoundError(f"--no-extract: no cached {part} features for these settings under "
                                    f"{cache.dir}")
        if data is None:
            if model is None:
                model = build_feature_model(args, feature)
            ds = build_eval_dataset(args, train=train, modalities=needed_modalities(args.modality, args.merge))
            t0 = time.time()
            data = extract_features(model, ds, args.modality, args.merge, batch_size=args.batch_size,
                                    workers=args.workers, device=device, residual_scaled=True,
                                    progress=args.progress, desc=f"{part} features")
            cache.save(part, data)
            out["extracted"].append(part)
            print(f"  {part}: {len(ds)} videos x {args.clips_per_video} clips -> features "
                  f"{tuple(data['features'].shape)} in {time.time() - t0:.1f}s")
        else:
            print(f"  {part}: cached features {tuple(data['features'].shape)} ({cache.path(part)})")
        out[part] = data
    return out


def format_table(acc: Dict[int, float], correct: Dict[int, int], total: int, title: str) -> str:
    lines = [title, f"  {'k':>4}  {'correct':>8}  {'total':>6}  {'acc (%)':>8}"]
    for k in sorted(acc):
        lines.append(f"  {k:>4}  {correct[k]:>8}  {total:>6}  {100 * acc[k]:>8.2f}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Run retrieval; returns the dict written to ``<out>/retrieval.json``."""
    args = resolve_args(args)
    device = select_device(args.device, args.gpu)
    with torch.no_grad():
        return _run(args, device)


def _run(args, device) -> Dict[str, Any]:
    view = f"{args.modality}{' + rgb (merged)' if args.merge else ''}"
    print(f"Retrieval on {args.dataset} split {args.split}: {args.model}, input {view}, feature "
          f"{feature_description(args.model, args.feature)}, {args.clips_per_video} clips/video "
          f"of {args.clip_len}x{args.crop_size}x{args.crop_size} (from {args.resize[0]}x{args.resize[1]}), "
          f"device {device}")
    print(f"  {describe_init(args)}")
    if args.dataset == "synthetic" and describe_departures(args):
        print(f"  synthetic demo settings (the original's differ): {describe_departures(args)}")
    t0 = time.time()
    feats = video_features(args, device=device)
    tr, te = feats["train"], feats["test"]
    gallery = tr["features"].to(device)
    query = te["features"].to(device)
    correct = topk_retrieval(query, te["labels"], gallery, tr["labels"], args.ks, args.chunk_size)
    n_test, n_train = query.shape[0], gallery.shape[0]
    ks = sorted(set(args.ks))
    acc = {k: correct[k] / n_test for k in ks}
    clamped = [k for k in ks if k > n_train]
    title = (f"Top-k retrieval, {n_test} test videos against {n_train} training videos "
             f"({describe_init(args).split(': ', 1)[1]})")
    print(format_table(acc, correct, n_test, title))
    if clamped:
        print(f"  note: k={clamped} exceed the {n_train} training videos; clamped to {n_train}")

    result: Dict[str, Any] = {f"top{k}": acc[k] for k in ks}
    result["correct"] = {f"top{k}": correct[k] for k in ks}
    result["num_test"], result["num_train"] = n_test, n_train
    result["feature_dim"] = int(gallery.shape[1])
    if args.knn:
        pred = knn_classify(query, gallery, tr["labels"], k=args.knn, temperature=args.knn_t,
                            num_classes=int(max(tr["labels"].max(), te["labels"].max())) + 1,
                            chunk_size=args.chunk_size)
        knn_acc = float((pred.cpu() == te["labels"]).float().mean())
        result["knn"] = {"k": min(args.knn, n_train), "temperature": args.knn_t, "accuracy": knn_acc}
        print(f"  weighted {min(args.knn, n_train)}-NN classification (t={args.knn_t}): {100 * knn_acc:.2f}%")
    result["settings"] = {
        **{k: v for k, v in vars(args).items() if not k.startswith("_")},
        "weights": "random init" if not args.ckpt else args.ckpt_source,
        "device": str(device), "feature_cache": feats["cache"], "extracted": feats["extracted"],
        "seconds": round(time.time() - t0, 2)}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "retrieval.json")
    write_json(result, path)
    print(f"  wrote {path}")
    if args.plot:
        label = f"{args.model} {view} ({'random init' if not args.ckpt else os.path.basename(args.ckpt)})"
        png = plot_topk({label: acc}, os.path.join(args.out, "retrieval_topk.png"),
                        title=f"{args.dataset} split {args.split} retrieval")
        if png:
            print(f"  wrote {png}")
    return result


def cli(argv=None) -> Dict[str, Any]:
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    cli()
